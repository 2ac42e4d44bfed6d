//! `fngate proxy`: a proxy replica of k8s mode. It serves one function namespace on the
//! support service port, routing to the runtime pods labelled with its name, and takes its
//! functions from the control plane, to which it reports its load.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fngate_controlplane::k8s;
use fngate_proxy::admin::Admin;
use fngate_proxy::replica::{Replica, ReplicaConfig};
use fngate_proxy::{server, Proxy, Router};
use tokio::sync::watch;

#[derive(Args)]
pub struct ProxyArgs {
    /// Address of the support service port, where clients invoke functions.
    #[arg(long, env = "FNGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "FNGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// Proxy worker threads, as for `fngate serve`; 0 means one per CPU.
    #[arg(long, env = "FNGATE_PROXY_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=crate::MAX_PROXY_THREADS as i64))]
    proxy_threads: u16,
    /// Base URL of the control-plane API, e.g. http://fngate.fngate-system:8082.
    #[arg(long, env = "FNGATE_CONTROL_PLANE")]
    control_plane: String,
    /// The function namespace this replica serves.
    #[arg(long, env = "FNGATE_NAMESPACE")]
    namespace: String,
    /// The k8s namespace of the runtime pods; by default the one the namespace's binding names,
    /// which the control plane sends. When both are set and differ, the binding's is watched.
    #[arg(long, env = "FNGATE_RUNTIME_NAMESPACE")]
    kube_namespace: Option<String>,
    /// This replica's name, unique among the namespace's replicas: in a Deployment, the pod's
    /// name from the downward API.
    #[arg(long, env = "FNGATE_REPLICA")]
    replica: String,
    /// Kubeconfig file; absent means the in-cluster service account.
    #[arg(long, env = "FNGATE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig; absent means its current context.
    #[arg(long, env = "FNGATE_KUBE_CONTEXT")]
    context: Option<String>,
    /// How long in-flight requests may run after SIGTERM before connections are closed, in ms.
    #[arg(long, env = "FNGATE_SHUTDOWN_GRACE_MS", default_value_t = 30_000)]
    shutdown_grace_ms: u64,
    /// Log filter, in tracing's env-filter syntax.
    #[arg(long, env = "FNGATE_LOG", default_value = "info")]
    log: String,
}

pub fn run(args: ProxyArgs) -> anyhow::Result<()> {
    crate::init_tracing(&args.log)?;
    let control_plane = fngate_proxy::replica::parse_control_plane(&args.control_plane)
        .map_err(|error| anyhow::anyhow!("invalid --control-plane: {error}"))?;
    fngate_proxy::replica::check_name(&args.replica)
        .map_err(|error| anyhow::anyhow!("invalid --replica (FNGATE_REPLICA): {error}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?;
    runtime.block_on(async move {
        let metrics = fngate_proxy::metrics::install_recorder();
        let threads = crate::proxy_threads(args.proxy_threads);
        server::set_worker_threads(threads);
        let listeners = server::bind_workers(args.listen, threads)
            .with_context(|| format!("failed to bind --listen {}", args.listen))?;
        let admin_listener = crate::bind(args.admin_listen, "--admin-listen").await?;
        let kube = k8s::connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?;

        let router = Arc::new(Router::new());
        let proxy = Arc::new(Proxy::new(Arc::clone(&router)));
        let replica = Replica::spawn(
            ReplicaConfig {
                control_plane,
                namespace: args.namespace.clone(),
                replica: args.replica.clone(),
                kube_namespace: args.kube_namespace.clone(),
            },
            kube,
            Arc::clone(&router),
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let (admin_stop_tx, mut admin_stop_rx) = watch::channel(false);
        let proxy_addr = listeners[0].local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let grace = Duration::from_millis(args.shutdown_grace_ms);
        let workers = server::spawn_workers(listeners, Arc::clone(&proxy), stop_rx, grace)
            .context("failed to start the proxy worker threads")?;
        tokio::spawn(server::serve_admin(
            admin_listener,
            Admin {
                proxy,
                metrics: metrics.clone(),
            },
            async move {
                let _ = admin_stop_rx.wait_for(|stop| *stop).await;
            },
        ));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                metrics.run_upkeep();
            }
        });
        println!(
            "fngate: proxy replica {} of namespace {} listening on http://{proxy_addr}",
            args.replica, args.namespace
        );
        println!("fngate: admin listening on http://{admin_addr} (/metrics, /healthz, /readyz)");
        println!(
            "fngate: note: /readyz returns 503 until the control plane sent the routes and the pod watcher listed the pods"
        );
        crate::wait_for_signal().await?;
        tracing::info!("shutting down: draining connections");
        let _ = stop_tx.send(true);
        // Reports go on while requests drain, so the control plane keeps their pods.
        workers.stopped().await;
        drop(replica);
        let _ = admin_stop_tx.send(true);
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
