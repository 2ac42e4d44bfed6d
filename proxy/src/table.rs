//! The routing table: which functions exist, their settings and their pools. A new table is built
//! and swapped in whole whenever functions are added, changed or removed; requests read one
//! snapshot without locks. Instances change inside each function's [`Pool`], so an instance
//! coming or going does not rebuild the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::metrics::FunctionMetrics;
use crate::pool::{AcquireError, Pool};

/// How a function is invoked through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunctionKind {
    /// `POST /functions/{namespace}/{function}/invocations`, forwarded as `POST /event-invoke`.
    Event,
    /// Any request under `/web/{namespace}/{function}/`, forwarded with the prefix stripped.
    Web,
}

/// What the proxy needs to know about one function version.
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
    pub(crate) metrics: FunctionMetrics,
}

impl Function {
    pub fn settings(&self) -> Arc<FunctionSettings> {
        self.settings.load_full()
    }
}

/// Why a route lookup found nothing.
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

type Qualifiers = HashMap<String, Arc<Function>>;

/// One immutable snapshot: namespace → function name → qualifier → function.
#[derive(Debug, Default, Clone)]
pub struct Table {
    namespaces: HashMap<String, HashMap<String, Qualifiers>>,
}

impl Table {
    pub fn function_count(&self) -> usize {
        self.namespaces
            .values()
            .flat_map(|functions| functions.values())
            .map(|qualifiers| qualifiers.len())
            .sum()
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
        self.synced.load(SeqCst)
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
    pub fn upsert(&self, key: FunctionKey, settings: FunctionSettings) -> Arc<Function> {
        if let Ok(existing) = self.lookup(&key.namespace, &key.name, &key.qualifier) {
            existing.pool.set_queue_limit(settings.queue_limit);
            if existing.settings().concurrency != settings.concurrency {
                existing.pool.set_capacity(settings.concurrency);
            }
            existing.settings.store(Arc::new(settings));
            return existing;
        }
        let function = Arc::new(Function {
            metrics: FunctionMetrics::new(&key),
            pool: Pool::new(settings.queue_limit),
            settings: ArcSwap::from_pointee(settings),
            key,
        });
        self.table.rcu(|current| {
            let mut next = Table::clone(current);
            next.namespaces
                .entry(function.key.namespace.clone())
                .or_default()
                .entry(function.key.name.clone())
                .or_default()
                .insert(function.key.qualifier.clone(), Arc::clone(&function));
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

    /// Replaces the whole table in one swap, keeping the pools of functions that stay. For
    /// sources that rebuild their full view at once.
    pub fn replace(&self, entries: Vec<(FunctionKey, FunctionSettings)>) {
        let current = self.table.load_full();
        let mut next = Table::default();
        for (key, settings) in entries {
            let function = match current
                .namespaces
                .get(&key.namespace)
                .and_then(|f| f.get(&key.name))
                .and_then(|q| q.get(&key.qualifier))
            {
                Some(existing) => {
                    existing.settings.store(Arc::new(settings));
                    Arc::clone(existing)
                }
                None => Arc::new(Function {
                    metrics: FunctionMetrics::new(&key),
                    pool: Pool::new(settings.queue_limit),
                    settings: ArcSwap::from_pointee(settings),
                    key,
                }),
            };
            next.namespaces
                .entry(function.key.namespace.clone())
                .or_default()
                .entry(function.key.name.clone())
                .or_default()
                .insert(function.key.qualifier.clone(), function);
        }
        self.table.store(Arc::new(next));
    }
}
