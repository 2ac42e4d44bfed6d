//! The bootstrap process: spawning it in its own process group, tied to the wrapper's life,
//! signalling that group, and describing how it ended.

#![allow(unsafe_code)]

use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::config::WRAPPER_ENV_VARS;

/// A running bootstrap. Its process id is also its process group id.
#[derive(Debug)]
pub(crate) struct Bootstrap {
    child: Child,
    pgid: libc::pid_t,
}

/// A bootstrap that could not be started.
#[derive(Debug, thiserror::Error)]
#[error("failed to start bootstrap {}: {source}; check that it is executable (`chmod +x`) and that its `#!` line names an installed interpreter", .path.display())]
pub struct SpawnError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl Bootstrap {
    /// Spawns `path` with the runtime API address in `SCF_RUNTIME_API` and
    /// `SCF_RUNTIME_API_PORT`, stdin null and stdout and stderr inherited. The bootstrap gets
    /// SIGKILL when the spawning thread exits, so a wrapper killed with SIGKILL leaves no
    /// bootstrap behind.
    ///
    /// NOTE: the kernel sends that signal when the spawning *thread* exits, not only when the
    /// wrapper process exits. Call this only on a thread that lives as long as the wrapper,
    /// such as the thread that runs the binary's current-thread tokio runtime, and never from
    /// `spawn_blocking`, whose threads exit when idle.
    pub(crate) fn spawn(path: &Path, api_port: u16) -> Result<Self, SpawnError> {
        let mut command = Command::new(path);
        command
            .env("SCF_RUNTIME_API", "127.0.0.1")
            .env("SCF_RUNTIME_API_PORT", api_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            // A group of its own lets one signal reach the bootstrap and every process it
            // started, and keeps a terminal's Ctrl-C from reaching them directly.
            .process_group(0)
            .kill_on_drop(true);
        for name in WRAPPER_ENV_VARS {
            command.env_remove(name);
        }
        let wrapper_pid = std::process::id();
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
                if std::os::unix::process::parent_id() != wrapper_pid {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let spawn_error = |source| SpawnError {
            path: path.to_path_buf(),
            source,
        };
        let child = command.spawn().map_err(spawn_error)?;
        let pgid = child
            .id()
            .and_then(|pid| libc::pid_t::try_from(pid).ok())
            .filter(|pid| *pid > 1)
            .ok_or_else(|| {
                spawn_error(io::Error::other(
                    "the spawned process has no valid process id",
                ))
            })?;
        Ok(Self { child, pgid })
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pgid
    }

    /// Waits for the bootstrap to exit. Cancel-safe, because `Child::wait` is.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to the bootstrap's process group. A group that no longer exists is no error.
    pub(crate) fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: kill(2) reads no memory of this process. `pgid` is greater than 1 (checked at
        // spawn), so the negated value names that group and never "every process" (-1) or this
        // wrapper's own group (0).
        let rc = unsafe { libc::kill(-self.pgid, signal) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(pgid = self.pgid, signal, %error, "failed to signal the bootstrap's process group");
            }
        }
    }

    /// Kills the whole group with SIGKILL and waits for the bootstrap to exit.
    pub(crate) async fn kill(&mut self) -> io::Result<ExitStatus> {
        self.signal_group(libc::SIGKILL);
        self.wait().await
    }

    /// Sends SIGTERM to the group and waits up to `grace` for the bootstrap to exit, then
    /// kills the group with SIGKILL.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        self.signal_group(libc::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    pid = self.pgid,
                    grace_ms = grace.as_millis(),
                    "bootstrap ignored SIGTERM; sending SIGKILL"
                );
                self.kill().await
            }
        }
    }

    /// Kills the processes the bootstrap left behind in its group after it exited.
    ///
    /// NOTE: once the group is empty its id can in theory be reused by an unrelated new group
    /// before this runs. Linux reuses process ids only after cycling through `pid_max`, so
    /// the window is small but not zero.
    pub(crate) fn kill_leftovers(&self) {
        self.signal_group(libc::SIGKILL);
    }
}

/// Exit status of the bootstrap, reported as a shell reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapStatus(pub ExitStatus);

impl BootstrapStatus {
    /// Returns the exit code, or 128 plus the signal number when a signal ended the process.
    pub fn code(&self) -> i32 {
        match (self.0.code(), self.0.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        }
    }
}

impl fmt::Display for BootstrapStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(code), _) => write!(f, "status {code}"),
            (None, Some(signal)) => write!(f, "signal {signal} (exit code {})", 128 + signal),
            (None, None) => write!(f, "an unknown status"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_maps_signal_to_128_plus() {
        let exited = BootstrapStatus(ExitStatus::from_raw(3 << 8));
        let killed = BootstrapStatus(ExitStatus::from_raw(libc::SIGKILL));

        assert_eq!(exited.code(), 3);
        assert_eq!(exited.to_string(), "status 3");
        assert_eq!(killed.code(), 137);
        assert_eq!(killed.to_string(), "signal 9 (exit code 137)");
    }
}
