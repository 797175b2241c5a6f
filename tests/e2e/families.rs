//! Every decoder family served through the server's three generation APIs
//! (`/predictions`, `/v1/completions`, `/v1/chat/completions`), from the tiny checkpoints
//! that `handlers` holds to transformers' own outputs: the server's greedy tokens are
//! the decoder's own, in process, for the same prompt.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use spillway_handlers::models::decoder::families::FAMILIES;
use spillway_handlers::models::decoder::{DecoderSpec, KvCache, MappedDecoder, argmax};
use spillway_handlers::tasks::text_generation::TextGeneration;
use spillway_handlers::testing::decoder_fixtures::write_weights;
use spillway_handlers::testing::{TinyLlama, vocabulary};
use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::weights::layer_stack::UnitPlacement;
use spillway_handlers::{DType, Device, LoadOptions, Tensor, WeightSource};

use crate::support::{Fixture, TestServer, json, repo_root};

const PROMPT: &str = "hello world";
const NEW_TOKENS: usize = 5;

/// The family's fixture as a `text_generation` model folder: its config.json (no
/// end-of-sequence id, so every answer runs to its length) and weights, the tiny
/// WordPiece tokenizer, and a chat template.
fn model_folder(family: &str, into: &Path) {
    let fixture = repo_root()
        .join("handlers/tests/fixtures/decoders")
        .join(family);
    TinyLlama {
        vocab_size: vocabulary().len(),
        ..TinyLlama::default()
    }
    .write_generator(into)
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    config["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(into.join("config.json"), config.to_string()).unwrap();
    write_weights(&fixture, into).unwrap();
    let template = "{% for m in messages %}{{ m.content }} {% endfor %}";
    std::fs::write(
        into.join("tokenizer_config.json"),
        serde_json::json!({"chat_template": template}).to_string(),
    )
    .unwrap();
}

/// Greedy tokens of the decoder in `folder`, in process, after `prompt`.
fn greedy_in_process(folder: &Path, prompt: &str) -> Vec<u64> {
    let handler = TextGeneration::load(&FolderFiles::new(folder), &LoadOptions::default()).unwrap();
    let mut input = handler.encode(prompt).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    let spec = DecoderSpec::from_config(&config).unwrap();
    let source = WeightSource::open(&folder.join("model.safetensors")).unwrap();
    let model = MappedDecoder::load(&source, &spec, DType::F32, |_| {
        Ok(UnitPlacement::Resident(Device::Cpu))
    })
    .unwrap();
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    for _ in 0..NEW_TOKENS {
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&t, &mut cache).unwrap().squeeze(0).unwrap();
        let next = argmax(&logits).unwrap();
        out.push(u64::from(next));
        input = vec![next];
    }
    out
}

/// The server's `/predictions` answer for PROMPT (greedy, NEW_TOKENS, with details) and
/// its token ids.
fn predicted(server: &TestServer, name: &str) -> (serde_json::Value, Vec<u64>) {
    let body = serde_json::json!({"inputs": PROMPT,
        "parameters": {"max_new_tokens": NEW_TOKENS, "details": true}});
    let answer = json(server.predict(name, &body.to_string()), 200);
    let ids: Vec<u64> = answer["details"]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: {answer}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    (answer, ids)
}

#[test]
fn every_decoder_family_answers_predictions_completions_and_chat() {
    let fixture = Fixture::new();
    let mut expected = Vec::new();
    for family in FAMILIES {
        let folder = fixture.dir.path().join(family.name);
        model_folder(family.name, &folder);
        expected.push((family.name, greedy_in_process(&folder, PROMPT)));
        fixture.archive(family.name, "1.0", "text_generation", Some(&folder), &[]);
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    let http = reqwest::blocking::Client::new();
    for (name, want) in &expected {
        let (answer, ids) = predicted(&server, name);
        assert_eq!(&ids, want, "{name}: the server's greedy tokens");
        let text = answer["generated_text"].as_str().unwrap().to_string();

        let completion = json(
            http.post(format!("{}/v1/completions", server.inference))
                .json(&serde_json::json!({"model": name, "prompt": PROMPT,
                    "max_tokens": NEW_TOKENS, "temperature": 0}))
                .send()
                .unwrap(),
            200,
        );
        assert_eq!(
            completion["choices"][0]["text"].as_str(),
            Some(text.as_str()),
            "{name}: completions and predictions agree"
        );
        assert_eq!(completion["usage"]["completion_tokens"], NEW_TOKENS);

        let chat = json(
            http.post(format!("{}/v1/chat/completions", server.inference))
                .json(&serde_json::json!({"model": name,
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": NEW_TOKENS, "temperature": 0}))
                .send()
                .unwrap(),
            200,
        );
        assert_eq!(
            chat["usage"]["completion_tokens"], NEW_TOKENS,
            "{name}: {chat}"
        );
        assert!(chat["choices"][0]["message"]["content"].is_string());
    }
}

/// Mixtral and Qwen 3 MoE with their routed experts on disk and everything else in RAM
/// (one wildcard entry of `device_map`, llama.cpp's `--cpu-moe`): the plan puts each
/// block's experts unit on disk and its block on the CPU, and the server answers with the
/// decoder's own greedy tokens while it streams only expert bytes.
#[test]
fn moe_families_serve_with_their_experts_on_disk() {
    let fixture = Fixture::new();
    let mut expected = Vec::new();
    for family in FAMILIES.iter().filter(|f| f.experts.is_some()) {
        let folder = fixture.dir.path().join(family.name);
        model_folder(family.name, &folder);
        expected.push((family, greedy_in_process(&folder, PROMPT)));
        let moe = family.experts.as_ref().unwrap().module;
        let setup = serde_json::json!({"device_map":
            {"": "cpu", format!("model.layers.*.{moe}.experts"): "disk"}});
        let setup = fixture.file(
            &format!("{}-setup_config.json", family.name),
            &setup.to_string(),
        );
        std::fs::copy(&setup, folder.join("setup_config.json")).unwrap();
        fixture.archive(family.name, "1.0", "text_generation", Some(&folder), &[]);
    }
    let server = TestServer::start(&fixture.store(), &fixture.cache(), &[]);
    server.wait_healthy();
    for (family, want) in &expected {
        let name = family.name;
        let described = json(
            server.manage(reqwest::Method::GET, &format!("/models/{name}")),
            200,
        );
        let units = described[0]["placement"]["units"]
            .as_array()
            .unwrap()
            .clone();
        let experts: Vec<&serde_json::Value> =
            units.iter().filter(|u| u["kind"] == "experts").collect();
        assert!(!experts.is_empty(), "{name}: {units:?}");
        assert!(
            experts.iter().all(|u| u["device"] == "disk"),
            "{name}: {units:?}"
        );
        assert!(
            units
                .iter()
                .filter(|u| u["kind"] != "experts")
                .all(|u| u["device"] == "cpu"),
            "{name}: {units:?}"
        );
        let (_, ids) = predicted(&server, name);
        assert_eq!(&ids, want, "{name}: greedy tokens with experts on disk");
        let streamed = server
            .metrics_text()
            .lines()
            .filter(|l| {
                l.starts_with("spillway_streamed_bytes_total")
                    && l.contains(&format!("model_name=\"{name}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        assert!(streamed > 0.0, "{name}: its experts were read from disk");
    }
}
