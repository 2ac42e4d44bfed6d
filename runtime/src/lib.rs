//! fngate's runtime wrapper: the entrypoint of an event-function instance whose code follows
//! Tencent Cloud SCF's custom runtime convention.
//!
//! The wrapper starts the function's bootstrap with `SCF_RUNTIME_API` and
//! `SCF_RUNTIME_API_PORT` pointing at a loopback runtime API (`/runtime/init/ready`,
//! `/runtime/invocation/next`, `.../response`, `.../error`). After the bootstrap calls
//! `/runtime/init/ready`, the wrapper serves `POST /event-invoke` on `FNGATE_INVOKE_LISTEN`,
//! queues each event for the bootstrap, and returns its result. It enforces each invocation's
//! time limit and ends with the bootstrap.
//!
//! Routing, concurrency limits and retries are the platform's job; this crate serves one instance.
//!
//! ```no_run
//! # async fn example() {
//! let config = fngate_runtime::WrapperConfig::from_env().expect("valid environment");
//! let exit = fngate_runtime::run(config).await;
//! eprintln!("fngate-runtime: {}", exit.reason);
//! std::process::exit(exit.code);
//! # }
//! ```

#![deny(unsafe_code)]

mod bootstrap;
mod config;
mod hub;
mod invoke;
mod reply;
mod runtime_api;
mod server;
mod supervisor;

use std::future::Future;

pub use bootstrap::{BootstrapStatus, SpawnError};
pub use config::{
    ConfigError, WrapperConfig, DEFAULT_BOOTSTRAP_NAMES, ENV_BOOTSTRAP, ENV_INIT_TIMEOUT_MS,
    ENV_INVOKE_LISTEN, ENV_STOP_GRACE_MS,
};
pub use supervisor::{run_with, Exit, ExitReason, RunError};

/// Runs the wrapper until the bootstrap exits, an invocation times out, or the process
/// receives SIGTERM or SIGINT. Either signal stops the bootstrap as described in [`run_with`].
pub async fn run(config: WrapperConfig) -> Exit {
    match stop_signals() {
        Ok(stop) => run_with(config, stop, None).await,
        Err(error) => RunError::Signals(error).into(),
    }
}

/// Installs the SIGTERM and SIGINT handlers and returns a future that completes on either.
fn stop_signals() -> std::io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("received SIGTERM"),
            _ = interrupt.recv() => tracing::info!("received SIGINT"),
        }
    })
}
