//! Times the image_classifier handler on a model folder (safetensors, or a `.pth`
//! converted first): `cargo run --release -p spillway-handlers --example image_timing --
//! MODEL_DIR IMAGE [BATCH...]`. Prints the median time of a batch's forward pass (decoding
//! and preprocessing excluded, as the server does them before queueing) and, with
//! `SPILLWAY_VISION_PROFILE=1`, the time each kind of op took over all the runs.

use std::time::Instant;

use spillway_handlers::weights::files::{ConvertedWeights, FolderFiles};
use spillway_handlers::{HandlerKind, LoadOptions, ModelFiles, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: image_timing MODEL_DIR IMAGE [BATCH...]";
    let dir = args.next().ok_or(usage)?;
    let image = std::fs::read(args.next().ok_or(usage)?)?;
    let batches: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let batches = if batches.is_empty() {
        vec![1, 4]
    } else {
        batches
    };
    let folder = FolderFiles::new(&dir);
    let offload = std::env::temp_dir().join("spillway-image-timing");
    let files: Box<dyn ModelFiles> = match folder.find(".pth").first() {
        Some(pth) if folder.find("model.safetensors").is_empty() => {
            let converted =
                spillway_handlers::weights::pickle::materialize(&folder, pth, &offload)?;
            Box::new(ConvertedWeights {
                weights: FolderFiles::new(converted),
                rest: std::sync::Arc::new(folder),
            })
        }
        _ => Box::new(folder),
    };
    let handler = spillway_handlers::load(
        HandlerKind::ImageClassifier,
        &*files,
        &LoadOptions::default(),
    )?;
    println!("{}", handler.info().architecture.unwrap_or_default());
    for batch in batches {
        let input = vec![handler.prepare(Request::Images(vec![image.clone(); batch]))?];
        handler.run(&input)?;
        spillway_handlers::models::vision::graph::profile::reset();
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                handler.run(&input).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "batch {batch:>3}: median {median:.1} ms ({:.1} ms an image)",
            median / batch as f64
        );
        for (op, ms) in spillway_handlers::models::vision::graph::profile::totals() {
            println!("    {op:<12} {:>8.1} ms a run", ms / times.len() as f64);
        }
    }
    Ok(())
}
