//! `fngate manifests` renders the runtime pods of k8s-mode functions and the system components
//! of bindings that install them, and every manifest it writes passes the official Kubernetes
//! schemas (the `kubernetes-validate` package from PyPI,
//! strict mode, so an unknown or misspelled field fails too).
//!
//! Without `kubernetes-validate` on PATH the schema check is skipped with a message, unless
//! `FNGATE_REQUIRE_KUBERNETES_VALIDATE=1` (set by scripts/test.sh, so CI never skips it).

mod common;

use std::process::Command;

use common::{script_function, web_function, EVENT_BOOTSTRAP};

/// The oldest Kubernetes version fngate's pods are checked against.
const KUBERNETES_VERSION: &str = "1.33.0";

#[test]
fn rendered_pods_pass_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let web = web_function(dir.path(), "web");
    let event = script_function(dir.path(), "event", "bootstrap", EVENT_BOOTSTRAP);
    let image = script_function(dir.path(), "image", "scf_bootstrap", "#!/bin/sh\nexit 0\n");
    let package = dir.path().join("zipped.zip");
    zip_bootstrap(&package);
    let platform = format!(
        r#"
[[namespace]]
name = "team-a"
[namespace.kubernetes]
kubeconfig = "kubeconfig.yaml"
namespace = "fngate-runtime"
control_plane_url = "http://fngate-control-plane.fngate-system:8082"
agent_kubeconfig = "/etc/fngate/kubeconfig"
service_type = "LoadBalancer"
service_annotations = {{ "service.beta.kubernetes.io/aws-load-balancer-internal" = "true" }}
node_selector = {{ "fngate.io/pool" = "functions" }}
tolerations = [{{ key = "dedicated", operator = "Equal", value = "functions", effect = "NoSchedule" }}]
[namespace.kubernetes.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution]
nodeSelectorTerms = [{{ matchExpressions = [{{ key = "kubernetes.io/arch", operator = "In", values = ["amd64", "arm64"] }}] }}]

[[function]]
namespace = "team-a"
name = "web_fn"
kind = "web"
code = {{ directory = "{web}" }}
memory_mb = 256
env = {{ GREETING = "hello" }}

[[function]]
namespace = "team-a"
name = "event-fn"
kind = "event"
code = {{ directory = "{event}" }}

[[function]]
namespace = "team-a"
name = "image-fn"
kind = "event"
runtime = "image"
code = {{ directory = "{image}" }}

[[function]]
namespace = "team-a"
name = "zipped"
kind = "web"
code = {{ zip_file = "{package}" }}

[[function]]
namespace = "default"
name = "local-only"
kind = "web"
code = {{ directory = "{web}" }}
"#,
        web = web.dir.display(),
        event = event.dir.display(),
        image = image.dir.display(),
        package = package.display(),
    );
    let config = dir.path().join("fngate.toml");
    std::fs::write(&config, platform).unwrap();
    let out = dir.path().join("manifests");

    let output = Command::new(env!("CARGO_BIN_EXE_fngate"))
        .arg("manifests")
        .arg("--config")
        .arg(&config)
        .arg("--function-dir")
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "fngate manifests failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let (pods, system): (Vec<&str>, Vec<&str>) = names
        .iter()
        .map(String::as_str)
        .partition(|name| name.ends_with(".pod.json"));
    // Only k8s-mode functions get a pod; the default-mode function runs locally.
    assert_eq!(
        pods,
        [
            "team-a.event-fn.pod.json",
            "team-a.image-fn.pod.json",
            "team-a.web_fn.pod.json",
            "team-a.zipped.pod.json"
        ]
    );
    assert_eq!(
        system,
        [
            "team-a.system.configmap.fngate-agent-fngate-runtime.json",
            "team-a.system.daemonset.fngate-agent-fngate-runtime.json",
            "team-a.system.deployment.fngate-proxy-fngate-runtime.json",
            "team-a.system.namespace.fngate-system.json",
            "team-a.system.role.fngate-agent-fngate-runtime.json",
            "team-a.system.role.fngate-proxy-fngate-runtime.json",
            "team-a.system.rolebinding.fngate-agent-fngate-runtime.json",
            "team-a.system.rolebinding.fngate-proxy-fngate-runtime.json",
            "team-a.system.service.fngate-proxy-fngate-runtime.json",
            "team-a.system.serviceaccount.fngate-agent-fngate-runtime.json",
            "team-a.system.serviceaccount.fngate-proxy-fngate-runtime.json",
        ]
    );
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).unwrap()).unwrap()
    };
    let web_pod = read("team-a.web_fn.pod.json");
    let spec = &web_pod["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
        "kubernetes.io/arch"
    );
    assert_eq!(
        spec["volumes"][0]["hostPath"]["path"],
        web.dir.canonicalize().unwrap().to_str().unwrap()
    );

    // A zip package waits for the node agent: the pod mounts the function's code directory,
    // created if missing, and names the version it needs.
    let zipped = read("team-a.zipped.pod.json");
    assert_eq!(
        zipped["spec"]["volumes"][0]["hostPath"]["type"],
        "DirectoryOrCreate"
    );
    assert_eq!(
        zipped["spec"]["volumes"][0]["hostPath"]["path"],
        "/var/lib/fngate/team-a/zipped/code"
    );
    let annotations = &zipped["metadata"]["annotations"];
    let digest = annotations["fngate.io/code-sha256"].as_str().unwrap();
    assert_eq!(
        annotations["fngate.io/code-version"],
        format!("team-a/zipped/code/{}", &digest[..16])
    );

    // The proxy Service takes the binding's type and annotations; the proxy pods mount the
    // nodes' kubeconfig.
    let service = read("team-a.system.service.fngate-proxy-fngate-runtime.json");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    let deployment = read("team-a.system.deployment.fngate-proxy-fngate-runtime.json");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"],
        "/etc/fngate/kubeconfig"
    );

    validate_schemas(&files);
}

/// Writes a zip with an executable `scf_bootstrap`.
fn zip_bootstrap(path: &std::path::Path) {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("scf_bootstrap", options).unwrap();
    zip.write_all(b"#!/bin/sh\nexit 0\n").unwrap();
    zip.finish().unwrap();
}

/// Runs `kubernetes-validate --strict` on `files`, or explains why it did not.
fn validate_schemas(files: &[std::path::PathBuf]) {
    let required = std::env::var("FNGATE_REQUIRE_KUBERNETES_VALIDATE").as_deref() == Ok("1");
    let result = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output();
    let output = match result {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !required => {
            eprintln!(
                "SKIPPED schema validation: kubernetes-validate is not installed \
                 (pip install kubernetes-validate); scripts/test.sh requires it"
            );
            return;
        }
        Err(error) => panic!("cannot run kubernetes-validate: {error}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "manifests fail the Kubernetes {KUBERNETES_VERSION} schemas:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in files {
        let passed = format!("{} passed", file.display());
        assert!(
            stdout.contains(&passed),
            "kubernetes-validate did not pass {}: {stdout}",
            file.display()
        );
    }
}

/// `deploy/fngate.yaml` passes the schemas, and the platform file in its ConfigMap loads.
#[test]
fn deploy_manifests_pass_and_their_platform_file_loads() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fngate.yaml");
    validate_schemas(std::slice::from_ref(&deploy));

    let yaml = std::fs::read_to_string(&deploy).unwrap();
    let start = yaml
        .find("fngate.toml: |\n")
        .expect("deploy/fngate.yaml has no fngate.toml in its ConfigMap");
    // The block scalar: every following line indented by four spaces, or empty.
    let platform: String = yaml[start..]
        .lines()
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect();
    assert!(platform.contains("[namespace.kubernetes]"), "{platform}");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fngate.toml");
    std::fs::write(&config, &platform).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fngate"))
        .arg("manifests")
        .arg("--config")
        .arg(&config)
        .arg("--function-dir")
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the ConfigMap's platform file does not load: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A binding that installs system components but sets no `control_plane_url` gets no system
/// manifests, since their URL is only known to `serve`, and the output tells how to get them.
#[test]
fn system_components_need_a_control_plane_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fngate.toml");
    let platform = "[[namespace]]\nname = \"team-a\"\n[namespace.kubernetes]\nnamespace = \"fngate-runtime\"\n";
    std::fs::write(&config, platform).unwrap();
    let out = dir.path().join("manifests");
    let output = Command::new(env!("CARGO_BIN_EXE_fngate"))
        .arg("manifests")
        .arg("--config")
        .arg(&config)
        .arg("--function-dir")
        .arg(dir.path().join("data"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "fngate manifests failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("set kubernetes.control_plane_url"),
        "{stdout}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}
