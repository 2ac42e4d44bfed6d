//! fngate's data plane: a sidecar-free L7 proxy that routes each invocation to an instance with a
//! free concurrency slot, and holds it in the function's wait queue while an instance starts.
//!
//! The proxy owns the request path: routing table ([`table`]), slots and wait queues ([`pool`]),
//! forwarding, errors and metrics. It does not start or stop instances; a route source (the
//! control plane's scaler in default mode) adds and removes them, and learns about demand from
//! [`pool::Pool::demand_changed`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod error;
mod event;
pub mod handler;
pub mod headers;
pub mod instance;
pub mod metrics;
pub mod pod_watch;
pub mod pool;
pub mod replica;
mod request_id;
pub mod route;
pub mod server;
pub mod table;
mod tunnel;
mod upstream;

use std::sync::Arc;

use tokio::time::Instant;

pub use handler::{Client, Proxy};
pub use instance::{Instance, InstanceState};
pub use pool::{AcquireError, Demand, Pool};
pub use table::{Function, FunctionKey, FunctionKind, FunctionSettings, Router};

/// Metrics record of one invocation. Finishing it records the outcome and duration; dropping it
/// unfinished records that the client went away.
pub(crate) struct Invocation {
    function: Arc<Function>,
    started: Instant,
    finished: bool,
}

impl Invocation {
    pub(crate) fn new(function: Arc<Function>) -> Self {
        Invocation {
            function,
            started: Instant::now(),
            finished: false,
        }
    }

    pub(crate) fn finish(mut self, outcome: metrics::Outcome) {
        self.finished = true;
        self.function
            .metrics()
            .record(outcome, self.started.elapsed());
    }
}

impl Drop for Invocation {
    fn drop(&mut self) {
        if !self.finished {
            self.function
                .metrics()
                .record(metrics::Outcome::ClientGone, self.started.elapsed());
        }
    }
}
