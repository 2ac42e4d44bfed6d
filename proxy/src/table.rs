//! The routing table: which functions exist, their settings and their pools. A new table is built
//! and swapped in whole whenever functions are added, changed or removed; requests read one
//! snapshot without locks. Instances change inside each function's [`Pool`], so an instance
//! coming or going does not rebuild the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderMap, HeaderValue};

use crate::headers::ScfHeaderValues;
use crate::metrics::FunctionMetrics;
use crate::pool::{AcquireError, Pool};

/// Invocation style of a function in the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    /// `POST /functions/{namespace}/{function}/invocations`, forwarded as `POST /event-invoke`.
    Event,
    /// Any request under `/web/{namespace}/{function}/`, forwarded with the prefix stripped.
    Web,
}

/// Settings the proxy applies to one function version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSettings {
    pub kind: FunctionKind,
    pub memory_mb: u32,
    /// Execution timeout, counted from the moment a slot was taken.
    pub timeout: Duration,
    /// How long a request may wait for a slot.
    pub queue_budget: Duration,
    pub queue_limit: usize,
    pub max_body_bytes: u64,
    pub concurrency: u32,
}

/// Namespace, name and qualifier of a function version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
    pub qualifier: String,
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.qualifier)
    }
}

/// A routable function version: its settings and its pool of instances.
#[derive(Debug)]
pub struct Function {
    pub key: FunctionKey,
    settings: ArcSwap<FunctionSettings>,
    pub pool: Arc<Pool>,
    /// Registered on the first request rather than when the table is built, because registering
    /// costs about ten label-hashed lookups in the recorder, which dominated building tables of
    /// many functions. A function's series therefore appear in `/metrics` once it was invoked.
    metrics: OnceLock<FunctionMetrics>,
    /// Built on the first request, and again when the memory or timeout changed.
    scf_headers: ArcSwapOption<ScfHeaderValues>,
}

impl Function {
    fn new(key: FunctionKey, settings: FunctionSettings) -> Self {
        Function {
            pool: Pool::new(settings.queue_limit),
            settings: ArcSwap::from_pointee(settings),
            metrics: OnceLock::new(),
            scf_headers: ArcSwapOption::empty(),
            key,
        }
    }

    pub fn settings(&self) -> Arc<FunctionSettings> {
        self.settings.load_full()
    }

    pub(crate) fn metrics(&self) -> &FunctionMetrics {
        self.metrics.get_or_init(|| FunctionMetrics::new(&self.key))
    }

    /// Sets the `X-Scf-*` headers of a request to this function, with values that match
    /// `settings`, the snapshot the request runs with.
    pub(crate) fn set_scf_headers(
        &self,
        headers: &mut HeaderMap,
        request_id: &HeaderValue,
        settings: &FunctionSettings,
    ) {
        let cached = self.scf_headers.load();
        if let Some(values) = cached.as_deref().filter(|v| v.matches(settings)) {
            crate::headers::set_scf_headers(headers, request_id, values);
            return;
        }
        drop(cached);
        let values = Arc::new(ScfHeaderValues::new(&self.key, settings));
        crate::headers::set_scf_headers(headers, request_id, &values);
        self.scf_headers.store(Some(values));
    }

    /// Applies new settings to the function and its pool. Unchanged settings are not stored
    /// again, because every `ArcSwap` store waits for concurrent readers, which makes a table
    /// rebuild of many unchanged functions slow.
    fn update_settings(&self, settings: FunctionSettings) {
        let current = self.settings.load();
        if **current == settings {
            return;
        }
        let capacity_changed = current.concurrency != settings.concurrency;
        drop(current);
        self.pool.set_queue_limit(settings.queue_limit);
        if capacity_changed {
            self.pool.set_capacity(settings.concurrency);
        }
        self.settings.store(Arc::new(settings));
    }
}

/// Reason a route lookup found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("namespace {namespace:?} not found")]
    NamespaceNotFound { namespace: String },
    #[error("function {name:?} not found in namespace {namespace:?}")]
    FunctionNotFound { namespace: String, name: String },
    #[error("qualifier {qualifier:?} not found for function {namespace}/{name}")]
    QualifierNotFound {
        namespace: String,
        name: String,
        qualifier: String,
    },
}

/// Map keyed by a namespace, function name or qualifier. foldhash hashes these short keys about
/// four times faster than std's SipHash, which matters on every request (three lookups) and when
/// a table of many functions is built. Its seed is random per process, which foldhash describes
/// as minimally resistant to collision attacks on names that tenants choose.
type NameMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

type Qualifiers = NameMap<Arc<Function>>;

/// One immutable snapshot: namespace → function name → qualifier → function.
#[derive(Debug, Default, Clone)]
pub struct Table {
    namespaces: NameMap<NameMap<Qualifiers>>,
}

impl Table {
    pub fn function_count(&self) -> usize {
        self.namespaces
            .values()
            .flat_map(|functions| functions.values())
            .map(|qualifiers| qualifiers.len())
            .sum()
    }

    fn get(&self, namespace: &str, name: &str, qualifier: &str) -> Option<&Arc<Function>> {
        self.namespaces.get(namespace)?.get(name)?.get(qualifier)
    }

    /// Adds or replaces a function version. Clones a key part only when it creates an entry.
    fn insert(&mut self, function: Arc<Function>) {
        let key = &function.key;
        let functions = match self.namespaces.get_mut(key.namespace.as_str()) {
            Some(functions) => functions,
            None => self.namespaces.entry(key.namespace.clone()).or_default(),
        };
        let qualifiers = match functions.get_mut(key.name.as_str()) {
            Some(qualifiers) => qualifiers,
            None => functions.entry(key.name.clone()).or_default(),
        };
        qualifiers.insert(function.key.qualifier.clone(), function);
    }

    /// Every function version in the snapshot.
    pub fn functions(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.namespaces
            .values()
            .flat_map(|functions| functions.values())
            .flat_map(|qualifiers| qualifiers.values())
    }
}

/// The routing table behind an `ArcSwap`, with the operations the control plane uses to change
/// it.
#[derive(Debug, Default)]
pub struct Router {
    table: ArcSwap<Table>,
    synced: AtomicBool,
    /// Route sources besides the control plane (pod watchers in k8s mode); the table counts as
    /// synced only once each has listed its instances.
    sources: parking_lot::Mutex<Vec<Arc<RouteSource>>>,
}

/// A source of instances that keeps part of the table current, such as a pod watcher.
#[derive(Debug)]
pub struct RouteSource {
    name: String,
    synced: AtomicBool,
    last_sync: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl RouteSource {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records a successful sync: a full list, or a watch event that shows the stream is
    /// current. The first one lets the table count as synced.
    pub fn mark_synced(&self) {
        *self.last_sync.lock() = Some(std::time::Instant::now());
        self.synced.store(true, SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(SeqCst)
    }

    /// Counts a watch event as a sync once the first list has finished.
    pub(crate) fn mark_synced_if_listed(&self) {
        if self.is_synced() {
            self.mark_synced();
        }
    }

    /// Time since the last successful sync; `None` before the first.
    pub fn sync_age(&self) -> Option<Duration> {
        self.last_sync.lock().map(|at| at.elapsed())
    }
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Current snapshot.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Marks the table as filled from its source, which `/readyz` reports.
    pub fn mark_synced(&self) {
        self.synced.store(true, SeqCst);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(SeqCst) && self.sources.lock().iter().all(|s| s.is_synced())
    }

    /// Registers a route source; the table is not synced until the source marks itself synced.
    pub fn add_source(&self, name: impl Into<String>) -> Arc<RouteSource> {
        let source = Arc::new(RouteSource {
            name: name.into(),
            synced: AtomicBool::new(false),
            last_sync: parking_lot::Mutex::new(None),
        });
        self.sources.lock().push(Arc::clone(&source));
        source
    }

    /// Unregisters a route source, for example when its namespace is unbound.
    pub fn remove_source(&self, source: &Arc<RouteSource>) {
        self.sources.lock().retain(|s| !Arc::ptr_eq(s, source));
    }

    /// The registered route sources.
    pub fn sources(&self) -> Vec<Arc<RouteSource>> {
        self.sources.lock().clone()
    }

    /// Finds a function version.
    pub fn lookup(
        &self,
        namespace: &str,
        name: &str,
        qualifier: &str,
    ) -> Result<Arc<Function>, LookupError> {
        let table = self.table.load();
        let Some(functions) = table.namespaces.get(namespace) else {
            return Err(LookupError::NamespaceNotFound {
                namespace: namespace.to_owned(),
            });
        };
        let Some(qualifiers) = functions.get(name) else {
            return Err(LookupError::FunctionNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        };
        match qualifiers.get(qualifier) {
            Some(function) => Ok(Arc::clone(function)),
            None => Err(LookupError::QualifierNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                qualifier: qualifier.to_owned(),
            }),
        }
    }

    /// Adds an empty namespace, so that its functions' absence reads as "function not found".
    pub fn add_namespace(&self, namespace: &str) {
        self.table.rcu(|current| {
            let mut next = Table::clone(current);
            next.namespaces.entry(namespace.to_owned()).or_default();
            next
        });
    }

    /// Removes a namespace and fails the requests waiting on its functions.
    pub fn remove_namespace(&self, namespace: &str) {
        let mut removed = None;
        self.table.rcu(|current| {
            let mut next = Table::clone(current);
            removed = next.namespaces.remove(namespace);
            next
        });
        for function in removed
            .iter()
            .flat_map(|f| f.values())
            .flat_map(|q| q.values())
        {
            function.pool.fail_waiters(&AcquireError::Removed);
            crate::metrics::zero_pool_gauges(&function.key);
        }
    }

    /// Adds a function version or changes its settings. The pool, and with it every in-flight
    /// count and waiter, carries over from the previous version of the entry.
    ///
    /// NOTE: adding a function copies the whole table, as `remove` does: about 80 ms each at
    /// 100k functions (the `route` bench), so deploying many functions one by one is quadratic.
    pub fn upsert(&self, key: FunctionKey, settings: FunctionSettings) -> Arc<Function> {
        if let Ok(existing) = self.lookup(&key.namespace, &key.name, &key.qualifier) {
            existing.update_settings(settings);
            return existing;
        }
        let function = Arc::new(Function::new(key, settings));
        self.table.rcu(|current| {
            let mut next = Table::clone(current);
            next.insert(Arc::clone(&function));
            next
        });
        function
    }

    /// Removes a function version and fails the requests waiting on it.
    pub fn remove(&self, key: &FunctionKey) -> Option<Arc<Function>> {
        let mut removed = None;
        self.table.rcu(|current| {
            let mut next = Table::clone(current);
            removed = None;
            if let Some(functions) = next.namespaces.get_mut(&key.namespace) {
                if let Some(qualifiers) = functions.get_mut(&key.name) {
                    removed = qualifiers.remove(&key.qualifier);
                    if qualifiers.is_empty() {
                        functions.remove(&key.name);
                    }
                }
            }
            next
        });
        if let Some(function) = &removed {
            function.pool.fail_waiters(&AcquireError::Removed);
            crate::metrics::zero_pool_gauges(&function.key);
        }
        removed
    }

    /// Replaces the whole table in one swap, keeping the pools of functions that stay and
    /// applying their new settings as [`Router::upsert`] does. For sources that rebuild their
    /// full view at once.
    pub fn replace(&self, entries: Vec<(FunctionKey, FunctionSettings)>) {
        let current = self.table.load_full();
        let mut next = Table::default();
        for (key, settings) in entries {
            let function = match current.get(&key.namespace, &key.name, &key.qualifier) {
                Some(existing) => {
                    existing.update_settings(settings);
                    Arc::clone(existing)
                }
                None => Arc::new(Function::new(key, settings)),
            };
            next.insert(function);
        }
        self.table.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::instance::Instance;

    fn key(name: &str) -> FunctionKey {
        FunctionKey {
            namespace: "default".into(),
            name: name.into(),
            qualifier: "$LATEST".into(),
        }
    }

    fn settings(concurrency: u32, memory_mb: u32) -> FunctionSettings {
        FunctionSettings {
            kind: FunctionKind::Web,
            memory_mb,
            timeout: Duration::from_secs(3),
            queue_budget: Duration::from_secs(1),
            queue_limit: 10,
            max_body_bytes: 1024,
            concurrency,
        }
    }

    #[test]
    fn replace_keeps_pool_and_applies_settings() {
        let router = Router::new();
        router.replace(vec![(key("a"), settings(2, 128))]);
        let before = router.lookup("default", "a", "$LATEST").unwrap();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let instance = Arc::new(Instance::new(1, addr, 2, Duration::ZERO));
        before.pool.add_instance(Arc::clone(&instance));

        router.replace(vec![
            (key("a"), settings(5, 256)),
            (key("b"), settings(1, 128)),
        ]);

        let after = router.lookup("default", "a", "$LATEST").unwrap();
        assert!(Arc::ptr_eq(&before, &after), "the function was rebuilt");
        assert_eq!(after.settings().memory_mb, 256);
        assert_eq!(
            instance.capacity(),
            5,
            "the new concurrency did not reach the pool"
        );
        assert!(router.lookup("default", "b", "$LATEST").is_ok());
        assert_eq!(router.table().function_count(), 2);
    }

    #[test]
    fn replace_drops_missing_functions() {
        let router = Router::new();
        router.replace(vec![
            (key("a"), settings(1, 128)),
            (key("b"), settings(1, 128)),
        ]);
        router.replace(vec![(key("b"), settings(1, 128))]);
        assert!(matches!(
            router.lookup("default", "a", "$LATEST"),
            Err(LookupError::FunctionNotFound { .. })
        ));
        assert_eq!(router.table().function_count(), 1);
    }

    #[test]
    fn scf_headers_follow_settings() {
        let router = Router::new();
        let function = router.upsert(key("a"), settings(1, 128));
        let request_id = HeaderValue::from_static("req-1");
        let mut first = HeaderMap::new();
        function.set_scf_headers(&mut first, &request_id, &function.settings());
        assert_eq!(first.get("x-scf-memory").unwrap(), "128");
        assert_eq!(first.get("x-scf-name").unwrap(), "a");

        router.upsert(key("a"), settings(1, 512));
        let mut second = HeaderMap::new();
        function.set_scf_headers(&mut second, &request_id, &function.settings());
        assert_eq!(second.get("x-scf-memory").unwrap(), "512");
        assert_eq!(second.get("x-scf-request-id").unwrap(), "req-1");
    }
}
