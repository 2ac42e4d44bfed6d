//! `fngate namespaces`: lists the namespaces of a running fngate through its control-plane API,
//! with each k8s-mode binding's status and its number of proxy replicas.

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

/// Prints one line per namespace: name, mode, k8s namespace, phase, proxy replicas and reason.
pub async fn list(api: &str) -> anyhow::Result<()> {
    let listed = get_json(api, "/v1/namespaces").await?;
    let names: Vec<String> = listed["namespaces"]
        .as_array()
        .map(|namespaces| {
            namespaces
                .iter()
                .filter_map(|n| n["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = vec![[
        "NAMESPACE".to_owned(),
        "MODE".to_owned(),
        "K8S NAMESPACE".to_owned(),
        "PHASE".to_owned(),
        "REPLICAS".to_owned(),
        "REASON".to_owned(),
    ]];
    for name in names {
        let namespace = get_json(api, &format!("/v1/namespaces/{name}")).await?;
        let binding = &namespace["kubernetes"];
        let text = |value: &Value| value.as_str().unwrap_or("-").to_owned();
        let row = if binding.is_object() {
            [
                name,
                "k8s".to_owned(),
                text(&binding["namespace"]),
                text(&namespace["status"]["phase"]),
                namespace["replicas"]
                    .as_array()
                    .map_or(0, Vec::len)
                    .to_string(),
                namespace["status"]["reason"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            ]
        } else {
            [
                name,
                "default".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                String::new(),
            ]
        };
        rows.push(row);
    }
    let widths: Vec<usize> = (0..5)
        .map(|column| rows.iter().map(|row| row[column].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (column, width) in widths.iter().enumerate() {
            line.push_str(&format!("{:width$}  ", row[column], width = *width));
        }
        line.push_str(&row[5]);
        println!("{}", line.trim_end());
    }
    Ok(())
}

/// Sends `GET <api><path>` and parses the JSON body; an error status becomes an error with the
/// API's message.
async fn get_json(api: &str, path: &str) -> anyhow::Result<Value> {
    let base: http::Uri = api
        .parse()
        .with_context(|| format!("invalid --api {api:?}: expected http://host:port"))?;
    if base.scheme_str() != Some("http") {
        bail!("invalid --api {api:?}: only http:// is supported");
    }
    let authority = base
        .authority()
        .with_context(|| format!("invalid --api {api:?}: no host"))?
        .clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .with_context(|| format!("cannot connect to the control-plane API at {authority}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    let request = http::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path} failed"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .with_context(|| format!("GET {path} returned a body that is not JSON"))?;
    if !status.is_success() {
        let message = value["error"]["message"].as_str().unwrap_or("no message");
        bail!("GET {path} returned {status}: {message}");
    }
    Ok(value)
}
