//! Function and namespace specifications as operators declare them, with their defaults and
//! validation. The config file and the HTTP API both deserialize into these types.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version name every function has; published versions are not supported yet.
pub const LATEST: &str = "$LATEST";

/// Default maximum event body, matching SCF's limit for synchronous invocations.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 6 * 1024 * 1024;

/// A function namespace: a group of functions sharing one memory quota.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Defaults to empty so an API body may omit it (the URL path names the namespace); an
    /// empty name fails validation.
    #[serde(default)]
    pub name: String,
    /// Upper bound on the summed memory of the namespace's running instances, in MB.
    /// Zero means no quota.
    #[serde(default)]
    pub memory_quota_mb: u64,
    /// Present in k8s mode: the cluster and k8s namespace where the functions' instances run
    /// as pods. Absent means default mode (local processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeBinding>,
}

/// Binding of a k8s-mode namespace: the cluster and k8s namespace of its pods, and their placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeBinding {
    /// Kubeconfig file with the cluster's credentials; absent means the in-cluster service
    /// account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig; absent means its current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The k8s namespace for runtime pods. It must exist.
    pub namespace: String,
    /// The function directory on the nodes, mounted read-only into runtime pods. Code under
    /// the control plane's function directory is expected at the same relative path here.
    #[serde(default = "defaults::node_function_dir")]
    pub function_dir: PathBuf,
    /// Image of the runtime pods, with the runtime wrapper at
    /// `/usr/local/bin/fngate-runtime`.
    #[serde(default = "defaults::runtime_image")]
    pub runtime_image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// How often the pod watcher lists all runtime pods again, as a guard against missed
    /// watch events. The system components are re-applied at the same interval.
    #[serde(default = "defaults::resync_interval_ms")]
    pub resync_interval_ms: u64,
    /// Whether fngate applies its system components (the node agent DaemonSet and its RBAC)
    /// into `fngate-system` of the cluster and reports the binding's status from them.
    #[serde(default = "defaults::install")]
    pub install: bool,
    /// Image of the node agent and of the proxy Deployment: the fngate image.
    #[serde(default = "defaults::agent_image")]
    pub agent_image: String,
    /// Kubeconfig on the nodes for the agent and the proxy pods; absent means their service
    /// accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_kubeconfig: Option<PathBuf>,
    /// URL of the control-plane API as the nodes reach it. Agents fetch code packages there,
    /// and the proxy pods connect to it. Absent means the address of fngate's API listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_url: Option<String>,
    /// Port of the proxy Service, where clients invoke functions (the support service port),
    /// 1 to 65535. Wider than `u16` so that an out-of-range value reaches validation, which
    /// names the field, instead of failing to parse.
    #[serde(default = "defaults::support_service_port")]
    pub support_service_port: u32,
    /// Number of proxy pods in the proxy Deployment, 1 to 100.
    #[serde(default = "defaults::proxy_replicas")]
    pub proxy_replicas: u32,
    /// Type of the proxy Service: `ClusterIP`, `NodePort` or `LoadBalancer`. A string, not an
    /// enum, so that an unknown type is rejected by validation with the field named.
    #[serde(default = "defaults::service_type")]
    pub service_type: String,
    /// Annotations of the proxy Service, for example a cloud's internal-load-balancer
    /// annotation. Keys follow the label key syntax, and values are free text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
}

/// Invocation style of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    /// Invoked with a JSON event through `POST /functions/{namespace}/{function}/invocations`.
    Event,
    /// Serves HTTP itself; requests under `/web/{namespace}/{function}/` reach it as they came.
    Web,
}

/// Protocol between an event function's code and the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventRuntime {
    /// `bootstrap` (or `scf_bootstrap`) speaks SCF's custom runtime API to fngate's runtime
    /// wrapper, which handles one invocation at a time.
    #[default]
    Custom,
    /// `scf_bootstrap` starts a server that answers `POST /event-invoke` itself.
    Image,
}

/// Source of a function's code: `{"directory": "..."}` or `{"zip_file": "..."}` in JSON,
/// `code = { directory = "..." }` in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeSource {
    /// A directory used in place.
    Directory(PathBuf),
    /// A zip archive, unpacked under the function directory.
    ZipFile(PathBuf),
}

/// Deserializes a map with exactly one of the keys `directory` and `zip_file`. The derived
/// enum deserializer would report an empty or two-key map as a JSON syntax error.
impl<'de> Deserialize<'de> for CodeSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(CodeSourceVisitor)
    }
}

/// A key of a code source map; any other key is an unknown field.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum CodeSourceKey {
    Directory,
    ZipFile,
}

struct CodeSourceVisitor;

impl CodeSourceVisitor {
    const RULE: &'static str = "`code` takes exactly one of `directory` or `zip_file`";
}

impl<'de> serde::de::Visitor<'de> for CodeSourceVisitor {
    type Value = CodeSource;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a map with exactly one of the keys `directory` or `zip_file`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CodeSource, A::Error> {
        use serde::de::Error;

        let mut source = None;
        while let Some(key) = map.next_key::<CodeSourceKey>()? {
            let path: PathBuf = map.next_value()?;
            if source.is_some() {
                return Err(A::Error::custom(format!(
                    "{}, got more than one",
                    Self::RULE
                )));
            }
            source = Some(match key {
                CodeSourceKey::Directory => CodeSource::Directory(path),
                CodeSourceKey::ZipFile => CodeSource::ZipFile(path),
            });
        }
        source.ok_or_else(|| A::Error::custom(format!("{}, got neither", Self::RULE)))
    }
}

/// A function as declared. Durations are in milliseconds on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Defaults to empty so an API body may omit it (the URL path names the function); an empty
    /// namespace or name fails validation.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    pub kind: FunctionKind,
    /// Event functions only; absent means [`EventRuntime::Custom`]. The platform fills it in
    /// for stored event functions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<EventRuntime>,
    pub code: CodeSource,
    #[serde(default = "defaults::memory_mb")]
    pub memory_mb: u32,
    /// Execution timeout: how long one invocation may run once it reached an instance.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Concurrent requests one instance accepts (its slots).
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    #[serde(default)]
    pub min_instances: u32,
    #[serde(default = "defaults::max_instances")]
    pub max_instances: u32,
    /// How long an idle instance is kept before it is drained and stopped.
    #[serde(default = "defaults::keep_warm_ms")]
    pub keep_warm_ms: u64,
    /// How long a request may wait for a free slot, cold start included.
    #[serde(default = "defaults::queue_budget_ms")]
    pub queue_budget_ms: u64,
    /// Maximum number of requests waiting for a slot.
    #[serde(default = "defaults::queue_limit")]
    pub queue_limit: u32,
    /// Maximum request body in bytes.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: u64,
    /// How long an instance may take to become ready before its start counts as failed.
    #[serde(default = "defaults::start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// Zip packages unpacked, in this order, into one directory that instances find in
    /// `FNGATE_LAYER_DIR`. A later layer's file replaces an earlier layer's file of the same path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Layer>,
}

/// A layer of a function: `{ zip_file = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub zip_file: PathBuf,
}

mod defaults {
    use std::path::PathBuf;

    pub fn node_function_dir() -> PathBuf {
        PathBuf::from("/var/lib/fngate")
    }
    pub fn runtime_image() -> String {
        format!("fngate/runtime:{}", env!("CARGO_PKG_VERSION"))
    }
    pub fn resync_interval_ms() -> u64 {
        300_000
    }
    pub fn install() -> bool {
        true
    }
    pub fn agent_image() -> String {
        format!("fngate/fngate:{}", env!("CARGO_PKG_VERSION"))
    }
    pub fn support_service_port() -> u32 {
        8080
    }
    pub fn proxy_replicas() -> u32 {
        2
    }
    pub fn service_type() -> String {
        "ClusterIP".to_owned()
    }
    pub fn memory_mb() -> u32 {
        128
    }
    pub fn timeout_ms() -> u64 {
        3_000
    }
    pub fn concurrency() -> u32 {
        1
    }
    pub fn max_instances() -> u32 {
        10
    }
    pub fn keep_warm_ms() -> u64 {
        60_000
    }
    pub fn queue_budget_ms() -> u64 {
        10_000
    }
    pub fn queue_limit() -> u32 {
        1_000
    }
    pub fn max_body_bytes() -> u64 {
        super::DEFAULT_MAX_BODY_BYTES
    }
    pub fn start_timeout_ms() -> u64 {
        30_000
    }
}

impl FunctionSpec {
    /// Returns the event runtime in effect, the default when none is set.
    pub fn event_runtime(&self) -> EventRuntime {
        self.runtime.unwrap_or_default()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn keep_warm(&self) -> Duration {
        Duration::from_millis(self.keep_warm_ms)
    }

    pub fn queue_budget(&self) -> Duration {
        Duration::from_millis(self.queue_budget_ms)
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }
}
