//! The metrics API: TorchServe's families printed as TorchServe prints them, labelled by
//! model name and version, and Spillway's own `spillway_*` series beside them.

#![allow(clippy::unwrap_used)]

use crate::support::{Fixture, TestServer, json};

/// The value of the sample `name{labels}` in Prometheus text.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Whether `text` has `line`, character for character.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn predictions_are_counted_by_model_and_version() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let hostname = hostname.trim();
    let host = format!(r#"{{Level="Host",Hostname="{hostname}",}}"#);
    let before = server.metrics_text();
    let count = |text: &str, name: &str| sample(text, name, &host).unwrap_or(0.0);

    for _ in 0..3 {
        json(server.predict("tiny", r#"{"inputs": "hello"}"#), 200);
    }
    let _ = server.predict("tiny", r#"{"inputs": []}"#);
    // Host-level counts take every response, as TorchServe's: an unknown model's 404, a
    // body over max_request_size's 413, a health probe, and the scrape before this one.
    let _ = server.predict("ghost", r#"{"inputs": "x"}"#);
    let _ = server.predict("tiny", &"x".repeat(7 << 20));
    let ping = server.http.get(format!("{}/ping", server.inference));
    assert_eq!(ping.send().unwrap().status(), 200);
    let text = server.metrics_text();

    // TorchServe's lines to the character (its Java client's: a comma after every label,
    // values as Java's Double.toString writes them), and its HELP and TYPE lines.
    let requests = count(&before, "Requests2XX") + 3.0 + 1.0 + 1.0;
    for line in [
        "# HELP Requests2XX Torchserve prometheus counter metric with unit: Count".to_string(),
        "# TYPE Requests2XX counter".into(),
        format!("Requests2XX{host} {requests:.1}"),
        format!(
            "Requests4XX{host} {:.1}",
            count(&before, "Requests4XX") + 3.0
        ),
        "# TYPE Requests5XX counter".into(),
        "# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count"
            .into(),
        format!(
            r#"ts_inference_requests_total{{model_name="tiny",model_version="1.0",hostname="{hostname}",}} 4.0"#
        ),
        "# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds".into(),
        "# TYPE ts_queue_latency_microseconds counter".into(),
        "# HELP QueueTime Torchserve prometheus gauge metric with unit: Milliseconds".into(),
        "# TYPE WorkerLoadTime gauge".into(),
        "# HELP MemoryUsed Torchserve prometheus gauge metric with unit: Megabytes".into(),
        // A family with nothing in it yet still says what it is, as TorchServe's do.
        "# HELP GPUMemoryUsed Torchserve prometheus gauge metric with unit: Megabytes".into(),
    ] {
        assert!(has_line(&text, &line), "no line {line}:\n{text}");
    }
    let model = format!(r#"{{model_name="tiny",model_version="1.0",hostname="{hostname}",}}"#);
    let latency = sample(&text, "ts_inference_latency_microseconds", &model).unwrap();
    assert!(latency > 0.0, "{text}");
    assert!(sample(&text, "ts_queue_latency_microseconds", &model).is_some());
    // Host-level gauges with TorchServe's labels, in its order.
    let worker = format!(r#"{{WorkerName="W-9000-tiny_1.0",Level="Host",Hostname="{hostname}",}}"#);
    assert!(sample(&text, "WorkerLoadTime", &worker).is_some(), "{text}");
    for name in ["QueueTime", "WorkerThreadTime"] {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")));
        let value = line.and_then(|l| l.strip_prefix(&format!("{name}{host} ")));
        assert!(value.is_some_and(|v| v.ends_with(".0")), "whole ms: {text}");
    }
    assert!(sample(&text, "MemoryUsed", &host).expect(&text) > 0.0);
    // CPU utilization since start-up (or the previous scrape), sampled at scrape time.
    for name in ["CPUUtilization", "MemoryUtilization"] {
        let percent = sample(&text, name, &host).expect(&text);
        assert!((0.0..=100.0).contains(&percent), "{name} {percent}");
    }

    // Spillway's own series, as the exporter prints them.
    let labels = r#"model_name="tiny",model_version="1.0""#;
    assert!(sample(&text, "spillway_model_load_seconds", labels).unwrap() > 0.0);
    assert_eq!(
        sample(
            &text,
            "spillway_prediction_responses_total",
            r#"status="4XX""#
        ),
        Some(1.0)
    );
    // Histograms resolve sub-millisecond latencies; batches are counted by size.
    let bucket = |le: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("spillway_request_duration_seconds_bucket{")
                    && l.contains(labels)
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert!(bucket("0.00005").is_some(), "a 50 µs bucket: {text}");
    assert_eq!(bucket("+Inf"), Some(4.0));
    assert_eq!(
        sample(&text, "spillway_batch_size_count", labels),
        Some(3.0)
    );
    assert_eq!(sample(&text, "spillway_queue_depth", labels), Some(0.0));
    assert!(
        text.lines()
            .any(|l| l.starts_with("spillway_process_resident_bytes ")),
        "{text}"
    );
    // The plan's per-device bytes: the tiny model sits wholly in RAM.
    let placed = sample(&text, "spillway_placed_bytes", r#"device="cpu""#).unwrap();
    assert!(placed > 0.0, "{text}");

    // `?name[]=` keeps the samples named (TorchServe's filter), with their headers.
    let filtered = server
        .http
        .get(format!(
            "{}/metrics?name[]=Requests4XX&name[]=spillway_batch_size_count&name[]=GPUUtilization",
            server.metrics
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let lines: Vec<&str> = filtered.lines().collect();
    assert_eq!(lines.len(), 6, "{filtered}");
    assert_eq!(
        lines[0],
        "# HELP Requests4XX Torchserve prometheus counter metric with unit: Count"
    );
    assert!(
        lines[2].starts_with("Requests4XX{Level=\"Host\""),
        "{filtered}"
    );
    assert!(
        lines[5].starts_with("spillway_batch_size_count{"),
        "{filtered}"
    );
}
