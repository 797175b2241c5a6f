//! The inference API: ping, predictions in every accepted body shape, and every error.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::Method;

use crate::support::{Fixture, TestServer, embeddings, error, json};

#[test]
fn ping_turns_healthy_and_predictions_return_one_embedding_per_text() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    assert_eq!(
        json(
            server
                .http
                .get(format!("{}/ping", server.inference))
                .send()
                .unwrap(),
            200
        )["status"],
        "Healthy"
    );

    let two = embeddings(&json(
        server.predict("tiny", r#"{"inputs": ["hello world", "rust server"]}"#),
        200,
    ));
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].len(), 32, "hidden size of the tiny model");
    let norm: f32 = two[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "normalised, got {norm}");
    assert_ne!(two[0], two[1]);

    let one = embeddings(&json(
        server.predict("tiny", r#"{"inputs": "hello world"}"#),
        200,
    ));
    // Equal up to rounding: MKL's sgemm picks kernels by matrix size, so the last bits
    // of a row can depend on how many rows were multiplied with it.
    assert_eq!(one.len(), 1);
    let diff = one[0]
        .iter()
        .zip(&two[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff <= 1e-5,
        "a batch of two equals each alone, up to {diff}"
    );
    let plain = server
        .http
        .post(format!("{}/predictions/tiny", server.inference))
        .header("content-type", "text/plain")
        .body("hello world")
        .send()
        .unwrap();
    assert_eq!(embeddings(&json(plain, 200)), one);
    let versioned = embeddings(&json(
        server.predict("tiny/1.0", r#"{"inputs": "hello world"}"#),
        200,
    ));
    assert_eq!(versioned, one);
}

#[test]
fn client_errors_get_json_bodies_with_the_right_status() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--max-request-size", "2000"],
    );
    server.wait_healthy();

    let message = error(server.predict("nope", r#"{"inputs": "x"}"#), 404);
    assert!(message.contains("nope"), "{message}");
    let message = error(server.predict("tiny/9.9", r#"{"inputs": "x"}"#), 404);
    assert!(message.contains("9.9"), "{message}");
    error(server.predict("tiny", r#"{"inputs": "#), 400);
    error(server.predict("tiny", r#"{"inputs": []}"#), 400);
    error(server.predict("tiny", r#"{"inputs": ""}"#), 400);
    error(server.predict("tiny", r#"{"inputs": [1]}"#), 400);
    error(server.predict("tiny", ""), 400);
    let big = format!(r#"{{"inputs": "{}"}}"#, "a ".repeat(2000));
    let message = error(server.predict("tiny", &big), 413);
    assert!(message.contains("2000"), "{message}");
    error(
        server
            .http
            .get(format!("{}/no/such/path", server.inference))
            .send()
            .unwrap(),
        404,
    );

    // The server is still serving after all of that.
    json(server.predict("tiny", r#"{"inputs": "hello"}"#), 200);
}

#[test]
fn a_model_that_failed_to_load_answers_with_its_failures_class_and_ping_says_unhealthy() {
    let fixture = Fixture::new();
    // Valid safetensors whose shapes disagree with config.json: planning (headers only)
    // succeeds, building the model fails.
    let dir = fixture.tiny_bert("broken", &Default::default());
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(100);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    fixture.archive("broken", "1.0", "text_embedding", Some(&dir), &[]);
    // Not safetensors at all: refused at registration, before anything is loaded.
    let garbage = fixture.tiny_bert("garbage", &Default::default());
    std::fs::write(garbage.join("model.safetensors"), b"not safetensors at all").unwrap();
    fixture.archive("garbage", "1.0", "text_embedding", Some(&garbage), &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "broken.mar"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ping = server
            .http
            .get(format!("{}/ping", server.inference))
            .send()
            .unwrap();
        assert_eq!(ping.status(), 503);
        let status = ping.json::<serde_json::Value>().unwrap()["status"].clone();
        if status == "Unhealthy" {
            break;
        }
        assert_eq!(status, "Loading");
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // A start-up model that failed stays registered, FAILED, and its requests are
    // answered with the failure's class: an archive that cannot be served is a 400.
    let message = error(server.predict("broken", r#"{"inputs": "x"}"#), 400);
    assert!(
        message.contains("failed to load") && message.contains("shape mismatch"),
        "{message}"
    );
    let described = json(server.manage(Method::GET, "/models/broken"), 200);
    assert_eq!(described[0]["status"], "FAILED");

    // Registered in the background, the failure stays visible.
    let response = server.manage(
        Method::POST,
        "/models?url=broken.mar&model_name=later&synchronous=false",
    );
    assert_eq!(response.status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let described = json(server.manage(Method::GET, "/models/later"), 200);
        if described[0]["status"] == "FAILED" {
            assert!(
                described[0]["error"]
                    .as_str()
                    .unwrap()
                    .contains("shape mismatch"),
                "the cause is shown: {described}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let message = error(server.predict("later", r#"{"inputs": "x"}"#), 400);
    assert!(message.contains("failed to load"), "{message}");

    let message = error(server.manage(Method::POST, "/models?url=garbage.mar"), 400);
    assert!(message.contains("model.safetensors"), "{message}");
    error(server.manage(Method::GET, "/models/garbage"), 404);
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_slow_answers_time_out_with_504() {
    let fixture = Fixture::new();
    fixture.archive("echo", "1.0", "echo", None, &[]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "", "--job-queue-size", "2"],
    );
    // An echo model with no workers: whatever is accepted waits until it times out.
    let response = server.manage(
        Method::POST,
        "/models?url=echo.mar&initial_workers=0&response_timeout=1&synchronous=true",
    );
    json(response, 200);
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let http = server.http.clone();
            let url = format!("{}/predictions/echo", server.inference);
            std::thread::spawn(move || {
                let r = http.post(url).body(format!("request {i}")).send().unwrap();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let answers: Vec<_> = requests.into_iter().map(|t| t.join().unwrap()).collect();
    let count = |s: u16| answers.iter().filter(|a| a.0 == s).count();
    assert_eq!(
        count(503) + count(504),
        6,
        "every request answered exactly once: {answers:?}"
    );
    assert!(count(503) >= 1 && count(504) >= 1, "{answers:?}");
    for (status, retry_after, body) in &answers {
        assert_eq!(body["code"], *status);
        if *status == 503 {
            assert_eq!(retry_after.as_deref(), Some("1"));
        }
    }
    // With a worker, the same model answers once the timed-out jobs still holding queue
    // slots have been drained (each is dropped unrun).
    json(server.manage(Method::PUT, "/models/echo?min_worker=1"), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let echoed = server
            .http
            .post(format!("{}/predictions/echo", server.inference))
            .body("ping!")
            .send()
            .unwrap();
        if echoed.status() == 200 {
            assert_eq!(echoed.text().unwrap(), "ping!");
            break;
        }
        assert_eq!(echoed.status(), 503, "only a still-full queue may refuse");
        assert!(
            std::time::Instant::now() < deadline,
            "the queue never drained"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn text_classification_answers_a_label_and_score_per_text() {
    let fixture = Fixture::new();
    let dir = fixture.dir.path().join("classifier");
    spillway_handlers::testing::TinyBert::default()
        .write_sequence_classifier(&dir, &["negative", "positive"])
        .unwrap();
    fixture.archive("sentiment", "1.0", "text_classification", Some(&dir), &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let answer = json(
        server.predict(
            "sentiment",
            r#"{"inputs": ["i love rust", "the fox is slow"]}"#,
        ),
        200,
    );
    let answers = answer.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    for a in answers {
        assert!(
            ["negative", "positive"].contains(&a["label"].as_str().unwrap()),
            "{a}"
        );
        let score = a["score"].as_f64().unwrap();
        assert!(
            (0.5..=1.0).contains(&score),
            "the top of two labels has at least half the mass: {a}"
        );
    }
    let described = json(server.manage(Method::GET, "/models/sentiment"), 200);
    assert_eq!(described[0]["handler"], "text_classification");
    let units: Vec<_> = described[0]["placement"]["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(units.first().map(String::as_str), Some("bert.embeddings"));
    assert!(units.contains(&"classifier".to_string()), "{units:?}");
}

#[test]
fn kserve_v1_predicts_instances_when_the_kserve_envelope_is_set() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let post = |server: &TestServer, path: &str, body: &str| {
        server
            .http
            .post(format!("{}{path}", server.inference))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    };
    let body = r#"{"instances": ["hello", {"data": "world"}]}"#;
    {
        // Without the envelope the path is not served, as in TorchServe.
        let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
        server.wait_healthy();
        assert_eq!(post(&server, "/v1/models/tiny:predict", body).status(), 404);
    }
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--service-envelope", "kserve"],
    );
    server.wait_healthy();
    let want = embeddings(&json(
        server.predict("tiny", r#"{"inputs": ["hello", "world"]}"#),
        200,
    ));
    let answer = json(post(&server, "/v1/models/tiny:predict", body), 200);
    assert_eq!(embeddings(&answer["predictions"]), want);
    for (path, body, status) in [
        ("/v1/models/ghost:predict", body, 404),
        ("/v1/models/tiny:predict", r#"{"instances": [5]}"#, 400),
        ("/v1/models/tiny:predict", r#"{"inputs": ["x"]}"#, 400),
        ("/v1/models/tiny:explain", body, 404),
    ] {
        let error = json(post(&server, path, body), status);
        assert!(error["error"].is_string(), "{path}: {error}");
    }
}
