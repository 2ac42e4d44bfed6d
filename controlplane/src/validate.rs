//! Checks namespace and function specs against the platform's limits before they are stored.
//!
//! Both the config file loader and `Platform::put_*` call these checks. Most look at one spec
//! at a time; `memory_within_quota` and `quota_fits_functions` compare a function with its
//! namespace. Whether a namespace exists or names are unique is left to the caller, and so is
//! reading the code package (`code::resolve`).

use std::fmt::Display;

use crate::error::PlatformError;
use crate::model::{
    CodeSource, EventRuntime, FunctionKind, FunctionSpec, KubeBinding, NamespaceSpec,
};

/// Maximum length of a namespace or function name, SCF's limit for function names.
pub const NAME_MAX_LEN: usize = 60;
/// Smallest instance memory in MB; a smaller limit leaves too little for most language runtimes.
pub const MEMORY_MB_MIN: u32 = 64;
/// Largest instance memory in MB (64 GiB); larger values are almost always a unit mistake.
pub const MEMORY_MB_MAX: u32 = 65_536;
/// Maximum execution timeout in ms, SCF's 900 s maximum for event functions.
pub const TIMEOUT_MS_MAX: u64 = 900_000;
/// Maximum concurrent requests per instance, because each uses a slot and an upstream connection.
pub const CONCURRENCY_MAX: u32 = 1_000;
/// Maximum instances per function, which bounds what one function can take from a node.
pub const MAX_INSTANCES_MAX: u32 = 1_000;
/// Shortest keep-warm in ms; shorter values would stop instances between steady requests.
pub const KEEP_WARM_MS_MIN: u64 = 1_000;
/// Maximum keep-warm in ms (one day). For an always-warm function, set min_instances.
pub const KEEP_WARM_MS_MAX: u64 = 86_400_000;
/// Maximum queue budget in ms, the same as the maximum execution timeout.
pub const QUEUE_BUDGET_MS_MAX: u64 = 900_000;
/// Maximum requests waiting for a slot per function, because each keeps a client connection open.
pub const QUEUE_LIMIT_MAX: u32 = 100_000;
/// Largest request body limit in bytes (64 MiB); the proxy may buffer a body this large.
pub const MAX_BODY_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Shortest start timeout in ms; even a trivial process takes some time to listen.
pub const START_TIMEOUT_MS_MIN: u64 = 100;
/// Maximum start timeout in ms (10 minutes), long enough to pull a large image.
pub const START_TIMEOUT_MS_MAX: u64 = 600_000;
/// Environment name prefixes the platform sets itself in every instance.
pub const RESERVED_ENV_PREFIXES: [&str; 2] = ["SCF_", "FNGATE_"];
/// Environment names the platform sets itself in every instance.
pub const RESERVED_ENV_NAMES: [&str; 1] = ["PORT"];

/// Checks a namespace spec: only its name has rules.
pub fn namespace(spec: &NamespaceSpec) -> Result<(), PlatformError> {
    check_name("name", "namespace", &spec.name)?;
    match &spec.kubernetes {
        Some(binding) => check_binding(binding),
        None => Ok(()),
    }
}

/// Shortest pod watcher relist interval in ms; shorter relists load the kube API for little gain.
pub const RESYNC_INTERVAL_MS_MIN: u64 = 1_000;
const TOLERATION_OPERATORS: [&str; 2] = ["Equal", "Exists"];
const TAINT_EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
/// Largest proxy Deployment, a guard against typos rather than a measured limit. Each replica
/// is to keep its own warm runtime pods (docs/design/proxy-replicas.md), so replicas cost pods.
pub const PROXY_REPLICAS_MAX: u32 = 100;
const SERVICE_TYPES: [&str; 3] = ["ClusterIP", "NodePort", "LoadBalancer"];

/// Checks a k8s-mode binding: what the pods' spec and the watcher take from it.
fn check_binding(binding: &KubeBinding) -> Result<(), PlatformError> {
    let field = |name: &str| format!("kubernetes.{name}");
    if let Some(problem) = dns_label_problem(&binding.namespace) {
        return Err(PlatformError::invalid(
            field("namespace"),
            format!("{problem}; a k8s namespace is 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
        ));
    }
    if binding.context.as_deref() == Some("") {
        return Err(PlatformError::invalid(
            field("context"),
            "is empty; name a context of the kubeconfig or leave the field out for its current context",
        ));
    }
    if !binding.function_dir.is_absolute() {
        return Err(PlatformError::invalid(
            field("function_dir"),
            format!(
                "must be an absolute path on the nodes, got {:?}",
                binding.function_dir
            ),
        ));
    }
    if binding.runtime_image.trim().is_empty()
        || binding.runtime_image.contains(char::is_whitespace)
    {
        return Err(PlatformError::invalid(
            field("runtime_image"),
            format!(
                "must be an image reference without spaces, got {:?}",
                binding.runtime_image
            ),
        ));
    }
    for (key, value) in &binding.node_selector {
        if let Some(problem) = label_key_problem(key) {
            return Err(PlatformError::invalid(
                field(&format!("node_selector.{key}")),
                format!("{problem} in the label key {key:?}"),
            ));
        }
        if let Some(problem) = label_value_problem(value) {
            return Err(PlatformError::invalid(
                field(&format!("node_selector.{key}")),
                format!("{problem} in the label value {value:?}"),
            ));
        }
    }
    for (index, toleration) in binding.tolerations.iter().enumerate() {
        let at = |name: &str| field(&format!("tolerations[{index}].{name}"));
        let operator = toleration.operator.as_deref().unwrap_or("Equal");
        if !TOLERATION_OPERATORS.contains(&operator) {
            return Err(PlatformError::invalid(
                at("operator"),
                format!("unknown operator {operator:?}; use \"Equal\" or \"Exists\""),
            ));
        }
        if let Some(effect) = toleration.effect.as_deref().filter(|e| !e.is_empty()) {
            if !TAINT_EFFECTS.contains(&effect) {
                return Err(PlatformError::invalid(
                    at("effect"),
                    format!("unknown effect {effect:?}; use one of {TAINT_EFFECTS:?}, or leave it out to match every effect"),
                ));
            }
        }
        let has_value = toleration.value.as_deref().is_some_and(|v| !v.is_empty());
        if operator == "Exists" && has_value {
            return Err(PlatformError::invalid(
                at("value"),
                "must be empty with operator \"Exists\"",
            ));
        }
        if operator == "Equal" && toleration.key.as_deref().unwrap_or("").is_empty() {
            return Err(PlatformError::invalid(
                at("key"),
                "is required with operator \"Equal\"; use operator \"Exists\" to tolerate every taint",
            ));
        }
    }
    if binding.agent_image.trim().is_empty() || binding.agent_image.contains(char::is_whitespace) {
        return Err(PlatformError::invalid(
            field("agent_image"),
            format!(
                "must be an image reference without spaces, got {:?}",
                binding.agent_image
            ),
        ));
    }
    if let Some(url) = &binding.control_plane_url {
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(PlatformError::invalid(
                field("control_plane_url"),
                format!("must be an http:// URL such as http://fngate.example:8082, got {url:?}"),
            ));
        }
    }
    if binding.resync_interval_ms < RESYNC_INTERVAL_MS_MIN {
        return Err(PlatformError::invalid(
            field("resync_interval_ms"),
            format!(
                "must be at least {RESYNC_INTERVAL_MS_MIN}, got {}",
                binding.resync_interval_ms
            ),
        ));
    }
    check_proxy_settings(binding)
}

/// Checks the settings of the proxy Deployment and its Service.
fn check_proxy_settings(binding: &KubeBinding) -> Result<(), PlatformError> {
    // The system objects are named `fngate-agent-<namespace>` and `fngate-proxy-<namespace>`,
    // and those names are also label values and a Service name, both at most 63 characters.
    let max_len = 63 - crate::k8s::install::PROXY_NAME_PREFIX.len();
    if binding.install && binding.namespace.len() > max_len {
        return Err(PlatformError::invalid(
            "kubernetes.namespace",
            format!(
                "is {} characters long, got {:?}; with install = true it may have at most {max_len}, because the system objects are named fngate-proxy-<namespace> and such a name is at most 63 characters. Use a shorter k8s namespace, or set install = false",
                binding.namespace.len(),
                binding.namespace
            ),
        ));
    }
    check_range(
        "kubernetes.support_service_port",
        binding.support_service_port,
        1,
        u32::from(u16::MAX),
        "",
    )?;
    check_range(
        "kubernetes.proxy_replicas",
        binding.proxy_replicas,
        1,
        PROXY_REPLICAS_MAX,
        "",
    )?;
    if !SERVICE_TYPES.contains(&binding.service_type.as_str()) {
        return Err(PlatformError::invalid(
            "kubernetes.service_type",
            format!(
                "unknown service type {:?}; use one of {SERVICE_TYPES:?}",
                binding.service_type
            ),
        ));
    }
    for key in binding.service_annotations.keys() {
        if let Some(problem) = label_key_problem(key) {
            return Err(PlatformError::invalid(
                format!("kubernetes.service_annotations.{key}"),
                format!(
                    "{problem} in the annotation key {key:?}; keys follow the label key syntax"
                ),
            ));
        }
    }
    let annotation_bytes: usize = binding
        .service_annotations
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    if annotation_bytes > ANNOTATIONS_MAX_BYTES {
        return Err(PlatformError::invalid(
            "kubernetes.service_annotations",
            format!(
                "total {annotation_bytes} bytes of keys and values; the Kubernetes API accepts \
                 at most {ANNOTATIONS_MAX_BYTES} bytes of annotations on an object"
            ),
        ));
    }
    Ok(())
}

/// Most bytes of annotation keys and values the Kubernetes API server accepts on one object.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// Returns why `value` is not a DNS-1123 label (a k8s namespace name), if it is not.
fn dns_label_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("is missing or empty".to_owned());
    }
    if value.len() > 63 {
        return Some(format!("is {} characters long, got {value:?}", value.len()));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!("contains {c:?}, got {value:?}"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Some(format!("starts or ends with '-', got {value:?}"));
    }
    None
}

/// Returns why `key` is not a label key (`[prefix/]name`), if it is not.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let bad = prefix.is_empty()
            || prefix.len() > 253
            || prefix
                .split('.')
                .any(|part| dns_label_problem(part).is_some());
        if bad {
            return Some("an invalid prefix (a DNS subdomain is expected before '/')".to_owned());
        }
    }
    if name.is_empty() {
        return Some("an empty name".to_owned());
    }
    label_value_problem(name)
}

/// Returns why `value` is not a label value (at most 63 letters, digits, '-', '_' and '.', starting
/// and ending with a letter or digit), if it is not.
fn label_value_problem(value: &str) -> Option<String> {
    if value.len() > 63 {
        return Some(format!("{} characters (at most 63)", value.len()));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!("the character {c:?}"));
    }
    let alnum_ends = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !value.is_empty() && !alnum_ends {
        return Some("a first or last character that is not a letter or digit".to_owned());
    }
    None
}

/// Checks a function spec: names, numeric limits, runtime, environment and code path.
pub fn function(spec: &FunctionSpec) -> Result<(), PlatformError> {
    check_name("namespace", "namespace", &spec.namespace)?;
    check_name("name", "function", &spec.name)?;
    check_limits(spec)?;
    check_runtime(spec)?;
    check_env(spec)?;
    check_code(&spec.code)?;
    check_layers(&spec.layers)
}

/// Most layers one function takes, as in SCF.
pub const MAX_LAYERS: usize = 5;

fn check_layers(layers: &[crate::model::Layer]) -> Result<(), PlatformError> {
    if layers.len() > MAX_LAYERS {
        return Err(PlatformError::invalid(
            "layers",
            format!(
                "has {} layers, more than the limit of {MAX_LAYERS}; merge some into one package",
                layers.len()
            ),
        ));
    }
    for (index, layer) in layers.iter().enumerate() {
        if !layer.zip_file.is_absolute() {
            return Err(PlatformError::invalid(
                format!("layers[{index}].zip_file"),
                format!(
                    "path {:?} must be absolute; the API takes absolute paths, and the config \
                     file resolves relative ones against its own directory",
                    layer.zip_file.display().to_string()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks that one instance of the function fits in its namespace's memory quota, because no
/// instance could ever start otherwise. A quota of zero means none.
pub fn memory_within_quota(
    spec: &FunctionSpec,
    namespace: &NamespaceSpec,
) -> Result<(), PlatformError> {
    let quota = namespace.memory_quota_mb;
    if quota == 0 || u64::from(spec.memory_mb) <= quota {
        return Ok(());
    }
    Err(PlatformError::invalid(
        "memory_mb",
        format!(
            "is {} MB, more than the memory quota of {quota} MB of namespace {:?}, so no \
             instance could ever start; set memory_mb to at most {quota}, or raise the \
             namespace's memory_quota_mb",
            spec.memory_mb, namespace.name
        ),
    ))
}

/// Checks that a namespace's new memory quota still fits one instance of each of its
/// `functions`. Returns a conflict naming the functions that would no longer fit.
pub fn quota_fits_functions(
    namespace: &NamespaceSpec,
    functions: &[&FunctionSpec],
) -> Result<(), PlatformError> {
    /// Functions named in the message; a namespace may have many.
    const MAX_NAMED: usize = 5;

    let quota = namespace.memory_quota_mb;
    if quota == 0 {
        return Ok(());
    }
    let mut too_large: Vec<&FunctionSpec> = functions
        .iter()
        .copied()
        .filter(|f| u64::from(f.memory_mb) > quota)
        .collect();
    if too_large.is_empty() {
        return Ok(());
    }

    too_large.sort_by(|a, b| b.memory_mb.cmp(&a.memory_mb).then(a.name.cmp(&b.name)));
    let largest = too_large[0].memory_mb;
    let mut named: Vec<String> = too_large
        .iter()
        .take(MAX_NAMED)
        .map(|f| format!("{:?} ({} MB)", f.name, f.memory_mb))
        .collect();
    if too_large.len() > MAX_NAMED {
        named.push(format!("{} more", too_large.len() - MAX_NAMED));
    }
    let noun = if too_large.len() == 1 {
        "function"
    } else {
        "functions"
    };
    Err(PlatformError::Conflict(format!(
        "memory_quota_mb {quota} of namespace {:?} is below the memory_mb of its {noun} {}, \
         which could then never start an instance; keep the quota at {largest} MB or more, or \
         lower the memory_mb of those functions first",
        namespace.name,
        named.join(", ")
    )))
}

fn check_limits(spec: &FunctionSpec) -> Result<(), PlatformError> {
    check_range(
        "memory_mb",
        spec.memory_mb,
        MEMORY_MB_MIN,
        MEMORY_MB_MAX,
        "MB",
    )?;
    check_range("timeout_ms", spec.timeout_ms, 1, TIMEOUT_MS_MAX, "ms")?;
    check_range("concurrency", spec.concurrency, 1, CONCURRENCY_MAX, "")?;
    check_range(
        "max_instances",
        spec.max_instances,
        1,
        MAX_INSTANCES_MAX,
        "",
    )?;
    if spec.min_instances > spec.max_instances {
        return Err(PlatformError::invalid(
            "min_instances",
            format!(
                "must not exceed max_instances ({}), got {}",
                spec.max_instances, spec.min_instances
            ),
        ));
    }
    check_range(
        "keep_warm_ms",
        spec.keep_warm_ms,
        KEEP_WARM_MS_MIN,
        KEEP_WARM_MS_MAX,
        "ms",
    )?;
    check_range(
        "queue_budget_ms",
        spec.queue_budget_ms,
        1,
        QUEUE_BUDGET_MS_MAX,
        "ms",
    )?;
    check_range("queue_limit", spec.queue_limit, 1, QUEUE_LIMIT_MAX, "")?;
    check_range(
        "max_body_bytes",
        spec.max_body_bytes,
        1,
        MAX_BODY_BYTES_MAX,
        "bytes",
    )?;
    check_range(
        "start_timeout_ms",
        spec.start_timeout_ms,
        START_TIMEOUT_MS_MIN,
        START_TIMEOUT_MS_MAX,
        "ms",
    )
}

fn check_runtime(spec: &FunctionSpec) -> Result<(), PlatformError> {
    match spec.kind {
        FunctionKind::Web if spec.runtime.is_some() => Err(PlatformError::invalid(
            "runtime",
            "applies only to event functions; remove it from this web function, which serves \
                 HTTP itself",
        )),
        FunctionKind::Event
            if spec.event_runtime() == EventRuntime::Custom && spec.concurrency != 1 =>
        {
            Err(PlatformError::invalid(
                "concurrency",
                format!(
                    "must be 1 for an event function with runtime = \"custom\", got {}, because \
                     SCF's custom runtime API hands one invocation at a time to the bootstrap. \
                     For concurrent invocations, set runtime = \"image\" and let the function's \
                     server answer POST /event-invoke",
                    spec.concurrency
                ),
            ))
        }
        _ => Ok(()),
    }
}

fn check_env(spec: &FunctionSpec) -> Result<(), PlatformError> {
    for (key, value) in &spec.env {
        check_env_key(key)?;
        if value.contains('\0') {
            return Err(PlatformError::invalid(
                format!("env.{key}"),
                "contains a NUL byte, which a process environment cannot carry",
            ));
        }
    }
    Ok(())
}

fn check_env_key(key: &str) -> Result<(), PlatformError> {
    let mut chars = key.chars();
    let Some(first) = chars.next() else {
        return Err(PlatformError::invalid(
            "env",
            "contains an empty variable name",
        ));
    };
    let well_formed = (first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !well_formed {
        return Err(PlatformError::invalid(
            "env",
            format!(
                "variable name {key:?} is invalid: use ASCII letters, digits and '_', and do not \
                 start with a digit"
            ),
        ));
    }
    let reserved_prefix = RESERVED_ENV_PREFIXES.iter().find(|p| key.starts_with(*p));
    if let Some(prefix) = reserved_prefix {
        return Err(PlatformError::invalid(
            "env",
            format!(
                "variable name {key:?} is reserved: the platform sets the variables starting \
                 with {prefix}; rename it"
            ),
        ));
    }
    if RESERVED_ENV_NAMES.contains(&key) {
        return Err(PlatformError::invalid(
            "env",
            format!("variable name {key:?} is reserved: the platform sets it; rename it"),
        ));
    }
    Ok(())
}

fn check_code(code: &CodeSource) -> Result<(), PlatformError> {
    let path = match code {
        CodeSource::Directory(path) | CodeSource::ZipFile(path) => path,
    };
    if path.is_absolute() {
        return Ok(());
    }
    Err(PlatformError::invalid(
        "code",
        format!(
            "path {:?} must be absolute; the API takes absolute paths, and the config file \
             resolves relative ones against its own directory",
            path.display().to_string()
        ),
    ))
}

/// Checks a namespace or function name; `what` names the kind of name in the message.
fn check_name(field: &str, what: &str, value: &str) -> Result<(), PlatformError> {
    let rule = format!(
        "a {what} name is 1 to {NAME_MAX_LEN} ASCII letters, digits, '-' and '_', starting with a \
         letter"
    );
    let invalid_char = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'));
    let problem = if value.is_empty() {
        "is missing or empty".to_string()
    } else if !value.starts_with(|c: char| c.is_ascii_alphabetic()) {
        format!("must start with an ASCII letter, got {value:?}")
    } else if let Some(c) = invalid_char {
        format!("contains {c:?}, got {value:?}")
    } else if value.len() > NAME_MAX_LEN {
        // Only ASCII is left at this point, so bytes and characters agree.
        format!("is {} characters long, got {value:?}", value.len())
    } else {
        return Ok(());
    };
    Err(PlatformError::invalid(field, format!("{problem}; {rule}")))
}

fn check_range<T: PartialOrd + Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
    unit: &str,
) -> Result<(), PlatformError> {
    if value >= min && value <= max {
        return Ok(());
    }
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    Err(PlatformError::invalid(
        field,
        format!("must be between {min} and {max}{unit}, got {value}"),
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn web() -> FunctionSpec {
        FunctionSpec {
            namespace: "default".into(),
            name: "hello-web".into(),
            kind: FunctionKind::Web,
            runtime: None,
            code: CodeSource::Directory(PathBuf::from("/srv/code/hello")),
            memory_mb: 128,
            timeout_ms: 3_000,
            env: Default::default(),
            concurrency: 4,
            min_instances: 0,
            max_instances: 3,
            keep_warm_ms: 60_000,
            queue_budget_ms: 10_000,
            queue_limit: 1_000,
            max_body_bytes: 6 * 1024 * 1024,
            start_timeout_ms: 30_000,
            layers: Vec::new(),
        }
    }

    fn event(runtime: EventRuntime, concurrency: u32) -> FunctionSpec {
        FunctionSpec {
            kind: FunctionKind::Event,
            runtime: Some(runtime),
            concurrency,
            ..web()
        }
    }

    /// Returns the field the check rejected, panicking with the spec if it passed.
    fn rejected_field(spec: &FunctionSpec) -> String {
        match function(spec) {
            Err(PlatformError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?} for {spec:?}"),
        }
    }

    fn rejected_message(spec: &FunctionSpec) -> String {
        match function(spec) {
            Err(PlatformError::Invalid { message, .. }) => message,
            other => panic!("expected Invalid, got {other:?} for {spec:?}"),
        }
    }

    #[test]
    fn valid_specs_pass() {
        assert!(function(&web()).is_ok());
        assert!(function(&event(EventRuntime::Custom, 1)).is_ok());
        assert!(function(&event(EventRuntime::Image, 100)).is_ok());
        let ns = NamespaceSpec {
            name: "default".into(),
            memory_quota_mb: 0,
            kubernetes: None,
        };
        assert!(namespace(&ns).is_ok());
    }

    #[test]
    fn names_follow_scf_rule() {
        let accepted = ["a", "hello-web", "A_1-b", &"x".repeat(NAME_MAX_LEN)];
        for name in accepted {
            let spec = FunctionSpec {
                name: name.to_string(),
                ..web()
            };
            assert!(function(&spec).is_ok(), "{name:?} should be accepted");
            let ns = NamespaceSpec {
                name: name.to_string(),
                memory_quota_mb: 0,
                kubernetes: None,
            };
            assert!(
                namespace(&ns).is_ok(),
                "namespace {name:?} should be accepted"
            );
        }
        let too_long = "x".repeat(NAME_MAX_LEN + 1);
        let rejected = [
            "", "1abc", "-abc", "_abc", "a.b", "a/b", "a b", "é", "..", &too_long,
        ];
        for name in rejected {
            let spec = FunctionSpec {
                name: name.to_string(),
                ..web()
            };
            assert_eq!(rejected_field(&spec), "name", "{name:?} should be rejected");
            let spec = FunctionSpec {
                namespace: name.to_string(),
                ..web()
            };
            assert_eq!(rejected_field(&spec), "namespace", "namespace {name:?}");
            let ns = NamespaceSpec {
                name: name.to_string(),
                memory_quota_mb: 0,
                kubernetes: None,
            };
            assert!(
                namespace(&ns).is_err(),
                "namespace spec {name:?} should be rejected"
            );
        }
    }

    #[test]
    fn name_message_gives_rule_and_value() {
        let spec = FunctionSpec {
            name: "9lives".into(),
            ..web()
        };
        let message = rejected_message(&spec);
        assert!(message.contains("\"9lives\""), "{message}");
        assert!(message.contains("1 to 60"), "{message}");
    }

    #[test]
    fn numeric_limits_at_both_ends() {
        type Set = fn(&mut FunctionSpec, u64);
        let cases: [(&str, u64, u64, Set); 9] = [
            ("memory_mb", 64, 65_536, |s, v| s.memory_mb = v as u32),
            ("timeout_ms", 1, 900_000, |s, v| s.timeout_ms = v),
            ("concurrency", 1, 1_000, |s, v| s.concurrency = v as u32),
            ("max_instances", 1, 1_000, |s, v| s.max_instances = v as u32),
            ("keep_warm_ms", 1_000, 86_400_000, |s, v| s.keep_warm_ms = v),
            ("queue_budget_ms", 1, 900_000, |s, v| s.queue_budget_ms = v),
            ("queue_limit", 1, 100_000, |s, v| s.queue_limit = v as u32),
            ("max_body_bytes", 1, 64 << 20, |s, v| s.max_body_bytes = v),
            ("start_timeout_ms", 100, 600_000, |s, v| {
                s.start_timeout_ms = v
            }),
        ];
        for (field, min, max, set) in cases {
            for ok in [min, max] {
                let mut spec = web();
                set(&mut spec, ok);
                assert!(function(&spec).is_ok(), "{field} = {ok} should be accepted");
            }
            for bad in [min - 1, max + 1] {
                let mut spec = web();
                set(&mut spec, bad);
                assert_eq!(rejected_field(&spec), field, "{field} = {bad}");
                let message = rejected_message(&spec);
                assert!(message.contains(&format!("got {bad}")), "{message}");
                assert!(
                    message.contains(&format!("between {min} and {max}")),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn min_instances_above_max_rejected() {
        let spec = FunctionSpec {
            min_instances: 3,
            max_instances: 3,
            ..web()
        };
        assert!(function(&spec).is_ok());
        let spec = FunctionSpec {
            min_instances: 4,
            max_instances: 3,
            ..web()
        };
        assert_eq!(rejected_field(&spec), "min_instances");
    }

    #[test]
    fn custom_event_requires_concurrency_one() {
        let spec = event(EventRuntime::Custom, 2);
        assert_eq!(rejected_field(&spec), "concurrency");
        let message = rejected_message(&spec);
        assert!(message.contains("runtime = \"image\""), "{message}");
        assert!(message.contains("got 2"), "{message}");
    }

    #[test]
    fn web_with_runtime_rejected() {
        for runtime in [EventRuntime::Image, EventRuntime::Custom] {
            let spec = FunctionSpec {
                runtime: Some(runtime),
                ..web()
            };
            assert_eq!(rejected_field(&spec), "runtime", "{runtime:?}");
        }
    }

    #[test]
    fn env_keys_checked() {
        let accepted = ["GREETING", "_x", "a1_B"];
        for key in accepted {
            let mut spec = web();
            spec.env.insert(key.into(), "v".into());
            assert!(
                function(&spec).is_ok(),
                "env key {key:?} should be accepted"
            );
        }
        let rejected = ["", "1A", "A-B", "A B", "SCF_REGION", "FNGATE_X", "PORT"];
        for key in rejected {
            let mut spec = web();
            spec.env.insert(key.into(), "v".into());
            assert_eq!(
                rejected_field(&spec),
                "env",
                "env key {key:?} should be rejected"
            );
        }
    }

    #[test]
    fn env_value_with_nul_rejected() {
        let mut spec = web();
        spec.env.insert("GREETING".into(), "a\0b".into());
        assert_eq!(rejected_field(&spec), "env.GREETING");
    }

    fn namespace_with_quota(memory_quota_mb: u64) -> NamespaceSpec {
        NamespaceSpec {
            name: "batch".into(),
            memory_quota_mb,
            kubernetes: None,
        }
    }

    #[test]
    fn memory_above_quota_rejected() {
        let spec = FunctionSpec {
            memory_mb: 512,
            ..web()
        };
        for quota in [0, 512, 1024] {
            let namespace = namespace_with_quota(quota);
            assert!(
                memory_within_quota(&spec, &namespace).is_ok(),
                "quota {quota}"
            );
        }
        let error = memory_within_quota(&spec, &namespace_with_quota(256)).unwrap_err();
        let PlatformError::Invalid { field, message } = error else {
            panic!("expected Invalid, got {error:?}");
        };
        assert_eq!(field, "memory_mb");
        assert!(message.contains("512 MB"), "{message}");
        assert!(message.contains("quota of 256 MB"), "{message}");
        assert!(message.contains("\"batch\""), "{message}");
    }

    #[test]
    fn quota_below_function_memory_conflicts() {
        let small = FunctionSpec {
            name: "small".into(),
            memory_mb: 128,
            ..web()
        };
        let large = FunctionSpec {
            name: "large".into(),
            memory_mb: 512,
            ..web()
        };
        let functions = [&small, &large];
        for quota in [0, 512] {
            let namespace = namespace_with_quota(quota);
            assert!(
                quota_fits_functions(&namespace, &functions).is_ok(),
                "quota {quota}"
            );
        }
        let error = quota_fits_functions(&namespace_with_quota(256), &functions).unwrap_err();
        let PlatformError::Conflict(message) = error else {
            panic!("expected Conflict, got {error:?}");
        };
        assert!(message.contains("function \"large\" (512 MB)"), "{message}");
        assert!(!message.contains("small"), "{message}");
        assert!(message.contains("at 512 MB or more"), "{message}");
    }

    #[test]
    fn quota_conflict_names_at_most_five() {
        let specs: Vec<FunctionSpec> = (0..7u32)
            .map(|i| FunctionSpec {
                name: format!("f{i}"),
                memory_mb: 256 + i,
                ..web()
            })
            .collect();
        let functions: Vec<&FunctionSpec> = specs.iter().collect();
        let error = quota_fits_functions(&namespace_with_quota(128), &functions).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("functions \"f6\" (262 MB)"), "{message}");
        assert!(message.contains("\"f2\" (258 MB), 2 more"), "{message}");
        assert!(!message.contains("\"f1\""), "{message}");
        assert!(message.contains("at 262 MB or more"), "{message}");
    }

    #[test]
    fn relative_code_path_rejected() {
        let spec = FunctionSpec {
            code: CodeSource::Directory("code".into()),
            ..web()
        };
        assert_eq!(rejected_field(&spec), "code");
        let spec = FunctionSpec {
            code: CodeSource::ZipFile("a.zip".into()),
            ..web()
        };
        assert_eq!(rejected_field(&spec), "code");
        let spec = FunctionSpec {
            code: CodeSource::ZipFile("/a.zip".into()),
            ..web()
        };
        assert!(function(&spec).is_ok());
    }

    /// Parses a namespace with a `[kubernetes]` table made of `binding` plus the required
    /// k8s namespace, and returns the field the check rejects with its message.
    fn binding_error(binding: &str) -> Option<(String, String)> {
        let toml = format!("name = \"team\"\n[kubernetes]\nnamespace = \"runtime\"\n{binding}");
        let spec: NamespaceSpec = toml::from_str(&toml).unwrap();
        match namespace(&spec) {
            Ok(()) => None,
            Err(PlatformError::Invalid { field, message }) => Some((field, message)),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn binding_accepts_placement_rules() {
        let binding = r#"
node_selector = { "fngate.io/pool" = "functions", "zone" = "" }
tolerations = [{ key = "dedicated", operator = "Equal", value = "fn", effect = "NoSchedule" },
               { operator = "Exists" }]
"#;
        assert_eq!(binding_error(binding), None);
    }

    #[test]
    fn binding_proxy_settings_have_defaults() {
        let toml = "name = \"team\"\n[kubernetes]\nnamespace = \"runtime\"\n";
        let spec: NamespaceSpec = toml::from_str(toml).unwrap();
        let binding = spec.kubernetes.unwrap();
        assert_eq!(binding.support_service_port, 8080);
        assert_eq!(binding.proxy_replicas, 2);
        assert_eq!(binding.service_type, "ClusterIP");
        assert!(binding.service_annotations.is_empty());
    }

    #[test]
    fn binding_accepts_proxy_settings() {
        let accepted = [
            "support_service_port = 1\nproxy_replicas = 1",
            "support_service_port = 65535\nproxy_replicas = 100",
            r#"service_type = "NodePort""#,
            r#"service_type = "LoadBalancer"
service_annotations = { "service.beta.kubernetes.io/aws-load-balancer-internal" = "true", "note" = "free text: any value, even with spaces" }"#,
        ];
        for binding in accepted {
            assert_eq!(binding_error(binding), None, "{binding}");
        }
    }

    #[test]
    fn installed_namespace_leaves_room_for_prefix() {
        let parse = |namespace: &str, install: bool| -> NamespaceSpec {
            toml::from_str(&format!(
                "name = \"team\"\n[kubernetes]\nnamespace = \"{namespace}\"\ninstall = {install}\n"
            ))
            .unwrap()
        };
        assert!(namespace(&parse(&"n".repeat(50), true)).is_ok());
        assert!(namespace(&parse(&"n".repeat(63), false)).is_ok());
        let error = namespace(&parse(&"n".repeat(51), true)).unwrap_err();
        let PlatformError::Invalid { field, message } = error else {
            panic!("expected Invalid, got {error:?}");
        };
        assert_eq!(field, "kubernetes.namespace");
        assert!(message.contains("at most 50"), "{message}");
        assert!(message.contains("install = false"), "{message}");
    }

    #[test]
    fn binding_errors_name_the_field() {
        let cases = [
            (
                r#"tolerations = [{ key = "a", operator = "Equals" }]"#,
                "kubernetes.tolerations[0].operator",
                "\"Equals\"",
            ),
            (
                r#"tolerations = [{ key = "a", operator = "Exists", value = "x" }]"#,
                "kubernetes.tolerations[0].value",
                "Exists",
            ),
            (
                r#"tolerations = [{ operator = "Exists" }, { key = "a", effect = "NoRun" }]"#,
                "kubernetes.tolerations[1].effect",
                "\"NoRun\"",
            ),
            (
                r#"function_dir = "var/lib/fngate""#,
                "kubernetes.function_dir",
                "absolute",
            ),
            (
                r#"node_selector = { "bad key!" = "x" }"#,
                "kubernetes.node_selector.bad key!",
                "label key",
            ),
            (
                r#"node_selector = { "pool" = "-x" }"#,
                "kubernetes.node_selector.pool",
                "label value",
            ),
            (
                r#"runtime_image = "a b""#,
                "kubernetes.runtime_image",
                "spaces",
            ),
            (
                r#"resync_interval_ms = 10"#,
                "kubernetes.resync_interval_ms",
                "at least",
            ),
            (r#"context = """#, "kubernetes.context", "empty"),
            (
                "support_service_port = 0",
                "kubernetes.support_service_port",
                "between 1 and 65535, got 0",
            ),
            (
                "support_service_port = 70000",
                "kubernetes.support_service_port",
                "between 1 and 65535, got 70000",
            ),
            (
                "proxy_replicas = 0",
                "kubernetes.proxy_replicas",
                "between 1 and 100, got 0",
            ),
            (
                "proxy_replicas = 101",
                "kubernetes.proxy_replicas",
                "between 1 and 100, got 101",
            ),
            (
                r#"service_type = "ExternalName""#,
                "kubernetes.service_type",
                r#""ExternalName"; use one of ["ClusterIP", "NodePort", "LoadBalancer"]"#,
            ),
            (
                r#"service_type = "clusterip""#,
                "kubernetes.service_type",
                r#""clusterip""#,
            ),
            (
                r#"service_annotations = { "bad key!" = "x" }"#,
                "kubernetes.service_annotations.bad key!",
                "annotation key",
            ),
            (
                r#"service_annotations = { "-example.com/internal" = "true" }"#,
                "kubernetes.service_annotations.-example.com/internal",
                "invalid prefix",
            ),
        ];
        for (binding, field, needle) in cases {
            let (got_field, message) =
                binding_error(binding).unwrap_or_else(|| panic!("accepted: {binding}"));
            assert_eq!(got_field, field, "{binding}: {message}");
            assert!(message.contains(needle), "{binding}: {message}");
        }
        let large = format!(
            "service_annotations = {{ \"a\" = \"{}\", \"b\" = \"{}\" }}",
            "x".repeat(130 * 1024),
            "y".repeat(130 * 1024)
        );
        let (field, message) = binding_error(&large).expect("oversized annotations accepted");
        assert_eq!(field, "kubernetes.service_annotations");
        assert!(message.contains("262144"), "{message}");
        let spec: NamespaceSpec =
            toml::from_str("name = \"team\"\n[kubernetes]\nnamespace = \"Runtime_NS\"\n").unwrap();
        let error = namespace(&spec).unwrap_err().to_string();
        assert!(error.contains("kubernetes.namespace"), "{error}");
    }
}
