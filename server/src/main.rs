//! The `spillway` command: `serve` runs the server, `archive` packs a model archive.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use spillway::cli::archiver::{self, ArchiveSpec, OutputFormat};
use spillway::config::{LogFormat, Overrides, ServerConfig};

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "A TorchServe-compatible model server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a model store.
    Serve(Box<Overrides>),
    /// Pack a model folder into an archive (what torch-model-archiver writes).
    Archive(ArchiveArgs),
    /// Show where every layer of a model would live, before reading any weight.
    Plan(PlanArgs),
    /// Fetch a model from the Hugging Face Hub into the local HF cache (HF_HOME,
    /// HF_ENDPOINT honoured): `org/name` or `org/name@revision`.
    Pull {
        /// `org/name[@revision]`.
        model: String,
    },
}

#[derive(Args)]
struct PlanArgs {
    /// An archive (.mar, .tar.gz), a model folder, a .gguf file, a config.json, or a
    /// model id (`org/name`) in the HuggingFace cache. A GGUF is planned from the copy
    /// the server would serve (written once under --cache-dir or `offload_folder`).
    model: PathBuf,
    /// Revision of a HuggingFace-cache model id [default: main].
    #[arg(long)]
    revision: Option<String>,
    /// "auto", "balanced", "balanced_low_0", "sequential", a device ("cpu", "cuda:0",
    /// "disk"), layer counts ("0:16;1:16") or a JSON map {"module": "device"}.
    #[arg(long)]
    device_map: Option<String>,
    /// JSON such as '{"0": "10GiB", "cpu": "30GiB"}'.
    #[arg(long)]
    max_memory: Option<String>,
    /// float32, float16, bfloat16 or auto.
    #[arg(long)]
    dtype: Option<String>,
    /// Quantize the block matrices at load (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k,
    /// q4_k, q5_k, q6_k), as setup_config's `quantization`: planned from the quantized
    /// copy the server would serve (written once under --cache-dir or `offload_folder`).
    #[arg(long)]
    quantize: Option<String>,
    /// Tokens per sequence to reserve activations and KV cache for.
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Print the plan as JSON (the structure describe shows).
    #[arg(long)]
    json: bool,
    /// Where archives that cannot be mapped in place are unpacked.
    #[arg(long, env = "SPILLWAY_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ArchiveArgs {
    #[arg(long)]
    model_name: String,
    #[arg(long, default_value = "1.0")]
    version: String,
    /// A built-in handler: text_embedding, echo.
    #[arg(long)]
    handler: String,
    /// The model folder (weights, config.json, tokenizer.json, ...), or a model id
    /// (`org/name[@revision]`) in the HF cache (`spillway pull`).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// model-config.yaml to include.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// More files for the archive root, comma separated (e.g. setup_config.json).
    #[arg(long, value_delimiter = ',')]
    extra_files: Vec<PathBuf>,
    /// zip-store (default), default (deflated .mar), tgz or no-archive.
    #[arg(long, default_value = "zip-store")]
    archive_format: String,
    #[arg(long, default_value = ".")]
    export_path: PathBuf,
    /// Overwrite an existing archive.
    #[arg(long)]
    force: bool,
}

fn main() -> std::process::ExitCode {
    // SAFETY: first thing in main; no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        spillway_handlers::cpu::threads::run_elementwise_ops_on_the_calling_thread()
    };
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Archive(args) => {
            spillway::telemetry::logging::init(LogFormat::Text);
            with_progress("spillway archive", || archive(args))
        }
        Command::Plan(args) => {
            spillway::telemetry::logging::init(LogFormat::Text);
            with_progress("spillway plan", || plan(args))
        }
        Command::Pull { model } => {
            spillway::telemetry::logging::init(LogFormat::Text);
            pull(&model)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command's work with a progress bar on a terminal (for work over a second).
fn with_progress<R>(label: &str, work: impl FnOnce() -> R) -> R {
    use spillway_handlers::weights::progress::{self, Progress};
    progress::with(&Progress::for_terminal(label), work)
}

fn serve(overrides: Overrides) -> anyhow::Result<()> {
    let config = ServerConfig::resolve(overrides)?;
    spillway::telemetry::logging::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.io_threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listeners = spillway::Listeners::bind(&config).await?;
        spillway::run(config, listeners, spillway::shutdown::signal()).await
    })?;
    Ok(())
}

fn pull(model: &str) -> anyhow::Result<()> {
    let model: spillway::store::hub::ModelRef = model.parse()?;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let snapshot = spillway::cli::pull::pull(&model, terminal)?;
    println!("{}", snapshot.display());
    Ok(())
}

fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
    let spec = ArchiveSpec {
        model_name: args.model_name,
        version: args.version,
        handler: args.handler.parse()?,
        // A model id (`org/name[@revision]`) pulled into the HF cache stands for its folder.
        model_dir: args.model_dir.map(|dir| {
            let id = dir.to_str().filter(|_| !dir.exists());
            id.and_then(|id| id.parse::<spillway::store::hub::ModelRef>().ok())
                .and_then(|m| {
                    spillway::devices::placement::hf_cache_snapshot(&m.id, Some(&m.revision))
                })
                .unwrap_or(dir)
        }),
        config_file: args.config_file,
        extra_files: args.extra_files,
        format: args.archive_format.parse::<OutputFormat>()?,
        export_path: args.export_path,
        force: args.force,
    };
    let path = archiver::write(&spec)?;
    println!("{}", path.display());
    Ok(())
}

fn plan(args: PlanArgs) -> anyhow::Result<()> {
    use spillway::config::setup_config::SetupConfig;
    use spillway::devices::placement::{ModelInventory, PlanOptions, plan_model};

    let model = &if !args.model.exists()
        && let Some(id) = args.model.to_str()
        && let Some(snapshot) =
            spillway::devices::placement::hf_cache_snapshot(id, args.revision.as_deref())
    {
        snapshot
    } else {
        args.model.clone()
    };
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("spillway-plan"));
    let is = |extension: &str| model.is_file() && model.extension().is_some_and(|e| e == extension);
    let (files, mut setup): (Option<std::sync::Arc<dyn spillway_handlers::ModelFiles>>, _) =
        if is("json") {
            (None, SetupConfig::default())
        } else {
            let folder =
                |dir: &std::path::Path| -> std::sync::Arc<dyn spillway_handlers::ModelFiles> {
                    std::sync::Arc::new(spillway_handlers::weights::files::FolderFiles::new(dir))
                };
            let files = if is("gguf") || is("pth") || is("pt") {
                folder(model.parent().unwrap_or(std::path::Path::new(".")))
            } else if model.is_dir()
                && !model
                    .join(spillway::store::manifest::MANIFEST_PATH)
                    .is_file()
            {
                folder(model)
            } else {
                spillway::store::archive::open(
                    model,
                    &cache,
                    &spillway::store::archive::ArchiveLimits::default(),
                )?
                .files
            };
            let setup = SetupConfig::parse(files.read("setup_config.json")?.as_deref())?;
            (Some(files), setup)
        };
    if let Some(map) = &args.device_map {
        setup.device_map = Some(
            serde_json::from_str(map).unwrap_or_else(|_| serde_json::Value::String(map.clone())),
        );
    }
    if let Some(max_memory) = &args.max_memory {
        let value: serde_json::Value = serde_json::from_str(max_memory).map_err(|e| {
            anyhow::anyhow!(
                "--max-memory must be a JSON object such as '{{\"cpu\": \"8GiB\"}}': {e}"
            )
        })?;
        setup.max_memory = value.as_object().cloned();
    }
    if let Some(dtype) = &args.dtype {
        setup.torch_dtype = Some(dtype.clone());
    }
    if let Some(format) = &args.quantize {
        setup
            .other
            .insert("quantization".into(), serde_json::json!(format));
    }
    // config.json as the server would read it: the decoder's spec is printed from it.
    let config: Option<serde_json::Value>;
    // An image network's recognized architecture, or why none was (weights only).
    let mut image: Option<String> = None;
    let json_of = |files: &dyn spillway_handlers::ModelFiles| -> Option<serde_json::Value> {
        let bytes = files.read("config.json").ok()??;
        serde_json::from_slice(&bytes).ok()
    };
    let inventory = match files {
        None => {
            let read: serde_json::Value = serde_json::from_slice(&std::fs::read(model)?)?;
            let inventory = ModelInventory::from_config(&read)?;
            config = Some(read);
            inventory
        }
        Some(files) => {
            // A GGUF or a PyTorch checkpoint is planned from the copy the server would
            // serve (written once into the offload folder, or the cache): a GGUF's
            // quantized blocks unless a dtype is asked.
            let named = (is("gguf") || is("pth") || is("pt"))
                .then(|| model.file_name())
                .flatten()
                .and_then(|n| n.to_str());
            use spillway::lifecycle::loader::{
                ToConvert, converted_gguf, converted_pickle, to_convert_in,
            };
            let served = match to_convert_in(&*files, named)? {
                Some(ToConvert::Gguf(gguf)) => {
                    let dtype = setup.load_options()?.dtype;
                    converted_gguf(&*files, &gguf, dtype, &setup, &cache)?
                }
                Some(ToConvert::TorchPickle(name)) => {
                    converted_pickle(files.clone(), &name, &setup, &cache)?
                }
                None => files.clone(),
            };
            let served = match setup.quantization()? {
                Some(quantization) => spillway::lifecycle::loader::quantized(
                    served,
                    &quantization,
                    setup.load_options()?.dtype,
                    &setup,
                    &cache,
                )?,
                None => served,
            };
            config = json_of(&*served);
            image = spillway_handlers::models::vision::describe(&*served);
            ModelInventory::read(&*served)?
        }
    };
    let options = PlanOptions {
        batch_size: args.batch_size,
        max_length: args.max_length,
    };
    let plan = plan_model(&inventory, &setup, &options, &spillway::devices::probe())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        // A decoder's or an encoder's parsed spec, or why its handler would refuse it.
        let model_type = config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(|t| t.as_str())
            .unwrap_or_default();
        use spillway_handlers::models::{decoder, encoder};
        if let Some(config) = &config {
            if decoder::families::served_model_types().contains(&model_type) {
                match decoder::DecoderSpec::from_config(config) {
                    Ok(spec) => println!("decoder: {}", spec.describe()),
                    Err(e) => println!("decoder: refused: {e}"),
                }
            } else if encoder::spec::served_model_types().contains(&model_type) {
                match encoder::EncoderSpec::from_config(config, "plan") {
                    Ok(spec) => println!("encoder: {}", spec.describe()),
                    Err(e) => println!("encoder: refused: {e}"),
                }
            }
        }
        if let Some(image) = &image {
            println!("image: {image}");
        }
        print!("{}", spillway_placement::explain::table(&plan));
    }
    Ok(())
}
