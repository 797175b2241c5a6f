//! In-process tests: the server runs inside the test process through `spillway::run`,
//! on listeners bound to port 0 whose addresses it hands back (no log scraping), so a
//! test can drive the routers and workers and stop the server when it likes. Archives
//! come from the e2e harness's [`support::Fixture`].
#![allow(clippy::unwrap_used)]

#[path = "../e2e/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use spillway::config::{Overrides, ServerConfig};
use support::Fixture;

/// A server running in this process, stopped when dropped.
struct InProcess {
    addresses: spillway::Addresses,
    http: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<spillway::error::Result<()>>,
}

impl InProcess {
    async fn start(fixture: &Fixture) -> InProcess {
        let overrides = Overrides {
            model_store: Some(fixture.store()),
            cache_dir: Some(fixture.cache()),
            models: Some(String::new()),
            inference_address: Some("127.0.0.1:0".into()),
            management_address: Some("127.0.0.1:0".into()),
            metrics_address: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        let config = ServerConfig::merge(overrides, &BTreeMap::new()).unwrap();
        let listeners = spillway::Listeners::bind(&config).await.unwrap();
        let addresses = listeners.addresses().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(spillway::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        InProcess {
            addresses,
            http: Client::new(),
            stop: Some(stop),
            served,
        }
    }

    async fn manage(&self, method: Method, path: &str) -> (StatusCode, Value) {
        let url = format!("http://{}{path}", self.addresses.management);
        let response = self.http.request(method, url).send().await.unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn predict(&self, model: &str, body: &str) -> (StatusCode, Value) {
        let url = format!("http://{}/predictions/{model}", self.addresses.inference);
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    /// `spillway_leased_bytes{device="cpu"}`.
    async fn leased_cpu_bytes(&self) -> f64 {
        let url = format!("http://{}/metrics", self.addresses.metrics);
        let text = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with("spillway_leased_bytes{device=\"cpu\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no leased bytes in:\n{text}"))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let served = tokio::time::timeout(Duration::from_secs(10), &mut self.served).await;
        served.expect("stops").unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_leases_its_bytes_until_unregistered_and_load_errors_keep_their_class() {
    let fixture = Fixture::new();
    let tiny = fixture.tiny_archive("tiny", "1.0", &[]);
    // Valid safetensors whose shapes disagree with config.json: planned from the headers,
    // refused when the weights are built.
    let broken = fixture.tiny_bert("broken", &Default::default());
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(broken.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(100);
    std::fs::write(broken.join("config.json"), config.to_string()).unwrap();
    let broken = fixture.archive("broken", "1.0", "text_embedding", Some(&broken), &[]);
    let server = InProcess::start(&fixture).await;

    assert_eq!(server.leased_cpu_bytes().await, 0.0, "nothing loaded yet");
    let (status, _) = server
        .manage(
            Method::POST,
            &format!("/models?url={tiny}&synchronous=true"),
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = server.predict("tiny", r#"{"inputs": ["a b", "c"]}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer.as_array().unwrap().len(), 2);
    let held = server.leased_cpu_bytes().await;
    assert!(held > 0.0, "the loaded model holds its plan's bytes");

    // Unregistering answers once the workers are joined and the lease dropped.
    let (status, _) = server.manage(Method::DELETE, "/models/tiny").await;
    assert_eq!(status, 200);
    assert_eq!(
        server.leased_cpu_bytes().await,
        0.0,
        "freed by the time DELETE answers"
    );

    // The archive's fault: a 400 that says which unit could not be built, and nothing
    // left registered or leased.
    let (status, error) = server
        .manage(
            Method::POST,
            &format!("/models?url={broken}&synchronous=true"),
        )
        .await;
    assert_eq!(status, 400, "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("cannot load unit"), "{message}");
    assert!(message.contains("shape mismatch"), "{message}");
    let (status, _) = server.manage(Method::GET, "/models/broken").await;
    assert_eq!(status, 404);
    assert_eq!(server.leased_cpu_bytes().await, 0.0);

    // Bad input to a serving model is the client's: 400, and the model serves on.
    server
        .manage(
            Method::POST,
            &format!("/models?url={tiny}&synchronous=true"),
        )
        .await;
    let (status, _) = server.predict("tiny", r#"{"inputs": [1]}"#).await;
    assert_eq!(status, 400);
    let (status, _) = server.predict("tiny", r#"{"inputs": "x"}"#).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_runs_compute_as_the_binary_does() {
    // The binary sets candle's element-wise pool to the calling thread first thing in
    // main; .cargo/config.toml does the same for test processes.
    assert!(spillway_handlers::cpu::threads::elementwise_ops_run_on_the_calling_thread());
}
