//! Times the text_embedding handler on a model folder: `cargo run --release -p
//! spillway-handlers --example embed_timing -- MODEL_DIR [BATCH...]`.

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
    let handler = spillway_handlers::load(
        HandlerKind::TextEmbedding,
        &FolderFiles::new(&dir),
        &LoadOptions::default(),
    )?;
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
