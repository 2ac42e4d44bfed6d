//! Prometheus metrics of the data plane. Handles are created once per function, so recording on
//! the request path is an atomic update and no label lookup. Gauges that mirror pool state
//! (in-flight, queue depth, routable instances) are read from the pools when `/metrics` is
//! scraped, which keeps them off the request path entirely.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::table::{FunctionKey, Router};

pub const INVOCATIONS: &str = "fngate_invocations_total";
pub const INVOCATION_DURATION: &str = "fngate_invocation_duration_seconds";
pub const QUEUE_WAIT: &str = "fngate_queue_wait_seconds";
pub const COLD_STARTS: &str = "fngate_cold_starts_total";
pub const QUEUE_DEPTH: &str = "fngate_queue_depth";
pub const IN_FLIGHT: &str = "fngate_in_flight_requests";
pub const ROUTABLE_INSTANCES: &str = "fngate_routable_instances";
pub const UPSTREAM_RETRIES: &str = "fngate_upstream_retries_total";
pub const SOURCE_SYNC_AGE: &str = "fngate_route_source_sync_age_seconds";
pub const KUBE_WATCH_ERRORS: &str = "fngate_kube_watch_errors_total";
pub const KUBE_ROUTE_BATCHES: &str = "fngate_kube_route_batches_total";

/// Ending of an invocation, as the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    UserError,
    BadRequest,
    QueueFull,
    NoInstance,
    UpstreamFailed,
    Timeout,
    ClientGone,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::UserError,
        Outcome::BadRequest,
        Outcome::QueueFull,
        Outcome::NoInstance,
        Outcome::UpstreamFailed,
        Outcome::Timeout,
        Outcome::ClientGone,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::UserError => "user_error",
            Outcome::BadRequest => "bad_request",
            Outcome::QueueFull => "queue_full",
            Outcome::NoInstance => "no_instance",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Timeout => "timeout",
            Outcome::ClientGone => "client_gone",
        }
    }
}

/// Metric handles of one function.
#[derive(Debug)]
pub(crate) struct FunctionMetrics {
    invocations: [Counter; Outcome::ALL.len()],
    duration: Histogram,
    queue_wait: Histogram,
    cold_starts: Counter,
    retries: Counter,
}

impl FunctionMetrics {
    pub(crate) fn new(key: &FunctionKey) -> Self {
        let labels = [
            ("namespace", key.namespace.clone()),
            ("function", key.name.clone()),
        ];
        let invocations = Outcome::ALL.map(|outcome| {
            counter!(INVOCATIONS, "namespace" => key.namespace.clone(), "function" => key.name.clone(), "outcome" => outcome.label())
        });
        FunctionMetrics {
            invocations,
            duration: histogram!(INVOCATION_DURATION, &labels),
            queue_wait: histogram!(QUEUE_WAIT, &labels),
            cold_starts: counter!(COLD_STARTS, &labels),
            retries: counter!(UPSTREAM_RETRIES, &labels),
        }
    }

    pub(crate) fn record(&self, outcome: Outcome, duration: Duration) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.invocations[index].increment(1);
        self.duration.record(duration.as_secs_f64());
    }

    pub(crate) fn record_queue_wait(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
    }

    pub(crate) fn record_cold_start(&self) {
        self.cold_starts.increment(1);
    }

    pub(crate) fn record_retry(&self) {
        self.retries.increment(1);
    }
}

/// Installs the process-wide Prometheus recorder once and returns its handle. Later calls return
/// the same handle.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    handle
                }
                // Another recorder is installed (in tests); render from a detached one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Zeroes the pool gauges of a removed function, so a scrape does not report stale load.
pub(crate) fn zero_pool_gauges(key: &FunctionKey) {
    let labels = [
        ("namespace", key.namespace.clone()),
        ("function", key.name.clone()),
    ];
    for name in [QUEUE_DEPTH, IN_FLIGHT, ROUTABLE_INSTANCES] {
        gauge!(name, &labels).set(0.0);
    }
}

/// Registers the `# HELP` text of every metric fngate records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(INVOCATIONS, "Invocations by function and outcome.");
    describe_histogram!(
        INVOCATION_DURATION,
        Unit::Seconds,
        "Time from routing to the end of the response."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time requests spent waiting for a slot."
    );
    describe_counter!(
        COLD_STARTS,
        "Requests that waited for a new instance and were its first."
    );
    describe_gauge!(QUEUE_DEPTH, "Requests waiting for a slot.");
    describe_gauge!(IN_FLIGHT, "Requests holding a slot.");
    describe_gauge!(ROUTABLE_INSTANCES, "Instances taking requests.");
    describe_counter!(
        UPSTREAM_RETRIES,
        "Requests moved to another instance because the first never received them."
    );
    describe_gauge!("fngate_instances", "Instances by state and proxy replica.");
    describe_counter!(
        "fngate_replica_control_plane_errors_total",
        "Failed calls of a proxy replica to the control plane."
    );
    describe_counter!("fngate_instance_starts_total", "Instance starts by result.");
    describe_histogram!(
        "fngate_instance_boot_seconds",
        Unit::Seconds,
        "Time from an instance's start to its port answering."
    );
    describe_counter!(
        "fngate_instance_exits_total",
        "Instances that exited without being asked to."
    );
    describe_gauge!(
        SOURCE_SYNC_AGE,
        Unit::Seconds,
        "Time since a route source (a pod watcher) last listed or received a watch event."
    );
    describe_counter!(
        KUBE_WATCH_ERRORS,
        "Errors of a pod watch stream; the watcher lists again after each."
    );
    describe_counter!(
        KUBE_ROUTE_BATCHES,
        "Batches of pod events applied to the routing pools, one pool swap per function each."
    );
}

/// Copies pool state into gauges just before a scrape.
pub fn refresh_pool_gauges(router: &Router) {
    for function in router.table().functions() {
        let key = &function.key;
        let labels = [
            ("namespace", key.namespace.clone()),
            ("function", key.name.clone()),
        ];
        let demand = function.pool.demand();
        gauge!(QUEUE_DEPTH, &labels).set(demand.queued as f64);
        gauge!(IN_FLIGHT, &labels).set(demand.in_flight as f64);
        gauge!(ROUTABLE_INSTANCES, &labels).set(function.pool.instances().len() as f64);
    }
    for source in router.sources() {
        // A source that never synced reports +Inf, so an alert on the age catches it too.
        let age = source
            .sync_age()
            .map_or(f64::INFINITY, |age| age.as_secs_f64());
        gauge!(SOURCE_SYNC_AGE, "source" => source.name().to_owned()).set(age);
    }
}
