//! Dispatches one API request to the platform and turns the outcome into a response.

use std::error::Error as StdError;

use bytes::Bytes;
use hyper::body::Body;
use hyper::{Method, Request, StatusCode};
use serde::Serialize;

use super::body;
use super::reply::{self, ApiError, ApiResponse};
use super::route::Route;
use super::Control;
use crate::error::PlatformError;
use crate::model::NamespaceSpec;
use crate::platform::{Applied, FunctionStatus};

#[derive(Serialize)]
struct NamespaceList {
    namespaces: Vec<NamespaceSpec>,
}

#[derive(Serialize)]
struct FunctionList {
    functions: Vec<FunctionStatus>,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// Handles one request; every failure becomes a JSON error response, and server errors are
/// logged.
pub(crate) async fn handle<C, B>(control: &C, request: Request<B>) -> ApiResponse
where
    C: Control,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    match dispatch(control, request).await {
        Ok(response) => response,
        Err(error) => {
            let (status, code) = error.status_and_code();
            if status.is_server_error() {
                tracing::error!(%method, %path, code, error = %error, "control-plane API request failed");
            } else {
                tracing::debug!(%method, %path, code, error = %error, "control-plane API request rejected");
            }
            error.into_response()
        }
    }
}

async fn dispatch<C, B>(control: &C, request: Request<B>) -> Result<ApiResponse, ApiError>
where
    C: Control,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let path = request.uri().path();
    let route = Route::parse(path).ok_or_else(|| ApiError::RouteNotFound {
        path: path.to_owned(),
    })?;
    let method = request.method();
    if !route.allows(method) {
        return Err(ApiError::MethodNotAllowed {
            method: method.clone(),
            path: path.to_owned(),
            allow: route.allow(),
        });
    }
    let method = method.clone();

    match route {
        Route::Healthz => Ok(reply::json(StatusCode::OK, &Health { status: "ok" })),
        Route::Namespaces => {
            let namespaces = control.namespaces();
            Ok(reply::json(StatusCode::OK, &NamespaceList { namespaces }))
        }
        Route::Namespace { namespace } => match method {
            Method::GET => get_namespace(control, &namespace),
            Method::PUT => put_namespace(control, &namespace, request).await,
            _ => {
                control.delete_namespace(&namespace).await?;
                Ok(reply::no_content())
            }
        },
        Route::Functions { namespace } => {
            let functions = control.functions(&namespace)?;
            Ok(reply::json(StatusCode::OK, &FunctionList { functions }))
        }
        Route::Function { namespace, name } => match method {
            Method::GET => {
                let status = control.function(&namespace, &name)?;
                Ok(reply::json(StatusCode::OK, &status))
            }
            Method::PUT => put_function(control, &namespace, &name, request).await,
            _ => {
                control.delete_function(&namespace, &name).await?;
                Ok(reply::no_content())
            }
        },
        Route::Package { digest } => {
            let package = control.package(&digest).await?;
            Ok(reply::package(&digest, package))
        }
        Route::ReplicaRoutes { namespace, replica } => {
            let after = after_version(request.uri().query())?;
            let session = replica_session(&request)?;
            let routes = control
                .replica_routes(&namespace, &replica, session.as_deref(), after)
                .await?;
            Ok(reply::json(StatusCode::OK, &routes))
        }
        Route::ReplicaReport { namespace, replica } => {
            let session = replica_session(&request)?;
            let bytes = body::read(request).await?;
            let report = body::report(&bytes)?;
            let response =
                control.replica_report(&namespace, &replica, session.as_deref(), &report)?;
            Ok(reply::json(StatusCode::OK, &response))
        }
    }
}

/// Reads the session header of a proxy replica's call, if it sent one.
fn replica_session<B>(request: &Request<B>) -> Result<Option<String>, PlatformError> {
    let Some(value) = request.headers().get(fngate_proxy::replica::SESSION_HEADER) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(session) if !session.is_empty() && session.len() <= 64 => Ok(Some(session.to_owned())),
        _ => Err(PlatformError::invalid(
            fngate_proxy::replica::SESSION_HEADER,
            "must be 1 to 64 visible ASCII characters",
        )),
    }
}

/// Reads the `after` version of a routes poll from the query string.
fn after_version(query: Option<&str>) -> Result<Option<u64>, PlatformError> {
    let mut after = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if name != "after" {
            return Err(PlatformError::invalid(
                name.into_owned(),
                "is not a query parameter of a routes poll; it takes only after={version}",
            ));
        }
        let version = value.parse::<u64>().map_err(|_| {
            PlatformError::invalid(
                "after",
                format!("must be a version number from an earlier routes response, got {value:?}"),
            )
        })?;
        after = Some(version);
    }
    Ok(after)
}

fn get_namespace<C: Control>(control: &C, namespace: &str) -> Result<ApiResponse, ApiError> {
    let spec = control
        .namespaces()
        .into_iter()
        .find(|spec| spec.name == namespace)
        .ok_or_else(|| PlatformError::NotFound {
            what: format!("namespace {namespace:?}"),
        })?;
    // A bound namespace also reports its binding's status: {"phase": ..., "reason": ...}.
    let mut body = serde_json::to_value(&spec)
        .map_err(|e| PlatformError::Internal(format!("cannot serialize namespace: {e}")))?;
    if let Some(status) = control.binding_status(namespace) {
        body["status"] = serde_json::json!(status);
        // The proxy replicas that reported recently, by name.
        body["replicas"] = serde_json::json!(control.replicas(namespace));
    }
    Ok(reply::json(StatusCode::OK, &body))
}

async fn put_namespace<C, B>(
    control: &C,
    namespace: &str,
    request: Request<B>,
) -> Result<ApiResponse, ApiError>
where
    C: Control,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let bytes = body::read(request).await?;
    let spec = body::namespace_spec(&bytes, namespace)?;
    let applied = control.put_namespace(spec.clone()).await?;
    Ok(reply::json(status_of(applied), &spec))
}

async fn put_function<C, B>(
    control: &C,
    namespace: &str,
    name: &str,
    request: Request<B>,
) -> Result<ApiResponse, ApiError>
where
    C: Control,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let bytes = body::read(request).await?;
    let spec = body::function_spec(&bytes, namespace, name)?;
    let applied = control.put_function(spec).await?;
    let status = control.function(namespace, name)?;
    Ok(reply::json(status_of(applied), &status))
}

fn status_of(applied: Applied) -> StatusCode {
    match applied {
        Applied::Created => StatusCode::CREATED,
        Applied::Updated | Applied::Unchanged => StatusCode::OK,
    }
}
