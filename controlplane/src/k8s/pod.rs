//! The runtime pod of one instance: the spec fngate sends the cluster.

use std::path::{Path, PathBuf};

use fngate_proxy::pod_watch::{
    ANNOTATION_FUNCTION, ANNOTATION_NAMESPACE, ANNOTATION_QUALIFIER, LABEL_FUNCTION,
    LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAMESPACE, LABEL_QUALIFIER, LABEL_REPLICA, MANAGED_BY,
    RUNTIME_PORT,
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use crate::backend::StartRequest;
use crate::code::version_path;
use crate::model::{EventRuntime, FunctionKind, KubeBinding, LATEST};

/// Path of the runtime wrapper in the runtime image.
pub const RUNTIME_WRAPPER: &str = "/usr/local/bin/fngate-runtime";
/// Name of the runtime container.
pub const CONTAINER: &str = "runtime";
/// Time a pod gets after its function's timeout to stop once deleted.
pub const STOP_MARGIN_SECS: u64 = 5;

/// Annotation with the SHA-256 of the pod's code package, for the node agent.
pub const ANNOTATION_CODE_SHA256: &str = "fngate.io/code-sha256";
/// Annotation with the code version's path relative to the function directory, where the node
/// agent unpacks the package.
pub const ANNOTATION_CODE_VERSION: &str = "fngate.io/code-version";
/// Annotation with the SHA-256 of each of the pod's layer packages, in order, comma-separated.
pub const ANNOTATION_LAYER_SHA256S: &str = "fngate.io/layer-sha256s";
/// Annotation with the merged layers' path relative to the function directory.
pub const ANNOTATION_LAYERS_VERSION: &str = "fngate.io/layers-version";

/// Builds the pod for `request`.
///
/// A zip package (`request.code_digest` set) is delivered by the node agent to its version
/// directory under the binding's function directory. The pod mounts the function's `code`
/// directory (created empty if missing) and the runtime wrapper waits for the version to appear
/// before it starts anything. A directory source is used at `code_dir`, its path on the nodes,
/// which must exist there.
pub fn runtime_pod(binding: &KubeBinding, request: &StartRequest, code_dir: &Path) -> Pod {
    let spec = &request.function;
    let version = request
        .code_digest
        .as_deref()
        .map(|digest| (digest, version_path(&spec.namespace, &spec.name, digest)));
    // The mounted directory, and the working directory the runtime starts in.
    let (mount, host_path_type) = match &version {
        Some((_, version)) => (
            binding
                .function_dir
                .join(version.parent().expect("a version path has a parent")),
            "DirectoryOrCreate",
        ),
        None => (code_dir.to_path_buf(), "Directory"),
    };
    let code = mount.to_string_lossy();
    let name = pod_name(&spec.namespace, &spec.name, request.instance_id);

    let mut env: Vec<Value> = spec
        .env
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    let mut set = |name: &str, value: String| env.push(json!({"name": name, "value": value}));
    for (name, value) in request.platform_env() {
        set(name, value);
    }
    set("PORT", RUNTIME_PORT.to_string());
    match (spec.kind, spec.event_runtime()) {
        (FunctionKind::Event, EventRuntime::Custom) => {
            // The wrapper serves invocations on the pod IP and PORT and starts `bootstrap`
            // from its working directory.
            set("FNGATE_INIT_TIMEOUT_MS", spec.start_timeout_ms.to_string());
        }
        _ => set("FNGATE_EXEC", "scf_bootstrap".to_owned()),
    }
    if let Some((_, version)) = &version {
        set(
            "FNGATE_CODE_DIR",
            binding
                .function_dir
                .join(version)
                .to_string_lossy()
                .into_owned(),
        );
    }
    let layers = request.layers.as_ref().map(|layers| {
        let version = crate::code::layers_path(&spec.namespace, &spec.name, &layers.digests);
        (layers.digests.join(","), version)
    });
    if let Some((_, version)) = &layers {
        let dir = binding.function_dir.join(version);
        set("FNGATE_LAYER_DIR", dir.to_string_lossy().into_owned());
    }
    if version.is_some() || layers.is_some() {
        // Shorter than the start timeout, so the wrapper's reason (code missing) reaches the
        // waiting requests before the scaler gives up on the pod with a bare timeout.
        set(
            "FNGATE_CODE_WAIT_MS",
            (spec.start_timeout_ms / 5 * 4).to_string(),
        );
    }
    env.push(json!({
        "name": "FNGATE_INSTANCE_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }));

    let memory = format!("{}Mi", spec.memory_mb);
    let grace = spec.timeout_ms.div_ceil(1000) + STOP_MARGIN_SECS;
    let mut pod_spec = json!({
        "containers": [{
            "name": CONTAINER,
            "image": binding.runtime_image,
            "imagePullPolicy": "IfNotPresent",
            "command": [RUNTIME_WRAPPER],
            "workingDir": code,
            "env": env,
            "ports": [{"name": "runtime", "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
            "resources": {
                "requests": {"memory": memory},
                "limits": {"memory": memory},
            },
            "readinessProbe": {
                "tcpSocket": {"port": RUNTIME_PORT},
                "periodSeconds": 1,
                "timeoutSeconds": 1,
                "failureThreshold": 3,
            },
            "volumeMounts": [{"name": "code", "mountPath": code, "readOnly": true}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            },
        }],
        "volumes": [{"name": "code", "hostPath": {"path": code, "type": host_path_type}}],
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": grace,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    });
    place(&mut pod_spec, binding);
    if let Some((_, version)) = &layers {
        // The function's `layers` directory, created empty if missing; the agent puts the
        // merged layers in it and the wrapper waits for them.
        let mount = binding
            .function_dir
            .join(version.parent().expect("a layers path has a parent"))
            .to_string_lossy()
            .into_owned();
        pod_spec["containers"][0]["volumeMounts"]
            .as_array_mut()
            .expect("the container has volume mounts")
            .push(json!({"name": "layers", "mountPath": mount, "readOnly": true}));
        pod_spec["volumes"]
            .as_array_mut()
            .expect("the pod has volumes")
            .push(
                json!({"name": "layers", "hostPath": {"path": mount, "type": "DirectoryOrCreate"}}),
            );
    }

    let mut annotations = json!({
        ANNOTATION_NAMESPACE: spec.namespace,
        ANNOTATION_FUNCTION: spec.name,
        ANNOTATION_QUALIFIER: LATEST,
    });
    if let Some((digest, version)) = &version {
        annotations[ANNOTATION_CODE_SHA256] = json!(digest);
        annotations[ANNOTATION_CODE_VERSION] = json!(version.to_string_lossy());
    }
    if let Some((digests, version)) = &layers {
        annotations[ANNOTATION_LAYER_SHA256S] = json!(digests);
        annotations[ANNOTATION_LAYERS_VERSION] = json!(version.to_string_lossy());
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": binding.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_NAMESPACE: label_value(&spec.namespace),
                LABEL_FUNCTION: label_value(&spec.name),
                LABEL_QUALIFIER: "latest",
                LABEL_INSTANCE: request.instance_id.to_string(),
                LABEL_REPLICA: request.replica,
            },
            "annotations": annotations,
        },
        "spec": pod_spec,
    });
    serde_json::from_value(pod).expect("the runtime pod is a valid Pod")
}

/// Adds the binding's nodeSelector, tolerations and affinity to a pod spec. Runtime pods and the
/// node agent's pods share them, so an agent runs wherever runtime pods may.
pub fn place(pod_spec: &mut Value, binding: &KubeBinding) {
    if !binding.node_selector.is_empty() {
        pod_spec["nodeSelector"] = json!(binding.node_selector);
    }
    if !binding.tolerations.is_empty() {
        pod_spec["tolerations"] = json!(binding.tolerations);
    }
    if let Some(affinity) = &binding.affinity {
        pod_spec["affinity"] = json!(affinity);
    }
}

/// `fn-<namespace>-<function>-<instance>-<random>`, lowercase, at most 63 characters (so it
/// also fits a hostname). The random part keeps names unique across control plane restarts,
/// which reuse instance ids.
pub fn pod_name(namespace: &str, function: &str, instance_id: u64) -> String {
    let suffix = format!("-{instance_id}-{}", random_suffix());
    let mut stem = format!("fn-{}-{}", dns_part(namespace), dns_part(function));
    stem.truncate(63 - suffix.len());
    let stem = stem.trim_end_matches('-');
    format!("{stem}{suffix}")
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

/// Lowercases a fngate name and replaces `_` with `-`, for pod names.
fn dns_part(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Converts a fngate name to a label value: names may end with `-` or `_`, label values may not.
fn label_value(name: &str) -> String {
    name.trim_end_matches(['-', '_']).to_owned()
}

/// Returns the path of `code_dir` on the nodes. Code under the control plane's function
/// directory moves to the same place under the binding's. Any other path (a `directory` code
/// source) is expected at the same path on the nodes.
pub fn node_code_dir(code_dir: &Path, host_function_dir: &Path, binding: &KubeBinding) -> PathBuf {
    match code_dir.strip_prefix(host_function_dir) {
        Ok(relative) => binding.function_dir.join(relative),
        Err(_) => code_dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::FunctionSpec;

    fn binding() -> KubeBinding {
        toml::from_str(
            r#"
            namespace = "runtime"
            node_selector = { "fngate.io/pool" = "functions" }
            tolerations = [{ key = "dedicated", operator = "Equal", value = "fn", effect = "NoSchedule" }]
            "#,
        )
        .unwrap()
    }

    fn request(toml: &str) -> StartRequest {
        let spec: FunctionSpec = toml::from_str(toml).unwrap();
        StartRequest {
            instance_id: 7,
            function: Arc::new(spec),
            code_dir: PathBuf::from("/srv/fngate/default/hello/abc"),
            code_digest: None,
            replica: crate::backend::LOCAL_REPLICA.to_owned(),
            layers: None,
        }
    }

    fn env_of(pod: &Pod) -> Vec<(String, String)> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn web_pod_spec_is_complete() {
        let request = request(
            "namespace = \"default\"\nname = \"Hello_World-\"\nkind = \"web\"\ncode = { directory = \"/srv\" }\nmemory_mb = 256\ntimeout_ms = 10500\nenv = { GREETING = \"hi\" }\n",
        );
        let pod = runtime_pod(
            &binding(),
            &request,
            Path::new("/var/lib/fngate/default/hello/abc"),
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.termination_grace_period_seconds, Some(11 + 5));
        assert_eq!(
            spec.node_selector.as_ref().unwrap()["fngate.io/pool"],
            "functions"
        );
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        let container = &spec.containers[0];
        assert_eq!(
            container.command.as_deref(),
            Some(&[RUNTIME_WRAPPER.to_owned()][..])
        );
        assert_eq!(
            container.working_dir.as_deref(),
            Some("/var/lib/fngate/default/hello/abc")
        );
        let limits = container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits["memory"].0, "256Mi");
        let env = env_of(&pod);
        assert!(env.contains(&("FNGATE_EXEC".into(), "scf_bootstrap".into())));
        assert!(env.contains(&("GREETING".into(), "hi".into())));
        assert!(env.contains(&("PORT".into(), "9000".into())));

        let meta = &pod.metadata;
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_FUNCTION], "Hello_World");
        assert_eq!(labels[LABEL_REPLICA], crate::backend::LOCAL_REPLICA);
        assert_eq!(
            meta.annotations.as_ref().unwrap()[ANNOTATION_FUNCTION],
            "Hello_World-"
        );
        let name = meta.name.as_deref().unwrap();
        assert!(name.starts_with("fn-default-hello-world-7-"), "{name}");
    }

    #[test]
    fn custom_event_pod_runs_the_wrapper_itself() {
        let request = request(
            "namespace = \"default\"\nname = \"ev\"\nkind = \"event\"\ncode = { directory = \"/srv\" }\n",
        );
        let pod = runtime_pod(&binding(), &request, Path::new("/srv"));
        let env = env_of(&pod);
        assert!(!env.iter().any(|(name, _)| name == "FNGATE_EXEC"));
        assert!(env.iter().any(|(name, _)| name == "FNGATE_INIT_TIMEOUT_MS"));
    }

    #[test]
    fn pod_names_fit_a_hostname_and_differ() {
        let long = "a".repeat(60);
        let first = pod_name(&long, &long, u64::MAX);
        assert!(first.len() <= 63, "{first}");
        assert!(!first.contains("--"), "{first}");
        assert_ne!(first, pod_name(&long, &long, u64::MAX));
    }

    #[test]
    fn node_code_dir_maps_function_dir() {
        let binding = binding();
        assert_eq!(
            node_code_dir(
                Path::new("/data/fn/ns/f/sha"),
                Path::new("/data/fn"),
                &binding
            ),
            PathBuf::from("/var/lib/fngate/ns/f/sha")
        );
        assert_eq!(
            node_code_dir(Path::new("/srv/code"), Path::new("/data/fn"), &binding),
            PathBuf::from("/srv/code")
        );
    }
}
