//! Times Spillway's quantized matmul (`cpu::quantized::QuantizedMatrix`: its own kernels for
//! Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, candle's block dot products for the k-quants, all on the bytes
//! where they are and on Spillway's thread team) against candle's (`QMatMul`: activations
//! quantized per row to the format's Q8 type, then integer dot products; for Q4_K and Q6_K
//! on AVX-512 VNNI a repacked copy of the weights), the starting point issue 17 names, and
//! against the f32 matmul Spillway runs on dequantized weights, on SmolLM2-135M's projection
//! shapes. It also checks the quantized product against dequantize-then-f32.
//!
//! `cargo run --release -p spillway-handlers --example quantized_matmul_timing [--features mkl] [-- RUNS]`
//!
//! Threads: candle's quantized matmul runs on candle's own pool, sized by `CANDLE_NUM_THREADS`.
//! This repository's `.cargo/config.toml` sets it to 1 (the binary does too); run with
//! `CANDLE_NUM_THREADS=2` to see two threads. Prints one line per format and shape: median ms
//! for 1 row (a decode step) and for 128 rows (a prompt), Spillway's, candle's and f32, the weight bytes each
//! reads, and the largest difference from the dequantized product relative to its largest
//! value.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use spillway_handlers::cpu::quantized::QuantizedMatrix;

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(51);
    let cpu = Device::Cpu;
    println!(
        "CANDLE_NUM_THREADS={}; median of {runs}",
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    println!(
        "{:<6} {:>11} {:>10} {:>10} {:>10} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "format",
        "out x in",
        "ours 1 row",
        "candle 1",
        "f32 1 row",
        "ours 128",
        "candle 128",
        "f32 128",
        "q MiB",
        "f32 MiB",
        "rel err"
    );
    // SmolLM2-135M: hidden 576, intermediate 1536 (up: 576 -> 1536, down: 1536 -> 576); the
    // k-quants need inputs in multiples of 256, so they are timed on the down projection only.
    // The output head (49152 x 576) is SmolLM2's largest matrix (Q8_0 in its Q4_1 GGUF).
    let shapes = [(1536usize, 576usize), (576, 1536), (49152, 576)];
    let formats = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    for format in formats {
        for (out, inp) in shapes {
            if inp % format.block_size() != 0 {
                continue;
            }
            let weight = (Tensor::randn(0f32, 1., (out, inp), &cpu)? * 0.02)?;
            let quantized = QTensor::quantize(&weight, format)?;
            let dequantized = quantized.dequantize(&cpu)?;
            let q_bytes = quantized.storage_size_in_bytes();
            let ours =
                QuantizedMatrix::new(format, out, inp, Arc::new(quantized.data()?.into_owned()))?;
            let qmatmul = QMatMul::from_qtensor(quantized)?;
            let f32_t = dequantized.t()?;
            let mut row = [0.0; 7];
            for (slot, rows) in [(0usize, 1usize), (3, 128)] {
                let x = Tensor::randn(0f32, 1., (rows, inp), &cpu)?;
                row[slot] = median_ms(runs, || {
                    let _ = ours.forward(&x).expect("Spillway's quantized matmul");
                });
                row[slot + 1] = median_ms(runs, || {
                    let _ = qmatmul.forward(&x).expect("candle's quantized matmul");
                });
                row[slot + 2] = median_ms(runs, || {
                    let _ = x.matmul(&f32_t).expect("f32 matmul");
                });
                if rows == 128 {
                    let got = ours.forward(&x)?;
                    let want = x.matmul(&f32_t)?;
                    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    row[6] = f64::from(diff / scale);
                }
            }
            println!(
                "{:<6} {:>11} {:>10.4} {:>10.4} {:>10.4} {:>11.3} {:>11.3} {:>11.3} {:>9.2} {:>9.2} {:>9.2e}",
                format!("{format:?}"),
                format!("{out}x{inp}"),
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                q_bytes as f64 / (1 << 20) as f64,
                (out * inp * 4) as f64 / (1 << 20) as f64,
                row[6]
            );
        }
    }
    Ok(())
}
