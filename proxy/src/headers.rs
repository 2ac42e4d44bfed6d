//! Header rules on the way to an instance and back: hop-by-hop removal, forwarding headers, and
//! the `X-Scf-*` headers SCF sends to functions.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::table::{FunctionKey, FunctionSettings};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Phase timings of a request that waited for a slot, in the `Server-Timing` format.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
pub const FUNCTION_ERROR: HeaderName = HeaderName::from_static("x-fngate-function-error");
pub const RUNTIME_ERROR: HeaderName = HeaderName::from_static("x-fngate-runtime-error");
/// Set to `true` by the runtime wrapper when the bootstrap never received the event, so the
/// invocation may go to another instance.
pub const NOT_STARTED: HeaderName = HeaderName::from_static("x-fngate-not-started");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const SCF_REQUEST_ID: HeaderName = HeaderName::from_static("x-scf-request-id");
const SCF_MEMORY: HeaderName = HeaderName::from_static("x-scf-memory");
const SCF_TIMEOUT: HeaderName = HeaderName::from_static("x-scf-timeout");
const SCF_VERSION: HeaderName = HeaderName::from_static("x-scf-version");
const SCF_NAME: HeaderName = HeaderName::from_static("x-scf-name");
const SCF_NAMESPACE: HeaderName = HeaderName::from_static("x-scf-namespace");

/// Headers that describe one connection and must not be forwarded (RFC 9110, section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// True when the request asks to switch protocols, as a WebSocket handshake does.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// True for a header that `remove_hop_by_hop` removes whatever the `Connection` header lists.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::UPGRADE || HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers, including those the `Connection` header names. With `upgrade`,
/// keeps `Connection: upgrade` and `Upgrade` so that a protocol switch passes through.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these headers. One pass over the names finds that out for less
    // than the ten hashed removals below, and `Connection` itself is in the list, so headers it
    // names are never skipped.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Formats the client's address as an `X-Forwarded-For` element, once per connection.
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(client.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends `client` (from [`forwarded_for`]) to `X-Forwarded-For`, and sets `X-Forwarded-Proto`
/// and `X-Forwarded-Host` unless a hop in front (the load balancer) already set them. fngate does
/// not check that hop.
pub fn add_forwarding(headers: &mut HeaderMap, client: &HeaderValue, scheme: &'static str) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + client.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(joined)).ok()
        }
        None => Some(client.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme));
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(host) = headers.get(header::HOST).cloned() {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
}

/// The `X-Scf-*` values that depend only on a function version and its settings, built once and
/// cloned into each request, which copies no bytes.
#[derive(Debug)]
pub struct ScfHeaderValues {
    memory_mb: u32,
    timeout: Duration,
    values: Vec<(HeaderName, HeaderValue)>,
}

impl ScfHeaderValues {
    /// Formats the values. One that is not a valid header value is left out.
    pub fn new(key: &FunctionKey, settings: &FunctionSettings) -> Self {
        let values = [
            (SCF_MEMORY, settings.memory_mb.to_string()),
            (SCF_TIMEOUT, settings.timeout.as_millis().to_string()),
            (SCF_VERSION, key.qualifier.clone()),
            (SCF_NAME, key.name.clone()),
            (SCF_NAMESPACE, key.namespace.clone()),
        ];
        let values = values
            .into_iter()
            .filter_map(|(name, value)| {
                let value = HeaderValue::from_maybe_shared(Bytes::from(value)).ok()?;
                Some((name, value))
            })
            .collect();
        ScfHeaderValues {
            memory_mb: settings.memory_mb,
            timeout: settings.timeout,
            values,
        }
    }

    /// True when these values were built from settings with the same memory and timeout.
    pub fn matches(&self, settings: &FunctionSettings) -> bool {
        self.memory_mb == settings.memory_mb && self.timeout == settings.timeout
    }
}

/// Replaces any client-sent `X-Scf-*` headers with the platform's own, so a client cannot
/// pretend to be the platform.
pub fn set_scf_headers(
    headers: &mut HeaderMap,
    request_id: &HeaderValue,
    values: &ScfHeaderValues,
) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-scf-"))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    headers.insert(SCF_REQUEST_ID, request_id.clone());
    for (name, value) in &values.values {
        headers.insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_named_in_connection_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        headers.insert("x-trace", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));

        remove_hop_by_hop(&mut headers, false);

        assert!(!headers.contains_key("x-trace"));
        assert!(!headers.contains_key("keep-alive"));
        assert!(!headers.contains_key(header::CONNECTION));
        assert!(!headers.contains_key(header::TRANSFER_ENCODING));
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_headers_kept_for_websocket() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));

        remove_hop_by_hop(&mut headers, true);

        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(headers.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn headers_without_hop_by_hop_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.insert("x-kept", HeaderValue::from_static("1"));

        remove_hop_by_hop(&mut headers, false);

        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn forwarded_for_set_when_absent() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        let client = forwarded_for("::1".parse().unwrap());
        add_forwarding(&mut headers, &client, "http");
        assert_eq!(headers.get(X_FORWARDED_FOR).unwrap(), "::1");
        assert_eq!(headers.get(X_FORWARDED_HOST).unwrap(), "example.com");
    }

    #[test]
    fn forwarded_for_appends_client() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let client = forwarded_for("127.0.0.1".parse().unwrap());
        add_forwarding(&mut headers, &client, "http");
        assert_eq!(headers.get(X_FORWARDED_FOR).unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(headers.get(X_FORWARDED_PROTO).unwrap(), "http");
    }

    #[test]
    fn client_scf_headers_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert("x-scf-name", HeaderValue::from_static("spoofed"));
        headers.insert("x-scf-uin", HeaderValue::from_static("spoofed"));
        let key = FunctionKey {
            namespace: "default".into(),
            name: "hello".into(),
            qualifier: "$LATEST".into(),
        };
        let settings = FunctionSettings {
            kind: crate::table::FunctionKind::Web,
            memory_mb: 256,
            timeout: std::time::Duration::from_millis(1500),
            queue_budget: std::time::Duration::from_secs(1),
            queue_limit: 10,
            max_body_bytes: 10,
            concurrency: 1,
        };
        let values = ScfHeaderValues::new(&key, &settings);
        set_scf_headers(&mut headers, &HeaderValue::from_static("req-1"), &values);
        assert_eq!(headers.get("x-scf-name").unwrap(), "hello");
        assert!(!headers.contains_key("x-scf-uin"));
        assert_eq!(headers.get("x-scf-memory").unwrap(), "256");
        assert_eq!(headers.get("x-scf-timeout").unwrap(), "1500");
        assert_eq!(headers.get("x-scf-request-id").unwrap(), "req-1");
    }
}
