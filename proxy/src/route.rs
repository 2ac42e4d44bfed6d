//! Parsing of the proxy's two public routes.

use std::borrow::Cow;

use crate::error::ProxyError;

/// Qualifier used when a request names none.
pub const DEFAULT_QUALIFIER: &str = "$LATEST";

/// Target of a request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `POST /functions/{namespace}/{function}/invocations`.
    Invocation {
        namespace: &'a str,
        function: &'a str,
    },
    /// `/web/{namespace}/{function}/{rest}`; `rest` keeps its leading slash and is `/` when empty.
    Web {
        namespace: &'a str,
        function: &'a str,
        rest: &'a str,
    },
}

/// Parses a request path, without its query.
pub fn parse(path: &str) -> Result<Route<'_>, ProxyError> {
    let not_found = || ProxyError::RouteNotFound {
        path: path.to_owned(),
    };
    if let Some(tail) = path.strip_prefix("/functions/") {
        let mut parts = tail.splitn(3, '/');
        let (Some(namespace), Some(function), Some("invocations")) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(not_found());
        };
        if namespace.is_empty() || function.is_empty() {
            return Err(not_found());
        }
        return Ok(Route::Invocation {
            namespace,
            function,
        });
    }
    if let Some(tail) = path.strip_prefix("/web/") {
        let mut parts = tail.splitn(2, '/');
        let namespace = parts.next().unwrap_or_default();
        let rest_with_function = parts.next().unwrap_or_default();
        let (function, rest) = match rest_with_function.find('/') {
            Some(slash) => rest_with_function.split_at(slash),
            None => (rest_with_function, "/"),
        };
        if namespace.is_empty() || function.is_empty() {
            return Err(not_found());
        }
        return Ok(Route::Web {
            namespace,
            function,
            rest,
        });
    }
    Err(not_found())
}

/// Reads the `qualifier` query parameter, defaulting to `$LATEST`. Borrows from `query` unless
/// the value is percent-encoded.
pub fn qualifier(query: Option<&str>) -> Result<Cow<'_, str>, ProxyError> {
    let Some(query) = query else {
        return Ok(Cow::Borrowed(DEFAULT_QUALIFIER));
    };
    // Without the name or a percent sign (which could encode it), no pair can be `qualifier`,
    // and the parse below, about twenty times the cost of this check, can be skipped.
    if !query.contains("qualifier") && !query.contains('%') {
        return Ok(Cow::Borrowed(DEFAULT_QUALIFIER));
    }
    let mut values = form_urlencoded::parse(query.as_bytes()).filter(|(key, _)| key == "qualifier");
    let first = values.next();
    if values.next().is_some() {
        return Err(ProxyError::InvalidRequest(
            "query parameter qualifier is given more than once; name one version".into(),
        ));
    }
    match first {
        None => Ok(Cow::Borrowed(DEFAULT_QUALIFIER)),
        Some((_, value)) if value.is_empty() => Err(ProxyError::InvalidRequest(
            "query parameter qualifier is empty; omit it for $LATEST or name a version".into(),
        )),
        Some((_, value)) => Ok(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocation_route_parsed() {
        assert_eq!(
            parse("/functions/default/hello/invocations").unwrap(),
            Route::Invocation {
                namespace: "default",
                function: "hello"
            }
        );
    }

    #[test]
    fn invocation_route_with_extra_segment_rejected() {
        assert!(parse("/functions/default/hello/invocations/x").is_err());
        assert!(parse("/functions/default/hello").is_err());
        assert!(parse("/functions//hello/invocations").is_err());
    }

    #[test]
    fn web_route_strips_prefix() {
        assert_eq!(
            parse("/web/default/site/a/b").unwrap(),
            Route::Web {
                namespace: "default",
                function: "site",
                rest: "/a/b"
            }
        );
        assert_eq!(
            parse("/web/default/site").unwrap(),
            Route::Web {
                namespace: "default",
                function: "site",
                rest: "/"
            }
        );
        assert_eq!(
            parse("/web/default/site/").unwrap(),
            Route::Web {
                namespace: "default",
                function: "site",
                rest: "/"
            }
        );
    }

    #[test]
    fn unknown_route_rejected() {
        assert!(parse("/").is_err());
        assert!(parse("/web/default").is_err());
        assert!(parse("/webx/default/a").is_err());
    }

    #[test]
    fn qualifier_defaults_and_decodes() {
        assert_eq!(qualifier(None).unwrap(), "$LATEST");
        assert_eq!(qualifier(Some("a=1")).unwrap(), "$LATEST");
        assert_eq!(qualifier(Some("qualifier=%24LATEST")).unwrap(), "$LATEST");
        assert_eq!(qualifier(Some("a=1&qualifi%65r=v3")).unwrap(), "v3");
        assert_eq!(qualifier(Some("qualifier=v2")).unwrap(), "v2");
        assert!(qualifier(Some("qualifier=")).is_err());
        assert!(qualifier(Some("qualifier=v1&qualifier=v2")).is_err());
    }
}
