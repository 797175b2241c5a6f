//! Times the text_embedding handler on a model folder: `cargo run --release -p
//! spillway-handlers --example embed_timing -- MODEL_DIR [BATCH...]`.
//!
//! `SPILLWAY_EMBED_DTYPE` (f32, bf16, f16) picks the dtype the model runs in; with
//! `SPILLWAY_EMBED_REFS` naming a JSON file of `sentences` and reference `embeddings`
//! (../shared/refs/minilm_dev_refs.json), it also prints the smallest cosine of its
//! embeddings to them.

use std::time::Instant;

use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::{HandlerKind, LoadOptions, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main; no other thread exists yet.
    #[allow(unsafe_code)]
    unsafe {
        spillway_handlers::cpu::threads::run_elementwise_ops_on_the_calling_thread()
    };
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: embed_timing MODEL_DIR [BATCH...]")?;
    let batches: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let batches = if batches.is_empty() {
        vec![1, 8, 32]
    } else {
        batches
    };
    let dtype = match std::env::var("SPILLWAY_EMBED_DTYPE").as_deref() {
        Ok("bf16") => Some(spillway_handlers::DType::BF16),
        Ok("f16") => Some(spillway_handlers::DType::F16),
        Ok("f32") | Err(_) => None,
        Ok(other) => return Err(format!("SPILLWAY_EMBED_DTYPE {other}: f32, bf16 or f16").into()),
    };
    let handler = spillway_handlers::load(
        HandlerKind::TextEmbedding,
        &FolderFiles::new(&dir),
        &LoadOptions {
            dtype,
            ..LoadOptions::default()
        },
    )?;
    if let Ok(path) = std::env::var("SPILLWAY_EMBED_REFS") {
        let refs: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let sentences: Vec<String> = serde_json::from_value(refs["sentences"].clone())?;
        let want: Vec<Vec<f32>> = serde_json::from_value(refs["embeddings"].clone())?;
        let input = handler.prepare(Request::Texts(sentences))?;
        let Ok(spillway_handlers::Output::Embeddings(got)) = handler.run(&[input])?.remove(0)
        else {
            return Err("the handler answered no embeddings".into());
        };
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = got
            .iter()
            .zip(&want)
            .map(|(g, w)| g.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() / (norm(g) * norm(w)))
            .fold(f32::INFINITY, f32::min);
        println!("cosine {cosine:.6}");
    }
    let sentence = "The quick brown fox jumps over the lazy dog near the river bank today.";
    for batch in batches {
        // Tokenized once, as the server does before queueing: this times the worker's part.
        let input = vec![handler.prepare(Request::Texts(vec![sentence.to_string(); batch]))?];
        for _ in 0..3 {
            handler.run(&input)?;
        }
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                handler.run(&input).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        println!("batch {batch:>3}: median {:.2} ms", times[times.len() / 2]);
    }
    Ok(())
}
