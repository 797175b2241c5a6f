//! Monitoring with the real tools: a real Prometheus server (Debian's `prometheus`) run
//! with the example scrape config from docker/, scraping a running Spillway, and queried
//! through its HTTP API; and the Grafana dashboard in docker/ checked against what the
//! server exports.
//!
//! Without `prometheus` on the PATH the Prometheus test reports itself skipped, by name
//! — unless `SPILLWAY_REQUIRE_CLIENTS` is set (CI installs it).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Fixture, TestServer, repo_root};

/// Every metric name the server defines (server/src/telemetry/metrics.rs, `pub const NAME: &str
/// = "..."`): what it can export.
fn defined_metrics() -> BTreeSet<String> {
    let source =
        std::fs::read_to_string(repo_root().join("server/src/telemetry/metrics.rs")).unwrap();
    source
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (_, value) = rest.split_once(": &str = \"")?;
            Some(value.trim_end_matches("\";").to_string())
        })
        .collect()
}

/// Every PromQL expression of the Grafana dashboard.
fn dashboard_queries() -> Vec<String> {
    let path = repo_root().join("docker/grafana/dashboards/spillway.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(queries.len() >= 10, "{queries:?}");
    queries
}

/// The metric names a PromQL expression reads (Spillway's and TorchServe's prefixes),
/// a histogram's `_bucket`/`_sum`/`_count` series named by the histogram.
fn metrics_in(query: &str) -> Vec<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("spillway_") || word.starts_with("ts_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_string()
        })
        .collect()
}

#[test]
fn the_grafana_dashboard_reads_only_metrics_the_server_defines() {
    let defined = defined_metrics();
    assert!(
        defined.contains("spillway_request_duration_seconds"),
        "{defined:?}"
    );
    for query in dashboard_queries() {
        let names = metrics_in(&query);
        assert!(!names.is_empty(), "reads no Spillway metric: {query}");
        for name in names {
            assert!(
                defined.contains(&name),
                "{query}\n  reads {name}, which the server does not export"
            );
        }
    }
}

/// `text` percent-encoded for a URL's query.
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::blocking::Client,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `prometheus` with docker/prometheus.yml scraping `target` every second.
    fn start(binary: &str, target: &str) -> Prometheus {
        let data = tempfile::tempdir().unwrap();
        let example = std::fs::read_to_string(repo_root().join("docker/prometheus.yml")).unwrap();
        assert!(example.contains("spillway:8082") && example.contains("scrape_interval: 5s"));
        let config = example
            .replace("spillway:8082", target)
            .replace("scrape_interval: 5s", "scrape_interval: 1s");
        let config_path = data.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            _data: data,
        }
    }

    /// An instant query's answer (`data.result`); fails on a query Prometheus refuses.
    fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let answer: Value = self
            .http
            .get(format!(
                "{}/api/v1/query?query={}",
                self.url,
                encoded(promql)
            ))
            .send()
            .ok()?
            .json()
            .ok()?;
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"].as_array().cloned()
    }

    /// The first sample's value, once the query has one that `ok` accepts.
    fn wait_for(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = self
                .query(promql)
                .and_then(|result| result.first().cloned())
                .and_then(|sample| sample["value"][1].as_str()?.parse::<f64>().ok());
            if let Some(value) = value
                && ok(value)
            {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: last {value:?}, never as expected"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_the_server_and_answers_its_queries() {
    let test = "a_real_prometheus_scrapes_the_server_and_answers_its_queries";
    let Some(binary) = ["prometheus", "/usr/bin/prometheus"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
    else {
        assert!(
            std::env::var_os("SPILLWAY_REQUIRE_CLIENTS").is_none(),
            "{test}: prometheus is required (SPILLWAY_REQUIRE_CLIENTS is set)"
        );
        eprintln!("SKIPPED {test}: no prometheus on the PATH (apt-get install prometheus)");
        return;
    };
    let fixture = Fixture::new();
    fixture.tiny_archive("resident", "1.0", &[]);
    let disk = fixture.file("setup_config.json", r#"{"device_map": "disk"}"#);
    fixture.tiny_archive(
        "streamed",
        "1.0",
        &["--extra-files", disk.to_str().unwrap()],
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();

    // Traffic for as long as the test runs.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, inference) = (stop.clone(), server.inference.clone());
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut answered = 0;
            while !stop.load(Ordering::Relaxed) {
                for model in ["resident", "streamed"] {
                    let status = http
                        .post(format!("{inference}/predictions/{model}"))
                        .header("content-type", "application/json")
                        .body(r#"{"inputs": ["hello world"]}"#)
                        .send()
                        .unwrap()
                        .status();
                    assert_eq!(status, 200);
                    answered += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            answered
        })
    };

    let target = server.metrics.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(binary, &target);
    // The request counter, per model as TorchServe names it.
    prometheus.wait_for(
        r#"sum(ts_inference_requests_total{model_name="resident"})"#,
        |n| n >= 10.0,
    );
    // A latency quantile from the histogram's buckets.
    let p50 = prometheus.wait_for(
        "histogram_quantile(0.5, sum by (le) (rate(spillway_request_duration_seconds_bucket[10s])))",
        |s| s.is_finite() && s > 0.0,
    );
    assert!(p50 < 5.0, "p50 {p50} s");
    // Placement: the streamed model's weights are on disk, and stream each pass.
    prometheus.wait_for(
        r#"sum(spillway_placed_bytes{model_name="streamed",device="disk"})"#,
        |bytes| bytes > 0.0,
    );
    prometheus.wait_for(
        r#"sum(rate(spillway_streamed_bytes_total{model_name="streamed"}[10s]))"#,
        |rate| rate > 0.0,
    );
    // The scrape target is healthy, and every dashboard query is one Prometheus runs.
    let targets: Value = prometheus
        .http
        .get(format!("{}/api/v1/targets", prometheus.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets}"
    );
    for query in dashboard_queries() {
        prometheus.query(&query).expect("an answer");
    }
    let requests = prometheus.wait_for("sum(ts_inference_requests_total)", |_| true);
    stop.store(true, Ordering::Relaxed);
    let answered = traffic.join().unwrap();
    assert!(
        requests <= answered as f64,
        "{requests} counted, {answered} sent"
    );
}
