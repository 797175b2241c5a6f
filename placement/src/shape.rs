//! [`ModelShape`]: the architecture numbers that decide run-time memory (heads, KV heads,
//! head dim, layers), read from config.json, and what they cost: the activations and
//! KV cache that `max_length` × `batch_size` need ([`ModelShape::reserve`]). With no
//! weights at hand, [`ModelShape::tensors`] lists the checkpoint's tensors for the
//! families we serve, so a model can be planned from config.json alone.

use serde::Serialize;

use crate::inventory::{TensorDType, TensorInfo};

/// Families with known tensor layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// The decoders (Llama, Mistral, Qwen 2/3, Granite, OLMo 2, Phi-3, Gemma 1/2/3,
    /// SmolLM2): a KV cache. Their tensors are listed as Llama's (Gemma's extra norms
    /// and Phi-3's fused projections are the same bytes under other names, or a few KB).
    Llama,
    /// BERT-style encoders: no KV cache.
    Bert,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelShape {
    pub family: Family,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The checkpoint's dtype (`torch_dtype` in config.json), if stated.
    pub dtype: Option<TensorDType>,
    /// Qwen2 puts biases on q/k/v.
    pub qkv_bias: bool,
    /// Routed experts per block (0: a dense MLP) and each one's intermediate width.
    pub experts: usize,
    pub expert_intermediate_size: usize,
    /// Blocks that keep a dense MLP among routed ones (Qwen 3 MoE's `mlp_only_layers`,
    /// and those `decoder_sparse_step` skips).
    pub dense_layers: Vec<usize>,
    pub type_vocab_size: usize,
    /// The classifier's labels, for an encoder saved with a sequence classification head
    /// (`architectures` `*ForSequenceClassification`); `None` for a bare encoder.
    pub classifier_labels: Option<usize>,
    /// The classifier labels every token (`*ForTokenClassification`): no pooler, and
    /// BERT's, RoBERTa's and DistilBERT's heads are the `classifier` alone.
    pub token_classifier: bool,
    /// Which of ModernBERT's layers carry biases (its `norm_bias`, `attention_bias`,
    /// `mlp_bias`, `classifier_bias`; all off by default). BERT's all do.
    pub biases: Biases,
}

/// Which layers of an encoder carry biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Biases {
    pub norm: bool,
    pub attention: bool,
    pub mlp: bool,
    pub classifier: bool,
}

/// Run-time memory of one device's share of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Reserve {
    /// Hidden states, attention scores and logits of one forward pass.
    pub activations: u64,
    /// KV cache of one block.
    pub kv_per_block: u64,
}

/// Whether config.json's `architectures` has one ending in `suffix`.
fn architecture_ends(config: &serde_json::Value, suffix: &str) -> bool {
    config
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|a| a.as_str().is_some_and(|a| a.ends_with(suffix)))
        })
}

impl ModelShape {
    /// Reads config.json. Unknown families are an error naming the model_type.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, String> {
        // BLOOM's, GPT-2's and DistilBERT's own spellings stand in for transformers' names.
        let get = |key: &str| {
            let aliases: &[&str] = match key {
                "hidden_size" => &["hidden_size", "n_embed", "n_embd", "dim"],
                "num_attention_heads" => &["num_attention_heads", "n_head", "n_heads"],
                "num_hidden_layers" => &["num_hidden_layers", "n_layer", "n_layers"],
                "max_position_embeddings" => &["max_position_embeddings", "n_positions"],
                "intermediate_size" => &["intermediate_size", "n_inner", "hidden_dim"],
                other => &[other][..],
            };
            aliases
                .iter()
                .find_map(|k| config.get(*k).and_then(|v| v.as_u64()))
                .map(|v| v as usize)
        };
        let need = |key: &str| get(key).ok_or_else(|| format!("config.json has no `{key}`"));
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let family = match model_type.as_str() {
            // The decoder families of spillway-handlers' models::decoder::families.
            "llama" | "mistral" | "qwen2" | "qwen3" | "smollm" | "smollm2" | "granite"
            | "olmo2" | "phi3" | "gemma" | "gemma2" | "gemma3_text" | "mixtral" | "qwen3_moe"
            | "gpt_neox" | "bloom" | "gpt2" => Family::Llama,
            "bert" | "roberta" | "xlm-roberta" | "camembert" | "distilbert" | "modernbert" => {
                Family::Bert
            }
            other => {
                return Err(format!(
                    "model_type `{other}` is not a family this server plans (llama, mistral, qwen2, qwen3, granite, olmo2, phi3, gemma, gemma2, gemma3_text, mixtral, qwen3_moe, gpt_neox, bloom, gpt2, bert)"
                ));
            }
        };
        let hidden_size = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let head_dim = get("head_dim").unwrap_or(hidden_size / heads.max(1));
        // BLOOM's MLP is four times as wide and says nothing.
        let intermediate_size = match model_type.as_str() {
            "bloom" | "gpt2" => get("intermediate_size").unwrap_or(4 * hidden_size),
            _ => need("intermediate_size")?,
        };
        // transformers 5 writes `num_local_experts`; Qwen's configs `num_experts`.
        let experts = match model_type.as_str() {
            "mixtral" | "qwen3_moe" => get("num_local_experts").or(get("num_experts")).unwrap_or(0),
            _ => 0,
        };
        Ok(ModelShape {
            family,
            hidden_size,
            intermediate_size,
            experts,
            expert_intermediate_size: get("moe_intermediate_size").unwrap_or(intermediate_size),
            dense_layers: {
                let only: Vec<usize> = config
                    .get("mlp_only_layers")
                    .and_then(|v| v.as_array())
                    .map(|l| {
                        l.iter()
                            .filter_map(|v| v.as_u64())
                            .map(|v| v as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                let step = get("decoder_sparse_step").unwrap_or(1).max(1);
                let layers = get("num_hidden_layers").unwrap_or(0);
                (0..layers)
                    .filter(|l| only.contains(l) || (l + 1) % step != 0)
                    .collect()
            },
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: get("num_key_value_heads").unwrap_or(heads),
            head_dim,
            vocab_size: need("vocab_size")?,
            max_position_embeddings: get("max_position_embeddings").unwrap_or(2048),
            // Encoders have no LM head to tie; decoders tie when config.json says so, or
            // by their family's default where it is silent (transformers' Gemma configs
            // tie, the others do not).
            tie_word_embeddings: family == Family::Llama
                && config
                    .get("tie_word_embeddings")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(
                        model_type.starts_with("gemma")
                            || matches!(model_type.as_str(), "bloom" | "gpt2"),
                    ),
            // transformers 4 writes `torch_dtype`, 5 `dtype`.
            dtype: config
                .get("dtype")
                .or_else(|| config.get("torch_dtype"))
                .and_then(|v| v.as_str())
                .and_then(TensorDType::parse),
            qkv_bias: model_type == "qwen2",
            type_vocab_size: match model_type.as_str() {
                "distilbert" => 0,
                _ => get("type_vocab_size").unwrap_or(2),
            },
            biases: {
                let flag = |key: &str| config.get(key).and_then(|v| v.as_bool());
                let modern = model_type == "modernbert";
                let bias = |key: &str| flag(key).unwrap_or(!modern);
                Biases {
                    norm: bias("norm_bias"),
                    attention: bias("attention_bias"),
                    mlp: bias("mlp_bias"),
                    classifier: bias("classifier_bias"),
                }
            },
            token_classifier: architecture_ends(config, "ForTokenClassification"),
            classifier_labels: (architecture_ends(config, "ForSequenceClassification")
                || architecture_ends(config, "ForTokenClassification"))
            .then(|| {
                config
                    .get("id2label")
                    .and_then(|v| v.as_object())
                    .map(|m| m.len())
                    .filter(|&n| n > 0)
                    .or(get("num_labels"))
                    .unwrap_or(2)
            }),
            model_type,
        })
    }

    /// Memory needed at run time for `batch` sequences of `seq` tokens in `dtype`.
    pub fn reserve(&self, batch: usize, seq: usize, dtype: TensorDType) -> Reserve {
        let (b, s, d) = (batch as u64, seq as u64, dtype.size_bytes());
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        // Live at once in one block: the residual stream and its normed copy, q/k/v and the
        // attention output (4h), the MLP's intermediate (2i for gate and up), and the
        // attention scores of all heads (eager attention).
        let hidden = b * s * (4 * h + 2 * i) * d;
        let scores = b * self.heads as u64 * s * s * d;
        // Decoders compute logits for the last position; f32 for sampling.
        let logits = match self.family {
            Family::Llama => b * self.vocab_size as u64 * 4,
            Family::Bert => 0,
        };
        let kv_per_block = match self.family {
            Family::Llama => 2 * b * s * self.kv_heads as u64 * self.head_dim as u64 * d,
            Family::Bert => 0,
        };
        Reserve {
            activations: hidden + scores + logits,
            kv_per_block,
        }
    }

    /// The tensors a checkpoint of this shape holds (HF names), for sizing without weights.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let dtype = self.dtype.unwrap_or(TensorDType::F32);
        let t = |name: String, shape: &[usize]| TensorInfo {
            name,
            dtype,
            shape: shape.to_vec(),
        };
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let mut out = Vec::new();
        match self.family {
            Family::Llama if matches!(self.model_type.as_str(), "gpt_neox" | "bloom") => {
                // One query_key_value per block, an ungated MLP, LayerNorms with biases.
                let neox = self.model_type == "gpt_neox";
                let (prefix, embed, blocks, attention, last) = match neox {
                    true => (
                        "gpt_neox",
                        "embed_in",
                        "layers",
                        "attention",
                        "final_layer_norm",
                    ),
                    false => (
                        "transformer",
                        "word_embeddings",
                        "h",
                        "self_attention",
                        "ln_f",
                    ),
                };
                let layer_norm = |out: &mut Vec<TensorInfo>, name: String| {
                    out.push(t(format!("{name}.weight"), &[h]));
                    out.push(t(format!("{name}.bias"), &[h]));
                };
                let linear = |out: &mut Vec<TensorInfo>, name: String, rows: usize, cols: usize| {
                    out.push(t(format!("{name}.weight"), &[rows, cols]));
                    out.push(t(format!("{name}.bias"), &[rows]));
                };
                out.push(t(format!("{prefix}.{embed}.weight"), &[v, h]));
                if !neox {
                    layer_norm(&mut out, format!("{prefix}.word_embeddings_layernorm"));
                }
                for l in 0..self.layers {
                    let p = format!("{prefix}.{blocks}.{l}");
                    layer_norm(&mut out, format!("{p}.input_layernorm"));
                    layer_norm(&mut out, format!("{p}.post_attention_layernorm"));
                    linear(
                        &mut out,
                        format!("{p}.{attention}.query_key_value"),
                        3 * q,
                        h,
                    );
                    linear(&mut out, format!("{p}.{attention}.dense"), h, q);
                    linear(&mut out, format!("{p}.mlp.dense_h_to_4h"), i, h);
                    linear(&mut out, format!("{p}.mlp.dense_4h_to_h"), h, i);
                }
                layer_norm(&mut out, format!("{prefix}.{last}"));
                if !self.tie_word_embeddings {
                    let head = if neox { "embed_out" } else { "lm_head" };
                    out.push(t(format!("{head}.weight"), &[v, h]));
                }
            }
            Family::Llama if self.model_type == "gpt2" => {
                // Conv1D weights are stored [in, out].
                let linear = |out: &mut Vec<TensorInfo>, name: String, rows: usize, cols: usize| {
                    out.push(t(format!("{name}.weight"), &[rows, cols]));
                    out.push(t(format!("{name}.bias"), &[cols]));
                };
                let layer_norm = |out: &mut Vec<TensorInfo>, name: String| {
                    out.push(t(format!("{name}.weight"), &[h]));
                    out.push(t(format!("{name}.bias"), &[h]));
                };
                out.push(t("transformer.wte.weight".into(), &[v, h]));
                out.push(t(
                    "transformer.wpe.weight".into(),
                    &[self.max_position_embeddings, h],
                ));
                for l in 0..self.layers {
                    let p = format!("transformer.h.{l}");
                    layer_norm(&mut out, format!("{p}.ln_1"));
                    linear(&mut out, format!("{p}.attn.c_attn"), h, 3 * h);
                    linear(&mut out, format!("{p}.attn.c_proj"), h, h);
                    layer_norm(&mut out, format!("{p}.ln_2"));
                    linear(&mut out, format!("{p}.mlp.c_fc"), h, i);
                    linear(&mut out, format!("{p}.mlp.c_proj"), i, h);
                }
                layer_norm(&mut out, "transformer.ln_f".into());
            }
            Family::Llama => {
                // What the families of models::decoder::families store, by model_type:
                // Phi-3's fused projections, the qk-norms (per head, or over the whole
                // projection for OLMo 2), where the norms sit, routed experts.
                let model_type = self.model_type.as_str();
                let fused = model_type == "phi3";
                let head_norm = match model_type {
                    "qwen3" | "qwen3_moe" | "gemma3_text" => Some((self.head_dim, self.head_dim)),
                    "olmo2" => Some((q, kv)),
                    _ => None,
                };
                let norms: &[&str] = match model_type {
                    "olmo2" => &["post_attention_layernorm", "post_feedforward_layernorm"],
                    "gemma2" | "gemma3_text" => &[
                        "input_layernorm",
                        "post_attention_layernorm",
                        "pre_feedforward_layernorm",
                        "post_feedforward_layernorm",
                    ],
                    _ => &["input_layernorm", "post_attention_layernorm"],
                };
                out.push(t("model.embed_tokens.weight".into(), &[v, h]));
                for l in 0..self.layers {
                    let p = format!("model.layers.{l}");
                    if fused {
                        out.push(t(
                            format!("{p}.self_attn.qkv_proj.weight"),
                            &[q + 2 * kv, h],
                        ));
                    } else {
                        out.push(t(format!("{p}.self_attn.q_proj.weight"), &[q, h]));
                        out.push(t(format!("{p}.self_attn.k_proj.weight"), &[kv, h]));
                        out.push(t(format!("{p}.self_attn.v_proj.weight"), &[kv, h]));
                    }
                    if self.qkv_bias {
                        out.push(t(format!("{p}.self_attn.q_proj.bias"), &[q]));
                        out.push(t(format!("{p}.self_attn.k_proj.bias"), &[kv]));
                        out.push(t(format!("{p}.self_attn.v_proj.bias"), &[kv]));
                    }
                    if let Some((qn, kn)) = head_norm {
                        out.push(t(format!("{p}.self_attn.q_norm.weight"), &[qn]));
                        out.push(t(format!("{p}.self_attn.k_norm.weight"), &[kn]));
                    }
                    out.push(t(format!("{p}.self_attn.o_proj.weight"), &[h, q]));
                    if self.experts > 0 && !self.dense_layers.contains(&l) {
                        let (module, [gate, up, down]) = match model_type {
                            "mixtral" => ("block_sparse_moe", ["w1", "w3", "w2"]),
                            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                        };
                        let e = self.expert_intermediate_size;
                        out.push(t(format!("{p}.{module}.gate.weight"), &[self.experts, h]));
                        for x in 0..self.experts {
                            let p = format!("{p}.{module}.experts.{x}");
                            out.push(t(format!("{p}.{gate}.weight"), &[e, h]));
                            out.push(t(format!("{p}.{up}.weight"), &[e, h]));
                            out.push(t(format!("{p}.{down}.weight"), &[h, e]));
                        }
                    } else if fused {
                        out.push(t(format!("{p}.mlp.gate_up_proj.weight"), &[2 * i, h]));
                        out.push(t(format!("{p}.mlp.down_proj.weight"), &[h, i]));
                    } else {
                        out.push(t(format!("{p}.mlp.gate_proj.weight"), &[i, h]));
                        out.push(t(format!("{p}.mlp.up_proj.weight"), &[i, h]));
                        out.push(t(format!("{p}.mlp.down_proj.weight"), &[h, i]));
                    }
                    for norm in norms {
                        out.push(t(format!("{p}.{norm}.weight"), &[h]));
                    }
                }
                out.push(t("model.norm.weight".into(), &[h]));
                if !self.tie_word_embeddings {
                    out.push(t("lm_head.weight".into(), &[v, h]));
                }
            }
            Family::Bert if self.model_type == "modernbert" => {
                let base = if self.classifier_labels.is_some() {
                    "model."
                } else {
                    ""
                };
                let b = self.biases;
                let layer =
                    |out: &mut Vec<TensorInfo>, name: String, shape: &[usize], bias: bool| {
                        out.push(t(format!("{name}.weight"), shape));
                        if bias {
                            out.push(t(format!("{name}.bias"), &shape[..1]));
                        }
                    };
                out.push(t(
                    format!("{base}embeddings.tok_embeddings.weight"),
                    &[v, h],
                ));
                layer(&mut out, format!("{base}embeddings.norm"), &[h], b.norm);
                for l in 0..self.layers {
                    let p = format!("{base}layers.{l}");
                    if l > 0 {
                        layer(&mut out, format!("{p}.attn_norm"), &[h], b.norm);
                    }
                    layer(&mut out, format!("{p}.attn.Wqkv"), &[3 * h, h], b.attention);
                    layer(&mut out, format!("{p}.attn.Wo"), &[h, h], b.attention);
                    layer(&mut out, format!("{p}.mlp_norm"), &[h], b.norm);
                    layer(&mut out, format!("{p}.mlp.Wi"), &[2 * i, h], b.mlp);
                    layer(&mut out, format!("{p}.mlp.Wo"), &[h, i], b.mlp);
                }
                layer(&mut out, format!("{base}final_norm"), &[h], b.norm);
                if let Some(labels) = self.classifier_labels {
                    layer(&mut out, "head.dense".into(), &[h, h], b.classifier);
                    layer(&mut out, "head.norm".into(), &[h], b.norm);
                    layer(&mut out, "classifier".into(), &[labels, h], true);
                }
            }
            Family::Bert => {
                // A classifier's checkpoint keeps the encoder under its family's prefix.
                let distil = self.model_type == "distilbert";
                let roberta = !distil && self.model_type != "bert";
                let base = match (self.classifier_labels, distil, roberta) {
                    (None, _, _) => "",
                    (Some(_), true, _) => "distilbert.",
                    (Some(_), _, true) => "roberta.",
                    (Some(_), _, _) => "bert.",
                };
                let dense = |out: &mut Vec<TensorInfo>, name: &str, rows: usize, cols: usize| {
                    out.push(t(format!("{name}.weight"), &[rows, cols]));
                    out.push(t(format!("{name}.bias"), &[rows]));
                };
                let norm = |out: &mut Vec<TensorInfo>, name: &str| {
                    out.push(t(format!("{name}.weight"), &[h]));
                    out.push(t(format!("{name}.bias"), &[h]));
                };
                out.push(t(
                    format!("{base}embeddings.word_embeddings.weight"),
                    &[v, h],
                ));
                out.push(t(
                    format!("{base}embeddings.position_embeddings.weight"),
                    &[self.max_position_embeddings, h],
                ));
                if self.type_vocab_size > 0 {
                    out.push(t(
                        format!("{base}embeddings.token_type_embeddings.weight"),
                        &[self.type_vocab_size, h],
                    ));
                }
                norm(&mut out, &format!("{base}embeddings.LayerNorm"));
                for l in 0..self.layers {
                    if distil {
                        let p = format!("{base}transformer.layer.{l}");
                        for m in ["q_lin", "k_lin", "v_lin", "out_lin"] {
                            dense(&mut out, &format!("{p}.attention.{m}"), h, h);
                        }
                        norm(&mut out, &format!("{p}.sa_layer_norm"));
                        dense(&mut out, &format!("{p}.ffn.lin1"), i, h);
                        dense(&mut out, &format!("{p}.ffn.lin2"), h, i);
                        norm(&mut out, &format!("{p}.output_layer_norm"));
                        continue;
                    }
                    let p = format!("{base}encoder.layer.{l}");
                    for m in ["query", "key", "value"] {
                        dense(&mut out, &format!("{p}.attention.self.{m}"), h, h);
                    }
                    dense(&mut out, &format!("{p}.attention.output.dense"), h, h);
                    norm(&mut out, &format!("{p}.attention.output.LayerNorm"));
                    dense(&mut out, &format!("{p}.intermediate.dense"), i, h);
                    dense(&mut out, &format!("{p}.output.dense"), h, i);
                    norm(&mut out, &format!("{p}.output.LayerNorm"));
                }
                // The pooler: a bare BERT's or RoBERTa's, and BERT's classifier's; the
                // classifiers' own heads after it.
                match (self.classifier_labels, distil, roberta) {
                    (None, false, _) => dense(&mut out, &format!("{base}pooler.dense"), h, h),
                    (Some(_), false, false) if !self.token_classifier => {
                        dense(&mut out, &format!("{base}pooler.dense"), h, h);
                    }
                    _ => {}
                }
                if let Some(labels) = self.classifier_labels {
                    match (distil, roberta) {
                        _ if self.token_classifier => dense(&mut out, "classifier", labels, h),
                        (true, _) => {
                            dense(&mut out, "pre_classifier", h, h);
                            dense(&mut out, "classifier", labels, h);
                        }
                        (_, true) => {
                            dense(&mut out, "classifier.dense", h, h);
                            dense(&mut out, "classifier.out_proj", labels, h);
                        }
                        _ => dense(&mut out, "classifier", labels, h),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelShape {
        let config: serde_json::Value =
            serde_json::from_str(include_str!("../../../shared/refs/smollm2_config.json"))
                .expect("config");
        ModelShape::from_config(&config).expect("shape")
    }

    #[test]
    fn reads_smollm2_and_sizes_its_tensors_exactly() {
        let shape = smollm2();
        assert_eq!(
            (
                shape.family,
                shape.layers,
                shape.heads,
                shape.kv_heads,
                shape.head_dim
            ),
            (Family::Llama, 30, 9, 3, 64)
        );
        assert!(shape.tie_word_embeddings);
        let params: u64 = shape.tensors().iter().map(|t| t.elements()).sum();
        assert_eq!(params, 134_515_008, "SmolLM2-135M's parameter count");
    }

    #[test]
    fn minilm_config_gives_its_parameter_count() {
        let config: serde_json::Value =
            serde_json::from_str(include_str!("../../../shared/refs/minilm_config.json"))
                .expect("config");
        let shape = ModelShape::from_config(&config).expect("shape");
        let params: u64 = shape.tensors().iter().map(|t| t.elements()).sum();
        assert_eq!(
            params, 22_713_216,
            "all-MiniLM-L6-v2's parameter count (without position ids)"
        );
        assert_eq!(
            shape.reserve(8, 128, TensorDType::F32).kv_per_block,
            0,
            "encoders keep no KV cache"
        );
    }

    #[test]
    fn the_kv_cache_scales_with_batch_length_and_kv_heads() {
        let shape = smollm2();
        let r = shape.reserve(1, 2048, TensorDType::F32);
        assert_eq!(r.kv_per_block, 2 * 2048 * 3 * 64 * 4);
        assert_eq!(
            shape.reserve(4, 2048, TensorDType::F32).kv_per_block,
            4 * r.kv_per_block
        );
        assert_eq!(
            shape.reserve(1, 2048, TensorDType::BF16).kv_per_block,
            r.kv_per_block / 2
        );
    }

    /// From config.json alone, the tensors of the checkpoints transformers writes for
    /// every decoder family (handlers' decoder fixtures list theirs): names and shapes,
    /// fused projections, qk-norms, every norm and experts included.
    #[test]
    fn config_alone_lists_the_checkpoints_tensors_of_the_decoder_fixtures() {
        config_alone_lists_the_fixtures_tensors("decoders", &["config.json", "config.t4.json"], 15);
    }

    /// The same for the encoder fixtures: BERT's, RoBERTa's, XLM-RoBERTa's, DistilBERT's and
    /// ModernBERT's sequence classifiers (prefixes, poolers, heads, DistilBERT's and
    /// ModernBERT's names, ModernBERT's missing biases).
    #[test]
    fn config_alone_lists_the_checkpoints_tensors_of_the_encoder_fixtures() {
        config_alone_lists_the_fixtures_tensors("encoders", &["config.json"], 7);
    }

    fn config_alone_lists_the_fixtures_tensors(kind: &str, files: &[&str], at_least: usize) {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../handlers/tests/fixtures")
            .join(kind);
        let read = |path: std::path::PathBuf| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("json")
        };
        let mut families: Vec<String> = std::fs::read_dir(&fixtures)
            .expect("fixtures")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        families.sort();
        assert!(families.len() >= at_least, "{families:?}");
        for family in &families {
            for file in files {
                let shape = ModelShape::from_config(&read(fixtures.join(family).join(file)))
                    .expect("shape");
                let mut ours: Vec<(String, Vec<usize>)> = shape
                    .tensors()
                    .into_iter()
                    .map(|t| (t.name, t.shape))
                    .collect();
                ours.sort();
                let manifest = read(fixtures.join(family).join("tensors.json"));
                let mut theirs: Vec<(String, Vec<usize>)> = manifest["tensors"]
                    .as_array()
                    .expect("tensors")
                    .iter()
                    .map(|t| {
                        (
                            t["name"].as_str().expect("name").to_string(),
                            serde_json::from_value(t["shape"].clone()).expect("shape"),
                        )
                    })
                    .collect();
                theirs.sort();
                assert_eq!(ours, theirs, "{family} ({file})");
            }
        }
    }

    #[test]
    fn unknown_families_are_named() {
        let err = ModelShape::from_config(&serde_json::json!({"model_type": "gptj"}))
            .expect_err("unknown");
        assert!(err.contains("gptj"), "{err}");
    }
}
