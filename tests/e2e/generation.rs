//! Generation through the server: `continuousBatching` answers every request exactly as
//! whole-batch serving does, with requests of different lengths in flight together.

#![allow(clippy::unwrap_used)]

use spillway_handlers::testing::{TinyLlama, vocabulary};

use crate::support::{Fixture, TestServer, json};

/// A tiny random-weight Llama, its config.json changed by `configure`, archived once
/// per `(name, model-config.yaml)`.
fn archive_tiny_generators(
    fixture: &Fixture,
    configure: impl Fn(&mut serde_json::Value),
    archives: &[(&str, &str)],
) {
    let model = fixture.dir.path().join("tiny-llama");
    let spec = TinyLlama {
        vocab_size: vocabulary().len(),
        ..TinyLlama::default()
    };
    spec.write_generator(&model).unwrap();
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    configure(&mut config);
    std::fs::write(&config_path, config.to_string()).unwrap();
    for (name, yaml) in archives {
        let path = fixture.file(&format!("{name}.yaml"), yaml);
        fixture.archive(
            name,
            "1.0",
            "text_generation",
            Some(&model),
            &["--config-file", path.to_str().unwrap()],
        );
    }
}

#[test]
fn continuous_batching_answers_each_request_as_whole_batches_do() {
    let fixture = Fixture::new();
    // No end-of-sequence token: every request runs to its own max_new_tokens.
    archive_tiny_generators(
        &fixture,
        |config| config["eos_token_id"] = serde_json::Value::Null,
        &[
            ("whole", "batchSize: 4\nmaxBatchDelay: 50\n"),
            (
                "continuous",
                "batchSize: 4\nmaxBatchDelay: 50\ncontinuousBatching: true\n",
            ),
        ],
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let prompts = [
        "hello world",
        "a",
        "the quick brown fox",
        "rust",
        "serve it",
        "b c d e f",
    ];
    let body = |i: usize| {
        serde_json::json!({"inputs": prompts[i % prompts.len()],
                           "parameters": {"max_new_tokens": 3 + 7 * (i % 4), "details": true}})
        .to_string()
    };
    let want: Vec<serde_json::Value> = (0..12)
        .map(|i| json(server.predict("whole", &body(i)), 200))
        .collect();
    let got: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (server, body) = (&server, body(i));
                scope.spawn(move || json(server.predict("continuous", &body), 200))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got, want, "request {i}");
        let tokens = want["details"]["generated_tokens"].as_u64().unwrap() as usize;
        assert_eq!(tokens, 3 + 7 * (i % 4), "ran to its own length");
    }
    // Each step of the running batch counts as a batch: many more than the requests,
    // where whole-batch serving counts at most one per request.
    let metrics = server.metrics_text();
    let steps = |model: &str| -> f64 {
        let labels = format!(r#"model_name="{model}",model_version="1.0""#);
        metrics
            .lines()
            .find(|l| l.starts_with("spillway_batch_size_count{") && l.contains(&labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    assert!(steps("whole") <= 12.0);
    assert!(steps("continuous") > 12.0, "{}", steps("continuous"));
}

#[test]
fn a_streamed_prediction_sends_a_json_line_per_token_and_ends_with_the_whole_answer() {
    let fixture = Fixture::new();
    // Room for a long generation (for the abandoned stream below).
    archive_tiny_generators(
        &fixture,
        |config| config["max_position_embeddings"] = 2048.into(),
        &[
            ("whole", "batchSize: 1\n"),
            ("continuous", "batchSize: 4\ncontinuousBatching: true\n"),
        ],
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for name in ["whole", "continuous"] {
        let parameters = serde_json::json!({"max_new_tokens": 9, "details": true});
        let body = serde_json::json!({"inputs": "the quick brown fox", "parameters": parameters});
        let want = json(server.predict(name, &body.to_string()), 200);
        let mut streamed = body.clone();
        streamed["parameters"]["stream"] = true.into();
        let response = server.predict(name, &streamed.to_string());
        assert_eq!(response.status(), 200);
        let text = response.text().unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (last, tokens) = lines.split_last().unwrap();
        assert_eq!(last, &want, "{name}: the last line is the whole answer");
        let ids: Vec<u64> = tokens
            .iter()
            .map(|t| t["token_id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            serde_json::json!(ids),
            want["details"]["token_ids"],
            "{name}: one line per token"
        );
        let pieces: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
        assert_eq!(pieces, want["generated_text"], "{name}: the deltas add up");
    }
    // A bad streamed request is an ordinary error answer.
    let bad = r#"{"inputs": "x", "parameters": {"max_new_tokens": 0, "stream": true}}"#;
    assert_eq!(server.predict("whole", bad).status(), 400);

    // A client that leaves mid-stream frees its slot in the running batch: the request
    // is dropped at the next step instead of running to its 1,500 tokens.
    let long = r#"{"inputs": "a", "parameters": {"max_new_tokens": 1500, "ignore_eos": true, "stream": true}}"#;
    let mut response = server.predict("continuous", long);
    let mut first = [0u8; 16];
    std::io::Read::read(&mut response, &mut first).unwrap();
    drop(response);
    let dropped = || -> f64 {
        server
            .metrics_text()
            .lines()
            .filter(|l| {
                l.starts_with("spillway_dropped_requests_total{")
                    && l.contains(r#"model_name="continuous""#)
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while dropped() < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned stream was never dropped"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
