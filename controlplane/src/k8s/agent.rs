//! The node agent: puts the code and layer packages that runtime pods on its node need into the
//! node's function directory, and removes versions no pod has used for a while.
//!
//! It watches the runtime pods bound to its node. Each pod names its code version in the
//! annotations `fngate.io/code-sha256` and `fngate.io/code-version`, and its layers in
//! `fngate.io/layer-sha256s` and `fngate.io/layers-version`. For a version that is not on disk,
//! the agent fetches the packages from the control plane, checks their SHA-256, unpacks them
//! beside the target and renames the result into place. A runtime therefore never reads a
//! half-written tree. A package whose digest does not match is discarded and never unpacked.
//! The runtime wrapper in the pod waits for the directories to appear.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::pod::{
    ANNOTATION_CODE_SHA256, ANNOTATION_CODE_VERSION, ANNOTATION_LAYERS_VERSION,
    ANNOTATION_LAYER_SHA256S,
};
use fngate_proxy::pod_watch::{LABEL_MANAGED_BY, MANAGED_BY};

/// First delay before fetching a package again after a failure; it doubles up to
/// [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Maximum time for one package download.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// Maximum events applied in one batch.
const BATCH_MAX: usize = 256;

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The k8s namespace with the runtime pods.
    pub namespace: String,
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node: String,
    /// The function directory on this node.
    pub function_dir: PathBuf,
    /// Base URL of the control-plane API, `http://host:port`.
    pub control_plane: String,
    /// How long a version no pod on this node uses is kept before it is removed.
    pub retain_unused: Duration,
    /// How often unused versions are looked for.
    pub gc_interval: Duration,
    /// Address of the status listener: `GET /healthz` (200 once the first list of pods is
    /// done, for the DaemonSet's readiness probe) and `GET /versions` (the code versions on
    /// this node). `None` serves nothing.
    pub listen: Option<std::net::SocketAddr>,
}

/// One version a pod needs: its code, or its merged layers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Version {
    /// The package of the code, or of each layer in order.
    digests: Vec<String>,
    /// Relative to the function directory: `<namespace>/<function>/code/<16 hex digits>`, or
    /// `<namespace>/<function>/layers/<16 hex digits>`.
    path: PathBuf,
    layers: bool,
}

/// Runs the agent until the watch stream ends (it does not on its own).
pub async fn run(client: kube::Client, config: AgentConfig) {
    let pods: Api<Pod> = Api::namespaced(client, &config.namespace);
    let watch_config = watcher::Config::default()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"))
        .fields(&format!("spec.nodeName={}", config.node));
    let stream = watcher::watcher(pods, watch_config)
        .default_backoff()
        .ready_chunks(BATCH_MAX);
    tokio::pin!(stream);

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Version, Result<bool, String>)>();
    let mut needed: HashMap<String, Vec<Version>> = HashMap::new();
    let mut relist: Option<HashSet<String>> = None;
    let mut fetching: HashSet<Version> = HashSet::new();
    let mut retry_at: HashMap<Version, (Instant, u32)> = HashMap::new();
    let mut last_used: HashMap<PathBuf, Instant> = HashMap::new();
    let synced = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(addr = %addr, "node agent status listener bound");
                tokio::spawn(serve_status(listener, config.clone(), Arc::clone(&synced)));
            }
            Err(error) => {
                tracing::error!(addr = %addr, error = %error, "cannot bind the node agent status listener")
            }
        }
    }
    let mut gc = tokio::time::interval(config.gc_interval);
    let mut retry = tokio::time::interval(RETRY_BASE);
    tracing::info!(node = %config.node, namespace = %config.namespace,
        function_dir = %config.function_dir.display(), "node agent started");

    loop {
        tokio::select! {
            batch = stream.next() => {
                let Some(batch) = batch else { break };
                for item in batch {
                    match item {
                        Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                            let uid = pod.metadata.uid.clone().unwrap_or_default();
                            if let Some(listed) = &mut relist {
                                listed.insert(uid.clone());
                            }
                            match versions_of(&pod) {
                                Ok(versions) if versions.is_empty() => {}
                                Ok(versions) => {
                                    needed.insert(uid, versions);
                                }
                                Err(message) => tracing::warn!(
                                    pod = pod.metadata.name.as_deref().unwrap_or_default(),
                                    error = %message, "ignoring a runtime pod's code annotations"),
                            }
                        }
                        Ok(Event::Delete(pod)) => {
                            needed.remove(&pod.metadata.uid.unwrap_or_default());
                        }
                        Ok(Event::Init) => relist = Some(HashSet::new()),
                        Ok(Event::InitDone) => {
                            if let Some(listed) = relist.take() {
                                needed.retain(|uid, _| listed.contains(uid));
                            }
                            synced.store(true, Ordering::SeqCst);
                        }
                        Err(error) => tracing::warn!(error = %error,
                            "runtime pod watch failed; retrying with back-off"),
                    }
                }
            }
            Some((version, result)) = done_rx.recv() => {
                fetching.remove(&version);
                match result {
                    Ok(_) => {
                        retry_at.remove(&version);
                        tracing::info!(version = %version.path.display(),
                            digests = %version.digests.join(","), "code version ready");
                    }
                    Err(message) => {
                        let failures = retry_at.get(&version).map_or(0, |(_, n)| *n) + 1;
                        let delay = RETRY_BASE
                            .saturating_mul(1 << failures.saturating_sub(1).min(6))
                            .min(RETRY_MAX);
                        tracing::error!(version = %version.path.display(),
                            digests = %version.digests.join(","), error = %message,
                            retry_in_s = delay.as_secs(), "cannot install code version");
                        retry_at.insert(version, (Instant::now() + delay, failures));
                    }
                }
            }
            _ = retry.tick() => {}
            _ = gc.tick() => {
                remove_unused(&config, &needed, &mut last_used).await;
                continue;
            }
        }

        let now = Instant::now();
        for version in needed.values().flatten() {
            last_used.insert(version.path.clone(), now);
            let present = config.function_dir.join(&version.path).is_dir();
            let waiting = retry_at.get(version).is_some_and(|(at, _)| now < *at);
            if present || waiting || fetching.contains(version) {
                continue;
            }
            fetching.insert(version.clone());
            let (config, version, done) = (config.clone(), version.clone(), done_tx.clone());
            tokio::spawn(async move {
                let result = install(&config, &version).await;
                let _ = done.send((version, result));
            });
        }
    }
}

/// Serves `/healthz` and `/versions` until the process ends.
async fn serve_status(
    listener: tokio::net::TcpListener,
    config: AgentConfig,
    synced: Arc<AtomicBool>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(error = %error, "status listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (config, synced) = (config.clone(), Arc::clone(&synced));
        let service =
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (config, synced) = (config.clone(), Arc::clone(&synced));
                async move {
                    Ok::<_, std::convert::Infallible>(
                        status_response(&config, &synced, request.uri().path()).await,
                    )
                }
            });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn status_response(
    config: &AgentConfig,
    synced: &AtomicBool,
    path: &str,
) -> http::Response<http_body_util::Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" if synced.load(Ordering::SeqCst) => (http::StatusCode::OK, "ok\n".to_owned()),
        "/healthz" => (
            http::StatusCode::SERVICE_UNAVAILABLE,
            "runtime pods not listed yet\n".to_owned(),
        ),
        "/versions" => {
            let function_dir = config.function_dir.clone();
            let found = tokio::task::spawn_blocking(move || version_dirs(&function_dir))
                .await
                .unwrap_or_default();
            let versions: Vec<String> = found
                .iter()
                .map(|path| path.to_string_lossy().into_owned())
                .collect();
            let body = serde_json::json!({"node": config.node, "versions": versions});
            (http::StatusCode::OK, format!("{body}\n"))
        }
        _ => (
            http::StatusCode::NOT_FOUND,
            "not found; try /healthz or /versions\n".to_owned(),
        ),
    };
    let mut response = http::Response::new(http_body_util::Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Reads the versions a pod needs: its code version (none for a directory code source) and
/// its layers, if it has any.
fn versions_of(pod: &Pod) -> Result<Vec<Version>, String> {
    let Some(annotations) = pod.metadata.annotations.as_ref() else {
        return Ok(Vec::new());
    };
    let mut versions = Vec::new();
    if let Some(digest) = annotations.get(ANNOTATION_CODE_SHA256) {
        let Some(path) = annotations.get(ANNOTATION_CODE_VERSION) else {
            return Err(format!(
                "{ANNOTATION_CODE_SHA256} without {ANNOTATION_CODE_VERSION}"
            ));
        };
        if !crate::code::is_sha256_hex(digest) {
            return Err(format!("invalid {ANNOTATION_CODE_SHA256} {digest:?}"));
        }
        versions.push(Version {
            digests: vec![digest.clone()],
            path: PathBuf::from(path),
            layers: false,
        });
    }
    if let Some(digests) = annotations.get(ANNOTATION_LAYER_SHA256S) {
        let Some(path) = annotations.get(ANNOTATION_LAYERS_VERSION) else {
            return Err(format!(
                "{ANNOTATION_LAYER_SHA256S} without {ANNOTATION_LAYERS_VERSION}"
            ));
        };
        let digests: Vec<String> = digests.split(',').map(str::to_owned).collect();
        if let Some(bad) = digests.iter().find(|d| !crate::code::is_sha256_hex(d)) {
            return Err(format!(
                "invalid digest {bad:?} in {ANNOTATION_LAYER_SHA256S}"
            ));
        }
        versions.push(Version {
            digests,
            path: PathBuf::from(path),
            layers: true,
        });
    }
    Ok(versions)
}

/// Fetches the version's packages and installs them. Returns false if another fetch installed
/// it first.
async fn install(config: &AgentConfig, version: &Version) -> Result<bool, String> {
    let incoming = config.function_dir.join(".incoming");
    tokio::fs::create_dir_all(&incoming)
        .await
        .map_err(|e| format!("cannot create {}: {e}", incoming.display()))?;
    let partials: Vec<PathBuf> = version
        .digests
        .iter()
        .map(|digest| incoming.join(format!("{digest}.{}.zip", uuid::Uuid::new_v4().simple())))
        .collect();
    let mut result = Ok(());
    for (digest, partial) in version.digests.iter().zip(&partials) {
        result = tokio::time::timeout(FETCH_TIMEOUT, fetch(config, digest, partial))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "download did not finish within {} s",
                    FETCH_TIMEOUT.as_secs()
                ))
            });
        if result.is_err() {
            break;
        }
    }
    let result = match result {
        Ok(()) => {
            let (function_dir, version) = (config.function_dir.clone(), version.clone());
            let archives = partials.clone();
            tokio::task::spawn_blocking(move || {
                let mut files = Vec::with_capacity(archives.len());
                for archive in &archives {
                    files.push(
                        std::fs::File::open(archive)
                            .map_err(|e| format!("cannot open {}: {e}", archive.display()))?,
                    );
                }
                if version.layers {
                    crate::code::install_layers(
                        files,
                        &function_dir,
                        &version.path,
                        &version.digests,
                    )
                } else {
                    let file = files.pop().expect("a code version has one package");
                    crate::code::install_package(
                        file,
                        &function_dir,
                        &version.path,
                        &version.digests[0],
                    )
                }
            })
            .await
            .map_err(|e| format!("install task failed: {e}"))?
        }
        Err(message) => Err(message),
    };
    for partial in &partials {
        let _ = tokio::fs::remove_file(partial).await;
    }
    result
}

/// Downloads `GET <control plane>/v1/packages/<digest>` into `target`.
async fn fetch(config: &AgentConfig, digest: &str, target: &Path) -> Result<(), String> {
    let url = format!(
        "{}/v1/packages/{}",
        config.control_plane.trim_end_matches('/'),
        digest
    );
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid package URL {url}: {e}"))?;

    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "unsupported package URL {url}: only http:// is supported"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("package URL {url} has no host"))?
        .clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {authority} failed: {e}"))?;
    tokio::spawn(connection);

    let request = http::Request::get(uri.path())
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {url} failed: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "GET {url} returned {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }

    let mut file = tokio::fs::File::create(target)
        .await
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading {url} failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data)
                .await
                .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        }
    }
    file.flush()
        .await
        .map_err(|e| format!("cannot write {}: {e}", target.display()))
}

/// Removes version directories that no pod on this node has used for `retain_unused`. A
/// version found on disk that no pod used since the agent started counts from the start.
async fn remove_unused(
    config: &AgentConfig,
    needed: &HashMap<String, Vec<Version>>,
    last_used: &mut HashMap<PathBuf, Instant>,
) {
    let in_use: HashSet<&PathBuf> = needed.values().flatten().map(|v| &v.path).collect();
    let function_dir = config.function_dir.clone();
    let found = tokio::task::spawn_blocking(move || version_dirs(&function_dir))
        .await
        .unwrap_or_default();
    let now = Instant::now();
    for path in found {
        if in_use.contains(&path) {
            last_used.insert(path, now);
            continue;
        }
        let since = *last_used.entry(path.clone()).or_insert(now);
        if now.duration_since(since) < config.retain_unused {
            continue;
        }
        let full = config.function_dir.join(&path);
        match tokio::fs::remove_dir_all(&full).await {
            Ok(()) => {
                tracing::info!(version = %path.display(), "removed unused code version");
                last_used.remove(&path);
            }
            Err(error) => {
                tracing::warn!(version = %path.display(), error = %error, "cannot remove unused code version")
            }
        }
    }
}

/// Lists `<namespace>/<function>/code/<version>` and `<namespace>/<function>/layers/<version>`
/// directories under `function_dir`, relative to it. Staging directories (names starting with
/// `.`) are left out.
fn version_dirs(function_dir: &Path) -> Vec<PathBuf> {
    let children = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| PathBuf::from(e.file_name()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut versions = Vec::new();
    for namespace in children(function_dir) {
        for function in children(&function_dir.join(&namespace)) {
            for kind in ["code", "layers"] {
                let parent = namespace.join(&function).join(kind);
                for version in children(&function_dir.join(&parent)) {
                    versions.push(parent.join(version));
                }
            }
        }
    }
    versions
}
