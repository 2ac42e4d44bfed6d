//! The wrapper's configuration, read once from the environment at start.
//!
//! Parsing takes the variables as a map and the code directory as a path, so tests need not
//! change the process environment or working directory.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Socket address where the wrapper serves `POST /event-invoke`. Required unless both
/// `FNGATE_INSTANCE_IP` and `PORT` are set, as in a runtime pod.
pub const ENV_INVOKE_LISTEN: &str = "FNGATE_INVOKE_LISTEN";
/// The instance's address (a pod's IP), used with `PORT` when `FNGATE_INVOKE_LISTEN` is unset.
pub const ENV_INSTANCE_IP: &str = "FNGATE_INSTANCE_IP";
pub const ENV_PORT: &str = "PORT";
/// Path of the bootstrap. Optional.
pub const ENV_BOOTSTRAP: &str = "FNGATE_BOOTSTRAP";
/// Maximum time in ms from spawning the bootstrap until it calls `/runtime/init/ready`.
pub const ENV_INIT_TIMEOUT_MS: &str = "FNGATE_INIT_TIMEOUT_MS";
/// Maximum time in ms that a stopping bootstrap gets after SIGTERM before SIGKILL.
pub const ENV_STOP_GRACE_MS: &str = "FNGATE_STOP_GRACE_MS";

/// The wrapper's own variables. They are removed from the environment of the bootstrap, and
/// every other variable is passed through.
pub const WRAPPER_ENV_VARS: [&str; 4] = [
    ENV_INVOKE_LISTEN,
    ENV_BOOTSTRAP,
    ENV_INIT_TIMEOUT_MS,
    ENV_STOP_GRACE_MS,
];

/// Bootstrap file names tried in the code directory, in order, when `FNGATE_BOOTSTRAP` is unset.
pub const DEFAULT_BOOTSTRAP_NAMES: [&str; 2] = ["bootstrap", "scf_bootstrap"];

const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
const DEFAULT_MAX_QUEUED: usize = 1024;

/// Validated settings of one wrapper run.
#[derive(Debug, Clone)]
pub struct WrapperConfig {
    /// Address for the invoke listener. Port 0 picks a free port, which `run_with` reports.
    pub invoke_listen: SocketAddr,
    /// Executable started as the bootstrap. A relative path is relative to the working directory.
    pub bootstrap: PathBuf,
    /// Maximum time from spawning the bootstrap until it calls `/runtime/init/ready`.
    pub init_timeout: Duration,
    /// Maximum time a stopping bootstrap gets after SIGTERM before SIGKILL. The same bound
    /// applies to writing the last invoke responses before the wrapper exits.
    pub stop_grace: Duration,
    /// Maximum number of invocations waiting for the bootstrap. More are rejected with 503.
    pub max_queued: usize,
}

/// An invalid or missing setting. [`ConfigError::exit_code`] gives the process exit status.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "missing {ENV_INVOKE_LISTEN}: set it to the invoke listen address, e.g. 127.0.0.1:9000"
    )]
    MissingInvokeListen,
    #[error("invalid {ENV_INVOKE_LISTEN} {value:?}: expected IP:PORT, e.g. 127.0.0.1:9000 or 0.0.0.0:9000")]
    InvalidInvokeListen { value: String },
    #[error("invalid {name} {value:?}: expected a whole number of milliseconds greater than 0")]
    InvalidMillis { name: &'static str, value: String },
    #[error(
        "bootstrap not found: no {} or {} in {}; add one to the code package or set {ENV_BOOTSTRAP}",
        DEFAULT_BOOTSTRAP_NAMES[0], DEFAULT_BOOTSTRAP_NAMES[1], .dir.display()
    )]
    NoDefaultBootstrap { dir: PathBuf },
    #[error("bootstrap {} not found: check {ENV_BOOTSTRAP} or the code package", .path.display())]
    BootstrapNotFound { path: PathBuf },
    #[error("bootstrap {} is not a regular file: point {ENV_BOOTSTRAP} at an executable file", .path.display())]
    BootstrapNotFile { path: PathBuf },
    #[error("bootstrap {} is not executable: run `chmod +x {}` and package it again", .path.display(), .path.display())]
    BootstrapNotExecutable { path: PathBuf },
}

impl ConfigError {
    /// Returns the exit status for this error: 127 for a bootstrap problem (as a shell reports
    /// a command it cannot run), 2 for an invalid variable.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::MissingInvokeListen
            | Self::InvalidInvokeListen { .. }
            | Self::InvalidMillis { .. } => 2,
            Self::NoDefaultBootstrap { .. }
            | Self::BootstrapNotFound { .. }
            | Self::BootstrapNotFile { .. }
            | Self::BootstrapNotExecutable { .. } => 127,
        }
    }
}

impl WrapperConfig {
    /// Reads the configuration from the process environment, with the working directory as
    /// the code directory.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: HashMap<String, OsString> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
            .collect();
        Self::from_vars(&vars, Path::new("."))
    }

    /// Builds the configuration from `vars`. The default bootstrap is looked up in `code_dir`,
    /// and a relative `FNGATE_BOOTSTRAP` is taken relative to it.
    pub fn from_vars(
        vars: &HashMap<String, OsString>,
        code_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let invoke_listen = match (
            vars.get(ENV_INVOKE_LISTEN),
            vars.get(ENV_INSTANCE_IP),
            vars.get(ENV_PORT),
        ) {
            (None, Some(ip), Some(port)) => {
                let joined = format!("{}:{}", ip.to_string_lossy(), port.to_string_lossy());
                parse_listen(Some(&OsString::from(joined)))?
            }
            (listen, _, _) => parse_listen(listen)?,
        };
        let bootstrap = resolve_bootstrap(vars.get(ENV_BOOTSTRAP), code_dir)?;
        let init_timeout = parse_millis(vars, ENV_INIT_TIMEOUT_MS, DEFAULT_INIT_TIMEOUT)?;
        let stop_grace = parse_millis(vars, ENV_STOP_GRACE_MS, DEFAULT_STOP_GRACE)?;
        Ok(Self {
            invoke_listen,
            bootstrap,
            init_timeout,
            stop_grace,
            max_queued: DEFAULT_MAX_QUEUED,
        })
    }

    /// Builds a configuration with the defaults for everything but the two required values.
    pub fn new(invoke_listen: SocketAddr, bootstrap: PathBuf) -> Self {
        Self {
            invoke_listen,
            bootstrap,
            init_timeout: DEFAULT_INIT_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            max_queued: DEFAULT_MAX_QUEUED,
        }
    }
}

fn parse_listen(value: Option<&OsString>) -> Result<SocketAddr, ConfigError> {
    let value = value.ok_or(ConfigError::MissingInvokeListen)?;
    let text = value.to_string_lossy();
    if text.trim().is_empty() {
        return Err(ConfigError::MissingInvokeListen);
    }
    text.trim()
        .parse()
        .map_err(|_| ConfigError::InvalidInvokeListen {
            value: text.into_owned(),
        })
}

fn parse_millis(
    vars: &HashMap<String, OsString>,
    name: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(value) = vars.get(name) else {
        return Ok(default);
    };
    let text = value.to_string_lossy();
    match text.trim().parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError::InvalidMillis {
            name,
            value: text.into_owned(),
        }),
    }
}

/// Picks the bootstrap path and checks that it is an executable regular file.
///
/// The check runs once at start, so a missing bootstrap gets a clear message instead of a
/// spawn error. The spawn can still fail later (for example on a bad `#!` line).
fn resolve_bootstrap(explicit: Option<&OsString>, code_dir: &Path) -> Result<PathBuf, ConfigError> {
    let path = match explicit.filter(|value| !value.is_empty()) {
        Some(value) => code_dir.join(value),
        None => DEFAULT_BOOTSTRAP_NAMES
            .iter()
            .map(|name| code_dir.join(name))
            .find(|candidate| candidate.symlink_metadata().is_ok())
            .ok_or_else(|| ConfigError::NoDefaultBootstrap {
                dir: code_dir
                    .canonicalize()
                    .unwrap_or_else(|_| code_dir.to_path_buf()),
            })?,
    };

    let metadata = match std::fs::metadata(&path) {
        Ok(metadata) => metadata,
        Err(_) => return Err(ConfigError::BootstrapNotFound { path }),
    };
    if !metadata.is_file() {
        return Err(ConfigError::BootstrapNotFile { path });
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(ConfigError::BootstrapNotExecutable { path });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, OsString> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), OsString::from(value)))
            .collect()
    }

    fn write_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\nexit 0\n").expect("write test file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("chmod test file");
        path
    }

    #[test]
    fn pod_ip_and_port_give_listen_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "bootstrap", 0o755);
        let pod = vars(&[(ENV_INSTANCE_IP, "10.1.2.3"), (ENV_PORT, "9000")]);
        let config = WrapperConfig::from_vars(&pod, dir.path()).expect("valid");
        assert_eq!(config.invoke_listen, "10.1.2.3:9000".parse().unwrap());

        let both = vars(&[
            (ENV_INVOKE_LISTEN, "127.0.0.1:7000"),
            (ENV_INSTANCE_IP, "10.1.2.3"),
            (ENV_PORT, "9000"),
        ]);
        let config = WrapperConfig::from_vars(&both, dir.path()).expect("valid");
        assert_eq!(config.invoke_listen, "127.0.0.1:7000".parse().unwrap());
    }

    #[test]
    fn missing_listen_exits_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "bootstrap", 0o755);

        let error = WrapperConfig::from_vars(&vars(&[]), dir.path()).expect_err("must fail");

        assert!(matches!(error, ConfigError::MissingInvokeListen));
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains(ENV_INVOKE_LISTEN), "{error}");
    }

    #[test]
    fn invalid_listen_names_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "bootstrap", 0o755);

        let error =
            WrapperConfig::from_vars(&vars(&[(ENV_INVOKE_LISTEN, "localhost:9000")]), dir.path())
                .expect_err("must fail");

        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("\"localhost:9000\""), "{error}");
        assert!(error.to_string().contains(ENV_INVOKE_LISTEN), "{error}");
    }

    #[test]
    fn defaults_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bootstrap = write_file(dir.path(), "bootstrap", 0o755);

        let config =
            WrapperConfig::from_vars(&vars(&[(ENV_INVOKE_LISTEN, "0.0.0.0:9000")]), dir.path())
                .expect("valid config");

        assert_eq!(config.invoke_listen, "0.0.0.0:9000".parse().expect("addr"));
        assert_eq!(config.bootstrap, bootstrap);
        assert_eq!(config.init_timeout, Duration::from_millis(30_000));
        assert_eq!(config.stop_grace, Duration::from_millis(5_000));
    }

    #[test]
    fn bootstrap_preferred_over_scf_bootstrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen = vars(&[(ENV_INVOKE_LISTEN, "127.0.0.1:0")]);
        let scf = write_file(dir.path(), "scf_bootstrap", 0o755);

        let only_scf = WrapperConfig::from_vars(&listen, dir.path()).expect("scf_bootstrap found");
        assert_eq!(only_scf.bootstrap, scf);

        let plain = write_file(dir.path(), "bootstrap", 0o755);
        let both = WrapperConfig::from_vars(&listen, dir.path()).expect("bootstrap found");
        assert_eq!(both.bootstrap, plain);
    }

    #[test]
    fn explicit_bootstrap_relative_to_code_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let custom = write_file(dir.path(), "run.sh", 0o755);
        let config = WrapperConfig::from_vars(
            &vars(&[
                (ENV_INVOKE_LISTEN, "127.0.0.1:0"),
                (ENV_BOOTSTRAP, "run.sh"),
            ]),
            dir.path(),
        )
        .expect("valid config");

        assert_eq!(config.bootstrap, custom);
    }

    #[test]
    fn bootstrap_errors_exit_127() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listen = vars(&[(ENV_INVOKE_LISTEN, "127.0.0.1:0")]);

        let none = WrapperConfig::from_vars(&listen, dir.path()).expect_err("no bootstrap");
        assert!(matches!(none, ConfigError::NoDefaultBootstrap { .. }));
        assert_eq!(none.exit_code(), 127);

        write_file(dir.path(), "scf_bootstrap", 0o644);
        let not_executable =
            WrapperConfig::from_vars(&listen, dir.path()).expect_err("not executable");
        assert!(matches!(
            not_executable,
            ConfigError::BootstrapNotExecutable { .. }
        ));
        assert_eq!(not_executable.exit_code(), 127);
        assert!(
            not_executable.to_string().contains("chmod +x"),
            "{not_executable}"
        );
        assert!(
            not_executable.to_string().contains("scf_bootstrap"),
            "{not_executable}"
        );

        let mut explicit = listen.clone();
        explicit.insert(ENV_BOOTSTRAP.to_string(), OsString::from("missing"));
        let missing = WrapperConfig::from_vars(&explicit, dir.path()).expect_err("missing file");
        assert!(matches!(missing, ConfigError::BootstrapNotFound { .. }));
        assert_eq!(missing.exit_code(), 127);
    }

    #[test]
    fn invalid_millis_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), "bootstrap", 0o755);

        for bad in ["", "0", "-5", "3s", "1.5"] {
            let error = WrapperConfig::from_vars(
                &vars(&[
                    (ENV_INVOKE_LISTEN, "127.0.0.1:0"),
                    (ENV_INIT_TIMEOUT_MS, bad),
                ]),
                dir.path(),
            )
            .expect_err("must fail");
            assert_eq!(error.exit_code(), 2, "value {bad:?}");
            assert!(error.to_string().contains(ENV_INIT_TIMEOUT_MS), "{error}");
        }
    }
}
