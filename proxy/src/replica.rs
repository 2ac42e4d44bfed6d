//! A proxy replica in k8s mode (`fngate proxy`): a proxy of its own, outside the control
//! plane, that routes one function namespace's requests to the runtime pods labelled with its
//! name.
//!
//! The replica learns the namespace's functions from the control plane by long poll
//! ([`protocol::Routes`]) and its pods from a pod watcher of its own. It reports its demand and
//! each instance's load ([`protocol::Report`]) when a request queues and at least every
//! [`REPORT_INTERVAL`]. The control plane runs one scaler per function for it on those figures.
//! Its response carries the start failures that the replica's waiting requests fail with. The
//! report is also the replica's heartbeat: after [`EXPIRY`] without one, the control plane
//! deletes the replica's pods.

pub mod protocol;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use metrics::counter;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::instance::{Instance, InstanceState};
use crate::pod_watch::{PodWatcher, WatchConfig, RUNTIME_PORT};
use crate::pool::Pool;
use crate::table::{FunctionKey, Router};
use protocol::{FunctionReport, InstanceReport, Report, ReportResponse, Routes};

/// Maximum time between two reports; a replica reports sooner when a request queues.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Time without a report after which the control plane counts a replica as gone.
pub const EXPIRY: Duration = Duration::from_secs(5);
/// Maximum time the control plane keeps a routes poll open before it responds with unchanged
/// routes.
pub const ROUTES_POLL_LIMIT: Duration = Duration::from_secs(25);
/// Maximum wait for the response to a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Header with the replica's session: a random id per process, so that the control plane
/// notices two processes that use the same replica name.
pub const SESSION_HEADER: &str = "x-fngate-replica-session";
/// Delays between attempts to reach the control plane: the first, and the longest.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Settings of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Base URL of the control-plane API, `http://host:port`.
    pub control_plane: Uri,
    /// The function namespace the replica serves.
    pub namespace: String,
    /// The replica's name (its pod's name); runtime pods carry it in `fngate.io/replica`.
    pub replica: String,
    /// The k8s namespace of the runtime pods; `None` takes it from the control plane.
    pub kube_namespace: Option<String>,
}

/// Checks a replica name: a pod name, as the `fngate.io/replica` label value carries it.
pub fn check_name(replica: &str) -> Result<(), String> {
    let valid = !replica.is_empty()
        && replica.len() <= 63
        && replica
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && replica.as_bytes()[0].is_ascii_alphanumeric()
        && replica.as_bytes()[replica.len() - 1].is_ascii_alphanumeric();
    if valid && replica != crate::pod_watch::LOCAL_REPLICA {
        Ok(())
    } else {
        Err(format!(
            "{replica:?} is not a replica name: use the proxy pod's name (1 to 63 lowercase \
             letters, digits, '-' and '.', starting and ending with a letter or digit), other \
             than {:?}",
            crate::pod_watch::LOCAL_REPLICA
        ))
    }
}

impl ReplicaConfig {
    fn path(&self, tail: &str) -> String {
        format!(
            "/v1/namespaces/{}/replicas/{}/{tail}",
            self.namespace, self.replica
        )
    }
}

/// Checks a control-plane URL: `http://host:port`, with nothing after the authority.
pub fn parse_control_plane(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .trim_end_matches('/')
        .parse()
        .map_err(|error| format!("{url:?} is not a URL: {error}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// URLs are supported"));
    }
    if uri.authority().is_none() {
        return Err(format!("{url:?} names no host"));
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "{url:?}: give the API's base URL without a path, such as http://fngate:8082"
        ));
    }
    Ok(uri)
}

/// The running replica: its routes poll and its report loop.
pub struct Replica {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Replica {
    /// Starts polling routes into `router` and reporting its load. `router` counts as synced
    /// once the first routes arrived and the pod watcher listed the pods.
    pub fn spawn(config: ReplicaConfig, kube: kube::Client, router: Arc<Router>) -> Replica {
        let session = Arc::new(uuid::Uuid::new_v4().to_string());
        let demand = Arc::new(Notify::new());
        router.add_namespace(&config.namespace);
        let routes = tokio::spawn(poll_routes(RoutesState {
            config: config.clone(),
            session: Arc::clone(&session),
            kube,
            router: Arc::clone(&router),
            demand: Arc::clone(&demand),
            watcher: None,
            forwarders: HashMap::new(),
        }));
        let reports = tokio::spawn(report_loop(config, session, router, demand));
        Replica {
            tasks: vec![routes, reports],
        }
    }
}

struct RoutesState {
    config: ReplicaConfig,
    session: Arc<String>,
    kube: kube::Client,
    router: Arc<Router>,
    /// Signalled when a request queues on any function, so the report goes out at once.
    demand: Arc<Notify>,
    /// The pod watcher, with the owner whose pods it routes and its k8s namespace.
    watcher: Option<(String, String, PodWatcher)>,
    /// Per function, a task that passes its pool's demand signal on to `demand`.
    forwarders: HashMap<FunctionKey, (Arc<Pool>, JoinHandle<()>)>,
}

impl Drop for RoutesState {
    fn drop(&mut self) {
        for (_, task) in self.forwarders.values() {
            task.abort();
        }
    }
}

async fn poll_routes(mut state: RoutesState) {
    let mut version: Option<u64> = None;
    let mut delay = RETRY_MIN;
    let mut failing = false;
    let mut received = false;
    loop {
        let path = match version {
            Some(version) => state.config.path(&format!("routes?after={version}")),
            None => state.config.path("routes"),
        };
        let limit = ROUTES_POLL_LIMIT + REPORT_TIMEOUT;
        let session = Arc::clone(&state.session);
        let answer = call(
            &state.config.control_plane,
            &session,
            Method::GET,
            &path,
            None,
            limit,
        )
        .await;
        match answer.and_then(|body| decode::<Routes>(&body)) {
            Ok(routes) => {
                if failing {
                    tracing::info!("control plane reachable again; routes are current");
                    failing = false;
                }
                delay = RETRY_MIN;
                version = Some(routes.version);
                received = true;
                state.apply(routes);
            }
            Err(error) => {
                counter!("fngate_replica_control_plane_errors_total", "call" => "routes")
                    .increment(1);
                if !failing {
                    if received {
                        tracing::warn!(error = %error, "cannot fetch routes from the control \
                            plane; serving the last routes and retrying");
                    } else {
                        tracing::warn!(error = %error, "cannot fetch routes from the control \
                            plane; not ready until it responds, retrying");
                    }
                    failing = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

impl RoutesState {
    fn apply(&mut self, routes: Routes) {
        let namespace = &self.config.namespace;
        let entries = routes
            .functions
            .iter()
            .map(|entry| {
                let key = FunctionKey {
                    namespace: namespace.clone(),
                    name: entry.name.clone(),
                    qualifier: entry.qualifier.clone(),
                };
                (key, entry.settings())
            })
            .collect();
        self.router.replace(entries);
        // `replace` drops a namespace without functions; keep it, so a request for a missing
        // function reads "function not found".
        self.router.add_namespace(namespace);

        let kube_namespace = match &self.config.kube_namespace {
            Some(flag) if !routes.kube_namespace.is_empty() && *flag != routes.kube_namespace => {
                tracing::warn!(flag = %flag, binding = %routes.kube_namespace,
                    "--kube-namespace differs from the namespace's binding; watching the \
                     binding's k8s namespace, where the control plane starts this replica's pods");
                routes.kube_namespace.clone()
            }
            Some(flag) => flag.clone(),
            None => routes.kube_namespace.clone(),
        };
        let current = self
            .watcher
            .as_ref()
            .map(|(owner, namespace, _)| (owner, namespace));
        if current != Some((&routes.owner, &kube_namespace)) {
            if let Some((previous, _, watcher)) = self.watcher.take() {
                drop(watcher);
                // A new owner is a restarted control plane, which marks the previous one's
                // pods draining and deletes them after their function's timeout. Requests in
                // flight on them finish; new ones wait for new pods.
                if previous == routes.owner {
                    tracing::info!(k8s_namespace = %kube_namespace,
                        "the binding's k8s namespace changed; watching the new one");
                } else {
                    tracing::info!(previous = %previous, owner = %routes.owner,
                        "control plane restarted; routing only the pods it owns");
                }
                for function in self.router.table().functions() {
                    for instance in function.pool.instances().iter() {
                        function
                            .pool
                            .remove_instance(instance.id(), InstanceState::Draining);
                    }
                }
            }
            let watcher = PodWatcher::spawn(
                self.kube.clone(),
                WatchConfig {
                    namespace: kube_namespace.clone(),
                    resync_interval: Duration::from_millis(routes.resync_interval_ms.max(1_000)),
                    runtime_port: RUNTIME_PORT,
                    owner: Some(routes.owner.clone()),
                    replica: Some(self.config.replica.clone()),
                    function_namespace: Some(namespace.clone()),
                },
                Arc::clone(&self.router),
            );
            self.watcher = Some((routes.owner, kube_namespace, watcher));
        }

        let table = self.router.table();
        let mut live = HashMap::new();
        for function in table.functions() {
            live.insert(function.key.clone(), Arc::clone(&function.pool));
        }
        self.forwarders.retain(|key, (pool, task)| {
            let keep = live.get(key).is_some_and(|live| Arc::ptr_eq(live, pool));
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, pool) in live {
            pool.track_retired();
            self.forwarders.entry(key).or_insert_with(|| {
                let demand = Arc::clone(&self.demand);
                let watched = Arc::clone(&pool);
                let task = tokio::spawn(async move {
                    loop {
                        watched.demand_changed().await;
                        demand.notify_one();
                    }
                });
                (pool, task)
            });
        }
        self.router.mark_synced();
    }
}

/// Sends a report whenever a request queued and at least every [`REPORT_INTERVAL`], one at a
/// time, and applies each response.
async fn report_loop(
    config: ReplicaConfig,
    session: Arc<String>,
    router: Arc<Router>,
    demand: Arc<Notify>,
) {
    let mut tracker = ReportTracker::default();
    let path = config.path("report");
    let mut failing = false;
    loop {
        let report = tracker.report(&router, &config.namespace);
        let body = serde_json::to_vec(&report).expect("a report serializes");
        tracing::trace!(report = %String::from_utf8_lossy(&body), "reporting load");
        let response = call(
            &config.control_plane,
            &session,
            Method::POST,
            &path,
            Some(body),
            REPORT_TIMEOUT,
        )
        .await;
        match response.and_then(|body| decode::<ReportResponse>(&body)) {
            Ok(response) => {
                if failing {
                    tracing::info!("control plane reachable again; reports go through");
                    failing = false;
                }
                tracker.apply(&router, &config.namespace, response);
            }
            Err(error) => {
                counter!("fngate_replica_control_plane_errors_total", "call" => "report")
                    .increment(1);
                if !failing {
                    tracing::warn!(error = %error, "cannot report to the control plane; \
                        no new instances start for this replica until it responds");
                    failing = true;
                }
                // Requests that time out waiting then report why no instance started.
                let note = format!(
                    "this proxy replica cannot reach the control plane at {} ({error}), so no \
                     instance starts for it",
                    config.control_plane
                );
                for function in router.table().functions() {
                    function.pool.set_capacity_note(Some(note.clone()));
                }
            }
        }
        tokio::select! {
            () = demand.notified() => {}
            () = tokio::time::sleep(REPORT_INTERVAL) => {}
        }
    }
}

/// State the report loop keeps between reports.
///
/// NOTE: a pod this replica marks failed (unreachable) leaves its routing at once, but the
/// report does not say so. The control plane replaces it only once the pod's status shows the
/// failure or keep-warm expires.
#[derive(Default)]
struct ReportTracker {
    /// Per function, the instances taken out of routing that still had requests in flight at
    /// the last report. They are reported until those finish, so that draining waits for them.
    unrouted: HashMap<FunctionKey, HashMap<u64, Arc<Instance>>>,
    /// Per function, the id of the start failure applied last.
    failures: HashMap<FunctionKey, u64>,
}

impl ReportTracker {
    fn report(&mut self, router: &Router, namespace: &str) -> Report {
        let table = router.table();
        let mut functions = Vec::new();
        let mut unrouted_after = HashMap::new();
        for function in table.functions() {
            if function.key.namespace != namespace {
                continue;
            }
            let routed = function.pool.instances();
            // Instances taken out of routing: reported until their last request finished,
            // and once more at zero.
            let mut unrouted = self.unrouted.remove(&function.key).unwrap_or_default();
            for instance in function.pool.take_retired() {
                unrouted.insert(instance.id(), instance);
            }
            unrouted.retain(|id, _| !routed.iter().any(|instance| instance.id() == *id));

            let usage = |instance: &Instance, routed: bool| InstanceReport {
                id: instance.id(),
                in_flight: instance.in_flight(),
                idle_ms: u64::try_from(instance.idle_for().as_millis()).unwrap_or(u64::MAX),
                routed,
            };
            let mut instances: Vec<InstanceReport> = routed
                .iter()
                .map(|instance| usage(instance, true))
                .chain(unrouted.values().map(|instance| usage(instance, false)))
                .collect();
            instances.sort_by_key(|instance| instance.id);

            let demand = function.pool.demand();
            if demand.total() > 0 || !instances.is_empty() {
                functions.push(FunctionReport {
                    name: function.key.name.clone(),
                    qualifier: function.key.qualifier.clone(),
                    queued: demand.queued,
                    in_flight: demand.in_flight,
                    instances,
                });
            }
            unrouted.retain(|_, instance| instance.in_flight() > 0);
            if !unrouted.is_empty() {
                unrouted_after.insert(function.key.clone(), unrouted);
            }
        }
        self.unrouted = unrouted_after;
        Report { functions }
    }

    fn apply(&mut self, router: &Router, namespace: &str, response: ReportResponse) {
        let now = Instant::now();
        let mut noted = std::collections::HashSet::new();
        for notice in response.functions {
            let Ok(function) = router.lookup(namespace, &notice.name, &notice.qualifier) else {
                continue;
            };
            noted.insert(function.key.clone());
            function.pool.set_capacity_note(notice.capacity_note);
            let Some(failure) = notice.start_failure else {
                continue;
            };
            let retry_at = now + Duration::from_millis(failure.retry_in_ms);
            // The same failure comes back in responses for a while; each is applied once, so
            // requests that queued after it wait for the next start.
            if self.failures.get(&function.key) != Some(&failure.id) {
                self.failures.insert(function.key.clone(), failure.id);
                function.pool.record_start_failure(failure.reason, retry_at);
            }
        }
        for function in router.table().functions() {
            if !noted.contains(&function.key) {
                function.pool.set_capacity_note(None);
            }
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| format!("invalid response body: {error}"))
}

/// Sends one request to the control plane on a new connection and returns the body of a 2xx
/// response. Any other status becomes an error carrying the body's text.
async fn call(
    base: &Uri,
    session: &str,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    limit: Duration,
) -> Result<Bytes, String> {
    let authority = base.authority().expect("checked by parse_control_plane");
    let exchange = async {
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((authority.host(), port))
            .await
            .map_err(|error| format!("cannot connect to {authority}: {error}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|error| format!("HTTP handshake with {authority} failed: {error}"))?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, authority.as_str())
            .header(SESSION_HEADER, session);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| format!("cannot build the request: {error}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| format!("{method} {path} failed: {error}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("{method} {path}: failed to read the response: {error}"))?
            .to_bytes();
        if status == StatusCode::OK {
            Ok(bytes)
        } else {
            Err(format!(
                "{method} {path} returned {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ))
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{method} {path} timed out after {}ms",
                limit.as_millis()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{FunctionKind, FunctionSettings};

    fn router_with_function() -> (Router, Arc<crate::table::Function>) {
        let router = Router::new();
        let key = FunctionKey {
            namespace: "team".into(),
            name: "site".into(),
            qualifier: "$LATEST".into(),
        };
        let settings = FunctionSettings {
            kind: FunctionKind::Web,
            memory_mb: 128,
            timeout: Duration::from_secs(3),
            queue_budget: Duration::from_secs(1),
            queue_limit: 10,
            max_body_bytes: 1024,
            concurrency: 1,
        };
        let function = router.upsert(key, settings);
        function.pool.track_retired();
        (router, function)
    }

    fn reported_ids(report: &Report) -> Vec<(u64, u32, bool)> {
        report
            .functions
            .iter()
            .flat_map(|function| {
                function
                    .instances
                    .iter()
                    .map(|i| (i.id, i.in_flight, i.routed))
            })
            .collect()
    }

    /// An instance the replica stops routing stays in the reports while a request on it runs.
    /// It appears once more at zero and then no more. Demand follows the pool.
    #[tokio::test]
    async fn unrouted_instance_reported_until_idle() {
        let (router, function) = router_with_function();
        let addr = "127.0.0.1:9".parse().unwrap();
        let instance = Arc::new(Instance::new(7, addr, 1, Duration::ZERO));
        function.pool.add_instance(Arc::clone(&instance));
        let mut tracker = ReportTracker::default();
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(7, 0, true)]
        );

        let permit = function.pool.acquire(Duration::from_secs(1)).await.unwrap();
        let report = tracker.report(&router, "team");
        assert_eq!(report.functions[0].in_flight, 1);
        function.pool.remove_instance(7, InstanceState::Draining);
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(7, 1, false)]
        );
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(7, 1, false)]
        );

        drop(permit);
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(7, 0, false)]
        );
        let report = tracker.report(&router, "team");
        assert!(report.functions.is_empty(), "{report:?}");
    }

    /// An instance routed and taken out of routing between two reports, with a request still
    /// on it, is reported as no longer routed.
    #[tokio::test]
    async fn instance_removed_between_reports_reported() {
        let (router, function) = router_with_function();
        let mut tracker = ReportTracker::default();
        assert!(tracker.report(&router, "team").functions.is_empty());

        let addr = "127.0.0.1:9".parse().unwrap();
        function
            .pool
            .add_instance(Arc::new(Instance::new(9, addr, 1, Duration::ZERO)));
        let permit = function.pool.acquire(Duration::from_secs(1)).await.unwrap();
        function.pool.update_instances(&[], &[9]);
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(9, 1, false)]
        );
        drop(permit);
        assert_eq!(
            reported_ids(&tracker.report(&router, "team")),
            [(9, 0, false)]
        );
        assert!(tracker.report(&router, "team").functions.is_empty());
    }

    /// A start failure is applied once per back-off: repeated in later responses it fails no
    /// request that queued after it.
    #[tokio::test]
    async fn repeated_start_failure_applied_once() {
        let (router, function) = router_with_function();
        let mut tracker = ReportTracker::default();
        let response = |retry_in_ms| ReportResponse {
            functions: vec![protocol::FunctionNotice {
                name: "site".into(),
                qualifier: "$LATEST".into(),
                start_failure: Some(protocol::StartFailureNotice {
                    reason: "image not pullable".into(),
                    retry_in_ms,
                    id: 7,
                }),
                capacity_note: Some("quota in use".into()),
            }],
        };
        tracker.apply(&router, "team", response(60_000));
        assert_eq!(
            function.pool.capacity_note().as_deref(),
            Some("quota in use")
        );
        let first = function.pool.start_failure().expect("failure recorded");
        tracker.apply(&router, "team", response(59_000));
        let second = function.pool.start_failure().unwrap();
        assert_eq!(
            first.retry_at, second.retry_at,
            "the same failure applied twice"
        );

        tracker.apply(&router, "team", ReportResponse::default());
        assert_eq!(function.pool.capacity_note(), None);
    }

    #[test]
    fn control_plane_url_checked() {
        assert!(parse_control_plane("http://fngate:8082").is_ok());
        assert!(parse_control_plane("http://10.0.0.1:8082/").is_ok());
        for bad in [
            "fngate:8082",
            "https://fngate:8082",
            "http://fngate/api",
            "http://",
        ] {
            assert!(parse_control_plane(bad).is_err(), "{bad}");
        }
    }
}
