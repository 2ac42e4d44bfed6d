//! Header rules on the way to an instance and back: hop-by-hop removal, forwarding headers, and
//! the `X-Scf-*` headers SCF sends to functions.

use std::net::IpAddr;

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

/// Removes hop-by-hop headers, including those the `Connection` header names. With `upgrade`,
/// keeps `Connection: upgrade` and `Upgrade` so that a protocol switch passes through.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
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

/// Appends the client to `X-Forwarded-For`, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`
/// unless a hop in front (the load balancer) already set them. fngate does not check that hop.
pub fn add_forwarding(headers: &mut HeaderMap, client: IpAddr, scheme: &'static str) {
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
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

/// Replaces any client-sent `X-Scf-*` headers with the platform's own, so a client cannot
/// pretend to be the platform.
pub fn set_scf_headers(
    headers: &mut HeaderMap,
    request_id: &str,
    key: &FunctionKey,
    settings: &FunctionSettings,
) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-scf-"))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    let values = [
        (SCF_REQUEST_ID, request_id.to_owned()),
        (SCF_MEMORY, settings.memory_mb.to_string()),
        (SCF_TIMEOUT, settings.timeout.as_millis().to_string()),
        (SCF_VERSION, key.qualifier.clone()),
        (SCF_NAME, key.name.clone()),
        (SCF_NAMESPACE, key.namespace.clone()),
    ];
    for (name, value) in values {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
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
    fn forwarded_for_appends_client() {
        let mut headers = HeaderMap::new();
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        add_forwarding(&mut headers, "127.0.0.1".parse().unwrap(), "http");
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
        set_scf_headers(&mut headers, "req-1", &key, &settings);
        assert_eq!(headers.get("x-scf-name").unwrap(), "hello");
        assert!(!headers.contains_key("x-scf-uin"));
        assert_eq!(headers.get("x-scf-memory").unwrap(), "256");
        assert_eq!(headers.get("x-scf-timeout").unwrap(), "1500");
        assert_eq!(headers.get("x-scf-request-id").unwrap(), "req-1");
    }
}
