//! Logs for machines: `--log-format json` writes one JSON object a line, and every
//! request has an id (the client's `X-Request-Id`, or a new one) that its answer echoes
//! and its log lines carry.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Fixture, TestServer};

/// The lines logged so far, each parsed (the test fails on a line that is not JSON).
fn json_lines(server: &TestServer) -> Vec<Value> {
    server
        .log()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// The request id a JSON line was logged under, if any.
fn request_id(line: &Value) -> Option<&str> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|span| span["name"] == "request")?["id"]
        .as_str()
}

/// Waits for the access line of request `id` (written as its answer leaves).
fn access_line(server: &TestServer, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = json_lines(server)
            .into_iter()
            .find(|l| l["target"] == "spillway::access" && request_id(l) == Some(id))
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {id}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn echoed(response: &reqwest::blocking::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn json_logs_name_each_request_by_its_id() {
    let fixture = Fixture::new();
    fixture.tiny_archive("m", "1.0", &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--log-format", "json"],
    );
    server.wait_healthy();
    let body = r#"{"inputs": ["hello world"]}"#;
    let predict = |id: Option<&str>, model: &str| {
        let mut request = server
            .http
            .post(format!("{}/predictions/{model}", server.inference))
            .header("content-type", "application/json")
            .body(body);
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send().unwrap()
    };

    // The client's id is kept, echoed, and on the request's access line.
    let answer = predict(Some("trace-7f3a/1"), "m");
    assert_eq!(answer.status(), 200);
    assert_eq!(echoed(&answer), "trace-7f3a/1");
    let line = access_line(&server, "trace-7f3a/1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/predictions/m");
    assert_eq!(line["method"], "POST");
    assert!(line["ms"].as_f64().unwrap() > 0.0, "{line}");

    // Without one (or with one that is not sane) the server makes one up, new each time.
    let made: Vec<String> = (0..2).map(|_| echoed(&predict(None, "m"))).collect();
    let long = "x".repeat(129);
    made.iter()
        .chain([echoed(&predict(Some(&long), "m"))].iter())
        .for_each(|id| {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            access_line(&server, id);
        });
    assert_ne!(made[0], made[1]);

    // Errors too, on either API: the id is on the answer and on its line.
    let missing = predict(Some("trace-404"), "no_such_model");
    assert_eq!(missing.status(), 404);
    assert_eq!(echoed(&missing), "trace-404");
    assert_eq!(access_line(&server, "trace-404")["status"], 404);
    let models = server
        .http
        .get(format!("{}/models", server.management))
        .header("x-request-id", "manage-1")
        .send()
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(echoed(&models), "manage-1");
    assert_eq!(access_line(&server, "manage-1")["path"], "/models");

    // Every line is an object with a time, a level and a message.
    let lines = json_lines(&server);
    assert!(lines.len() > 5);
    for line in &lines {
        for key in ["timestamp", "level", "target"] {
            assert!(line[key].is_string(), "{key} missing: {line}");
        }
        assert!(line.get("message").is_some(), "{line}");
    }
    // Health probes are left out of the access log.
    assert!(
        !lines
            .iter()
            .any(|l| l["target"] == "spillway::access" && l["path"] == "/ping"),
        "probes logged"
    );
}

#[test]
fn an_unknown_log_format_is_refused_at_start() {
    let output = std::process::Command::new(crate::support::BIN)
        .args([
            "serve",
            "--log-format",
            "xml",
            "--model-store",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("log_format") && stderr.contains("xml"),
        "{stderr}"
    );
}
