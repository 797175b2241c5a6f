//! `spillway plan` and the placement shown by describe.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use reqwest::Method;
use spillway_handlers::testing::TinyBert;

use crate::support::{BIN, Fixture, TestServer, json, repo_root};

fn plan(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("plan").args(args).output().unwrap()
}

#[test]
fn plan_prints_a_table_and_the_same_plan_as_json() {
    let fixture = Fixture::new();
    let spec = TinyBert {
        hidden_size: 64,
        layers: 4,
        ..TinyBert::default()
    };
    let dir = fixture.tiny_bert("model", &spec);
    let path = dir.to_str().unwrap();

    let table = plan(&[path]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.contains("encoder.layer.0..3 (4 blocks)"), "{text}");

    let out = plan(&[path, "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let units = plan["units"].as_array().unwrap();
    let names: Vec<_> = units.iter().map(|u| u["name"].as_str().unwrap()).collect();
    // candle-transformers' BertModel (which wrote the weights) has no pooler.
    assert_eq!(
        names,
        [
            "embeddings",
            "encoder.layer.0",
            "encoder.layer.1",
            "encoder.layer.2",
            "encoder.layer.3"
        ]
    );
    assert!(
        units
            .iter()
            .all(|u| u["device"] == "cpu" && u["bytes"].as_u64().unwrap() > 0)
    );
    // The unit bytes are the safetensors' own: 4 bytes a float.
    let weights = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    let total: u64 = units.iter().map(|u| u["bytes"].as_u64().unwrap()).sum();
    assert!(
        total < weights && weights - total < 16 * 1024,
        "{total} of {weights} bytes (the rest is the header)"
    );
    let cpu = &plan["devices"][0];
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(cpu["weights"].as_u64(), Some(total));
    assert!(cpu["budget"].as_u64().unwrap() > 0 && cpu["reserve"].as_u64().unwrap() > 0);
}

#[test]
fn plan_spills_to_disk_under_a_small_budget_and_fails_clearly_when_impossible() {
    let fixture = Fixture::new();
    let spec = TinyBert {
        hidden_size: 128,
        layers: 6,
        max_position_embeddings: 128,
        ..TinyBert::default()
    };
    let dir = fixture.tiny_bert("model", &spec);
    let path = dir.to_str().unwrap();
    let full: serde_json::Value = serde_json::from_slice(&plan(&[path, "--json"]).stdout).unwrap();
    let weights = full["devices"][0]["weights"].as_u64().unwrap();
    let reserve = full["devices"][0]["reserve"].as_u64().unwrap();

    // Room for everything but about half of the blocks: the tail goes to disk.
    let budget = reserve + weights * 3 / 4;
    let max_memory = format!(r#"{{"cpu": {budget}}}"#);
    let out = plan(&[
        path,
        "--device-map",
        "auto",
        "--max-memory",
        &max_memory,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spilled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let devices: Vec<_> = spilled["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["device"].as_str().unwrap().to_string())
        .collect();
    let first_disk = devices
        .iter()
        .position(|d| d == "disk")
        .expect("something on disk");
    assert!(
        devices[..first_disk].iter().all(|d| d == "cpu")
            && devices[first_disk..].iter().all(|d| d == "disk"),
        "{devices:?}"
    );
    assert!(spilled["streamed_bytes_per_forward"].as_u64().unwrap() > 0);

    // The same budget with everything forced onto the CPU cannot work: non-zero exit, why on stderr.
    let out = plan(&[path, "--device-map", "cpu", "--max-memory", &max_memory]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not fit") && stderr.contains("cpu has"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn plan_works_from_config_json_alone() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/refs/smollm2_config.json"
    );
    let out = plan(&[
        config,
        "--json",
        "--dtype",
        "bfloat16",
        "--max-length",
        "2048",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let units = plan["units"].as_array().unwrap();
    assert_eq!(units.len(), 32, "embeddings, 30 blocks, norm");
    assert_eq!(units[0]["tied"], serde_json::json!(["lm_head"]));
    let total: u64 = units.iter().map(|u| u["bytes"].as_u64().unwrap()).sum();
    assert_eq!(total, 134_515_008 * 2, "SmolLM2-135M in bf16");
}

/// `plan` prints a decoder's parsed spec above the table, or why text_generation
/// would refuse it, naming the key.
#[test]
fn plan_prints_the_decoders_spec_or_its_refusal() {
    let fixtures = repo_root().join("handlers/tests/fixtures/decoders");
    let gemma3 = fixtures.join("gemma3/config.json");
    let out = plan(&[gemma3.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or_default();
    for part in [
        "decoder: family gemma3",
        "window 4 on 2 layers",
        "sliding layers' rope theta 10000",
        "rope scaling \"linear\"",
    ] {
        assert!(line.contains(part), "{part:?} not in {line:?}");
    }
    let fixture = Fixture::new();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("llama/config.json")).unwrap())
            .unwrap();
    config["hidden_act"] = serde_json::json!("relu");
    let refused = fixture.file("config.json", &config.to_string());
    let out = plan(&[refused.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("decoder: refused") && text.contains("hidden_act"),
        "{text}"
    );
}

#[test]
fn plan_prints_the_encoders_spec_and_plans_distilbert_from_its_config() {
    let fixtures = repo_root().join("handlers/tests/fixtures/encoders");
    for (fixture, wants) in [
        (
            "distilbert",
            ["encoder: distilbert encoder", "3 blocks, 32 wide"],
        ),
        (
            "roberta",
            [
                "encoder: roberta encoder",
                "positions from 2 (after padding)",
            ],
        ),
    ] {
        let config = fixtures.join(fixture).join("config.json");
        let out = plan(&[config.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{fixture}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or_default();
        for part in wants {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
        // DistilBERT's blocks are planned as units under its own names.
        if fixture == "distilbert" {
            assert!(text.contains("distilbert.transformer.layer.0..2"), "{text}");
        }
    }
}

#[test]
fn describe_shows_the_plan_and_gpu_plans_are_refused_on_this_build() {
    let fixture = Fixture::new();
    fixture.tiny_archive("tiny", "1.0", &[]);
    let setup = fixture.file("setup_config.json", r#"{"device_map": "cuda:0"}"#);
    fixture.tiny_archive("gpu", "1.0", &["--extra-files", setup.to_str().unwrap()]);
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "tiny.mar"],
    );
    server.wait_healthy();
    let described = json(server.manage(Method::GET, "/models/tiny"), 200);
    let placement = &described[0]["placement"];
    assert_eq!(placement["strategy"], "cpu");
    assert!(
        placement["units"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["device"] == "cpu"),
        "{placement}"
    );

    let response = server.manage(Method::POST, "/models?url=gpu.mar&synchronous=true");
    let message = crate::support::error(response, 400);
    assert!(
        message.contains("cuda:0") && message.contains("not available"),
        "{message}"
    );
    assert!(
        message.contains("this build has no CUDA support") || message.contains("CUDA driver said"),
        "says why there is no GPU: {message}"
    );
}

#[test]
fn units_planned_on_disk_are_streamed_and_answer_exactly_as_resident_ones() {
    let fixture = Fixture::new();
    let spec = TinyBert {
        hidden_size: 64,
        layers: 4,
        seed: Some(11),
        ..TinyBert::default()
    };
    let model = fixture.tiny_bert("model", &spec);
    // The same weights as a sharded checkpoint (3 shards + index), whose units can span
    // two shard files.
    let sharded = fixture.tiny_bert("sharded", &spec);
    spillway_handlers::testing::shard_checkpoint(&sharded, 3).unwrap();
    let all_on_disk = Some(r#"{"device_map": "disk"}"#);
    let setups = [
        ("resident", &model, None),
        (
            "blocks-on-disk",
            &model,
            Some(r#"{"device_map": {"embeddings": "cpu", "encoder": "disk"}}"#),
        ),
        ("all-on-disk", &model, all_on_disk),
        ("sharded", &sharded, None),
        ("sharded-all-on-disk", &sharded, all_on_disk),
    ];
    for (name, model, setup) in setups {
        let mut extra = Vec::new();
        if let Some(setup) = setup {
            let dir = fixture.dir.path().join(format!("setup-{name}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("setup_config.json"), setup).unwrap();
            extra.push(dir.join("setup_config.json").to_str().unwrap().to_string());
        }
        let mut args = vec![];
        if let Some(path) = extra.first() {
            args.extend(["--extra-files", path.as_str()]);
        }
        fixture.archive(name, "1.0", "text_embedding", Some(model), &args);
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let body = r#"{"inputs": ["hello world", "the quick brown fox jumps over the lazy spillway"]}"#;
    let reference = json(server.predict("resident", body), 200);
    assert_eq!(json(server.predict("sharded", body), 200), reference);
    for (name, streamed) in [
        ("blocks-on-disk", 4),
        ("all-on-disk", 5),
        ("sharded-all-on-disk", 5),
    ] {
        for _ in 0..2 {
            assert_eq!(json(server.predict(name, body), 200), reference, "{name}");
        }
        let described = json(server.manage(Method::GET, &format!("/models/{name}")), 200);
        assert_eq!(
            described[0]["model"]["streamed_units"], streamed,
            "{name}: {described}"
        );
        let on_disk = described[0]["placement"]["units"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["device"] == "disk")
            .count();
        assert_eq!(on_disk, streamed, "{name}");
    }
    let described = json(server.manage(Method::GET, "/models/resident"), 200);
    assert_eq!(described[0]["model"]["streamed_units"], 0);
}

#[test]
fn converted_disk_units_are_written_once_to_the_offload_folder() {
    let fixture = Fixture::new();
    let model = fixture.tiny_bert("model", &TinyBert::default());
    let offload = fixture.dir.path().join("offload");
    let setups = [
        ("f32", r#"{"device_map": "cpu"}"#.to_string()),
        (
            "bf16-disk",
            serde_json::json!({"device_map": {"embeddings": "cpu", "encoder": "disk"}, "torch_dtype": "bfloat16",
                               "offload_folder": offload})
            .to_string(),
        ),
        ("bf16-no-folder", r#"{"device_map": {"embeddings": "cpu", "encoder": "disk"}, "torch_dtype": "bfloat16"}"#.to_string()),
    ];
    for (name, setup) in &setups {
        let dir = fixture.dir.path().join(format!("setup-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("setup_config.json"), setup).unwrap();
        let setup_path = dir.join("setup_config.json");
        fixture.archive(
            name,
            "1.0",
            "text_embedding",
            Some(&model),
            &["--extra-files", setup_path.to_str().unwrap()],
        );
    }
    let server = TestServer::start(
        &fixture.store(),
        &fixture.cache(),
        &["--models", "f32=f32.mar,bf16-disk=bf16-disk.mar"],
    );
    server.wait_healthy();
    let body = r#"{"inputs": ["hello world", "the quick brown fox"]}"#;
    let want = crate::support::embeddings(&json(server.predict("f32", body), 200));
    let got = crate::support::embeddings(&json(server.predict("bf16-disk", body), 200));
    for (g, w) in got.iter().zip(&want) {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff / scale <= 2e-2,
            "bf16 from the offload folder is {diff} off"
        );
    }
    // The converted copy is in the folder, in bfloat16.
    let files: Vec<_> = std::fs::read_dir(&offload)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let header = std::fs::read(files[0].join("model.safetensors")).unwrap();
    let len = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&header[8..8 + len]).to_string();
    assert!(
        header.contains("\"BF16\"") && !header.contains("\"F32\""),
        "{header}"
    );
    assert_eq!(
        json(server.manage(Method::GET, "/models/bf16-disk"), 200)[0]["model"]["streamed_units"],
        2
    );

    // Without an offload folder the same setup cannot be served, and says why.
    let message = crate::support::error(
        server.manage(
            Method::POST,
            "/models?url=bf16-no-folder.mar&synchronous=true",
        ),
        400,
    );
    assert!(message.contains("offload_folder"), "{message}");
}
