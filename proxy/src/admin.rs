//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process runs) and
//! `/readyz` (the routing table has been filled and the proxy is not shutting down).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::handler::Proxy;

/// State the admin endpoints read.
#[derive(Debug, Clone)]
pub struct Admin {
    pub proxy: Arc<Proxy>,
    pub metrics: PrometheusHandle,
}

impl Admin {
    /// Handles one admin request.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
        }
        let response = match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.proxy.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else if self.proxy.router().is_synced() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "routing table not synced yet\n",
                    )
                }
            }
            "/metrics" => {
                crate::metrics::refresh_pool_gauges(self.proxy.router());
                let mut response = text(StatusCode::OK, &self.metrics.render());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz or /readyz\n",
            ),
        };
        Ok(response)
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
