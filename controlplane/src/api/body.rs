//! Reads a request body within the API's size limit and decodes it into a spec, taking the
//! namespace and function names from the URL path where the body omits them.
//!
//! Validating the spec itself is left to `Platform::put_*`.

use std::error::Error as StdError;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::CONTENT_LENGTH;
use hyper::Request;
use serde::de::DeserializeOwned;

use super::reply::ApiError;
use crate::error::PlatformError;
use crate::model::{FunctionSpec, NamespaceSpec};

/// Largest request body the API reads; a spec is a few kilobytes at most.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Maximum time the API waits for a request body to arrive in full.
pub const BODY_READ_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole body of `request`, rejecting it with `BodyTooLarge` past `MAX_BODY_BYTES`.
/// A larger `Content-Length` is rejected before any of the body is read.
pub(crate) async fn read<B>(request: Request<B>) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let too_large = ApiError::BodyTooLarge {
        limit: MAX_BODY_BYTES,
    };
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large);
    }
    let collect = Limited::new(request.into_body(), MAX_BODY_BYTES).collect();
    let Ok(collected) = tokio::time::timeout(BODY_READ_LIMIT, collect).await else {
        return Err(ApiError::BodyTimeout {
            limit: BODY_READ_LIMIT,
        });
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large),
        Err(e) => Err(PlatformError::invalid("body", format!("could not be read: {e}")).into()),
    }
}

/// Fields that `GET /v1/namespaces/{namespace}` adds to the spec and a `PUT` ignores, so that a
/// namespace read, changed and written back is accepted.
const NAMESPACE_STATUS_FIELDS: [&str; 2] = ["status", "replicas"];

/// Decodes a namespace spec; `name` may be omitted and must otherwise equal `namespace`.
pub(crate) fn namespace_spec(body: &[u8], namespace: &str) -> Result<NamespaceSpec, PlatformError> {
    let mut object: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(body).ok();
    let stripped = object.as_mut().and_then(|object| {
        let before = object.len();
        for field in NAMESPACE_STATUS_FIELDS {
            object.remove(field);
        }
        (object.len() != before).then(|| serde_json::to_vec(object).ok())?
    });
    let mut spec: NamespaceSpec = decode(stripped.as_deref().unwrap_or(body))?;
    take_from_path("name", &mut spec.name, namespace)?;
    Ok(spec)
}

/// Decodes a function spec; `namespace` and `name` may be omitted and must otherwise equal the
/// names in the path.
pub(crate) fn function_spec(
    body: &[u8],
    namespace: &str,
    name: &str,
) -> Result<FunctionSpec, PlatformError> {
    let mut spec: FunctionSpec = decode(body)?;
    take_from_path("namespace", &mut spec.namespace, namespace)?;
    take_from_path("name", &mut spec.name, name)?;
    Ok(spec)
}

/// Decodes a proxy replica's report.
pub(crate) fn report(
    body: &[u8],
) -> Result<fngate_proxy::replica::protocol::Report, PlatformError> {
    decode(body)
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, PlatformError> {
    let Some(&first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(PlatformError::invalid(
            "body",
            "is empty; send the spec as a JSON object",
        ));
    };
    // serde would decode a struct from an array of its fields in order, and report a wrong
    // length in terms of the struct's field count, so anything but an object is rejected here.
    let other = match first {
        b'{' => None,
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b't' | b'f' => Some("a boolean"),
        b'n' => Some("null"),
        b'-' | b'0'..=b'9' => Some("a number"),
        // Not JSON at all: serde_json's message gives the position.
        _ => None,
    };
    if let Some(other) = other {
        return Err(PlatformError::invalid(
            "body",
            format!("must be a JSON object with the spec's fields, got {other}"),
        ));
    }
    // serde_json's message names the problem and its line and column.
    serde_json::from_slice(body)
        .map_err(|e| PlatformError::invalid("body", format!("is not a valid spec: {e}")))
}

/// Fills an omitted (empty) name from the path, or checks that the body's name matches it.
fn take_from_path(field: &str, value: &mut String, from_path: &str) -> Result<(), PlatformError> {
    if value.is_empty() {
        *value = from_path.to_string();
        return Ok(());
    }
    if value == from_path {
        return Ok(());
    }
    Err(PlatformError::invalid(
        field,
        format!(
            "{value:?} in the body differs from {from_path:?} in the URL path; omit it from the \
             body or make the two equal"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;
    use crate::model::CodeSource;

    fn invalid_field(result: Result<impl std::fmt::Debug, PlatformError>) -> (String, String) {
        match result {
            Err(PlatformError::Invalid { field, message }) => (field, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn names_taken_from_path() {
        let body = br#"{"kind": "web", "code": {"directory": "/srv/hello"}}"#;
        let spec = function_spec(body, "default", "hello").unwrap();
        assert_eq!(spec.namespace, "default");
        assert_eq!(spec.name, "hello");
        assert_eq!(spec.code, CodeSource::Directory("/srv/hello".into()));

        let spec = namespace_spec(b"{}", "batch").unwrap();
        assert_eq!(spec.name, "batch");
        assert_eq!(spec.memory_quota_mb, 0);
    }

    #[test]
    fn matching_names_accepted() {
        let body = br#"{"namespace": "default", "name": "hello", "kind": "web",
                        "code": {"zip_file": "/srv/hello.zip"}}"#;
        let spec = function_spec(body, "default", "hello").unwrap();
        assert_eq!(spec.name, "hello");
        let spec = namespace_spec(br#"{"name": "batch", "memory_quota_mb": 512}"#, "batch");
        assert_eq!(spec.unwrap().memory_quota_mb, 512);
    }

    #[test]
    fn mismatched_names_rejected() {
        let body = br#"{"name": "other", "kind": "web", "code": {"directory": "/a"}}"#;
        let (field, message) = invalid_field(function_spec(body, "default", "hello"));
        assert_eq!(field, "name");
        assert!(
            message.contains("\"other\"") && message.contains("\"hello\""),
            "{message}"
        );

        let body = br#"{"namespace": "x", "kind": "web", "code": {"directory": "/a"}}"#;
        let (field, _) = invalid_field(function_spec(body, "default", "hello"));
        assert_eq!(field, "namespace");

        let (field, _) = invalid_field(namespace_spec(br#"{"name": "x"}"#, "batch"));
        assert_eq!(field, "name");
    }

    #[test]
    fn malformed_json_has_position() {
        let (field, message) = invalid_field(namespace_spec(b"{\n  \"name\": }", "a"));
        assert_eq!(field, "body");
        assert!(message.contains("line 2 column"), "{message}");
    }

    #[test]
    fn unknown_field_rejected() {
        let (field, message) = invalid_field(namespace_spec(br#"{"quota": 1}"#, "a"));
        assert_eq!(field, "body");
        assert!(message.contains("unknown field `quota`"), "{message}");
    }

    #[test]
    fn wrong_type_rejected() {
        let body = br#"{"kind": "web", "code": {"directory": "/a"}, "concurrency": "4"}"#;
        let (field, message) = invalid_field(function_spec(body, "a", "f"));
        assert_eq!(field, "body");
        assert!(message.contains("invalid type"), "{message}");
        assert!(message.contains("column"), "{message}");
    }

    #[test]
    fn non_object_body_rejected() {
        let cases = [
            ("[]", "an array"),
            (" \n[\"default\", \"hello\"]", "an array"),
            ("\"web\"", "a string"),
            ("true", "a boolean"),
            ("null", "null"),
            ("-1", "a number"),
            ("42", "a number"),
        ];
        for (body, kind) in cases {
            let (field, message) = invalid_field(function_spec(body.as_bytes(), "a", "f"));
            assert_eq!(field, "body", "{body}");
            assert!(
                message.contains("must be a JSON object"),
                "{body}: {message}"
            );
            assert!(
                message.contains(&format!("got {kind}")),
                "{body}: {message}"
            );
            let (_, message) = invalid_field(namespace_spec(body.as_bytes(), "a"));
            assert!(
                message.contains("must be a JSON object"),
                "{body}: {message}"
            );
        }
    }

    #[test]
    fn code_needs_exactly_one_source() {
        let cases = [
            (r#"{}"#, "got neither"),
            (
                r#"{"directory": "/a", "zip_file": "/b"}"#,
                "got more than one",
            ),
            (
                r#"{"directory": "/a", "directory": "/b"}"#,
                "got more than one",
            ),
        ];
        for (code, problem) in cases {
            let body = format!(r#"{{"kind": "web", "code": {code}}}"#);
            let (field, message) = invalid_field(function_spec(body.as_bytes(), "a", "f"));
            assert_eq!(field, "body", "{code}");
            assert!(
                message.contains("`code` takes exactly one of `directory` or `zip_file`"),
                "{code}: {message}"
            );
            assert!(message.contains(problem), "{code}: {message}");
            assert!(message.contains("line 1 column"), "{code}: {message}");
        }
    }

    #[test]
    fn code_with_unknown_key_rejected() {
        let body = br#"{"kind": "web", "code": {"dir": "/a"}}"#;
        let (_, message) = invalid_field(function_spec(body, "a", "f"));
        assert!(message.contains("unknown field `dir`"), "{message}");
        assert!(
            message.contains("expected `directory` or `zip_file`"),
            "{message}"
        );

        let body = br#"{"kind": "web", "code": "/a"}"#;
        let (_, message) = invalid_field(function_spec(body, "a", "f"));
        assert!(message.contains("invalid type: string"), "{message}");
        assert!(message.contains("`directory` or `zip_file`"), "{message}");
    }

    #[test]
    fn empty_body_rejected() {
        for body in [&b""[..], b"  \n"] {
            let (field, message) = invalid_field(namespace_spec(body, "a"));
            assert_eq!(field, "body");
            assert!(message.contains("empty"), "{message}");
        }
    }

    fn request(body: Vec<u8>, content_length: Option<&str>) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method("PUT").uri("/v1/namespaces/a");
        if let Some(length) = content_length {
            builder = builder.header(CONTENT_LENGTH, length);
        }
        builder.body(Full::new(Bytes::from(body))).unwrap()
    }

    #[tokio::test]
    async fn body_at_limit_read() {
        let body = vec![b' '; MAX_BODY_BYTES];
        let read = read(request(body, None)).await.unwrap();
        assert_eq!(read.len(), MAX_BODY_BYTES);
    }

    #[tokio::test]
    async fn oversized_body_rejected() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        let result = read(request(body, None)).await;
        assert!(
            matches!(result, Err(ApiError::BodyTooLarge { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn oversized_content_length_rejected() {
        let declared = (MAX_BODY_BYTES + 1).to_string();
        let result = read(request(b"{}".to_vec(), Some(&declared))).await;
        assert!(
            matches!(result, Err(ApiError::BodyTooLarge { .. })),
            "{result:?}"
        );
    }
}
