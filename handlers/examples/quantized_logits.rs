//! How far a quantized model's logits are from its float32 twin's, step by step, fed the
//! reference tokens (teacher forcing, so both see the same inputs at every step).
//!
//! `cargo run --release -p spillway-handlers --example quantized_logits -- QUANTIZED F32 REFS [CASES]`
//!
//! QUANTIZED and F32 are the folders `models::gguf::materialize` wrote for the same GGUF
//! (`generate_timing` prints them; `GGUF_WEIGHTS=quantized` for the first); REFS is
//! `../shared/refs/smollm2_dev_refs.json`. Per step it prints the reference token, each
//! model's greedy token and top-2 logit gap, and the largest logit difference. Where the
//! difference is larger than a step's top-2 gap, greedy decoding may part there: that is
//! what the activations' 8-bit rounding does, not a fault of one engine (docs/gguf.md).
//!
//! `--other FILE`: another engine's logits along the same tokens (little-endian f32,
//! cases × steps × vocabulary, as `bench/gguf.py` saves llama.cpp's) are compared with the
//! float32 twin's too, and a last line gives, as JSON, each case's mean over the steps of
//! the largest logit difference to float32, for the quantized model and for the other
//! engine: the bar `bench/gguf.py` holds the quantized model to.

use std::path::Path;

use candle_core::Tensor;
use spillway_handlers::models::decoder::{DecoderSpec, KvCache, MappedDecoder};
use spillway_handlers::weights::layer_stack::UnitPlacement;
use spillway_handlers::{DType, Device, WeightSource};

const STEPS: usize = 8;

fn load(dir: &Path) -> Result<MappedDecoder, Box<dyn std::error::Error>> {
    let config = DecoderSpec::from_config(&serde_json::from_slice(&std::fs::read(
        dir.join("config.json"),
    )?)?)?;
    let source = WeightSource::open(&dir.join("model.safetensors"))?;
    Ok(MappedDecoder::load(&source, &config, DType::F32, |_| {
        Ok(UnitPlacement::Resident(Device::Cpu))
    })?)
}

/// (index of the largest logit, its lead over the second).
fn top2(logits: &[f32]) -> (usize, f32) {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    (order[0], logits[order[0]] - logits[order[1]])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, quantized, dense, refs, rest @ ..] = args.as_slice() else {
        return Err("usage: quantized_logits QUANTIZED F32 REFS [CASES]".into());
    };
    let (cases, other) = match rest {
        [] => (4, None),
        [cases] => (cases.parse()?, None),
        [cases, flag, file] if flag == "--other" => (cases.parse()?, Some(std::fs::read(file)?)),
        _ => {
            return Err("usage: quantized_logits QUANTIZED F32 REFS [CASES [--other FILE]]".into());
        }
    };
    let other: Option<Vec<f32>> = other.map(|bytes| {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    });
    let largest_difference = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let mut summary = Vec::new();
    let refs: serde_json::Value = serde_json::from_slice(&std::fs::read(refs)?)?;
    let models = [load(Path::new(quantized))?, load(Path::new(dense))?];
    for (i, case) in refs["cases"]
        .as_array()
        .ok_or("no cases")?
        .iter()
        .take(cases)
        .enumerate()
    {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_token_ids"].clone())?;
        let want: Vec<u32> = serde_json::from_value(case["greedy_new_token_ids"].clone())?;
        let mut caches = [KvCache::default(), KvCache::default()];
        let mut input = prompt;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for (step, &next) in want.iter().enumerate().take(STEPS) {
            let tokens = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let mut logits = Vec::new();
            for (model, cache) in models.iter().zip(caches.iter_mut()) {
                logits.push(
                    model
                        .forward(&tokens, cache)?
                        .squeeze(0)?
                        .to_vec1::<f32>()?,
                );
            }
            let diff = largest_difference(&logits[0], &logits[1]);
            ours.push(diff);
            if let Some(other) = &other {
                let vocab = logits[1].len();
                let at = (i * STEPS + step) * vocab;
                let theirs_here = other
                    .get(at..at + vocab)
                    .ok_or("the other engine's logits end early")?;
                let d = largest_difference(theirs_here, &logits[1]);
                println!("prompt {i} step {step}: other engine's max |Δlogit| to f32 {d:.3}");
                theirs.push(d);
            }
            let (q, f) = (top2(&logits[0]), top2(&logits[1]));
            println!(
                "prompt {i} step {step}: ref {next} | quantized {} (gap {:.3}) | f32 {} (gap {:.3}) | max |Δlogit| {diff:.3}",
                q.0, q.1, f.0, f.1
            );
            input = vec![next];
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        summary.push(serde_json::json!({
            "case": i,
            "steps": ours.len(),
            "quantized_to_f32": mean(&ours),
            "other_to_f32": (!theirs.is_empty()).then(|| mean(&theirs)),
        }));
    }
    println!("{}", serde_json::Value::Array(summary));
    Ok(())
}
