//! `fngate-kubesim`: runs a simulated cluster until SIGINT or SIGTERM, for trying fngate's
//! k8s mode by hand.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use fngate_kubesim::{Cluster, ClusterConfig, NodeConfig, Taint};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A Kubernetes API test server with simulated nodes that run pods as local processes"
)]
struct Args {
    /// Path of the kubeconfig file to write for the cluster.
    #[arg(long)]
    kubeconfig: PathBuf,

    /// Name of the cluster, user and context in the kubeconfig.
    #[arg(long, default_value = "kubesim")]
    context: String,

    /// A node, as comma-separated items: `name=NAME` (required), `memory-mb=MIB`,
    /// `label=KEY=VALUE`, `taint=KEY=VALUE:EFFECT`. Repeat for more nodes. Without it, one
    /// node named node-1 runs.
    #[arg(long = "node", value_name = "SPEC")]
    nodes: Vec<String>,

    /// An image every node can run, as `NAME=IMAGE_PATH:HOST_PATH`: the container path that
    /// maps to a host path. Repeat a NAME to map more paths.
    #[arg(long = "image", value_name = "NAME=IMAGE_PATH:HOST_PATH")]
    images: Vec<String>,

    /// Serve requests without a bearer token, so that kubectl works: client-go sends no
    /// credentials over plain HTTP. Requests with a wrong token still get 401.
    #[arg(long)]
    allow_anonymous: bool,

    /// Directory for pod logs. Defaults to a new directory under the system temp directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

fn parse_node(spec: &str) -> anyhow::Result<NodeConfig> {
    let mut node = NodeConfig::new("");
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (key, value) = item.split_once('=').with_context(|| {
            format!("invalid node item {item:?} in {spec:?}: expected KEY=VALUE")
        })?;
        match key {
            "name" => node.name = value.to_string(),
            "memory-mb" => {
                node.memory_mb = value.parse().with_context(|| {
                    format!("invalid memory-mb {value:?}: expected a number of MiB")
                })?
            }
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .with_context(|| format!("invalid label {value:?}: expected KEY=VALUE"))?;
                node = node.label(k, v);
            }
            "taint" => {
                let (k, rest) = value.split_once('=').with_context(|| {
                    format!("invalid taint {value:?}: expected KEY=VALUE:EFFECT")
                })?;
                let (v, effect) = rest.split_once(':').with_context(|| {
                    format!("invalid taint {value:?}: expected KEY=VALUE:EFFECT")
                })?;
                node = node.taint(Taint::new(k, v, effect));
            }
            other => bail!(
                "unknown node item {other:?} in {spec:?}: expected name, memory-mb, label or taint"
            ),
        }
    }
    if node.name.is_empty() {
        bail!("node {spec:?} has no name=NAME item");
    }
    Ok(node)
}

fn parse_image(spec: &str) -> anyhow::Result<(String, String, PathBuf)> {
    let invalid = || format!("invalid image {spec:?}: expected NAME=IMAGE_PATH:HOST_PATH");
    let (name, paths) = spec.split_once('=').with_context(invalid)?;
    let (image_path, host_path) = paths.split_once(':').with_context(invalid)?;
    Ok((
        name.to_string(),
        image_path.to_string(),
        PathBuf::from(host_path),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let mut nodes = args
        .nodes
        .iter()
        .map(|s| parse_node(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if nodes.is_empty() {
        nodes.push(NodeConfig::new("node-1"));
    }
    for spec in &args.images {
        let (name, image_path, host_path) = parse_image(spec)?;
        for node in &mut nodes {
            let image = node.images.remove(&name).unwrap_or_default();
            node.images
                .insert(name.clone(), image.map(&image_path, host_path.clone()));
        }
    }
    let log_dir = args.log_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("fngate-kubesim-{}", std::process::id()))
    });
    let mut config = ClusterConfig::new(&log_dir);
    config.nodes = nodes;
    config.allow_anonymous = args.allow_anonymous;

    let cluster = Cluster::start(config).await?;
    cluster
        .write_kubeconfig(&args.kubeconfig, &args.context)
        .with_context(|| {
            format!(
                "failed to write the kubeconfig to {}",
                args.kubeconfig.display()
            )
        })?;
    println!("fngate-kubesim: API server listening on {}", cluster.url());
    println!(
        "fngate-kubesim: kubeconfig written to {} (context {})",
        args.kubeconfig.display(),
        args.context
    );
    println!("fngate-kubesim: pod logs in {}", log_dir.display());
    println!("fngate-kubesim: ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    println!("fngate-kubesim: stopping");
    cluster.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_spec_items() {
        let node =
            parse_node("name=n1,memory-mb=512,label=zone=a,taint=dedicated=fn:NoSchedule").unwrap();
        assert_eq!(node.name, "n1");
        assert_eq!(node.memory_mb, 512);
        assert_eq!(node.labels["zone"], "a");
        assert_eq!(
            node.taints,
            vec![Taint::new("dedicated", "fn", "NoSchedule")]
        );
        assert!(parse_node("memory-mb=1").is_err());
        assert!(parse_node("name=n,colour=red").is_err());
    }

    #[test]
    fn image_spec() {
        let (name, image_path, host_path) =
            parse_image("python:3=/usr/bin/python3:/opt/py/bin/python3").unwrap();
        assert_eq!(name, "python:3");
        assert_eq!(image_path, "/usr/bin/python3");
        assert_eq!(host_path, PathBuf::from("/opt/py/bin/python3"));
        assert!(parse_image("python").is_err());
    }
}
