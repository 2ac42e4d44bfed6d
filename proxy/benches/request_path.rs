//! A bounded request loop through the proxy, meant to run under callgrind so that the cost of a
//! request is counted in instructions, which other load on the machine does not change.
//!
//! The measured process is the proxy alone: `server::bind` and `serve_proxy` with one web and
//! one event function, on a current-thread tokio runtime. It starts two copies of this binary as child processes, which callgrind does not trace
//! by default: a hyper upstream on loopback port 0, and a client that sends requests one after
//! another over a keep-alive connection per function kind. The proxy exits when the client is
//! done, and the upstream exits when its standard input closes.
//!
//! Options (after `--` under `cargo bench`, or directly to the binary):
//! - `--requests N`: requests per function kind (default 20000, or 200 in test mode)
//! - `--kind web|event|both`: which functions to call (default both)
//! - `--connections N`: client connections per kind, sending at the same time (default 1)
//!
//! Instructions per request are the difference between two runs divided by the difference in
//! requests, which cancels start-up and shutdown. `count_instructions.sh` beside this file runs
//! the pairs and averages them. By hand:
//!
//! ```text
//! cargo bench -p fngate-proxy --bench request_path --no-run   # prints the binary's path
//! valgrind --tool=callgrind --callgrind-out-file=web-2k.out BIN --bench --kind web --requests 2000
//! valgrind --tool=callgrind --callgrind-out-file=web-22k.out BIN --bench --kind web --requests 22000
//! callgrind_annotate --inclusive=yes web-22k.out | head -60
//! ```
//!
//! The count per request varies by about 1% between runs, because how often the proxy wakes up
//! for one request depends on the client's timing. Compare means of a few runs.
//!
//! Without `--bench` (as `cargo test --benches` runs it) or with `--test`, the loop sends 200
//! requests per kind and checks every response, so CI keeps it working.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fngate_proxy::{server, FunctionKey, FunctionKind, FunctionSettings, Instance, Proxy, Router};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// The allocator of the `fngate` binary, so that the count is that of the shipped proxy. Remove
/// this item to count with the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Maximum time any of the three processes runs before it exits with an error.
const RUN_LIMIT: Duration = Duration::from_secs(600);

const EVENT_BODY: &[u8] = br#"{"name":"fngate","count":1}"#;
const WEB_RESPONSE: &[u8] = b"hello from the web function\n";
const EVENT_RESPONSE: &[u8] = br#"{"ok":true}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Web,
    Event,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Web => "web",
            Kind::Event => "event",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Proxy,
    Upstream,
    Client,
}

struct Options {
    role: Role,
    requests: usize,
    kinds: Vec<Kind>,
    connections: usize,
    /// The proxy's address, for the client.
    target: Option<SocketAddr>,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
        let mut options = Options {
            role: Role::Proxy,
            requests: if bench_mode { 20_000 } else { 200 },
            kinds: vec![Kind::Web, Kind::Event],
            connections: 1,
            target: None,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_default();
            match arg.as_str() {
                "--requests" => options.requests = parse_number("--requests", &value())?,
                "--connections" => {
                    options.connections = parse_number("--connections", &value())?.max(1)
                }
                "--kind" => {
                    options.kinds = match value().as_str() {
                        "web" => vec![Kind::Web],
                        "event" => vec![Kind::Event],
                        "both" => vec![Kind::Web, Kind::Event],
                        other => {
                            return Err(format!(
                                "invalid --kind {other:?}; pass web, event or both"
                            ))
                        }
                    }
                }
                "--role" => {
                    options.role = match value().as_str() {
                        "upstream" => Role::Upstream,
                        "client" => Role::Client,
                        other => return Err(format!("invalid --role {other:?}")),
                    }
                }
                "--target" => {
                    let target = value();
                    let addr = target
                        .parse()
                        .map_err(|_| format!("invalid --target {target:?}; pass an address"))?;
                    options.target = Some(addr);
                }
                // Flags cargo passes to every bench target, and criterion-style filters.
                _ => {}
            }
        }
        Ok(options)
    }
}

fn parse_number(flag: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("invalid {flag} {value:?}; pass a whole number"))
}

fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("request_path: {message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let finished = runtime.block_on(async {
        let role = async {
            match options.role {
                Role::Proxy => run_proxy(&options).await,
                Role::Upstream => run_upstream().await,
                Role::Client => run_client(&options).await,
            }
        };
        tokio::time::timeout(RUN_LIMIT, role).await
    });
    if finished.is_err() {
        eprintln!(
            "request_path: {:?} timed out after {}s",
            options.role,
            RUN_LIMIT.as_secs()
        );
        std::process::exit(1);
    }
}

/// Starts the upstream and the proxy, runs the client to the end, and stops the upstream.
async fn run_proxy(options: &Options) {
    let exe = std::env::current_exe().expect("path of this binary");
    let mut upstream = Command::new(&exe)
        .args(["--role", "upstream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the upstream process");
    let mut first_line = String::new();
    let stdout = upstream.stdout.take().expect("upstream stdout");
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .await
        .expect("read the upstream address");
    let upstream_addr: SocketAddr = first_line.trim().parse().expect("upstream address");

    let proxy_addr = start_proxy(upstream_addr).await;
    let kinds: Vec<&str> = options.kinds.iter().map(|k| k.name()).collect();
    let kind = if kinds.len() == 1 { kinds[0] } else { "both" };
    let status = Command::new(&exe)
        .args(["--role", "client", "--kind", kind])
        .args(["--requests", &options.requests.to_string()])
        .args(["--connections", &options.connections.to_string()])
        .args(["--target", &proxy_addr.to_string()])
        .kill_on_drop(true)
        .status()
        .await
        .expect("run the client process");
    drop(upstream.stdin.take());
    let _ = upstream.wait().await;
    assert!(status.success(), "the client failed: {status}");
}

/// Serves until standard input closes. Answers `POST /event-invoke` as an event function and
/// any other request as a web function. Prints its address as the first line of its output.
async fn run_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    println!("{}", listener.local_addr().expect("upstream address"));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let service = service_fn(|request: Request<Incoming>| async move {
                let event = request.uri().path() == "/event-invoke";
                let _ = request.into_body().collect().await;
                let (body, content_type) = if event {
                    (EVENT_RESPONSE, "application/json")
                } else {
                    (WEB_RESPONSE, "text/plain")
                };
                let response = Response::builder()
                    .header(http::header::CONTENT_TYPE, content_type)
                    .body(Full::new(Bytes::from_static(body)));
                Ok::<_, Infallible>(response.expect("valid response"))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
}

async fn start_proxy(upstream: SocketAddr) -> SocketAddr {
    fngate_proxy::metrics::install_recorder();
    let router = Arc::new(Router::new());
    for (name, kind) in [("web", FunctionKind::Web), ("event", FunctionKind::Event)] {
        let key = FunctionKey {
            namespace: "default".to_owned(),
            name: name.to_owned(),
            qualifier: "$LATEST".to_owned(),
        };
        let settings = FunctionSettings {
            kind,
            memory_mb: 128,
            timeout: Duration::from_secs(10),
            queue_budget: Duration::from_secs(5),
            queue_limit: 100,
            max_body_bytes: 1 << 20,
            concurrency: 4,
        };
        let function = router.upsert(key, settings);
        let instance = Instance::new(1, upstream, 4, Duration::ZERO);
        function.pool.add_instance(Arc::new(instance));
    }
    router.mark_synced();
    let listener = server::bind("127.0.0.1:0".parse().expect("valid address")).expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let proxy = Arc::new(Proxy::new(router));
    tokio::spawn(server::serve_proxy(
        listener,
        proxy,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    addr
}

/// Sends the requests of each kind over `connections` keep-alive connections at once.
async fn run_client(options: &Options) {
    let target = options.target.expect("--target is set for the client");
    for &kind in &options.kinds {
        let start = Instant::now();
        let per_connection = options.requests / options.connections;
        let extra = options.requests % options.connections;
        let mut connections = Vec::new();
        for index in 0..options.connections {
            let count = per_connection + usize::from(index < extra);
            connections.push(tokio::spawn(async move {
                let mut client = connect(target).await;
                for _ in 0..count {
                    send(&mut client, kind).await;
                }
            }));
        }
        for connection in connections {
            connection.await.expect("client connection task");
        }
        let elapsed = start.elapsed();
        println!(
            "request_path: {}: {} requests in {:.3}s ({:.1}us each, wall clock)",
            kind.name(),
            options.requests,
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / options.requests.max(1) as f64,
        );
    }
}

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    sender
}

/// Sends one request and reads the whole response, checking that it succeeded.
async fn send(client: &mut SendRequest<Full<Bytes>>, kind: Kind) {
    let (method, path, body) = match kind {
        Kind::Web => (Method::GET, "/web/default/web/hello?x=1", Bytes::new()),
        Kind::Event => (
            Method::POST,
            "/functions/default/event/invocations",
            Bytes::from_static(EVENT_BODY),
        ),
    };
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::USER_AGENT, "request_path")
        .header(http::header::ACCEPT, "*/*")
        .body(Full::new(body))
        .expect("valid request");
    client.ready().await.expect("connection ready");
    let response = client.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    assert_eq!(status, StatusCode::OK, "{kind:?} request failed: {body:?}");
    let expected = match kind {
        Kind::Web => WEB_RESPONSE,
        Kind::Event => EVENT_RESPONSE,
    };
    assert_eq!(&body[..], expected, "{kind:?} response body differs");
}
