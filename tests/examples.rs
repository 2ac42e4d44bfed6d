//! The example functions deployed from `examples/fngate.toml`, invoked the way the README and
//! the startup banner tell a new user to.

mod common;

use common::*;

#[tokio::test]
async fn examples_answer_through_proxy() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fngate.toml");
    let fngate = Fngate::start_with_file(tempdir(), &config);

    let curl_lines: Vec<&String> = fngate
        .banner
        .iter()
        .filter(|l| l.contains("try: curl"))
        .collect();
    assert_eq!(curl_lines.len(), 3, "banner: {:#?}", fngate.banner);

    let web = get(fngate.proxy, "/web/default/hello-web/").await;
    assert_eq!(web.status, 200, "{}", web.text());
    assert_eq!(
        web.json()["request_id"].as_str(),
        web.header("x-request-id").as_deref(),
        "hello-web did not see the platform's request id: {}",
        web.text()
    );

    let event = invoke(&fngate, "default", "hello-event", r#"{"name": "fngate"}"#).await;
    assert_eq!(event.status, 200, "{}", event.text());
    assert_eq!(event.json()["hello"]["name"], "fngate", "{}", event.text());

    let image = invoke(&fngate, "default", "hello-image", r#"{"name": "fngate"}"#).await;
    assert_eq!(image.status, 200, "{}", image.text());
    assert!(image.text().contains("fngate"), "{}", image.text());
}
