//! Loading a model, step by step: open the archive inside the store (checked), read the
//! manifest and both configs, register the version as Loading, build the handler on a
//! blocking thread, then start its workers. Registration errors in the first steps
//! (unknown archive, bad manifest or config, duplicate version) are returned at once;
//! a failed build leaves the model Failed (or, for synchronous loads, unregistered).

use std::sync::Arc;
use std::time::Instant;

use spillway_handlers::weights::files;
use spillway_handlers::{Handler, HandlerKind, ModelFiles};
use spillway_placement::{Device, Plan};

use crate::app::AppState;
use crate::archive::{self, ArchiveLimits, OpenedArchive};
use crate::devices;
use crate::error::{Error, Result};
use crate::model::{ModelHandle, ModelSpec};
use crate::model_config::{ModelConfig, ModelConfigOverrides, ModelDefaults};
use crate::placement::{ModelInventory, PlanOptions, plan_model};
use crate::setup_config::SetupConfig;

/// A registration request (from the management API or the start-up list).
#[derive(Debug, Clone, Default)]
pub struct LoadRequest {
    pub url: String,
    pub name: Option<String>,
    pub overrides: ModelConfigOverrides,
    pub loaded_at_startup: bool,
}

/// An archive that has been opened and understood, not yet built into a handler.
pub struct Prepared {
    pub spec: ModelSpec,
    archive: OpenedArchive,
    /// The model's weights, config and tokenizer: the archive itself, or for a GGUF
    /// model the HF-layout folder converted from it.
    model_files: Arc<dyn ModelFiles>,
}

/// Steps 1–3: everything short of reading weights. Blocking (a `.tar.gz` is unpacked).
pub fn prepare(state: &AppState, request: &LoadRequest) -> Result<Prepared> {
    let config = state.config();
    let path = state.store().resolve(&request.url)?;
    let archive = archive::open(&path, &config.cache_dir, &ArchiveLimits::default())?;
    let manifest = &archive.manifest.model;
    let handler: HandlerKind =
        manifest
            .handler
            .parse()
            .map_err(|e: spillway_handlers::HandlerError| {
                let hint = if manifest.handler.ends_with(".py") {
                    " (custom Python handlers are never executed; archive with a built-in handler)"
                } else {
                    ""
                };
                Error::bad_archive(&path, format!("{e}{hint}"))
            })?;
    let name = request
        .name
        .clone()
        .unwrap_or_else(|| manifest.model_name.clone());
    check_name(&name)?;
    let yaml =
        match &manifest.config_file {
            Some(file) => Some(archive.files.read(file)?.ok_or_else(|| {
                Error::bad_archive(&path, format!("configFile {file} is missing"))
            })?),
            None => archive.files.read("model-config.yaml")?,
        };
    let yaml = yaml
        .map(String::from_utf8)
        .transpose()
        .map_err(|_| Error::bad_config("model-config.yaml", "not UTF-8"))?;
    let defaults = ModelDefaults {
        workers: config.default_workers_per_model,
        response_timeout: config.default_response_timeout,
    };
    let model_config = ModelConfig::parse(yaml.as_deref(), &request.overrides, defaults)?;
    let setup = SetupConfig::parse(archive.files.read("setup_config.json")?.as_deref())?;
    setup.load_options()?;
    let model_files = model_files(&archive, &setup, &config.cache_dir)?;
    let plan = if handler.needs_model_files() {
        let inventory = ModelInventory::read(&*model_files)?;
        let options = PlanOptions {
            batch_size: model_config.batch_size,
            max_length: None,
        };
        let plan = plan_model(&inventory, &setup, &options, &devices::probe())?;
        check_executable(&plan)?;
        Some((plan, inventory))
    } else {
        None
    };
    // Disk units of weights served in another dtype than stored are written once, converted,
    // into offload_folder (the planner has required it) and streamed from there.
    let (plan, model_files) = match plan {
        Some((plan, inventory)) => {
            let target = setup.load_options()?.dtype;
            let model_files = match (target, setup.offload_folder.as_ref()) {
                (Some(dtype), Some(root))
                    if plan.streamed_bytes_per_forward > 0 && converts(&inventory, dtype) =>
                {
                    let source = model_files.model_weights()?;
                    let converted = spillway_handlers::weights::offload::convert(
                        &source,
                        dtype,
                        std::path::Path::new(root),
                    )
                    .map_err(|e| Error::bad_archive(&archive.path, crate::error::chain(&e)))?;
                    tracing::info!(file = %converted.display(), "disk units converted into the offload folder");
                    Arc::new(spillway_handlers::weights::files::WithWeights::new(
                        model_files,
                        converted,
                    )) as Arc<dyn ModelFiles>
                }
                _ => model_files,
            };
            (Some(plan), model_files)
        }
        None => (None, model_files),
    };
    Ok(Prepared {
        spec: ModelSpec {
            name,
            version: manifest.model_version.clone(),
            url: request.url.clone(),
            handler,
            format: archive.format,
            job_queue_size: model_config.job_queue_size.unwrap_or(config.job_queue_size),
            config: model_config,
            setup,
            plan,
            loaded_at_startup: request.loaded_at_startup,
        },
        archive,
        model_files,
    })
}

/// The files a handler loads: the archive's, unless it holds a GGUF model and no
/// safetensors, which is then converted once (dequantized to `torch_dtype`, float32 by
/// default) into the offload folder — `offload_folder` from setup_config.json, else the
/// server's cache — and served from there.
fn model_files(
    archive: &OpenedArchive,
    setup: &SetupConfig,
    cache_dir: &std::path::Path,
) -> Result<Arc<dyn ModelFiles>> {
    let ggufs = archive.files.find(".gguf");
    let has_safetensors = [files::SINGLE_WEIGHTS, files::SHARD_INDEX]
        .into_iter()
        .map(|name| archive.files.locate(name))
        .collect::<std::result::Result<Vec<_>, _>>()?
        .iter()
        .any(Option::is_some);
    if has_safetensors || ggufs.is_empty() {
        return Ok(archive.files.clone());
    }
    let gguf = archive
        .manifest
        .model
        .serialized_file
        .clone()
        .filter(|f| f.ends_with(".gguf"))
        .unwrap_or_else(|| ggufs[0].clone());
    let root = setup
        .offload_folder
        .as_ref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache_dir.join("offload"));
    let dtype = setup
        .load_options()?
        .dtype
        .unwrap_or(spillway_handlers::DType::F32);
    let started = Instant::now();
    let folder = spillway_handlers::models::gguf::materialize(&*archive.files, &gguf, &root, dtype)
        .map_err(|e| Error::bad_archive(&archive.path, crate::error::chain(&e)))?;
    tracing::info!(gguf = %gguf, folder = %folder.display(), "GGUF ready in {:.2} s", started.elapsed().as_secs_f64());
    Ok(Arc::new(
        spillway_handlers::weights::files::FolderFiles::new(folder),
    ))
}

/// This build executes units on the CPU, resident or streamed from disk; a plan that
/// puts units on a GPU is refused with what it would need.
fn check_executable(plan: &Plan) -> Result<()> {
    let elsewhere: Vec<String> = plan
        .units
        .iter()
        .filter(|u| u.device != Device::CPU && u.device != Device::DISK)
        .map(|u| format!("{} on {}", u.name, u.device))
        .collect();
    if elsewhere.is_empty() {
        return Ok(());
    }
    Err(Error::bad_config(
        "setup_config.json",
        format!(
            "this build runs models on the CPU (and streams disk units through it), but the plan \
             places {} units on a GPU ({}{}); use device_map \"cpu\" or \"auto\"",
            elsewhere.len(),
            elsewhere
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if elsewhere.len() > 3 { ", ..." } else { "" }
        ),
    ))
}

/// Whether serving in `dtype` converts the checkpoint's floating-point weights.
fn converts(inventory: &ModelInventory, dtype: spillway_handlers::DType) -> bool {
    use spillway_handlers::DType;
    use spillway_placement::TensorDType;
    let stored = match inventory.stored_dtype() {
        Some(TensorDType::F32) => DType::F32,
        Some(TensorDType::F16) => DType::F16,
        Some(TensorDType::BF16) => DType::BF16,
        Some(TensorDType::F64) => DType::F64,
        _ => return false,
    };
    stored != dtype
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "model name `{name}` may hold only letters, digits, '-', '_' and '.'"
        )))
    }
}

/// Step 4: reads the weights and builds the handler where the plan says. Blocking. A
/// failure here is the archive's (weights that disagree with config.json, a broken
/// tokenizer), so it is reported with its whole cause.
pub fn build(prepared: &Prepared) -> Result<Arc<dyn Handler>> {
    let mut options = prepared.spec.setup.load_options()?;
    options.plan = prepared.spec.plan.clone();
    spillway_handlers::load(prepared.spec.handler, &*prepared.model_files, &options)
        .map_err(|e| Error::bad_archive(&prepared.archive.path, crate::error::chain(&e)))
}

/// Registers and loads a model. With `synchronous`, returns once it serves (or failed,
/// in which case it is unregistered again); otherwise returns once it is registered and
/// loads it in the background.
pub async fn register(
    state: &AppState,
    request: LoadRequest,
    synchronous: bool,
) -> Result<Arc<ModelHandle>> {
    let prepared = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || prepare(&state, &request))
            .await
            .map_err(|e| Error::Internal(format!("archive task failed: {e}")))??
    };
    let handle = ModelHandle::new(prepared.spec.clone());
    state.registry().insert(handle.clone())?;
    let load = {
        let handle = handle.clone();
        async move {
            let started = Instant::now();
            let built = tokio::task::spawn_blocking(move || build(&prepared))
                .await
                .map_err(|e| Error::Internal(format!("load task failed: {e}")))
                .and_then(|r| r);
            let result = built.and_then(|handler| handle.set_ready(handler, started.elapsed()));
            match &result {
                Ok(()) => tracing::info!(
                    model = %handle.spec.name, version = %handle.spec.version,
                    "loaded in {:.3} s", started.elapsed().as_secs_f64()
                ),
                Err(e) => {
                    tracing::error!(model = %handle.spec.name, error = %e.chain(), "load failed");
                    handle.set_failed(e.chain());
                }
            }
            result
        }
    };
    if synchronous {
        if let Err(e) = load.await {
            let _ = state
                .registry()
                .remove(&handle.spec.name, Some(&handle.spec.version));
            return Err(e);
        }
    } else {
        tokio::spawn(load);
    }
    Ok(handle)
}
