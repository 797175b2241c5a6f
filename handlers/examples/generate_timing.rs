//! Times the text_generation handler all in RAM: the forward pass over a 128-token
//! prompt (prefill) and greedy decoding of 32 tokens after it.
//!
//! `cargo run --release -p spillway-handlers --example generate_timing -- MODEL [RUNS] [ROWS...]`,
//! where MODEL is a HuggingFace-layout folder or a `.gguf` file (converted once in
//! `$TMPDIR/spillway-offload`: dequantized to float32, or with `GGUF_WEIGHTS=quantized`
//! kept in its blocks as the server does by default). Prints the converted folder (so a
//! reference implementation can load the same weights), then medians:
//! `prefill_ms`, `decode_ms_per_token`, `decode_tokens_per_s`; for each ROWS given, the
//! median time of one decode step that advances that many sequences together
//! (`decode_step_ms_rows_N`, continuous batching's step). `PREFILL_ONLY=1` times the
//! prefills alone (no decoding: what a profile of prompt processing wants).

use std::path::{Path, PathBuf};
use std::time::Instant;

use spillway_handlers::GenerateParameters;
use spillway_handlers::tasks::text_generation::TextGeneration;
use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::{DType, LoadOptions};

const PROMPT_TOKENS: usize = 128;
const NEW_TOKENS: usize = 32;

fn folder_of(model: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if model.extension().is_some_and(|e| e == "gguf") {
        let dir = model.parent().ok_or("the .gguf file has no folder")?;
        let name = model
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or("bad name")?;
        let offload = std::env::temp_dir().join("spillway-offload");
        Ok(spillway_handlers::models::gguf::materialize(
            &FolderFiles::new(dir),
            name,
            &offload,
            match std::env::var("GGUF_WEIGHTS").as_deref() {
                Ok("quantized") => None,
                _ => Some(DType::F32),
            },
        )?)
    } else {
        Ok(model.to_path_buf())
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main; no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        spillway_handlers::cpu::threads::run_elementwise_ops_on_the_calling_thread()
    };
    let mut args = std::env::args().skip(1);
    let model = PathBuf::from(args.next().ok_or("usage: generate_timing MODEL [RUNS]")?);
    let runs: usize = args
        .next()
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(5)
        .max(1);
    let row_counts: Vec<usize> = args.map(|r| r.parse()).collect::<Result<_, _>>()?;
    let folder = folder_of(&model)?;
    println!("folder {}", folder.display());
    let handler = TextGeneration::load(&FolderFiles::new(&folder), &LoadOptions::default())?;
    let text = "The history of the river valley is long and full of change. ".repeat(12);
    let mut prompt = handler.encode(&text)?;
    if prompt.len() < PROMPT_TOKENS {
        return Err("the prompt text is too short".into());
    }
    prompt.truncate(PROMPT_TOKENS);
    let parameters = GenerateParameters {
        max_new_tokens: NEW_TOKENS + 1,
        ignore_eos: true,
        ..GenerateParameters::default()
    };
    let prefill_only = std::env::var("PREFILL_ONLY").is_ok_and(|v| v == "1");
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        let mut sequence = handler.begin_tokens(prompt.clone(), &parameters)?;
        let started = Instant::now();
        handler.advance(&mut [&mut sequence])?;
        let first = started.elapsed().as_secs_f64() * 1e3;
        if prefill_only {
            prefill.push(first);
            continue;
        }
        let started = Instant::now();
        while !sequence.finished() {
            handler.advance(&mut [&mut sequence])?;
        }
        let rest = started.elapsed().as_secs_f64() * 1e3;
        let produced = sequence.token_ids().len() - 1;
        if produced != NEW_TOKENS {
            return Err(format!("decoded {produced} tokens, not {NEW_TOKENS}").into());
        }
        if run > 0 {
            prefill.push(first);
            decode.push(rest / NEW_TOKENS as f64);
        }
    }
    if prefill_only {
        println!("prefill_ms {:.2}", median(prefill));
        return Ok(());
    }
    let (prefill, decode) = (median(prefill), median(decode));
    println!("prefill_ms {prefill:.2}");
    println!("decode_ms_per_token {decode:.2}");
    println!("decode_tokens_per_s {:.2}", 1e3 / decode);
    for rows in row_counts {
        let mut sequences = (0..rows)
            .map(|_| handler.begin_tokens(prompt.clone(), &parameters))
            .collect::<Result<Vec<_>, _>>()?;
        for sequence in &mut sequences {
            handler.advance(&mut [sequence])?;
        }
        let mut steps = Vec::new();
        while !sequences[0].finished() {
            let mut batch: Vec<_> = sequences.iter_mut().collect();
            let started = Instant::now();
            handler.advance(&mut batch)?;
            steps.push(started.elapsed().as_secs_f64() * 1e3);
        }
        println!("decode_step_ms_rows_{rows} {:.2}", median(steps));
    }
    Ok(())
}
