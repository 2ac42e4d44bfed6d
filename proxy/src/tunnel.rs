//! Pass-through of an upgraded connection (a WebSocket, for example) between client and instance.
//! The request keeps its slot until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::metrics::Outcome;
use crate::pool::Permit;
use crate::Invocation;

/// Copies bytes both ways until one side closes, then returns the slot.
pub(crate) async fn run(
    client: OnUpgrade,
    upstream: OnUpgrade,
    permit: Permit,
    invocation: Invocation,
) {
    let instance = permit.instance().id();
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(instance, %error, "protocol upgrade failed");
            invocation.finish(Outcome::UpstreamFailed);
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let outcome = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(_) => Outcome::Success,
        Err(error) => {
            tracing::debug!(instance, %error, "upgraded connection ended with an error");
            Outcome::ClientGone
        }
    };
    drop(permit);
    invocation.finish(outcome);
}
