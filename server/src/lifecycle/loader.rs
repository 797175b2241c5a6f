//! How a model is built, step by step; the supervisor (`lifecycle::supervisor`) decides
//! when. [`open`] opens the archive inside the store (checked), reads the manifest and
//! both configs — so a bad archive or config is refused at once. [`admit`] reads the
//! tensor headers and has the device manager admit the model: its plan within the
//! pools, its bytes leased, the models to evict for it (an [`Admission`], which rolls
//! back when dropped). [`build`], on a blocking thread: a GGUF model converted (and then
//! admitted), the evictions carried out, disk units in another dtype written to the
//! offload folder, the weights read and the handler built.

use std::sync::Arc;
use std::time::Instant;

use spillway_handlers::weights::files;
use spillway_handlers::{Handler, HandlerKind, LoadOptions, ModelFiles};
use spillway_placement::{Device, DeviceRequest, Plan};

use super::Lifecycle;
use super::model::{ModelHandle, ModelSpec};
use super::phase::LoadStage;
use crate::config::ServerConfig;
use crate::config::model_config::{ModelConfig, ModelConfigOverrides, ModelDefaults};
use crate::config::setup_config::{Quantization, SetupConfig};
use crate::devices::manager::{Admission, AdmitError};
use crate::devices::placement::{ModelInventory, PlanOptions, plan_model, prefix_cache_budget};
use crate::error::{Error, Result};
use crate::store::archive::{self, ArchiveLimits, OpenedArchive};
use crate::store::hub::ModelRef;
use crate::store::{FileKey, ModelStore};
use spillway_placement::ledger::ModelKey;

/// A registration request (from the management API or the start-up list).
#[derive(Debug, Clone, Default)]
pub struct LoadRequest {
    pub url: String,
    pub name: Option<String>,
    /// The handler a model from the HF cache runs (an archive names its own).
    pub handler: Option<HandlerKind>,
    pub overrides: ModelConfigOverrides,
    pub loaded_at_startup: bool,
}

/// An archive that has been opened and understood, not yet converted, planned or built.
pub struct Opened {
    pub spec: ModelSpec,
    pub source: Source,
}

/// What a model is built from; kept by its handle, so an evicted model can be built
/// again on its next request.
#[derive(Clone)]
pub struct Source {
    archive: OpenedArchive,
    /// What the handler is told, from setup_config.json (the plan is added when made).
    options: LoadOptions,
    /// A GGUF file or PyTorch checkpoint to convert (its model is planned after
    /// conversion).
    convert: Option<ToConvert>,
    /// What the model asks of the device manager (setup_config.json `device`).
    request: Option<DeviceRequest>,
    /// The archive as it was opened (`store::archive_key`).
    opened_as: Option<FileKey>,
    /// The model in the HF cache it was registered as (`org/name`), if not an archive
    /// of the store.
    hub: Option<ModelRef>,
}

impl Source {
    /// The archive it was opened from.
    pub fn path(&self) -> &std::path::Path {
        &self.archive.path
    }

    /// Whether the archive file is no longer the one it was opened from.
    pub fn archive_changed(&self) -> bool {
        crate::store::archive_key(&self.archive.path) != self.opened_as
    }

    /// The archive opened again as it is now (its entries and weights may have moved),
    /// keeping what the model was registered with: its setup options and device
    /// request. A model from the HF cache is opened as a cached snapshot again, never
    /// looked for in the store. Blocking (a `.tar.gz` is unpacked).
    pub fn reopen(&self, config: &ServerConfig, handler: HandlerKind) -> Result<Source> {
        let path = &self.archive.path;
        let opened_as = crate::store::archive_key(path);
        let archive = match &self.hub {
            Some(_) => archive::open_folder_as(path, self.archive.manifest.clone()),
            None => archive::open(path, &config.cache_dir, &ArchiveLimits::default())?,
        };
        let convert = match handler.needs_model_files() {
            true => to_convert(&archive)?,
            false => None,
        };
        Ok(Source {
            archive,
            options: self.options.clone(),
            convert,
            request: self.request.clone(),
            opened_as,
            hub: self.hub.clone(),
        })
    }
}

/// A built model, ready to serve.
pub struct Loaded {
    pub handler: Arc<dyn Handler>,
    /// Its plan and the device bytes it holds (models with weights), committed when it
    /// serves.
    pub admission: Option<Admission>,
}

/// Opens the archive and reads its manifest and configs: everything short of touching
/// the weights. Blocking (a `.tar.gz` is unpacked).
pub fn open(config: &ServerConfig, store: &ModelStore, request: &LoadRequest) -> Result<Opened> {
    let (path, archive, hub) = match crate::store::hub::cached_snapshot(store, &request.url)? {
        Some((model, snapshot)) => {
            let manifest = crate::store::hub::manifest_for(&model, &snapshot, request.handler)?;
            let archive = archive::open_folder_as(&snapshot, manifest);
            (snapshot, archive, Some(model))
        }
        None => {
            let path = store.resolve(&request.url)?;
            let archive = archive::open(&path, &config.cache_dir, &ArchiveLimits::default())?;
            (path, archive, None)
        }
    };
    let opened_as = crate::store::archive_key(&path);
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
    let mut setup = SetupConfig::parse(archive.files.read("setup_config.json")?.as_deref())?;
    let mut options = setup.load_options()?;
    if let Some(quantization) = setup.quantization()?
        && handler != HandlerKind::TextGeneration
    {
        return Err(Error::bad_config(
            "setup_config.json",
            format!(
                "{} quantizes a decoder's block matrices at load: it applies to \
                 text_generation models, not {handler:?}",
                quantization.asked_by
            ),
        ));
    }
    options.handler_config = model_config.handler.clone();
    // setup_config.json's `device`, else model-config.yaml's deviceType/deviceIds.
    let device_request = match setup.device_request()? {
        Some(request) => Some(request),
        None => model_config.device_request()?,
    };
    // Planned later from the tensor headers ([`admit`]), a GGUF model or a PyTorch
    // checkpoint once converted.
    let convert = match handler.needs_model_files() {
        true => to_convert(&archive)?,
        false => None,
    };
    // The server's default format, for a generator that asks for none and has float
    // blocks (not a GGUF kept in its quantized blocks).
    let quantized_gguf = matches!(convert, Some(ToConvert::Gguf(_))) && options.dtype.is_none();
    if let Some(format) = &config.quantize
        && handler == HandlerKind::TextGeneration
        && !quantized_gguf
    {
        setup.quantize_by_default(format);
    }
    Ok(Opened {
        spec: ModelSpec {
            name,
            version: manifest.model_version.clone(),
            url: request.url.clone(),
            handler,
            format: archive.format,
            job_queue_size: model_config.job_queue_size.unwrap_or(config.job_queue_size),
            config: model_config,
            setup,
            loaded_at_startup: request.loaded_at_startup,
        },
        source: Source {
            archive,
            options,
            convert,
            request: device_request,
            opened_as,
            hub,
        },
    })
}

impl Opened {
    /// Whether its tensors can be planned now, from the headers (safetensors; a GGUF
    /// model is planned once converted, a model without weights never).
    pub fn plans_at_registration(&self) -> bool {
        self.spec.handler.needs_model_files()
            && self.source.convert.is_none()
            && !self.spec.setup.quantizes()
    }

    /// The model files to plan from.
    pub fn files(&self) -> &dyn ModelFiles {
        &*self.source.archive.files
    }

    /// What it asks of the device manager.
    pub fn device_request(&self) -> &Option<DeviceRequest> {
        &self.source.request
    }
}

/// Reads the tensor headers of `files` and has the device manager admit them: the plan
/// within the pools, its bytes leased, and the models to evict for it. `None` when it
/// fits only by evicting others (or once busy models leave) and `may_evict` is false:
/// a start-up model is then registered unloaded, planned against the whole budget when
/// its first request loads it.
pub fn admit(
    lifecycle: &Lifecycle,
    key: &ModelKey,
    request: &Option<DeviceRequest>,
    may_evict: bool,
    files: &dyn ModelFiles,
    setup: &SetupConfig,
    config: &ModelConfig,
) -> Result<Option<Admission>> {
    let inventory = ModelInventory::read(files)?;
    let options = PlanOptions {
        batch_size: config.batch_size,
        max_length: None,
    };
    let busy = |model: &ModelKey| lifecycle.busy(model);
    let admission = lifecycle
        .devices()
        .admit(key, request, may_evict, &busy, |machine| {
            let plan = plan_model(&inventory, setup, &options, machine)?;
            check_executable(&plan)?;
            Ok::<_, Error>(plan)
        });
    match admission {
        Ok(admission) => Ok(Some(admission)),
        Err(AdmitError::WouldEvict) => Ok(None),
        Err(AdmitError::Plan(e)) => Err(e),
        Err(AdmitError::Refused(refusal)) => Err(Error::NoRoom {
            model: key.to_string(),
            refusal,
        }),
    }
}

/// Converts, admits and builds the model from `source`, telling `handle` each stage;
/// `admission` is `None` where the model is admitted as it loads (a GGUF model, or an
/// evicted one coming back); then `may_evict` says whether it may make room by evicting
/// others (a start-up model may not: `None` is returned, and it waits for its first
/// request). The evictions are carried out before the weights are read. Blocking.
pub fn build(
    lifecycle: &Lifecycle,
    handle: &ModelHandle,
    source: Source,
    admission: Option<Admission>,
    may_evict: bool,
) -> Result<Option<Loaded>> {
    let spec = &handle.spec;
    let Source {
        archive,
        mut options,
        convert,
        request,
        ..
    } = source;
    if !spec.handler.needs_model_files() {
        handle.set_stage(LoadStage::Building);
        let handler = spillway_handlers::load(spec.handler, &*archive.files, &options)
            .map_err(Error::load(&archive.path))?;
        return Ok(Some(Loaded {
            handler,
            admission: None,
        }));
    }
    let key = handle.key();
    let (model_files, mut admission) = match admission {
        Some(admission) => (archive.files.clone(), admission),
        // A GGUF model or a PyTorch checkpoint is converted first; an evicted model coming
        // back is planned anew.
        None => {
            let cache = &lifecycle.config().cache_dir;
            let files = match convert {
                Some(convert) => {
                    handle.set_stage(LoadStage::Converting);
                    converted(&archive, &convert, &options, &spec.setup, cache)?
                }
                None => archive.files.clone(),
            };
            let files = match spec.setup.quantization()? {
                Some(quantization) => {
                    handle.set_stage(LoadStage::Converting);
                    quantized(files, &quantization, options.dtype, &spec.setup, cache)
                        .map_err(Error::load(&archive.path))?
                }
                None => files,
            };
            handle.set_stage(LoadStage::Planning);
            let admitted = admit(
                lifecycle,
                &key,
                &request,
                may_evict,
                &*files,
                &spec.setup,
                &spec.config,
            )?;
            let Some(admission) = admitted else {
                return Ok(None);
            };
            (files, admission)
        }
    };
    if !admission.evictions().is_empty() {
        handle.set_stage(LoadStage::Evicting);
        lifecycle.evict(&admission.evict_now());
    }
    let plan = admission.plan().clone();
    // Disk units of weights served in another dtype than stored are written once,
    // converted, into offload_folder (the planner has required it) and streamed from there.
    let converts_weights = |dtype| {
        ModelInventory::read(&*model_files).is_ok_and(|inventory| converts(&inventory, dtype))
    };
    let model_files = match (options.dtype, spec.setup.offload_folder.as_ref()) {
        (Some(dtype), Some(root))
            if plan.streamed_bytes_per_forward > 0 && converts_weights(dtype) =>
        {
            handle.set_stage(LoadStage::Offloading);
            let source = model_files
                .model_weights()
                .map_err(Error::load(&archive.path))?;
            let converted = spillway_handlers::weights::offload::convert(
                &source,
                dtype,
                std::path::Path::new(root),
            )
            .map_err(Error::load(&archive.path))?;
            tracing::info!(file = %converted.display(), "disk units converted into the offload folder");
            Arc::new(files::WithWeights::new(model_files, converted)) as Arc<dyn ModelFiles>
        }
        _ => model_files,
    };
    handle.set_stage(LoadStage::Building);
    options.plan = Some(plan);
    let plan_options = PlanOptions {
        batch_size: spec.config.batch_size,
        max_length: None,
    };
    options.prefix_cache_bytes = match ModelInventory::read(&*model_files) {
        Ok(inventory) => prefix_cache_budget(&inventory, &spec.setup, &plan_options)?,
        Err(_) => 0,
    };
    let handler = crate::devices::building_weights(|| {
        spillway_handlers::load(spec.handler, &*model_files, &options)
    })
    .map_err(Error::load(&archive.path))?;
    Ok(Some(Loaded {
        handler,
        admission: Some(admission),
    }))
}

/// The GGUF file to convert, when the archive holds a GGUF model and no safetensors.
/// A serialized checkpoint converted once before it is planned and served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToConvert {
    /// llama.cpp's GGUF.
    Gguf(String),
    /// A PyTorch state dict (`torch.save`: `.pth`, `.pt`, `pytorch_model.bin`).
    TorchPickle(String),
}

fn to_convert(archive: &OpenedArchive) -> Result<Option<ToConvert>> {
    to_convert_in(
        &*archive.files,
        archive.manifest.model.serialized_file.as_deref(),
    )
}

/// What of `files` must be converted before it is served: a GGUF (see [`gguf_in`]),
/// else a PyTorch checkpoint (see [`pickle_in`]); `None` for safetensors models.
pub fn to_convert_in(
    files: &dyn ModelFiles,
    serialized_file: Option<&str>,
) -> Result<Option<ToConvert>> {
    if let Some(gguf) = gguf_in(files, serialized_file)? {
        return Ok(Some(ToConvert::Gguf(gguf)));
    }
    Ok(pickle_in(files, serialized_file)?.map(ToConvert::TorchPickle))
}

/// The PyTorch checkpoint of `files` to serve, when they hold no safetensors:
/// `serialized_file` when it names one (TorchServe's `--serialized-file
/// densenet161-8d451a50.pth`), else the first `.pth`, `.pt` or `pytorch_model.bin`.
pub fn pickle_in(files: &dyn ModelFiles, serialized_file: Option<&str>) -> Result<Option<String>> {
    if has_safetensors(files)? {
        return Ok(None);
    }
    let pickled = |name: &str| [".pth", ".pt", ".bin"].iter().any(|s| name.ends_with(s));
    if let Some(named) = serialized_file.filter(|f| pickled(f)) {
        return Ok(Some(named.to_string()));
    }
    Ok([".pth", ".pt", "pytorch_model.bin"]
        .iter()
        .find_map(|suffix| files.find(suffix).into_iter().next()))
}

fn has_safetensors(files: &dyn ModelFiles) -> Result<bool> {
    Ok([files::SINGLE_WEIGHTS, files::SHARD_INDEX]
        .into_iter()
        .map(|name| files.locate(name))
        .collect::<std::result::Result<Vec<_>, _>>()?
        .iter()
        .any(Option::is_some))
}

/// The GGUF file of `files` to serve, when they hold a GGUF model and no safetensors:
/// `serialized_file` when it names one, else the first `.gguf` found.
pub fn gguf_in(files: &dyn ModelFiles, serialized_file: Option<&str>) -> Result<Option<String>> {
    let ggufs = files.find(".gguf");
    if has_safetensors(files)? || ggufs.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serialized_file
            .filter(|f| f.ends_with(".gguf"))
            .map(str::to_string)
            .unwrap_or_else(|| ggufs[0].clone()),
    ))
}

/// A model's files with its serialized checkpoint converted once into the offload
/// folder — `offload_folder` from setup_config.json, else the server's cache — and served
/// from there: a GGUF's quantized tensors kept in their blocks (`torch_dtype` unset or
/// `"auto"`), or dequantized to the `torch_dtype` given; a PyTorch state dict's tensors
/// as they are, beside the archive's other files.
fn converted(
    archive: &OpenedArchive,
    convert: &ToConvert,
    options: &LoadOptions,
    setup: &SetupConfig,
    cache_dir: &std::path::Path,
) -> Result<Arc<dyn ModelFiles>> {
    match convert {
        ToConvert::Gguf(gguf) => {
            converted_gguf(&*archive.files, gguf, options.dtype, setup, cache_dir)
        }
        ToConvert::TorchPickle(name) => {
            converted_pickle(archive.files.clone(), name, setup, cache_dir)
        }
    }
    .map_err(Error::load(&archive.path))
}

fn offload_root(setup: &SetupConfig, cache_dir: &std::path::Path) -> std::path::PathBuf {
    setup
        .offload_folder
        .as_ref()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| cache_dir.join("offload"))
}

/// [`converted`] for a PyTorch checkpoint of any model files (`spillway plan` plans it
/// from its copy too).
pub fn converted_pickle(
    files: Arc<dyn ModelFiles>,
    name: &str,
    setup: &SetupConfig,
    cache_dir: &std::path::Path,
) -> std::result::Result<Arc<dyn ModelFiles>, spillway_handlers::HandlerError> {
    let started = Instant::now();
    let folder = spillway_handlers::weights::pickle::materialize(
        &*files,
        name,
        &offload_root(setup, cache_dir),
    )?;
    tracing::info!(checkpoint = %name, folder = %folder.display(), "PyTorch checkpoint ready as safetensors in {:.2} s", started.elapsed().as_secs_f64());
    Ok(Arc::new(files::ConvertedWeights {
        weights: files::FolderFiles::new(folder),
        rest: files,
    }))
}

/// `files` with their float checkpoint's block matrices quantized as `quantization`
/// asks, written once into the offload folder (`offload_folder`, else the server's
/// cache) and served from there; the other float tensors in `dtype` (`None`: as
/// stored). `spillway plan` plans from the same copy.
pub fn quantized(
    files: Arc<dyn ModelFiles>,
    quantization: &Quantization,
    dtype: Option<spillway_handlers::DType>,
    setup: &SetupConfig,
    cache_dir: &std::path::Path,
) -> std::result::Result<Arc<dyn ModelFiles>, spillway_handlers::HandlerError> {
    use spillway_handlers::weights::quantize::{nothing_to_quantize, quantize};
    let started = Instant::now();
    let source = files.model_weights()?;
    let quantized = quantize(
        &source,
        quantization.format,
        dtype,
        &offload_root(setup, cache_dir),
    )?;
    let Some((file, count)) = quantized else {
        // The server's default passes over what it cannot quantize; a model that asked
        // is refused, never served in float with the key set.
        if quantization.is_server_default() {
            tracing::info!("nothing to quantize at load: served as it is");
            return Ok(files);
        }
        return Err(nothing_to_quantize(quantization.format));
    };
    tracing::info!(file = %file.display(), matrices = count, "{} in {:.2} s", quantization.describe(), started.elapsed().as_secs_f64());
    Ok(Arc::new(files::WithWeights::new(files, file)))
}

/// [`converted`] for a GGUF of any model files (`spillway plan` plans a GGUF from its copy).
pub fn converted_gguf(
    files: &dyn ModelFiles,
    gguf: &str,
    dtype: Option<spillway_handlers::DType>,
    setup: &SetupConfig,
    cache_dir: &std::path::Path,
) -> std::result::Result<Arc<dyn ModelFiles>, spillway_handlers::HandlerError> {
    let started = Instant::now();
    let root = offload_root(setup, cache_dir);
    let folder = spillway_handlers::models::gguf::materialize(files, gguf, &root, dtype)?;
    tracing::info!(gguf = %gguf, folder = %folder.display(), "GGUF ready in {:.2} s", started.elapsed().as_secs_f64());
    Ok(Arc::new(files::FolderFiles::new(folder)))
}

/// Every unit of `plan` must be on a device this process can run: the CPU, disk (streamed
/// through the plan's stream device) or a GPU the driver shows. A plan naming a GPU that is
/// not there (a CPU build, no driver, `CUDA_VISIBLE_DEVICES`) is refused with the reason.
fn check_executable(plan: &Plan) -> Result<()> {
    let gpus = crate::devices::gpus();
    let usable = |device: &Device| {
        device.kind != spillway_placement::DeviceType::Cuda
            || gpus.found().iter().any(|g| g.ordinal == device.ordinal)
    };
    let streams_to_missing_gpu = !usable(&plan.stream_device);
    let missing: Vec<String> = plan
        .units
        .iter()
        .filter_map(|u| {
            if !usable(&u.device) {
                Some(format!("{} on {}", u.name, u.device))
            } else if u.device == Device::DISK && streams_to_missing_gpu {
                Some(format!("{} streamed to {}", u.name, plan.stream_device))
            } else {
                None
            }
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let why = gpus.unavailable().map(str::to_string).unwrap_or_else(|| {
        let shown: Vec<String> = gpus
            .found()
            .iter()
            .map(|g| format!("cuda:{}", g.ordinal))
            .collect();
        format!("the driver shows only {}", shown.join(", "))
    });
    Err(Error::bad_config(
        "setup_config.json",
        format!(
            "the plan places {} units on a GPU this process cannot use ({}{}): {why}; use \
             device_map \"cpu\" or \"auto\"",
            missing.len(),
            missing
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if missing.len() > 3 { ", ..." } else { "" }
        ),
    ))
}

/// Whether serving in `dtype` converts the checkpoint's floating-point weights.
fn converts(inventory: &ModelInventory, dtype: spillway_handlers::DType) -> bool {
    inventory
        .stored_dtype()
        .and_then(spillway_handlers::candle_dtype)
        .is_some_and(|stored| stored != dtype)
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

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_placement::{PlacedUnit, UnitKind};

    fn plan(units: &[(&str, Device)], stream_device: Device) -> Plan {
        Plan {
            strategy: "auto".into(),
            units: units
                .iter()
                .map(|(name, device)| PlacedUnit {
                    name: name.to_string(),
                    bytes: 1,
                    device: *device,
                    kind: UnitKind::Post,
                    tied: vec![],
                })
                .collect(),
            devices: vec![],
            stream_device,
            streamed_bytes_per_forward: 0,
            notes: vec![],
        }
    }

    /// CPU and disk plans run; any unit that would compute on a GPU the driver does not
    /// show (here `cuda:N`, N the number it shows: none on a machine without GPUs) is
    /// named in the refusal, with the reason.
    #[test]
    fn plans_that_compute_on_a_missing_gpu_are_refused_naming_the_units_and_why() {
        let gpus = crate::devices::gpus();
        let absent = Device::cuda(gpus.found().len());
        let why = gpus.unavailable().unwrap_or("the driver shows only");
        let cpu_disk = plan(&[("a", Device::CPU), ("b", Device::DISK)], Device::CPU);
        assert!(check_executable(&cpu_disk).is_ok());
        let idle_stream = plan(&[("a", Device::CPU)], absent);
        assert!(
            check_executable(&idle_stream).is_ok(),
            "no disk unit streams to the GPU"
        );
        for (units, named) in [
            (
                vec![("a", absent), ("b", Device::CPU)],
                format!("a on {absent}"),
            ),
            (
                vec![("a", Device::CPU), ("b", Device::DISK)],
                format!("b streamed to {absent}"),
            ),
        ] {
            let err = check_executable(&plan(&units, absent)).expect_err("refused");
            let message = err.to_string();
            assert!(
                message.contains(&named) && message.contains(why),
                "{message}"
            );
        }
    }
}
