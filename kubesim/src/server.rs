//! The HTTP front of the API server: authentication, routing, and the list, watch, write and
//! patch handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::authorization::{self, Attributes, Rule};
use crate::node::LogIndex;
use crate::patch::{self, PatchType};
use crate::selector::{FieldSelector, LabelSelector, Selectors};
use crate::status::success;
use crate::store::{DeleteOptions, Deleted, Event, EventType, Start, Store, Target};
use crate::{resource, RequestRecord, Resource, Status};

type Body = BoxBody<Bytes, Infallible>;

/// How long a watch without `timeoutSeconds` lasts; the real server picks 30 to 60 minutes.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The largest request body the server reads.
const MAX_BODY_BYTES: usize = 16 << 20;

/// State shared by every connection of one API server.
pub struct ServerState {
    pub store: Arc<Store>,
    pub token: String,
    /// The user name that requests with `token` authenticate as.
    pub user: String,
    /// Whether requests without an `Authorization` header are served. A wrong token still gets 401.
    pub allow_anonymous: bool,
    pub bookmark_interval: Duration,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub logs: Arc<LogIndex>,
    /// While true, new watch requests wait before they start.
    pub watches_blocked: watch::Sender<bool>,
    /// Rules set by `Cluster::forbid`. A request that one of them matches gets 403 Forbidden.
    pub forbidden: Mutex<Vec<Rule>>,
}

/// The maximum time a watch request waits for `Cluster::block_watches(false)`.
const MAX_WATCH_HOLD: Duration = Duration::from_secs(60);

impl ServerState {
    /// Waits while watches are blocked, at most `MAX_WATCH_HOLD`.
    async fn wait_until_watches_allowed(&self) {
        let mut blocked = self.watches_blocked.subscribe();
        let allowed = blocked.wait_for(|blocked| !*blocked);
        if tokio::time::timeout(MAX_WATCH_HOLD, allowed).await.is_err() {
            tracing::warn!(
                "kubesim: a watch waited {MAX_WATCH_HOLD:?} for block_watches(false) and starts anyway"
            );
        }
    }
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ServerState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "kubesim: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let state = state.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "kubesim: connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values serialize");
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("static response parts are valid")
}

fn status_response(status: &Status) -> Response<Body> {
    let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &status.to_json())
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode_component(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(key), decode_component(value))
        })
        .collect()
}

fn flag(query: &HashMap<String, String>, name: &str) -> Option<bool> {
    query.get(name).map(|v| v == "true" || v == "1")
}

/// The object a request addresses.
struct Address {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_address(group: &str, version: &str, rest: &[&str], path: &str) -> Result<Address, Status> {
    let not_found = || Status::path_not_found(path);
    let namespaced_path =
        rest.len() >= 3 && rest[0] == "namespaces" && !matches!(rest[2], "status" | "finalize");
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let plural = rest.first().ok_or_else(not_found)?;
    let resource = Resource::lookup(group, version, plural).ok_or_else(not_found)?;
    if namespace.is_some() && !resource.namespaced {
        return Err(not_found());
    }
    if rest.len() > 3 {
        return Err(not_found());
    }
    Ok(Address {
        resource,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

async fn handle(state: Arc<ServerState>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    let raw_query = request.uri().query().unwrap_or("").to_string();
    let query = parse_query(&raw_query);
    let watch = flag(&query, "watch").unwrap_or(false);
    state.requests.lock().push(RequestRecord {
        method: request.method().to_string(),
        path: path.clone(),
        query: raw_query,
        watch,
    });

    let expected = format!("Bearer {}", state.token);
    let authorization = request.headers().get(http::header::AUTHORIZATION);
    let user = match authorization {
        Some(value) if value.to_str().is_ok_and(|v| v == expected) => Some(state.user.clone()),
        Some(_) => None,
        None if state.allow_anonymous => Some(authorization::ANONYMOUS_USER.to_string()),
        None => None,
    };
    let Some(user) = user else {
        return status_response(&Status::unauthorized());
    };

    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return status_response(&Status::bad_request(format!(
                "failed to read the request body: {error}"
            )))
        }
    };
    match route(&state, &parts, &path, &query, watch, &body, &user).await {
        Ok(response) => response,
        Err(status) => status_response(&status),
    }
}

async fn route(
    state: &Arc<ServerState>,
    parts: &http::request::Parts,
    path: &str,
    query: &HashMap<String, String>,
    watch: bool,
    body: &Bytes,
    user: &str,
) -> Result<Response<Body>, Status> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let get_only = |document: Option<Value>| -> Result<Response<Body>, Status> {
        if parts.method != Method::GET {
            return Err(Status::method_not_allowed(parts.method.as_str()));
        }
        document
            .map(|d| json_response(StatusCode::OK, &d))
            .ok_or_else(|| Status::path_not_found(path))
    };
    match segments.as_slice() {
        ["version"] => get_only(Some(json!({
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-kubesim",
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z",
            "goVersion": "go1.24",
            "compiler": "gc",
            "platform": "linux/amd64",
        }))),
        ["healthz" | "readyz" | "livez"] => Ok(Response::new(full("ok"))),
        ["api"] => get_only(Some(resource::core_versions())),
        ["api", "v1"] => get_only(resource::api_resource_list("", "v1")),
        ["apis"] => get_only(Some(resource::api_group_list())),
        ["apis", group] => get_only(resource::api_group_document(group)),
        ["apis", group, version] => get_only(resource::api_resource_list(group, version)),
        ["api", "v1", rest @ ..] => {
            let address = parse_address("", "v1", rest, path)?;
            serve_resource(state, parts, query, watch, body, address, user).await
        }
        ["apis", group, version, rest @ ..] => {
            let address = parse_address(group, version, rest, path)?;
            serve_resource(state, parts, query, watch, body, address, user).await
        }
        _ => Err(Status::path_not_found(path)),
    }
}

fn reject_dry_run(query: &HashMap<String, String>) -> Result<(), Status> {
    if query.get("dryRun").is_some_and(|v| !v.is_empty()) {
        return Err(Status::bad_request(
            "dryRun is not supported by this test server (kubesim)",
        ));
    }
    Ok(())
}

/// Rejects request bodies that are not JSON, such as protobuf, with 415 as the real server
/// rejects media types it does not know.
fn require_json(parts: &http::request::Parts) -> Result<(), Status> {
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/json" || media == "*/*" || media.is_empty() {
        Ok(())
    } else {
        Err(Status::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json (kubesim serves JSON only); got {content_type:?}"),
        ))
    }
}

fn parse_json(body: &Bytes) -> Result<Value, Status> {
    serde_json::from_slice(body).map_err(|error| {
        Status::bad_request(format!("the request body is not valid JSON: {error}"))
    })
}

async fn serve_resource(
    state: &Arc<ServerState>,
    parts: &http::request::Parts,
    query: &HashMap<String, String>,
    watch: bool,
    body: &Bytes,
    address: Address,
    user: &str,
) -> Result<Response<Body>, Status> {
    authorize(state, &parts.method, watch, &address, user)?;
    let resource = address.resource;
    let namespace = address.namespace.clone().unwrap_or_default();
    let method = &parts.method;
    let Some(name) = address.name.clone() else {
        return match *method {
            Method::GET if watch => {
                state.wait_until_watches_allowed().await;
                start_watch(state, query, &address)
            }
            Method::GET => list(state, query, &address),
            Method::POST => {
                reject_dry_run(query)?;
                if resource.namespaced && address.namespace.is_none() {
                    return Err(Status::method_not_allowed("POST"));
                }
                require_json(parts)?;
                let object = state
                    .store
                    .create(&resource, &namespace, parse_json(body)?)?;
                Ok(json_response(StatusCode::CREATED, &object))
            }
            Method::DELETE => delete_collection(state, query, body, &address),
            _ => Err(Status::method_not_allowed(method.as_str())),
        };
    };
    if resource.namespaced && address.namespace.is_none() {
        return Err(Status::path_not_found(parts.uri.path()));
    }

    let target = match address.subresource.as_deref() {
        None => Target::Main,
        Some("status") if resource.status_subresource => Target::Status,
        Some("log") if resource == Resource::PODS && *method == Method::GET => {
            return pod_log(state, query, &namespace, &name);
        }
        Some(_) => return Err(Status::path_not_found(parts.uri.path())),
    };
    match *method {
        Method::GET if watch => {
            state.wait_until_watches_allowed().await;
            let mut query = query.clone();
            query.insert("fieldSelector".into(), format!("metadata.name={name}"));
            let collection = Address {
                name: None,
                subresource: None,
                ..address
            };
            start_watch(state, &query, &collection)
        }
        Method::GET => state
            .store
            .get(&resource, &namespace, &name)
            .map(|object| json_response(StatusCode::OK, &object))
            .ok_or_else(|| Status::not_found(&resource, &name)),
        Method::PUT => {
            reject_dry_run(query)?;
            require_json(parts)?;
            let requested = parse_json(body)?;
            let object = state
                .store
                .update(&resource, &namespace, &name, target, |_| Ok(requested))?;
            Ok(json_response(StatusCode::OK, &object))
        }
        Method::PATCH => {
            reject_dry_run(query)?;
            let content_type = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = PatchType::from_content_type(content_type)?;
            let patch_body = patch::parse_body(patch_type, body)?;
            apply_patch(
                state, query, &resource, &namespace, &name, target, patch_type, patch_body,
            )
        }
        Method::DELETE => {
            reject_dry_run(query)?;
            if target != Target::Main {
                return Err(Status::method_not_allowed("DELETE"));
            }
            let options = delete_options(query, body)?;
            match state.store.delete(&resource, &namespace, &name, &options)? {
                Deleted::Pending(object) => Ok(json_response(StatusCode::OK, &object)),
                Deleted::Removed(object) => Ok(json_response(
                    StatusCode::OK,
                    &deleted_body(&resource, &name, object),
                )),
            }
        }
        _ => Err(Status::method_not_allowed(method.as_str())),
    }
}

/// Rejects a request that a rule set by `Cluster::forbid` denies, before anything else about it
/// is checked, as the real server authorizes before it routes to the object.
fn authorize(
    state: &ServerState,
    method: &Method,
    watch: bool,
    address: &Address,
    user: &str,
) -> Result<(), Status> {
    let rules = state.forbidden.lock();
    if rules.is_empty() {
        return Ok(());
    }
    let named = address.name.is_some();
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        // Other methods get 405 later on.
        _ => return Ok(()),
    };
    let name = address.name.as_deref().unwrap_or("");
    // The real server takes a namespace's own name as the namespace of a request for it.
    let namespace = match address.namespace.as_deref() {
        Some(namespace) => namespace,
        None if address.resource == Resource::NAMESPACES => name,
        None => "",
    };
    let request = Attributes {
        user,
        verb,
        resource: address.resource,
        subresource: address.subresource.as_deref(),
        namespace,
        name,
    };
    if rules.iter().any(|rule| rule.matches(&request)) {
        return Err(authorization::forbidden(&request));
    }
    Ok(())
}

/// Builds the body of a completed delete: the object for pods, services and namespaces, and a
/// success `Status` for the other types, as the real registries do.
fn deleted_body(resource: &Resource, name: &str, object: Value) -> Value {
    if matches!(
        *resource,
        Resource::PODS | Resource::SERVICES | Resource::NAMESPACES
    ) {
        object
    } else {
        let uid = object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("");
        success(resource, name, uid)
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_patch(
    state: &Arc<ServerState>,
    query: &HashMap<String, String>,
    resource: &Resource,
    namespace: &str,
    name: &str,
    target: Target,
    patch_type: PatchType,
    patch_body: Value,
) -> Result<Response<Body>, Status> {
    if patch_type == PatchType::Apply {
        let manager = query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                Status::bad_request(
                    "PATCH, application/apply-patch+yaml requires fieldManager to be specified",
                )
            })?
            .clone();
        if let Some(config_name) = patch_body.pointer("/metadata/name").and_then(Value::as_str) {
            if config_name != name {
                return Err(Status::bad_request(format!(
                    "the name of the object ({config_name}) does not match the name on the URL ({name})"
                )));
            }
        }
        let api_version = resource.api_version();
        if target == Target::Status {
            let object = state
                .store
                .update(resource, namespace, name, target, |current| {
                    patch::apply(
                        Some(current),
                        &patch_body,
                        &manager,
                        &api_version,
                        Some("status"),
                    )
                })?;
            return Ok(json_response(StatusCode::OK, &object));
        }
        let (object, created) =
            state
                .store
                .upsert(resource, namespace, name, target, |current| {
                    patch::apply(current, &patch_body, &manager, &api_version, None)
                })?;
        let code = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return Ok(json_response(code, &object));
    }
    let object = state.store.update(
        resource,
        namespace,
        name,
        target,
        |current| match patch_type {
            PatchType::Merge => Ok(patch::merge_patch(current, &patch_body)),
            PatchType::Json => patch::json_patch(current, &patch_body),
            PatchType::Strategic => patch::strategic_merge_patch(current, &patch_body),
            PatchType::Apply => unreachable!("apply patches are handled above"),
        },
    )?;
    Ok(json_response(StatusCode::OK, &object))
}

fn delete_options(query: &HashMap<String, String>, body: &Bytes) -> Result<DeleteOptions, Status> {
    let mut options = DeleteOptions::default();
    if !body.is_empty() {
        let parsed = parse_json(body)?;
        if parsed
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| !d.is_empty())
        {
            return Err(Status::bad_request(
                "dryRun is not supported by this test server (kubesim)",
            ));
        }
        options.grace_period_seconds = parsed.get("gracePeriodSeconds").and_then(Value::as_u64);
        options.precondition_uid = parsed
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string);
        options.precondition_resource_version = parsed
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if let Some(grace) = query.get("gracePeriodSeconds") {
        let grace = grace.parse::<u64>().map_err(|_| {
            Status::bad_request(format!(
                "invalid gracePeriodSeconds {grace:?}: expected a non-negative integer"
            ))
        })?;
        options.grace_period_seconds = Some(grace);
    }
    Ok(options)
}

fn selectors(query: &HashMap<String, String>, resource: &Resource) -> Result<Selectors, Status> {
    Ok(Selectors {
        labels: LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))?,
        fields: FieldSelector::parse(
            query.get("fieldSelector").map(String::as_str).unwrap_or(""),
            resource,
        )?,
    })
}

fn parse_rv(text: &str) -> Result<u64, Status> {
    text.parse::<u64>().map_err(|_| {
        Status::bad_request(format!(
            "invalid resourceVersion {text:?}: expected a decimal number"
        ))
    })
}

fn hex_encode(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = text
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Encodes a `continue` token: the list's resourceVersion and the key of the last item returned.
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    hex_encode(&format!("{rv}/{namespace}/{name}"))
}

fn decode_continue(token: &str) -> Result<(u64, String, String), Status> {
    let invalid = || Status::bad_request(format!("invalid continue token {token:?}"));
    let text = hex_decode(token).ok_or_else(invalid)?;
    let mut parts = text.splitn(3, '/');
    let rv = parts
        .next()
        .and_then(|r| r.parse().ok())
        .ok_or_else(invalid)?;
    let namespace = parts.next().ok_or_else(invalid)?.to_string();
    let name = parts.next().ok_or_else(invalid)?.to_string();
    Ok((rv, namespace, name))
}

fn object_key(object: &Value) -> (String, String) {
    let meta = |field: &str| {
        object
            .pointer(&format!("/metadata/{field}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    (meta("namespace"), meta("name"))
}

fn list(
    state: &Arc<ServerState>,
    query: &HashMap<String, String>,
    address: &Address,
) -> Result<Response<Body>, Status> {
    let resource = address.resource;
    let selectors = selectors(query, &resource)?;
    let compacted = state.store.compacted();
    if let Some(rv) = query.get("resourceVersion").filter(|v| !v.is_empty()) {
        let rv = parse_rv(rv)?;
        let exact = query.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
        if exact && rv < compacted {
            return Err(Status::expired(format!(
                "too old resource version: {rv} ({})",
                compacted + 1
            )));
        }
    }
    let (items, current_rv) = state.store.list(&resource, address.namespace.as_deref());
    let mut list_rv = current_rv;
    let mut after: Option<(String, String)> = None;
    if let Some(token) = query.get("continue").filter(|t| !t.is_empty()) {
        let (rv, namespace, name) = decode_continue(token)?;
        if rv < compacted {
            return Err(Status::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        list_rv = rv;
        after = Some((namespace, name));
    }
    let limit = match query.get("limit").filter(|l| !l.is_empty()) {
        Some(limit) => limit.parse::<usize>().map_err(|_| {
            Status::bad_request(format!(
                "invalid limit {limit:?}: expected a non-negative integer"
            ))
        })?,
        None => 0,
    };

    let matching: Vec<Value> = items
        .into_iter()
        .filter(|item| selectors.matches(item))
        .filter(|item| after.as_ref().is_none_or(|a| object_key(item) > *a))
        .collect();
    let total = matching.len();
    let page: Vec<Value> = if limit > 0 {
        matching.into_iter().take(limit).collect()
    } else {
        matching
    };
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if page.len() < total {
        let (namespace, name) = object_key(page.last().expect("a short page has items"));
        metadata["continue"] = json!(encode_continue(list_rv, &namespace, &name));
        metadata["remainingItemCount"] = json!(total - page.len());
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": resource.list_kind(),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": page,
        }),
    ))
}

fn delete_collection(
    state: &Arc<ServerState>,
    query: &HashMap<String, String>,
    body: &Bytes,
    address: &Address,
) -> Result<Response<Body>, Status> {
    reject_dry_run(query)?;
    let resource = address.resource;
    let selectors = selectors(query, &resource)?;
    let options = delete_options(query, body)?;
    let (items, _) = state.store.list(&resource, address.namespace.as_deref());
    let mut deleted = Vec::new();
    for item in items.iter().filter(|item| selectors.matches(item)) {
        let (namespace, name) = object_key(item);
        match state.store.delete(&resource, &namespace, &name, &options) {
            Ok(Deleted::Pending(object) | Deleted::Removed(object)) => deleted.push(object),
            Err(status) if status.code == 404 => {}
            Err(status) => return Err(status),
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": resource.list_kind(),
            "apiVersion": resource.api_version(),
            "metadata": {"resourceVersion": state.store.resource_version().to_string()},
            "items": deleted,
        }),
    ))
}

fn pod_log(
    state: &Arc<ServerState>,
    query: &HashMap<String, String>,
    namespace: &str,
    name: &str,
) -> Result<Response<Body>, Status> {
    if state.store.get(&Resource::PODS, namespace, name).is_none() {
        return Err(Status::not_found(&Resource::PODS, name));
    }
    let container = query
        .get("container")
        .map(String::as_str)
        .filter(|c| !c.is_empty());
    let text = state
        .logs
        .read_container(namespace, name, container)
        .unwrap_or_default();
    let text = match query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
        Some(lines) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut tail = all[start..].join("\n");
            if !tail.is_empty() {
                tail.push('\n');
            }
            tail
        }
        None => text,
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(full(text))
        .expect("static response parts are valid"))
}

/// Options of one watch request.
struct WatchRequest {
    selectors: Selectors,
    bookmarks: bool,
    initial_events_end: bool,
    timeout: Option<Duration>,
    resource: Resource,
}

fn start_watch(
    state: &Arc<ServerState>,
    query: &HashMap<String, String>,
    address: &Address,
) -> Result<Response<Body>, Status> {
    let resource = address.resource;
    let selectors = selectors(query, &resource)?;
    let rv_match = query
        .get("resourceVersionMatch")
        .map(String::as_str)
        .unwrap_or("");
    let send_initial_events = flag(query, "sendInitialEvents");
    let bookmarks = flag(query, "allowWatchBookmarks").unwrap_or(false);
    if send_initial_events.is_some() && rv_match != "NotOlderThan" {
        return Err(Status::new(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless resourceVersionMatch is set to NotOlderThan",
        ));
    }
    if send_initial_events == Some(true) && !bookmarks {
        return Err(Status::new(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: allowWatchBookmarks: Forbidden: allowWatchBookmarks must be set to true when sendInitialEvents is set",
        ));
    }
    if !rv_match.is_empty() && send_initial_events.is_none() {
        return Err(Status::bad_request(
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    let start = match (send_initial_events, rv) {
        (Some(true), _) | (None, "" | "0") => Start::Now,
        (Some(false), "" | "0") => Start::After(state.store.resource_version()),
        (_, rv) => Start::After(parse_rv(rv)?),
    };
    let timeout = match query.get("timeoutSeconds").filter(|t| !t.is_empty()) {
        Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
            Status::bad_request(format!(
                "invalid timeoutSeconds {t:?}: expected a non-negative integer"
            ))
        })?)),
        None => None,
    };
    let request = WatchRequest {
        selectors,
        bookmarks,
        initial_events_end: send_initial_events == Some(true),
        timeout,
        resource,
    };

    let (sender, receiver) = mpsc::channel::<Bytes>(256);
    match state
        .store
        .subscribe(&resource, address.namespace.as_deref(), start, true)
    {
        Ok(subscription) => {
            tokio::spawn(run_watch(state.clone(), subscription, request, sender));
        }
        Err(status) => {
            let line = watch_line("ERROR", &status.to_json());
            sender
                .try_send(line)
                .expect("a new channel has room for one line");
        }
    }
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), receiver))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response parts are valid"))
}

fn watch_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("JSON values serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// Returns the event type a watch with selectors receives for a stored event, or `None` when it
/// receives nothing. An object that starts matching is ADDED, one that stops matching DELETED.
fn visible_type(event: &Event, selectors: &Selectors) -> Option<&'static str> {
    let now = selectors.matches(&event.object);
    let before = event.old.as_ref().is_some_and(|old| selectors.matches(old));
    match (event.kind, before, now) {
        (EventType::Added, _, true) => Some("ADDED"),
        (EventType::Modified, true, true) => Some("MODIFIED"),
        (EventType::Modified, false, true) => Some("ADDED"),
        (EventType::Modified, true, false) => Some("DELETED"),
        (EventType::Deleted, true, _) | (EventType::Deleted, _, true) => Some("DELETED"),
        _ => None,
    }
}

fn bookmark(resource: &Resource, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    watch_line(
        "BOOKMARK",
        &json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata}),
    )
}

async fn run_watch(
    state: Arc<ServerState>,
    mut subscription: crate::store::Subscription,
    request: WatchRequest,
    sender: mpsc::Sender<Bytes>,
) {
    let send_event = |event: &Event| -> Option<Bytes> {
        visible_type(event, &request.selectors).map(|t| watch_line(t, &event.object))
    };
    let mut opening = Vec::new();
    for object in subscription
        .initial
        .iter()
        .filter(|o| request.selectors.matches(o))
    {
        opening.push(watch_line("ADDED", object));
    }
    if request.initial_events_end {
        opening.push(bookmark(&request.resource, subscription.rv, true));
    }
    opening.extend(subscription.replay.iter().filter_map(|e| send_event(e)));
    for line in opening {
        if sender.send(line).await.is_err() {
            return;
        }
    }

    let deadline = request
        .timeout
        .map(|t| tokio::time::Instant::now() + t)
        .unwrap_or_else(|| tokio::time::Instant::now() + DEFAULT_WATCH_TIMEOUT);
    let interval = state.bookmark_interval.max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            event = subscription.events.recv() => {
                let Some(event) = event else { break };
                if let Some(line) = send_event(&event) {
                    if sender.send(line).await.is_err() {
                        return;
                    }
                }
            }
            _ = ticker.tick(), if request.bookmarks => {
                let (queued, rv) = state.store.drain(&mut subscription.events);
                let mut lines: Vec<Bytes> = queued.iter().filter_map(|e| send_event(e)).collect();
                lines.push(bookmark(&request.resource, rv, false));
                for line in lines {
                    if sender.send(line).await.is_err() {
                        return;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = sender.closed() => break,
        }
    }
}
