//! The `spillway` command: `serve` runs the server, `archive` packs a model archive.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use spillway::archiver::{self, ArchiveSpec, OutputFormat};
use spillway::config::{Overrides, ServerConfig};

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
    Serve(ServeArgs),
    /// Pack a model folder into an archive (what torch-model-archiver writes).
    Archive(ArchiveArgs),
    /// Show where every layer of a model would live, before reading any weight.
    Plan(PlanArgs),
}

#[derive(Args)]
struct PlanArgs {
    /// An archive (.mar, .tar.gz), a model folder, a config.json, or a model id
    /// (`org/name`) in the HuggingFace cache.
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
struct ServeArgs {
    /// Folder of model archives [default: ./model-store].
    #[arg(long, env = "SPILLWAY_MODEL_STORE")]
    model_store: Option<PathBuf>,
    /// Models to load at start-up: `all`, or `NAME=ARCHIVE,...` / `ARCHIVE,...` [default: all].
    #[arg(long, env = "SPILLWAY_MODELS")]
    models: Option<String>,
    /// TorchServe config.properties to read.
    #[arg(long, env = "SPILLWAY_TS_CONFIG")]
    ts_config: Option<PathBuf>,
    /// [default: 127.0.0.1:8080]
    #[arg(long, env = "SPILLWAY_INFERENCE_ADDRESS")]
    inference_address: Option<String>,
    /// [default: 127.0.0.1:8081]
    #[arg(long, env = "SPILLWAY_MANAGEMENT_ADDRESS")]
    management_address: Option<String>,
    /// [default: 127.0.0.1:8082]
    #[arg(long, env = "SPILLWAY_METRICS_ADDRESS")]
    metrics_address: Option<String>,
    /// Workers per model when its model-config.yaml names none [default: 1].
    #[arg(long, env = "SPILLWAY_DEFAULT_WORKERS_PER_MODEL")]
    default_workers_per_model: Option<usize>,
    /// Queued requests per model before 503 [default: 100].
    #[arg(long, env = "SPILLWAY_JOB_QUEUE_SIZE")]
    job_queue_size: Option<usize>,
    /// Largest request body in bytes [default: 6553500].
    #[arg(long, env = "SPILLWAY_MAX_REQUEST_SIZE")]
    max_request_size: Option<usize>,
    /// Largest response body in bytes [default: 6553500].
    #[arg(long, env = "SPILLWAY_MAX_RESPONSE_SIZE")]
    max_response_size: Option<usize>,
    /// Bearer token for the management API (required when it is off loopback).
    #[arg(long, env = "SPILLWAY_MANAGEMENT_TOKEN", hide_env_values = true)]
    management_token: Option<String>,
    /// Bearer token for the inference API.
    #[arg(long, env = "SPILLWAY_INFERENCE_TOKEN", hide_env_values = true)]
    inference_token: Option<String>,
    /// Where archives that cannot be mapped in place are unpacked [default: ~/.cache/spillway].
    #[arg(long, env = "SPILLWAY_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Threads for HTTP and queues; model compute runs on its own threads [default: cores/2, at least 2].
    #[arg(long, env = "SPILLWAY_IO_THREADS")]
    io_threads: Option<usize>,
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
    /// The model folder (weights, config.json, tokenizer.json, ...).
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Archive(args) => archive(args),
        Command::Plan(args) => plan(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig::resolve(Overrides {
        ts_config: args.ts_config,
        model_store: args.model_store,
        models: args.models,
        inference_address: args.inference_address,
        management_address: args.management_address,
        metrics_address: args.metrics_address,
        default_workers_per_model: args.default_workers_per_model,
        job_queue_size: args.job_queue_size,
        max_request_size: args.max_request_size,
        max_response_size: args.max_response_size,
        management_token: args.management_token,
        inference_token: args.inference_token,
        cache_dir: args.cache_dir,
        io_threads: args.io_threads,
    })?;
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

fn archive(args: ArchiveArgs) -> anyhow::Result<()> {
    let spec = ArchiveSpec {
        model_name: args.model_name,
        version: args.version,
        handler: args.handler.parse()?,
        model_dir: args.model_dir,
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
    use spillway::placement::{ModelInventory, PlanOptions, plan_model};
    use spillway::setup_config::SetupConfig;

    let model = &if !args.model.exists()
        && let Some(id) = args.model.to_str()
        && let Some(snapshot) = spillway::placement::hf_cache_snapshot(id, args.revision.as_deref())
    {
        snapshot
    } else {
        args.model.clone()
    };
    let (inventory, mut setup) = if model.is_file()
        && model.extension().is_some_and(|e| e == "json")
    {
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model)?)?;
        (
            ModelInventory::from_config(&config)?,
            SetupConfig::default(),
        )
    } else {
        let files: std::sync::Arc<dyn spillway_handlers::ModelFiles> = if model.is_dir()
            && !model.join(spillway::manifest::MANIFEST_PATH).is_file()
        {
            std::sync::Arc::new(spillway_handlers::weights::files::FolderFiles::new(model))
        } else {
            let cache = args
                .cache_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("spillway-plan"));
            spillway::archive::open(model, &cache, &spillway::archive::ArchiveLimits::default())?
                .files
        };
        let setup = SetupConfig::parse(files.read("setup_config.json")?.as_deref())?;
        (ModelInventory::read(&*files)?, setup)
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
    let options = PlanOptions {
        batch_size: args.batch_size,
        max_length: args.max_length,
    };
    let plan = plan_model(&inventory, &setup, &options, &spillway::devices::probe())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", spillway_placement::explain::table(&plan));
    }
    Ok(())
}
