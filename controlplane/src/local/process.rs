//! The process side of a local instance: spawning it in its own process group, the supervisor
//! task that owns the child and publishes its exit, and signalling the whole group.

use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::logs::{self, OutputTail};

/// How long the supervisor waits, after the process exited, for the output pipes to close before
/// it publishes the exit. Pipes stay open past this only if a process outside the group still
/// has them open.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Attempts at spawning while exec fails with ETXTBSY.
const SPAWN_ATTEMPTS: u32 = 6;

/// Maximum pause between two checks of whether a process group is empty.
const MAX_GROUP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Names an instance in log events.
#[derive(Debug, Clone)]
pub(super) struct InstanceLabel {
    /// `<namespace>/<function>`.
    pub function: String,
    pub instance_id: u64,
}

/// The end of an instance process, as published by its supervisor.
#[derive(Debug, Clone)]
pub(super) struct ExitRecord {
    /// "exit status 1", "signal 9".
    pub status: String,
    /// Whether the process had been asked to stop (or was killed by the platform) before it
    /// exited.
    pub stop_requested: bool,
    /// The last output lines, read after the pipes were drained.
    pub output_tail: String,
}

/// Flags shared between an instance handle and its supervisor task.
#[derive(Debug, Default)]
struct InstanceFlags {
    stop_requested: AtomicBool,
    ready: AtomicBool,
}

/// A spawned instance process, leader of its own process group, whose output is captured.
///
/// Dropping it kills the whole group unless the process already exited.
pub(super) struct SupervisedProcess {
    pgid: i32,
    exit: watch::Receiver<Option<ExitRecord>>,
    flags: Arc<InstanceFlags>,
    label: InstanceLabel,
}

impl SupervisedProcess {
    /// Spawns `command` in a new process group and starts capturing its output into `log_file`.
    /// The process gets SIGKILL when the spawning thread exits, so an fngate killed with
    /// SIGKILL leaves no instance behind.
    ///
    /// `command` must have piped stdout and stderr.
    ///
    /// NOTE: the kernel sends that signal when the spawning *thread* exits, not only when fngate
    /// exits. So this must run on a thread that lives as long as the process. Tokio runtime
    /// worker threads do, and the scaler calls the backend from a `tokio::spawn`ed task. Threads
    /// of `spawn_blocking`, which exit when idle, and workers that entered `block_in_place` do
    /// not.
    pub(super) async fn spawn(
        command: &mut Command,
        log_file: tokio::fs::File,
        log_path: std::path::PathBuf,
        label: InstanceLabel,
    ) -> io::Result<Self> {
        command.process_group(0).kill_on_drop(true);
        let fngate_pid = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe functions may be called. It calls only prctl(2) and getppid(2),
        // which are plain system calls, and it neither allocates nor takes locks.
        // PR_SET_PDEATHSIG reads one integer, passed as the unsigned long the kernel expects.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // A parent that died before prctl took effect never sends the signal, and a
                // changed parent id shows that. Failing the spawn is then the safe choice.
                if std::os::unix::process::parent_id() != fngate_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = spawn_retrying_busy_text(command).await?;
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| io::Error::other("spawned process has no valid pid"))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(io::Error::other(
                "spawned process has no stdout or stderr pipe",
            ));
        };

        let tail = Arc::new(OutputTail::default());
        let capture = logs::spawn_capture(stdout, stderr, log_file, log_path, tail.clone());
        let flags = Arc::new(InstanceFlags::default());
        let (sender, exit) = watch::channel(None);
        tokio::spawn(supervise(
            child,
            pgid,
            capture,
            tail,
            flags.clone(),
            label.clone(),
            sender,
        ));
        Ok(Self {
            pgid,
            exit,
            flags,
            label,
        })
    }

    /// Process id of the leader, which is also the process group id.
    pub(super) fn pid(&self) -> i32 {
        self.pgid
    }

    /// Records that the instance became ready, so that a later exit is logged as unexpected.
    pub(super) fn mark_ready(&self) {
        self.flags.ready.store(true, Ordering::SeqCst);
    }

    pub(super) fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Waits until the supervisor published the exit. Cancel safe, and may be called any number
    /// of times.
    pub(super) async fn wait_exit(&self) -> ExitRecord {
        let mut exit = self.exit.clone();
        let published = match exit.wait_for(Option::is_some).await {
            Ok(record) => record.clone(),
            // The supervisor task was dropped, which happens only when the runtime shuts down.
            Err(_) => None,
        };
        published.unwrap_or_else(|| ExitRecord {
            status: "unknown status (the supervisor task ended)".to_owned(),
            stop_requested: self.flags.stop_requested.load(Ordering::SeqCst),
            output_tail: String::new(),
        })
    }

    /// Sends SIGTERM to the group, waits up to `grace` for every member to exit, then sends
    /// SIGKILL to what is left. Returns once the leader was reaped.
    pub(super) async fn terminate(&self, grace: Duration) -> ExitRecord {
        if self.has_exited() {
            return self.wait_exit().await;
        }
        self.flags.stop_requested.store(true, Ordering::SeqCst);
        // An error here means the group is already gone, which the waits below find out.
        let _ = signal_group(self.pgid, libc::SIGTERM);

        let deadline = Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, self.wait_exit()).await;
        wait_group_empty(self.pgid, deadline).await;
        if group_alive(self.pgid) {
            tracing::info!(
                function = %self.label.function,
                instance = self.label.instance_id,
                grace_ms = grace.as_millis() as u64,
                "instance still running after the grace period; sending SIGKILL"
            );
            let _ = signal_group(self.pgid, libc::SIGKILL);
        }
        self.wait_exit().await
    }

    /// Sends SIGKILL to the group and returns once the leader was reaped.
    pub(super) async fn kill(&self) -> ExitRecord {
        self.flags.stop_requested.store(true, Ordering::SeqCst);
        if !self.has_exited() {
            let _ = signal_group(self.pgid, libc::SIGKILL);
        }
        self.wait_exit().await
    }
}

impl Drop for SupervisedProcess {
    fn drop(&mut self) {
        if self.has_exited() {
            return;
        }
        self.flags.stop_requested.store(true, Ordering::SeqCst);
        tracing::info!(
            function = %self.label.function,
            instance = self.label.instance_id,
            pid = self.pgid,
            "instance handle dropped while running; killing its process group"
        );
        if let Err(error) = signal_group(self.pgid, libc::SIGKILL) {
            tracing::debug!(pid = self.pgid, %error, "killing instance process group failed");
        }
    }
}

/// Owns the child: waits for it to exit, kills what it left behind unless a stop is under way,
/// waits (bounded) for the output to be drained, then publishes the exit.
async fn supervise(
    mut child: Child,
    pgid: i32,
    capture: JoinHandle<()>,
    tail: Arc<OutputTail>,
    flags: Arc<InstanceFlags>,
    label: InstanceLabel,
    sender: watch::Sender<Option<ExitRecord>>,
) {
    let status = match child.wait().await {
        Ok(status) => describe_status(status),
        Err(error) => format!("unknown status (waiting for the process failed: {error})"),
    };
    let stop_requested = flags.stop_requested.load(Ordering::SeqCst);
    if !stop_requested {
        // The leader exited on its own, so the instance is over. Processes it left in its group
        // would hold the output pipes open and keep running unsupervised.
        let _ = signal_group(pgid, libc::SIGKILL);
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, capture).await.is_err() {
        tracing::debug!(
            function = %label.function,
            instance = label.instance_id,
            "instance output pipes still open after its exit; publishing the exit anyway"
        );
    }

    if !stop_requested && flags.ready.load(Ordering::SeqCst) {
        tracing::warn!(
            function = %label.function,
            instance = label.instance_id,
            pid = pgid,
            %status,
            "instance exited on its own"
        );
    }
    let record = ExitRecord {
        status,
        stop_requested,
        output_tail: tail.text(),
    };
    sender.send_replace(Some(record));
}

/// Spawns `command`, retrying while exec fails with ETXTBSY ("text file busy").
///
/// That error is transient when the executable was just written: a process forked elsewhere in
/// this program at that moment keeps a copy of the write descriptor open until it calls exec.
async fn spawn_retrying_busy_text(command: &mut Command) -> io::Result<Child> {
    let mut pause = Duration::from_millis(1);
    for _ in 1..SPAWN_ATTEMPTS {
        match command.spawn() {
            Err(error) if error.raw_os_error() == Some(libc::ETXTBSY) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            result => return result,
        }
    }
    command.spawn()
}

/// Formats an exit status as "exit status N" or "signal N".
pub(super) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;

    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(signal) = status.signal() {
        format!("signal {signal}")
    } else {
        status.to_string()
    }
}

/// Sends `signal` to every process in the group `pgid`; signal 0 only checks that it exists.
fn signal_group(pgid: i32, signal: libc::c_int) -> io::Result<()> {
    // kill(0, _) would signal fngate's own group and kill(-1, _) every process it may signal.
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid process group id {pgid}"),
        ));
    }
    // SAFETY: kill(2) reads no memory of ours and has no preconditions. The negative pid
    // addresses the group whose leader we spawned, and the check above keeps it off 0 and -1.
    let result = unsafe { libc::kill(-pgid, signal) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Returns whether any process (zombies included) is still in the group `pgid`.
fn group_alive(pgid: i32) -> bool {
    match signal_group(pgid, 0) {
        Ok(()) => true,
        Err(error) => error.raw_os_error() == Some(libc::EPERM),
    }
}

/// Polls until the group is empty or `deadline` passed.
async fn wait_group_empty(pgid: i32, deadline: Instant) {
    let mut pause = Duration::from_millis(1);
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep_until(deadline.min(Instant::now() + pause)).await;
        pause = (pause * 2).min(MAX_GROUP_POLL_INTERVAL);
    }
}
