//! Helpers shared by the kubesim integration tests.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use fngate_kubesim::{Cluster, ClusterConfig};
use futures_util::{Stream, StreamExt};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running cluster with its log directory and a client built from its kubeconfig.
pub struct Harness {
    pub cluster: Cluster,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

/// Starts a cluster from `configure(defaults)` and builds a kube-rs client from the
/// kubeconfig file it writes.
pub async fn start(configure: impl FnOnce(ClusterConfig) -> ClusterConfig) -> Harness {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let config = configure(ClusterConfig::new(dir.path().join("logs")));
    let cluster = Cluster::start(config).await.expect("start the cluster");
    let client = client_for(&cluster, &dir).await;
    Harness {
        cluster,
        client,
        dir,
    }
}

/// Builds a client from a kubeconfig the cluster writes into `dir`.
pub async fn client_for(cluster: &Cluster, dir: &tempfile::TempDir) -> Client {
    let path = dir.path().join(format!("kubeconfig-{}", fastrand_suffix()));
    cluster
        .write_kubeconfig(&path, "kubesim")
        .expect("write the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig back");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("load the kubeconfig");
    Client::try_from(config).expect("build the client")
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Awaits `future`, failing the test with `what` after `WAIT`.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Takes the next item of a stream, failing the test after `WAIT` or when the stream ends.
pub async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    within(what, stream.next())
        .await
        .unwrap_or_else(|| panic!("stream ended while waiting for {what}"))
}

/// Takes items until `accept` returns a value, failing the test after `WAIT`.
pub async fn next_matching<S, T>(
    stream: &mut S,
    what: &str,
    mut accept: impl FnMut(S::Item) -> Option<T>,
) -> T
where
    S: Stream + Unpin,
{
    within(what, async {
        loop {
            let item = stream
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended while waiting for {what}"));
            if let Some(value) = accept(item) {
                return value;
            }
        }
    })
    .await
}
