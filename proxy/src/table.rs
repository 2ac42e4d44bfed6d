//! The routing table: which functions exist, their settings and their pools. Requests read one
//! immutable snapshot without locks. A change builds a new snapshot and swaps it in whole, but the
//! snapshots share their unchanged parts. Each map is split into copy-on-write shards
//! ([`sharded`]), so adding or removing one function copies a few shards, not the table.
//! Instances change inside each function's [`Pool`], so an instance coming or going does not
//! change the table at all.

mod sharded;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderMap, HeaderValue};

use crate::headers::ScfHeaderValues;
use crate::metrics::FunctionMetrics;
use crate::pool::{AcquireError, Pool};
use sharded::ShardedMap;

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
    /// The number of the last [`Router::replace`] pass that listed this function, so that a
    /// pass finds the functions it did not list without a set of all its keys.
    replace_pass: AtomicU64,
    /// The key's namespace, name and qualifier in one allocation, so that a lookup compares the
    /// key with one memory access instead of three. `key` has the lengths of the parts.
    key_bytes: Box<[u8]>,
}

impl Function {
    fn new(key: FunctionKey, settings: FunctionSettings) -> Self {
        Function {
            pool: Pool::new(settings.queue_limit),
            settings: ArcSwap::from_pointee(settings),
            metrics: OnceLock::new(),
            scf_headers: ArcSwapOption::empty(),
            replace_pass: AtomicU64::new(0),
            key_bytes: [key.namespace.as_str(), &key.name, &key.qualifier]
                .concat()
                .into_bytes()
                .into_boxed_slice(),
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

/// One immutable snapshot: namespace → function name → qualifier → function version.
///
/// Cloning a table copies the pointers to its shards, and changing the clone copies only the
/// shards it changes ([`ShardedMap`]), so snapshots share every unchanged entry.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Every version, keyed by namespace, name and qualifier together, so that a request finds
    /// its function with one hash and one probe.
    versions: ShardedMap<Arc<Function>>,
    /// The namespaces with their function names. Only failed lookups and changes read it.
    namespaces: ShardedMap<Arc<Namespace>>,
}

/// The functions of one namespace.
#[derive(Debug, Clone)]
struct Namespace {
    name: String,
    /// function name → its versions.
    functions: ShardedMap<Versions>,
    version_count: usize,
}

/// The versions of one function, never empty. All share the namespace and the name. Most
/// functions have one version, which takes no allocation of its own.
#[derive(Debug, Clone)]
enum Versions {
    One(Arc<Function>),
    Many(Arc<[Arc<Function>]>),
}

impl Versions {
    fn as_slice(&self) -> &[Arc<Function>] {
        match self {
            Versions::One(function) => std::slice::from_ref(function),
            Versions::Many(functions) => functions,
        }
    }

    fn name(&self) -> &str {
        &self.as_slice()[0].key.name
    }

    fn with(&self, function: &Arc<Function>) -> Versions {
        let functions = self.as_slice().iter().chain(std::iter::once(function));
        Versions::Many(functions.cloned().collect())
    }

    /// Returns the versions without `function`, or `None` when it was the only one.
    fn without(&self, function: &Arc<Function>) -> Option<Versions> {
        let mut rest: Vec<Arc<Function>> = self
            .as_slice()
            .iter()
            .filter(|version| !Arc::ptr_eq(version, function))
            .cloned()
            .collect();
        match rest.len() {
            0 => None,
            1 => rest.pop().map(Versions::One),
            _ => Some(Versions::Many(rest.into())),
        }
    }
}

/// Hashes a function key as [`Table::versions`] does, from borrowed parts so that lookups do not
/// build a [`FunctionKey`].
fn version_hash(table: &Table, namespace: &str, name: &str, qualifier: &str) -> u64 {
    table.versions.hash(&(namespace, name, qualifier))
}

fn is_version(function: &Function, namespace: &str, name: &str, qualifier: &str) -> bool {
    let key = &function.key;
    if key.namespace.len() != namespace.len()
        || key.name.len() != name.len()
        || key.qualifier.len() != qualifier.len()
    {
        return false;
    }
    let (namespace_bytes, rest) = function.key_bytes.split_at(namespace.len());
    let (name_bytes, qualifier_bytes) = rest.split_at(name.len());
    name_bytes == name.as_bytes()
        && qualifier_bytes == qualifier.as_bytes()
        && namespace_bytes == namespace.as_bytes()
}

impl Namespace {
    fn new(name: String) -> Self {
        Namespace {
            name,
            functions: ShardedMap::default(),
            version_count: 0,
        }
    }

    fn all_versions(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.functions.values().flat_map(Versions::as_slice)
    }

    fn versions(&self, name: &str) -> Option<&Versions> {
        let hash = self.functions.hash(name);
        self.functions.get(hash, |versions| versions.name() == name)
    }

    /// Adds a version that the namespace does not contain yet.
    fn add_version(&mut self, function: &Arc<Function>) {
        let name = function.key.name.as_str();
        let hash = self.functions.hash(name);
        self.functions.change_or_insert(
            hash,
            |versions| versions.name() == name,
            |versions| *versions = versions.with(function),
            || Versions::One(Arc::clone(function)),
        );
        self.version_count += 1;
    }

    /// Removes a version that the namespace contains. The function name goes with its last
    /// version.
    fn remove_version(&mut self, function: &Arc<Function>) {
        let name = function.key.name.as_str();
        let hash = self.functions.hash(name);
        let matches = |versions: &Versions| versions.name() == name;
        let versions = self
            .functions
            .get_mut(hash, matches)
            .expect("every version's name is in `functions`");
        match versions.without(function) {
            Some(rest) => *versions = rest,
            None => {
                self.functions.remove(hash, matches);
            }
        }
        self.version_count -= 1;
    }
}

impl Table {
    pub fn function_count(&self) -> usize {
        self.versions.len()
    }

    fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        let hash = self.namespaces.hash(name);
        self.namespaces
            .get(hash, |namespace| namespace.name == name)
    }

    fn get(&self, namespace: &str, name: &str, qualifier: &str) -> Option<&Arc<Function>> {
        let hash = version_hash(self, namespace, name, qualifier);
        self.versions.get(hash, |function| {
            is_version(function, namespace, name, qualifier)
        })
    }

    /// Names the part of a key that is missing, for a key that [`Table::get`] did not find.
    #[cold]
    fn lookup_error(&self, namespace: &str, name: &str, qualifier: &str) -> LookupError {
        let Some(functions) = self.namespace(namespace) else {
            return LookupError::NamespaceNotFound {
                namespace: namespace.to_owned(),
            };
        };
        if functions.versions(name).is_some() {
            LookupError::QualifierNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                qualifier: qualifier.to_owned(),
            }
        } else {
            LookupError::FunctionNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
        }
    }

    /// Returns a namespace to change, adding it when it is absent. Copies the namespace, and its
    /// shard of this table, if another snapshot shares them.
    fn namespace_mut(&mut self, name: &str) -> &mut Namespace {
        let hash = self.namespaces.hash(name);
        let namespace = self.namespaces.change_or_insert(
            hash,
            |namespace| namespace.name == name,
            |_| {},
            || Arc::new(Namespace::new(name.to_owned())),
        );
        Arc::make_mut(namespace)
    }

    /// Adds a function version, and its namespace when that is absent. The table must not
    /// contain the version's key yet.
    fn insert(&mut self, function: Arc<Function>) {
        let key = &function.key;
        self.namespace_mut(&key.namespace).add_version(&function);
        let hash = version_hash(self, &key.namespace, &key.name, &key.qualifier);
        let (namespace, name, qualifier) = (&key.namespace, &key.name, &key.qualifier);
        let replaced = self
            .versions
            .insert(hash, Arc::clone(&function), |existing| {
                is_version(existing, namespace, name, qualifier)
            });
        assert!(replaced.is_none(), "{key} was inserted twice");
    }

    /// Removes a function version. Its namespace stays, even when it has no functions left.
    fn remove(&mut self, key: &FunctionKey) -> Option<Arc<Function>> {
        let hash = version_hash(self, &key.namespace, &key.name, &key.qualifier);
        let removed = self.versions.remove(hash, |function| {
            is_version(function, &key.namespace, &key.name, &key.qualifier)
        })?;
        self.namespace_mut(&key.namespace).remove_version(&removed);
        Some(removed)
    }

    /// Removes a namespace and all of its function versions.
    fn remove_namespace(&mut self, name: &str) -> Option<Arc<Namespace>> {
        let hash = self.namespaces.hash(name);
        let removed = self
            .namespaces
            .remove(hash, |namespace| namespace.name == name)?;
        for function in removed.all_versions() {
            let key = &function.key;
            let hash = version_hash(self, &key.namespace, &key.name, &key.qualifier);
            self.versions
                .remove(hash, |existing| Arc::ptr_eq(existing, function));
        }
        Some(removed)
    }

    /// Every function version in the snapshot.
    pub fn functions(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.versions.values()
    }

    /// Returns the table that `entries` describe, built from this one: functions that stay keep
    /// their `Arc<Function>` and take their new settings in place, and the shards that nothing
    /// changed in stay shared. Returns this table itself when nothing but settings changed.
    /// Pushes the functions that `entries` does not list to `removed`.
    ///
    /// `pass` must be a number that no earlier call on this table's functions used, because a
    /// function counts as listed when its `replace_pass` equals it.
    fn replaced(
        self: &Arc<Table>,
        entries: &[(FunctionKey, FunctionSettings)],
        pass: u64,
        removed: &mut Vec<Arc<Function>>,
    ) -> Arc<Table> {
        let mut next: Option<Table> = None;
        // Functions of this table that `entries` lists, each counted once.
        let mut listed = 0;
        for (key, settings) in entries {
            let table = next.as_ref().unwrap_or(self);
            match table.get(&key.namespace, &key.name, &key.qualifier) {
                Some(function) => {
                    function.update_settings(settings.clone());
                    if function.replace_pass.swap(pass, Relaxed) != pass {
                        listed += 1;
                    }
                }
                None => {
                    let function = Arc::new(Function::new(key.clone(), settings.clone()));
                    // A new function is not in this table, so it must not count as listed.
                    function.replace_pass.store(pass, Relaxed);
                    next.get_or_insert_with(|| Table::clone(self))
                        .insert(function);
                }
            }
        }

        if listed < self.function_count() {
            let next = next.get_or_insert_with(|| Table::clone(self));
            for function in self.functions() {
                if function.replace_pass.load(Relaxed) != pass {
                    next.remove(&function.key);
                    removed.push(Arc::clone(function));
                }
            }
        }

        // A namespace stays only if `entries` lists one of its functions, as in a table built
        // from `entries` alone.
        let empty: Vec<String> = next
            .as_ref()
            .unwrap_or(self)
            .namespaces
            .values()
            .filter(|namespace| namespace.version_count == 0)
            .map(|namespace| namespace.name.clone())
            .collect();
        if !empty.is_empty() {
            let next = next.get_or_insert_with(|| Table::clone(self));
            for name in &empty {
                next.remove_namespace(name);
            }
        }

        match next {
            Some(next) => Arc::new(next),
            None => Arc::clone(self),
        }
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
    /// The number of the last pass of [`Router::replace`]. The lock also keeps two `replace`
    /// calls from marking functions at the same time.
    replace_pass: parking_lot::Mutex<u64>,
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

    /// Returns the registered route sources.
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
        match table.get(namespace, name, qualifier) {
            Some(function) => Ok(Arc::clone(function)),
            None => Err(table.lookup_error(namespace, name, qualifier)),
        }
    }

    /// Adds an empty namespace, so that its functions' absence reads as "function not found".
    pub fn add_namespace(&self, namespace: &str) {
        self.table.rcu(|current| {
            if current.namespace(namespace).is_some() {
                return Arc::clone(current);
            }
            let mut next = Table::clone(current);
            next.namespace_mut(namespace);
            Arc::new(next)
        });
    }

    /// Removes a namespace and fails the requests waiting on its functions.
    pub fn remove_namespace(&self, namespace: &str) {
        let mut removed = None;
        self.table.rcu(|current| {
            removed = None;
            if current.namespace(namespace).is_none() {
                return Arc::clone(current);
            }
            let mut next = Table::clone(current);
            removed = next.remove_namespace(namespace);
            Arc::new(next)
        });
        for function in removed
            .iter()
            .flat_map(|namespace| namespace.all_versions())
        {
            function.pool.fail_waiters(&AcquireError::Removed);
            crate::metrics::zero_pool_gauges(&function.key);
        }
    }

    /// Adds a function version or changes its settings. The pool, and with it every in-flight
    /// count and waiter, carries over from the previous version of the entry. Adding a version
    /// copies a few shards of the table, not the whole table.
    pub fn upsert(&self, key: FunctionKey, settings: FunctionSettings) -> Arc<Function> {
        if let Ok(existing) = self.lookup(&key.namespace, &key.name, &key.qualifier) {
            existing.update_settings(settings);
            return existing;
        }
        let function = Arc::new(Function::new(key, settings));
        // Set when another writer added the same key after the lookup above. That entry stays, so
        // that no caller keeps a function whose pool the table no longer routes to.
        let mut added_meanwhile = None;
        self.table.rcu(|current| {
            let key = &function.key;
            added_meanwhile = current
                .get(&key.namespace, &key.name, &key.qualifier)
                .cloned();
            if added_meanwhile.is_some() {
                return Arc::clone(current);
            }
            let mut next = Table::clone(current);
            next.insert(Arc::clone(&function));
            Arc::new(next)
        });
        match added_meanwhile {
            Some(existing) => {
                existing.update_settings(FunctionSettings::clone(&function.settings()));
                existing
            }
            None => function,
        }
    }

    /// Removes a function version and fails the requests waiting on it. Its namespace stays,
    /// even when this was the namespace's last function.
    pub fn remove(&self, key: &FunctionKey) -> Option<Arc<Function>> {
        let mut removed = None;
        self.table.rcu(|current| {
            removed = None;
            if current
                .get(&key.namespace, &key.name, &key.qualifier)
                .is_none()
            {
                return Arc::clone(current);
            }
            let mut next = Table::clone(current);
            removed = next.remove(key);
            Arc::new(next)
        });
        if let Some(function) = &removed {
            function.pool.fail_waiters(&AcquireError::Removed);
            crate::metrics::zero_pool_gauges(&function.key);
        }
        removed
    }

    /// Makes the table contain exactly `entries`, in one swap. Functions that stay keep their
    /// pools and take their new settings, as with [`Router::upsert`]. Functions missing from
    /// `entries` are removed and their waiting requests failed, as with [`Router::remove`], and
    /// namespaces without an entry are removed. For sources that send their full view at once.
    ///
    /// Each entry costs a lookup in the current table, but only the shards that gain or lose a
    /// function are copied, and an unchanged set keeps the current snapshot.
    ///
    /// NOTE: a change by another writer during the pass makes it start over, so a steady stream
    /// of `upsert` calls can delay a `replace` of a large table.
    pub fn replace(&self, entries: Vec<(FunctionKey, FunctionSettings)>) {
        let mut last_pass = self.replace_pass.lock();
        let mut removed = Vec::new();
        self.table.rcu(|current| {
            *last_pass += 1;
            removed.clear();
            current.replaced(&entries, *last_pass, &mut removed)
        });
        drop(last_pass);
        for function in &removed {
            function.pool.fail_waiters(&AcquireError::Removed);
            crate::metrics::zero_pool_gauges(&function.key);
        }
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

    fn versioned(namespace: &str, name: &str, qualifier: &str) -> FunctionKey {
        FunctionKey {
            namespace: namespace.into(),
            name: name.into(),
            qualifier: qualifier.into(),
        }
    }

    /// Starts a request that waits in `function`'s queue, which has no instances, and returns
    /// once it is queued.
    async fn queue_waiter(
        function: &Arc<Function>,
    ) -> tokio::task::JoinHandle<Result<(), AcquireError>> {
        let pool = Arc::clone(&function.pool);
        let waiter =
            tokio::spawn(async move { pool.acquire(Duration::from_secs(30)).await.map(|_| ()) });
        for _ in 0..1_000 {
            if function.pool.demand().queued == 1 {
                return waiter;
            }
            tokio::task::yield_now().await;
        }
        panic!("the request did not queue");
    }

    #[test]
    fn lookup_errors_name_the_missing_part() {
        let router = Router::new();
        router.upsert(key("a"), settings(1, 128));

        assert_eq!(
            router.lookup("other", "a", "$LATEST").unwrap_err(),
            LookupError::NamespaceNotFound {
                namespace: "other".into()
            }
        );
        assert_eq!(
            router.lookup("default", "b", "$LATEST").unwrap_err(),
            LookupError::FunctionNotFound {
                namespace: "default".into(),
                name: "b".into()
            }
        );
        assert_eq!(
            router.lookup("default", "a", "1").unwrap_err(),
            LookupError::QualifierNotFound {
                namespace: "default".into(),
                name: "a".into(),
                qualifier: "1".into()
            }
        );
        assert!(router.lookup("default", "a", "$LATEST").is_ok());
    }

    #[test]
    fn upsert_into_new_namespace_adds_it() {
        let router = Router::new();
        router.upsert(versioned("team", "a", "$LATEST"), settings(1, 128));

        assert!(router.lookup("team", "a", "$LATEST").is_ok());
        assert!(matches!(
            router.lookup("team", "b", "$LATEST"),
            Err(LookupError::FunctionNotFound { .. })
        ));
        assert!(matches!(
            router.lookup("default", "a", "$LATEST"),
            Err(LookupError::NamespaceNotFound { .. })
        ));
    }

    #[test]
    fn upsert_of_existing_keeps_function() {
        let router = Router::new();
        let first = router.upsert(key("a"), settings(1, 128));
        let table = router.table();

        let second = router.upsert(key("a"), settings(3, 256));

        assert!(Arc::ptr_eq(&first, &second), "the function was rebuilt");
        assert!(
            Arc::ptr_eq(&table, &router.table()),
            "the table was swapped"
        );
        assert_eq!(second.settings().concurrency, 3);
    }

    #[test]
    fn remove_last_version_keeps_namespace() {
        let router = Router::new();
        router.upsert(versioned("default", "a", "$LATEST"), settings(1, 128));
        router.upsert(versioned("default", "a", "1"), settings(1, 128));

        assert!(router
            .remove(&versioned("default", "a", "$LATEST"))
            .is_some());
        assert!(matches!(
            router.lookup("default", "a", "$LATEST"),
            Err(LookupError::QualifierNotFound { .. })
        ));
        assert!(router.lookup("default", "a", "1").is_ok());

        assert!(router.remove(&versioned("default", "a", "1")).is_some());
        assert!(matches!(
            router.lookup("default", "a", "1"),
            Err(LookupError::FunctionNotFound { .. })
        ));
        assert_eq!(router.table().function_count(), 0);

        let table = router.table();
        assert!(router.remove(&versioned("default", "a", "1")).is_none());
        assert!(
            Arc::ptr_eq(&table, &router.table()),
            "removing an absent function swapped the table"
        );
    }

    #[test]
    fn namespaces_added_and_removed() {
        let router = Router::new();
        router.add_namespace("team");
        assert!(matches!(
            router.lookup("team", "a", "$LATEST"),
            Err(LookupError::FunctionNotFound { .. })
        ));
        let table = router.table();
        router.add_namespace("team");
        assert!(
            Arc::ptr_eq(&table, &router.table()),
            "adding an existing namespace swapped the table"
        );

        router.upsert(versioned("team", "a", "$LATEST"), settings(1, 128));
        router.upsert(versioned("other", "a", "$LATEST"), settings(1, 128));
        router.remove_namespace("team");
        assert!(matches!(
            router.lookup("team", "a", "$LATEST"),
            Err(LookupError::NamespaceNotFound { .. })
        ));
        assert!(router.lookup("other", "a", "$LATEST").is_ok());
        assert_eq!(router.table().function_count(), 1);
    }

    #[tokio::test]
    async fn remove_namespace_fails_waiters() {
        let router = Router::new();
        let function = router.upsert(versioned("team", "a", "$LATEST"), settings(1, 128));
        let waiter = queue_waiter(&function).await;

        router.remove_namespace("team");

        assert_eq!(waiter.await.unwrap(), Err(AcquireError::Removed));
    }

    #[tokio::test]
    async fn replace_fails_waiters_of_dropped_functions() {
        let router = Router::new();
        router.replace(vec![
            (key("a"), settings(1, 128)),
            (key("b"), settings(1, 128)),
        ]);
        let dropped = router.lookup("default", "a", "$LATEST").unwrap();
        let kept = router.lookup("default", "b", "$LATEST").unwrap();
        let dropped_waiter = queue_waiter(&dropped).await;
        let kept_waiter = queue_waiter(&kept).await;

        router.replace(vec![(key("b"), settings(1, 128))]);

        assert_eq!(dropped_waiter.await.unwrap(), Err(AcquireError::Removed));
        assert_eq!(
            kept.pool.demand().queued,
            1,
            "the kept function lost its waiter"
        );
        kept_waiter.abort();
    }

    #[test]
    fn replace_drops_namespaces_without_entries() {
        let router = Router::new();
        router.add_namespace("empty");
        router.upsert(versioned("team", "a", "$LATEST"), settings(1, 128));

        router.replace(vec![(key("a"), settings(1, 128))]);

        for namespace in ["empty", "team"] {
            assert!(
                matches!(
                    router.lookup(namespace, "a", "$LATEST"),
                    Err(LookupError::NamespaceNotFound { .. })
                ),
                "namespace {namespace} survived the replace"
            );
        }
        assert!(router.lookup("default", "a", "$LATEST").is_ok());
    }

    #[test]
    fn replace_with_same_set_swaps_nothing() {
        let router = Router::new();
        let entries = |memory_mb| {
            vec![
                (key("a"), settings(1, memory_mb)),
                (versioned("team", "b", "1"), settings(1, memory_mb)),
            ]
        };
        router.replace(entries(128));
        let table = router.table();

        router.replace(entries(256));

        assert!(
            Arc::ptr_eq(&table, &router.table()),
            "the table was swapped"
        );
        let function = router.lookup("team", "b", "1").unwrap();
        assert_eq!(function.settings().memory_mb, 256);
    }

    #[test]
    fn replace_with_duplicate_entries() {
        let router = Router::new();
        router.replace(vec![
            (key("a"), settings(1, 128)),
            (key("a"), settings(1, 256)),
        ]);
        assert_eq!(router.table().function_count(), 1);
        let a = router.lookup("default", "a", "$LATEST").unwrap();
        assert_eq!(a.settings().memory_mb, 256);

        // Listing `a` twice must not make up for the missing `b`.
        router.upsert(key("b"), settings(1, 128));
        router.replace(vec![
            (key("a"), settings(1, 128)),
            (key("a"), settings(1, 128)),
        ]);
        assert!(matches!(
            router.lookup("default", "b", "$LATEST"),
            Err(LookupError::FunctionNotFound { .. })
        ));
        assert_eq!(router.table().function_count(), 1);
    }

    #[test]
    fn concurrent_writers_lose_no_change() {
        const THREADS: usize = 4;
        const KEYS: usize = 200;
        let router = Router::new();
        let shared_keys: Vec<FunctionKey> =
            (0..KEYS).map(|i| key(&format!("shared-{i}"))).collect();

        let returned: Vec<Vec<Arc<Function>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let router = &router;
                    let shared_keys = &shared_keys;
                    scope.spawn(move || {
                        let mut returned = Vec::new();
                        for (i, shared) in shared_keys.iter().enumerate() {
                            returned.push(router.upsert(shared.clone(), settings(1, 128)));
                            let own = versioned(&format!("ns-{thread}"), &format!("f-{i}"), "1");
                            router.upsert(own.clone(), settings(1, 128));
                            if i % 2 == 0 {
                                assert!(router.remove(&own).is_some());
                            }
                        }
                        returned
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        assert_eq!(router.table().function_count(), KEYS + THREADS * KEYS / 2);
        for functions in &returned {
            for function in functions {
                let key = &function.key;
                let routed = router
                    .lookup(&key.namespace, &key.name, &key.qualifier)
                    .unwrap();
                assert!(
                    Arc::ptr_eq(function, &routed),
                    "upsert of {key} returned a function the table does not route to"
                );
            }
        }
    }

    mod model {
        //! The router against a model made of plain maps, over random sequences of changes.

        use std::collections::{BTreeMap, BTreeSet};

        use proptest::prelude::*;

        use super::*;

        const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
        const QUALIFIERS: [&str; 3] = ["$LATEST", "1", "prod"];
        /// Enough names that shards hold several entries.
        const NAMES: usize = 40;

        type ModelKey = (String, String);

        /// namespace → (name, qualifier) → memory_mb. An empty inner map is an empty namespace.
        type Model = BTreeMap<String, BTreeMap<ModelKey, u32>>;

        #[derive(Debug, Clone)]
        enum Op {
            Upsert(FunctionKey, u32),
            Remove(FunctionKey),
            AddNamespace(String),
            RemoveNamespace(String),
            Replace(Vec<(FunctionKey, u32)>),
        }

        fn any_key() -> impl Strategy<Value = FunctionKey> {
            (0..NAMESPACES.len(), 0..NAMES, 0..QUALIFIERS.len())
                .prop_map(|(n, f, q)| versioned(NAMESPACES[n], &format!("f{f}"), QUALIFIERS[q]))
        }

        fn any_namespace() -> impl Strategy<Value = String> {
            (0..NAMESPACES.len()).prop_map(|n| NAMESPACES[n].to_owned())
        }

        fn any_op() -> impl Strategy<Value = Op> {
            let memory = prop_oneof![Just(128u32), Just(256)];
            prop_oneof![
                6 => (any_key(), memory.clone()).prop_map(|(k, m)| Op::Upsert(k, m)),
                3 => any_key().prop_map(Op::Remove),
                1 => any_namespace().prop_map(Op::AddNamespace),
                1 => any_namespace().prop_map(Op::RemoveNamespace),
                1 => proptest::collection::vec((any_key(), memory), 0..120).prop_map(Op::Replace),
            ]
        }

        fn apply(router: &Router, model: &mut Model, op: &Op) {
            match op {
                Op::Upsert(key, memory_mb) => {
                    router.upsert(key.clone(), settings(1, *memory_mb));
                    model
                        .entry(key.namespace.clone())
                        .or_default()
                        .insert((key.name.clone(), key.qualifier.clone()), *memory_mb);
                }
                Op::Remove(key) => {
                    let removed = router.remove(key);
                    let expected = model.get_mut(&key.namespace).and_then(|functions| {
                        functions.remove(&(key.name.clone(), key.qualifier.clone()))
                    });
                    assert_eq!(removed.is_some(), expected.is_some(), "remove of {key}");
                }
                Op::AddNamespace(namespace) => {
                    router.add_namespace(namespace);
                    model.entry(namespace.clone()).or_default();
                }
                Op::RemoveNamespace(namespace) => {
                    router.remove_namespace(namespace);
                    model.remove(namespace);
                }
                Op::Replace(entries) => {
                    router.replace(
                        entries
                            .iter()
                            .map(|(key, memory_mb)| (key.clone(), settings(1, *memory_mb)))
                            .collect(),
                    );
                    model.clear();
                    for (key, memory_mb) in entries {
                        model
                            .entry(key.namespace.clone())
                            .or_default()
                            .insert((key.name.clone(), key.qualifier.clone()), *memory_mb);
                    }
                }
            }
        }

        fn expected_lookup(model: &Model, key: &FunctionKey) -> Result<u32, LookupError> {
            let Some(functions) = model.get(&key.namespace) else {
                return Err(LookupError::NamespaceNotFound {
                    namespace: key.namespace.clone(),
                });
            };
            if let Some(memory_mb) = functions.get(&(key.name.clone(), key.qualifier.clone())) {
                return Ok(*memory_mb);
            }
            if functions.keys().any(|(name, _)| *name == key.name) {
                Err(LookupError::QualifierNotFound {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    qualifier: key.qualifier.clone(),
                })
            } else {
                Err(LookupError::FunctionNotFound {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                })
            }
        }

        fn check(router: &Router, model: &Model) {
            let table = router.table();
            let count: usize = model.values().map(|functions| functions.len()).sum();
            assert_eq!(table.function_count(), count);

            let listed: BTreeSet<String> = table.functions().map(|f| f.key.to_string()).collect();
            let expected: BTreeSet<String> = model
                .iter()
                .flat_map(|(namespace, functions)| {
                    functions
                        .keys()
                        .map(move |(name, qualifier)| format!("{namespace}/{name}:{qualifier}"))
                })
                .collect();
            assert_eq!(listed, expected);
            assert_eq!(
                table.functions().count(),
                count,
                "a function is listed twice"
            );

            for namespace in NAMESPACES.iter().chain(&["absent"]) {
                for name in 0..=NAMES {
                    for qualifier in QUALIFIERS {
                        let key = versioned(namespace, &format!("f{name}"), qualifier);
                        let found = router
                            .lookup(&key.namespace, &key.name, &key.qualifier)
                            .map(|f| f.settings().memory_mb);
                        assert_eq!(found, expected_lookup(model, &key), "lookup of {key}");
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn router_matches_model(ops in proptest::collection::vec(any_op(), 1..40)) {
                let router = Router::new();
                let mut model = Model::new();
                for op in &ops {
                    let before: BTreeMap<String, Arc<Function>> = router
                        .table()
                        .functions()
                        .map(|f| (f.key.to_string(), Arc::clone(f)))
                        .collect();
                    apply(&router, &mut model, op);
                    check(&router, &model);
                    // A function that stays in the table keeps its pool.
                    for function in router.table().functions() {
                        if let Some(previous) = before.get(&function.key.to_string()) {
                            prop_assert!(
                                Arc::ptr_eq(previous, function),
                                "{} was rebuilt by {:?}", function.key, op
                            );
                        }
                    }
                }
            }
        }
    }
}
