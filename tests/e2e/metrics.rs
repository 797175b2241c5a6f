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
}
