//! Maps a request path to one of the API's routes and lists the methods each route allows.
//!
//! Path segments are matched as they arrive, without percent-decoding: valid namespace and
//! function names use only ASCII letters, digits, `-` and `_`, which clients never encode.

use hyper::Method;

/// One of the API's resources, with the names taken from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/healthz`
    Healthz,
    /// `/v1/namespaces`
    Namespaces,
    /// `/v1/namespaces/{namespace}`
    Namespace { namespace: String },
    /// `/v1/namespaces/{namespace}/functions`
    Functions { namespace: String },
    /// `/v1/namespaces/{namespace}/functions/{name}`
    Function { namespace: String, name: String },
    /// `/v1/packages/{sha256}`: a stored code package, for node agents.
    Package { digest: String },
    /// `/v1/namespaces/{namespace}/replicas/{replica}/routes`: a proxy replica's routes poll.
    /// NOTE: unauthenticated like the rest of the API. Any client that reaches the API can join
    /// as a replica, so keep the API listener off networks other clients share.
    ReplicaRoutes { namespace: String, replica: String },
    /// `/v1/namespaces/{namespace}/replicas/{replica}/report`: a proxy replica's report.
    ReplicaReport { namespace: String, replica: String },
}

impl Route {
    /// Parses a request path; None if no route matches. Empty segments, as in a trailing slash,
    /// match nothing.
    pub(crate) fn parse(path: &str) -> Option<Route> {
        if path == "/healthz" {
            return Some(Route::Healthz);
        }
        let segments: Vec<&str> = path.strip_prefix("/v1/")?.split('/').collect();
        if segments.iter().any(|segment| segment.is_empty()) {
            return None;
        }
        match segments.as_slice() {
            ["namespaces"] => Some(Route::Namespaces),
            ["namespaces", namespace] => Some(Route::Namespace {
                namespace: namespace.to_string(),
            }),
            ["namespaces", namespace, "functions"] => Some(Route::Functions {
                namespace: namespace.to_string(),
            }),
            ["namespaces", namespace, "functions", name] => Some(Route::Function {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }),
            ["namespaces", namespace, "replicas", replica, "routes"] => {
                Some(Route::ReplicaRoutes {
                    namespace: namespace.to_string(),
                    replica: replica.to_string(),
                })
            }
            ["namespaces", namespace, "replicas", replica, "report"] => {
                Some(Route::ReplicaReport {
                    namespace: namespace.to_string(),
                    replica: replica.to_string(),
                })
            }
            ["packages", digest] => Some(Route::Package {
                digest: digest.to_string(),
            }),
            _ => None,
        }
    }

    /// Returns the methods the route allows, as the `Allow` header lists them.
    pub(crate) fn allow(&self) -> &'static str {
        match self {
            Route::Healthz
            | Route::Namespaces
            | Route::Functions { .. }
            | Route::Package { .. }
            | Route::ReplicaRoutes { .. } => "GET",
            Route::ReplicaReport { .. } => "POST",
            Route::Namespace { .. } | Route::Function { .. } => "GET, PUT, DELETE",
        }
    }

    /// Returns whether the route allows `method`.
    pub(crate) fn allows(&self, method: &Method) -> bool {
        self.allow()
            .split(", ")
            .any(|allowed| allowed == method.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(namespace: &str) -> Route {
        Route::Namespace {
            namespace: namespace.into(),
        }
    }

    #[test]
    fn known_paths_parsed() {
        let cases = [
            ("/healthz", Route::Healthz),
            ("/v1/namespaces", Route::Namespaces),
            ("/v1/namespaces/default", namespace("default")),
            (
                "/v1/namespaces/a/functions",
                Route::Functions {
                    namespace: "a".into(),
                },
            ),
            (
                "/v1/namespaces/a/functions/hello-web",
                Route::Function {
                    namespace: "a".into(),
                    name: "hello-web".into(),
                },
            ),
        ];
        for (path, expected) in cases {
            assert_eq!(Route::parse(path), Some(expected), "{path}");
        }
    }

    #[test]
    fn unknown_paths_rejected() {
        let paths = [
            "/",
            "",
            "/healthz/",
            "/v1",
            "/v1/",
            "/v2/namespaces",
            "/v1/namespaces/",
            "/v1/namespaces//functions",
            "/v1/namespaces/a/function",
            "/v1/namespaces/a/functions/",
            "/v1/namespaces/a/functions/f/extra",
            "/v1/functions",
        ];
        for path in paths {
            assert_eq!(Route::parse(path), None, "{path}");
        }
    }

    #[test]
    fn allowed_methods_listed() {
        assert!(Route::Healthz.allows(&Method::GET));
        assert!(!Route::Healthz.allows(&Method::POST));
        assert!(!Route::Namespaces.allows(&Method::PUT));
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            assert!(namespace("a").allows(&method), "{method}");
        }
        assert!(!namespace("a").allows(&Method::POST));
        assert!(!namespace("a").allows(&Method::PATCH));
        assert_eq!(namespace("a").allow(), "GET, PUT, DELETE");
    }
}
