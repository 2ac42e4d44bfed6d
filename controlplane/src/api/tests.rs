//! The API end to end against an in-memory fake of the platform: routing, statuses, bodies,
//! errors, and the server loop over a loopback socket.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::*;

/// Namespaces by name, each with its functions by name.
type Store = BTreeMap<String, (NamespaceSpec, BTreeMap<String, FunctionSpec>)>;

/// A platform that stores specs in memory, with `Platform`'s outcomes for the API's cases.
#[derive(Default)]
struct FakeControl {
    namespaces: Mutex<Store>,
}

/// Returns the error `Platform` gives a replica of a namespace in default mode.
fn replicas_unsupported(namespace: &str) -> PlatformError {
    PlatformError::Conflict(format!(
        "namespace {namespace:?}: proxy replicas serve k8s-mode namespaces only"
    ))
}

fn not_found(what: String) -> PlatformError {
    PlatformError::NotFound { what }
}

fn status_of(spec: &FunctionSpec) -> FunctionStatus {
    FunctionStatus {
        spec: spec.clone(),
        code_dir: PathBuf::from("/code"),
        instances: Vec::new(),
    }
}

impl Control for FakeControl {
    async fn put_namespace(&self, spec: NamespaceSpec) -> Result<Applied, PlatformError> {
        crate::validate::namespace(&spec)?;
        let mut namespaces = self.namespaces.lock();
        let entry = namespaces.entry(spec.name.clone());
        match entry {
            std::collections::btree_map::Entry::Occupied(mut existing) => {
                if existing.get().0 == spec {
                    return Ok(Applied::Unchanged);
                }
                existing.get_mut().0 = spec;
                Ok(Applied::Updated)
            }
            std::collections::btree_map::Entry::Vacant(vacant) => {
                vacant.insert((spec, BTreeMap::new()));
                Ok(Applied::Created)
            }
        }
    }

    async fn delete_namespace(&self, name: &str) -> Result<(), PlatformError> {
        let mut namespaces = self.namespaces.lock();
        let (_, functions) = namespaces
            .get(name)
            .ok_or_else(|| not_found(format!("namespace {name:?}")))?;
        if !functions.is_empty() {
            return Err(PlatformError::Conflict(format!(
                "namespace {name:?} has functions"
            )));
        }
        namespaces.remove(name);
        Ok(())
    }

    fn namespaces(&self) -> Vec<NamespaceSpec> {
        self.namespaces
            .lock()
            .values()
            .map(|(spec, _)| spec.clone())
            .collect()
    }

    fn binding_status(&self, _namespace: &str) -> Option<crate::k8s::install::BindingStatus> {
        None
    }

    async fn package(&self, digest: &str) -> Result<Bytes, PlatformError> {
        Err(not_found(format!("package sha256:{digest}")))
    }

    async fn put_function(&self, spec: FunctionSpec) -> Result<Applied, PlatformError> {
        crate::validate::function(&spec)?;
        let mut namespaces = self.namespaces.lock();
        let (_, functions) = namespaces
            .get_mut(&spec.namespace)
            .ok_or_else(|| not_found(format!("namespace {:?}", spec.namespace)))?;
        let applied = match functions.get(&spec.name) {
            None => Applied::Created,
            Some(existing) if *existing == spec => Applied::Unchanged,
            Some(_) => Applied::Updated,
        };
        functions.insert(spec.name.clone(), spec);
        Ok(applied)
    }

    async fn delete_function(&self, namespace: &str, name: &str) -> Result<(), PlatformError> {
        let mut namespaces = self.namespaces.lock();
        let (_, functions) = namespaces
            .get_mut(namespace)
            .ok_or_else(|| not_found(format!("namespace {namespace:?}")))?;
        functions
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(format!("function {name:?}")))
    }

    fn functions(&self, namespace: &str) -> Result<Vec<FunctionStatus>, PlatformError> {
        let namespaces = self.namespaces.lock();
        let (_, functions) = namespaces
            .get(namespace)
            .ok_or_else(|| not_found(format!("namespace {namespace:?}")))?;
        Ok(functions.values().map(status_of).collect())
    }

    fn function(&self, namespace: &str, name: &str) -> Result<FunctionStatus, PlatformError> {
        let namespaces = self.namespaces.lock();
        let (_, functions) = namespaces
            .get(namespace)
            .ok_or_else(|| not_found(format!("namespace {namespace:?}")))?;
        functions
            .get(name)
            .map(status_of)
            .ok_or_else(|| not_found(format!("function {name:?}")))
    }

    fn replicas(&self, _namespace: &str) -> Vec<crate::platform::ReplicaStatus> {
        Vec::new()
    }

    async fn replica_routes(
        &self,
        namespace: &str,
        _replica: &str,
        _session: Option<&str>,
        _after: Option<u64>,
    ) -> Result<Routes, PlatformError> {
        Err(replicas_unsupported(namespace))
    }

    fn replica_report(
        &self,
        namespace: &str,
        _replica: &str,
        _session: Option<&str>,
        _report: &Report,
    ) -> Result<ReportResponse, PlatformError> {
        Err(replicas_unsupported(namespace))
    }
}

/// Sends one request through the handler; returns the status, the `Allow` header and the
/// body parsed as JSON (`Null` when empty).
async fn call(
    control: &FakeControl,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, Option<String>, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = handler::handle(control, request).await;
    let status = response.status();
    let allow = response
        .headers()
        .get(ALLOW)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, allow, value)
}

const HELLO: &str = r#"{"kind": "web", "code": {"directory": "/srv/hello"}, "concurrency": 4}"#;

async fn control_with_default() -> FakeControl {
    let control = FakeControl::default();
    let (status, _, _) = call(&control, Method::PUT, "/v1/namespaces/default", "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    control
}

#[tokio::test]
async fn healthz_ok() {
    let (status, _, body) = call(&FakeControl::default(), Method::GET, "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok"}));
}

#[tokio::test]
async fn missing_package_is_json_404() {
    let path = format!("/v1/packages/{}", "ab".repeat(32));
    let (status, allow, body) = call(&FakeControl::default(), Method::PUT, &path, "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(allow.as_deref(), Some("GET"));
    assert_eq!(body["error"]["code"], "MethodNotAllowed");
    let (status, _, body) = call(&FakeControl::default(), Method::GET, &path, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sha256:abab"),
        "{body}"
    );
}

#[tokio::test]
async fn namespace_lifecycle() {
    let control = FakeControl::default();
    let path = "/v1/namespaces/batch";
    let (status, _, body) = call(&control, Method::PUT, path, r#"{"memory_quota_mb": 512}"#).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body, json!({"name": "batch", "memory_quota_mb": 512}));

    let (status, _, _) = call(&control, Method::PUT, path, r#"{"memory_quota_mb": 512}"#).await;
    assert_eq!(status, StatusCode::OK, "unchanged");
    let (status, _, _) = call(&control, Method::PUT, path, r#"{"memory_quota_mb": 1024}"#).await;
    assert_eq!(status, StatusCode::OK, "updated");

    let (status, _, body) = call(&control, Method::GET, path, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["memory_quota_mb"], 1024);
    let (status, _, body) = call(&control, Method::GET, "/v1/namespaces", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"namespaces": [{"name": "batch", "memory_quota_mb": 1024}]})
    );

    let (status, _, body) = call(&control, Method::DELETE, path, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(body, Value::Null);
    let (status, _, body) = call(&control, Method::DELETE, path, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "ResourceNotFound");
    let (status, _, _) = call(&control, Method::GET, path, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn namespace_name_mismatch_rejected() {
    let control = FakeControl::default();
    let (status, _, body) = call(
        &control,
        Method::PUT,
        "/v1/namespaces/a",
        r#"{"name": "b"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "InvalidParameterValue");
    assert!(control.namespaces().is_empty(), "nothing stored");
}

#[tokio::test]
async fn namespace_with_functions_conflicts() {
    let control = control_with_default().await;
    let path = "/v1/namespaces/default/functions/hello";
    let (status, _, _) = call(&control, Method::PUT, path, HELLO).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _, body) = call(&control, Method::DELETE, "/v1/namespaces/default", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "ResourceInUse");
}

#[tokio::test]
async fn function_lifecycle() {
    let control = control_with_default().await;
    let path = "/v1/namespaces/default/functions/hello";
    let (status, _, body) = call(&control, Method::PUT, path, HELLO).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["spec"]["namespace"], "default");
    assert_eq!(body["spec"]["name"], "hello");
    assert_eq!(body["spec"]["concurrency"], 4);
    assert_eq!(body["code_dir"], "/code");
    assert_eq!(body["instances"], json!([]));

    let (status, _, _) = call(&control, Method::PUT, path, HELLO).await;
    assert_eq!(status, StatusCode::OK, "unchanged");
    let (status, _, body) = call(&control, Method::GET, path, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["spec"]["name"], "hello");
    let list = "/v1/namespaces/default/functions";
    let (status, _, body) = call(&control, Method::GET, list, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["functions"].as_array().map(Vec::len), Some(1));

    let (status, _, _) = call(&control, Method::DELETE, path, "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, body) = call(&control, Method::GET, path, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "ResourceNotFound");
}

#[tokio::test]
async fn function_errors_mapped() {
    let control = control_with_default().await;
    let path = "/v1/namespaces/default/functions/hello";
    let cases = [
        (
            r#"{"kind": "event", "code": {"directory": "/a"}, "concurrency": 2}"#,
            "concurrency",
        ),
        (
            r#"{"name": "other", "kind": "web", "code": {"directory": "/a"}}"#,
            "other",
        ),
        (
            r#"{"kind": "web", "code": {"directory": "/a"}, "extra": 1}"#,
            "unknown field `extra`",
        ),
        ("{\"kind\": \"web\",", "line 1 column"),
        (
            r#"{"kind": "web", "code": {}}"#,
            "`code` takes exactly one of `directory` or `zip_file`",
        ),
        ("[]", "must be a JSON object"),
    ];
    for (body, expected) in cases {
        let (status, _, reply) = call(&control, Method::PUT, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply["error"]["code"], "InvalidParameterValue", "{body}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    let missing = "/v1/namespaces/absent/functions/hello";
    let (status, _, _) = call(&control, Method::PUT, missing, HELLO).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&control, Method::GET, "/v1/namespaces/absent/functions", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_route_not_found() {
    let control = FakeControl::default();
    for path in ["/", "/v1/namespace", "/v1/namespaces/a/functions/f/x"] {
        let (status, _, body) = call(&control, Method::GET, path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "RouteNotFound", "{path}");
    }
}

#[tokio::test]
async fn wrong_method_lists_allowed() {
    let control = FakeControl::default();
    let cases = [
        (Method::POST, "/v1/namespaces", "GET"),
        (Method::DELETE, "/healthz", "GET"),
        (
            Method::POST,
            "/v1/namespaces/a/functions/f",
            "GET, PUT, DELETE",
        ),
        (Method::PATCH, "/v1/namespaces/a", "GET, PUT, DELETE"),
    ];
    for (method, path, allow) in cases {
        let (status, allowed, body) = call(&control, method.clone(), path, "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(allowed.as_deref(), Some(allow), "{method} {path}");
        assert_eq!(body["error"]["code"], "MethodNotAllowed");
    }
}

#[tokio::test]
async fn oversized_body_rejected() {
    let control = control_with_default().await;
    let body = format!("{HELLO}{}", " ".repeat(MAX_BODY_BYTES));
    let (status, _, reply) = call(
        &control,
        Method::PUT,
        "/v1/namespaces/default/functions/f",
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply["error"]["code"], "RequestTooLarge");
}

/// Sends one HTTP/1.1 request over a new loopback connection.
async fn send(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: &'static str,
) -> (StatusCode, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header(CONTENT_TYPE, "text/plain")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, value)
}

#[tokio::test]
async fn serves_over_loopback_until_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let control = Arc::new(FakeControl::default());
    let server = tokio::spawn(serve_control(listener, Arc::clone(&control), async {
        let _ = stopped.await;
    }));

    let (status, body) = send(addr, Method::GET, "/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    // The content type declares text, but a body that parses as JSON is accepted.
    let (status, body) = send(addr, Method::PUT, "/v1/namespaces/web", "{}").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["name"], "web");
    assert_eq!(control.namespaces().len(), 1);

    stop.send(()).unwrap();
    server.await.unwrap();
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "listener closed after shutdown");
}

/// A namespace read back with its status fields is accepted, and those fields change nothing;
/// other unknown fields are still rejected.
#[tokio::test]
async fn namespace_put_ignores_status_fields() {
    let control = control_with_default().await;
    let body = r#"{"memory_quota_mb": 512, "status": {"phase": "Normal"}, "replicas": []}"#;
    let (status, _, spec) = call(&control, Method::PUT, "/v1/namespaces/default", body).await;
    assert_eq!(status, StatusCode::OK, "{spec}");
    assert_eq!(spec["memory_quota_mb"], 512);
    assert!(spec.get("status").is_none(), "{spec}");

    let body = r#"{"memory_quota_mb": 512, "replica": []}"#;
    let (status, _, error) = call(&control, Method::PUT, "/v1/namespaces/default", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("replica"), "{message}");
}

/// A body that stops arriving is given up after the read limit with a 408 naming it, so a
/// stalled client cannot hold the request forever.
#[tokio::test(start_paused = true)]
async fn stalled_body_times_out() {
    let stalled = http_body_util::StreamBody::new(futures_util::stream::pending::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >());
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/v1/namespaces/default")
        .body(stalled)
        .unwrap();
    let response = handler::handle(&FakeControl::default(), request).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"]["code"], "RequestTimeout");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("30 s"),
        "{body}"
    );
}
