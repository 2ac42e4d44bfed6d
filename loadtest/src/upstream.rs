//! The benchmark function instance: a minimal HTTP/1.1 server. `GET` returns a small fixed body
//! and `POST` streams the request body back. It listens on `$FNGATE_INSTANCE_IP:$PORT` (defaults
//! `127.0.0.1` and 0, a port the kernel picks), prints the bound address on one line and runs
//! until SIGTERM or SIGINT.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Body of every `GET` response.
pub const GET_BODY: &[u8] = b"hello from fngate-loadtest\n";

/// Prefix of the line printed once the listener is bound; the address follows it.
pub const LISTENING_PREFIX: &str = "fngate-loadtest upstream listening on ";

/// Options of the `upstream` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Tokio worker threads; 1 runs a single-threaded runtime, 0 uses one per CPU core.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

/// Runs the server until SIGTERM or SIGINT.
pub fn run(args: &UpstreamArgs) -> anyhow::Result<()> {
    let addr = listen_addr()?;
    let runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if args.workers > 1 {
            builder.worker_threads(args.workers);
        }
        builder.enable_all().build()
    }
    .context("failed to start the tokio runtime")?;
    runtime.block_on(serve(addr))
}

fn listen_addr() -> anyhow::Result<SocketAddr> {
    let ip = match std::env::var("FNGATE_INSTANCE_IP") {
        Ok(value) => value
            .parse::<IpAddr>()
            .with_context(|| format!("invalid FNGATE_INSTANCE_IP {value:?}: not an IP address"))?,
        Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let port = match std::env::var("PORT") {
        Ok(value) => value
            .parse::<u16>()
            .with_context(|| format!("invalid PORT {value:?}: not a port number"))?,
        Err(_) => 0,
    };
    Ok(SocketAddr::new(ip, port))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    println!("{LISTENING_PREFIX}{}", listener.local_addr()?);
    let mut terminate = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    eprintln!("accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // An error here means the client went away mid-request, so no one is left to tell.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(respond))
                .await;
        });
    }
}

async fn respond(
    request: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    let mut response = Response::builder();
    if request.method() == Method::POST {
        if let Some(length) = request.headers().get(header::CONTENT_LENGTH) {
            response = response.header(header::CONTENT_LENGTH, length.clone());
        }
        let body = request.into_body().boxed();
        return Ok(response
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .unwrap_or_else(|_| Response::new(empty())));
    }
    let status = if request.method() == Method::GET || request.method() == Method::HEAD {
        StatusCode::OK
    } else {
        StatusCode::METHOD_NOT_ALLOWED
    };
    let body = Full::new(Bytes::from_static(GET_BODY))
        .map_err(|never| match never {})
        .boxed();
    Ok(response
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(body)
        .unwrap_or_else(|_| Response::new(empty())))
}

fn empty() -> BoxBody<Bytes, hyper::Error> {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}
