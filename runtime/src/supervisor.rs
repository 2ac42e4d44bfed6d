//! The wrapper's life cycle: start the runtime API and the bootstrap, wait for
//! `/runtime/init/ready`, open the invoke listener, then watch for the bootstrap's exit, a stop
//! request and the running invocation's deadline.

use std::future::{pending, Future};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::bootstrap::{Bootstrap, BootstrapStatus, SpawnError};
use crate::config::{WrapperConfig, ENV_INIT_TIMEOUT_MS, ENV_INVOKE_LISTEN};
use crate::hub::{Expired, Hub};
use crate::invoke::InvokeApi;
use crate::runtime_api::{RuntimeApi, PATH_INIT_READY};
use crate::server;

/// The end of a wrapper run: the process exit status and the reason.
#[derive(Debug)]
pub struct Exit {
    /// Process exit status: the bootstrap's, 0 after a stop request, 127 when the bootstrap
    /// could not be started, 1 for other failures.
    pub code: i32,
    pub reason: ExitReason,
}

/// Reason the wrapper exited. `Display` gives the line the binary prints to stderr.
#[derive(Debug, thiserror::Error)]
pub enum ExitReason {
    #[error("bootstrap exited with {0}")]
    BootstrapExited(BootstrapStatus),
    #[error("bootstrap exited with {0} before calling {PATH_INIT_READY}; check its output above")]
    ExitedBeforeReady(BootstrapStatus),
    #[error("stop requested; bootstrap exited with {0}")]
    Stopped(BootstrapStatus),
    #[error(transparent)]
    Failed(#[from] RunError),
}

/// A failure that ends the wrapper with exit status 1, or 127 for [`RunError::Spawn`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to bind the runtime API listener on 127.0.0.1:0: {0}")]
    BindRuntimeApi(#[source] io::Error),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("failed to bind the invoke listener on {addr} from {ENV_INVOKE_LISTEN}: {source}; choose a free address")]
    BindInvoke { addr: SocketAddr, source: io::Error },
    #[error(
        "bootstrap did not call {PATH_INIT_READY} within {} ms and was killed, ending with {status}; raise {ENV_INIT_TIMEOUT_MS} or make its start faster",
        .timeout.as_millis()
    )]
    InitTimedOut {
        timeout: Duration,
        status: BootstrapStatus,
    },
    #[error(
        "invocation {request_id} did not complete within its time limit of {} ms; killed the bootstrap, which ended with {status}",
        .timeout.as_millis()
    )]
    InvocationTimedOut {
        request_id: String,
        timeout: Duration,
        status: BootstrapStatus,
    },
    #[error("failed to wait for the bootstrap process: {0}")]
    Wait(#[source] io::Error),
    #[error("failed to install the SIGTERM and SIGINT handlers: {0}")]
    Signals(#[source] io::Error),
}

impl From<ExitReason> for Exit {
    fn from(reason: ExitReason) -> Self {
        let code = match &reason {
            ExitReason::BootstrapExited(status) | ExitReason::ExitedBeforeReady(status) => {
                status.code()
            }
            ExitReason::Stopped(_) => 0,
            ExitReason::Failed(RunError::Spawn(_)) => 127,
            ExitReason::Failed(_) => 1,
        };
        Self { code, reason }
    }
}

impl From<RunError> for Exit {
    fn from(error: RunError) -> Self {
        ExitReason::Failed(error).into()
    }
}

type StopRequest<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// Runs the wrapper until the bootstrap exits, `stop` completes or an invocation times out.
///
/// When `stop` completes, the bootstrap's process group gets SIGTERM, then SIGKILL after
/// `config.stop_grace`. `invoke_addr` receives the bound invoke address once the bootstrap
/// is ready, and is dropped unsent if the invoke listener is never bound.
pub async fn run_with(
    config: WrapperConfig,
    stop: impl Future<Output = ()> + Send,
    invoke_addr: Option<oneshot::Sender<SocketAddr>>,
) -> Exit {
    let stop = std::pin::pin!(stop);
    let mut stop: StopRequest<'_> = stop;
    match supervise(&config, stop.as_mut(), invoke_addr).await {
        Ok(reason) => reason.into(),
        Err(error) => error.into(),
    }
}

async fn supervise(
    config: &WrapperConfig,
    mut stop: StopRequest<'_>,
    invoke_addr: Option<oneshot::Sender<SocketAddr>>,
) -> Result<ExitReason, RunError> {
    let hub = Arc::new(Hub::new(config.max_queued));
    let (ready_tx, ready_rx) = watch::channel(false);
    let api_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(RunError::BindRuntimeApi)?;
    let api_addr = api_listener
        .local_addr()
        .map_err(RunError::BindRuntimeApi)?;
    let _runtime_api = server::spawn(
        api_listener,
        Arc::new(RuntimeApi::new(hub.clone(), ready_tx)),
        "runtime-api",
    );

    let mut bootstrap = Bootstrap::spawn(&config.bootstrap, api_addr.port())?;
    tracing::info!(
        pid = bootstrap.pid(),
        bootstrap = %config.bootstrap.display(),
        runtime_api = %api_addr,
        "started the bootstrap"
    );

    if let Some(reason) = wait_ready(config, &mut bootstrap, ready_rx, stop.as_mut()).await? {
        return Ok(reason);
    }

    let invoke_listener = match TcpListener::bind(config.invoke_listen).await {
        Ok(listener) => listener,
        Err(source) => {
            bootstrap.kill().await.map_err(RunError::Wait)?;
            return Err(RunError::BindInvoke {
                addr: config.invoke_listen,
                source,
            });
        }
    };
    let bound = invoke_listener.local_addr().unwrap_or(config.invoke_listen);
    let invoke_server = server::spawn(
        invoke_listener,
        Arc::new(InvokeApi::new(hub.clone())),
        "invoke",
    );
    tracing::info!(invoke = %bound, "bootstrap is ready; serving invocations");
    if let Some(sender) = invoke_addr {
        let _ = sender.send(bound);
    }

    let reason = watch_running(config, &hub, &mut bootstrap, stop).await;
    // Normally a no-op: this closes the hub when waiting for the bootstrap failed.
    hub.close("the runtime wrapper is exiting");
    bootstrap.kill_leftovers();
    invoke_server.shutdown(config.stop_grace).await;
    reason
}

/// Waits for `/runtime/init/ready`. Returns the exit reason if the run ended first.
async fn wait_ready(
    config: &WrapperConfig,
    bootstrap: &mut Bootstrap,
    mut ready_rx: watch::Receiver<bool>,
    stop: StopRequest<'_>,
) -> Result<Option<ExitReason>, RunError> {
    let outcome = tokio::select! {
        status = bootstrap.wait() => {
            let status = BootstrapStatus(status.map_err(RunError::Wait)?);
            Err(ExitReason::ExitedBeforeReady(status))
        }
        _ = ready_called(&mut ready_rx) => Ok(()),
        _ = tokio::time::sleep(config.init_timeout) => {
            // SIGKILL goes to the whole group, so nothing is left behind.
            let status = BootstrapStatus(bootstrap.kill().await.map_err(RunError::Wait)?);
            return Err(RunError::InitTimedOut { timeout: config.init_timeout, status });
        }
        _ = stop => {
            let status = bootstrap.terminate(config.stop_grace).await.map_err(RunError::Wait)?;
            Err(ExitReason::Stopped(BootstrapStatus(status)))
        }
    };
    match outcome {
        Ok(()) => Ok(None),
        Err(reason) => {
            bootstrap.kill_leftovers();
            Ok(Some(reason))
        }
    }
}

/// Watches the ready bootstrap until it exits, `stop` completes or the running invocation
/// passes its deadline. Every invocation still waiting has its outcome before this returns.
async fn watch_running(
    config: &WrapperConfig,
    hub: &Hub,
    bootstrap: &mut Bootstrap,
    mut stop: StopRequest<'_>,
) -> Result<ExitReason, RunError> {
    let mut deadline_rx = hub.watch_deadline();
    loop {
        let deadline = *deadline_rx.borrow_and_update();
        tokio::select! {
            status = bootstrap.wait() => {
                let status = BootstrapStatus(status.map_err(RunError::Wait)?);
                hub.close(&format!("the bootstrap exited with {status}"));
                return Ok(ExitReason::BootstrapExited(status));
            }
            _ = stop.as_mut() => return stop_bootstrap(config, hub, bootstrap).await,
            // The sender is a field of `hub`, which is borrowed for the whole loop, so
            // `changed` cannot fail with a closed channel.
            _ = deadline_rx.changed() => {}
            _ = sleep_until(deadline) => {
                if let Some(expired) = hub.expire(Instant::now()) {
                    return Err(kill_stuck_bootstrap(hub, bootstrap, expired).await);
                }
            }
        }
    }
}

/// Stops the bootstrap on request: no new invocations, SIGTERM, then SIGKILL after the grace.
async fn stop_bootstrap(
    config: &WrapperConfig,
    hub: &Hub,
    bootstrap: &mut Bootstrap,
) -> Result<ExitReason, RunError> {
    tracing::info!(
        grace_ms = config.stop_grace.as_millis(),
        "stopping the bootstrap"
    );
    hub.stop_accepting();
    let status = bootstrap
        .terminate(config.stop_grace)
        .await
        .map_err(RunError::Wait)?;
    let status = BootstrapStatus(status);
    hub.close(&format!(
        "the instance was stopped and the bootstrap exited with {status}"
    ));
    Ok(ExitReason::Stopped(status))
}

/// Kills the bootstrap after an invocation passed its time limit, because a bootstrap busy
/// with one invocation cannot take the next.
async fn kill_stuck_bootstrap(hub: &Hub, bootstrap: &mut Bootstrap, expired: Expired) -> RunError {
    tracing::warn!(
        request_id = %expired.request_id,
        timeout_ms = expired.timeout.as_millis(),
        "invocation timed out; killing the bootstrap"
    );
    let status = match bootstrap.kill().await {
        Ok(status) => BootstrapStatus(status),
        Err(error) => return RunError::Wait(error),
    };
    hub.close(&format!(
        "the bootstrap was killed after another invocation timed out, ending with {status}"
    ));
    RunError::InvocationTimedOut {
        request_id: expired.request_id,
        timeout: expired.timeout,
        status,
    }
}

/// Completes when the bootstrap has called `/runtime/init/ready`.
async fn ready_called(ready_rx: &mut watch::Receiver<bool>) {
    // A closed channel means the runtime API handler is gone, so the bootstrap cannot
    // report ready any more. Waiting on lets the init timeout end the run. The guard that
    // `wait_for` returns is dropped here because it is not `Send`.
    if ready_rx.wait_for(|ready| *ready).await.is_err() {
        pending::<()>().await;
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => pending().await,
    }
}
