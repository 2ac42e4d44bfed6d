//! A wrapper killed with SIGKILL takes its bootstrap along. The wrapper runs in a child
//! process, a second run of this test binary, because the test cannot SIGKILL a part of
//! its own process.

mod support;

use std::path::PathBuf;
use std::process::Stdio;

use fngate_runtime::{run_with, WrapperConfig};
use support::{
    loopback_port_0, make_fifo, read_fifo, wait_process_ended, write_executable, PRELUDE,
    TEST_LIMIT,
};

/// Directory with the bootstrap for [`wrapper_in_child_process`], set by the parent test.
const CHILD_DIR_ENV: &str = "FNGATE_TEST_WRAPPER_CHILD_DIR";

/// Runs a wrapper until the process is killed. Only `killed_wrapper_kills_bootstrap` runs it,
/// in a child process with [`CHILD_DIR_ENV`] set.
#[tokio::test]
#[ignore = "the child process of killed_wrapper_kills_bootstrap"]
async fn wrapper_in_child_process() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        eprintln!(
            "{CHILD_DIR_ENV} is not set; nothing to do outside killed_wrapper_kills_bootstrap"
        );
        return;
    };
    let mut config = WrapperConfig::new(loopback_port_0(), PathBuf::from(dir).join("bootstrap"));
    config.init_timeout = TEST_LIMIT;
    let exit = run_with(config, std::future::pending(), None).await;
    panic!("the wrapper exited before it was killed: {}", exit.reason);
}

/// Returns the parent process id of `pid` from `/proc/<pid>/stat`.
fn parent_pid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/stat: {error}"));
    // The fields after the parenthesised command name are the state, then the parent id.
    let (_, rest) = stat.rsplit_once(')').expect("stat has a command name");
    rest.split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("no parent id in {stat:?}"))
}

#[tokio::test]
async fn killed_wrapper_kills_bootstrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_fifo = dir.path().join("bootstrap_pid");
    make_fifo(&pid_fifo);
    write_executable(
        dir.path(),
        "bootstrap",
        &format!("{PRELUDE}ready\necho $$ > \"$dir/bootstrap_pid\"\nexec sleep 600\n"),
    );

    let test_binary = std::env::current_exe().expect("path of this test binary");
    let mut wrapper = tokio::process::Command::new(test_binary)
        .args([
            "wrapper_in_child_process",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the wrapper's child process");
    let wrapper_pid = wrapper.id().expect("the child process has a pid");

    let bootstrap_pid: u32 = read_fifo(&pid_fifo)
        .await
        .parse()
        .expect("the FIFO contains a pid");
    assert_eq!(
        parent_pid(bootstrap_pid),
        wrapper_pid,
        "the bootstrap is not a child of the wrapper process"
    );

    wrapper.kill().await.expect("SIGKILL the wrapper");
    let ended = wait_process_ended(bootstrap_pid).await;
    if !ended {
        // SAFETY: kill(2) reads no memory of this process, and `bootstrap_pid` is the `sleep`
        // that this test's bootstrap exec'd, still running.
        unsafe { libc::kill(bootstrap_pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(
        ended,
        "bootstrap {bootstrap_pid} still runs after its wrapper was killed"
    );
}
