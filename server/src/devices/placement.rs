//! Planning a model's placement from its files: the I/O half of planning (reading
//! safetensors headers — single or sharded — or config.json alone, and the setup
//! config), handing the pure half to `spillway-placement`. Used by the loader (the plan
//! is shown by describe) and by `spillway plan`.

use spillway_handlers::weights::files::read_json;
use spillway_handlers::{HandlerError, ModelFiles};
use spillway_placement::{
    Budgets, DiskAccess, MaxMemory, ModelShape, Plan, PlanRequest, Reserve, Strategy, TensorDType,
    TensorInfo, inventory,
};

use crate::config::setup_config::SetupConfig;
use crate::error::{Error, Result};

/// Where a model's sizes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// Tensor headers of the safetensors (nothing else read).
    SafetensorsHeaders,
    /// Computed from config.json (no weights at hand).
    ConfigJson,
}

/// A model's tensors and architecture, read without loading weights.
#[derive(Debug, Clone)]
pub struct ModelInventory {
    pub tensors: Vec<TensorInfo>,
    pub shape: Option<ModelShape>,
    pub source: SizeSource,
    /// A generator of this model may reuse cached prefixes: false where a position's keys
    /// depend on the sequence's length (LongRoPE, `DecoderSpec::keys_depend_on_length`).
    pub reuses_prefixes: bool,
}

/// Whether the model config.json describes reuses cached prefixes (see
/// [`ModelInventory::reuses_prefixes`]); configs that are no decoder's say yes.
fn reuses_prefixes(config: &serde_json::Value) -> bool {
    spillway_handlers::models::decoder::spec::DecoderSpec::from_config(config)
        .map_or(true, |spec| !spec.keys_depend_on_length())
}

/// safetensors' dtype names ("F32", "BF16", "F8_E4M3") are the placement crate's spellings.
fn dtype_of(info: &safetensors::tensor::TensorInfo) -> Option<TensorDType> {
    TensorDType::parse(&format!("{:?}", info.dtype))
}

impl ModelInventory {
    /// Reads headers of `model.safetensors` or of the shards that
    /// `model.safetensors.index.json` lists; without weights, sizes from config.json.
    pub fn read(files: &dyn ModelFiles) -> Result<Self> {
        let config: Option<serde_json::Value> = read_json(files, "config.json")?;
        // A vision model's config.json describes no layer stack to reserve for: it is
        // planned from its tensor headers alone (it runs resident).
        let shape = config
            .as_ref()
            .filter(|c| !spillway_handlers::models::vision::serves_config(c))
            .map(ModelShape::from_config)
            .transpose()
            .map_err(|e| Error::bad_config("config.json", e))?;
        let weights = match files.model_weights() {
            Ok(weights) => weights,
            Err(HandlerError::MissingFile(_)) => {
                let config = config.as_ref().ok_or_else(|| {
                    Error::bad_config(
                        "model",
                        "neither model.safetensors nor config.json is present",
                    )
                })?;
                return Self::from_config(config);
            }
            Err(e) => return Err(e.into()),
        };
        let mut tensors = Vec::new();
        for name in weights.tensor_names() {
            let Some(info) = weights.info(&name) else {
                continue;
            };
            let dtype = dtype_of(info).ok_or_else(|| {
                Error::bad_config(
                    "model weights",
                    format!("tensor {name} has dtype {:?}", info.dtype),
                )
            })?;
            tensors.push(TensorInfo {
                name,
                dtype,
                shape: info.shape.clone(),
            });
        }
        Ok(Self {
            tensors,
            shape,
            source: SizeSource::SafetensorsHeaders,
            reuses_prefixes: config.as_ref().is_none_or(reuses_prefixes),
        })
    }

    /// Sizes from a config.json alone.
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        let shape =
            ModelShape::from_config(config).map_err(|e| Error::bad_config("config.json", e))?;
        Ok(Self {
            tensors: shape.tensors(),
            shape: Some(shape),
            source: SizeSource::ConfigJson,
            reuses_prefixes: reuses_prefixes(config),
        })
    }

    /// The checkpoint's floating-point dtype (the most common among its tensors).
    pub fn stored_dtype(&self) -> Option<TensorDType> {
        let mut counts: Vec<(TensorDType, usize)> = Vec::new();
        for t in self.tensors.iter().filter(|t| t.dtype.is_float()) {
            match counts.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.dtype, 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// Planning knobs beyond setup_config.json (from model-config.yaml or the command line).
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub batch_size: usize,
    /// Tokens per sequence to reserve for; `None`: setup_config's max_length, else the
    /// model's maximum positions capped at 2048.
    pub max_length: Option<usize>,
}

/// Tokens per sequence to reserve for, and the reserve for `options.batch_size` of them.
fn reserve_of(
    inventory: &ModelInventory,
    setup: &SetupConfig,
    options: &PlanOptions,
    run_dtype: TensorDType,
) -> (usize, Reserve) {
    let seq = options.max_length.or(setup.max_length).unwrap_or_else(|| {
        inventory
            .shape
            .as_ref()
            .map_or(512, |s| s.max_position_embeddings.min(2048))
    });
    let reserve = inventory
        .shape
        .as_ref()
        .map(|s| s.reserve(options.batch_size.max(1), seq, run_dtype))
        .unwrap_or_default();
    (seq, reserve)
}

/// The bytes a generator's prefix cache may hold: setup_config's `prefix_cache_bytes`,
/// else a quarter of the KV cache reserved for the batch (0 for a model without one, and
/// for one that cannot reuse prefixes). The planner reserves them beside the KV cache.
pub fn prefix_cache_budget(
    inventory: &ModelInventory,
    setup: &SetupConfig,
    options: &PlanOptions,
) -> Result<u64> {
    // Read first: a malformed value is refused even for a model that keeps no cache.
    let asked = setup.prefix_cache_bytes()?;
    if !inventory.reuses_prefixes {
        return Ok(0);
    }
    if let Some(bytes) = asked {
        return Ok(bytes);
    }
    let run_dtype = setup
        .dtype()?
        .or(inventory.stored_dtype())
        .unwrap_or(TensorDType::F32);
    let (_, reserve) = reserve_of(inventory, setup, options, run_dtype);
    let layers = inventory.shape.as_ref().map_or(0, |s| s.layers as u64);
    Ok(reserve.kv_per_block * layers / 4)
}

/// Plans `inventory` under `setup` on `machine`.
pub fn plan_model(
    inventory: &ModelInventory,
    setup: &SetupConfig,
    options: &PlanOptions,
    machine: &spillway_placement::Machine,
) -> Result<Plan> {
    let plan_error = Error::Plan;
    let target = setup.dtype()?;
    let stored = inventory.stored_dtype();
    let run_dtype = target.or(stored).unwrap_or(TensorDType::F32);
    let tie = inventory
        .shape
        .as_ref()
        .is_some_and(|s| s.tie_word_embeddings);
    let units = inventory::units(&inventory.tensors, target, tie);
    let (seq, mut reserve) = reserve_of(inventory, setup, options, run_dtype);
    let prefix_cache = prefix_cache_budget(inventory, setup, options)?;
    // The prefix cache keeps each block's keys and values on that block's device.
    if let Some(shape) = inventory.shape.as_ref().filter(|s| s.layers > 0) {
        reserve.kv_per_block += prefix_cache.div_ceil(shape.layers as u64);
    }
    let max_memory = match &setup.max_memory {
        Some(map) => {
            MaxMemory::from_json(&serde_json::Value::Object(map.clone())).map_err(plan_error)?
        }
        None => MaxMemory::default(),
    };
    let budgets = Budgets::new(machine, &max_memory).map_err(plan_error)?;
    let strategy =
        Strategy::from_json(setup.device_map.as_ref(), machine.gpus.len()).map_err(plan_error)?;
    let converted = target.is_some_and(|t| stored.is_some_and(|s| s != t));
    let disk = if setup.offload_folder.is_some() {
        DiskAccess::OffloadFolder
    } else if converted {
        DiskAccess::NeedsOffloadFolder(format!(
            "the weights are converted from {} to {} and cannot be mapped as they are",
            stored.map_or("?", |d| d.torch_name()),
            run_dtype.torch_name()
        ))
    } else {
        DiskAccess::Mapped
    };
    let mut plan = spillway_placement::plan(&PlanRequest {
        units: &units,
        budgets: &budgets,
        strategy: &strategy,
        reserve,
        disk,
    })
    .map_err(plan_error)?;
    // A GGUF kept quantized (torch_dtype auto) is converted with its quantized tensors
    // as raw GGML blocks (U8), counted at their real size; so is a checkpoint quantized
    // at load, whatever its dtype.
    let quantized = (target.is_none() || setup.quantizes())
        && inventory.tensors.iter().any(|t| t.dtype == TensorDType::U8);
    let weights = if quantized {
        format!(
            "GGML quantized blocks ({} for the rest)",
            run_dtype.torch_name()
        )
    } else {
        run_dtype.torch_name().to_string()
    };
    if let Some(quantization) = setup.quantization()?.filter(|_| quantized) {
        plan.notes.push(quantization.describe());
    }
    if !inventory.reuses_prefixes {
        plan.notes.push(
            "no prefix cache: a position's keys depend on how long its sequence grows \
             (LongRoPE, dynamic NTK)"
                .into(),
        );
    }
    if prefix_cache > 0 {
        plan.notes.push(format!(
            "reserves {} for the prefix cache (prefix_cache_bytes)",
            spillway_placement::ByteSize(prefix_cache)
        ));
    }
    plan.notes.push(format!(
        "sizes from {}; weights in {weights}; reserves for batch {} x {seq} tokens",
        match inventory.source {
            SizeSource::SafetensorsHeaders => "safetensors headers",
            SizeSource::ConfigJson => "config.json (no weights read)",
        },
        options.batch_size.max(1)
    ));
    Ok(plan)
}

/// The snapshot folder of a model in the HuggingFace cache (`org/name` at `revision`,
/// default `main`), as huggingface_hub lays it out: `$HF_HUB_CACHE` (or `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`) / `models--org--name` / `snapshots` / the commit that
/// `refs/<revision>` names (or the revision itself when it is a commit hash).
pub fn hf_cache_snapshot(model_id: &str, revision: Option<&str>) -> Option<std::path::PathBuf> {
    let hub = std::env::var_os("HF_HUB_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| std::path::PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/huggingface/hub"))
        })?;
    let repo = hub.join(format!("models--{}", model_id.replace('/', "--")));
    let revision = revision.unwrap_or("main");
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = repo.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_handlers::weights::files::FolderFiles;

    /// A machine with no GPU and 1 TiB of RAM: budgets come from max_memory alone.
    fn cpu_only_machine() -> spillway_placement::Machine {
        spillway_placement::Machine {
            gpus: vec![],
            cpu_available: 1 << 40,
            cpu_total: 1 << 40,
            cpu_reserve: None,
        }
    }

    fn write_shard(path: &std::path::Path, tensors: &[(&str, Vec<usize>)]) {
        write_shard_as(path, tensors, safetensors::Dtype::BF16);
    }

    fn write_shard_as(
        path: &std::path::Path,
        tensors: &[(&str, Vec<usize>)],
        dtype: safetensors::Dtype,
    ) {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(name, shape)| {
                (
                    name.to_string(),
                    vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8],
                    shape.clone(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(name, bytes, shape)| {
                let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                    .expect("view");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).expect("write shard");
    }

    #[test]
    fn sharded_checkpoints_are_sized_from_every_shard_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_shard(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &[
                ("model.embed_tokens.weight", vec![100, 8]),
                ("model.layers.0.mlp.up_proj.weight", vec![16, 8]),
            ],
        );
        write_shard(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[
                ("model.layers.1.mlp.up_proj.weight", vec![16, 8]),
                ("model.norm.weight", vec![8]),
            ],
        );
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
            "model.layers.1.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"
        }});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .expect("index");
        let inventory = ModelInventory::read(&FolderFiles::new(dir.path())).expect("inventory");
        assert_eq!(inventory.source, SizeSource::SafetensorsHeaders);
        assert_eq!(inventory.tensors.len(), 4);
        assert_eq!(inventory.stored_dtype(), Some(TensorDType::BF16));
        let units = inventory::units(&inventory.tensors, None, false);
        let names: Vec<_> = units.iter().map(|u| (u.name.as_str(), u.bytes)).collect();
        assert_eq!(
            names,
            [
                ("model.embed_tokens", 1600),
                ("model.layers.0", 256),
                ("model.layers.1", 256),
                ("model.norm", 16)
            ]
        );
        // In float32 every float tensor doubles.
        let f32_units = inventory::units(&inventory.tensors, Some(TensorDType::F32), false);
        assert_eq!(f32_units[0].bytes, 3200);
    }

    #[test]
    fn converting_dtypes_needs_an_offload_folder_to_spill_to_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..6).map(|i| format!("model.layers.{i}.w")).collect();
        let mut tensors = vec![("model.embed_tokens.weight", vec![1000, 64])];
        tensors.extend(names.iter().map(|n| (n.as_str(), vec![64, 64])));
        write_shard(&dir.path().join("model.safetensors"), &tensors);
        let inventory = ModelInventory::read(&FolderFiles::new(dir.path())).expect("inventory");
        let machine = cpu_only_machine();
        let setup = |json: &str| SetupConfig::parse(Some(json.as_bytes())).expect("setup");
        let options = PlanOptions {
            batch_size: 1,
            max_length: Some(16),
        };
        // In float32: embeddings 256,000 bytes, six blocks of 16,384. 300,000 holds the
        // embeddings and room to stream two blocks (32,768), so the blocks go to disk.
        let tight = r#""device_map": "auto", "max_memory": {"cpu": 300000}"#;
        let err = plan_model(
            &inventory,
            &setup(&format!("{{{tight}, \"torch_dtype\": \"float32\"}}")),
            &options,
            &machine,
        )
        .expect_err("needs a folder");
        assert!(err.to_string().contains("offload_folder"), "{err}");
        let plan = plan_model(
            &inventory,
            &setup(&format!(
                "{{{tight}, \"torch_dtype\": \"float32\", \"offload_folder\": \"/tmp/x\"}}"
            )),
            &options,
            &machine,
        )
        .expect("with a folder");
        assert_eq!(plan.streamed_bytes_per_forward, 6 * 16_384);
        // In the stored bf16 (embeddings 128,000, blocks 8,192), 150,000 holds the
        // embeddings and room for two streamed blocks; the blocks map in place, no folder.
        let in_place = r#"{"device_map": "auto", "max_memory": {"cpu": 150000}}"#;
        let plan = plan_model(&inventory, &setup(in_place), &options, &machine).expect("in place");
        assert_eq!(
            plan.device_of("model.embed_tokens"),
            Some(spillway_placement::Device::CPU)
        );
        assert_eq!(plan.streamed_bytes_per_forward, 6 * 8_192);
    }

    #[test]
    fn a_longrope_model_reserves_no_prefix_cache() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../handlers/tests/fixtures/decoders/phi3_longrope/config.json"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let options = PlanOptions {
            batch_size: 2,
            max_length: None,
        };
        let auto = SetupConfig::parse(None).expect("setup");
        let asked = SetupConfig::parse(Some(br#"{"prefix_cache_bytes": 4096}"#)).expect("setup");
        // Its 64 positions pass the original 12: sequences switch to the long factors.
        let longrope = ModelInventory::from_config(&config).expect("inventory");
        assert!(!longrope.reuses_prefixes);
        for setup in [&auto, &asked] {
            assert_eq!(
                prefix_cache_budget(&longrope, setup, &options).expect("budget"),
                0
            );
        }
        let plan = plan_model(&longrope, &auto, &options, &cpu_only_machine()).expect("plan");
        assert!(
            plan.notes.iter().any(|n| n.starts_with("no prefix cache")),
            "{:?}",
            plan.notes
        );
        assert!(
            !plan
                .notes
                .iter()
                .any(|n| n.contains("for the prefix cache"))
        );
        // With no position past the original context the long set is never used, and the
        // same model reserves a prefix cache as any other.
        let mut within = config.clone();
        within["max_position_embeddings"] = 12.into();
        let within = ModelInventory::from_config(&within).expect("inventory");
        assert!(within.reuses_prefixes);
        assert!(prefix_cache_budget(&within, &auto, &options).expect("budget") > 0);
        assert_eq!(
            prefix_cache_budget(&within, &asked, &options).expect("budget"),
            4096
        );
        // Dynamic NTK scaling grows the base with the sequence past its 12 positions: no
        // prefix cache either.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../handlers/tests/fixtures/decoders/llama_dynamic/config.json"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let dynamic = ModelInventory::from_config(&config).expect("inventory");
        assert!(!dynamic.reuses_prefixes);
        assert_eq!(
            prefix_cache_budget(&dynamic, &asked, &options).expect("budget"),
            0
        );
    }

    #[test]
    fn a_plan_of_quantized_blocks_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The converted GGUF's layout: quantized blocks as U8, norms in float32.
        write_shard_as(
            &dir.path().join("blocks.safetensors"),
            &[("model.layers.0.w", vec![4096])],
            safetensors::Dtype::U8,
        );
        write_shard_as(
            &dir.path().join("norms.safetensors"),
            &[("model.norm.weight", vec![64])],
            safetensors::Dtype::F32,
        );
        let index = serde_json::json!({"weight_map": {
            "model.layers.0.w": "blocks.safetensors", "model.norm.weight": "norms.safetensors"}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .expect("index");
        let inventory = ModelInventory::read(&FolderFiles::new(dir.path())).expect("inventory");
        let machine = cpu_only_machine();
        let options = PlanOptions {
            batch_size: 1,
            max_length: Some(16),
        };
        let auto = SetupConfig::parse(None).expect("setup");
        let plan = plan_model(&inventory, &auto, &options, &machine).expect("plan");
        let note = plan.notes.last().expect("note");
        assert!(
            note.contains("weights in GGML quantized blocks (float32 for the rest)"),
            "{note}"
        );
        assert_eq!(plan.units.iter().map(|u| u.bytes).sum::<u64>(), 4096 + 256);
        let float32 = SetupConfig::parse(Some(br#"{"torch_dtype": "float32"}"#)).expect("setup");
        let plan = plan_model(&inventory, &float32, &options, &machine).expect("plan");
        assert!(
            plan.notes
                .last()
                .expect("note")
                .contains("weights in float32;")
        );
    }

    #[test]
    fn finds_snapshots_in_the_huggingface_cache_layout() {
        let hub = tempfile::tempdir().expect("tempdir");
        let repo = hub.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).expect("refs");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).expect("snapshot");
        std::fs::write(repo.join("refs/main"), "abc123\n").expect("ref");
        // SAFETY of the test: no other test in this process reads HF_HUB_CACHE.
        let found = with_hub(hub.path(), || hf_cache_snapshot("org/tiny", None));
        assert_eq!(found, Some(repo.join("snapshots/abc123")));
        assert_eq!(
            with_hub(hub.path(), || hf_cache_snapshot("org/tiny", Some("abc123"))),
            Some(repo.join("snapshots/abc123"))
        );
        assert_eq!(
            with_hub(hub.path(), || hf_cache_snapshot("org/other", None)),
            None
        );
    }

    fn with_hub<T>(hub: &std::path::Path, f: impl FnOnce() -> T) -> T {
        #[allow(unsafe_code)]
        // SAFETY: set_var is unsafe because other threads may read the environment at the
        // same time; HF_HUB_CACHE is read by nothing but this test.
        unsafe {
            std::env::set_var("HF_HUB_CACHE", hub);
        }
        f()
    }
}
