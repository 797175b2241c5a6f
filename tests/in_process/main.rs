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
        Self::start_with(fixture, Overrides::default()).await
    }

    async fn start_with(fixture: &Fixture, given: Overrides) -> InProcess {
        let overrides = Overrides {
            model_store: Some(fixture.store()),
            cache_dir: Some(fixture.cache()),
            models: Some(given.models.unwrap_or_default()),
            max_host_memory: given.max_host_memory,
            offload_strategy: given.offload_strategy,
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
        let http = Client::new();
        // Ready once /ping says so (start-up models loaded).
        for _ in 0..500 {
            let ping = http
                .get(format!("http://{}/ping", addresses.inference))
                .send()
                .await;
            if ping.is_ok_and(|r| r.status() == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        InProcess {
            addresses,
            http,
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

    /// The Prometheus text of `/metrics`.
    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.addresses.metrics);
        let response = self.http.get(url).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// The sum of the samples whose line starts with `prefix`, holds `with`, and belongs
    /// to one of `models` (other tests in this process have models of their own).
    async fn metric_sum(&self, prefix: &str, with: &str, models: &[&str]) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(with))
            .filter(|l| {
                models
                    .iter()
                    .any(|m| l.contains(&format!("model_name=\"{m}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `spillway_device_used_bytes{device="cpu"}`.
    async fn leased_cpu_bytes(&self) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with("spillway_device_used_bytes{device=\"cpu\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no device bytes in:\n{text}"))
    }

    /// The host RAM pool of `GET /devices`.
    async fn host_pool(&self) -> Value {
        let (status, devices) = self.manage(Method::GET, "/devices").await;
        assert_eq!(status, 200);
        devices["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["device"] == "cpu")
            .cloned()
            .unwrap()
    }

    async fn status_of(&self, model: &str) -> String {
        let (_, described) = self.manage(Method::GET, &format!("/models/{model}")).await;
        described[0]["status"].as_str().unwrap().to_string()
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

/// Registers `archive` synchronously and embeds one text with it.
async fn register_and_embed(server: &InProcess, archive: &str, model: &str) -> Value {
    let (status, answer) = server
        .manage(
            Method::POST,
            &format!("/models?url={archive}&synchronous=true"),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    embed(server, model).await
}

async fn embed(server: &InProcess, model: &str) -> Value {
    let (status, answer) = server
        .predict(model, r#"{"inputs": "the quick brown fox"}"#)
        .await;
    assert_eq!(status, 200, "{model}: {answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_budget_for_two_of_three_models_evicts_the_least_recently_used_and_reloads_on_demand()
 {
    let fixture = Fixture::new();
    let archives: Vec<String> = ["ra", "rb", "rc"]
        .iter()
        .map(|name| fixture.tiny_archive(name, "1.0", &[]))
        .collect();
    // What one model holds (the three are the same size).
    let server = InProcess::start(&fixture).await;
    register_and_embed(&server, &archives[0], "ra").await;
    let one = server.host_pool().await["used"].as_u64().unwrap();
    assert!(one > 0);
    server.stop().await;

    let budget = one * 5 / 2;
    let server = InProcess::start_with(
        &fixture,
        Overrides {
            max_host_memory: Some(budget.to_string()),
            ..Overrides::default()
        },
    )
    .await;
    let pool = server.host_pool().await;
    assert_eq!(pool["budget"], budget);
    let mut want = BTreeMap::new();
    for (archive, name) in archives.iter().zip(["ra", "rb"]) {
        want.insert(name, register_and_embed(&server, archive, name).await);
    }
    // c needs the room a (least recently used) holds.
    want.insert("rc", register_and_embed(&server, &archives[2], "rc").await);
    assert_eq!(server.status_of("ra").await, "UNLOADED");
    let (_, described) = server.manage(Method::GET, "/models/ra").await;
    assert_eq!(described[0]["deviceState"], "unloaded");
    assert_eq!(
        (server.status_of("rb").await, server.status_of("rc").await),
        ("READY".to_string(), "READY".to_string())
    );
    // b used after c: a's request evicts c, and a answers as it did before.
    assert_eq!(embed(&server, "rb").await, want["rb"]);
    assert_eq!(
        embed(&server, "ra").await,
        want["ra"],
        "reloaded on its request"
    );
    assert_eq!(server.status_of("rc").await, "UNLOADED");
    assert_eq!(server.status_of("rb").await, "READY");

    // A round robin over the three answers every request the same, within the budget.
    for name in ["rc", "ra", "rb", "rc", "rb", "ra"] {
        assert_eq!(embed(&server, name).await, want[name], "{name}");
        let pool = server.host_pool().await;
        let used = pool["used"].as_u64().unwrap();
        assert!(used <= budget, "{used} bytes used, budget {budget}");
        let holders: Vec<&str> = pool["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["modelName"].as_str().unwrap())
            .collect();
        assert_eq!(holders.len(), 2, "two of three fit: {holders:?}");
        assert!(holders.contains(&name));
    }
    let evictions = server
        .metric_sum("spillway_evictions_total{", "", &["ra", "rb", "rc"])
        .await;
    // c, then c, a, b, c, (b stays), a: one eviction per reload.
    assert_eq!(evictions, 6.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_models_that_do_not_fit_load_on_their_first_request() {
    let fixture = Fixture::new();
    let archives: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|name| fixture.tiny_archive(name, "1.0", &[]))
        .collect();
    let server = InProcess::start(&fixture).await;
    let want = register_and_embed(&server, &archives[2], "c").await;
    let one = server.host_pool().await["used"].as_u64().unwrap();
    server.stop().await;

    let server = InProcess::start_with(
        &fixture,
        Overrides {
            models: Some(archives.join(",")),
            max_host_memory: Some((one * 5 / 2).to_string()),
            ..Overrides::default()
        },
    )
    .await;
    assert_eq!(server.status_of("a").await, "READY");
    assert_eq!(server.status_of("b").await, "READY");
    assert_eq!(
        server.status_of("c").await,
        "UNLOADED",
        "registered all the same"
    );
    assert_eq!(embed(&server, "c").await, want);
    assert_eq!(
        server.status_of("a").await,
        "UNLOADED",
        "the least recently used made room"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_host_budget_is_refused_with_507_saying_what_ran_out() {
    let fixture = Fixture::new();
    let tiny = fixture.tiny_archive("tiny", "1.0", &[]);
    // A plan that must keep everything in RAM (device_map cpu) cannot spill to disk.
    let server = InProcess::start_with(
        &fixture,
        Overrides {
            max_host_memory: Some("1000".into()),
            ..Overrides::default()
        },
    )
    .await;
    let (status, error) = server
        .manage(
            Method::POST,
            &format!("/models?url={tiny}&synchronous=true"),
        )
        .await;
    assert!(
        status == 507 || status == 400,
        "refused as resource exhaustion or an impossible plan: {status} {error}"
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("cpu") || message.contains("memory"),
        "{message}"
    );
    server.stop().await;
}

/// The `model` entry of the host pool, if it holds any bytes there.
fn holding<'a>(pool: &'a Value, model: &str) -> Option<&'a Value> {
    pool["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["modelName"] == model)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_strategy_keeps_evicted_models_loaded_with_their_units_streamed_then_promotes_them()
 {
    let fixture = Fixture::new();
    // Twelve blocks: most of what a model holds is its units (a tiny model's would be
    // its activation reserve), so moving them to disk makes room.
    let spec = spillway_handlers::testing::TinyBert {
        hidden_size: 64,
        layers: 12,
        ..Default::default()
    };
    let archives: Vec<String> = ["da", "db", "dc"]
        .iter()
        .map(|name| {
            let dir = fixture.tiny_bert(&format!("src-{name}"), &spec);
            fixture.archive(name, "1.0", "text_embedding", Some(&dir), &[])
        })
        .collect();
    let server = InProcess::start(&fixture).await;
    register_and_embed(&server, &archives[0], "da").await;
    let one = server.host_pool().await["used"].as_u64().unwrap();
    server.stop().await;

    let budget = one * 5 / 2;
    let server = InProcess::start_with(
        &fixture,
        Overrides {
            max_host_memory: Some(budget.to_string()),
            offload_strategy: Some("disk".into()),
            ..Overrides::default()
        },
    )
    .await;
    let mut want = BTreeMap::new();
    for (archive, name) in archives.iter().zip(["da", "db", "dc"]) {
        want.insert(name, register_and_embed(&server, archive, name).await);
    }
    // dc's admission moved da's units to disk: still loaded, holding only its
    // streaming room; nothing is over budget.
    let pool = server.host_pool().await;
    let used = pool["used"].as_u64().unwrap();
    assert!(used <= budget, "{used} > {budget}");
    assert_eq!(server.status_of("da").await, "READY");
    let held = holding(&pool, "da").expect("still holds its streaming room")["bytes"]
        .as_u64()
        .unwrap();
    assert!(held < one / 2, "da gave bytes back: {held} of {one}");
    let (_, described) = server.manage(Method::GET, "/models/da").await;
    assert_eq!(
        described[0]["model"]["streamed_units"], 13,
        "the embeddings and every block stream: {described}"
    );
    assert_eq!(described[0]["deviceState"], "disk");
    // Round robin: every answer as before, within the budget.
    for name in ["da", "db", "dc", "da", "dc", "db"] {
        assert_eq!(embed(&server, name).await, want[name], "{name}");
        let used = server.host_pool().await["used"].as_u64().unwrap();
        assert!(used <= budget, "after {name}: {used} > {budget}");
        // Served from its streamed units at once, promoted back beside the request.
        let mut streamed = Value::Null;
        for _ in 0..500 {
            let (_, described) = server.manage(Method::GET, &format!("/models/{name}")).await;
            streamed = described[0]["model"]["streamed_units"].clone();
            if streamed == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(streamed, 0, "{name} was promoted after its request");
    }
    let ours = ["da", "db", "dc"];
    let disk_evictions = server
        .metric_sum("spillway_evictions_total{", "strategy=\"disk\"", &ours)
        .await;
    assert!(disk_evictions >= 4.0, "{disk_evictions}");
    assert!(
        server
            .metric_sum("spillway_promotions_total{", "", &ours)
            .await
            >= 4.0,
        "promoted, not reloaded"
    );
    assert_eq!(
        server
            .metric_sum("spillway_reloads_total{", "", &ours)
            .await,
        0.0
    );
    server.stop().await;
}
