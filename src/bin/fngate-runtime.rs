//! `fngate-runtime`: the runtime wrapper binary, the entrypoint of a custom-runtime event
//! function instance. See the `fngate_runtime` crate for the environment it reads.
//!
//! In a runtime pod it is the entrypoint of every function: with `FNGATE_EXEC` set (web and
//! image-style event functions) it replaces itself with that program, a path relative to the
//! working directory (the code directory), and serves nothing itself.
//!
//! Logs go to stderr. `FNGATE_LOG` sets the filter in `tracing_subscriber::EnvFilter` syntax
//! (default `info`).

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    if let Err(message) = wait_for_code() {
        return exit_with(127, &message);
    }
    if let Some(program) = std::env::var_os("FNGATE_EXEC") {
        return exec(std::path::PathBuf::from(program));
    }
    let filter = EnvFilter::try_from_env("FNGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let config = match fngate_runtime::WrapperConfig::from_env() {
        Ok(config) => config,
        Err(error) => return exit_with(error.exit_code(), &error),
    };

    // One bootstrap needs little parallelism, and many wrappers share a node, so a single
    // thread is enough. The bootstrap is spawned on this main thread, which also matters
    // because its parent-death signal fires when the spawning thread exits.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return exit_with(1, &format!("failed to start the tokio runtime: {error}")),
    };
    let exit = runtime.block_on(fngate_runtime::run(config));
    exit_with(exit.code, &exit.reason)
}

/// Waits until `FNGATE_CODE_DIR` and `FNGATE_LAYER_DIR`, where set, exist, then makes the code
/// directory the working directory. In a runtime pod the node agent delivers them, possibly
/// after the pod started, so the wait is bounded by `FNGATE_CODE_WAIT_MS` (default 30 s).
fn wait_for_code() -> Result<(), String> {
    let code = std::env::var_os("FNGATE_CODE_DIR").map(std::path::PathBuf::from);
    let layers = std::env::var_os("FNGATE_LAYER_DIR").map(std::path::PathBuf::from);
    if code.is_none() && layers.is_none() {
        return Ok(());
    }
    let wait_ms: u64 = match std::env::var("FNGATE_CODE_WAIT_MS") {
        Ok(value) => value
            .trim()
            .parse()
            .map_err(|_| format!("invalid FNGATE_CODE_WAIT_MS {value:?}: expected milliseconds"))?,
        Err(_) => 30_000,
    };
    let started = std::time::Instant::now();
    for (what, dir) in [("code version", &code), ("layers", &layers)] {
        let Some(dir) = dir else { continue };
        let mut logged = false;
        while !dir.is_dir() {
            if started.elapsed() >= std::time::Duration::from_millis(wait_ms) {
                return Err(format!(
                    "{what} {} did not arrive on this node within {wait_ms} ms; check the \
                     fngate agent on this node and that it can fetch packages from the control \
                     plane",
                    dir.display()
                ));
            }
            if !logged {
                eprintln!("fngate-runtime: waiting for {what} {}", dir.display());
                logged = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    match code {
        Some(dir) => std::env::set_current_dir(&dir)
            .map_err(|error| format!("cannot enter the code directory {}: {error}", dir.display())),
        None => Ok(()),
    }
}

/// Replaces the process with `program`, or returns 127 with the reason it cannot run.
fn exec(program: std::path::PathBuf) -> ExitCode {
    use std::os::unix::process::CommandExt;

    let program = if program.is_absolute() {
        program
    } else {
        std::path::Path::new(".").join(program)
    };
    let error = std::process::Command::new(&program)
        .env_remove("FNGATE_EXEC")
        .exec();
    let cwd = std::env::current_dir().unwrap_or_default();
    exit_with(
        127,
        &format!(
            "cannot run {} in {}: {error}; check the code package has an executable file of that name",
            program.display(),
            cwd.display()
        ),
    )
}

/// Prints `fngate-runtime: <message>` to stderr and returns `code` as the exit status.
fn exit_with(code: i32, message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("fngate-runtime: {message}");
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
