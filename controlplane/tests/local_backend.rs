//! Tests of the local instance backend against real processes: bash bootstraps written into a
//! temporary directory, python3's http.server as the instance's HTTP server, loopback only.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fngate_controlplane::backend::{
    InstanceBackend, InstanceFailure, RunningInstance, StartRequest,
};
use fngate_controlplane::local::{LocalBackend, LocalBackendConfig};
use fngate_controlplane::model::{CodeSource, EventRuntime, FunctionKind, FunctionSpec};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for anything that should finish; reaching it fails the test.
const BOUND: Duration = Duration::from_secs(20);

/// Returns a bootstrap script that runs `before`, then serves HTTP on $PORT.
fn web_script(before: &str) -> String {
    format!("{before}\nexec python3 -m http.server \"$PORT\" --bind 127.0.0.1\n")
}

struct Fixture {
    /// The temporary root, removed when dropped, or `None` when another process owns the root.
    _root: Option<TempDir>,
    root: PathBuf,
    code_dir: PathBuf,
    function_dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let root_dir = tempfile::tempdir().expect("create temp dir");
        let mut fixture = Self::at(root_dir.path().to_path_buf());
        std::fs::create_dir_all(&fixture.code_dir).expect("create code dir");
        fixture._root = Some(root_dir);
        fixture
    }

    /// Uses the directories of a fixture that another process created under `root`.
    fn at(root: PathBuf) -> Self {
        Self {
            _root: None,
            code_dir: root.join("code"),
            function_dir: root.join("functions"),
            root,
        }
    }

    /// Writes an executable bash script `name` into the code directory.
    fn write_code_script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.code_dir.join(name);
        write_script(&path, body);
        path
    }

    fn backend(&self) -> LocalBackend {
        self.backend_with_wrapper(self.root.join("no-wrapper"))
    }

    fn backend_with_wrapper(&self, runtime_wrapper: PathBuf) -> LocalBackend {
        LocalBackend::new(LocalBackendConfig::new(&self.function_dir, runtime_wrapper))
    }

    fn request(&self, spec: FunctionSpec, instance_id: u64) -> StartRequest {
        StartRequest {
            instance_id,
            function: Arc::new(spec),
            code_dir: self.code_dir.clone(),
            code_digest: None,
            replica: fngate_controlplane::backend::LOCAL_REPLICA.to_owned(),
            layers: None,
        }
    }

    fn spec(&self, kind: FunctionKind, runtime: EventRuntime) -> FunctionSpec {
        FunctionSpec {
            namespace: "testns".to_owned(),
            name: "testfn".to_owned(),
            kind,
            runtime: (kind == FunctionKind::Event).then_some(runtime),
            code: CodeSource::Directory(self.code_dir.clone()),
            memory_mb: 256,
            timeout_ms: 4_500,
            env: BTreeMap::new(),
            concurrency: 1,
            min_instances: 0,
            max_instances: 10,
            keep_warm_ms: 60_000,
            queue_budget_ms: 10_000,
            queue_limit: 1_000,
            max_body_bytes: 6 * 1024 * 1024,
            start_timeout_ms: BOUND.as_millis() as u64,
            layers: Vec::new(),
        }
    }

    fn web_spec(&self) -> FunctionSpec {
        self.spec(FunctionKind::Web, EventRuntime::Custom)
    }

    fn log_path(&self, instance_id: u64) -> PathBuf {
        self.function_dir
            .join("testns/testfn/logs")
            .join(format!("{instance_id}.log"))
    }
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/bash\n{body}")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// Awaits `future`, failing the test if it takes longer than [`BOUND`].
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(BOUND, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {BOUND:?}"),
    }
}

async fn start(
    backend: &LocalBackend,
    request: StartRequest,
) -> Result<Box<dyn RunningInstance>, InstanceFailure> {
    bounded("start", backend.start(request)).await
}

async fn start_ok(backend: &LocalBackend, request: StartRequest) -> Box<dyn RunningInstance> {
    match start(backend, request).await {
        Ok(instance) => instance,
        Err(failure) => panic!("start failed: {failure}"),
    }
}

async fn start_err(backend: &LocalBackend, request: StartRequest) -> InstanceFailure {
    match start(backend, request).await {
        Ok(instance) => panic!("start succeeded at {}", instance.addr()),
        Err(failure) => failure,
    }
}

/// Sends `GET /` over HTTP/1.0 and returns the whole response.
async fn http_get(addr: SocketAddr) -> String {
    http_get_path(addr, "/").await
}

/// Sends `GET <path>` over HTTP/1.0 and returns the whole response.
async fn http_get_path(addr: SocketAddr, path: &str) -> String {
    bounded("HTTP GET", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to instance");
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .expect("read response");
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
}

/// Returns whether a process with this pid exists, zombies included.
fn pid_exists(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing and reads no memory of ours.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Returns whether the process has exited: it no longer exists or is a zombie that its (possibly
/// adoptive) parent has not reaped yet.
fn process_exited(pid: i32) -> bool {
    if !pid_exists(pid) {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

async fn wait_process_exited(pid: i32) {
    bounded("process exit", async {
        while !process_exited(pid) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Waits for a pid file that the script writes atomically (write to a temp file, then `mv`).
async fn read_pid_file(path: &Path) -> i32 {
    bounded("pid file", async {
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return text.trim().parse().expect("pid file holds a number");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Shell lines that write `value` to `path` atomically.
fn write_file_atomically(value: &str, path: &Path) -> String {
    let path = path.display();
    format!("echo {value} > '{path}.tmp' && mv '{path}.tmp' '{path}'")
}

/// Returns the rest of `line` if it starts with a timestamp such as `2026-12-04T21:00:00.123Z `.
fn strip_timestamp(line: &str) -> Option<&str> {
    let (timestamp, rest) = line.split_once(' ')?;
    let pattern = "dddd-dd-ddTdd:dd:dd.dddZ";
    let matches = timestamp.len() == pattern.len()
        && timestamp
            .chars()
            .zip(pattern.chars())
            .all(|(actual, expected)| {
                if expected == 'd' {
                    actual.is_ascii_digit()
                } else {
                    actual == expected
                }
            });
    matches.then_some(rest)
}

fn env_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read env dump")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn local_web_instance_serves_logs_and_stops() {
    let fixture = Fixture::new();
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script("echo 'web bootstrap starting'"),
    );
    let backend = fixture.backend();

    let instance = start_ok(&backend, fixture.request(fixture.web_spec(), 1)).await;
    let addr = instance.addr();
    assert!(addr.ip().is_loopback(), "{addr}");
    assert!(instance.boot_time() > Duration::ZERO);

    let response = http_get(addr).await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");

    let stop_started = Instant::now();
    bounded("stop", instance.stop(Duration::from_secs(10))).await;
    assert!(
        stop_started.elapsed() < Duration::from_secs(5),
        "stop waited {:?} although the server exits on SIGTERM",
        stop_started.elapsed()
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "{addr} still accepts connections"
    );

    let log = std::fs::read_to_string(fixture.log_path(1)).expect("read instance log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty(), "log is empty");
    for line in &lines {
        assert!(
            strip_timestamp(line).is_some(),
            "line without timestamp: {line:?}"
        );
    }
    let bodies: Vec<&str> = lines
        .iter()
        .filter_map(|line| strip_timestamp(line))
        .collect();
    assert!(bodies.contains(&"stdout web bootstrap starting"), "{log}");
    assert!(
        bodies
            .iter()
            .any(|body| body.starts_with("stderr ") && body.contains("\"GET / HTTP/1.0\" 200")),
        "no access log line from http.server on stderr: {log}"
    );
}

#[tokio::test]
async fn local_event_image_instance_gets_port() {
    let fixture = Fixture::new();
    fixture.write_code_script("scf_bootstrap", &web_script(""));
    let backend = fixture.backend();
    let spec = fixture.spec(FunctionKind::Event, EventRuntime::Image);

    let instance = start_ok(&backend, fixture.request(spec, 2)).await;
    let response = http_get(instance.addr()).await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");

    bounded("stop", instance.stop(Duration::from_secs(10))).await;
}

#[tokio::test]
async fn local_failing_bootstrap_reports_exit_and_tail() {
    let fixture = Fixture::new();
    fixture.write_code_script("scf_bootstrap", "echo starting\necho boom >&2\nexit 1\n");
    let backend = fixture.backend();

    let failure = start_err(&backend, fixture.request(fixture.web_spec(), 3)).await;
    let InstanceFailure::Exited {
        what,
        status,
        output_tail,
    } = &failure
    else {
        panic!("expected Exited, got {failure:?}");
    };
    assert_eq!(what, "bootstrap");
    assert_eq!(status, "exit status 1");
    assert!(output_tail.contains("boom"), "{output_tail:?}");
    assert!(output_tail.contains("starting"), "{output_tail:?}");
    assert!(failure.to_string().contains("boom"), "{failure}");

    let log = std::fs::read_to_string(fixture.log_path(3)).expect("read instance log");
    assert!(
        log.lines().any(|line| line.ends_with(" stderr boom")),
        "{log}"
    );
}

#[tokio::test]
async fn local_failure_message_is_one_line() {
    let fixture = Fixture::new();
    fixture.write_code_script(
        "scf_bootstrap",
        "echo 'first line'\necho\necho 'second line'\nexit 1\n",
    );
    let backend = fixture.backend();

    let failure = start_err(&backend, fixture.request(fixture.web_spec(), 19)).await;
    let InstanceFailure::Exited { output_tail, .. } = &failure else {
        panic!("expected Exited, got {failure:?}");
    };
    assert_eq!(output_tail, "first line\n\nsecond line");
    assert_eq!(
        failure.to_string(),
        "bootstrap exited with exit status 1; last output: first line | second line"
    );
}

#[tokio::test]
async fn local_failure_tail_keeps_last_lines() {
    let fixture = Fixture::new();
    fixture.write_code_script(
        "scf_bootstrap",
        // Far more output than a pipe buffer holds, written right before the exit.
        "seq -f 'line %g' 0 49999\nexit 3\n",
    );
    let backend = fixture.backend();

    let failure = start_err(&backend, fixture.request(fixture.web_spec(), 4)).await;
    let InstanceFailure::Exited {
        status,
        output_tail,
        ..
    } = failure
    else {
        panic!("expected Exited, got {failure:?}");
    };
    assert_eq!(status, "exit status 3");
    let expected: Vec<String> = (49_980..50_000).map(|i| format!("line {i}")).collect();
    let actual: Vec<&str> = output_tail.lines().collect();
    assert_eq!(actual, expected);
}

#[tokio::test]
async fn local_missing_bootstrap_is_spawn_error() {
    let fixture = Fixture::new();
    let backend = fixture.backend();

    let failure = start_err(&backend, fixture.request(fixture.web_spec(), 5)).await;
    let InstanceFailure::Spawn(message) = &failure else {
        panic!("expected Spawn, got {failure:?}");
    };
    let path = fixture.code_dir.join("scf_bootstrap");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not found"), "{message}");
    assert!(
        !fixture.log_path(5).exists(),
        "a log file was created without a spawn"
    );
}

#[tokio::test]
async fn local_non_executable_bootstrap_is_spawn_error() {
    let fixture = Fixture::new();
    let path = fixture.write_code_script("scf_bootstrap", "exit 0\n");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let backend = fixture.backend();

    let failure = start_err(&backend, fixture.request(fixture.web_spec(), 6)).await;
    let InstanceFailure::Spawn(message) = &failure else {
        panic!("expected Spawn, got {failure:?}");
    };
    assert!(
        message.contains(&format!("chmod +x {}", path.display())),
        "{message}"
    );
}

#[tokio::test]
async fn local_start_timeout_kills_process_group() {
    let fixture = Fixture::new();
    let leader_file = fixture.root.join("leader.pid");
    let child_file = fixture.root.join("child.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &format!(
            "sleep 1000 &\n{}\n{}\nwait\n",
            write_file_atomically("$!", &child_file),
            write_file_atomically("$$", &leader_file),
        ),
    );
    let backend = fixture.backend();
    let mut spec = fixture.web_spec();
    spec.start_timeout_ms = 300;

    let started = Instant::now();
    let failure = start_err(&backend, fixture.request(spec, 7)).await;
    assert!(
        matches!(failure, InstanceFailure::StartTimeout { timeout } if timeout == Duration::from_millis(300)),
        "{failure:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    let leader = read_pid_file(&leader_file).await;
    let child = read_pid_file(&child_file).await;
    assert!(
        !pid_exists(leader),
        "bootstrap {leader} still exists after StartTimeout"
    );
    wait_process_exited(child).await;
}

#[tokio::test]
async fn local_stop_kills_after_grace_when_term_ignored() {
    let fixture = Fixture::new();
    let pid_file = fixture.root.join("bootstrap.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script(&format!(
            "trap '' TERM\n{}",
            write_file_atomically("$$", &pid_file)
        )),
    );
    let backend = fixture.backend();
    let instance = start_ok(&backend, fixture.request(fixture.web_spec(), 8)).await;
    let pid = read_pid_file(&pid_file).await;

    let grace = Duration::from_millis(300);
    let stop_started = Instant::now();
    bounded("stop", instance.stop(grace)).await;

    assert!(
        stop_started.elapsed() >= grace,
        "stop returned after {:?}",
        stop_started.elapsed()
    );
    assert!(!pid_exists(pid), "bootstrap {pid} survived stop");
}

#[tokio::test]
async fn local_exited_resolves_on_external_kill() {
    let fixture = Fixture::new();
    let pid_file = fixture.root.join("bootstrap.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script(&write_file_atomically("$$", &pid_file)),
    );
    let backend = fixture.backend();
    let instance = start_ok(&backend, fixture.request(fixture.web_spec(), 9)).await;
    let pid = read_pid_file(&pid_file).await;

    // Drop one exited() future before it resolves, as a select! loop would.
    tokio::select! {
        biased;
        failure = instance.exited() => panic!("exited() resolved while running: {failure}"),
        () = std::future::ready(()) => {}
    }
    // SAFETY: kill(2) reads no memory of ours; `pid` is the bootstrap this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");

    for attempt in 0..2 {
        let failure = bounded("exited", instance.exited()).await;
        let InstanceFailure::Exited { what, status, .. } = &failure else {
            panic!("attempt {attempt}: expected Exited, got {failure:?}");
        };
        assert_eq!(what, "bootstrap", "attempt {attempt}");
        assert_eq!(status, "signal 9", "attempt {attempt}");
    }

    let stop_started = Instant::now();
    bounded("stop", instance.stop(Duration::from_secs(10))).await;
    assert!(
        stop_started.elapsed() < Duration::from_secs(1),
        "{:?}",
        stop_started.elapsed()
    );
}

#[tokio::test]
async fn local_exited_stays_pending_after_stop() {
    let fixture = Fixture::new();
    fixture.write_code_script("scf_bootstrap", &web_script(""));
    let backend = fixture.backend();
    let instance = start_ok(&backend, fixture.request(fixture.web_spec(), 10)).await;

    bounded("stop", instance.stop(Duration::from_secs(10))).await;

    // The exit is already published, so a buggy exited() would resolve on its first poll.
    tokio::select! {
        biased;
        failure = instance.exited() => panic!("exited() reported a requested stop: {failure}"),
        () = std::future::ready(()) => {}
    }
}

#[tokio::test]
async fn local_dropped_instance_is_killed() {
    let fixture = Fixture::new();
    let pid_file = fixture.root.join("bootstrap.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script(&write_file_atomically("$$", &pid_file)),
    );
    let backend = fixture.backend();
    let instance = start_ok(&backend, fixture.request(fixture.web_spec(), 11)).await;
    let pid = read_pid_file(&pid_file).await;

    drop(instance);

    wait_process_exited(pid).await;
}

#[tokio::test]
async fn local_platform_env_is_not_passed() {
    let secret_name = "FNGATE_TEST_PLATFORM_SECRET";
    // The test binary never reads this variable, so setting it races with nothing.
    std::env::set_var(secret_name, format!("secret-{}", std::process::id()));
    let fixture = Fixture::new();
    let env_dump = fixture.root.join("env.txt");
    let cwd_dump = fixture.root.join("cwd.txt");
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script(&format!(
            "env > '{}'\npwd > '{}'",
            env_dump.display(),
            cwd_dump.display()
        )),
    );
    let backend = fixture.backend();
    let mut spec = fixture.web_spec();
    spec.env
        .insert("GREETING".to_owned(), "hello from env".to_owned());
    spec.env.insert("PORT".to_owned(), "1".to_owned());

    let instance = start_ok(&backend, fixture.request(spec, 12)).await;
    let port = instance.addr().port();
    bounded("stop", instance.stop(Duration::from_secs(10))).await;

    let env = env_lines(&env_dump);
    assert!(
        !env.iter().any(|line| line.starts_with(secret_name)),
        "platform variable leaked: {env:?}"
    );
    let expected = [
        "GREETING=hello from env".to_owned(),
        format!("PORT={port}"),
        "FNGATE_INSTANCE_IP=127.0.0.1".to_owned(),
        "SCF_FUNCTIONNAME=testfn".to_owned(),
        "SCF_NAMESPACE=testns".to_owned(),
        "SCF_FUNCTIONVERSION=$LATEST".to_owned(),
        "SCF_MEMSIZE=256".to_owned(),
        "SCF_TIMEOUT=4500".to_owned(),
        "FNGATE_INSTANCE_ID=12".to_owned(),
    ];
    for line in expected {
        assert!(env.contains(&line), "missing {line:?} in {env:?}");
    }
    assert!(
        env.iter().any(|line| line.starts_with("PATH=")),
        "no PATH in {env:?}"
    );

    let cwd = std::fs::read_to_string(&cwd_dump).expect("read cwd dump");
    let code_dir = fixture
        .code_dir
        .canonicalize()
        .expect("canonicalize code dir");
    assert_eq!(Path::new(cwd.trim()), code_dir);
}

#[tokio::test]
async fn local_dropped_start_kills_process() {
    let fixture = Fixture::new();
    let pid_file = fixture.root.join("bootstrap.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &format!(
            "{}\nexec sleep 1000\n",
            write_file_atomically("$$", &pid_file)
        ),
    );
    let backend = fixture.backend();

    let pid = tokio::select! {
        result = start(&backend, fixture.request(fixture.web_spec(), 13)) => {
            panic!("start resolved: {:?}", result.map(|instance| instance.addr()))
        }
        pid = read_pid_file(&pid_file) => pid,
    };

    wait_process_exited(pid).await;
}

/// A fake runtime wrapper that dumps its environment and serves HTTP on FNGATE_INVOKE_LISTEN.
fn write_fake_wrapper(fixture: &Fixture, env_dump: &Path) -> PathBuf {
    let path = fixture.root.join("fake-wrapper");
    write_script(
        &path,
        &format!(
            "env > '{}'\nexec python3 -m http.server \"${{FNGATE_INVOKE_LISTEN##*:}}\" \
             --bind \"${{FNGATE_INVOKE_LISTEN%:*}}\"\n",
            env_dump.display()
        ),
    );
    path
}

#[tokio::test]
async fn local_custom_runtime_starts_wrapper() {
    for (with_bootstrap, expected_bootstrap) in [(true, "bootstrap"), (false, "scf_bootstrap")] {
        let fixture = Fixture::new();
        let env_dump = fixture.root.join("env.txt");
        let backend = fixture.backend_with_wrapper(write_fake_wrapper(&fixture, &env_dump));
        if with_bootstrap {
            fixture.write_code_script("bootstrap", "exit 0\n");
        }
        fixture.write_code_script("scf_bootstrap", "exit 0\n");
        let spec = fixture.spec(FunctionKind::Event, EventRuntime::Custom);

        let instance = start_ok(&backend, fixture.request(spec, 14)).await;
        let addr = instance.addr();
        bounded("stop", instance.stop(Duration::from_secs(10))).await;

        let env = env_lines(&env_dump);
        let bootstrap = fixture.code_dir.join(expected_bootstrap);
        let expected = [
            format!("FNGATE_INVOKE_LISTEN={addr}"),
            format!("FNGATE_BOOTSTRAP={}", bootstrap.display()),
            format!("FNGATE_INIT_TIMEOUT_MS={}", BOUND.as_millis()),
            "SCF_FUNCTIONNAME=testfn".to_owned(),
        ];
        for line in expected {
            assert!(env.contains(&line), "missing {line:?} in {env:?}");
        }
        for name in ["PORT=", "FNGATE_INSTANCE_IP="] {
            assert!(
                !env.iter().any(|line| line.starts_with(name)),
                "{name} set for the wrapper: {env:?}"
            );
        }
    }
}

#[tokio::test]
async fn local_custom_runtime_wrapper_failure() {
    let fixture = Fixture::new();
    let wrapper = fixture.root.join("failing-wrapper");
    write_script(&wrapper, "echo 'wrapper broke' >&2\nexit 2\n");
    fixture.write_code_script("bootstrap", "exit 0\n");
    let backend = fixture.backend_with_wrapper(wrapper);
    let spec = fixture.spec(FunctionKind::Event, EventRuntime::Custom);

    let failure = start_err(&backend, fixture.request(spec, 15)).await;
    let InstanceFailure::Exited {
        what,
        status,
        output_tail,
    } = &failure
    else {
        panic!("expected Exited, got {failure:?}");
    };
    assert_eq!(what, "runtime wrapper");
    assert_eq!(status, "exit status 2");
    assert!(output_tail.contains("wrapper broke"), "{output_tail:?}");
}

#[tokio::test]
async fn local_custom_runtime_spawn_errors() {
    let fixture = Fixture::new();
    let env_dump = fixture.root.join("env.txt");
    let wrapper = write_fake_wrapper(&fixture, &env_dump);
    let spec = fixture.spec(FunctionKind::Event, EventRuntime::Custom);

    // No bootstrap in the code directory.
    let failure = start_err(
        &fixture.backend_with_wrapper(wrapper),
        fixture.request(spec.clone(), 16),
    )
    .await;
    let InstanceFailure::Spawn(message) = &failure else {
        panic!("expected Spawn, got {failure:?}");
    };
    for name in ["bootstrap", "scf_bootstrap"] {
        let path = fixture.code_dir.join(name);
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    // A bootstrap, but no runtime wrapper at the configured path.
    fixture.write_code_script("bootstrap", "exit 0\n");
    let missing_wrapper = fixture.root.join("missing-wrapper");
    let backend = fixture.backend_with_wrapper(missing_wrapper.clone());
    let failure = start_err(&backend, fixture.request(spec, 17)).await;
    let InstanceFailure::Spawn(message) = &failure else {
        panic!("expected Spawn, got {failure:?}");
    };
    assert!(
        message.contains(&missing_wrapper.display().to_string()),
        "{message}"
    );
    assert!(!env_dump.exists(), "a wrapper ran although start failed");
}

#[tokio::test]
async fn local_invalid_function_name_is_spawn_error() {
    let fixture = Fixture::new();
    fixture.write_code_script("scf_bootstrap", &web_script(""));
    let backend = fixture.backend();
    let mut spec = fixture.web_spec();
    spec.name = "..".to_owned();

    let failure = start_err(&backend, fixture.request(spec, 18)).await;
    let InstanceFailure::Spawn(message) = &failure else {
        panic!("expected Spawn, got {failure:?}");
    };
    assert!(message.contains("invalid function name"), "{message}");
}

/// Returns the IPv4 addresses of the TCP sockets that listen on `port`, from `/proc/net/tcp`.
/// That file shows each address as the hex digits of a `u32` in host byte order, and the
/// listening state as `0A`.
fn listening_ipv4_addresses(port: u16) -> Vec<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let (address, local_port) = local.split_once(':')?;
            if state != "0A" || u16::from_str_radix(local_port, 16).ok()? != port {
                return None;
            }
            let raw = u32::from_str_radix(address, 16).ok()?;
            Some(Ipv4Addr::from(raw.to_ne_bytes()))
        })
        .collect()
}

#[tokio::test]
async fn local_examples_listen_on_instance_ip() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let second_loopback = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut bind_ips = vec![second_loopback];
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        bind_ips.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    } else {
        eprintln!("IPv6 loopback is unavailable; testing the examples on IPv4 only");
    }
    let cases = [
        ("hello-web", FunctionKind::Web, "/", "200"),
        ("hello-image", FunctionKind::Event, "/healthz", "200"),
    ];

    for bind_ip in bind_ips {
        for (example, kind, path, expected_status) in cases {
            let fixture = Fixture::new();
            let mut config =
                LocalBackendConfig::new(&fixture.function_dir, fixture.root.join("no-wrapper"));
            config.bind_ip = bind_ip;
            let backend = LocalBackend::new(config);
            let request = StartRequest {
                instance_id: 21,
                function: Arc::new(fixture.spec(kind, EventRuntime::Image)),
                code_dir: examples.join(example),
                code_digest: None,
                replica: fngate_controlplane::backend::LOCAL_REPLICA.to_owned(),
                layers: None,
            };

            let instance = start_ok(&backend, request).await;
            let addr = instance.addr();
            let response = http_get_path(addr, path).await;
            let listening = listening_ipv4_addresses(addr.port());
            bounded("stop", instance.stop(Duration::from_secs(10))).await;

            assert_eq!(addr.ip(), bind_ip, "{example}");
            let status_line = response.lines().next().unwrap_or_default();
            assert!(
                status_line.contains(expected_status),
                "{example} on {bind_ip}: {response}"
            );
            if bind_ip == second_loopback {
                assert_eq!(
                    listening,
                    [Ipv4Addr::new(127, 0, 0, 2)],
                    "{example} must listen only on FNGATE_INSTANCE_IP"
                );
            }
        }
    }
}

/// Root of the fixture for [`local_backend_in_child_process`], set by the parent test.
const CHILD_ROOT_ENV: &str = "FNGATE_TEST_BACKEND_CHILD_ROOT";

/// Starts a web instance and waits until the process is killed. Only
/// `local_instance_dies_with_killed_parent` runs it, in a child process with
/// [`CHILD_ROOT_ENV`] set.
#[tokio::test]
#[ignore = "the child process of local_instance_dies_with_killed_parent"]
async fn local_backend_in_child_process() {
    let Some(root) = std::env::var_os(CHILD_ROOT_ENV) else {
        eprintln!("{CHILD_ROOT_ENV} is not set; nothing to do outside local_instance_dies_with_killed_parent");
        return;
    };
    let fixture = Fixture::at(PathBuf::from(root));
    let backend = fixture.backend();
    let _instance = start_ok(&backend, fixture.request(fixture.web_spec(), 22)).await;
    std::future::pending::<()>().await;
}

/// Returns the parent process id of `pid` from `/proc/<pid>/stat`.
fn parent_pid(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/stat: {error}"));
    // The fields after the parenthesised command name are the state, then the parent id.
    let (_, rest) = stat.rsplit_once(')').expect("stat has a command name");
    rest.split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no parent id in {stat:?}"))
}

#[tokio::test]
async fn local_instance_dies_with_killed_parent() {
    let fixture = Fixture::new();
    let pid_file = fixture.root.join("bootstrap.pid");
    fixture.write_code_script(
        "scf_bootstrap",
        &web_script(&write_file_atomically("$$", &pid_file)),
    );

    // This test binary, run again, plays fngate: its backend spawns the instance.
    let test_binary = std::env::current_exe().expect("path of this test binary");
    let mut parent = tokio::process::Command::new(test_binary)
        .args([
            "local_backend_in_child_process",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ROOT_ENV, &fixture.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child process");
    let parent_id = parent.id().expect("the child process has a pid");

    let pid = read_pid_file(&pid_file).await;
    assert_eq!(
        u32::try_from(parent_pid(pid)).ok(),
        Some(parent_id),
        "the instance is not a child of the child process"
    );

    parent.kill().await.expect("SIGKILL the child process");
    let exited = tokio::time::timeout(BOUND, async {
        while !process_exited(pid) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .is_ok();
    if !exited {
        // SAFETY: kill(2) reads no memory of ours; `pid` is the instance this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        exited,
        "instance {pid} still runs {BOUND:?} after the process that spawned it was killed"
    );
}
