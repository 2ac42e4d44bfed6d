//! Launch settings of a local instance: the entrypoint for the function's kind, the checks made
//! before spawning it, its environment and the path of its log file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::backend::{InstanceFailure, StartRequest};
use crate::model::{EventRuntime, FunctionKind, FunctionSpec};

use super::LocalBackendConfig;

/// The program an instance runs.
#[derive(Debug, Clone)]
pub(super) struct Entrypoint {
    pub program: PathBuf,
    /// Names the program in errors: "bootstrap" or "runtime wrapper".
    pub what: &'static str,
    /// For custom-runtime event functions, the bootstrap that the runtime wrapper starts.
    pub wrapped_bootstrap: Option<PathBuf>,
}

/// Picks the entrypoint for the function's kind and checks that it can be executed.
pub(super) fn resolve_entrypoint(
    config: &LocalBackendConfig,
    request: &StartRequest,
) -> Result<Entrypoint, InstanceFailure> {
    let spec = &request.function;
    match (spec.kind, spec.event_runtime()) {
        (FunctionKind::Web, _) | (FunctionKind::Event, EventRuntime::Image) => {
            let program = request.code_dir.join("scf_bootstrap");
            check_executable(&program, "bootstrap")?;
            Ok(Entrypoint {
                program,
                what: "bootstrap",
                wrapped_bootstrap: None,
            })
        }
        (FunctionKind::Event, EventRuntime::Custom) => {
            check_executable(&config.runtime_wrapper, "runtime wrapper")?;
            let bootstrap = find_custom_bootstrap(&request.code_dir)?;
            check_executable(&bootstrap, "bootstrap")?;
            Ok(Entrypoint {
                program: config.runtime_wrapper.clone(),
                what: "runtime wrapper",
                wrapped_bootstrap: Some(bootstrap),
            })
        }
    }
}

/// Returns `<code_dir>/bootstrap` if it exists, else `<code_dir>/scf_bootstrap` if that exists.
fn find_custom_bootstrap(code_dir: &Path) -> Result<PathBuf, InstanceFailure> {
    let bootstrap = code_dir.join("bootstrap");
    let scf_bootstrap = code_dir.join("scf_bootstrap");
    for candidate in [&bootstrap, &scf_bootstrap] {
        if candidate.symlink_metadata().is_ok() {
            return Ok(candidate.clone());
        }
    }
    Err(InstanceFailure::Spawn(format!(
        "bootstrap not found: neither {} nor {} exists; add an executable `bootstrap` to the \
         function's code",
        bootstrap.display(),
        scf_bootstrap.display()
    )))
}

/// Checks that `path` is an executable regular file, naming the path and the fix otherwise.
fn check_executable(path: &Path, what: &str) -> Result<(), InstanceFailure> {
    let path_display = path.display();
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(InstanceFailure::Spawn(format!(
                "{what} {path_display} not found; {}",
                missing_fix(what)
            )));
        }
        Err(error) => {
            return Err(InstanceFailure::Spawn(format!(
                "failed to read {what} {path_display}: {error}"
            )));
        }
    };
    if !metadata.is_file() {
        return Err(InstanceFailure::Spawn(format!(
            "{what} {path_display} is not a regular file; {}",
            missing_fix(what)
        )));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(InstanceFailure::Spawn(format!(
            "{what} {path_display} is not executable; run `chmod +x {path_display}`"
        )));
    }
    Ok(())
}

fn missing_fix(what: &str) -> &'static str {
    if what == "runtime wrapper" {
        "check the runtime wrapper path in the control plane configuration"
    } else {
        "add an executable file of that name to the function's code"
    }
}

/// Builds the instance's whole environment, since the platform's own variables (which may hold
/// secrets) are not passed through.
///
/// Order of precedence, lowest first: `PATH` and `HOME` from the platform, the function's `env`,
/// then the variables the platform defines for every instance. The function cannot override
/// those, because the instance would then listen on the wrong port or misreport itself.
pub(super) fn build_env(
    request: &StartRequest,
    entrypoint: &Entrypoint,
    addr: SocketAddr,
) -> BTreeMap<OsString, OsString> {
    let spec = &request.function;
    let mut env = BTreeMap::new();
    for inherited in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(inherited) {
            env.insert(OsString::from(inherited), value);
        }
    }
    for (name, value) in &spec.env {
        env.insert(OsString::from(name), OsString::from(value));
    }

    let mut set = |name: &str, value: String| {
        env.insert(OsString::from(name), OsString::from(value));
    };
    for (name, value) in request.platform_env() {
        set(name, value);
    }
    if let Some(layers) = &request.layers {
        set(
            "FNGATE_LAYER_DIR",
            layers.dir.to_string_lossy().into_owned(),
        );
    }
    match &entrypoint.wrapped_bootstrap {
        Some(bootstrap) => {
            set("FNGATE_INVOKE_LISTEN", addr.to_string());
            // Without this the wrapper gives up on a bootstrap's initialisation after its own
            // default, which may be shorter than the function's start timeout.
            set("FNGATE_INIT_TIMEOUT_MS", spec.start_timeout_ms.to_string());
            env.insert(
                OsString::from("FNGATE_BOOTSTRAP"),
                bootstrap.clone().into_os_string(),
            );
        }
        None => {
            set("PORT", addr.port().to_string());
            // The operator's bind address, so the server need not listen on every interface.
            set("FNGATE_INSTANCE_IP", addr.ip().to_string());
        }
    }
    env
}

/// Returns `<function_dir>/<namespace>/<function>/logs/<instance_id>.log`.
///
/// Rejects a namespace or function name that is not a single plain path component, so that a
/// name such as `..` cannot place the log outside the function directory.
pub(super) fn log_path(
    function_dir: &Path,
    spec: &FunctionSpec,
    instance_id: u64,
) -> Result<PathBuf, InstanceFailure> {
    for (what, name) in [("namespace", &spec.namespace), ("function", &spec.name)] {
        let mut components = Path::new(name).components();
        let plain = matches!(components.next(), Some(Component::Normal(_)))
            && components.next().is_none()
            && !name.contains('/');
        if !plain {
            return Err(InstanceFailure::Spawn(format!(
                "invalid {what} name {name:?} for a log path: it must be one path component, \
                 without `/`, `.` or `..`"
            )));
        }
    }
    Ok(function_dir
        .join(&spec.namespace)
        .join(&spec.name)
        .join("logs")
        .join(format!("{instance_id}.log")))
}
