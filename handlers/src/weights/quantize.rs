//! In-situ quantization (mistral.rs' `--isq`, accelerate's `load_in_8bit` /
//! `load_in_4bit`): a float checkpoint's block matrices quantized once into GGML blocks
//! and written to the offload folder as safetensors the quantized kernels read in place
//! (`U8 [rows, bytes per row]` with `ggml.<name>` in the metadata, the layout of a
//! converted GGUF), keyed by the source's fingerprint and the format so a restart maps
//! it again. Written tensor by tensor (the peak memory is one float tensor and its
//! blocks, never the state dict), each tensor's rows quantized on all threads.
//!
//! [`format_for`] is the pure choice of what each tensor becomes; [`quantize`] the I/O.

use std::path::{Path, PathBuf};

pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::offload::{self, PlannedTensor};
use crate::error::CandleContext;
use crate::{HandlerError, WeightSource};

/// The formats a checkpoint can be quantized to, by the names `setup_config.json`'s
/// `quantization` takes (llama.cpp's type names, lower case).
pub const FORMATS: [(&str, GgmlDType); 10] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// The format named `name` (`"q4_k"`, also `"q4k"` and upper case).
pub fn format_named(name: &str) -> Option<GgmlDType> {
    let wanted = name.to_ascii_lowercase().replace('_', "");
    FORMATS
        .iter()
        .find(|(n, _)| n.replace('_', "") == wanted)
        .map(|&(_, f)| f)
}

/// The name of `format` as [`FORMATS`] spells it.
pub fn format_name(format: GgmlDType) -> String {
    FORMATS.iter().find(|(_, f)| *f == format).map_or_else(
        || format!("{format:?}").to_lowercase(),
        |(n, _)| n.to_string(),
    )
}

/// What tensor `name` of `shape` becomes when the checkpoint is quantized to `format`:
/// the decoder blocks' matrices (`model.layers.N.*.weight`, two dimensions) `format`,
/// the output head Q6_K, or Q8_0 when `format` is Q8_0 (llama.cpp's choice: the head is
/// the most sensitive matrix) — `lm_head.weight`, or the token embeddings where they are
/// the head too (`tied`: the checkpoint has no `lm_head.weight`); a matrix whose rows
/// are not whole blocks of its k-quant falls back as llama.cpp's does (Q4_K to Q5_0,
/// Q5_K to Q5_1, Q6_K to Q8_0; 32 values a block). `None`
/// keeps the tensor as it is: untied embeddings, norms, biases, a mixture's router and
/// whatever else.
pub fn format_for(name: &str, shape: &[usize], format: GgmlDType, tied: bool) -> Option<GgmlDType> {
    let &[_, cols] = shape else {
        return None;
    };
    let head = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
    let wanted = if head {
        match format {
            GgmlDType::Q8_0 => GgmlDType::Q8_0,
            _ => GgmlDType::Q6K,
        }
    } else if name.starts_with("model.layers.")
        && name.ends_with(".weight")
        && !name.ends_with(".gate.weight")
    {
        format
    } else {
        return None;
    };
    [wanted, fallback(wanted)]
        .into_iter()
        .find(|f| cols.is_multiple_of(f.block_size()))
}

/// The 32-value-block format llama.cpp's quantizer takes for rows that are not whole
/// 256-value blocks of a k-quant (Q2_K and Q3_K: its IQ4_NL, which candle lacks; Q4_0
/// is as many bits).
fn fallback(format: GgmlDType) -> GgmlDType {
    match format {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    }
}

/// Version of the quantized file's layout, part of its key.
const LAYOUT: u32 = 1;

/// `source` with its block matrices quantized to `format` (see [`format_for`]) and its
/// other floating-point tensors in `dtype` (`None`: as stored), written once into
/// `root`; returns the file and how many tensors were quantized, or `None` when no
/// tensor is one to quantize (see [`nothing_to_quantize`]).
pub fn quantize(
    source: &WeightSource,
    format: GgmlDType,
    dtype: Option<DType>,
    root: &Path,
) -> Result<Option<(PathBuf, usize)>, HandlerError> {
    let target = match dtype {
        Some(dtype) => format!("{}-{dtype:?}", format_name(format)).to_lowercase(),
        None => format_name(format),
    };
    let key = format!(
        "{}-isq{LAYOUT}",
        offload::source_fingerprint_as(source, &target)?
    );
    let names = source.tensor_names();
    let tied = !names.iter().any(|n| n == "lm_head.weight");
    let planned: Vec<PlannedTensor> = names
        .into_iter()
        .filter_map(|name| {
            let info = source.info(&name)?;
            let stored = DType::try_from(info.dtype).ok()?;
            let quantized = stored
                .is_float()
                .then(|| format_for(&name, &info.shape, format, tied))
                .flatten();
            Some(match quantized {
                Some(ggml) => PlannedTensor {
                    shape: vec![
                        info.shape[0],
                        info.shape[1] / ggml.block_size() * ggml.type_size(),
                    ],
                    dtype: DType::U8,
                    ggml: Some(ggml),
                    name,
                },
                None => PlannedTensor {
                    dtype: match (stored.is_float(), dtype) {
                        (true, Some(dtype)) => dtype,
                        _ => stored,
                    },
                    shape: info.shape.clone(),
                    ggml: source.ggml_type(&name),
                    name,
                },
            })
        })
        .collect();
    let count = planned
        .iter()
        .filter(|t| t.ggml.is_some() && source.ggml_type(&t.name).is_none())
        .count();
    if count == 0 {
        return Ok(None);
    }
    let dir = offload::folder(root, &key, "model.safetensors", |staging| {
        offload::write_streaming(&staging.join("model.safetensors"), &planned, |t| {
            let converted = match t.ggml {
                Some(ggml) if source.ggml_type(&t.name).is_none() => source
                    .load(&t.name, DType::F32, &Device::Cpu)
                    .and_then(|w| quantized_rows(&w, ggml)),
                _ => source.load(&t.name, t.dtype, &Device::Cpu),
            };
            converted.context(|| format!("cannot quantize {}", t.name))
        })
    })?;
    Ok(Some((dir.join("model.safetensors"), count)))
}

/// Why a checkpoint asked to be quantized to `format` could not be: [`quantize`] found
/// nothing to quantize in it.
pub fn nothing_to_quantize(format: GgmlDType) -> HandlerError {
    HandlerError::Unsupported(format!(
        "quantization to {}: no tensor of this checkpoint is a float matrix of a decoder \
         block (`model.layers.N.*.weight`): GPT-2, BLOOM and GPT-NeoX checkpoints are not \
         quantized at load, and a GGUF's blocks are quantized already (give torch_dtype \
         to dequantize them first)",
        format_name(format)
    ))
}

/// The float matrix `w` `[rows, cols]` as GGML blocks of `format`, `U8 [rows, bytes per
/// row]`; its rows split among the threads (a block never spans rows, so the bytes are
/// those of quantizing it whole).
fn quantized_rows(w: &Tensor, format: GgmlDType) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let row_bytes = cols / format.block_size() * format.type_size();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let per = rows.div_ceil(threads);
    // Candle quantizes a tensor's whole storage: each thread gets its rows' own.
    let values = w.flatten_all()?.to_vec1::<f32>()?;
    let values = values.as_slice();
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .step_by(per.max(1))
            .map(|start| {
                let take = per.min(rows - start);
                scope.spawn(move || -> candle_core::Result<Vec<u8>> {
                    let part = Tensor::from_slice(
                        &values[start * cols..(start + take) * cols],
                        (take, cols),
                        &Device::Cpu,
                    )?;
                    Ok(QTensor::quantize(&part, format)?.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| candle_core::bail!("quantizing a tensor panicked"))
            })
            .collect::<candle_core::Result<Vec<_>>>()
    })?;
    let bytes: Vec<u8> = parts.concat();
    Tensor::from_vec(bytes, (rows, row_bytes), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_matrices_take_the_format_the_head_llama_cpp_s_and_the_rest_stay() {
        let f = |name: &str, shape: &[usize]| format_for(name, shape, GgmlDType::Q4K, false);
        let q = "model.layers.3.self_attn.q_proj.weight";
        assert_eq!(f(q, &[512, 512]), Some(GgmlDType::Q4K));
        assert_eq!(
            f(q, &[576, 576]),
            Some(GgmlDType::Q5_0),
            "576 is no whole number of 256-value blocks"
        );
        assert_eq!(
            format_for("lm_head.weight", &[1000, 576], GgmlDType::Q4K, false),
            Some(GgmlDType::Q8_0),
            "the head's Q6_K falls back to Q8_0"
        );
        assert_eq!(f(q, &[100, 100]), None, "nor of 32");
        assert_eq!(f("lm_head.weight", &[1000, 512]), Some(GgmlDType::Q6K));
        assert_eq!(
            format_for("lm_head.weight", &[1000, 512], GgmlDType::Q8_0, false),
            Some(GgmlDType::Q8_0)
        );
        assert_eq!(
            format_for(
                "model.embed_tokens.weight",
                &[1000, 512],
                GgmlDType::Q4K,
                true
            ),
            Some(GgmlDType::Q6K),
            "tied embeddings are the head"
        );
        for kept in [
            ("model.embed_tokens.weight", &[1000, 512][..]),
            ("model.layers.0.input_layernorm.weight", &[512][..]),
            ("model.layers.0.self_attn.q_proj.bias", &[512][..]),
            ("model.layers.0.mlp.gate.weight", &[8, 512][..]),
            ("model.norm.weight", &[512][..]),
        ] {
            assert_eq!(f(kept.0, kept.1), None, "{}", kept.0);
        }
        assert_eq!(
            f("model.layers.0.mlp.experts.3.gate_proj.weight", &[64, 512]),
            Some(GgmlDType::Q4K)
        );
    }

    #[test]
    fn formats_are_named_as_llama_cpp_names_them() {
        assert_eq!(format_named("q4_k"), Some(GgmlDType::Q4K));
        assert_eq!(format_named("Q4K"), Some(GgmlDType::Q4K));
        assert_eq!(format_named("q8_0"), Some(GgmlDType::Q8_0));
        assert_eq!(format_named("nf4"), None);
        for (name, format) in FORMATS {
            assert_eq!(format_name(format), name);
        }
    }

    #[test]
    fn a_checkpoint_with_no_block_matrix_to_quantize_is_found_so_and_told_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let device = Device::Cpu;
        // GPT-2's names: its blocks live under `transformer.h`.
        let tensors: std::collections::HashMap<String, Tensor> = [
            "transformer.h.0.attn.c_attn.weight",
            "transformer.wte.weight",
        ]
        .into_iter()
        .map(|n| {
            let t = Tensor::zeros((32, 64), DType::F32, &device).expect("zeros");
            (n.to_string(), t)
        })
        .collect();
        candle_core::safetensors::save(&tensors, &path).expect("save");
        let source = WeightSource::open(&path).expect("source");
        let found =
            quantize(&source, GgmlDType::Q8_0, None, &dir.path().join("offload")).expect("read");
        assert_eq!(found, None, "nothing to quantize");
        let said = nothing_to_quantize(GgmlDType::Q8_0).to_string();
        assert!(said.contains("quantization to q8_0: no tensor"), "{said}");
    }

    fn out_head(file: &Path) -> Option<GgmlDType> {
        WeightSource::open(file).ok()?.ggml_type("lm_head.weight")
    }

    /// The quantized file holds the block matrices as candle's quantization of them
    /// (read back through the quantized kernels' reader, dequantized) and everything
    /// else as it was; it is written once.
    #[test]
    fn quantizes_once_and_reads_back_the_blocks_candle_makes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (48, 256), &device).expect("q");
        let norm = Tensor::randn(0f32, 1.0, 256, &device).expect("norm");
        let embed = Tensor::randn(0f32, 1.0, (10, 256), &device).expect("embed");
        let tensors: std::collections::HashMap<String, Tensor> = [
            ("model.layers.0.self_attn.q_proj.weight", q.clone()),
            ("model.layers.0.input_layernorm.weight", norm.clone()),
            ("model.embed_tokens.weight", embed.clone()),
            ("lm_head.weight", embed.clone()),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        candle_core::safetensors::save(&tensors, &path).expect("save");
        let source = WeightSource::open(&path).expect("source");
        let root = dir.path().join("offload");
        for format in [GgmlDType::Q4K, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let (file, count) = quantize(&source, format, None, &root)
                .expect("quantize")
                .expect("matrices to quantize");
            assert_eq!(count, 2, "the block's matrix and the head");
            let head = match format {
                GgmlDType::Q8_0 => GgmlDType::Q8_0,
                _ => GgmlDType::Q6K,
            };
            assert_eq!(out_head(&file), Some(head));
            let out = WeightSource::open(&file).expect("open");
            let name = "model.layers.0.self_attn.q_proj.weight";
            assert_eq!(out.ggml_type(name), Some(format));
            let read = out
                .quantized(name)
                .expect("read")
                .expect("quantized")
                .dequantize(&device)
                .expect("dequantize");
            let expected = QTensor::quantize(&q, format)
                .and_then(|t| t.dequantize(&device))
                .expect("candle");
            let diff: f32 = (read - expected)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar())
                .expect("diff");
            assert_eq!(diff, 0.0, "{format:?}: the same blocks");
            for (kept, original) in [
                ("model.layers.0.input_layernorm.weight", &norm),
                ("model.embed_tokens.weight", &embed),
            ] {
                assert_eq!(out.ggml_type(kept), None);
                let back = out.load(kept, DType::F32, &device).expect("load");
                let same = back
                    .eq(original)
                    .and_then(|e| e.min_all())
                    .and_then(|e| e.to_scalar::<u8>())
                    .expect("eq");
                assert_eq!(same, 1, "{kept} unchanged");
            }
            let modified = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .expect("mtime");
            let (again, _) = quantize(&source, format, None, &root)
                .expect("again")
                .expect("matrices to quantize");
            assert_eq!(again, file);
            assert_eq!(
                std::fs::metadata(&again)
                    .and_then(|m| m.modified())
                    .expect("mtime"),
                modified,
                "not written again"
            );
        }
    }
}
