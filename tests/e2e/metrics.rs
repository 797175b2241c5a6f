//! The metrics API: TorchServe's counters, labelled by model name and version.

#![allow(clippy::unwrap_used)]

use crate::support::{Fixture, TestServer, json};

/// The value of the sample `name{labels}` in Prometheus text.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(&format!("{name}{{")) && line.contains(labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn predictions_are_counted_by_model_and_version() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for _ in 0..3 {
        json(server.predict("tiny", r#"{"inputs": "hello"}"#), 200);
    }
    let _ = server.predict("tiny", r#"{"inputs": []}"#);
    // Host-level counts take every response, as TorchServe's: an unknown model's 404
    // and a body over max_request_size's 413 too (probes are left out).
    let _ = server.predict("ghost", r#"{"inputs": "x"}"#);
    let _ = server.predict("tiny", &"x".repeat(7 << 20));
    let text = server.metrics_text();
    let labels = r#"model_name="tiny",model_version="1.0""#;
    assert_eq!(
        sample(&text, "ts_inference_requests_total", labels),
        Some(4.0),
        "{text}"
    );
    assert!(sample(&text, "ts_inference_latency_microseconds", labels).unwrap() > 0.0);
    assert!(sample(&text, "ts_queue_latency_microseconds", labels).is_some());
    assert!(sample(&text, "spillway_model_load_seconds", labels).unwrap() > 0.0);
    assert_eq!(
        sample(
            &text,
            "spillway_prediction_responses_total",
            r#"status="4XX""#
        ),
        Some(1.0)
    );
    assert!(text.contains("# TYPE ts_inference_requests_total counter"));

    // TorchServe's frontend and system metrics.
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = format!(r#"Level="Host",Hostname="{}""#, hostname.trim());
    let host = host.as_str();
    assert_eq!(sample(&text, "Requests2XX", host), Some(3.0), "{text}");
    assert_eq!(sample(&text, "Requests4XX", host), Some(3.0), "{text}");
    assert!(sample(&text, "WorkerLoadTime", labels).unwrap() > 0.0);
    assert!(sample(&text, "WorkerThreadTime", labels).is_some());
    assert!(sample(&text, "QueueTime", labels).is_some());
    assert!(sample(&text, "MemoryUsed", host).expect(&text) > 0.0);
    // CPU utilization since start-up (or the previous scrape), sampled at scrape time.
    let busy = sample(&text, "CPUUtilization", host).expect(&text);
    assert!((0.0..=100.0).contains(&busy), "{busy}");
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
}
