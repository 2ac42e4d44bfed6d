//! A one-request HTTP/1.1 client on hyper, for the control-plane API, the admin port and
//! functional checks of each benchmark target.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Time limit of one request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response is not JSON: {}", self.text()))
    }
}

/// Sends one request on a new connection and reads the whole response.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<Reply> {
    let what = format!("{method} http://{addr}{path}");
    tokio::time::timeout(REQUEST_TIMEOUT, send_inner(addr, method, path, body.into()))
        .await
        .with_context(|| format!("{what} timed out after {}s", REQUEST_TIMEOUT.as_secs()))?
        .with_context(|| format!("{what} failed"))
}

async fn send_inner(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "close")
        .body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Sends a GET and returns the body as JSON, failing unless the status is 200.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let reply = send(addr, Method::GET, path, Bytes::new()).await?;
    if reply.status != StatusCode::OK {
        anyhow::bail!(
            "GET http://{addr}{path} returned {}: {}",
            reply.status,
            reply.text()
        );
    }
    reply.json()
}
