//! The body of a web function's response as it streams back to the client. It owns the request's
//! slot and its upstream connection: the slot is returned however the stream ends (end of
//! stream, upstream error, execution timeout, or the client going away), and the connection goes
//! back to the instance's pool only when the response was read to the end.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::metrics::Outcome;
use crate::pool::Permit;
use crate::upstream::Sender;
use crate::Invocation;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response body sent to the client: a complete buffer, or a web function's stream.
pub type ProxyBody = http_body_util::Either<http_body_util::Full<Bytes>, WebBody>;

pin_project! {
    /// A streamed web response that holds its slot until it ends.
    pub struct WebBody {
        #[pin]
        inner: Incoming,
        deadline: Pin<Box<Sleep>>,
        timeout: Duration,
        permit: Option<Permit>,
        sender: Option<Sender>,
        invocation: Option<Invocation>,
    }

    impl PinnedDrop for WebBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.permit.is_none() {
                return;
            }
            // Dropped before the end: the client went away, or hyper stopped polling at a known
            // end of stream.
            if this.inner.is_end_stream() {
                finish(this.permit, this.sender, this.invocation, Outcome::Success);
            } else {
                this.sender.take();
                finish(this.permit, this.sender, this.invocation, Outcome::ClientGone);
            }
        }
    }
}

impl WebBody {
    pub(crate) fn new(
        inner: Incoming,
        deadline: Pin<Box<Sleep>>,
        timeout: Duration,
        permit: Permit,
        sender: Sender,
        invocation: Invocation,
    ) -> Self {
        WebBody {
            inner,
            deadline,
            timeout,
            permit: Some(permit),
            sender: Some(sender),
            invocation: Some(invocation),
        }
    }
}

/// Returns the connection to the pool (when given), releases the slot and records the outcome.
fn finish(
    permit: &mut Option<Permit>,
    sender: &mut Option<Sender>,
    invocation: &mut Option<Invocation>,
    outcome: Outcome,
) {
    if let (Some(permit), Some(sender)) = (permit.as_ref(), sender.take()) {
        permit.instance().conns.put(sender);
    }
    permit.take();
    if let Some(invocation) = invocation.take() {
        invocation.finish(outcome);
    }
}

/// The execution timeout passed while the response was streaming.
#[derive(Debug, thiserror::Error)]
#[error("execution exceeded the timeout of {}ms while streaming the response", .0.as_millis())]
pub struct StreamTimeout(Duration);

impl Body for WebBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if this.permit.is_none() {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.sender.take();
            finish(this.permit, this.sender, this.invocation, Outcome::Timeout);
            return Poll::Ready(Some(Err(Box::new(StreamTimeout(*this.timeout)))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                finish(this.permit, this.sender, this.invocation, Outcome::Success);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    finish(this.permit, this.sender, this.invocation, Outcome::Success);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.sender.take();
                finish(
                    this.permit,
                    this.sender,
                    this.invocation,
                    Outcome::UpstreamFailed,
                );
                Poll::Ready(Some(Err(Box::new(error))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.permit.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
