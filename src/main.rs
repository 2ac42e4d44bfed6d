//! The `fngate` command: runs the platform in default mode (proxy, control plane and local
//! instances in one process).

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use fngate_controlplane::config;
use fngate_controlplane::k8s;

mod namespaces;
mod proxy_replica;
use fngate_controlplane::local::{LocalBackend, LocalBackendConfig};
use fngate_controlplane::model::{FunctionKind, NamespaceSpec};
use fngate_controlplane::platform::{Platform, PlatformConfig};
use fngate_proxy::admin::Admin;
use fngate_proxy::{server, Proxy, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// mimalloc instead of glibc's allocator. Counted with callgrind in the proxy's request loop (the
/// `request_path` bench of fngate-proxy), it cuts the instructions spent allocating by 14% for a
/// web request and 27% for an event invocation. That is 4% of an event invocation's total, while
/// the 1% of a web request is within run-to-run noise.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Most proxy worker threads. Every instance keeps one idle-connection list per worker, so the
/// bound also bounds that per-instance memory (about 32 bytes per worker).
const MAX_PROXY_THREADS: usize = 256;

#[derive(Parser)]
#[command(
    name = "fngate",
    version,
    about = "Self-hosted serverless function platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform: proxy, control plane, and instances as local processes (default
    /// mode) or as pods of a bound cluster (k8s mode).
    Serve(ServeArgs),
    /// Run a proxy replica of k8s mode: serve one function namespace on the support service
    /// port, routing to the runtime pods the control plane starts for this replica.
    Proxy(proxy_replica::ProxyArgs),
    /// Run the node agent of k8s mode: fetch the code packages that runtime pods on this node
    /// need into the node's function directory, and remove versions no pod uses any more.
    Agent(AgentArgs),
    /// List the namespaces of a running fngate, with each k8s-mode binding's status.
    Namespaces(NamespacesArgs),
    /// Write the Kubernetes manifests fngate would create for a platform file's k8s-mode
    /// functions (one runtime pod each) and bindings (the system components), without
    /// contacting any cluster.
    Manifests(ManifestsArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// Name of this node, as in pods' `spec.nodeName` (in a DaemonSet, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// k8s namespace of the runtime pods.
    #[arg(long, env = "FNGATE_RUNTIME_NAMESPACE")]
    namespace: String,
    /// Base URL of the control-plane API that serves code packages, e.g. http://fngate:8082.
    #[arg(long, env = "FNGATE_CONTROL_PLANE")]
    control_plane: String,
    /// The function directory on this node, where code versions are unpacked.
    #[arg(long, env = "FNGATE_FUNCTION_DIR", default_value = "/var/lib/fngate")]
    function_dir: PathBuf,
    /// Kubeconfig file; absent means the in-cluster service account.
    #[arg(long, env = "FNGATE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig; absent means its current context.
    #[arg(long, env = "FNGATE_KUBE_CONTEXT")]
    context: Option<String>,
    /// Address of the status listener (`/healthz`, `/versions`); absent serves nothing.
    #[arg(long, env = "FNGATE_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// How long a code version no pod on this node uses is kept, in ms.
    #[arg(long, env = "FNGATE_RETAIN_UNUSED_MS", default_value_t = 3_600_000)]
    retain_unused_ms: u64,
    /// Log filter, in tracing's env-filter syntax.
    #[arg(long, env = "FNGATE_LOG", default_value = "info")]
    log: String,
}

#[derive(Args)]
struct NamespacesArgs {
    /// URL of the control-plane API.
    #[arg(long, env = "FNGATE_API", default_value = "http://127.0.0.1:8082")]
    api: String,
}

#[derive(Args)]
struct ManifestsArgs {
    /// Platform file declaring namespaces and functions (TOML).
    #[arg(long, env = "FNGATE_CONFIG")]
    config: PathBuf,
    /// Directory for unpacked code packages, as for `serve`; zip packages are unpacked here.
    #[arg(long, env = "FNGATE_FUNCTION_DIR", default_value = "fngate-data")]
    function_dir: PathBuf,
    /// Directory the manifests are written to, one JSON file each; created if missing.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// Platform file declaring namespaces and functions to deploy at start (TOML).
    #[arg(long, env = "FNGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the support service port, where clients invoke functions.
    #[arg(long, env = "FNGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Proxy worker threads, each with its own listener on the support service port
    /// (SO_REUSEPORT) and its own single-threaded runtime; 0 means one per CPU.
    #[arg(long, env = "FNGATE_PROXY_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=MAX_PROXY_THREADS as i64))]
    proxy_threads: u16,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "FNGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// Address of the control-plane API.
    #[arg(long, env = "FNGATE_API_LISTEN", default_value = "127.0.0.1:8082")]
    api_listen: SocketAddr,
    /// Directory for unpacked code packages and instance logs.
    #[arg(long, env = "FNGATE_FUNCTION_DIR", default_value = "fngate-data")]
    function_dir: PathBuf,
    /// Path of the fngate-runtime wrapper; defaults to the one beside this binary.
    #[arg(long, env = "FNGATE_RUNTIME_WRAPPER")]
    runtime_wrapper: Option<PathBuf>,
    /// Address local instances listen on.
    #[arg(long, env = "FNGATE_INSTANCE_IP", default_value = "127.0.0.1")]
    instance_ip: IpAddr,
    /// How long in-flight requests may run after SIGTERM before connections are closed, in ms.
    #[arg(long, env = "FNGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    shutdown_grace_ms: u64,
    /// Log filter, in tracing's env-filter syntax (for example `info` or `fngate_proxy=debug`).
    #[arg(long, env = "FNGATE_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Manifests(args) => write_manifests(&args),
        Command::Agent(args) => run_agent(args),
        Command::Proxy(args) => proxy_replica::run(args),
        Command::Namespaces(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("failed to start the tokio runtime")
            .and_then(|runtime| runtime.block_on(namespaces::list(&args.api))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the error and its causes on one line, without a backtrace.
            eprintln!("fngate: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(serve(args))
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log filter {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

/// Returns the number of proxy worker threads for `--proxy-threads`, where 0 means one per
/// CPU.
fn proxy_threads(flag: u16) -> usize {
    match usize::from(flag) {
        0 => std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_PROXY_THREADS),
        threads => threads,
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    server::bind(addr).with_context(|| format!("failed to bind {flag} {addr}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = fngate_proxy::metrics::install_recorder();
    let proxy_threads = proxy_threads(args.proxy_threads);
    // Sized before any instance exists, so each worker gets its own instance connections.
    server::set_worker_threads(proxy_threads);
    let proxy_listeners = server::bind_workers(args.listen, proxy_threads)
        .with_context(|| format!("failed to bind --listen {}", args.listen))?;
    let admin_listener = bind(args.admin_listen, "--admin-listen").await?;
    let api_listener = bind(args.api_listen, "--api-listen").await?;

    std::fs::create_dir_all(&args.function_dir).with_context(|| {
        format!(
            "failed to create --function-dir {}",
            args.function_dir.display()
        )
    })?;
    let function_dir = args.function_dir.canonicalize()?;
    let runtime_wrapper = match args.runtime_wrapper {
        Some(path) => path,
        None => default_runtime_wrapper()?,
    };

    let router = Arc::new(Router::new());
    let proxy = Arc::new(Proxy::new(Arc::clone(&router)));
    let backend = LocalBackend::new(LocalBackendConfig {
        function_dir: function_dir.clone(),
        runtime_wrapper,
        bind_ip: args.instance_ip,
    });
    // Node agents fetch code packages from the API; an unspecified bind address names no host
    // they could reach, so bindings must then set control_plane_url.
    let api_addr = api_listener.local_addr()?;
    let api_url = (!api_addr.ip().is_unspecified()).then(|| format!("http://{api_addr}"));
    let platform = Arc::new(Platform::new(
        PlatformConfig {
            function_dir,
            api_url,
        },
        Arc::clone(&router),
        Arc::new(backend),
    ));
    platform.start_replica_expiry();
    let deployed = deploy_config(&platform, args.config.as_deref()).await?;
    router.mark_synced();

    let (stop_tx, stop_rx) = watch::channel(false);
    // The admin listener outlives the proxy's drain, so /readyz reports 503 during shutdown.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let proxy_addr = proxy_listeners[0].local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let grace = Duration::from_millis(args.shutdown_grace_ms);
    let workers =
        server::spawn_workers(proxy_listeners, Arc::clone(&proxy), stop_rx.clone(), grace)
            .context("failed to start the proxy worker threads")?;
    tokio::spawn(server::serve_admin(
        admin_listener,
        Admin {
            proxy,
            metrics: metrics.clone(),
        },
        stopped(admin_stop_rx),
    ));
    tokio::spawn(fngate_controlplane::api::serve(
        api_listener,
        Arc::clone(&platform),
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });

    if !router.is_synced() {
        println!(
            "fngate: note: /readyz answers 503 until the pod watchers of k8s-mode namespaces have listed their pods"
        );
    }
    print_banner(proxy_addr, admin_addr, api_addr, &deployed);
    wait_for_signal().await?;
    tracing::info!("shutting down: draining connections, then stopping instances");
    let _ = stop_tx.send(true);
    workers.stopped().await;
    platform.shutdown().await;
    let _ = admin_stop_tx.send(true);
    tracing::info!("stopped");
    Ok(())
}

/// Applies the platform file, or creates the `default` namespace when there is none.
async fn deploy_config(
    platform: &Platform,
    path: Option<&Path>,
) -> anyhow::Result<Vec<(String, String, FunctionKind)>> {
    let default_namespace = NamespaceSpec {
        name: "default".to_owned(),
        memory_quota_mb: 0,
        kubernetes: None,
    };
    let Some(path) = path else {
        platform.put_namespace(default_namespace).await?;
        return Ok(Vec::new());
    };
    let file = config::load(path)?;
    if !file.namespaces.iter().any(|n| n.name == "default") {
        platform.put_namespace(default_namespace).await?;
    }
    for namespace in file.namespaces {
        let name = namespace.name.clone();
        platform
            .put_namespace(namespace)
            .await
            .with_context(|| format!("{}: namespace {name:?}", path.display()))?;
    }
    let mut deployed = Vec::new();
    for function in file.functions {
        let entry = (
            function.namespace.clone(),
            function.name.clone(),
            function.kind,
        );
        platform
            .put_function(function)
            .await
            .with_context(|| format!("{}: function {}/{}", path.display(), entry.0, entry.1))?;
        deployed.push(entry);
    }
    Ok(deployed)
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    init_tracing(&args.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        let client = k8s::connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        let function_dir = std::path::absolute(&args.function_dir)
            .with_context(|| format!("invalid --function-dir {}", args.function_dir.display()))?;
        let config = k8s::agent::AgentConfig {
            namespace: args.namespace,
            node: args.node,
            function_dir,
            control_plane: args.control_plane,
            retain_unused: Duration::from_millis(args.retain_unused_ms),
            gc_interval: Duration::from_millis(args.retain_unused_ms.clamp(1_000, 60_000)),
            listen: args.listen,
        };
        tokio::select! {
            () = k8s::agent::run(client, config) => {}
            result = wait_for_signal() => result?,
        }
        tracing::info!("node agent stopped");
        anyhow::Ok(())
    })
}

/// Writes `<namespace>.<function>.pod.json` for every function of a k8s-mode namespace.
fn write_manifests(args: &ManifestsArgs) -> anyhow::Result<()> {
    let file = config::load(&args.config)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let function_dir = std::path::absolute(&args.function_dir)
        .with_context(|| format!("invalid --function-dir {}", args.function_dir.display()))?;
    let mut written = 0;
    for function in &file.functions {
        let Some(binding) = file
            .namespaces
            .iter()
            .find(|n| n.name == function.namespace)
            .and_then(|n| n.kubernetes.as_ref())
        else {
            continue;
        };
        let code = fngate_controlplane::code::resolve(
            &function.code,
            &function_dir,
            &function.namespace,
            &function.name,
        )
        .with_context(|| format!("function {}/{}", function.namespace, function.name))?;
        let layers = fngate_controlplane::code::resolve_layers(
            &function.layers,
            &function_dir,
            &function.namespace,
            &function.name,
        )
        .with_context(|| format!("function {}/{}", function.namespace, function.name))?
        .map(|layers| fngate_controlplane::backend::Layers {
            dir: layers.path,
            digests: layers.digests,
        });
        let request = fngate_controlplane::backend::StartRequest {
            instance_id: 0,
            function: Arc::new(function.clone()),
            code_dir: code.path,
            code_digest: code.digest,
            replica: fngate_controlplane::backend::LOCAL_REPLICA.to_owned(),
            layers,
        };
        let node_code_dir = k8s::pod::node_code_dir(&request.code_dir, &function_dir, binding);
        let pod = k8s::pod::runtime_pod(binding, &request, &node_code_dir);
        let path = args
            .out
            .join(format!("{}.{}.pod.json", function.namespace, function.name));
        let json = serde_json::to_vec_pretty(&pod).context("cannot serialize the pod")?;
        std::fs::write(&path, json).with_context(|| format!("cannot write {}", path.display()))?;
        println!("fngate: wrote {}", path.display());
        written += 1;
    }
    written += write_system_objects(&file.namespaces, &args.out)?;
    if written == 0 {
        println!(
            "fngate: no function is in a namespace with a kubernetes binding, and no binding installs system components; nothing written"
        );
    }
    Ok(())
}

/// Writes `<namespace>.system.<kind>.<name>.json` for every system object that a binding with
/// `install = true` applies. A binding without `control_plane_url` is skipped with a note,
/// because its objects would then contain the API listener's address, which only `serve` binds.
fn write_system_objects(namespaces: &[NamespaceSpec], out: &Path) -> anyhow::Result<usize> {
    let mut written = 0;
    for namespace in namespaces {
        let Some(binding) = namespace.kubernetes.as_ref().filter(|b| b.install) else {
            continue;
        };
        let Some(url) = binding.control_plane_url.as_deref() else {
            println!(
                "fngate: skipped the system components of namespace {}: set kubernetes.control_plane_url to render them",
                namespace.name
            );
            continue;
        };
        for object in k8s::install::system_objects(&namespace.name, binding, url) {
            let kind = object["kind"].as_str().unwrap_or_default().to_lowercase();
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let path = out.join(format!("{}.system.{kind}.{name}.json", namespace.name));
            let json =
                serde_json::to_vec_pretty(&object).context("cannot serialize a system object")?;
            std::fs::write(&path, json)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("fngate: wrote {}", path.display());
            written += 1;
        }
    }
    Ok(written)
}

fn default_runtime_wrapper() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate the fngate binary")?;
    let wrapper = exe.with_file_name("fngate-runtime");
    if !wrapper.is_file() {
        bail!(
            "runtime wrapper not found at {}; build it with `cargo build --locked` or pass --runtime-wrapper",
            wrapper.display()
        );
    }
    Ok(wrapper)
}

fn print_banner(
    proxy: SocketAddr,
    admin: SocketAddr,
    api: SocketAddr,
    deployed: &[(String, String, FunctionKind)],
) {
    println!("fngate: proxy listening on http://{proxy}");
    println!("fngate: admin listening on http://{admin} (/metrics, /healthz, /readyz)");
    println!("fngate: control-plane API listening on http://{api}");
    let noun = if deployed.len() == 1 {
        "function"
    } else {
        "functions"
    };
    println!("fngate: {} {noun} deployed", deployed.len());
    for (namespace, name, kind) in deployed {
        match kind {
            FunctionKind::Event => println!(
                "  try: curl -s -X POST http://{proxy}/functions/{namespace}/{name}/invocations -d '{{\"name\": \"fngate\"}}'"
            ),
            FunctionKind::Web => println!("  try: curl -s http://{proxy}/web/{namespace}/{name}/"),
        }
    }
    println!("fngate: ready");
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate =
        signal(SignalKind::terminate()).context("failed to install SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("failed to install SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
