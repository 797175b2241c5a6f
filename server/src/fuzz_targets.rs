//! The bodies of the fuzz targets: each hands arbitrary bytes — a file anyone may drop
//! into a model store, a request body — to the parser that reads them in the server, and
//! checks what must hold whatever the bytes are: no panic, no allocation sized from an
//! unchecked count (the fuzzer's memory limit), no hang (its timeout), and a refusal that
//! is the client's or the file's error, never the server's. `fuzz/fuzz_targets/` runs
//! them under libFuzzer (`fuzz/run.sh TARGET MINUTES`); the test below replays the
//! committed corpora through them in every `cargo test`, no fuzzer needed.

use std::path::{Path, PathBuf};

use axum::http::{HeaderMap, HeaderValue};
use spillway_handlers::{DType, HandlerKind, ModelFiles, RawBody, WeightSource};

use crate::config::model_config::{ModelConfig, ModelConfigOverrides, ModelDefaults};
use crate::config::setup_config::SetupConfig;
use crate::config::{Overrides, ServerConfig};
use crate::error::{Error, ErrorKind};
use crate::store::archive::{self, ArchiveLimits};

/// A target's body: it takes one input.
pub type Target = fn(&[u8]);

/// Every target, by the name `fuzz/run.sh` and the corpus folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("archive", archive),
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("config_properties", config_properties),
    ("model_config_yaml", model_config_yaml),
    ("setup_config", setup_config),
    ("prediction_body", prediction_body),
];

/// Tensors this small are also read (bigger ones only have their headers checked: the
/// file is no bigger than the fuzzer's input, so a big tensor cannot be in it anyway).
const READ_TENSORS_UP_TO: usize = 1 << 16;

/// A folder of this thread's own, emptied for each input.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spillway-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("a scratch file");
}

/// A refusal must be the input's fault (a 4xx, or a model file that cannot be served),
/// never an internal error: that would mean the parser met a case it did not expect.
fn refused(what: &str, error: &Error) {
    let kind = error.kind();
    assert!(
        !matches!(kind, ErrorKind::Internal),
        "{what}: an internal error for bad input: {}",
        error.chain()
    );
}

/// The first byte picks the archive's kind by its name; the rest is the file.
pub fn archive(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    let name = match kind % 3 {
        0 => "model.mar",
        1 => "model.tar.gz",
        _ => "model.zip",
    };
    let path = dir.join(name);
    write(&path, bytes);
    let limits = ArchiveLimits::default();
    match archive::open(&path, &dir.join("cache"), &limits) {
        Ok(opened) => read_everything(&*opened.files),
        Err(e) => refused("archive", &e),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads every file an opened archive lists, and its weights, as a model load would.
fn read_everything(files: &dyn ModelFiles) {
    for name in files.find("") {
        let _ = files.read(&name);
        let _ = files.locate(&name);
    }
    if let Ok(weights) = files.model_weights() {
        exercise(&weights);
    }
}

/// What a load asks of a weight source.
fn exercise(weights: &WeightSource) {
    let _ = weights.parameters();
    let _ = weights.holding();
    for name in weights.tensor_names() {
        let Some(info) = weights.info(&name) else {
            continue;
        };
        let bytes = info.data_offsets.1 - info.data_offsets.0;
        if bytes <= READ_TENSORS_UP_TO {
            let _ = weights.load(&name, DType::F32, &spillway_handlers::Device::Cpu);
            if let Ok(Some(matrix)) = weights.quantized(&name) {
                let _ = matrix.dequantize(&spillway_handlers::Device::Cpu);
            }
        }
    }
}

/// A safetensors file: header, tensor table, and the tensors it holds.
pub fn safetensors(data: &[u8]) {
    let dir = scratch();
    let path = dir.join("model.safetensors");
    write(&path, data);
    if let Ok(weights) = WeightSource::open(&path) {
        exercise(&weights);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF file: metadata, tensor infos and blocks, converted as a GGUF model is (kept
/// in its blocks, and dequantized), then read back as the converted checkpoint.
pub fn gguf(data: &[u8]) {
    let dir = scratch();
    let model = dir.join("model");
    std::fs::create_dir_all(&model).expect("a scratch folder");
    write(&model.join("model.gguf"), data);
    let files = spillway_handlers::weights::files::FolderFiles::new(&model);
    for dtype in [None, Some(DType::F32)] {
        let converted = spillway_handlers::models::gguf::materialize(
            &files,
            "model.gguf",
            &dir.join("offload"),
            dtype,
        );
        if let Ok(folder) = converted {
            let converted = spillway_handlers::weights::files::FolderFiles::new(&folder);
            read_everything(&converted);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// config.properties, as `serve --ts-config` reads it.
pub fn config_properties(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let properties = crate::config::properties::parse(&text);
    if let Err(e) = ServerConfig::merge(Overrides::default(), &properties) {
        refused("config.properties", &e);
    }
}

/// model-config.yaml, and the device request it makes.
pub fn model_config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let defaults = ModelDefaults {
        workers: 1,
        response_timeout: std::time::Duration::from_secs(120),
    };
    match ModelConfig::parse(Some(text), &ModelConfigOverrides::default(), defaults) {
        Ok(config) => {
            if let Err(e) = config.device_request() {
                refused("model-config.yaml device", &e);
            }
        }
        Err(e) => refused("model-config.yaml", &e),
    }
}

/// setup_config.json: its load options, device request, and a plan of a small model
/// under it (device_map, max_memory and its byte sizes, dtype, offload settings).
pub fn setup_config(data: &[u8]) {
    let setup = match SetupConfig::parse(Some(data)) {
        Ok(setup) => setup,
        Err(e) => return refused("setup_config.json", &e),
    };
    if let Err(e) = setup.load_options() {
        refused("setup_config.json options", &e);
    }
    if let Err(e) = setup.device_request() {
        refused("setup_config.json device", &e);
    }
    let inventory = crate::devices::placement::ModelInventory {
        tensors: (0..4)
            .map(|i| spillway_placement::TensorInfo {
                name: format!("model.layers.{i}.mlp.up_proj.weight"),
                dtype: spillway_placement::TensorDType::F32,
                shape: vec![64, 64],
            })
            .chain(["model.embed_tokens.weight", "lm_head.weight"].map(|name| {
                spillway_placement::TensorInfo {
                    name: name.into(),
                    dtype: spillway_placement::TensorDType::F32,
                    shape: vec![100, 64],
                }
            }))
            .collect(),
        shape: None,
        source: crate::devices::placement::SizeSource::SafetensorsHeaders,
        reuses_prefixes: true,
    };
    let options = crate::devices::placement::PlanOptions {
        batch_size: 1,
        max_length: None,
    };
    let gpu = |ordinal| spillway_placement::GpuMemory {
        ordinal,
        free: 1 << 30,
        total: 1 << 30,
    };
    let machine = spillway_placement::Machine {
        gpus: vec![gpu(0), gpu(1)],
        cpu_available: 1 << 30,
        cpu_total: 1 << 30,
        cpu_reserve: None,
    };
    if let Err(e) = crate::devices::placement::plan_model(&inventory, &setup, &options, &machine) {
        refused("setup_config.json plan", &e);
    }
}

/// A prediction body, to the decoder of the API and handler the first byte picks (and a
/// content type the second picks): TorchServe's predictions for each handler, the three
/// OpenAI endpoints, and KServe v2's infer (JSON, or JSON and binary data).
pub fn prediction_body(data: &[u8]) {
    let [pick, content_type, body @ ..] = data else {
        return;
    };
    let content_type = match content_type % 5 {
        0 => None,
        1 => Some("application/json"),
        2 => Some("text/plain"),
        3 => Some("application/octet-stream"),
        _ => Some("application/x-www-form-urlencoded"),
    };
    let kinds = HandlerKind::ALL;
    let pick = usize::from(*pick);
    let result = match pick % 13 {
        n @ 0..5 => crate::http::torchserve::predictions::request(
            kinds[n],
            RawBody {
                content_type: content_type.map(str::to_string),
                bytes: body.to_vec(),
            },
        )
        .map(drop),
        5 => crate::http::openai::decode("/v1/completions", body).map(drop),
        6 => crate::http::openai::decode("/v1/chat/completions", body).map(drop),
        7 => crate::http::openai::decode("/v1/embeddings", body).map(drop),
        n => {
            // KServe: with a binary part after the JSON (its header says where the JSON
            // ends) when the input has a zero byte, which marks that place and is dropped.
            let mut headers = HeaderMap::new();
            let mut joined = body.to_vec();
            if pick / 13 % 2 == 1
                && let Some(json_length) = body.iter().position(|&b| b == 0)
            {
                joined.remove(json_length);
                headers.insert(
                    "inference-header-content-length",
                    HeaderValue::from(json_length),
                );
            }
            crate::http::kserve::decode(kinds[n - 8], &headers, &joined).map(drop)
        }
    };
    if let Err(e) = result {
        refused("prediction body", &e);
        assert!(
            e.kind().status().is_client_error(),
            "a bad body is the client's error: {}",
            e.chain()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed corpora (`fuzz/corpus/TARGET`: inputs that reach distinct paths,
    /// and every crash found, kept as a regression), each through its target.
    #[test]
    fn the_fuzz_corpora_replay_without_a_fault() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .flatten()
                .map(|e| e.path())
                .collect();
            inputs.sort();
            assert!(!inputs.is_empty(), "{name} has a corpus");
            for input in inputs {
                let data = std::fs::read(&input).expect("an input");
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", input.display());
                replayed += 1;
            }
        }
        eprintln!("replayed {replayed} inputs");
    }
}
