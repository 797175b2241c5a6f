//! GGUF models (llama.cpp's format) made servable by the same device-mapped code as
//! safetensors checkpoints: [`materialize`] writes, once, a HuggingFace-layout folder —
//! `model.safetensors` (tensor names mapped to HF's, the Q/K row permutation of
//! llama.cpp's converter undone; quantized tensors kept in their GGML blocks as `U8`
//! rows, or dequantized when a dtype is asked for), `config.json`,
//! `tokenizer.json` (built from the `tokenizer.ggml.*` metadata) and
//! `tokenizer_config.json` (the chat template). The folder is keyed by a fingerprint of
//! the source, so a restart reuses it; tensors are written one at a time, so the peak
//! memory of the conversion is one tensor, never the state dict.

use std::collections::HashMap;
use std::io::Seek;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::CandleContext;
use crate::weights::files::RangeReader;
use crate::weights::offload::{self, PlannedTensor};
use crate::{HandlerError, ModelFiles};

/// Where a GGUF model's HF-layout copy lives, writing it if needed; returns the folder.
/// `dtype`: what to dequantize the weights to; `None` keeps quantized tensors in their
/// blocks (and other tensors in their stored types) for the quantized kernels.
pub fn materialize(
    files: &dyn ModelFiles,
    gguf: &str,
    offload_root: &Path,
    dtype: Option<DType>,
) -> Result<PathBuf, HandlerError> {
    let (path, range) = files
        .locate(gguf)?
        .ok_or_else(|| HandlerError::MissingFile(gguf.to_string()))?;
    let fingerprint = match dtype {
        Some(dtype) => offload::fingerprint(&path, &range, dtype)?,
        None => offload::fingerprint_as(&path, &range, "ggml")?,
    };
    let key = format!("{fingerprint}-v{CONVERSION}");
    offload::folder(offload_root, &key, "model.safetensors", |staging| {
        convert(&path, range.clone(), gguf, staging, dtype)
    })
}

/// Version of the converted folder's layout, part of its key: a change to what
/// [`materialize`] writes must not reuse folders written before it (2: `rope_scaling`
/// from `rope_freqs` and the GGUF rope metadata; 3: quantized tensors kept in blocks; 4:
/// `architectures` and `head_dim` from the key length; 5: Granite's multipliers and
/// OLMo 2's post-norms; 6: Gemma's norms less one, Gemma 2/3's scale, caps and
/// windows, Phi-3's fused tensors and partial rotary; 7: experts, tensors in the GGUF's
/// order).
const CONVERSION: u32 = 7;

/// A tensor of the converted checkpoint: the GGUF tensor it comes from, its HF name, how
/// its rows go back to the checkpoint's order, and which expert of a stack it is.
struct Mapped {
    gguf: String,
    hf: String,
    rows: Rows,
    expert: Option<usize>,
}

/// How a GGUF tensor's data goes back to the checkpoint's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    AsStored,
    /// llama.cpp's q/k permutation undone, for this many heads ([`unpermute`]).
    Unpermute(usize),
    /// BLOOM's and GPT-NeoX's fused qkv: llama.cpp's `[Q; K; V]` blocks back to the
    /// checkpoint's per-head `[q, k, v]` rows, for this many heads ([`interleave_qkv`]).
    InterleaveQkv(usize),
    /// GPT-2's Conv1D weights, which llama.cpp stores transposed to `[out, in]`, back to
    /// `[in, out]` (dequantized: GGML blocks run along a row and cannot be transposed).
    Transpose,
}

fn bad(reason: impl std::fmt::Display) -> HandlerError {
    HandlerError::bad_file("gguf", reason)
}

fn meta_u32(content: &Content, key: &str) -> Result<u32, HandlerError> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| bad(format!("metadata {key} is missing")))?
        .to_u32()
        .map_err(|e| bad(format!("{key}: {e}")))
}

fn meta_f32(content: &Content, key: &str) -> Option<f32> {
    content.metadata.get(key).and_then(|v| v.to_f32().ok())
}

/// Whether llama.cpp's converter permuted `arch`'s q/k rows: for the llama
/// architecture and the models it converts as Llama's subclasses (Granite).
fn permutes_qk(arch: &str) -> bool {
    matches!(arch, "llama" | "granite")
}

/// Whether llama.cpp's converter stored `arch`'s norm weights plus one (Gemma's norms
/// multiply by `1 + w`; llama.cpp's by the stored weight).
fn norms_plus_one(arch: &str) -> bool {
    matches!(arch, "gemma" | "gemma2" | "gemma3")
}

/// Where `arch`'s checkpoints keep a block's experts: the module (its router is
/// `<module>.gate`) and each expert's gate, up and down projections (Mixtral is the
/// llama architecture with experts).
fn moe_module(arch: &str) -> (&'static str, [&'static str; 3]) {
    match arch {
        "qwen3moe" => ("mlp.gate", ["gate_proj", "up_proj", "down_proj"]),
        _ => ("block_sparse_moe.gate", ["w1", "w3", "w2"]),
    }
}

/// The HF names of the experts a GGUF tensor holds, with each one's index in it:
/// `blk.N.ffn_{gate,up,down}_exps` holds all `experts` of block N stacked `[E, rows,
/// cols]` (as llama.cpp writes them now); `blk.N.ffn_{gate,up,down}.E` one (as it once
/// did). `None` for any other tensor.
fn expert_names(gguf: &str, arch: &str, experts: usize) -> Option<Vec<(String, Option<usize>)>> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, param) = tail.rsplit_once('.')?;
    let (router, [gate, up, down]) = moe_module(arch);
    let base = router.trim_end_matches(".gate");
    let which = |kind: &str| match kind {
        "ffn_gate" => Some(gate),
        "ffn_up" => Some(up),
        "ffn_down" => Some(down),
        _ => None,
    };
    let name = |e: usize, projection: &str| {
        format!("model.layers.{layer}.{base}.experts.{e}.{projection}.{param}")
    };
    if let Some(kind) = module.strip_suffix("_exps") {
        let projection = which(kind)?;
        return Some(
            (0..experts)
                .map(|e| (name(e, projection), Some(e)))
                .collect(),
        );
    }
    let (kind, e) = module.rsplit_once('.')?;
    let e: usize = e.parse().ok()?;
    Some(vec![(name(e, which(kind)?), None)])
}

/// The HF name of a GGUF tensor of architecture `arch`, and how its rows go back (q/k
/// un-permuted where llama.cpp permuted them).
fn hf_name(gguf: &str, arch: &str, heads: usize, kv_heads: usize) -> Option<(String, Rows)> {
    if matches!(arch, "gpt2" | "bloom" | "gptneox") {
        return legacy_hf_name(gguf, arch, heads);
    }
    let permuted = permutes_qk(arch);
    // Gemma 2 and 3: `ffn_norm` is the norm before the MLP, the one after attention is
    // `post_attention_norm`. Phi-3 keeps qkv and gate_up fused.
    let sandwich = matches!(arch, "gemma2" | "gemma3");
    let phi3 = arch == "phi3";
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), Rows::AsStored));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, param) = tail.rsplit_once('.')?;
    let (hf, unpermute) = match module {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" if sandwich => ("pre_feedforward_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_qkv" if phi3 => ("self_attn.qkv_proj", None),
        // A MoE block's router.
        "ffn_gate_inp" => (moe_module(arch).0, None),
        "ffn_up" if phi3 => ("mlp.gate_up_proj", None),
        // Gemma 2/3's and OLMo 2's norms after attention and after the MLP.
        "post_attention_norm" => ("post_attention_layernorm", None),
        "post_ffw_norm" => ("post_feedforward_layernorm", None),
        "attn_q" => ("self_attn.q_proj", permuted.then_some(heads)),
        "attn_k" => ("self_attn.k_proj", permuted.then_some(kv_heads)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        // Qwen 3's per-head qk-norm.
        "attn_q_norm" => ("self_attn.q_norm", None),
        "attn_k_norm" => ("self_attn.k_norm", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    // Biases are permuted like their weights' rows.
    let rows = unpermute.map_or(Rows::AsStored, Rows::Unpermute);
    Some((format!("model.layers.{layer}.{hf}.{param}"), rows))
}

/// The HF name of a tensor of the GPT-2, BLOOM or GPT-NeoX GGUFs llama.cpp's converter
/// writes (`gpt2`, `bloom`, `gptneox`): each family under its own prefix and names, a
/// fused qkv (GPT-2's already in `[q; k; v]` blocks, the others' per head in the
/// checkpoint), and GPT-2's Conv1D weights transposed.
fn legacy_hf_name(gguf: &str, arch: &str, heads: usize) -> Option<(String, Rows)> {
    let (prefix, blocks, embeddings, final_norm, head) = match arch {
        "gpt2" => ("transformer", "h", "wte", "ln_f", "lm_head"),
        "bloom" => ("transformer", "h", "word_embeddings", "ln_f", "lm_head"),
        _ => (
            "gpt_neox",
            "layers",
            "embed_in",
            "final_layer_norm",
            "embed_out",
        ),
    };
    let (module, param) = gguf.rsplit_once('.')?;
    let top = |name: &str| Some((format!("{prefix}.{name}.{param}"), Rows::AsStored));
    match module {
        "token_embd" => return top(embeddings),
        "position_embd" if arch == "gpt2" => return top("wpe"),
        "token_embd_norm" if arch == "bloom" => return top("word_embeddings_layernorm"),
        "output_norm" => return top(final_norm),
        "output" => return Some((format!("{head}.{param}"), Rows::AsStored)),
        _ => {}
    }
    let (layer, module) = module.strip_prefix("blk.")?.split_once('.')?;
    let weight = param == "weight";
    let (hf, rows) = match (arch, module) {
        ("gpt2", "attn_norm") => ("ln_1", Rows::AsStored),
        ("gpt2", "ffn_norm") => ("ln_2", Rows::AsStored),
        ("gpt2", conv) => {
            let hf = match conv {
                "attn_qkv" => "attn.c_attn",
                "attn_output" => "attn.c_proj",
                "ffn_up" => "mlp.c_fc",
                "ffn_down" => "mlp.c_proj",
                _ => return None,
            };
            (
                hf,
                if weight {
                    Rows::Transpose
                } else {
                    Rows::AsStored
                },
            )
        }
        (_, "attn_norm") => ("input_layernorm", Rows::AsStored),
        (_, "ffn_norm") => ("post_attention_layernorm", Rows::AsStored),
        (_, "ffn_up") => ("mlp.dense_h_to_4h", Rows::AsStored),
        (_, "ffn_down") => ("mlp.dense_4h_to_h", Rows::AsStored),
        ("bloom", "attn_qkv") => ("self_attention.query_key_value", Rows::InterleaveQkv(heads)),
        ("bloom", "attn_output") => ("self_attention.dense", Rows::AsStored),
        (_, "attn_qkv") => ("attention.query_key_value", Rows::InterleaveQkv(heads)),
        (_, "attn_output") => ("attention.dense", Rows::AsStored),
        _ => return None,
    };
    Some((format!("{prefix}.{blocks}.{layer}.{hf}.{param}"), rows))
}

/// config.json's `rope_scaling` for a GGUF model. llama.cpp's converter turns Llama 3.1's
/// banded `llama3` scaling into a `rope_freqs` tensor of per-frequency divisors, which
/// becomes `frequency_factors` here (see [`crate::models::decoder::spec::RopeSpec::inverse_frequencies`]);
/// `{arch}.rope.scaling.type` `linear` keeps its factor; Phi-3's `rope_factors_long` /
/// `rope_factors_short` tensors become `longrope`; other scalings (yarn, ...) are
/// refused rather than served with plain RoPE.
fn rope_scaling(
    content: &Content,
    reader: &mut RangeReader,
    arch: &str,
) -> Result<Option<serde_json::Value>, HandlerError> {
    let mut vector = |name: &str| {
        content
            .tensor(reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .weights_context(|| format!("cannot read {name} of the GGUF file"))
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let factors = vector("rope_freqs.weight")?;
        return Ok(Some(
            json!({"rope_type": "frequency_factors", "factors": factors}),
        ));
    }
    // Phi-3's LongRoPE as llama.cpp's converter writes it: the factors as two tensors,
    // the original context and the attention factor as keys. Served as transformers
    // runs it (a sequence takes the long factors once it outgrows the original
    // context), where llama.cpp picks one set for every sequence by its context size.
    let (long, short) = ("rope_factors_long.weight", "rope_factors_short.weight");
    let has = |t: &str| content.tensor_infos.contains_key(t);
    if has(long) || has(short) {
        if !(has(long) && has(short)) {
            return Err(bad(format!(
                "the GGUF has one of {long} and {short} without the other"
            )));
        }
        let original = content
            .metadata
            .get(&format!("{arch}.rope.scaling.original_context_length"))
            .and_then(|v| v.to_u32().ok())
            .ok_or_else(|| {
                bad(format!(
                    "{long} needs {arch}.rope.scaling.original_context_length (LongRoPE's original context)"
                ))
            })?;
        let mut scaling = json!({
            "rope_type": "longrope",
            "long_factor": vector(long)?,
            "short_factor": vector(short)?,
            "original_max_position_embeddings": original,
        });
        if let Some(factor) = meta_f32(content, &format!("{arch}.rope.scaling.attn_factor")) {
            scaling["attention_factor"] = json!(factor);
        }
        return Ok(Some(scaling));
    }
    let kind = content
        .metadata
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    match kind {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = meta_f32(content, &format!("{arch}.rope.scaling.factor"))
                .ok_or_else(|| bad(format!("{arch}.rope.scaling.factor is missing")))?;
            Ok(Some(json!({"rope_type": "linear", "factor": factor})))
        }
        Some(other) => Err(HandlerError::Unsupported(format!(
            "GGUF rope scaling `{other}` (supported: linear, and llama3 as rope_freqs)"
        ))),
    }
}

/// Checks every tensor the file describes against the file: its element count (the
/// product of its dimensions) fits, is whole blocks of its type, and its bytes lie
/// inside the file. Whatever the header claims, nothing later is sized past the file.
fn check_tensors_within(content: &Content, file_len: u64) -> Result<(), HandlerError> {
    for (name, info) in &content.tensor_infos {
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        let (block, size) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        let bytes = elements
            .filter(|n| n % block == 0)
            .and_then(|n| (n / block).checked_mul(size));
        let end = bytes
            .and_then(|b| b.checked_add(info.offset))
            .and_then(|e| e.checked_add(content.tensor_data_offset));
        if elements == Some(0) {
            return Err(bad(format!("tensor {name} has no elements")));
        }
        match end {
            Some(end) if end <= file_len => {}
            Some(_) => return Err(bad(format!("tensor {name} lies past the end of the file"))),
            None => {
                return Err(bad(format!(
                    "tensor {name} has shape {:?}, which is not whole {:?} blocks or overflows",
                    info.shape.dims(),
                    info.ggml_dtype
                )));
            }
        }
    }
    Ok(())
}

/// Undoes llama.cpp's `permute(w, n_head)`, which interleaves each head's two rotary halves.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let Some(&rows) = dims.first().filter(|r| **r % (2 * heads.max(1)) == 0) else {
        candle_core::bail!("q/k rows of shape {dims:?} are not pairs of {heads} heads");
    };
    let rest: usize = dims[1..].iter().product();
    w.reshape((heads, rows / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Rows of a fused qkv from llama.cpp's `[Q; K; V]` blocks (`[3, heads, head_dim]`) back
/// to the per-head `[heads, 3, head_dim]` BLOOM's and GPT-NeoX's checkpoints keep (the
/// inverse of llama.cpp's converter; rows of GGML blocks move whole).
fn interleave_qkv(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let Some(&rows) = dims.first().filter(|r| **r % (3 * heads.max(1)) == 0) else {
        candle_core::bail!("a fused qkv of shape {dims:?} is not three blocks of {heads} heads");
    };
    let rest: usize = dims[1..].iter().product();
    w.reshape((3, heads, rows / 3 / heads, rest))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(dims)
}

/// The tensor a GGUF tensor becomes: dequantized to `dtype` when one is asked for; else a
/// quantized matrix stays in its blocks (`U8` rows) and the rest in its stored type.
fn planned_tensor(
    name: String,
    ggml: GgmlDType,
    dims: Vec<usize>,
    dtype: Option<DType>,
) -> PlannedTensor {
    let stored = match ggml {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    };
    match (dtype, stored, dims.as_slice()) {
        (Some(dtype), _, _) => PlannedTensor {
            name,
            dtype,
            shape: dims,
            ggml: None,
        },
        (None, Some(stored), _) => PlannedTensor {
            name,
            dtype: stored,
            shape: dims,
            ggml: None,
        },
        (None, None, &[rows, cols]) => PlannedTensor {
            name,
            dtype: DType::U8,
            shape: vec![rows, cols / ggml.block_size() * ggml.type_size()],
            ggml: Some(ggml),
        },
        (None, None, _) => PlannedTensor {
            name,
            dtype: DType::F32,
            shape: dims,
            ggml: None,
        },
    }
}

fn convert(
    path: &Path,
    range: std::ops::Range<u64>,
    name: &str,
    out: &Path,
    dtype: Option<DType>,
) -> Result<(), HandlerError> {
    let file_len = range.end.saturating_sub(range.start);
    let mut reader = RangeReader::open(path, range)?;
    // What the file holds is the archive's fault: a 4xx naming the file, not a 500.
    let content = Content::read(&mut reader)
        .weights_context(|| format!("{name} is not a readable GGUF file"))?;
    check_tensors_within(&content, file_len)?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "llama".into());
    // The GGUF architectures whose tensors and metadata map onto a decoder family.
    let architectures = match arch.as_str() {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "granite" => "GraniteForCausalLM",
        "olmo2" => "Olmo2ForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3" => "Gemma3ForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "qwen3moe" => "Qwen3MoeForCausalLM",
        "gpt2" => "GPT2LMHeadModel",
        "bloom" => "BloomForCausalLM",
        "gptneox" => "GPTNeoXForCausalLM",
        _ => {
            return Err(HandlerError::Unsupported(format!(
                "GGUF architecture `{arch}`: this server serves llama (and Mixtral), mistral, qwen2, qwen3, qwen3moe, granite, olmo2, gemma, gemma2, gemma3, phi3, gpt2, bloom and gptneox GGUF models"
            )));
        }
    };
    let experts = content
        .metadata
        .get(&format!("{arch}.expert_count"))
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(0) as usize;
    // Mixtral is written as the llama architecture with experts.
    let (architectures, model_type) = match (arch.as_str(), experts) {
        ("llama", 1..) => ("MixtralForCausalLM", "mixtral"),
        ("gemma3", _) => (architectures, "gemma3_text"),
        ("qwen3moe", _) => (architectures, "qwen3_moe"),
        ("gptneox", _) => (architectures, "gpt_neox"),
        (other, _) => (architectures, other),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let heads = meta_u32(&content, &key("attention.head_count"))? as usize;
    let kv_heads = content
        .metadata
        .get(&key("attention.head_count_kv"))
        .and_then(|v| v.to_u32().ok())
        .map_or(heads, |v| v as usize);
    let hidden = meta_u32(&content, &key("embedding_length"))? as usize;
    if heads == 0 || kv_heads == 0 || hidden == 0 {
        return Err(bad(
            "attention.head_count, head_count_kv and embedding_length must be at least 1",
        ));
    }
    let embed = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad("token_embd.weight is missing"))?;
    let vocab = embed.shape.dims()[0];
    let tied = !content.tensor_infos.contains_key("output.weight");

    // Header first (every shape is known up front), then each tensor in turn: in the
    // GGUF's name order, a stack of experts one after another (each stack read once).
    let mut names: Vec<Mapped> = Vec::new();
    for gguf in content.tensor_infos.keys() {
        if experts > 0
            && let Some(split) = expert_names(gguf, &arch, experts)
        {
            names.extend(split.into_iter().map(|(hf, expert)| Mapped {
                gguf: gguf.clone(),
                hf,
                rows: Rows::AsStored,
                expert,
            }));
        } else if let Some((hf, rows)) = hf_name(gguf, &arch, heads, kv_heads) {
            names.push(Mapped {
                gguf: gguf.clone(),
                hf,
                rows,
                expert: None,
            });
        }
    }
    names.sort_by(|a, b| (&a.gguf, a.expert).cmp(&(&b.gguf, b.expert)));
    if let Some(dtype) = dtype
        && !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
    {
        return Err(HandlerError::Unsupported(format!(
            "GGUF weights cannot be dequantized to {dtype:?}"
        )));
    }
    let planned: Vec<PlannedTensor> = names
        .iter()
        .map(|m| {
            let info = &content.tensor_infos[&m.gguf];
            let dims = info.shape.dims();
            // One expert of a stack: its [rows, cols].
            let dims = match m.expert {
                Some(_) => dims[1..].to_vec(),
                None => dims.to_vec(),
            };
            if m.rows == Rows::Transpose {
                // In a float type: its own, or float32 for GGML blocks.
                let float = match info.ggml_dtype {
                    GgmlDType::F16 => DType::F16,
                    GgmlDType::BF16 => DType::BF16,
                    _ => DType::F32,
                };
                let transposed = dims.iter().rev().copied().collect();
                return planned_tensor(
                    m.hf.clone(),
                    info.ggml_dtype,
                    transposed,
                    Some(dtype.unwrap_or(float)),
                );
            }
            planned_tensor(m.hf.clone(), info.ggml_dtype, dims, dtype)
        })
        .collect();
    let rope_scaling = rope_scaling(&content, &mut reader, &arch)?;
    let mut next = names.iter();
    // The GGUF tensor last read, as stored: a stack of experts is read once for all.
    let mut last: Option<(String, candle_core::quantized::QTensor)> = None;
    offload::write_streaming(&out.join("model.safetensors"), &planned, |planned| {
        let Mapped {
            gguf,
            hf,
            rows,
            expert,
        } = next
            .next()
            .ok_or_else(|| bad("more tensors planned than named"))?;
        let read = (|| -> candle_core::Result<Tensor> {
            if last.as_ref().is_none_or(|(name, _)| name != gguf) {
                last = Some((
                    gguf.clone(),
                    content.tensor(&mut reader, gguf, &Device::Cpu)?,
                ));
            }
            let Some((_, q)) = &last else {
                unreachable!("read above")
            };
            let t = match planned.ggml {
                // The blocks as they are, one row of blocks per weight row (so the Q/K
                // un-permutation below moves whole rows); an expert's rows are its
                // share of the stack's bytes.
                Some(_) => {
                    let data = q.data()?;
                    let bytes = match expert {
                        Some(e) => {
                            let share = data.len() / experts;
                            data[e * share..(e + 1) * share].to_vec()
                        }
                        None => data.into_owned(),
                    };
                    Tensor::from_vec(bytes, planned.shape.as_slice(), &Device::Cpu)?
                }
                None => {
                    let t = q.dequantize(&Device::Cpu)?;
                    let t = match expert {
                        Some(e) => t.narrow(0, *e, 1)?.squeeze(0)?,
                        None => t,
                    };
                    let t = match norms_plus_one(&arch) && hf.ends_with("norm.weight") {
                        true => (t - 1.0)?,
                        false => t,
                    };
                    t.to_dtype(planned.dtype)?
                }
            };
            match rows {
                Rows::AsStored => Ok(t),
                Rows::Unpermute(heads) => unpermute(&t, *heads),
                Rows::InterleaveQkv(heads) => interleave_qkv(&t, *heads),
                Rows::Transpose => t.t()?.contiguous(),
            }
        })();
        read.weights_context(|| format!("cannot read tensor {gguf} ({hf}) of the GGUF file"))
    })?;
    reader.rewind().map_err(|source| HandlerError::Io {
        path: path.to_path_buf(),
        source,
    })?;

    let bos = content
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.to_u32().ok());
    let eos = content
        .metadata
        .get("tokenizer.ggml.eos_token_id")
        .and_then(|v| v.to_u32().ok());
    // A head's width is the key length where the file states it (Qwen 3's and Gemma's
    // are not hidden / heads); the rotary count only where it does not, except for
    // Phi-3, whose rotary count is a part of the head (partial rotary).
    let meta = |k: &str| content.metadata.get(&key(k)).and_then(|v| v.to_u32().ok());
    let head_dim = meta("attention.key_length")
        .or_else(|| {
            meta("rope.dimension_count").filter(|_| !matches!(arch.as_str(), "phi3" | "gptneox"))
        })
        .unwrap_or((hidden / heads) as u32);
    let layers = meta_u32(&content, &key("block_count"))?;
    let mut config = json!({
        "architectures": [architectures],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta_u32(&content, &key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": meta_f32(&content, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        "rope_theta": meta_f32(&content, &key("rope.freq_base")).unwrap_or(10_000.0),
        "max_position_embeddings": content.metadata.get(&key("context_length")).and_then(|v| v.to_u32().ok()).unwrap_or(4096),
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        // Quantized weights compute in float32.
        "torch_dtype": format!("{:?}", dtype.unwrap_or(DType::F32)).to_lowercase().replace("f32", "float32").replace("bf16", "bfloat16").replace("f16", "float16"),
    });
    if let Some(scaling) = rope_scaling {
        config["rope_scaling"] = scaling;
    }
    // GPT-2, BLOOM and GPT-NeoX: LayerNorms (their epsilon under its own key); GPT-2's
    // learned positions and BLOOM's ALiBi have no RoPE; GPT-NeoX's parallel residual is
    // a key (llama.cpp writes no `rotary_emb_base`: 10,000 unless the file says). Their
    // MLPs' GELU is each family's own (tanh for GPT-2 and BLOOM, erf for GPT-NeoX, where
    // llama.cpp computes tanh for all three).
    if matches!(arch.as_str(), "gpt2" | "bloom" | "gptneox")
        && let Some(object) = config.as_object_mut()
    {
        object.remove("rms_norm_eps");
        let epsilon = meta_f32(&content, &key("attention.layer_norm_epsilon")).unwrap_or(1e-5);
        object.insert("layer_norm_epsilon".into(), json!(epsilon));
        if arch == "gptneox" {
            let parallel = (content.metadata.get(&key("use_parallel_residual")))
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            object.insert("use_parallel_residual".into(), json!(parallel));
            object.insert("hidden_act".into(), json!("gelu"));
        } else {
            object.remove("rope_theta");
            object.remove("head_dim");
        }
    }
    if let Some(rotary) = meta("rope.dimension_count").filter(|d| *d < head_dim) {
        config["partial_rotary_factor"] = json!(f64::from(rotary) / f64::from(head_dim));
    }
    // Gemma 2 and 3 as llama.cpp runs them: it stores no query_pre_attn_scalar and
    // scales scores by 1/sqrt(head_dim), or by 1/sqrt(hidden / heads) for the 27B
    // models (46 and 62 layers), which is what their configs say; Gemma 2's caps
    // default to 50 and 30; Gemma 3's sliding layers use a base of 10,000 unless the
    // file says. Phi-3's window is dropped, as llama.cpp drops it.
    if matches!(arch.as_str(), "gemma2" | "gemma3") {
        let big = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
        config["query_pre_attn_scalar"] = json!(match big {
            true => (hidden / heads) as u32,
            false => head_dim,
        });
        if let Some(window) = meta("attention.sliding_window").filter(|w| *w > 0) {
            config["sliding_window"] = json!(window);
        } else if arch == "gemma2" {
            config["sliding_window"] = json!(4096);
        }
        if let Some(pattern) = meta("attention.sliding_window_pattern") {
            config["sliding_window_pattern"] = json!(pattern);
        }
        let caps: [(&str, Option<f32>); 2] = match arch.as_str() {
            "gemma2" => [
                ("attn_logit_softcapping", Some(50.0)),
                ("final_logit_softcapping", Some(30.0)),
            ],
            _ => [
                ("attn_logit_softcapping", None),
                ("final_logit_softcapping", None),
            ],
        };
        for (cap, default) in caps {
            if let Some(value) = meta_f32(&content, &key(cap)).or(default) {
                config[cap] = json!(value);
            }
        }
        if arch == "gemma3" {
            config["rope_local_base_freq"] =
                json!(meta_f32(&content, &key("rope.freq_base_swa")).unwrap_or(10_000.0));
        }
    }
    if experts > 0 {
        config["num_local_experts"] = json!(experts);
        config["num_experts_per_tok"] = json!(meta_u32(&content, &key("expert_used_count"))?);
        if let Some(width) = meta("expert_feed_forward_length") {
            config["moe_intermediate_size"] = json!(width);
        }
        // llama.cpp renormalises Qwen 3 MoE's chosen experts' weights (as the released
        // models' norm_topk_prob says); blocks without a router keep a dense MLP.
        config["norm_topk_prob"] = json!(true);
        let dense: Vec<u32> = (0..layers)
            .filter(|l| {
                !content
                    .tensor_infos
                    .contains_key(&format!("blk.{l}.ffn_gate_inp.weight"))
            })
            .collect();
        config["mlp_only_layers"] = json!(dense);
    }
    // Granite's multipliers, as llama.cpp's converter names them.
    for (gguf, hf) in [
        ("embedding_scale", "embedding_multiplier"),
        ("residual_scale", "residual_multiplier"),
        ("attention.scale", "attention_multiplier"),
        ("logit_scale", "logits_scaling"),
    ] {
        if let Some(value) = meta_f32(&content, &key(gguf)) {
            config[hf] = json!(value);
        }
    }
    let write = |name: &str, value: &serde_json::Value| {
        let p = out.join(name);
        std::fs::write(&p, value.to_string()).map_err(|source| HandlerError::Io { path: p, source })
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tokenizer_json(&content.metadata)?)?;
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok());
    // The chat template's `bos_token` / `eos_token`: it writes BOS itself (Gemma's,
    // Llama 2's), and the chat path adds no other.
    let token_text = |key: &str| -> Option<String> {
        let id = content.metadata.get(key)?.to_u32().ok()? as usize;
        let tokens = content
            .metadata
            .get("tokenizer.ggml.tokens")?
            .to_vec()
            .ok()?;
        tokens.get(id)?.to_string().ok().cloned()
    };
    write(
        "tokenizer_config.json",
        &json!({"chat_template": template, "add_bos_token": false,
            "bos_token": token_text("tokenizer.ggml.bos_token_id"),
            "eos_token": token_text("tokenizer.ggml.eos_token_id")}),
    )?;
    Ok(())
}

/// A `tokenizers` JSON for a GGUF `llama` (SentencePiece BPE) vocabulary: Gemma's,
/// Llama 2's, Phi-3's. SentencePiece merges the adjacent pair whose joined piece scores
/// highest, falling back to `<0xXX>` byte pieces; as BPE, every piece that splits into
/// two pieces of the vocabulary is a merge, ranked by its score (the way transformers
/// converts a SentencePiece model). Spaces become `▁`, with one put in front of each
/// stretch of text where `add_space_prefix` says (as llama.cpp does); BOS is added where `add_bos_token` says (llama.cpp's default
/// for these vocabularies: yes). Control pieces are special added tokens, user-defined
/// ones are matched whole.
fn sentencepiece_json(
    metadata: &HashMap<String, Value>,
    tokens: Vec<String>,
) -> Result<serde_json::Value, HandlerError> {
    let numbers = |key: &str| -> Vec<Value> {
        metadata
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .cloned()
            .unwrap_or_default()
    };
    let scores: Vec<f32> = numbers("tokenizer.ggml.scores")
        .iter()
        .map(|v| v.to_f32().unwrap_or(0.0))
        .collect();
    let types: Vec<i32> = numbers("tokenizer.ggml.token_type")
        .iter()
        .map(|v| v.to_i32().unwrap_or(1))
        .collect();
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(bad(format!(
            "tokenizer.ggml.scores and token_type must have one entry per token ({})",
            tokens.len()
        )));
    }
    let flag = |key: &str, default: bool| {
        metadata
            .get(key)
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(default)
    };
    let prefix_space = flag("tokenizer.ggml.add_space_prefix", true);
    let add_bos = flag("tokenizer.ggml.add_bos_token", true);
    let id_of = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| v.to_u32().ok())
            .map(|i| i as usize)
    };
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Normal (1) and user-defined (4) pieces merge; bytes, controls and the unknown
    // piece do not.
    let merges_from = |i: usize| types[i] == 1 || types[i] == 4;
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (joined, piece) in tokens.iter().enumerate().filter(|(i, _)| types[*i] == 1) {
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right))
                && merges_from(l)
                && merges_from(r)
            {
                merges.push((scores[joined], joined, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|&(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types[*i], 3 | 4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let unk = types
        .iter()
        .position(|t| *t == 2)
        .map(|i| tokens[i].clone());
    // As llama.cpp tokenizes: each stretch of text between special pieces gets the
    // prefix space (SentencePiece puts it before the whole text only; they differ
    // after a special piece), then spaces become `▁`.
    let mut normalizers = Vec::new();
    if prefix_space {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let bos = id_of("tokenizer.ggml.bos_token_id").filter(|i| *i < tokens.len());
    let post_processor = match (add_bos, bos) {
        (true, Some(bos)) => {
            let token = &tokens[bos];
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {token: {"id": token, "ids": [bos], "tokens": [token]}}})
        }
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

/// A `tokenizers` JSON for a GGUF `gpt2` (byte-level BPE) vocabulary: tokens and merges
/// from the metadata, control tokens (type 3) as special added tokens, no prefix space
/// (`tokenizer.ggml.add_space_prefix` is honoured), and llama.cpp's "smollm"-style
/// pre-tokenizers split digits one by one, as the original HF tokenizers do.
pub fn tokenizer_json(
    metadata: &HashMap<String, Value>,
) -> Result<serde_json::Value, HandlerError> {
    let text_list = |key: &str| -> Result<Vec<String>, HandlerError> {
        metadata
            .get(key)
            .ok_or_else(|| bad(format!("{key} is missing")))?
            .to_vec()
            .map_err(|e| bad(format!("{key}: {e}")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| bad(format!("{key}: {e}")))
            })
            .collect()
    };
    let model = metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    if model == "llama" {
        return sentencepiece_json(metadata, text_list("tokenizer.ggml.tokens")?);
    }
    if model != "gpt2" {
        return Err(HandlerError::Unsupported(format!(
            "GGUF tokenizer model `{model}`: byte-level BPE (gpt2) and SentencePiece (llama) vocabularies are supported"
        )));
    }
    let tokens = text_list("tokenizer.ggml.tokens")?;
    let merges = text_list("tokenizer.ggml.merges")?;
    let types: Vec<i32> = metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
        .unwrap_or_default();
    let prefix_space = metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let pre = metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": prefix_space, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = if matches!(pre, "smollm" | "starcoder" | "refact") {
        json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level.clone()
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinyLlama;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // permute(w, n) = w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, rows, cols) = (2usize, 8usize, 3usize);
        let hf = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)
            .and_then(|t| t.reshape((rows, cols)))
            .expect("t");
        let permuted = hf
            .reshape((heads, 2, rows / heads / 2, cols))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((rows, cols)))
            .expect("permute");
        let back = unpermute(&permuted, heads).expect("unpermute");
        assert_eq!(
            back.to_vec2::<f32>().expect("v"),
            hf.to_vec2::<f32>().expect("v")
        );
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", "llama", 9, 3),
            Some((
                "model.layers.3.self_attn.q_proj.weight".into(),
                Rows::Unpermute(9)
            ))
        );
        assert_eq!(
            hf_name("blk.3.attn_k.weight", "llama", 9, 3),
            Some((
                "model.layers.3.self_attn.k_proj.weight".into(),
                Rows::Unpermute(3)
            ))
        );
        assert_eq!(
            hf_name("blk.3.attn_k.weight", "qwen2", 9, 3).map(|n| n.1),
            Some(Rows::AsStored)
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", "llama", 9, 3).map(|n| n.0),
            Some("model.layers.0.post_attention_layernorm.weight".into())
        );
        assert_eq!(
            hf_name("token_embd.weight", "llama", 9, 3).map(|n| n.0),
            Some("model.embed_tokens.weight".into())
        );
        assert_eq!(hf_name("rope_freqs.weight", "llama", 9, 3), None);
    }

    /// Writes the tiny Llama in `hf` (safetensors + config.json) as a llama.cpp-style
    /// GGUF: llama names, q/k rows permuted, a byte-level BPE vocabulary, and
    /// `rope_freqs.weight` when `rope_freqs` is given.
    /// The GGUF llama.cpp's converter would make of the HF model in `hf`, its matrices
    /// in `weights` blocks (norms and rope_freqs in f32).
    fn write_gguf(
        hf: &Path,
        spec: &TinyLlama,
        rope_freqs: Option<&[f32]>,
        weights: GgmlDType,
        out: &Path,
    ) {
        use candle_core::quantized::QTensor;
        let tensors = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
        let permute = |w: &Tensor, heads: usize| {
            let (rows, cols) = w.dims2().expect("2d");
            w.reshape((heads, 2, rows / heads / 2, cols))
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .and_then(|t| t.reshape((rows, cols)))
                .expect("permute")
        };
        let mut quantized: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, t: &Tensor| {
            let dtype = if t.rank() == 2 {
                weights
            } else {
                GgmlDType::F32
            };
            quantized.push((name, QTensor::quantize(t, dtype).expect("quantize")));
        };
        for (name, t) in &tensors {
            let gguf = match name.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".to_string(),
                "model.norm.weight" => "output_norm.weight".to_string(),
                "lm_head.weight" => "output.weight".to_string(),
                other => {
                    let rest = other.strip_prefix("model.layers.").expect("a layer");
                    let (layer, tail) = rest.split_once('.').expect("layer.tail");
                    let module = match tail.trim_end_matches(".weight") {
                        "input_layernorm" => "attn_norm",
                        "post_attention_layernorm" => "ffn_norm",
                        "self_attn.q_proj" => "attn_q",
                        "self_attn.k_proj" => "attn_k",
                        "self_attn.v_proj" => "attn_v",
                        "self_attn.o_proj" => "attn_output",
                        "mlp.gate_proj" => "ffn_gate",
                        "mlp.up_proj" => "ffn_up",
                        "mlp.down_proj" => "ffn_down",
                        unknown => panic!("unexpected tensor {unknown}"),
                    };
                    format!("blk.{layer}.{module}.weight")
                }
            };
            let t = if gguf.ends_with("attn_q.weight") {
                permute(t, spec.heads)
            } else if gguf.ends_with("attn_k.weight") {
                permute(t, spec.kv_heads)
            } else {
                t.clone()
            };
            add(gguf, &t);
        }
        if let Some(freqs) = rope_freqs {
            add(
                "rope_freqs.weight".into(),
                &Tensor::new(freqs, &Device::Cpu).expect("freqs"),
            );
        }
        let mut tokens: Vec<Value> = ["a", "b", "ab"]
            .iter()
            .map(|t| Value::String(t.to_string()))
            .collect();
        tokens.extend((3..spec.vocab_size).map(|i| Value::String(format!("t{i}"))));
        let u32v = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", u32v(spec.heads)),
            ("llama.attention.head_count_kv", u32v(spec.kv_heads)),
            ("llama.embedding_length", u32v(spec.hidden_size)),
            ("llama.feed_forward_length", u32v(spec.intermediate_size)),
            ("llama.block_count", u32v(spec.layers)),
            ("llama.context_length", u32v(128)),
            ("llama.rope.freq_base", Value::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            (
                "tokenizer.ggml.merges",
                Value::Array(vec![Value::String("a b".into())]),
            ),
            ("tokenizer.ggml.bos_token_id", u32v(1)),
            ("tokenizer.ggml.eos_token_id", u32v(2)),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            quantized.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut file = std::fs::File::create(out).expect("create");
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &tensors).expect("write");
    }

    /// Last-position logits of the model in folder `dir` (config.json + safetensors).
    fn logits(dir: &Path, prompt: &[u32]) -> Tensor {
        logits_placed(dir, prompt, false)
    }

    /// [`logits`] with every block resident or (`streamed`) read from disk each pass.
    fn logits_placed(dir: &Path, prompt: &[u32], streamed: bool) -> Tensor {
        use crate::models::decoder::{DecoderSpec, KvCache, MappedDecoder};
        use crate::weights::layer_stack::UnitPlacement;
        let config = DecoderSpec::from_config(
            &serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
                .expect("parse"),
        )
        .expect("spec");
        let source = crate::WeightSource::open(&dir.join("model.safetensors")).expect("source");
        let model = MappedDecoder::load(&source, &config, DType::F32, |unit| {
            Ok(match streamed && unit.starts_with("model.layers.") {
                true => UnitPlacement::Streamed(Device::Cpu),
                false => UnitPlacement::Resident(Device::Cpu),
            })
        })
        .expect("load");
        let tokens = Tensor::new(prompt, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        model
            .forward(&tokens, &mut KvCache::default())
            .expect("forward")
    }

    #[test]
    fn rope_freqs_serve_like_the_llama3_scaling_they_came_from() {
        // The same tiny model twice: as HF safetensors with Llama 3.1's `llama3`
        // rope_scaling, and as the GGUF llama.cpp would make of it, whose `rope_freqs`
        // holds the per-frequency divisors its converter computes.
        let (factor, low, high, original) = (4.0f32, 1.0f32, 4.0f32, 64.0f32);
        let spec = TinyLlama {
            rope_scaling: Some(json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original as usize
            })),
            ..TinyLlama::default()
        };
        let work = tempfile::tempdir().expect("tempdir");
        let hf = work.path().join("hf");
        spec.write(&hf).expect("write");
        let head_dim = spec.hidden_size / spec.heads;
        let divisors: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| {
                let freq = 1.0 / 10_000f32.powf(i as f32 / head_dim as f32);
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < original / high {
                    1.0
                } else if wavelen > original / low {
                    factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        let prompt = [1u32, 5, 9, 14, 3, 7, 11, 20, 30, 2, 8, 4];
        let want = logits(&hf, &prompt);
        let diff_of = |rope_freqs: Option<&[f32]>, name: &str| {
            let gguf_dir = work.path().join(name);
            std::fs::create_dir_all(&gguf_dir).expect("dir");
            write_gguf(
                &hf,
                &spec,
                rope_freqs,
                GgmlDType::F32,
                &gguf_dir.join("tiny.gguf"),
            );
            let folder = materialize(
                &crate::weights::files::FolderFiles::new(&gguf_dir),
                "tiny.gguf",
                &work.path().join(format!("{name}-offload")),
                Some(DType::F32),
            )
            .expect("materialize");
            (&logits(&folder, &prompt) - &want)
                .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
                .expect("diff")
        };
        let with = diff_of(Some(&divisors), "with-freqs");
        assert!(with <= 1e-5, "GGUF with rope_freqs differs by {with}");
        let without = diff_of(None, "without-freqs");
        assert!(without > 1e-4, "the factors must matter here ({without})");
    }

    /// A GGUF whose matrices are quantized serves from its blocks (no dequantized copy)
    /// and decodes like its dequantized twin, within the activations' 8-bit rounding;
    /// blocks streamed from disk give the same logits as resident ones.
    #[test]
    fn quantized_ggufs_decode_like_their_dequantized_twins() {
        let prompt = [1u32, 5, 9, 14, 3, 7, 11, 20, 30, 2, 8, 4];
        let work = tempfile::tempdir().expect("tempdir");
        for (weights, hidden, intermediate) in [
            (GgmlDType::Q4_0, 64, 96),
            (GgmlDType::Q4_1, 64, 96),
            (GgmlDType::Q5_0, 64, 96),
            (GgmlDType::Q5_1, 64, 96),
            (GgmlDType::Q8_0, 64, 96),
            (GgmlDType::Q4K, 256, 256),
            (GgmlDType::Q6K, 256, 256),
        ] {
            let spec = TinyLlama {
                hidden_size: hidden,
                intermediate_size: intermediate,
                ..TinyLlama::default()
            };
            let dir = work.path().join(format!("{weights:?}"));
            spec.write(&dir.join("hf")).expect("write");
            std::fs::create_dir_all(dir.join("gguf")).expect("dir");
            write_gguf(
                &dir.join("hf"),
                &spec,
                None,
                weights,
                &dir.join("gguf/tiny.gguf"),
            );
            let files = crate::weights::files::FolderFiles::new(dir.join("gguf"));
            let folder = |dtype| materialize(&files, "tiny.gguf", &dir.join("offload"), dtype);
            let quantized = folder(None).expect("quantized copy");
            let dense = folder(Some(DType::F32)).expect("dequantized copy");
            assert_ne!(quantized, dense);

            let source =
                crate::WeightSource::open(&quantized.join("model.safetensors")).expect("open");
            let up = "model.layers.0.mlp.up_proj.weight";
            assert_eq!(source.ggml_type(up), Some(weights));
            assert_eq!(source.ggml_type("model.norm.weight"), None);
            let matrix = source.quantized(up).expect("read").expect("quantized");
            assert_eq!(matrix.dims(), (intermediate, hidden));
            assert!(
                matrix.in_place(),
                "{weights:?} multiplied where it is mapped"
            );
            let holding = source.holding();
            // Seven projections a block and the (tied) token table; the norms are f32.
            let matrices = spec.layers * 7 + 1;
            let expected = format!("quantized, used in place: {matrices} {weights:?}");
            assert!(holding.starts_with(&expected), "{holding}");
            let dense_source =
                crate::WeightSource::open(&dense.join("model.safetensors")).expect("open");
            assert_eq!(source.parameters(), dense_source.parameters());
            let bytes =
                |dir: &Path| std::fs::metadata(dir.join("model.safetensors")).map(|m| m.len());
            assert!(bytes(&quantized).expect("size") * 3 < bytes(&dense).expect("size"));

            let (got, want) = (logits(&quantized, &prompt), logits(&dense, &prompt));
            assert_within_share(&got, &want, 0.05, &format!("{weights:?}"));
            let streamed = logits_placed(&quantized, &prompt, true);
            let same = (&streamed - &got)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(
                same, 0.0,
                "{weights:?}: streamed blocks differ from resident ones"
            );
        }
    }

    /// A GGUF written from the decoder fixture `family` the way llama.cpp's converter
    /// writes `arch` (its tensor names; q/k rows permuted where `permute_qk`; `extra`
    /// metadata), converted back: the fixture's spec, the converted spec, and the two
    /// folders (the fixture's checkpoint, the converted one) under `work`.
    fn gguf_of_fixture(
        family: &str,
        arch: &str,
        permute_qk: bool,
        extra: Vec<(String, Value)>,
        work: &Path,
    ) -> (
        crate::models::decoder::DecoderSpec,
        crate::models::decoder::DecoderSpec,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let stacks = GgufStacks {
            stored: GgmlDType::F32,
            served: Some(DType::F32),
        };
        gguf_of_fixture_with(family, arch, permute_qk, extra, stacks, work)
    }

    /// The decoder fixture `family`: its spec, its checkpoint written into `work/hf`, and
    /// that checkpoint's tensors.
    fn fixture_checkpoint(
        family: &str,
        work: &Path,
    ) -> (
        crate::models::decoder::DecoderSpec,
        std::path::PathBuf,
        HashMap<String, Tensor>,
    ) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/decoders")
            .join(family);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("config.json")).expect("config"))
                .expect("json");
        let hf = work.join("hf");
        crate::testing::decoder_fixtures::write_weights(&fixture, &hf).expect("weights");
        let spec = crate::models::decoder::DecoderSpec::from_config(&config).expect("spec");
        let tensors = candle_core::safetensors::load(hf.join("model.safetensors"), &Device::Cpu)
            .expect("weights");
        (spec, hf, tensors)
    }

    /// `metadata` and `tensors` written as `work/gguf/<family>.gguf`, and the folder the
    /// server converts it to (`served`: the dtype asked for) with the spec it reads there.
    fn gguf_converted(
        family: &str,
        metadata: &[(String, Value)],
        tensors: &[(String, candle_core::quantized::QTensor)],
        served: Option<DType>,
        work: &Path,
    ) -> (crate::models::decoder::DecoderSpec, std::path::PathBuf) {
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &candle_core::quantized::QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let gguf_dir = work.join("gguf");
        std::fs::create_dir_all(&gguf_dir).expect("dir");
        let file_name = format!("{family}.gguf");
        let mut file = std::fs::File::create(gguf_dir.join(&file_name)).expect("create");
        candle_core::quantized::gguf_file::write(&mut file, &metadata, &refs).expect("write");
        drop(file);
        let folder = materialize(
            &crate::weights::files::FolderFiles::new(&gguf_dir),
            &file_name,
            &work.join("offload"),
            served,
        )
        .expect("materialize");
        let converted: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("config.json")).expect("config"))
                .expect("json");
        let converted =
            crate::models::decoder::DecoderSpec::from_config(&converted).expect("converted spec");
        (converted, folder)
    }

    /// How expert stacks are stored in the GGUF, and the dtype the conversion asks for
    /// (`None`: quantized weights stay in their blocks).
    struct GgufStacks {
        stored: GgmlDType,
        served: Option<DType>,
    }

    fn gguf_of_fixture_with(
        family: &str,
        arch: &str,
        permute_qk: bool,
        extra: Vec<(String, Value)>,
        stacks_as: GgufStacks,
        work: &Path,
    ) -> (
        crate::models::decoder::DecoderSpec,
        crate::models::decoder::DecoderSpec,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        use candle_core::quantized::QTensor;
        let (spec, hf, tensors) = fixture_checkpoint(family, work);
        // llama.cpp's permute: rows regrouped per head from halves to interleaved pairs.
        let permute = |t: &Tensor, heads: usize| -> Tensor {
            let (rows, cols) = t.dims2().expect("2d");
            t.reshape((heads, 2, rows / heads / 2, cols))
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .and_then(|t| t.reshape((rows, cols)))
                .expect("permute")
        };
        // OLMo 2's and Gemma 2/3's post_attention_layernorm is a norm after attention.
        use crate::models::decoder::families::NormPlacement;
        let post_norms = matches!(
            spec.family.norms,
            NormPlacement::Post | NormPlacement::Sandwich
        );
        // Gemma's norms are stored plus one.
        let plus_one = arch.starts_with("gemma");
        let mut gguf_tensors: Vec<(String, QTensor)> = Vec::new();
        // Experts as llama.cpp stacks them: (layer, ffn_gate|ffn_up|ffn_down) → [E, rows, cols].
        let mut stacks: std::collections::BTreeMap<(String, &str), Vec<(usize, Tensor)>> =
            std::collections::BTreeMap::new();
        for (name, t) in &tensors {
            if let Some((layer, rest)) = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
                && let Some((_, expert)) = rest.split_once(".experts.")
            {
                let (e, projection) = expert.split_once('.').expect("experts.E.projection");
                let kind = match projection.trim_end_matches(".weight") {
                    "w1" | "gate_proj" => "ffn_gate",
                    "w3" | "up_proj" => "ffn_up",
                    "w2" | "down_proj" => "ffn_down",
                    other => panic!("unexpected expert tensor {other}"),
                };
                stacks
                    .entry((layer.to_string(), kind))
                    .or_default()
                    .push((e.parse().expect("expert index"), t.clone()));
                continue;
            }
            let mut t = t.clone();
            if plus_one && name.ends_with("norm.weight") {
                t = (t + 1.0).expect("plus one");
            }
            let gguf = match name.as_str() {
                "model.embed_tokens.weight" => "token_embd.weight".to_string(),
                "model.norm.weight" => "output_norm.weight".to_string(),
                "lm_head.weight" => "output.weight".to_string(),
                other => {
                    let rest = other.strip_prefix("model.layers.").expect("a layer");
                    let (layer, tail) = rest.split_once('.').expect("layer.tail");
                    let module = match tail.trim_end_matches(".weight") {
                        "input_layernorm" => "attn_norm",
                        "post_attention_layernorm" if post_norms => "post_attention_norm",
                        "post_attention_layernorm" => "ffn_norm",
                        "post_feedforward_layernorm" => "post_ffw_norm",
                        "pre_feedforward_layernorm" => "ffn_norm",
                        "self_attn.qkv_proj" => "attn_qkv",
                        "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
                        "mlp.gate_up_proj" => "ffn_up",
                        "self_attn.q_proj" => {
                            if permute_qk {
                                t = permute(&t, spec.num_attention_heads);
                            }
                            "attn_q"
                        }
                        "self_attn.k_proj" => {
                            if permute_qk {
                                t = permute(&t, spec.kv_heads);
                            }
                            "attn_k"
                        }
                        "self_attn.v_proj" => "attn_v",
                        "self_attn.o_proj" => "attn_output",
                        "self_attn.q_norm" => "attn_q_norm",
                        "self_attn.k_norm" => "attn_k_norm",
                        "mlp.gate_proj" => "ffn_gate",
                        "mlp.up_proj" => "ffn_up",
                        "mlp.down_proj" => "ffn_down",
                        unknown => panic!("unexpected tensor {unknown}"),
                    };
                    format!("blk.{layer}.{module}.weight")
                }
            };
            gguf_tensors.push((gguf, QTensor::quantize(&t, GgmlDType::F32).expect("f32")));
        }
        for ((layer, kind), mut experts) in stacks {
            experts.sort_by_key(|(e, _)| *e);
            let stack = Tensor::stack(&experts.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)
                .expect("stack");
            gguf_tensors.push((
                format!("blk.{layer}.{kind}_exps.weight"),
                QTensor::quantize(&stack, stacks_as.stored).expect("quantize"),
            ));
        }
        let tokens: Vec<Value> = (0..spec.vocab_size)
            .map(|i| Value::String(format!("t{i}")))
            .collect();
        let u32v = |v: usize| Value::U32(v as u32);
        let key = |k: &str| format!("{arch}.{k}");
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (key("attention.head_count"), u32v(spec.num_attention_heads)),
            (key("attention.head_count_kv"), u32v(spec.kv_heads)),
            (key("rope.dimension_count"), u32v(spec.rope.rotary_dim)),
            (key("embedding_length"), u32v(spec.hidden_size)),
            (key("feed_forward_length"), u32v(spec.intermediate_size)),
            (key("block_count"), u32v(spec.num_hidden_layers)),
            (key("context_length"), u32v(spec.max_position_embeddings)),
            (key("rope.freq_base"), Value::F32(spec.rope.theta as f32)),
            (
                key("attention.layer_norm_rms_epsilon"),
                Value::F32(spec.rms_norm_eps as f32),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ];
        // llama.cpp's Phi-3 converter writes no key length.
        if arch != "phi3" {
            metadata.push((key("attention.key_length"), u32v(spec.head_dim)));
        }
        // LongRoPE as llama.cpp's Phi-3 converter writes it: two factor tensors, the
        // original context and the attention factor.
        if let Some(scaling) = (spec.rope.scaling.as_ref()).filter(|s| s["rope_type"] == "longrope")
        {
            for (factors, name) in [("long_factor", "long"), ("short_factor", "short")] {
                let values: Vec<f32> =
                    serde_json::from_value(scaling[factors].clone()).expect("factors");
                let t = Tensor::new(values.as_slice(), &Device::Cpu).expect("factors");
                let q = QTensor::quantize(&t, GgmlDType::F32).expect("f32");
                gguf_tensors.push((format!("rope_factors_{name}.weight"), q));
            }
            let original = scaling["original_max_position_embeddings"]
                .as_u64()
                .expect("original");
            metadata.push((
                key("rope.scaling.original_context_length"),
                u32v(original as usize),
            ));
            metadata.push((
                key("rope.scaling.attn_factor"),
                Value::F32(spec.rope.attention_factor() as f32),
            ));
        }
        metadata.extend(extra);
        let (converted, folder) =
            gguf_converted(family, &metadata, &gguf_tensors, stacks_as.served, work);
        (spec, converted, hf, folder)
    }

    /// The decoder fixtures' prompt (scripts/make-decoder-fixtures.py's PROMPT).
    const FIXTURE_PROMPT: [u32; 10] = [3, 17, 42, 99, 5, 64, 11, 120, 7, 30];

    /// The fixture prompt's last logits of the checkpoint in `folder` under `spec`.
    fn first_logits(folder: &Path, spec: &crate::models::decoder::DecoderSpec) -> Tensor {
        crate::models::decoder::tests::our_logits(folder, spec, &FIXTURE_PROMPT)
    }

    /// Transformers' logits for the fixture prompt of the decoder fixture `family`.
    fn transformers_first_logits(family: &str) -> Tensor {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/decoders")
            .join(family)
            .join("reference.json");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("reference")).expect("json");
        assert_eq!(reference["prompt"], serde_json::json!(FIXTURE_PROMPT));
        let want: Vec<f32> =
            serde_json::from_value(reference["steps"][0]["logits"].clone()).expect("logits");
        Tensor::new(want.as_slice(), &Device::Cpu).expect("want")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("diff")
    }

    /// `got`'s largest difference from `want`, at most `share` of `want`'s largest value.
    fn assert_within_share(got: &Tensor, want: &Tensor, share: f32, what: &str) {
        let scale = want
            .abs()
            .and_then(|a| a.max_all()?.to_scalar::<f32>())
            .expect("max");
        let diff = max_diff(got, want);
        assert!(
            diff <= share * scale,
            "{what}: logits differ by {diff} (largest {scale})"
        );
    }

    /// A Qwen 3 GGUF (per-head qk-norm, a head_dim wider than hidden / heads; qwen3
    /// names, no q/k permutation) serves like the safetensors checkpoint it came from —
    /// the fixture held to transformers. The GGUF carries no sliding window, so the
    /// checkpoint is compared with its windows off.
    #[test]
    fn a_qwen3_gguf_decodes_like_its_safetensors_checkpoint() {
        let work = tempfile::tempdir().expect("tempdir");
        let (mut spec, converted, hf, folder) =
            gguf_of_fixture("qwen3", "qwen3", false, vec![], work.path());
        spec.windows = vec![None; spec.num_hidden_layers];
        assert_eq!(
            (converted.family.name, converted.head_dim),
            ("qwen3", spec.head_dim)
        );
        let diff = max_diff(
            &first_logits(&folder, &converted),
            &first_logits(&hf, &spec),
        );
        assert!(diff <= 1e-5, "the Qwen 3 GGUF's logits differ by {diff}");
    }

    /// Granite and OLMo 2 GGUFs as llama.cpp writes them — Granite's q/k rows permuted
    /// and its four multipliers as `granite.*_scale` keys; OLMo 2's post-norms as
    /// `post_attention_norm` / `post_ffw_norm` and its whole-projection qk-norm — answer
    /// with transformers' own logits for the fixture.
    #[test]
    fn granite_and_olmo2_ggufs_answer_like_transformers() {
        for (family, permute, extra) in [
            (
                "granite",
                true,
                vec![
                    ("granite.embedding_scale".to_string(), Value::F32(2.0)),
                    ("granite.residual_scale".to_string(), Value::F32(0.7)),
                    ("granite.attention.scale".to_string(), Value::F32(0.2)),
                    ("granite.logit_scale".to_string(), Value::F32(4.0)),
                ],
            ),
            ("olmo2", false, vec![]),
        ] {
            let work = tempfile::tempdir().expect("tempdir");
            let (spec, converted, _, folder) =
                gguf_of_fixture(family, family, permute, extra, work.path());
            assert_eq!(converted.family.name, spec.family.name);
            let diff = max_diff(
                &first_logits(&folder, &converted),
                &transformers_first_logits(family),
            );
            assert!(
                diff <= 1e-4,
                "{family}'s GGUF logits differ from transformers' by {diff}"
            );
        }
    }

    /// Gemma 1, 2 and 3 and Phi-3 GGUFs as llama.cpp writes them: Gemma's norms stored
    /// plus one, Gemma 2/3's norm before the MLP as `ffn_norm` and the one after
    /// attention as `post_attention_norm`, Gemma 2's caps and window and Gemma 3's
    /// window, pattern, local RoPE base and linear scaling as keys; Phi-3's qkv and
    /// gate_up fused, a rotary count below the head width, no key length.
    #[test]
    fn gemma_and_phi3_ggufs_decode_as_llama_cpp_runs_them() {
        let u32v = |v: u32| Value::U32(v);
        let cases: [(&str, Vec<(String, Value)>); 4] = [
            ("gemma", vec![]),
            (
                "gemma2",
                vec![
                    ("gemma2.attn_logit_softcapping".into(), Value::F32(3.0)),
                    ("gemma2.final_logit_softcapping".into(), Value::F32(8.0)),
                    ("gemma2.attention.sliding_window".into(), u32v(4)),
                ],
            ),
            (
                "gemma3",
                vec![
                    ("gemma3.attention.sliding_window".into(), u32v(4)),
                    ("gemma3.attention.sliding_window_pattern".into(), u32v(2)),
                    ("gemma3.rope.freq_base_swa".into(), Value::F32(10_000.0)),
                    (
                        "gemma3.rope.scaling.type".into(),
                        Value::String("linear".into()),
                    ),
                    ("gemma3.rope.scaling.factor".into(), Value::F32(8.0)),
                ],
            ),
            ("phi3", vec![]),
        ];
        for (family, extra) in cases {
            let work = tempfile::tempdir().expect("tempdir");
            let (mut spec, converted, hf, folder) =
                gguf_of_fixture(family, family, false, extra, work.path());
            assert_eq!(converted.family.name, spec.family.name);
            // llama.cpp scales Gemma 2/3's scores by 1/sqrt(head_dim) (the fixture's
            // query_pre_attn_scalar is other on purpose) and drops Phi-3's window.
            if family.starts_with("gemma") {
                spec.attention_scale = 1.0 / (spec.head_dim as f64).sqrt();
            }
            if family == "phi3" {
                spec.windows = vec![None; spec.num_hidden_layers];
            }
            assert_eq!(converted.windows, spec.windows, "{family}");
            assert_eq!(converted.local_rope, spec.local_rope, "{family}");
            assert_eq!(converted.rope, spec.rope, "{family}");
            assert_eq!(
                (converted.attention_softcap, converted.logit_softcap),
                (spec.attention_softcap, spec.logit_softcap),
                "{family}"
            );
            let diff = max_diff(
                &first_logits(&folder, &converted),
                &first_logits(&hf, &spec),
            );
            assert!(diff <= 1e-5, "{family}'s GGUF logits differ by {diff}");
        }
    }

    /// The fixture of `family` written as llama.cpp's converter writes a GGUF of `arch`
    /// (`gpt2`, `bloom`, `gptneox`; its names and layout, independent of the reading side's
    /// map): GPT-2's Conv1D weights transposed to `[out, in]`, BLOOM's and GPT-NeoX's fused
    /// qkv regrouped from per-head `[q, k, v]` to `[Q; K; V]` blocks, the output head
    /// always written (a tied one as a copy of the embeddings), 2-D weights stored as
    /// `matrices`; and the folder the server converts it to.
    fn legacy_gguf_of_fixture(
        family: &str,
        arch: &str,
        matrices: GgmlDType,
        work: &Path,
    ) -> (
        crate::models::decoder::DecoderSpec,
        crate::models::decoder::DecoderSpec,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        use candle_core::quantized::QTensor;
        let (spec, hf, tensors) = fixture_checkpoint(family, work);
        let heads = spec.num_attention_heads;
        // llama.cpp's converter: [heads, 3, head_dim] rows regrouped into [3, heads, head_dim].
        let blocks_of_qkv = |t: &Tensor| -> Tensor {
            let dims = t.dims().to_vec();
            let rest: usize = dims[1..].iter().product();
            t.reshape((heads, 3, dims[0] / 3 / heads, rest))
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
                .and_then(|t| t.reshape(dims))
                .expect("regroup")
        };
        let (embeddings, per_block): (&str, &[(&str, &str)]) = match arch {
            "gpt2" => (
                "transformer.wte.weight",
                &[
                    ("ln_1", "attn_norm"),
                    ("attn.c_attn", "attn_qkv"),
                    ("attn.c_proj", "attn_output"),
                    ("ln_2", "ffn_norm"),
                    ("mlp.c_fc", "ffn_up"),
                    ("mlp.c_proj", "ffn_down"),
                ],
            ),
            "bloom" => (
                "transformer.word_embeddings.weight",
                &[
                    ("input_layernorm", "attn_norm"),
                    ("self_attention.query_key_value", "attn_qkv"),
                    ("self_attention.dense", "attn_output"),
                    ("post_attention_layernorm", "ffn_norm"),
                    ("mlp.dense_h_to_4h", "ffn_up"),
                    ("mlp.dense_4h_to_h", "ffn_down"),
                ],
            ),
            _ => (
                "gpt_neox.embed_in.weight",
                &[
                    ("input_layernorm", "attn_norm"),
                    ("attention.query_key_value", "attn_qkv"),
                    ("attention.dense", "attn_output"),
                    ("post_attention_layernorm", "ffn_norm"),
                    ("mlp.dense_h_to_4h", "ffn_up"),
                    ("mlp.dense_4h_to_h", "ffn_down"),
                ],
            ),
        };
        let fixed = [
            ("transformer.wte.weight", "token_embd.weight"),
            ("transformer.wpe.weight", "position_embd.weight"),
            ("transformer.word_embeddings.weight", "token_embd.weight"),
            (
                "transformer.word_embeddings_layernorm.weight",
                "token_embd_norm.weight",
            ),
            (
                "transformer.word_embeddings_layernorm.bias",
                "token_embd_norm.bias",
            ),
            ("transformer.ln_f.weight", "output_norm.weight"),
            ("transformer.ln_f.bias", "output_norm.bias"),
            ("gpt_neox.embed_in.weight", "token_embd.weight"),
            ("gpt_neox.final_layer_norm.weight", "output_norm.weight"),
            ("gpt_neox.final_layer_norm.bias", "output_norm.bias"),
            ("embed_out.weight", "output.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        let mut gguf_tensors: Vec<(String, QTensor)> = Vec::new();
        // Rows that are not whole blocks stay in float32, as llama.cpp's quantizer leaves them.
        let mut store = |name: String, t: &Tensor| {
            let whole = t
                .dims()
                .last()
                .is_some_and(|c| c % matrices.block_size() == 0);
            let ggml = match t.rank() {
                2 if name != "position_embd.weight" && whole => matrices,
                _ => GgmlDType::F32,
            };
            gguf_tensors.push((name, QTensor::quantize(t, ggml).expect("quantize")));
        };
        for (name, t) in &tensors {
            if let Some((_, gguf)) = fixed.iter().find(|(hf, _)| hf == name) {
                store(gguf.to_string(), t);
                continue;
            }
            let (_, rest) = name
                .split_once(".h.")
                .or_else(|| name.split_once(".layers."))
                .unwrap_or_else(|| panic!("unexpected tensor {name}"));
            let (layer, tail) = rest.split_once('.').expect("layer.tail");
            let (module, param) = tail.rsplit_once('.').expect("module.param");
            let (_, gguf) = per_block
                .iter()
                .find(|(hf, _)| *hf == module)
                .unwrap_or_else(|| panic!("unexpected tensor {name}"));
            let t = match (*gguf, arch, param) {
                ("attn_qkv", "bloom" | "gptneox", _) => blocks_of_qkv(t),
                (_, "gpt2", "weight") if *gguf != "attn_norm" && *gguf != "ffn_norm" => {
                    t.t().and_then(|t| t.contiguous()).expect("transpose")
                }
                _ => t.clone(),
            };
            store(format!("blk.{layer}.{gguf}.{param}"), &t);
        }
        // A tied head is written as a copy of the embeddings.
        if !["lm_head.weight", "embed_out.weight"]
            .iter()
            .any(|head| tensors.contains_key(*head))
        {
            store("output.weight".into(), &tensors[embeddings]);
        }
        let u32v = |v: usize| Value::U32(v as u32);
        let key = |k: &str| format!("{arch}.{k}");
        let tokens: Vec<Value> = (0..spec.vocab_size)
            .map(|i| Value::String(format!("t{i}")))
            .collect();
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (key("attention.head_count"), u32v(heads)),
            (key("embedding_length"), u32v(spec.hidden_size)),
            (key("feed_forward_length"), u32v(spec.intermediate_size)),
            (key("block_count"), u32v(spec.num_hidden_layers)),
            (key("context_length"), u32v(spec.max_position_embeddings)),
            (
                key("attention.layer_norm_epsilon"),
                Value::F32(spec.rms_norm_eps as f32),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ];
        match arch {
            "bloom" => metadata.push((key("attention.head_count_kv"), u32v(heads))),
            "gptneox" => {
                metadata.push((key("rope.dimension_count"), u32v(spec.rope.rotary_dim)));
                metadata.push((key("use_parallel_residual"), Value::Bool(true)));
            }
            _ => {}
        }
        let (converted, folder) = gguf_converted(family, &metadata, &gguf_tensors, None, work);
        (spec, converted, hf, folder)
    }

    /// GPT-2, BLOOM and GPT-NeoX GGUFs as llama.cpp writes them decode as transformers
    /// does from the checkpoint they came from: in float32 to 1e-5 of the checkpoint's
    /// logits; with the matrices in Q8_0 blocks (GPT-2's dequantized, as its transposed
    /// Conv1D weights must be; BLOOM's and GPT-NeoX's fused qkv regrouped row by row in
    /// their blocks) within 5 % of the largest logit.
    #[test]
    fn gpt2_bloom_and_gptneox_ggufs_decode_as_their_checkpoints() {
        for (family, arch) in [
            ("gpt2", "gpt2"),
            ("bloom", "bloom"),
            ("gpt_neox", "gptneox"),
        ] {
            for matrices in [GgmlDType::F32, GgmlDType::Q8_0] {
                let work = tempfile::tempdir().expect("tempdir");
                let (spec, converted, hf, folder) =
                    legacy_gguf_of_fixture(family, arch, matrices, work.path());
                assert_eq!(converted.family.name, spec.family.name, "{family}");
                assert_eq!(converted.rope, spec.rope, "{family}");
                assert_eq!(converted.norms, spec.norms, "{family}");
                assert_eq!(converted.activation, spec.activation, "{family}");
                assert_eq!(converted.positions(), spec.positions(), "{family}");
                let want = first_logits(&hf, &spec);
                let ours = first_logits(&folder, &converted);
                let diff = max_diff(&ours, &want);
                let largest = want
                    .abs()
                    .and_then(|t| t.max_all())
                    .and_then(|t| t.to_scalar::<f32>())
                    .expect("max");
                let bar = match matrices {
                    GgmlDType::F32 => 1e-5,
                    _ => 0.05 * largest,
                };
                assert!(
                    diff <= bar,
                    "{family} ({matrices:?}): logits differ by {diff} (bar {bar})"
                );
            }
        }
    }

    /// Phi-3's LongRoPE from a GGUF (its factor tensors and keys as llama.cpp's converter
    /// writes them) decodes as transformers does: the fixture's prompt and six steps, the
    /// last four past the original context of 12, resident and on disk.
    #[test]
    fn a_phi3_longrope_gguf_decodes_like_transformers() {
        use crate::models::decoder::fixture_tests::{Placement, decode, reference};
        let work = tempfile::tempdir().expect("tempdir");
        let (spec, converted, _, folder) =
            gguf_of_fixture("phi3_longrope", "phi3", false, vec![], work.path());
        assert_eq!(
            converted.rope.long_context().expect("converted"),
            spec.rope.long_context().expect("fixture")
        );
        assert_eq!(
            converted.rope.inverse_frequencies().expect("converted"),
            spec.rope.inverse_frequencies().expect("fixture")
        );
        let factor = converted.rope.attention_factor();
        assert!(
            (factor - spec.rope.attention_factor()).abs() < 1e-6,
            "{factor}"
        );
        let source = crate::WeightSource::open(&folder.join("model.safetensors")).expect("source");
        let want = reference(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/decoders/phi3_longrope")
                .as_path(),
        );
        for placement in [Placement::Resident, Placement::AllOnDisk] {
            decode(
                &source,
                &converted,
                placement,
                &want,
                &format!("phi3_longrope GGUF, {placement:?}"),
            );
        }
    }

    /// A SentencePiece vocabulary as a GGUF holds it (tokens, scores, types) tokenizes
    /// and decodes as SentencePiece itself does: with and without the dummy prefix
    /// (Llama 2 and Phi-3; Gemma), byte fallback for unseen characters, runs of spaces,
    /// newlines and tabs; around a user-defined piece as llama.cpp does (each stretch
    /// of text tokenized on its own) (`scripts/make-spm-fixture.py` trained the models
    /// and recorded their answers).
    #[test]
    fn sentencepiece_vocabularies_tokenize_as_sentencepiece_does() {
        for name in ["dummy_prefix", "no_prefix"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/spm")
                .join(format!("{name}.json"));
            let fixture: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("json");
            let list = |key: &str| fixture[key].as_array().expect("list").clone();
            let mut metadata: HashMap<String, Value> = HashMap::new();
            metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
            let tokens = list("tokens")
                .iter()
                .map(|t| Value::String(t.as_str().expect("token").into()))
                .collect();
            metadata.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
            let scores = list("scores")
                .iter()
                .map(|s| Value::F32(s.as_f64().expect("score") as f32))
                .collect();
            metadata.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
            let types = list("token_type")
                .iter()
                .map(|t| Value::I32(t.as_i64().expect("type") as i32))
                .collect();
            metadata.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
            metadata.insert(
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(fixture["add_space_prefix"].as_bool().expect("flag")),
            );
            metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
            let json = tokenizer_json(&metadata).expect("tokenizer json");
            let tokenizer: tokenizers::Tokenizer =
                json.to_string().parse().expect("a tokenizers JSON");
            for case in fixture["cases"].as_array().expect("cases") {
                let text = case["text"].as_str().expect("text");
                let want: Vec<u32> =
                    serde_json::from_value(case["llama_cpp_ids"].clone()).expect("ids");
                let got = tokenizer.encode(text, false).expect("encode");
                assert_eq!(got.get_ids(), want.as_slice(), "{name}: {text:?}");
                let with_bos = tokenizer.encode(text, true).expect("encode");
                assert_eq!(with_bos.get_ids().first(), Some(&1), "{name}: BOS");
                // SentencePiece's own ids decode to its text.
                let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
                let decoded = tokenizer.decode(&ids, false).expect("decode");
                assert_eq!(
                    decoded,
                    case["decoded"].as_str().expect("decoded"),
                    "{name}"
                );
            }
        }
    }

    /// Mixtral (the llama architecture with `expert_count`, q/k permuted) and Qwen 3 MoE
    /// (`qwen3moe`, a block without a router keeps its dense MLP) GGUFs, experts stacked
    /// `[E, rows, cols]` as llama.cpp writes them: split back into one tensor per expert,
    /// they answer with transformers' logits for the fixture.
    #[test]
    fn mixtral_and_qwen3_moe_ggufs_split_their_expert_stacks_and_answer_like_transformers() {
        let u32v = |v: u32| Value::U32(v);
        for (family, arch, permute, extra) in [
            (
                "mixtral",
                "llama",
                true,
                vec![
                    ("llama.expert_count".to_string(), u32v(4)),
                    ("llama.expert_used_count".to_string(), u32v(2)),
                ],
            ),
            (
                "qwen3_moe",
                "qwen3moe",
                false,
                vec![
                    ("qwen3moe.expert_count".to_string(), u32v(4)),
                    ("qwen3moe.expert_used_count".to_string(), u32v(2)),
                    ("qwen3moe.expert_feed_forward_length".to_string(), u32v(24)),
                ],
            ),
        ] {
            let work = tempfile::tempdir().expect("tempdir");
            let (spec, converted, _, folder) =
                gguf_of_fixture(family, arch, permute, extra, work.path());
            assert_eq!(converted.family.name, spec.family.name);
            assert_eq!(converted.moe, spec.moe, "{family}");
            let diff = max_diff(
                &first_logits(&folder, &converted),
                &transformers_first_logits(family),
            );
            assert!(
                diff <= 1e-4,
                "{family}'s GGUF logits differ from transformers' by {diff}"
            );
        }
    }

    /// Quantized expert stacks (Q8_0) split into per-expert GGML blocks, multiplied as
    /// they are, answer as the same GGUF dequantized to f32 does.
    #[test]
    fn quantized_expert_stacks_split_by_rows_of_blocks() {
        let u32v = |v: u32| Value::U32(v);
        let extra = || {
            vec![
                ("llama.expert_count".to_string(), u32v(4)),
                ("llama.expert_used_count".to_string(), u32v(2)),
            ]
        };
        let work = tempfile::tempdir().expect("tempdir");
        let convert = |served: Option<DType>, into: &str| {
            let stacks = GgufStacks {
                stored: GgmlDType::Q8_0,
                served,
            };
            gguf_of_fixture_with(
                "mixtral",
                "llama",
                true,
                extra(),
                stacks,
                &work.path().join(into),
            )
        };
        let (_, spec, _, blocks) = convert(None, "blocks");
        let (_, _, _, dense) = convert(Some(DType::F32), "dense");
        let (blocks_source, dense_source) = (
            crate::WeightSource::open(&blocks.join("model.safetensors")).expect("blocks"),
            crate::WeightSource::open(&dense.join("model.safetensors")).expect("dense"),
        );
        // Each expert's blocks are exactly its rows of the stack.
        let experts: Vec<String> = dense_source
            .tensor_names()
            .into_iter()
            .filter(|n| n.contains(".experts."))
            .collect();
        assert_eq!(
            experts.len(),
            3 * 4 * 3,
            "3 projections × 4 experts × 3 layers"
        );
        for name in &experts {
            let matrix = blocks_source
                .quantized(name)
                .expect("read")
                .unwrap_or_else(|| panic!("{name} is not kept in blocks"));
            let got = matrix.dequantize(&Device::Cpu).expect("dequantize");
            let want = dense_source
                .load(name, DType::F32, &Device::Cpu)
                .expect("load");
            assert_eq!(max_diff(&got, &want), 0.0, "{name}");
        }
        // Multiplied as blocks (activations quantized too, by the Q8 kernels), every
        // expert taking every token, they answer within the dense twins' 5 %.
        let mut everyone = spec.clone();
        if let Some(moe) = &mut everyone.moe {
            moe.per_token = moe.experts;
        }
        assert_within_share(
            &first_logits(&blocks, &everyone),
            &first_logits(&dense, &everyone),
            0.05,
            "all experts",
        );
        // Routed, within 10 %: a small change can flip a token's choice of expert in a
        // later block.
        assert_within_share(
            &first_logits(&blocks, &spec),
            &first_logits(&dense, &spec),
            0.1,
            "routed",
        );
    }
}
