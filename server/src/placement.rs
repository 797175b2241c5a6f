//! Planning a model's placement from its files: the I/O half of planning (reading
//! safetensors headers — single or sharded — or config.json alone, and the setup
//! config), handing the pure half to `spillway-placement`. Used by the loader (the plan
//! is shown by describe) and by `spillway plan`.

use spillway_handlers::{HandlerError, ModelFiles, files::read_json};
use spillway_placement::{
    Budgets, DiskAccess, MaxMemory, ModelShape, Plan, PlanRequest, Strategy, TensorDType,
    TensorInfo, inventory,
};

use crate::error::{Error, Result};
use crate::setup_config::SetupConfig;

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
        let shape = config
            .as_ref()
            .map(ModelShape::from_config)
            .transpose()
            .map_err(|e| Error::bad_config("config.json", e))?;
        let shards: Vec<String> =
            match read_json::<serde_json::Value>(files, "model.safetensors.index.json")? {
                Some(index) => {
                    let mut shards: Vec<String> = index
                        .get("weight_map")
                        .and_then(|m| m.as_object())
                        .ok_or_else(|| {
                            Error::bad_config("model.safetensors.index.json", "no weight_map")
                        })?
                        .values()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect();
                    shards.sort();
                    shards.dedup();
                    shards
                }
                None => vec!["model.safetensors".to_string()],
            };
        let mut tensors = Vec::new();
        for shard in &shards {
            let weights = match files.weights(shard) {
                Ok(w) => w,
                Err(HandlerError::MissingFile(_)) if shards.len() == 1 => {
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
            for name in weights.tensor_names() {
                let Some(info) = weights.info(&name) else {
                    continue;
                };
                let dtype = dtype_of(info).ok_or_else(|| {
                    Error::bad_config(
                        shard.clone(),
                        format!("tensor {name} has dtype {:?}", info.dtype),
                    )
                })?;
                tensors.push(TensorInfo {
                    name,
                    dtype,
                    shape: info.shape.clone(),
                });
            }
        }
        Ok(Self {
            tensors,
            shape,
            source: SizeSource::SafetensorsHeaders,
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

/// Plans `inventory` under `setup` on `machine`.
pub fn plan_model(
    inventory: &ModelInventory,
    setup: &SetupConfig,
    options: &PlanOptions,
    machine: &spillway_placement::Machine,
) -> Result<Plan> {
    let plan_error = Error::Plan;
    let target = match setup.torch_dtype.as_deref() {
        None | Some("auto") => None,
        Some(name) => Some(
            TensorDType::parse(name)
                .filter(|d| d.is_float())
                .ok_or_else(|| {
                    Error::bad_config(
                        "setup_config.json",
                        format!("torch_dtype `{name}` is not a float type"),
                    )
                })?,
        ),
    };
    let stored = inventory.stored_dtype();
    let run_dtype = target.or(stored).unwrap_or(TensorDType::F32);
    let tie = inventory
        .shape
        .as_ref()
        .is_some_and(|s| s.tie_word_embeddings);
    let units = inventory::units(&inventory.tensors, target, tie);
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
    plan.notes.push(format!(
        "sizes from {}; weights in {}; reserves for batch {} x {seq} tokens",
        match inventory.source {
            SizeSource::SafetensorsHeaders => "safetensors headers",
            SizeSource::ConfigJson => "config.json (no weights read)",
        },
        run_dtype.torch_name(),
        options.batch_size.max(1)
    ));
    Ok(plan)
}
