//! The local instance backend of default mode: each instance is a process on this machine,
//! started from the function's code directory and reached over TCP on `bind_ip`.
//!
//! Each instance runs in its own process group, so stopping or killing it also ends the
//! processes its bootstrap started. Its stdout and stderr go to one log file per instance.

mod launch;
mod logs;
mod process;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::backend::{BoxFuture, InstanceBackend, InstanceFailure, RunningInstance, StartRequest};

use self::launch::Entrypoint;
use self::process::{ExitRecord, InstanceLabel, SupervisedProcess};

/// Minimum and maximum pause between two readiness probes.
const MIN_PROBE_PAUSE: Duration = Duration::from_millis(1);
const MAX_PROBE_PAUSE: Duration = Duration::from_millis(20);

/// The pause between probes is this fraction of the time waited so far, within the bounds above.
/// So an open port is found within about 5% of the start-up time after it opened (at least 1 ms,
/// at most 20 ms), and a slow start costs few probes.
const PROBE_PAUSE_DIVISOR: u32 = 20;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalBackendConfig {
    /// Root under which per-instance logs are kept:
    /// `<function_dir>/<namespace>/<function>/logs/<instance_id>.log`.
    pub function_dir: PathBuf,
    /// Path of the `fngate-runtime` wrapper binary, the entrypoint of custom-runtime event
    /// functions.
    pub runtime_wrapper: PathBuf,
    /// Address instances listen on.
    pub bind_ip: IpAddr,
}

impl LocalBackendConfig {
    /// Creates a configuration whose instances listen on 127.0.0.1.
    pub fn new(function_dir: impl Into<PathBuf>, runtime_wrapper: impl Into<PathBuf>) -> Self {
        Self {
            function_dir: function_dir.into(),
            runtime_wrapper: runtime_wrapper.into(),
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Starts instances as local processes.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    config: LocalBackendConfig,
    ports: Arc<Mutex<HashSet<u16>>>,
}

impl LocalBackend {
    pub fn new(config: LocalBackendConfig) -> Self {
        Self {
            config,
            ports: Arc::default(),
        }
    }

    async fn start_instance(
        &self,
        request: StartRequest,
    ) -> Result<Box<dyn RunningInstance>, InstanceFailure> {
        let started_at = Instant::now();
        let label = InstanceLabel {
            function: format!("{}/{}", request.function.namespace, request.function.name),
            instance_id: request.instance_id,
        };
        match self.launch(&request, &label, started_at).await {
            Ok(instance) => Ok(Box::new(instance)),
            Err(failure) => {
                // The scaler logs the failure at warn level with its retry delay.
                tracing::debug!(
                    function = %label.function,
                    instance = label.instance_id,
                    reason = %failure,
                    "instance failed to start"
                );
                Err(failure)
            }
        }
    }

    /// Spawns the instance and waits until its port accepts connections.
    async fn launch(
        &self,
        request: &StartRequest,
        label: &InstanceLabel,
        started_at: Instant,
    ) -> Result<LocalInstance, InstanceFailure> {
        let entrypoint = launch::resolve_entrypoint(&self.config, request)?;
        let log_path = launch::log_path(
            &self.config.function_dir,
            &request.function,
            request.instance_id,
        )?;
        let lease = PortLease::take(&self.ports, self.config.bind_ip)?;
        let addr = lease.addr;
        let log_file = logs::open_log_file(&log_path).await.map_err(|error| {
            InstanceFailure::Spawn(format!(
                "failed to create log file {}: {error}",
                log_path.display()
            ))
        })?;

        let mut command = build_command(request, &entrypoint, addr);
        let process = SupervisedProcess::spawn(&mut command, log_file, log_path, label.clone())
            .await
            .map_err(|error| spawn_failure(&entrypoint, &error))?;
        // From here on, dropping `process` (on an error or when this future is dropped) kills
        // the process group.

        let deadline = started_at + request.function.start_timeout();
        match wait_ready(addr, &process, deadline).await {
            Readiness::Ready => {}
            Readiness::Exited(record) => return Err(exited_failure(&entrypoint, record)),
            Readiness::TimedOut => {
                process.kill().await;
                let timeout = request.function.start_timeout();
                return Err(InstanceFailure::StartTimeout { timeout });
            }
        }

        process.mark_ready();
        let boot_time = started_at.elapsed();
        tracing::info!(
            function = %label.function,
            instance = label.instance_id,
            pid = process.pid(),
            port = addr.port(),
            boot_ms = boot_time.as_millis() as u64,
            "instance started"
        );
        Ok(LocalInstance {
            addr,
            _lease: lease,
            boot_time,
            what: entrypoint.what,
            label: label.clone(),
            process,
        })
    }
}

impl InstanceBackend for LocalBackend {
    fn start(
        &self,
        request: StartRequest,
    ) -> BoxFuture<'_, Result<Box<dyn RunningInstance>, InstanceFailure>> {
        Box::pin(self.start_instance(request))
    }
}

/// A port handed to one instance. While the lease lives, no other instance of this backend gets
/// the same port, even though the kernel sees it free until the instance binds it.
struct PortLease {
    addr: SocketAddr,
    ports: Arc<Mutex<HashSet<u16>>>,
}

/// Number of attempts to find a port no other instance leases before giving up.
const PORT_ATTEMPTS: usize = 64;

impl PortLease {
    fn take(ports: &Arc<Mutex<HashSet<u16>>>, bind_ip: IpAddr) -> Result<Self, InstanceFailure> {
        for _ in 0..PORT_ATTEMPTS {
            let addr = pick_free_addr(bind_ip)?;
            if ports.lock().insert(addr.port()) {
                return Ok(PortLease {
                    addr,
                    ports: Arc::clone(ports),
                });
            }
        }
        Err(InstanceFailure::Spawn(format!(
            "no free port on {bind_ip} after {PORT_ATTEMPTS} attempts"
        )))
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.ports.lock().remove(&self.addr.port());
    }
}

/// Returns `bind_ip` with a port that was free a moment ago.
///
/// NOTE: the port is free only until some process other than this backend's instances (which
/// lease their ports) binds it. The instance then fails to listen and exits, which the caller
/// sees as an `Exited` failure with the bind error in the output.
fn pick_free_addr(bind_ip: IpAddr) -> Result<SocketAddr, InstanceFailure> {
    let listener = TcpListener::bind((bind_ip, 0)).map_err(|error| {
        InstanceFailure::Spawn(format!("failed to find a free port on {bind_ip}: {error}"))
    })?;
    listener.local_addr().map_err(|error| {
        InstanceFailure::Spawn(format!(
            "failed to read the free port on {bind_ip}: {error}"
        ))
    })
}

fn build_command(request: &StartRequest, entrypoint: &Entrypoint, addr: SocketAddr) -> Command {
    let mut command = Command::new(&entrypoint.program);
    command
        .current_dir(&request.code_dir)
        .env_clear()
        .envs(launch::build_env(request, entrypoint, addr))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn spawn_failure(entrypoint: &Entrypoint, error: &std::io::Error) -> InstanceFailure {
    let program = entrypoint.program.display();
    let hint = match error.raw_os_error() {
        Some(libc::ENOEXEC) => "; a script needs a `#!` line such as `#!/bin/bash`".to_owned(),
        Some(libc::EACCES) => format!("; check that `chmod +x {program}` was run"),
        _ => String::new(),
    };
    InstanceFailure::Spawn(format!(
        "failed to start {} {program}: {error}{hint}",
        entrypoint.what
    ))
}

fn exited_failure(entrypoint: &Entrypoint, record: ExitRecord) -> InstanceFailure {
    InstanceFailure::Exited {
        what: entrypoint.what.to_owned(),
        status: record.status,
        output_tail: record.output_tail,
    }
}

enum Readiness {
    Ready,
    Exited(ExitRecord),
    TimedOut,
}

/// Races the readiness probe against the process's exit and the start deadline.
async fn wait_ready(addr: SocketAddr, process: &SupervisedProcess, deadline: Instant) -> Readiness {
    tokio::select! {
        // An exit wins a tie with readiness, because a process that exited serves nothing even if
        // a connection to its port succeeded.
        biased;
        record = process.wait_exit() => Readiness::Exited(record),
        () = probe_until_open(addr) => Readiness::Ready,
        () = tokio::time::sleep_until(deadline) => Readiness::TimedOut,
    }
}

/// Returns once a TCP connection to `addr` succeeds.
///
/// Connecting to a closed loopback port fails at once, so each probe is cheap, but probing every
/// millisecond for the whole start timeout would waste CPU during bursts of cold starts.
async fn probe_until_open(addr: SocketAddr) {
    let probing_since = Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        let pause =
            (probing_since.elapsed() / PROBE_PAUSE_DIVISOR).clamp(MIN_PROBE_PAUSE, MAX_PROBE_PAUSE);
        tokio::time::sleep(pause).await;
    }
}

/// A ready local instance. Dropping it kills its process group.
struct LocalInstance {
    addr: SocketAddr,
    /// Released when the instance is dropped, after its process was stopped or killed.
    _lease: PortLease,
    boot_time: Duration,
    what: &'static str,
    label: InstanceLabel,
    process: SupervisedProcess,
}

impl RunningInstance for LocalInstance {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn boot_time(&self) -> Duration {
        self.boot_time
    }

    fn exited(&self) -> BoxFuture<'_, InstanceFailure> {
        Box::pin(async move {
            let record = self.process.wait_exit().await;
            if record.stop_requested {
                // `exited` reports only exits that no stop request caused.
                std::future::pending::<()>().await;
            }
            InstanceFailure::Exited {
                what: self.what.to_owned(),
                status: record.status,
                output_tail: record.output_tail,
            }
        })
    }

    fn stop(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.process.has_exited() {
                return;
            }
            let record = self.process.terminate(grace).await;
            tracing::info!(
                function = %self.label.function,
                instance = self.label.instance_id,
                status = %record.status,
                "instance stopped"
            );
        })
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn leased_ports_never_handed_out_twice() {
        let ports: Arc<Mutex<HashSet<u16>>> = Arc::default();
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let leases: Vec<PortLease> = (0..200)
            .map(|_| PortLease::take(&ports, ip).unwrap())
            .collect();
        let distinct: HashSet<u16> = leases.iter().map(|lease| lease.addr.port()).collect();
        assert_eq!(distinct.len(), leases.len());
        assert_eq!(ports.lock().len(), leases.len());

        drop(leases);
        assert!(ports.lock().is_empty(), "dropped leases kept their ports");
    }
}
