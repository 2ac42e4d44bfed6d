//! Functions managed through the control-plane API of a running fngate: created from a zip
//! package, invoked, updated with new code, and deleted.

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use hyper::Method;

/// Writes a zip with an executable `scf_bootstrap` that serves `reply` on every path.
fn web_zip(path: &Path, reply: &str) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("scf_bootstrap", options).unwrap();
    let script = format!(
        "#!/bin/bash\nexec python3 -c '\nimport os\nfrom http.server import HTTPServer, BaseHTTPRequestHandler\nclass H(BaseHTTPRequestHandler):\n    def do_GET(self):\n        body = b\"{reply}\"\n        self.send_response(200)\n        self.send_header(\"Content-Length\", str(len(body)))\n        self.end_headers()\n        self.wfile.write(body)\n    def log_message(self, *a):\n        pass\nHTTPServer((\"127.0.0.1\", int(os.environ[\"PORT\"])), H).serve_forever()\n'\n"
    );
    zip.write_all(script.as_bytes()).unwrap();
    zip.finish().unwrap();
}

async fn put_json(fngate: &Fngate, path: &str, body: &str) -> Reply {
    request(
        fngate.api,
        Method::PUT,
        path,
        body.to_owned(),
        &[("content-type", "application/json")],
    )
    .await
}

#[tokio::test]
async fn function_created_updated_deleted_via_api() {
    let fngate = Fngate::start(tempdir(), "");
    let packages = tempdir();
    let v1 = packages.path().join("v1.zip");
    let v2 = packages.path().join("v2.zip");
    web_zip(&v1, "version one");
    web_zip(&v2, "version two");

    let created = put_json(
        &fngate,
        "/v1/namespaces/shop",
        r#"{"memory_quota_mb": 1024}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());

    let spec = |zip: &Path| {
        format!(
            r#"{{"kind": "web", "code": {{"zip_file": "{}"}}, "keep_warm_ms": 60000}}"#,
            zip.display()
        )
    };
    let created = put_json(&fngate, "/v1/namespaces/shop/functions/cart", &spec(&v1)).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        created.json()["spec"]["concurrency"],
        1,
        "defaults not filled in: {}",
        created.text()
    );

    let reply = get(fngate.proxy, "/web/shop/cart/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "version one");

    let updated = put_json(&fngate, "/v1/namespaces/shop/functions/cart", &spec(&v2)).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let reply = get(fngate.proxy, "/web/shop/cart/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.text(),
        "version two",
        "the old instance still served after a code update"
    );

    let in_use = request(fngate.api, Method::DELETE, "/v1/namespaces/shop", "", &[]).await;
    assert_eq!(in_use.status, 409, "{}", in_use.text());

    let deleted = request(
        fngate.api,
        Method::DELETE,
        "/v1/namespaces/shop/functions/cart",
        "",
        &[],
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text());
    let gone = get(fngate.proxy, "/web/shop/cart/").await;
    assert_eq!(gone.status, 404, "{}", gone.text());
    assert_eq!(gone.error_code(), "FunctionNotFound");
}

#[tokio::test]
async fn invalid_function_rejected_with_field() {
    let fngate = Fngate::start(tempdir(), "");
    let code = web_function(fngate.dir.path(), "site");
    let cases = [
        (
            format!(
                r#"{{"kind": "web", "code": {{"directory": "{}"}}, "concurrency": 0}}"#,
                code.dir.display()
            ),
            "concurrency",
        ),
        (
            r#"{"kind": "web", "code": {"directory": "relative/dir"}}"#.to_owned(),
            "code",
        ),
        (
            format!(
                r#"{{"kind": "event", "code": {{"directory": "{}"}}, "concurrency": 4}}"#,
                code.dir.display()
            ),
            "concurrency",
        ),
        (
            format!(
                r#"{{"kind": "web", "code": {{"directory": "{}"}}, "colour": "red"}}"#,
                code.dir.display()
            ),
            "colour",
        ),
    ];
    for (body, field) in cases {
        let reply = put_json(&fngate, "/v1/namespaces/default/functions/site", &body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert_eq!(reply.error_code(), "InvalidParameterValue", "{body}");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains(field),
            "{body}: message does not name {field}: {message}"
        );
    }
    let missing = get(fngate.api, "/v1/namespaces/default/functions/site").await;
    assert_eq!(
        missing.status,
        404,
        "a rejected function was stored: {}",
        missing.text()
    );
}

/// Writes a zip with `files` (name and content), each readable.
fn plain_zip(path: &Path, files: &[(&str, &str)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    for (name, content) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(content.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
}

/// A function's layers are merged in order into the directory its instances find in
/// `FNGATE_LAYER_DIR`: the later layer's file wins, and reordering the layers replaces the
/// instance. Bad layer lists are rejected naming the field.
#[tokio::test]
async fn layers_merged_for_instances() {
    let fngate = Fngate::start(tempdir(), "");
    let packages = tempdir();
    let code = packages.path().join("code.zip");
    let file = std::fs::File::create(&code).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("scf_bootstrap", options).unwrap();
    zip.write_all(
        b"#!/bin/bash\nexec python3 -c '\nimport os\nfrom http.server import HTTPServer, BaseHTTPRequestHandler\nclass H(BaseHTTPRequestHandler):\n    def do_GET(self):\n        layers = os.environ[\"FNGATE_LAYER_DIR\"]\n        body = open(os.path.join(layers, \"greeting.txt\"), \"rb\").read() + b\" \" + open(os.path.join(layers, \"extra.txt\"), \"rb\").read()\n        self.send_response(200)\n        self.send_header(\"Content-Length\", str(len(body)))\n        self.end_headers()\n        self.wfile.write(body)\n    def log_message(self, *a):\n        pass\nHTTPServer((\"127.0.0.1\", int(os.environ[\"PORT\"])), H).serve_forever()\n'\n",
    )
    .unwrap();
    zip.finish().unwrap();
    let first = packages.path().join("first.zip");
    let second = packages.path().join("second.zip");
    plain_zip(
        &first,
        &[("greeting.txt", "first"), ("extra.txt", "from-first")],
    );
    plain_zip(&second, &[("greeting.txt", "second")]);

    let created = put_json(&fngate, "/v1/namespaces/shop", "{}").await;
    assert_eq!(created.status, 201, "{}", created.text());
    let spec = |layers: &[&Path]| {
        let layers: Vec<String> = layers
            .iter()
            .map(|path| format!(r#"{{"zip_file": "{}"}}"#, path.display()))
            .collect();
        format!(
            r#"{{"kind": "web", "code": {{"zip_file": "{}"}}, "layers": [{}]}}"#,
            code.display(),
            layers.join(", ")
        )
    };
    let path = "/v1/namespaces/shop/functions/greet";
    let created = put_json(&fngate, path, &spec(&[&first, &second])).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let reply = get(fngate.proxy, "/web/shop/greet/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "second from-first");

    let reordered = put_json(&fngate, path, &spec(&[&second, &first])).await;
    assert_eq!(reordered.status, 200, "{}", reordered.text());
    let reply = get(fngate.proxy, "/web/shop/greet/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "first from-first");

    let six = vec![first.as_path(); 6];
    let missing = packages.path().join("missing.zip");
    let cases = [
        (spec(&six), "layers"),
        (spec(&[&first, &missing]), "layers[1].zip_file"),
        (
            format!(
                r#"{{"kind": "web", "code": {{"zip_file": "{}"}}, "layers": [{{"zip_file": "rel.zip"}}]}}"#,
                code.display()
            ),
            "layers[0].zip_file",
        ),
    ];
    for (body, needle) in cases {
        let rejected = put_json(&fngate, path, &body).await;
        assert!(
            (400..500).contains(&rejected.status),
            "{needle}: {}",
            rejected.text()
        );
        let message = rejected.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(needle), "{needle}: {message}");
    }
    let reply = get(fngate.proxy, "/web/shop/greet/").await;
    assert_eq!(
        reply.text(),
        "first from-first",
        "a rejected update changed the function"
    );
}

/// An update that replaces the instances and shortens the timeout lets a request that started
/// under the longer timeout finish on the old instance.
#[tokio::test]
async fn shorter_timeout_update_drains_with_the_old_timeout() {
    let fngate = Fngate::start(tempdir(), "");
    let code = web_function(fngate.dir.path(), "site");
    let created = put_json(&fngate, "/v1/namespaces/shop", "{}").await;
    assert_eq!(created.status, 201, "{}", created.text());
    let spec = |timeout_ms: u64, version: &str| {
        format!(
            r#"{{"kind": "web", "code": {{"directory": "{}"}}, "timeout_ms": {timeout_ms}, "env": {{"VERSION": "{version}"}}}}"#,
            code.dir.display()
        )
    };
    let path = "/v1/namespaces/shop/functions/site";
    let created = put_json(&fngate, path, &spec(20_000, "1")).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let warm = get(fngate.proxy, "/web/shop/site/").await;
    assert_eq!(warm.status, 200, "{}", warm.text());

    let proxy = fngate.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/web/shop/site/?ms=2000").await });
    fngate
        .wait_for_metric(
            "fngate_in_flight_requests",
            &[("namespace", "shop"), ("function", "site")],
            |v| v == 1.0,
        )
        .await;
    let updated = put_json(&fngate, path, &spec(100, "2")).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, 200, "{}\n{}", slow.text(), fngate.stderr());
}
