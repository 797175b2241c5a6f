//! Hostile input over HTTP: a corpus of bad requests to every prediction API (malformed and
//! truncated JSON, wrong types at each field, invalid UTF-8, empty and oversized bodies,
//! out-of-range and non-finite parameters, wrong content types, path traversal in model
//! names and versions, oversized headers), interleaved with good requests. Every bad one
//! must get a 4xx with a JSON error body, every good one its correct answer, and the server
//! must stay up throughout.

#![allow(clippy::unwrap_used)]

use reqwest::Method;
use spillway_handlers::testing::{TinyLlama, vocabulary};

use crate::support::{Fixture, TestServer};

/// One request: method, API (`I`nference or `M`anagement), path, content type, body.
struct Bad {
    method: Method,
    management: bool,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
}

fn post(path: &str, body: impl Into<Vec<u8>>) -> Bad {
    Bad {
        method: Method::POST,
        management: false,
        path: path.to_string(),
        content_type: "application/json",
        body: body.into(),
    }
}

/// Valid bodies, one per API, each turned bad below in every way the corpus knows.
const GENERATE: &str = r#"{"inputs": "hello world", "parameters": {"max_new_tokens": 3}}"#;
const COMPLETION: &str = r#"{"model": "gen", "prompt": "hello world", "max_tokens": 3}"#;
const CHAT: &str =
    r#"{"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}"#;
const EMBEDDINGS: &str = r#"{"model": "emb", "input": ["hello world"]}"#;
const KSERVE: &str =
    r#"{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello world"]}]}"#;

fn corpus() -> Vec<Bad> {
    let apis: [(&str, &str); 6] = [
        ("/predictions/gen", GENERATE),
        ("/predictions/emb", r#"{"inputs": ["hello world"]}"#),
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
        ("/v1/embeddings", EMBEDDINGS),
        ("/v2/models/emb/infer", KSERVE),
    ];
    let mut corpus = Vec::new();
    for (path, good) in apis {
        // Malformed and truncated JSON: every proper prefix that is not itself valid.
        for cut in (1..good.len()).step_by(4) {
            corpus.push(post(path, &good.as_bytes()[..cut]));
        }
        for body in [
            "{",
            "}",
            "[1,2",
            "{\"inputs\":}",
            "nul",
            "{\"a\" 1}",
            "\"unterminated",
        ] {
            corpus.push(post(path, body));
        }
        // Invalid UTF-8 inside a JSON string, and an empty body.
        let mut invalid = good.as_bytes().to_vec();
        let at = good.find("hello").or_else(|| good.find("hi")).unwrap();
        invalid.splice(at..at + 1, [0xff, 0xfe]);
        corpus.push(post(path, invalid));
        corpus.push(post(path, ""));
    }
    // Wrong types and values at each field of each API.
    let generate_cases = [
        r#"{"inputs": 5}"#,
        r#"{"inputs": {}}"#,
        r#"{"inputs": null}"#,
        r#"{"inputs": "hi", "parameters": "fast"}"#,
        r#"{"inputs": "hi", "parameters": []}"#,
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": -1}}"#,
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": "3"}}"#,
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": 1.5}}"#,
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": 1e30}}"#,
        r#"{"inputs": "hi", "parameters": {"max_new_tokens": 100000000000}}"#,
        r#"{"inputs": "hi", "parameters": {"temperature": -1}}"#,
        r#"{"inputs": "hi", "parameters": {"temperature": "hot"}}"#,
        r#"{"inputs": "hi", "parameters": {"temperature": 1e999}}"#,
        r#"{"inputs": "hi", "parameters": {"top_p": 2}}"#,
        r#"{"inputs": "hi", "parameters": {"top_p": -0.5}}"#,
        r#"{"inputs": "hi", "parameters": {"top_k": -3}}"#,
        r#"{"inputs": "hi", "parameters": {"seed": "x"}}"#,
        r#"{"inputs": "hi", "parameters": {"stop": 7}}"#,
        r#"{"inputs": "hi", "parameters": {"repetition_penalty": 0}}"#,
    ];
    for body in generate_cases {
        corpus.push(post("/predictions/gen", body));
    }
    let openai_cases = [
        ("/v1/completions", r#"{"model": "gen"}"#),
        ("/v1/completions", r#"{"model": 7, "prompt": "hi"}"#),
        ("/v1/completions", r#"{"model": "gen", "prompt": {}}"#),
        ("/v1/completions", r#"{"model": "gen", "prompt": [[-1]]}"#),
        (
            "/v1/completions",
            r#"{"model": "gen", "prompt": [4294967296]}"#,
        ),
        (
            "/v1/completions",
            r#"{"model": "gen", "prompt": "hi", "max_tokens": -5}"#,
        ),
        (
            "/v1/completions",
            r#"{"model": "gen", "prompt": "hi", "temperature": "warm"}"#,
        ),
        (
            "/v1/completions",
            r#"{"model": "gen", "prompt": "hi", "n": 0}"#,
        ),
        (
            "/v1/completions",
            r#"{"model": "gen", "prompt": "hi", "logprobs": 1000}"#,
        ),
        ("/v1/completions", r#"{"model": "nosuch", "prompt": "hi"}"#),
        (
            "/v1/chat/completions",
            r#"{"model": "gen", "messages": "hi"}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "gen", "messages": [{"role": 1}]}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "gen", "messages": [{"content": "x"}]}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "gen", "messages": []}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "gen", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}"#,
        ),
        ("/v1/embeddings", r#"{"model": "emb"}"#),
        ("/v1/embeddings", r#"{"model": "emb", "input": 3.5}"#),
        ("/v1/embeddings", r#"{"model": "emb", "input": [null]}"#),
        ("/v1/embeddings", r#"{"model": "emb", "input": []}"#),
        (
            "/v1/embeddings",
            r#"{"model": "emb", "input": "hi", "encoding_format": "hex"}"#,
        ),
        ("/v1/embeddings", r#"{"model": "gen", "input": "hi"}"#),
        ("/v2/models/emb/infer", r#"{"inputs": []}"#),
        ("/v2/models/emb/infer", r#"{"inputs": [{"name": "text"}]}"#),
        (
            "/v2/models/emb/infer",
            r#"{"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}"#,
        ),
        (
            "/v2/models/emb/infer",
            r#"{"inputs": [{"name": "t", "shape": [-1], "datatype": "BYTES", "data": ["a"]}]}"#,
        ),
        (
            "/v2/models/emb/infer",
            r#"{"inputs": [{"name": "t", "shape": [9223372036854775807, 4], "datatype": "BYTES", "data": ["a"]}]}"#,
        ),
        (
            "/v2/models/emb/infer",
            r#"{"inputs": [{"name": "t", "shape": [1], "datatype": "FP99", "data": [1]}]}"#,
        ),
        (
            "/v2/models/emb/infer",
            r#"{"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [7]}]}"#,
        ),
        ("/v2/models/emb/versions/9.9/infer", KSERVE),
    ];
    for (path, body) in openai_cases {
        corpus.push(post(path, body));
    }
    // Wrong content types where the API takes JSON only.
    for (path, good) in [
        ("/v1/completions", COMPLETION),
        ("/v1/embeddings", EMBEDDINGS),
        ("/v2/models/emb/infer", KSERVE),
    ] {
        for content_type in ["application/xml", "multipart/form-data"] {
            let mut bad = post(path, good);
            bad.content_type = content_type;
            corpus.push(bad);
        }
    }
    // Path traversal and junk in model names and versions, on both APIs.
    for name in [
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "emb%00",
        "emb/..%2F..%2Fx",
        "emb/1.0%2F..%2F..",
        "nosuch",
        "%ff%fe",
    ] {
        corpus.push(post(&format!("/predictions/{name}"), GENERATE));
        // The client resolves `/models/%2e%2e` to `/` before sending it: a GET there is
        // the status page, rightly a 200 (POST and DELETE there are still refused).
        if name != "%2e%2e" {
            corpus.push(Bad {
                method: Method::GET,
                management: true,
                path: format!("/models/{name}"),
                content_type: "application/json",
                body: Vec::new(),
            });
        }
        corpus.push(Bad {
            method: Method::DELETE,
            management: true,
            path: format!("/models/{name}"),
            content_type: "application/json",
            body: Vec::new(),
        });
    }
    for url in [
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "file%3A%2F%2F%2Fetc%2Fpasswd",
    ] {
        corpus.push(Bad {
            method: Method::POST,
            management: true,
            path: format!("/models?url={url}"),
            content_type: "application/json",
            body: Vec::new(),
        });
    }
    // Bodies past max_request_size (set to 64 KiB below).
    corpus.push(post("/predictions/emb", vec![b'a'; 200 << 10]));
    corpus.push(post(
        "/v1/embeddings",
        format!(
            r#"{{"model": "emb", "input": "{}"}}"#,
            "x ".repeat(100 << 10)
        ),
    ));
    corpus
}

#[test]
fn a_corpus_of_bad_requests_gets_json_4xx_and_good_ones_interleaved_keep_their_answers() {
    let fixture = Fixture::new();
    fixture.tiny_archive("emb", "1.0", &[]);
    let model = fixture.dir.path().join("tiny-llama");
    let spec = TinyLlama {
        vocab_size: vocabulary().len(),
        ..TinyLlama::default()
    };
    spec.write_generator(&model).unwrap();
    fixture.archive("gen", "1.0", "text_generation", Some(&model), &[]);
    let server = TestServer::start_with_env(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "emb.mar,gen.mar"],
        &[("SPILLWAY_MAX_REQUEST_SIZE", "65536")],
    );
    server.wait_healthy();

    let send = |bad: &Bad, header: Option<(&str, String)>| {
        let base = if bad.management {
            &server.management
        } else {
            &server.inference
        };
        let mut request = server
            .http
            .request(bad.method.clone(), format!("{base}{}", bad.path))
            .header("content-type", bad.content_type)
            .body(bad.body.clone());
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        request.send()
    };
    // The good requests and their answers, taken once before any bad request.
    let goods: Vec<(Bad, serde_json::Value)> = [
        post("/predictions/gen", GENERATE),
        post("/predictions/emb", r#"{"inputs": ["hello world"]}"#),
        post("/v1/embeddings", EMBEDDINGS),
        post("/v2/models/emb/infer", KSERVE),
    ]
    .into_iter()
    .map(|good| {
        let response = send(&good, None).unwrap();
        assert_eq!(response.status(), 200, "{}", good.path);
        let answer: serde_json::Value = response.json().unwrap();
        (good, answer)
    })
    .collect();

    let corpus = corpus();
    assert!(corpus.len() >= 200, "{} bad requests", corpus.len());
    let mut failures = Vec::new();
    for (i, bad) in corpus.iter().enumerate() {
        match send(bad, None) {
            Ok(response) => {
                let status = response.status().as_u16();
                if status == 413 {
                    assert_eq!(
                        response.headers().get("connection").map(|v| v.as_bytes()),
                        Some(&b"close"[..]),
                        "a 413 closes the connection its unread body was on"
                    );
                }
                let body = response.text().unwrap_or_default();
                let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
                if !(400..500).contains(&status) || json.is_none() {
                    failures.push(format!(
                        "{} {} [{}] {:?}: {status} {}",
                        bad.method,
                        bad.path,
                        bad.content_type,
                        String::from_utf8_lossy(&bad.body[..bad.body.len().min(120)]),
                        &body[..body.len().min(200)]
                    ));
                }
            }
            // A body past the limit may be refused before it is read whole: the server
            // answers 413 and closes, and the client may see the reset first.
            Err(e) if bad.body.len() > 65536 => {
                let _ = e;
            }
            Err(e) => failures.push(format!("{} {}: no answer: {e}", bad.method, bad.path)),
        }
        // A good request after every fifth bad one still gets its answer.
        if i % 5 == 4 {
            let (good, want) = &goods[(i / 5) % goods.len()];
            let response = send(good, None).unwrap_or_else(|e| {
                panic!(
                    "good {} after bad #{i} ({} {}): {e}",
                    good.path, bad.method, bad.path
                )
            });
            assert_eq!(response.status(), 200, "good {} after bad #{i}", good.path);
            let got: serde_json::Value = response.json().unwrap();
            assert_eq!(&got, want, "good {} after bad #{i}", good.path);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad requests were not answered with a JSON 4xx:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    // Oversized headers: refused, and the server still answers.
    let huge = "x".repeat(128 << 10);
    let refused = send(&goods[0].0, Some(("x-junk", huge))).unwrap();
    assert_eq!(refused.status(), 431, "oversized headers");
    let body: serde_json::Value = refused.json().unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("headers"),
        "{body}"
    );
    for (good, want) in &goods {
        let got: serde_json::Value = send(good, None).unwrap().json().unwrap();
        assert_eq!(&got, want, "{} at the end", good.path);
    }
    server.wait_healthy();
}

/// A safetensors file from a raw header and data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A GGUF v3 file: header counts as given, then `rest`.
fn gguf(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&tensors.to_le_bytes());
    bytes.extend_from_slice(&kvs.to_le_bytes());
    bytes.extend_from_slice(rest);
    bytes
}

/// One GGUF tensor info: name, dims, ggml type, offset.
fn tensor_info(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
    let mut bytes = (name.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(name.as_bytes());
    bytes.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        bytes.extend_from_slice(&d.to_le_bytes());
    }
    bytes.extend_from_slice(&ggml_type.to_le_bytes());
    bytes.extend_from_slice(&offset.to_le_bytes());
    bytes
}

#[test]
fn malicious_and_broken_model_files_are_refused_at_registration_naming_the_file() {
    let fixture = Fixture::new();
    let bert = fixture.tiny_bert("bert", &spillway_handlers::testing::TinyBert::default());
    let f32s = |n: usize| vec![0u8; n * 4];
    // (archive name, the file replaced or added, its bytes, handler)
    let mut cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "st-header-past-file",
            "model.safetensors",
            {
                let mut b = (1u64 << 40).to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            "text_embedding",
        ),
        (
            "st-header-not-json",
            "model.safetensors",
            safetensors("{not json", &[]),
            "text_embedding",
        ),
        (
            "st-offsets-past-file",
            "model.safetensors",
            safetensors(
                r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1600000]}}"#,
                &f32s(4),
            ),
            "text_embedding",
        ),
        (
            "st-overlapping",
            "model.safetensors",
            safetensors(
                r#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}"#,
                &f32s(6),
            ),
            "text_embedding",
        ),
        (
            "st-shape-overflow",
            "model.safetensors",
            safetensors(
                r#"{"w": {"dtype": "F32", "shape": [18446744073709551615, 18446744073709551615], "data_offsets": [0, 16]}}"#,
                &f32s(4),
            ),
            "text_embedding",
        ),
        (
            "st-dtype-mismatch",
            "model.safetensors",
            safetensors(
                r#"{"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}"#,
                &f32s(4),
            ),
            "text_embedding",
        ),
        (
            "st-truncated",
            "model.safetensors",
            {
                let good = std::fs::read(bert.join("model.safetensors")).unwrap();
                good[..good.len() / 2].to_vec()
            },
            "text_embedding",
        ),
        (
            "tokenizer-not-json",
            "tokenizer.json",
            b"{\"model\": [unterminated".to_vec(),
            "text_embedding",
        ),
    ];
    let ggufs: Vec<(&str, Vec<u8>)> = vec![
        ("gguf-huge-counts", gguf(u64::MAX, u64::MAX, &[])),
        (
            "gguf-string-past-file",
            gguf(0, 1, &(1u64 << 40).to_le_bytes()),
        ),
        (
            "gguf-unknown-quant",
            gguf(1, 0, &tensor_info("token_embd.weight", &[32, 4], 9999, 0)),
        ),
        (
            "gguf-dims-overflow",
            gguf(
                1,
                0,
                &tensor_info("token_embd.weight", &[u64::MAX, u64::MAX], 0, 0),
            ),
        ),
        (
            "gguf-data-past-end",
            gguf(1, 0, &tensor_info("token_embd.weight", &[4096, 4096], 0, 0)),
        ),
        (
            "gguf-truncated",
            gguf(2, 0, &tensor_info("token_embd.weight", &[32], 0, 0)[..9]),
        ),
    ];
    for (name, bytes) in &ggufs {
        cases.push((name, "model.gguf", bytes.clone(), "text_generation"));
    }
    for (name, file, bytes, handler) in &cases {
        let dir = fixture.dir.path().join(format!("src-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        if *handler == "text_embedding" {
            copy_tree(&bert, &dir);
        }
        std::fs::write(dir.join(file), bytes).unwrap();
        fixture.archive(name, "1.0", handler, Some(&dir), &[]);
    }
    // None at start: each is registered below, and each must be refused.
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "standalone"],
    );
    server.wait_healthy();
    let mut failures = Vec::new();
    for (name, file, _, _) in &cases {
        let response = server.manage(
            Method::POST,
            &format!("/models?url={name}.mar&synchronous=true"),
        );
        let status = response.status().as_u16();
        let body = response.text().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|b| b["message"].as_str().map(str::to_string));
        let named = message.as_deref().is_some_and(|m| {
            let stem = file.split('.').next().unwrap_or(file);
            m.contains(file) || m.contains(stem) || m.contains("gguf") || m.contains("safetensors")
        });
        if !(400..500).contains(&status) || !named {
            failures.push(format!("{name}: {status} {body}"));
        }
        server.wait_healthy();
    }
    assert!(
        failures.is_empty(),
        "{} of {} broken files were not refused with a 4xx naming the file:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
