//! Generation through the server: `continuousBatching` answers every request exactly as
//! whole-batch serving does, with requests of different lengths in flight together.

#![allow(clippy::unwrap_used)]

use spillway_handlers::testing::{TinyLlama, vocabulary};

use crate::support::{Fixture, TestServer, json};

#[test]
fn continuous_batching_answers_each_request_as_whole_batches_do() {
    let fixture = Fixture::new();
    let model = fixture.dir.path().join("tiny-llama");
    let spec = TinyLlama {
        vocab_size: vocabulary().len(),
        ..TinyLlama::default()
    };
    spec.write_generator(&model).unwrap();
    // No end-of-sequence token: every request runs to its own max_new_tokens.
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(&config_path, config.to_string()).unwrap();
    for (name, yaml) in [
        ("whole", "batchSize: 4\nmaxBatchDelay: 50\n"),
        (
            "continuous",
            "batchSize: 4\nmaxBatchDelay: 50\ncontinuousBatching: true\n",
        ),
    ] {
        let path = fixture.file(&format!("{name}.yaml"), yaml);
        fixture.archive(
            name,
            "1.0",
            "text_generation",
            Some(&model),
            &["--config-file", path.to_str().unwrap()],
        );
    }
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
