//! The object store: every object as JSON, one global resourceVersion counter, the bounded
//! event history that watches resume from, and the open watches.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::defaults;
use crate::{Resource, Status};

/// Watch event types as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change to one object, kept in the history and sent to matching watches.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventType,
    pub resource: Resource,
    pub namespace: String,
    /// The new state, or for `Deleted` the last state with the deletion's resourceVersion.
    pub object: Value,
    /// The state before the change, for `Modified` and `Deleted`.
    pub old: Option<Value>,
}

/// Start point of a subscription.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Every current object, then live events.
    Now,
    /// Every retained event after this resourceVersion, then live events.
    After(u64),
}

/// An open watch on the store.
pub struct Subscription {
    /// Current objects, for `Start::Now`.
    pub initial: Vec<Value>,
    /// Retained events after the requested resourceVersion, for `Start::After`.
    pub replay: Vec<Arc<Event>>,
    /// The store's resourceVersion when the subscription was opened.
    pub rv: u64,
    pub events: mpsc::UnboundedReceiver<Arc<Event>>,
}

struct Watcher {
    resource: Resource,
    namespace: Option<String>,
    /// Whether `cut_watches` ends it: true for API clients, false for the scheduler and nodes.
    external: bool,
    sender: mpsc::UnboundedSender<Arc<Event>>,
}

/// Part of an object a write may change, for resources with a status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A write to the object: `status` is kept from the stored object.
    Main,
    /// A write to `/status`: only `status` changes.
    Status,
    /// A write by the scheduler or a node, which may change spec and status alike and skips
    /// the resourceVersion precondition.
    System,
}

/// The result of a delete request.
#[derive(Debug)]
pub enum Deleted {
    /// The object is gone; this is its last state.
    Removed(Value),
    /// The object is marked for deletion and stays until its pod processes stop, its
    /// finalizers are removed or, for a namespace, its contents are gone.
    Pending(Value),
}

/// Options of a delete request.
#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<u64>,
    pub precondition_uid: Option<String>,
    pub precondition_resource_version: Option<String>,
}

type Key = (Resource, String, String);

struct Inner {
    rv: u64,
    /// Events up to and including this resourceVersion are forgotten.
    compacted: u64,
    history_limit: usize,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    watchers: Vec<Watcher>,
    /// Names of the simulated nodes, whose pods get graceful deletion.
    nodes: BTreeSet<String>,
    next_cluster_ip: u32,
}

/// The shared object store of one cluster.
pub struct Store {
    inner: Mutex<Inner>,
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn validate_name(resource: &Resource, name: &str) -> Result<(), Status> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(Status::invalid(
            resource,
            name,
            &format!(
                "metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ))
    }
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

/// Returns the object without `metadata` and `status`, which is what `metadata.generation` tracks.
fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

const SYSTEM_METADATA: [&str; 7] = [
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "namespace",
    "name",
];

fn pod_is_terminal(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

impl Store {
    pub fn new(history_limit: usize, nodes: impl IntoIterator<Item = String>) -> Store {
        Store {
            inner: Mutex::new(Inner {
                rv: 0,
                compacted: 0,
                history_limit: history_limit.max(1),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                watchers: Vec::new(),
                nodes: nodes.into_iter().collect(),
                next_cluster_ip: 1,
            }),
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    pub fn get(&self, resource: &Resource, namespace: &str, name: &str) -> Option<Value> {
        let key = (*resource, namespace.to_string(), name.to_string());
        self.inner.lock().objects.get(&key).cloned()
    }

    /// Lists objects of one type, in one namespace or all, sorted by namespace and name, with
    /// the store's current resourceVersion.
    pub fn list(&self, resource: &Resource, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.inner.lock();
        (inner.list(resource, namespace), inner.rv)
    }

    /// Returns the resourceVersion up to which history is forgotten.
    pub fn compacted(&self) -> u64 {
        self.inner.lock().compacted
    }

    pub fn create(
        &self,
        resource: &Resource,
        namespace: &str,
        object: Value,
    ) -> Result<Value, Status> {
        self.inner.lock().create(resource, namespace, object)
    }

    /// Replaces an object with what `change` makes of the stored one. `change` runs under the
    /// store lock, so read-modify-write cycles do not race.
    pub fn update(
        &self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        target: Target,
        change: impl FnOnce(&Value) -> Result<Value, Status>,
    ) -> Result<Value, Status> {
        self.inner
            .lock()
            .update(resource, namespace, name, target, change)
    }

    /// Like `update`, but `change` also runs when the object is missing, and what it returns
    /// is then created. Returns the object and whether it was created.
    pub fn upsert(
        &self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        target: Target,
        change: impl FnOnce(Option<&Value>) -> Result<Value, Status>,
    ) -> Result<(Value, bool), Status> {
        let mut inner = self.inner.lock();
        let key = (*resource, namespace.to_string(), name.to_string());
        if inner.objects.contains_key(&key) {
            let object =
                inner.update(resource, namespace, name, target, |cur| change(Some(cur)))?;
            Ok((object, false))
        } else {
            let mut object = change(None)?;
            if object.pointer("/metadata/name").is_none() {
                metadata_mut(&mut object).insert("name".into(), json!(name));
            }
            let object = inner.create(resource, namespace, object)?;
            Ok((object, true))
        }
    }

    pub fn delete(
        &self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deleted, Status> {
        self.inner.lock().delete(resource, namespace, name, options)
    }

    /// Removes an object for good if it still has this uid. Nodes call this once a deleted
    /// pod's processes have stopped.
    pub fn remove_if_uid(
        &self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Option<Value> {
        let mut inner = self.inner.lock();
        let key = (*resource, namespace.to_string(), name.to_string());
        let current = inner.objects.get(&key)?;
        if meta_str(current, "uid") != Some(uid) {
            return None;
        }
        Some(inner.remove(&key))
    }

    /// Opens a watch on one resource type, in one namespace or all. With `Start::After(n)`,
    /// an `n` older than the retained history fails with 410 Expired.
    pub fn subscribe(
        &self,
        resource: &Resource,
        namespace: Option<&str>,
        start: Start,
        external: bool,
    ) -> Result<Subscription, Status> {
        let mut inner = self.inner.lock();
        let mut initial = Vec::new();
        let mut replay = Vec::new();
        match start {
            Start::Now => initial = inner.list(resource, namespace),
            Start::After(rv) => {
                if rv < inner.compacted {
                    return Err(Status::expired(format!(
                        "too old resource version: {rv} ({})",
                        inner.compacted + 1
                    )));
                }
                replay = inner
                    .history
                    .iter()
                    .filter(|e| {
                        e.rv > rv
                            && e.resource == *resource
                            && namespace.is_none_or(|ns| e.namespace == ns)
                    })
                    .cloned()
                    .collect();
            }
        }
        let (sender, events) = mpsc::unbounded_channel();
        inner.watchers.push(Watcher {
            resource: *resource,
            namespace: namespace.map(str::to_string),
            external,
            sender,
        });
        Ok(Subscription {
            initial,
            replay,
            rv: inner.rv,
            events,
        })
    }

    /// Takes every event already queued for a subscription, with the store's resourceVersion.
    /// Every event up to that resourceVersion is in the returned list or was taken earlier,
    /// because events are queued under the same lock. A bookmark may then carry it.
    pub fn drain(
        &self,
        events: &mut mpsc::UnboundedReceiver<Arc<Event>>,
    ) -> (Vec<Arc<Event>>, u64) {
        let inner = self.inner.lock();
        let mut taken = Vec::new();
        while let Ok(event) = events.try_recv() {
            taken.push(event);
        }
        (taken, inner.rv)
    }

    /// Ends every watch opened by an API client.
    pub fn cut_watches(&self) {
        self.inner.lock().watchers.retain(|w| !w.external);
    }

    /// Forgets the event history, so resuming from any earlier resourceVersion fails with 410.
    pub fn compact(&self) {
        let mut inner = self.inner.lock();
        inner.compacted = inner.rv;
        inner.history.clear();
    }
}

impl Inner {
    fn list(&self, resource: &Resource, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && namespace.is_none_or(|n| n == ns))
            .map(|(_, object)| object.clone())
            .collect()
    }

    fn emit(
        &mut self,
        kind: EventType,
        resource: Resource,
        namespace: &str,
        object: Value,
        old: Option<Value>,
    ) {
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            resource,
            namespace: namespace.to_string(),
            object,
            old,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        self.watchers.retain(|w| {
            if w.resource != resource || w.namespace.as_deref().is_some_and(|ns| ns != namespace) {
                return !w.sender.is_closed();
            }
            w.sender.send(event.clone()).is_ok()
        });
    }

    fn bump(&mut self, object: &mut Value) {
        self.rv += 1;
        metadata_mut(object).insert("resourceVersion".into(), json!(self.rv.to_string()));
    }

    fn check_namespace(
        &self,
        resource: &Resource,
        namespace: &str,
        name: &str,
    ) -> Result<(), Status> {
        if !resource.namespaced {
            return Ok(());
        }
        let key = (Resource::NAMESPACES, String::new(), namespace.to_string());
        let Some(ns) = self.objects.get(&key) else {
            return Err(Status::not_found(&Resource::NAMESPACES, namespace));
        };
        if ns.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(Status::forbidden(
                resource,
                name,
                &format!("unable to create new content in namespace {namespace} because it is being terminated"),
            ));
        }
        Ok(())
    }

    fn create(
        &mut self,
        resource: &Resource,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, Status> {
        if !object.is_object() {
            return Err(Status::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let meta = metadata_mut(&mut object);
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                // As the API server does, the prefix is cut so the name stays within 63
                // characters with the 5-character suffix.
                Some(prefix) if !prefix.is_empty() => {
                    let cut = prefix
                        .char_indices()
                        .nth(58)
                        .map_or(prefix.len(), |(at, _)| at);
                    format!("{}{}", &prefix[..cut], random_suffix())
                }
                _ => {
                    return Err(Status::invalid(
                        resource,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        validate_name(resource, &name)?;
        if resource.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(ns) if !ns.is_empty() && ns != namespace => {
                    return Err(Status::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => {}
            }
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        meta.insert("name".into(), json!(name));
        for field in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
            "selfLink",
        ] {
            meta.remove(field);
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if *resource != Resource::PODS {
            meta.insert("generation".into(), json!(1));
        }
        let namespace = if resource.namespaced { namespace } else { "" };
        self.check_namespace(resource, namespace, &name)?;
        let key = (*resource, namespace.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            return Err(Status::already_exists(resource, &name));
        }

        object["kind"] = json!(resource.kind);
        object["apiVersion"] = json!(resource.api_version());
        if resource.status_subresource {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        defaults::apply_on_create(resource, &mut object, &mut self.next_cluster_ip);

        self.bump(&mut object);
        self.objects.insert(key, object.clone());
        self.emit(EventType::Added, *resource, namespace, object.clone(), None);

        if *resource == Resource::NAMESPACES {
            // The service account controller of a real cluster creates this right away.
            let account = json!({"metadata": {"name": "default"}});
            let _ = self.create(&Resource::SERVICEACCOUNTS, &name, account);
        }
        Ok(object)
    }

    fn update(
        &mut self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        target: Target,
        change: impl FnOnce(&Value) -> Result<Value, Status>,
    ) -> Result<Value, Status> {
        let namespace = if resource.namespaced { namespace } else { "" };
        let key = (*resource, namespace.to_string(), name.to_string());
        let Some(current) = self.objects.get(&key).cloned() else {
            return Err(Status::not_found(resource, name));
        };
        let requested = change(&current)?;
        if !requested.is_object() {
            return Err(Status::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if target != Target::System {
            if let Some(rv) = meta_str(&requested, "resourceVersion") {
                if !rv.is_empty() && Some(rv) != meta_str(&current, "resourceVersion") {
                    return Err(Status::conflict(resource, name));
                }
            }
        }
        if let Some(requested_name) = meta_str(&requested, "name") {
            if requested_name != name {
                return Err(Status::bad_request(format!(
                    "the name of the object ({requested_name}) does not match the name on the URL ({name})"
                )));
            }
        }

        let mut result = match target {
            Target::Status => {
                let mut result = current.clone();
                match requested.get("status") {
                    Some(status) => result["status"] = status.clone(),
                    None => {
                        if let Some(map) = result.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                result
            }
            Target::Main | Target::System => {
                let mut result = requested;
                if target == Target::Main && resource.status_subresource {
                    match current.get("status") {
                        Some(status) => result["status"] = status.clone(),
                        None => {
                            if let Some(map) = result.as_object_mut() {
                                map.remove("status");
                            }
                        }
                    }
                }
                let current_meta = current["metadata"].as_object().cloned().unwrap_or_default();
                let meta = metadata_mut(&mut result);
                for field in SYSTEM_METADATA {
                    match current_meta.get(field) {
                        Some(value) => meta.insert(field.to_string(), value.clone()),
                        None => meta.remove(field),
                    };
                }
                if !meta.contains_key("managedFields") {
                    if let Some(fields) = current_meta.get("managedFields") {
                        meta.insert("managedFields".into(), fields.clone());
                    }
                }
                result
            }
        };
        result["kind"] = json!(resource.kind);
        result["apiVersion"] = json!(resource.api_version());
        metadata_mut(&mut result).insert(
            "resourceVersion".into(),
            current["metadata"]["resourceVersion"].clone(),
        );

        if target != Target::Status {
            defaults::apply_on_update(resource, &current, &mut result);
        }
        if target == Target::Main && *resource == Resource::PODS {
            defaults::check_pod_update(&current, &result)?;
        }
        if *resource != Resource::PODS && spec_part(&result) != spec_part(&current) {
            let generation = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut result).insert("generation".into(), json!(generation + 1));
        }

        if result == current {
            return Ok(current);
        }
        self.bump(&mut result);
        self.objects.insert(key.clone(), result.clone());
        self.emit(
            EventType::Modified,
            *resource,
            namespace,
            result.clone(),
            Some(current),
        );

        let finalizers_done = result
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        let deleting = result.pointer("/metadata/deletionTimestamp").is_some();
        if deleting
            && finalizers_done
            && *resource != Resource::PODS
            && *resource != Resource::NAMESPACES
        {
            return Ok(self.remove(&key));
        }
        Ok(result)
    }

    /// Removes an object, emits DELETED, and finishes a terminating namespace that is now empty.
    fn remove(&mut self, key: &Key) -> Value {
        let Some(old) = self.objects.remove(key) else {
            return Value::Null;
        };
        let mut last = old.clone();
        self.bump(&mut last);
        let (resource, namespace, _) = key.clone();
        self.emit(
            EventType::Deleted,
            resource,
            &namespace,
            last.clone(),
            Some(old),
        );
        if resource.namespaced {
            self.finish_namespace(&namespace);
        }
        last
    }

    fn finish_namespace(&mut self, namespace: &str) {
        let key = (Resource::NAMESPACES, String::new(), namespace.to_string());
        let terminating = self
            .objects
            .get(&key)
            .is_some_and(|ns| ns.pointer("/metadata/deletionTimestamp").is_some());
        let empty = !self
            .objects
            .keys()
            .any(|(r, ns, _)| r.namespaced && ns == namespace);
        if terminating && empty {
            self.remove(&key);
        }
    }

    fn delete(
        &mut self,
        resource: &Resource,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deleted, Status> {
        let namespace = if resource.namespaced { namespace } else { "" };
        let key = (*resource, namespace.to_string(), name.to_string());
        let Some(current) = self.objects.get(&key).cloned() else {
            return Err(Status::not_found(resource, name));
        };
        if let Some(uid) = &options.precondition_uid {
            let actual = meta_str(&current, "uid").unwrap_or("");
            if uid != actual {
                return Err(Status::conflict_with(
                    resource,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
                ));
            }
        }
        if let Some(rv) = &options.precondition_resource_version {
            let actual = meta_str(&current, "resourceVersion").unwrap_or("");
            if rv != actual {
                return Err(Status::conflict_with(
                    resource,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
                ));
            }
        }

        if *resource == Resource::PODS {
            return Ok(self.delete_pod(&key, current, options.grace_period_seconds));
        }
        if *resource == Resource::NAMESPACES {
            return Ok(self.delete_namespace(&key, current));
        }
        let has_finalizers = current
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(Deleted::Pending(current));
            }
            let mut marked = current.clone();
            let meta = metadata_mut(&mut marked);
            meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            self.bump(&mut marked);
            self.objects.insert(key.clone(), marked.clone());
            self.emit(
                EventType::Modified,
                *resource,
                namespace,
                marked.clone(),
                Some(current),
            );
            return Ok(Deleted::Pending(marked));
        }
        Ok(Deleted::Removed(self.remove(&key)))
    }

    fn delete_pod(&mut self, key: &Key, current: Value, grace: Option<u64>) -> Deleted {
        let node = current
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let on_node = self.nodes.contains(node);
        if !on_node || pod_is_terminal(&current) || grace == Some(0) {
            return Deleted::Removed(self.remove(key));
        }
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return Deleted::Pending(current);
        }

        let grace = grace
            .or_else(|| {
                current
                    .pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_u64)
            })
            .unwrap_or(30);
        if grace == 0 {
            return Deleted::Removed(self.remove(key));
        }

        let deadline = chrono::Utc::now() + chrono::Duration::seconds(grace as i64);
        let mut marked = current.clone();
        let meta = metadata_mut(&mut marked);
        meta.insert(
            "deletionTimestamp".into(),
            json!(deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        self.bump(&mut marked);
        self.objects.insert(key.clone(), marked.clone());
        self.emit(
            EventType::Modified,
            key.0,
            &key.1,
            marked.clone(),
            Some(current),
        );
        Deleted::Pending(marked)
    }

    fn delete_namespace(&mut self, key: &Key, current: Value) -> Deleted {
        let name = key.2.clone();
        let mut marked = current.clone();
        if current.pointer("/metadata/deletionTimestamp").is_none() {
            metadata_mut(&mut marked).insert("deletionTimestamp".into(), json!(now_rfc3339()));
            metadata_mut(&mut marked).insert("deletionGracePeriodSeconds".into(), json!(0));
            marked["status"] = json!({"phase": "Terminating"});
            self.bump(&mut marked);
            self.objects.insert(key.clone(), marked.clone());
            self.emit(
                EventType::Modified,
                Resource::NAMESPACES,
                "",
                marked.clone(),
                Some(current),
            );
        }
        let contents: Vec<Key> = self
            .objects
            .keys()
            .filter(|(r, ns, _)| r.namespaced && *ns == name)
            .cloned()
            .collect();
        for (resource, namespace, object_name) in contents {
            let content_key = (resource, namespace.clone(), object_name.clone());
            let Some(object) = self.objects.get(&content_key).cloned() else {
                continue;
            };
            if resource == Resource::PODS {
                self.delete_pod(&content_key, object, None);
            } else {
                self.remove(&content_key);
            }
        }
        self.finish_namespace(&name);
        Deleted::Pending(marked)
    }
}
