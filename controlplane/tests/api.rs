//! The control-plane API over loopback HTTP against a real `Platform`, whose backend starts
//! nothing: functions keep zero instances, so only the store and the API are exercised.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fngate_controlplane::api;
use fngate_controlplane::backend::{
    BoxFuture, InstanceBackend, InstanceFailure, RunningInstance, StartRequest,
};
use fngate_controlplane::platform::{Platform, PlatformConfig};
use fngate_proxy::Router;
use http_body_util::{BodyExt, Full};
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zip::write::SimpleFileOptions;
use zip::ZipWriter;

/// A backend whose every start fails, so a test notices if an instance is started.
struct NoInstances;

impl InstanceBackend for NoInstances {
    fn start(
        &self,
        request: StartRequest,
    ) -> BoxFuture<'_, Result<Box<dyn RunningInstance>, InstanceFailure>> {
        Box::pin(async move {
            Err(InstanceFailure::Spawn(format!(
                "test backend starts no instances (instance {})",
                request.instance_id
            )))
        })
    }
}

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    platform: Arc<Platform>,
    dir: tempfile::TempDir,
}

async fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = PlatformConfig {
        function_dir: dir.path().join("functions"),
        api_url: None,
    };
    let platform = Arc::new(Platform::new(
        config,
        Arc::new(Router::new()),
        Arc::new(NoInstances),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve(listener, Arc::clone(&platform), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop,
        task,
        platform,
        dir,
    }
}

impl Server {
    async fn shutdown(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
        self.platform.shutdown().await;
    }
}

struct Reply {
    status: StatusCode,
    allow: Option<String>,
    body: Value,
}

/// Sends one request over a new connection; the body is parsed as JSON (`Null` when empty).
async fn send(addr: SocketAddr, method: Method, path: &str, body: String) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let allow = response
        .headers()
        .get(ALLOW)
        .map(|value| value.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Reply {
        status,
        allow,
        body,
    }
}

async fn get(server: &Server, path: &str) -> Reply {
    send(server.addr, Method::GET, path, String::new()).await
}

async fn put(server: &Server, path: &str, body: Value) -> Reply {
    send(server.addr, Method::PUT, path, body.to_string()).await
}

async fn delete(server: &Server, path: &str) -> Reply {
    send(server.addr, Method::DELETE, path, String::new()).await
}

/// Creates `dir` with an executable `scf_bootstrap`, and returns `dir`.
fn web_code_dir(dir: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = dir.join("scf_bootstrap");
    std::fs::write(&bootstrap, "#!/bin/sh\nexec python3 app.py\n").unwrap();
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes a zip archive of stored entries: (name, Unix mode, contents).
fn write_zip(path: &Path, entries: &[(&str, u32, &str)]) {
    let bytes = zip_bytes(entries);
    std::fs::write(path, bytes).unwrap();
}

fn zip_bytes(entries: &[(&str, u32, &str)]) -> Vec<u8> {
    let mut zip = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, mode, contents) in entries {
        let options = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(*mode);
        zip.start_file(*name, options).unwrap();
        zip.write_all(contents.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Writes a zip archive with `scf_bootstrap` twice. `ZipWriter` rejects a repeated name, so
/// the second entry is written as `scf_bootstraq` and renamed in the bytes. Both names have the
/// same length, so no offset moves.
fn write_zip_with_repeated_bootstrap(path: &Path) {
    let mut bytes = zip_bytes(&[
        ("scf_bootstrap", 0o755, "#!/bin/sh\necho first\n"),
        ("scf_bootstraq", 0o755, "#!/bin/sh\necho second\n"),
    ]);
    let (from, to) = (b"scf_bootstraq", b"scf_bootstrap");
    let mut replaced = 0;
    for start in 0..=bytes.len() - from.len() {
        if &bytes[start..start + from.len()] == from {
            bytes[start..start + from.len()].copy_from_slice(to);
            replaced += 1;
        }
    }
    assert_eq!(
        replaced, 2,
        "the name is in the local and the central header"
    );
    std::fs::write(path, bytes).unwrap();
}

/// Code packages that must be rejected, each with a part of the expected message.
fn bad_packages(dir: &Path) -> Vec<(Value, &'static str)> {
    let no_bootstrap = dir.join("no-bootstrap.zip");
    write_zip(&no_bootstrap, &[("app.py", 0o644, "print('hi')\n")]);
    let nested = dir.join("nested.zip");
    write_zip(&nested, &[("hello/scf_bootstrap", 0o755, "#!/bin/sh\n")]);
    let repeated = dir.join("repeated.zip");
    write_zip_with_repeated_bootstrap(&repeated);
    let not_executable = web_code_dir(dir.join("not-executable"));
    let bootstrap = not_executable.join("scf_bootstrap");
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o644)).unwrap();
    vec![
        (
            json!({"zip_file": no_bootstrap}),
            "has no `scf_bootstrap` at its root",
        ),
        (
            json!({"zip_file": nested}),
            "inside the top-level folder `hello/`",
        ),
        (
            json!({"zip_file": repeated}),
            "entry \"scf_bootstrap\" appears twice",
        ),
        (json!({"directory": not_executable}), "chmod +x"),
    ]
}

#[tokio::test]
async fn healthz_answers() {
    let server = start_server().await;
    let reply = get(&server, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.shutdown().await;
}

#[tokio::test]
async fn namespace_crud() {
    let server = start_server().await;
    let path = "/v1/namespaces/batch";

    let reply = put(&server, path, json!({"memory_quota_mb": 512})).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.body, json!({"name": "batch", "memory_quota_mb": 512}));
    let reply = put(
        &server,
        path,
        json!({"name": "batch", "memory_quota_mb": 512}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = put(&server, path, json!({"memory_quota_mb": 1024})).await;
    assert_eq!(reply.status, StatusCode::OK);

    let reply = get(&server, "/v1/namespaces").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.body,
        json!({"namespaces": [{"name": "batch", "memory_quota_mb": 1024}]})
    );
    let reply = get(&server, path).await;
    assert_eq!(reply.body["memory_quota_mb"], 1024);

    let reply = delete(&server, path).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let reply = delete(&server, path).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["error"]["code"], "ResourceNotFound");
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_namespace_rejected() {
    let server = start_server().await;
    let reply = put(&server, "/v1/namespaces/9bad", json!({})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["error"]["code"], "InvalidParameterValue");
    let reply = put(&server, "/v1/namespaces/a", json!({"name": "b"})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    server.shutdown().await;
}

#[tokio::test]
async fn function_crud() {
    let server = start_server().await;
    let code = web_code_dir(server.dir.path().join("hello"));
    put(&server, "/v1/namespaces/default", json!({})).await;
    let path = "/v1/namespaces/default/functions/hello";
    let spec = json!({"kind": "web", "code": {"directory": code}, "concurrency": 4});

    let reply = put(&server, path, spec.clone()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["spec"]["name"], "hello");
    assert_eq!(reply.body["spec"]["namespace"], "default");
    assert_eq!(reply.body["spec"]["concurrency"], 4);
    let code_dir = std::fs::canonicalize(&code).unwrap();
    assert_eq!(reply.body["code_dir"], json!(code_dir));
    assert_eq!(reply.body["instances"], json!([]), "no demand, no instance");

    let reply = put(&server, path, spec).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = get(&server, "/v1/namespaces/default/functions").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["functions"].as_array().map(Vec::len), Some(1));

    let reply = delete(&server, "/v1/namespaces/default").await;
    assert_eq!(reply.status, StatusCode::CONFLICT);
    assert_eq!(reply.body["error"]["code"], "ResourceInUse");

    let reply = delete(&server, path).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let reply = get(&server, path).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = delete(&server, "/v1/namespaces/default").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    server.shutdown().await;
}

#[tokio::test]
async fn function_errors_reported() {
    let server = start_server().await;
    put(&server, "/v1/namespaces/default", json!({})).await;
    let path = "/v1/namespaces/default/functions/hello";
    let missing = server.dir.path().join("missing");

    let reply = put(
        &server,
        path,
        json!({"kind": "web", "code": {"directory": missing}}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["error"]["code"], "InvalidCode");

    let spec = json!({"kind": "event", "code": {"directory": "/"}, "concurrency": 3});
    let reply = put(&server, path, spec).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["error"]["code"], "InvalidParameterValue");

    let reply = send(server.addr, Method::PUT, path, "{\"kind\":".to_owned()).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 1 column"), "{message}");

    let spec = json!({"kind": "web", "code": {"directory": "/"}});
    let reply = put(&server, "/v1/namespaces/absent/functions/hello", spec).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_package_rejected_on_create() {
    let server = start_server().await;
    put(&server, "/v1/namespaces/default", json!({})).await;
    let path = "/v1/namespaces/default/functions/hello";
    for (code, expected) in bad_packages(server.dir.path()) {
        let reply = put(&server, path, json!({"kind": "web", "code": code})).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{code}: {}",
            reply.body
        );
        assert_eq!(reply.body["error"]["code"], "InvalidCode", "{code}");
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{code}: {message}");
        let reply = get(&server, path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{code}: not stored");
    }
    let leftovers = server.dir.path().join("functions/default");
    assert!(
        !leftovers.exists(),
        "rejected packages leave no directories: {}",
        leftovers.display()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn rejected_update_keeps_running_version() {
    let server = start_server().await;
    put(&server, "/v1/namespaces/default", json!({})).await;
    let path = "/v1/namespaces/default/functions/hello";
    let archive = server.dir.path().join("hello.zip");
    write_zip(&archive, &[("scf_bootstrap", 0o755, "#!/bin/sh\n")]);
    let spec = json!({"kind": "web", "code": {"zip_file": archive}, "concurrency": 4});
    let reply = put(&server, path, spec).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let running = get(&server, path).await.body;
    let running_dir = PathBuf::from(running["code_dir"].as_str().unwrap());

    for (code, expected) in bad_packages(server.dir.path()) {
        let update = json!({"kind": "web", "code": code, "concurrency": 8});
        let reply = put(&server, path, update).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{code}: {}",
            reply.body
        );
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{code}: {message}");
        let reply = get(&server, path).await;
        assert_eq!(reply.body, running, "{code}: running version changed");
    }
    assert!(running_dir.join("scf_bootstrap").is_file());
    let versions = std::fs::read_dir(running_dir.parent().unwrap()).unwrap();
    assert_eq!(versions.count(), 1, "rejected versions are removed");

    // An event function with the custom runtime runs `bootstrap`, or `scf_bootstrap` when
    // there is none, so the same package may become one.
    let update = json!({"kind": "event", "code": {"zip_file": archive}});
    let reply = put(&server, path, update).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["spec"]["kind"], "event");
    assert_eq!(reply.body["code_dir"], running["code_dir"]);
    server.shutdown().await;
}

#[tokio::test]
async fn memory_above_quota_rejected() {
    let server = start_server().await;
    let reply = put(
        &server,
        "/v1/namespaces/batch",
        json!({"memory_quota_mb": 256}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let path = "/v1/namespaces/batch/functions/resize";
    let code = web_code_dir(server.dir.path().join("resize"));

    let spec = json!({"kind": "web", "code": {"directory": code}, "memory_mb": 512});
    let reply = put(&server, path, spec).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "InvalidParameterValue");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("invalid memory_mb:"), "{message}");
    assert!(message.contains("512 MB"), "{message}");
    assert!(message.contains("quota of 256 MB"), "{message}");
    assert_eq!(get(&server, path).await.status, StatusCode::NOT_FOUND);

    let spec = json!({"kind": "web", "code": {"directory": code}, "memory_mb": 256});
    let reply = put(&server, path, spec).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    server.shutdown().await;
}

#[tokio::test]
async fn quota_below_function_memory_conflicts() {
    let server = start_server().await;
    let namespace = "/v1/namespaces/batch";
    put(&server, namespace, json!({"memory_quota_mb": 1024})).await;
    let code = web_code_dir(server.dir.path().join("resize"));
    let spec = json!({"kind": "web", "code": {"directory": code}, "memory_mb": 512});
    let reply = put(&server, "/v1/namespaces/batch/functions/resize", spec).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);

    let reply = put(&server, namespace, json!({"memory_quota_mb": 256})).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
    assert_eq!(reply.body["error"]["code"], "ResourceInUse");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"resize\" (512 MB)"), "{message}");
    assert_eq!(get(&server, namespace).await.body["memory_quota_mb"], 1024);

    for quota in [512, 0] {
        let reply = put(&server, namespace, json!({"memory_quota_mb": quota})).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "quota {quota}: {}",
            reply.body
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_specs_explained() {
    let server = start_server().await;
    put(&server, "/v1/namespaces/default", json!({})).await;
    let path = "/v1/namespaces/default/functions/hello";
    let cases = [
        (
            json!({"kind": "web", "code": {}}),
            "`code` takes exactly one of `directory` or `zip_file`, got neither",
        ),
        (
            json!({"kind": "web", "code": {"directory": "/a", "zip_file": "/b"}}),
            "`code` takes exactly one of `directory` or `zip_file`, got more than one",
        ),
        (json!([]), "must be a JSON object"),
    ];
    for (body, expected) in cases {
        let reply = put(&server, path, body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.body["error"]["code"], "InvalidParameterValue");
        let message = reply.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn routing_errors_reported() {
    let server = start_server().await;
    let reply = get(&server, "/v1/unknown").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.body["error"]["code"], "RouteNotFound");

    let reply = send(server.addr, Method::POST, "/v1/namespaces", String::new()).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.allow.as_deref(), Some("GET"));

    server.shutdown().await;
}

#[tokio::test]
async fn oversized_body_rejected_early() {
    let server = start_server().await;
    // Only the headers are sent: the server must respond from Content-Length alone. Sending the
    // body as well would race the server closing the connection on unread data.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "PUT /v1/namespaces/a HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n\r\n",
        server.addr,
        api::MAX_BODY_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response));
    read.await
        .expect("server did not close the connection")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    assert!(response.contains("RequestTooLarge"), "{response}");
    server.shutdown().await;
}
