//! A burst client: N requests, each on its own connection. Every connection is opened first;
//! then all requests are released at once and timed from that moment.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Result of one request of a burst. Times are milliseconds since the release.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub status: Option<u16>,
    pub headers_ms: f64,
    pub done_ms: f64,
    pub server_timing: Option<String>,
    pub error: Option<String>,
}

impl Outcome {
    fn failed(error: String, since: Option<Instant>) -> Outcome {
        let elapsed = since.map_or(f64::NAN, |t| t.elapsed().as_secs_f64() * 1000.0);
        Outcome {
            status: None,
            headers_ms: f64::NAN,
            done_ms: elapsed,
            server_timing: None,
            error: Some(error),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.status == Some(200)
    }
}

/// Sends `count` GET requests for `path` to `addr`, released together once every connection is
/// open. Each request must finish within `timeout` of the release; connecting has its own
/// `timeout`.
pub async fn run(addr: SocketAddr, path: &str, count: usize, timeout: Duration) -> Vec<Outcome> {
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(count.max(1));
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let path: Arc<str> = Arc::from(path);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let ready = ready_tx.clone();
        let go = go_rx.clone();
        let path = Arc::clone(&path);
        tasks.push(tokio::spawn(one_request(addr, path, ready, go, timeout)));
    }
    drop(ready_tx);
    // Every task reports once, connected or not; a closed channel means all have reported.
    let connect_deadline = Instant::now() + timeout;
    for _ in 0..count {
        match tokio::time::timeout_at(connect_deadline, ready_rx.recv()).await {
            Ok(Some(())) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let _ = go_tx.send(Some(Instant::now()));
    let mut outcomes = Vec::with_capacity(count);
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|error| {
            Outcome::failed(format!("request task failed: {error}"), None)
        }));
    }
    outcomes
}

async fn one_request(
    addr: SocketAddr,
    path: Arc<str>,
    ready: mpsc::Sender<()>,
    mut go: watch::Receiver<Option<Instant>>,
    timeout: Duration,
) -> Outcome {
    let connected = tokio::time::timeout(timeout, connect(addr)).await;
    let _ = ready.send(()).await;
    drop(ready);
    let released = match go.wait_for(Option::is_some).await {
        Ok(value) => value.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    };
    let mut sender = match connected {
        Ok(Ok(sender)) => sender,
        Ok(Err(error)) => return Outcome::failed(format!("connect failed: {error}"), None),
        Err(_) => return Outcome::failed("connect timed out".to_owned(), None),
    };
    let request = Request::builder()
        .uri(&*path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    let request = match request {
        Ok(request) => request,
        Err(error) => return Outcome::failed(format!("invalid request: {error}"), None),
    };
    let exchange = async {
        let response = sender.send_request(request).await?;
        let headers_ms = released.elapsed().as_secs_f64() * 1000.0;
        let status = response.status().as_u16();
        let server_timing = response
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        response.into_body().collect().await?;
        Ok::<_, hyper::Error>((status, headers_ms, server_timing))
    };
    match tokio::time::timeout_at(released + timeout, exchange).await {
        Ok(Ok((status, headers_ms, server_timing))) => Outcome {
            status: Some(status),
            headers_ms,
            done_ms: released.elapsed().as_secs_f64() * 1000.0,
            server_timing,
            error: None,
        },
        Ok(Err(error)) => Outcome::failed(format!("request failed: {error}"), Some(released)),
        Err(_) => Outcome::failed(
            format!("no response within {}s", timeout.as_secs()),
            Some(released),
        ),
    }
}

async fn connect(
    addr: SocketAddr,
) -> Result<
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Durations in `Server-Timing` (`queue;dur=X, boot;dur=Y`), in milliseconds: (queue, boot).
pub fn parse_server_timing(value: &str) -> (Option<f64>, Option<f64>) {
    let mut queue = None;
    let mut boot = None;
    for metric in value.split(',') {
        let mut parts = metric.trim().split(';');
        let name = parts.next().unwrap_or_default().trim();
        let duration = parts
            .filter_map(|p| p.trim().strip_prefix("dur="))
            .find_map(|d| d.parse::<f64>().ok());
        match name {
            "queue" => queue = duration,
            "boot" => boot = duration,
            _ => {}
        }
    }
    (queue, boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_cold_and_queued() {
        assert_eq!(
            parse_server_timing("queue;dur=12.500, boot;dur=10.250"),
            (Some(12.5), Some(10.25))
        );
        assert_eq!(parse_server_timing("queue;dur=3.000"), (Some(3.0), None));
        assert_eq!(parse_server_timing("other"), (None, None));
    }
}
