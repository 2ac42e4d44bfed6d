//! One container of a pod on a simulated node: image lookup, the process launch as the
//! kubelet would set it up, readiness probes, exit reporting and restarts with back-off.

use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::node::{wait_for_deletion, Deletion, Node, PodId};
use crate::store::now_rfc3339;
use crate::{Image, Resource};

/// The kubelet puts at most this many trailing log lines into a termination message.
const TERMINATION_LOG_LINES: usize = 80;
/// The kubelet puts at most this many trailing log bytes into a termination message.
const TERMINATION_LOG_BYTES: usize = 2048;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything a container task needs.
pub struct ContainerContext {
    pub node: Arc<Node>,
    pub pod: Value,
    pub id: PodId,
    pub index: usize,
    pub spec: Value,
    pub pod_ip: Ipv4Addr,
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Builds a container status entry in the `waiting` state.
pub fn waiting_status(
    spec: &Value,
    reason: &str,
    message: Option<&str>,
    restarts: u64,
    last_state: Option<&Value>,
) -> Value {
    let mut waiting = json!({"reason": reason});
    if let Some(message) = message {
        waiting["message"] = json!(message);
    }
    json!({
        "name": text(spec, "/name"),
        "image": text(spec, "/image"),
        "imageID": "",
        "ready": false,
        "started": false,
        "restartCount": restarts,
        "state": {"waiting": waiting},
        "lastState": last_state.cloned().unwrap_or_else(|| json!({})),
    })
}

/// A process launch derived from the container spec and the image.
#[derive(Debug)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: Option<PathBuf>,
}

/// Expands `$(VAR)` references as the kubelet does: defined variables are replaced, `$$`
/// escapes a `$`, and references to undefined variables stay as written.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Maps a path inside the image to the host, by the longest `path_map` entry that equals it
/// or contains it as a directory.
fn map_path(image: &Image, path: &str) -> Option<PathBuf> {
    image
        .path_map
        .iter()
        .filter_map(|(inside, host)| {
            let inside_trimmed = inside.trim_end_matches('/');
            if path == inside || path == inside_trimmed {
                Some((inside.len(), host.clone()))
            } else {
                path.strip_prefix(inside_trimmed)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .map(|rest| (inside.len(), host.join(rest)))
            }
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, host)| host)
}

fn field_ref(context: &ContainerContext, path: &str, host_ip: &str) -> Result<String, String> {
    let pod = &context.pod;
    let labelled = |prefix: &str, section: &str| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            pod.pointer(&format!("/metadata/{section}"))
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    };
    if let Some(value) = labelled("metadata.labels['", "labels")
        .or_else(|| labelled("metadata.annotations['", "annotations"))
    {
        return Ok(value);
    }
    Ok(match path {
        "metadata.name" => context.id.name.clone(),
        "metadata.namespace" => context.id.namespace.clone(),
        "metadata.uid" => context.id.uid.clone(),
        "spec.nodeName" => context.node.config.name.clone(),
        "spec.serviceAccountName" => text(pod, "/spec/serviceAccountName").to_string(),
        "status.podIP" | "status.podIPs" => context.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        other => return Err(format!("unsupported fieldRef fieldPath {other:?}")),
    })
}

fn config_map_value(
    context: &ContainerContext,
    reference: &Value,
) -> Result<Option<String>, String> {
    let name = text(reference, "/name");
    let key = text(reference, "/key");
    let optional = reference
        .get("optional")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let store = &context.node.shared.store;
    let Some(config_map) = store.get(&Resource::CONFIGMAPS, &context.id.namespace, name) else {
        return if optional {
            Ok(None)
        } else {
            Err(format!("configmap \"{name}\" not found"))
        };
    };
    match config_map
        .pointer("/data")
        .and_then(|d| d.get(key))
        .and_then(Value::as_str)
    {
        Some(value) => Ok(Some(value.to_string())),
        None if optional => Ok(None),
        None => Err(format!(
            "couldn't find key {key} in ConfigMap {}/{name}",
            context.id.namespace
        )),
    }
}

fn set_env(env: &mut Vec<(String, String)>, name: &str, value: String) {
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(entry) => entry.1 = value,
        None => env.push((name.to_string(), value)),
    }
}

/// Builds the environment: the image's, then `envFrom`, then `env` in order, each value
/// expanded against the variables defined before it.
fn build_env(context: &ContainerContext, image: &Image) -> Result<Vec<(String, String)>, String> {
    let host_ip = context.node.ips.host_ip().to_string();
    let mut env: Vec<(String, String)> = image
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    set_env(&mut env, "HOSTNAME", context.id.name.clone());
    for source in context
        .spec
        .get("envFrom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let prefix = text(source, "/prefix");
        if let Some(reference) = source.get("configMapRef") {
            let name = text(reference, "/name");
            let optional = reference
                .get("optional")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            match context
                .node
                .shared
                .store
                .get(&Resource::CONFIGMAPS, &context.id.namespace, name)
            {
                Some(config_map) => {
                    for (key, value) in config_map
                        .pointer("/data")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                    {
                        set_env(
                            &mut env,
                            &format!("{prefix}{key}"),
                            value.as_str().unwrap_or("").to_string(),
                        );
                    }
                }
                None if optional => {}
                None => return Err(format!("configmap \"{name}\" not found")),
            }
        } else {
            return Err("envFrom supports only configMapRef in kubesim".to_string());
        }
    }
    for var in context
        .spec
        .get("env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = text(var, "/name");
        let value = if let Some(value) = var.get("value").and_then(Value::as_str) {
            let snapshot = env.clone();
            let lookup = |n: &str| {
                snapshot
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            Some(expand(value, &lookup))
        } else if let Some(path) = var
            .pointer("/valueFrom/fieldRef/fieldPath")
            .and_then(Value::as_str)
        {
            Some(field_ref(context, path, &host_ip)?)
        } else if let Some(reference) = var.pointer("/valueFrom/configMapKeyRef") {
            config_map_value(context, reference)?
        } else if var.get("valueFrom").is_some() {
            return Err(format!("env var {name:?}: kubesim supports valueFrom.fieldRef and valueFrom.configMapKeyRef only"));
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            set_env(&mut env, name, value);
        }
    }
    Ok(env)
}

/// Returns why a hostPath volume of type `Directory` cannot be mounted yet: its path is missing
/// or not a directory, which the kubelet checks before it starts the container.
fn mount_problem(context: &ContainerContext) -> Option<String> {
    let volumes = context.pod.pointer("/spec/volumes")?.as_array()?;
    volumes.iter().find_map(|volume| {
        let kind = volume.pointer("/hostPath/type").and_then(Value::as_str)?;
        let path = volume.pointer("/hostPath/path").and_then(Value::as_str)?;
        (kind == "Directory" && !std::path::Path::new(path).is_dir()).then(|| {
            format!(
                "MountVolume.SetUp failed for volume \"{}\" : hostPath type check failed: {path} is not a directory",
                text(volume, "/name")
            )
        })
    })
}

/// Checks the container's volume mounts: only hostPath volumes mounted at their own host
/// path work, because kubesim has no mount namespaces.
fn check_volumes(context: &ContainerContext) -> Result<(), String> {
    let volumes = context
        .pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for mount in context
        .spec
        .get("volumeMounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = text(mount, "/name");
        let mount_path = text(mount, "/mountPath");
        let Some(volume) = volumes.iter().find(|v| text(v, "/name") == name) else {
            return Err(format!(
                "cannot find volume \"{name}\" to mount into container \"{}\"",
                text(&context.spec, "/name")
            ));
        };
        let host_path = volume.pointer("/hostPath/path").and_then(Value::as_str);
        match host_path {
            Some(path) if path.trim_end_matches('/') == mount_path.trim_end_matches('/') => {
                // The kubelet creates a missing DirectoryOrCreate path (mode 0755) before it
                // mounts it.
                let kind = volume.pointer("/hostPath/type").and_then(Value::as_str);
                if kind == Some("DirectoryOrCreate") {
                    std::fs::create_dir_all(path).map_err(|error| {
                        format!("cannot create hostPath {path} for volume \"{name}\": {error}")
                    })?;
                }
            }
            Some(path) => {
                return Err(format!(
                    "kubesim cannot mount hostPath volume \"{name}\" ({path}) at {mount_path}: a hostPath volume must be mounted at its own host path"
                ))
            }
            None => {
                return Err(format!(
                    "kubesim cannot mount volume \"{name}\" at {mount_path}: only hostPath volumes are supported"
                ))
            }
        }
    }
    Ok(())
}

fn strings(value: Option<&Value>) -> Option<Vec<String>> {
    value.and_then(Value::as_array).map(|items| {
        items
            .iter()
            .map(|i| i.as_str().unwrap_or("").to_string())
            .collect()
    })
}

fn prepare(context: &ContainerContext, image: &Image) -> Result<Launch, String> {
    check_volumes(context)?;
    let env = build_env(context, image)?;
    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());

    let command = strings(context.spec.get("command"));
    let args = strings(context.spec.get("args"));
    let (command, args) = match command {
        Some(command) => (command, args.unwrap_or_default()),
        None => (
            image.entrypoint.clone(),
            args.unwrap_or_else(|| image.cmd.clone()),
        ),
    };
    let mut argv: Vec<String> = command
        .into_iter()
        .chain(args)
        .map(|a| expand(&a, &lookup))
        .collect();
    if argv.is_empty() {
        return Err(
            "no command specified: the container has no command and its image has no entrypoint"
                .to_string(),
        );
    }

    for arg in argv.iter_mut() {
        if let Some(host) = map_path(image, arg) {
            *arg = host.to_string_lossy().into_owned();
        }
    }
    let program = PathBuf::from(argv.remove(0));
    let working_dir = context
        .spec
        .get("workingDir")
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
        .map(|dir| map_path(image, dir).unwrap_or_else(|| PathBuf::from(dir)));
    Ok(Launch {
        program,
        args: argv,
        env,
        working_dir,
    })
}

/// Reads the last lines of a log file, as the kubelet does for `FallbackToLogsOnError`.
pub fn log_tail(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    let window = 64 * 1024u64;
    file.seek(SeekFrom::Start(length.saturating_sub(window)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = lines.len().saturating_sub(TERMINATION_LOG_LINES);
    let tail: String = lines[start..].concat();
    if tail.len() <= TERMINATION_LOG_BYTES {
        return Ok(tail);
    }
    let mut cut = tail.len() - TERMINATION_LOG_BYTES;
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    Ok(tail[cut..].to_string())
}

/// Starts the container process in a new process group with its output in `log_path`.
///
/// NOTE: PR_SET_PDEATHSIG fires when the spawning *thread* exits, not the process. Container
/// tasks run on tokio runtime threads, which live as long as the runtime, so a test process
/// killed with SIGKILL leaves no pod process behind. A runtime shut down while the cluster is
/// still running kills them early.
fn spawn(launch: &Launch, log_path: &Path) -> io::Result<tokio::process::Child> {
    let log = std::fs::File::create(log_path)?;
    let log_err = log.try_clone()?;
    let mut command = tokio::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &launch.working_dir {
        command.current_dir(dir);
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed. It calls prctl(2) and getppid(2) only, without
    // allocating or locking.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // A parent that died before prctl took effect never sends the signal.
            if std::os::unix::process::parent_id() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: killpg only sends a signal; a group that is gone fails with ESRCH.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

fn exit_code(status: std::process::ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(signal)) => 128 + i64::from(signal),
        (None, None) => 128,
    }
}

/// Runs the container until the pod is deleted, or until it exits for good under its restart
/// policy, or forever in a waiting state when it cannot start.
pub async fn run(context: ContainerContext, mut deletion: watch::Receiver<Deletion>) {
    let context = Arc::new(context);
    let store = context.node.shared.store.clone();
    let spec = context.spec.clone();
    let index = context.index;
    let container_name = text(&spec, "/name").to_string();
    let image_name = text(&spec, "/image").to_string();
    let id = context.id.clone();
    let set_entry = |entry: Value| {
        let written = id.write_status(&store, move |pod| {
            if let Some(slot) = pod.pointer_mut(&format!("/status/containerStatuses/{index}")) {
                *slot = entry;
            }
        });
        if let Err(error) = written {
            // The pod is gone or replaced; its container task ends at the deletion signal.
            tracing::debug!(%error, pod = %id.name, namespace = %id.namespace, "kubesim node: container status not written");
        }
    };

    let Some(image) = context.node.config.images.get(&image_name).cloned() else {
        let pull_error = format!(
            "failed to pull and unpack image \"{image_name}\": kubesim node \"{}\" has no image \"{image_name}\"",
            context.node.config.name
        );
        set_entry(waiting_status(
            &spec,
            "ErrImagePull",
            Some(&pull_error),
            0,
            None,
        ));
        let back_off =
            format!("Back-off pulling image \"{image_name}\": ErrImagePull: {pull_error}");
        tokio::select! {
            _ = tokio::time::sleep(context.node.shared.crash_backoff.min(Duration::from_secs(1))) => {
                set_entry(waiting_status(&spec, "ImagePullBackOff", Some(&back_off), 0, None));
                wait_for_deletion(&mut deletion).await;
            }
            _ = wait_for_deletion(&mut deletion) => {}
        }
        return;
    };
    // The kubelet retries a failing hostPath mount and keeps the container ContainerCreating
    // (with a FailedMount event) until the path is there.
    let mut reported = false;
    while let Some(problem) = mount_problem(&context) {
        if !reported {
            set_entry(waiting_status(
                &spec,
                "ContainerCreating",
                Some(&problem),
                0,
                None,
            ));
            reported = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = wait_for_deletion(&mut deletion) => return,
        }
    }
    let launch = match prepare(&context, &image) {
        Ok(launch) => launch,
        Err(message) => {
            set_entry(waiting_status(
                &spec,
                "CreateContainerConfigError",
                Some(&message),
                0,
                None,
            ));
            wait_for_deletion(&mut deletion).await;
            return;
        }
    };

    let log_path = context.node.shared.log_dir.join(format!(
        "{}_{}_{}_{}.log",
        id.namespace, id.name, id.uid, container_name
    ));
    context
        .node
        .shared
        .logs
        .insert(&id.namespace, &id.name, &container_name, log_path.clone());
    let restart_policy = text(&context.pod, "/spec/restartPolicy").to_string();
    let fallback_to_logs = text(&spec, "/terminationMessagePolicy") == "FallbackToLogsOnError";
    let readiness = spec.get("readinessProbe").cloned();
    let mut restarts: u64 = 0;
    let mut back_off = context.node.shared.crash_backoff;
    let mut last_state = json!({});

    loop {
        if *deletion.borrow() != Deletion::None || context.node.shared.processes.is_closed() {
            return;
        }
        let container_id = format!("containerd://{}", uuid::Uuid::new_v4().simple());
        let started_at = now_rfc3339();
        let (terminated, deleted) = match spawn(&launch, &log_path) {
            Err(error) => {
                let message = format!(
                    "failed to create containerd task: failed to start {}: {error}",
                    launch.program.display()
                );
                let terminated = json!({
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": message,
                    "startedAt": "1970-01-01T00:00:00Z",
                    "finishedAt": now_rfc3339(),
                    "containerID": container_id,
                });
                (terminated, false)
            }
            Ok(mut child) => {
                let pgid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                context.node.shared.processes.add(pgid);
                let ready_at_start = readiness.is_none();
                set_entry(json!({
                    "name": container_name,
                    "image": image_name,
                    "imageID": format!("kubesim://{image_name}"),
                    "containerID": container_id,
                    "ready": ready_at_start,
                    "started": true,
                    "restartCount": restarts,
                    "state": {"running": {"startedAt": started_at}},
                    "lastState": last_state,
                }));
                let prober = readiness.clone().map(|probe| {
                    tokio::spawn(readiness_loop(context.clone(), probe, container_id.clone()))
                });
                let (status, deleted) = tokio::select! {
                    status = child.wait() => (status, false),
                    outcome = wait_for_deletion(&mut deletion) => {
                        (stop(&mut child, pgid, outcome).await, true)
                    }
                };
                if let Some(prober) = prober {
                    prober.abort();
                }
                signal_group(pgid, libc::SIGKILL);
                context.node.shared.processes.remove(pgid);
                let code = status.map(exit_code).unwrap_or(128);
                let mut terminated = json!({
                    "exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": started_at,
                    "finishedAt": now_rfc3339(),
                    "containerID": container_id,
                });
                if fallback_to_logs && code != 0 {
                    if let Ok(tail) = log_tail(&log_path) {
                        if !tail.is_empty() {
                            terminated["message"] = json!(tail);
                        }
                    }
                }
                (terminated, deleted)
            }
        };

        if context.node.shared.processes.is_closed() {
            return;
        }
        let code = terminated["exitCode"].as_i64().unwrap_or(1);
        let restart = !deleted
            && match restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
        if !restart {
            set_entry(json!({
                "name": container_name,
                "image": image_name,
                "imageID": format!("kubesim://{image_name}"),
                "containerID": terminated["containerID"],
                "ready": false,
                "started": false,
                "restartCount": restarts,
                "state": {"terminated": terminated},
                "lastState": last_state,
            }));
            if deleted {
                return;
            }
            wait_for_deletion(&mut deletion).await;
            return;
        }

        restarts += 1;
        last_state = json!({"terminated": terminated});
        let message = format!(
            "back-off {}s restarting failed container={container_name} pod={}_{}({})",
            back_off.as_secs(),
            id.name,
            id.namespace,
            id.uid
        );
        set_entry(waiting_status(
            &spec,
            "CrashLoopBackOff",
            Some(&message),
            restarts,
            Some(&last_state),
        ));
        tokio::select! {
            _ = tokio::time::sleep(back_off) => {}
            _ = wait_for_deletion(&mut deletion) => return,
        }
        back_off = (back_off * 2).min(context.node.shared.crash_backoff_max);
    }
}

/// Stops a container for a deletion: SIGTERM to its process group, SIGKILL after the grace
/// period, or SIGKILL at once when the object is already gone.
async fn stop(
    child: &mut tokio::process::Child,
    pgid: i32,
    outcome: Deletion,
) -> io::Result<std::process::ExitStatus> {
    let grace = match outcome {
        Deletion::Graceful(grace) => grace,
        Deletion::Removed | Deletion::None => Duration::ZERO,
    };
    if !grace.is_zero() {
        signal_group(pgid, libc::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            return status;
        }
    }
    signal_group(pgid, libc::SIGKILL);
    child.wait().await
}

fn probe_port(context: &ContainerContext, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => name.parse::<u16>().ok().or_else(|| {
            context
                .spec
                .get("ports")
                .and_then(Value::as_array)?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))?
                .get("containerPort")?
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
        }),
        _ => None,
    }
}

/// Runs one probe. Returns whether it succeeded.
async fn probe_once(context: &ContainerContext, probe: &Value) -> bool {
    let timeout = Duration::from_secs(
        probe
            .get("timeoutSeconds")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1),
    );
    let attempt = async {
        if let Some(get) = probe.get("httpGet") {
            let port = probe_port(context, get.get("port").unwrap_or(&Value::Null))?;
            let host = get
                .get("host")
                .and_then(Value::as_str)
                .filter(|h| !h.is_empty())
                .unwrap_or("");
            let ip: Ipv4Addr = if host.is_empty() {
                context.pod_ip
            } else {
                host.parse().ok()?
            };
            if text(get, "/scheme") == "HTTPS" {
                return None;
            }
            let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
            );
            for header in get
                .get("httpHeaders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                request.push_str(&format!(
                    "{}: {}\r\n",
                    text(header, "/name"),
                    text(header, "/value")
                ));
            }
            request.push_str("\r\n");
            let mut stream = tokio::net::TcpStream::connect(SocketAddr::from((ip, port)))
                .await
                .ok()?;
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = Vec::new();
            let mut buffer = [0u8; 512];
            while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
                let read = stream.read(&mut buffer).await.ok()?;
                if read == 0 {
                    break;
                }
                head.extend_from_slice(&buffer[..read]);
            }
            let line = String::from_utf8_lossy(&head);
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        } else if let Some(tcp) = probe.get("tcpSocket") {
            let port = probe_port(context, tcp.get("port").unwrap_or(&Value::Null))?;
            tokio::net::TcpStream::connect(SocketAddr::from((context.pod_ip, port)))
                .await
                .ok()?;
            Some(true)
        } else {
            // NOTE: exec and gRPC probes are not run by kubesim; they count as failures.
            None
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Probes readiness until aborted, flipping `ready` of this container run after
/// `successThreshold` successes or `failureThreshold` failures in a row.
async fn readiness_loop(context: Arc<ContainerContext>, probe: Value, container_id: String) {
    let seconds =
        |field: &str, default: u64| probe.get(field).and_then(Value::as_u64).unwrap_or(default);
    let initial_delay = Duration::from_secs(seconds("initialDelaySeconds", 0));
    let period = Duration::from_secs(seconds("periodSeconds", 10).max(1));
    let success_threshold = seconds("successThreshold", 1).max(1);
    let failure_threshold = seconds("failureThreshold", 3).max(1);
    let store = context.node.shared.store.clone();
    let index = context.index;

    tokio::time::sleep(initial_delay).await;
    let mut ready = false;
    let mut successes = 0u64;
    let mut failures = 0u64;
    loop {
        if probe_once(&context, &probe).await {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let next = if successes >= success_threshold {
            true
        } else if failures >= failure_threshold {
            false
        } else {
            ready
        };

        if next != ready {
            ready = next;
            let written = context.id.write_status(&store, |pod| {
                let pointer = format!("/status/containerStatuses/{index}");
                if let Some(entry) = pod.pointer_mut(&pointer) {
                    let same_run = entry.get("containerID").and_then(Value::as_str)
                        == Some(container_id.as_str());
                    if same_run && entry.pointer("/state/running").is_some() {
                        entry["ready"] = json!(next);
                    }
                }
            });
            if written.is_err() {
                return;
            }
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_references() {
        let lookup = |name: &str| (name == "POD_IP").then(|| "127.1.2.3".to_string());
        assert_eq!(
            expand("--bind=$(POD_IP):9000", &lookup),
            "--bind=127.1.2.3:9000"
        );
        assert_eq!(expand("$(MISSING)", &lookup), "$(MISSING)");
        assert_eq!(expand("$$(POD_IP)", &lookup), "$(POD_IP)");
        assert_eq!(expand("cost $5", &lookup), "cost $5");
    }

    #[test]
    fn path_mapping() {
        let image = Image {
            path_map: vec![
                ("/opt/app".to_string(), PathBuf::from("/host/app")),
                (
                    "/usr/bin/python3".to_string(),
                    PathBuf::from("/usr/bin/python3"),
                ),
            ],
            ..Image::default()
        };
        assert_eq!(
            map_path(&image, "/opt/app"),
            Some(PathBuf::from("/host/app"))
        );
        assert_eq!(
            map_path(&image, "/opt/app/run.sh"),
            Some(PathBuf::from("/host/app/run.sh"))
        );
        assert_eq!(map_path(&image, "/opt/application"), None);
        assert_eq!(map_path(&image, "--port"), None);
    }

    #[test]
    fn tail_keeps_last_lines_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let lines: String = (0..200).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, lines).unwrap();
        let tail = log_tail(&path).unwrap();
        assert_eq!(tail.lines().count(), 80);
        assert!(tail.ends_with("line 199\n"));
        let long: String = (0..10).map(|_| "x".repeat(500) + "\n").collect();
        std::fs::write(&path, long).unwrap();
        assert_eq!(log_tail(&path).unwrap().len(), TERMINATION_LOG_BYTES);
    }
}
