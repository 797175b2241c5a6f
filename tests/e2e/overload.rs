//! Overload: far more concurrent requests than a model can hold. Every request gets
//! exactly one answer (200, or 503 from a full queue, or 504 past its timeout), the
//! counters agree with what the clients saw, and memory stays bounded.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crate::support::{Fixture, TestServer};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn four_times_overload_answers_every_request_exactly_once_in_bounded_memory() {
    let fixture = Fixture::new();
    // One worker taking batches of 2 from a queue of 4 holds 6 requests at once; 24
    // clients keep 4× that many in flight, for several rounds each.
    let config = fixture.file(
        "overload.yaml",
        "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 2\nmaxBatchDelay: 1\nresponseTimeout: 2\n",
    );
    fixture.tiny_archive("tiny", "1.0", &["--config-file", config.to_str().unwrap()]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--job-queue-size", "4"],
    );
    server.wait_healthy();
    let url = format!("{}/predictions/tiny", server.inference);
    let body = format!(
        r#"{{"inputs": ["{}"]}}"#,
        "many words in a longer sentence ".repeat(8)
    );
    // The counts so far (health probes), then warm up and take the memory baseline.
    let counted = server.metrics_text();
    for _ in 0..20 {
        assert_eq!(
            server
                .http
                .post(&url)
                .body(body.clone())
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    let before = rss_kib(server.pid());

    let (clients, rounds) = (24, 40);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, body) = (server.http.clone(), url.clone(), body.clone());
            std::thread::spawn(move || {
                (0..rounds)
                    .map(|_| {
                        let r = http
                            .post(&url)
                            .timeout(Duration::from_secs(30))
                            .body(body.clone())
                            .send()
                            .expect("every request is answered");
                        let status = r.status().as_u16();
                        let answer: serde_json::Value = r.json().expect("a JSON answer");
                        if status != 200 {
                            assert_eq!(answer["code"], status, "{answer}");
                        }
                        status
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(statuses.len(), clients * rounds);
    assert_eq!(
        count(200) + count(503) + count(504),
        statuses.len(),
        "only 200, 503 or 504: {statuses:?}"
    );
    assert!(count(200) > 0, "the model kept serving");
    assert!(count(503) > 0, "a 4× overload must be refused in part");

    let after = rss_kib(server.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB under overload"
    );
    // The server's own books agree with what the clients saw (and the first scrape).
    let text = server.metrics_text();
    let answered = (count(200) + 20 + 1) as f64;
    assert_eq!(
        sample(&text, "Requests2XX") - sample(&counted, "Requests2XX"),
        answered,
        "{text}"
    );
    assert_eq!(
        sample(&text, "Requests5XX") - sample(&counted, "Requests5XX"),
        (count(503) + count(504)) as f64
    );
    assert_eq!(
        sample(&text, "spillway_rejected_requests_total"),
        count(503) as f64
    );
    // And it still answers normally afterwards.
    assert_eq!(
        server.http.post(&url).body(body).send().unwrap().status(),
        200
    );
}
