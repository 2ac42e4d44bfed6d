//! The control plane's HTTP API: JSON over HTTP/1.1 to list, create, change and delete
//! namespaces and functions.
//!
//! Routes, under `/v1`: `GET /namespaces`; `GET`, `PUT`, `DELETE /namespaces/{namespace}`;
//! `GET /namespaces/{namespace}/functions`; `GET`, `PUT`, `DELETE
//! /namespaces/{namespace}/functions/{name}`; `GET /packages/{sha256}` (a code package, for node
//! agents); and `GET /healthz`. This module parses requests,
//! checks that names in a body agree with the path, and maps errors to statuses. Validation,
//! storage and code resolution are left to `Platform`, and authentication to whatever sits in
//! front of the listener.

mod body;
mod handler;
mod reply;
mod route;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::error::PlatformError;
use crate::model::{FunctionSpec, NamespaceSpec};
use crate::platform::{Applied, FunctionStatus, Platform};
use fngate_proxy::replica::protocol::{Report, ReportResponse, Routes};

pub use body::MAX_BODY_BYTES;

/// Pause after a failed `accept`, so a persistent error such as running out of file
/// descriptors does not turn the accept loop into a busy loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The platform operations the API calls. `Platform` implements it; the API's tests use an
/// in-memory fake.
pub(crate) trait Control: Send + Sync + 'static {
    fn put_namespace(
        &self,
        spec: NamespaceSpec,
    ) -> impl Future<Output = Result<Applied, PlatformError>> + Send;
    fn delete_namespace(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    fn namespaces(&self) -> Vec<NamespaceSpec>;
    fn put_function(
        &self,
        spec: FunctionSpec,
    ) -> impl Future<Output = Result<Applied, PlatformError>> + Send;
    fn delete_function(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send;
    fn functions(&self, namespace: &str) -> Result<Vec<FunctionStatus>, PlatformError>;
    fn function(&self, namespace: &str, name: &str) -> Result<FunctionStatus, PlatformError>;
    /// Status of a namespace's binding to a cluster, `None` in default mode.
    fn binding_status(&self, namespace: &str) -> Option<crate::k8s::install::BindingStatus>;
    /// Reads the stored code package with SHA-256 `digest`.
    fn package(
        &self,
        digest: &str,
    ) -> impl Future<Output = Result<bytes::Bytes, PlatformError>> + Send;
    /// Lists the proxy replicas of a namespace.
    fn replicas(&self, namespace: &str) -> Vec<crate::platform::ReplicaStatus>;
    /// Returns the routes for a proxy replica's poll.
    fn replica_routes(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        after: Option<u64>,
    ) -> impl Future<Output = Result<Routes, PlatformError>> + Send;
    /// Takes a proxy replica's report.
    fn replica_report(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        report: &Report,
    ) -> Result<ReportResponse, PlatformError>;
}

impl Control for Platform {
    fn put_namespace(
        &self,
        spec: NamespaceSpec,
    ) -> impl Future<Output = Result<Applied, PlatformError>> + Send {
        Platform::put_namespace(self, spec)
    }

    fn delete_namespace(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send {
        Platform::delete_namespace(self, name)
    }

    fn namespaces(&self) -> Vec<NamespaceSpec> {
        Platform::namespaces(self)
    }

    fn put_function(
        &self,
        spec: FunctionSpec,
    ) -> impl Future<Output = Result<Applied, PlatformError>> + Send {
        Platform::put_function(self, spec)
    }

    fn delete_function(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), PlatformError>> + Send {
        Platform::delete_function(self, namespace, name)
    }

    fn functions(&self, namespace: &str) -> Result<Vec<FunctionStatus>, PlatformError> {
        Platform::functions(self, namespace)
    }

    fn function(&self, namespace: &str, name: &str) -> Result<FunctionStatus, PlatformError> {
        Platform::function(self, namespace, name)
    }

    fn package(
        &self,
        digest: &str,
    ) -> impl Future<Output = Result<bytes::Bytes, PlatformError>> + Send {
        Platform::package(self, digest)
    }

    fn binding_status(&self, namespace: &str) -> Option<crate::k8s::install::BindingStatus> {
        Platform::binding_status(self, namespace)
    }

    fn replicas(&self, namespace: &str) -> Vec<crate::platform::ReplicaStatus> {
        Platform::replicas(self, namespace)
    }

    fn replica_routes(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        after: Option<u64>,
    ) -> impl Future<Output = Result<Routes, PlatformError>> + Send {
        Platform::replica_routes(self, namespace, replica, session, after)
    }

    fn replica_report(
        &self,
        namespace: &str,
        replica: &str,
        session: Option<&str>,
        report: &Report,
    ) -> Result<ReportResponse, PlatformError> {
        Platform::replica_report(self, namespace, replica, session, report)
    }
}

/// Serves the API on `listener` until `shutdown` resolves. Then it stops accepting, lets
/// requests in flight finish, closes idle connections, and returns once every connection is
/// closed. A caller that needs a bound on that wait wraps the call in a timeout.
pub async fn serve(
    listener: TcpListener,
    platform: Arc<Platform>,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_control(listener, platform, shutdown).await;
}

pub(crate) async fn serve_control<C: Control>(
    listener: TcpListener,
    control: Arc<C>,
    shutdown: impl Future<Output = ()> + Send,
) {
    // Logged as text, so an address reads `127.0.0.1:8082` rather than `Some(127.0.0.1:8082)`.
    let local_addr = listener.local_addr().map_or_else(
        |error| format!("unknown ({error})"),
        |addr| addr.to_string(),
    );
    tracing::info!(addr = %local_addr, "control-plane API listening");
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "failed to accept a control-plane API connection");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let control = Arc::clone(&control);
        let service = service_fn(move |request| {
            let control = Arc::clone(&control);
            async move { Ok::<_, Infallible>(handler::handle(&*control, request).await) }
        });
        // The timer enables hyper's default timeout for reading request headers.
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "control-plane API connection failed");
            }
        });
    }
    drop(listener);
    tracing::info!(
        addr = %local_addr,
        connections = graceful.count(),
        "control-plane API shutting down; waiting for open connections"
    );
    graceful.shutdown().await;
    tracing::info!(addr = %local_addr, "control-plane API stopped");
}
