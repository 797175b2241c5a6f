//! `watch_model_store=true` against the real binary: archives that appear are registered,
//! one replaced by a rename is served from the new file with no request failing in
//! between, a broken one is reported (log and status page) without harm, and one that
//! disappears is unregistered.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::{Fixture, TestServer, embeddings, json};

const BODY: &str = r#"{"inputs": ["hello world"]}"#;

/// Polls `check` until it holds (20 s at most).
fn eventually(what: &str, server: &TestServer, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn described(server: &TestServer, name: &str) -> Option<serde_json::Value> {
    let answer = server
        .http
        .get(format!("{}/models/{name}", server.management))
        .send()
        .unwrap();
    (answer.status() == 200).then(|| answer.json().unwrap())
}

#[test]
fn the_watched_store_adds_replaces_reports_and_removes_archives() {
    let fixture = Fixture::new();
    fixture.tiny_archive("a", "1.0", &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &[
            "--watch-model-store",
            "true",
            "--model-store-settle-seconds",
            "1",
        ],
    );
    server.wait_healthy();
    let before = embeddings(&json(server.predict("a", BODY), 200));

    // Archives are made apart and renamed in, as the README says to.
    let elsewhere = Fixture::new();

    // Appears: registered once settled, and serves.
    elsewhere.tiny_archive("b", "1.0", &[]);
    std::fs::rename(
        elsewhere.store().join("b.mar"),
        fixture.store().join("b.mar"),
    )
    .unwrap();
    eventually("b registered and ready", &server, || {
        described(&server, "b").is_some_and(|d| d[0]["status"] == "READY")
    });
    assert_eq!(server.predict("b", BODY).status(), 200);

    // Replaced by a rename, under load: every request answered 200 throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (stop, url) = (stop.clone(), format!("{}/predictions/a", server.inference));
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let answer = http.post(&url).body(BODY).send().unwrap();
                statuses.push(answer.status().as_u16());
            }
            statuses
        })
    };
    elsewhere.tiny_archive("a", "2.0", &[]);
    std::fs::rename(
        elsewhere.store().join("a.mar"),
        fixture.store().join("a.mar"),
    )
    .unwrap();
    eventually("a now serves version 2.0 alone", &server, || {
        described(&server, "a").is_some_and(|d| d[0]["modelVersion"] == "2.0")
            && server
                .http
                .get(format!("{}/models/a/1.0", server.management))
                .send()
                .unwrap()
                .status()
                == 404
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let statuses = hammer.join().unwrap();
    assert!(statuses.len() > 10, "{} requests", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a request saw the replacement: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let after = embeddings(&json(server.predict("a", BODY), 200));
    assert_ne!(before, after, "the new archive's weights answer");

    // Broken: reported, never fatal.
    std::fs::write(elsewhere.store().join("bad.mar"), b"not a zip at all").unwrap();
    std::fs::rename(
        elsewhere.store().join("bad.mar"),
        fixture.store().join("bad.mar"),
    )
    .unwrap();
    eventually("bad.mar reported on the status page", &server, || {
        server
            .http
            .get(format!("{}/", server.management))
            .send()
            .unwrap()
            .text()
            .unwrap()
            .contains("data-problem=\"bad.mar\"")
    });
    assert!(server.log().contains("bad.mar"));
    assert_eq!(server.predict("b", BODY).status(), 200);

    // Disappears: unregistered.
    std::fs::remove_file(fixture.store().join("b.mar")).unwrap();
    eventually("b unregistered", &server, || {
        described(&server, "b").is_none()
    });
    assert_eq!(server.predict("b", BODY).status(), 404);
    assert_eq!(server.predict("a", BODY).status(), 200);
}

#[test]
fn without_watching_the_store_is_read_once() {
    let fixture = Fixture::new();
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let elsewhere = Fixture::new();
    elsewhere.tiny_archive("late", "1.0", &[]);
    std::fs::rename(
        elsewhere.store().join("late.mar"),
        fixture.store().join("late.mar"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(described(&server, "late").is_none(), "off by default");
}
