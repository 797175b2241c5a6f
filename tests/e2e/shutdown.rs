//! Graceful shutdown: SIGTERM stops accepting, finishes what is in flight, exits 0.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use spillway_handlers::testing::TinyBert;

use crate::support::{Fixture, TestServer, embeddings, json};

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let fixture = Fixture::new();
    // Big enough that one request of many texts takes a while on the CPU.
    let spec = TinyBert {
        hidden_size: 256,
        layers: 4,
        heads: 4,
        max_seq_length: Some(48),
        ..TinyBert::default()
    };
    let dir = fixture.tiny_bert("slow", &spec);
    fixture.archive("slow", "1.0", "text_embedding", Some(&dir), &[]);
    let mut server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();

    let texts: Vec<String> = (0..400)
        .map(|i| format!("the quick brown fox number {i} ").repeat(4))
        .collect();
    let body = serde_json::json!({ "inputs": texts }).to_string();
    let url = format!("{}/predictions/slow", server.inference);
    let http = server.http.clone();
    let started = Instant::now();
    let in_flight = std::thread::spawn(move || {
        http.post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    });

    // Wait until the worker has the batch, then ask the server to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.metrics_text().contains("spillway_batches_total{") {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.terminate();

    let response = in_flight
        .join()
        .unwrap()
        .expect("the request in flight is answered");
    let took = started.elapsed();
    let answered = embeddings(&json(response, 200));
    assert_eq!(answered.len(), 400);
    assert!(
        server.wait_exit(Duration::from_secs(30)).success(),
        "exit code 0"
    );
    assert!(
        took > Duration::from_millis(50),
        "the request should have been in flight ({took:?})"
    );
    assert!(server.log().contains("shutdown requested"));
    // And nothing listens any more.
    assert!(
        server
            .http
            .get(format!("{}/ping", server.inference))
            .send()
            .is_err()
    );
}
