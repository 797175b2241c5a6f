//! The decoder families Spillway serves, as data: each is a row naming its
//! `model_type`s and `architectures` and what sets its graph apart from Llama's. The one
//! decoder ([`super::MappedDecoder`]) runs any row; a new family that only recombines
//! what the rows below already describe is a new row, not a new file.

/// Where a block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + attn(norm(x))`, then `h + mlp(norm(h))` (Llama and most).
    Pre,
    /// `x + norm(attn(x))`, then `h + norm(mlp(h))` (OLMo 2: no norm on the way in).
    Post,
    /// `x + norm(attn(norm(x)))`, then `h + norm(mlp(norm(h)))` (Gemma 2 and 3: four
    /// norms a block).
    Sandwich,
    /// `x + attn(norm₁(x)) + mlp(norm₂(x))`: both branches read the block's input
    /// (GPT-NeoX, unless `use_parallel_residual` is false: then [`Self::Pre`]).
    Parallel,
}

/// The norms' kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// LayerNorm with a bias (GPT-NeoX, BLOOM).
    Layer,
}

/// How attention knows positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    Rope,
    /// ALiBi: a per-head linear bias on the scores by key position (BLOOM).
    Alibi,
    /// A learned table of absolute positions added to the embeddings (GPT-2's `wpe`).
    Learned,
}

/// What an RMSNorm multiplies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeight {
    /// `w` (Llama and most).
    Plain,
    /// `1 + w`: the checkpoint stores the offset from one (Gemma).
    OffsetFromOne,
}

/// The gated MLP's activation, `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`; Gemma's, BLOOM's).
    GeluTanh,
    /// GELU with erf (GPT-NeoX's `gelu`).
    Gelu,
}

/// Which layers attend through a sliding window when config.json gives a
/// `sliding_window` and no `layer_types` (transformers 4's rules, per family).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRule {
    /// The family has no windows: a `sliding_window` is refused by name.
    Never,
    /// Every layer (Mistral, Phi-3), unless `use_sliding_window` is false.
    Every,
    /// With `use_sliding_window`, the layers from `max_window_layers` on (Qwen 2 and 3).
    FromMaxWindowLayers,
    /// Even layers slide, odd ones see everything (Gemma 2).
    Alternating,
    /// All but every `sliding_window_pattern`-th layer slide (Gemma 3; the default
    /// pattern is given).
    Pattern(usize),
}

/// RMSNorm on the queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen 3).
    PerHead,
    /// Over the whole projection, all heads at once (OLMo 2).
    Whole,
}

/// How a family's checkpoint stores its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projections {
    /// `q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`.
    Separate,
    /// `qkv_proj` (q, then k, then v rows) and `gate_up_proj` (gate rows, then up): Phi-3.
    Fused,
    /// `query_key_value` with each head's q, k and v rows together, and an ungated MLP
    /// `dense_h_to_4h`, `dense_4h_to_h` (GPT-NeoX, BLOOM).
    PerHead,
    /// GPT-2's `Conv1D`s, weights stored `[in, out]`: `c_attn` (q, then k, then v
    /// columns), `c_proj`; an ungated MLP `c_fc`, `c_proj`.
    Conv1D,
}

/// Where a family's checkpoint keeps its modules. Checkpoints saved from the bare model
/// (BLOOM's on the Hub) lack the `prefix`; both are read.
#[derive(Debug, PartialEq)]
pub struct Names {
    /// `model`, `transformer`, `gpt_neox`.
    pub prefix: &'static str,
    pub embeddings: &'static str,
    /// A norm right after the embeddings (BLOOM's `word_embeddings_layernorm`).
    pub embedding_norm: Option<&'static str>,
    pub blocks: &'static str,
    /// The learned position table (GPT-2's `wpe`).
    pub position_embeddings: Option<&'static str>,
    /// A block's two norms where they sit before attention and before the MLP.
    pub block_norms: [&'static str; 2],
    pub final_norm: &'static str,
    /// The untied head, outside the prefix.
    pub head: &'static str,
    /// Attention within a block, and its output projection.
    pub attention: &'static str,
    pub attention_output: &'static str,
}

const LLAMA_NAMES: Names = Names {
    prefix: "model",
    embeddings: "embed_tokens",
    embedding_norm: None,
    blocks: "layers",
    position_embeddings: None,
    block_norms: ["input_layernorm", "post_attention_layernorm"],
    final_norm: "norm",
    head: "lm_head",
    attention: "self_attn",
    attention_output: "o_proj",
};

/// A family's mixture of experts: where it sits in a block and how the checkpoint
/// names it (`<module>.gate` the router, `<module>.experts.N.<projection>`).
#[derive(Debug, PartialEq)]
pub struct Experts {
    /// `block_sparse_moe` (Mixtral) or `mlp` (Qwen 3 MoE).
    pub module: &'static str,
    /// Each expert's gate, up and down projections.
    pub projections: [&'static str; 3],
    /// The chosen experts' weights always sum to one (Mixtral); else config.json's
    /// `norm_topk_prob` says.
    pub always_normalized: bool,
}

/// One family: what its config.json's `model_type` or `architectures` say, and its graph.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// The name `plan` and errors use.
    pub name: &'static str,
    pub names: &'static Names,
    pub norm_kind: NormKind,
    pub positions: Positions,
    pub model_types: &'static [&'static str],
    pub architectures: &'static [&'static str],
    pub norms: NormPlacement,
    pub qk_norm: QkNorm,
    pub projections: Projections,
    pub norm_weight: NormWeight,
    /// The activation where config.json names none.
    pub activation: Activation,
    /// Which layers a `sliding_window` applies to.
    pub windows: WindowRule,
    /// Granite's `embedding_multiplier`, `residual_multiplier`, `attention_multiplier`
    /// and `logits_scaling`.
    pub multipliers: bool,
    /// Embeddings times `sqrt(hidden_size)` (Gemma).
    pub scaled_embeddings: bool,
    /// Gemma 2 and 3: scores scaled by `query_pre_attn_scalar^-0.5`, and tanh
    /// soft-capping of scores and logits (`attn_logit_softcapping`,
    /// `final_logit_softcapping`) where config.json sets it.
    pub gemma_attention: bool,
    /// The RoPE base of sliding layers where config.json gives none (Gemma 3's
    /// `rope_local_base_freq`); `None`: sliding layers share the global RoPE.
    pub local_rope_theta: Option<f64>,
    /// transformers' `rms_norm_eps` default for the family.
    pub default_eps: f64,
    /// transformers' `tie_word_embeddings` default for the family.
    pub tied_by_default: bool,
    /// Sparse MLPs of routed experts (`None`: every MLP is dense).
    pub experts: Option<Experts>,
}

const LLAMA: Family = Family {
    name: "llama",
    names: &LLAMA_NAMES,
    norm_kind: NormKind::Rms,
    positions: Positions::Rope,
    model_types: &["llama", "smollm", "smollm2"],
    architectures: &["LlamaForCausalLM"],
    norms: NormPlacement::Pre,
    qk_norm: QkNorm::None,
    projections: Projections::Separate,
    norm_weight: NormWeight::Plain,
    activation: Activation::Silu,
    windows: WindowRule::Never,
    multipliers: false,
    scaled_embeddings: false,
    gemma_attention: false,
    local_rope_theta: None,
    default_eps: 1e-6,
    tied_by_default: false,
    experts: None,
};

/// Gemma 1: Llama's graph with `1 + w` norms, scaled embeddings and GELU.
const GEMMA: Family = Family {
    name: "gemma",
    model_types: &["gemma"],
    architectures: &["GemmaForCausalLM"],
    norm_weight: NormWeight::OffsetFromOne,
    activation: Activation::GeluTanh,
    scaled_embeddings: true,
    tied_by_default: true,
    ..LLAMA
};

/// Every family, in the order `plan` lists them.
pub const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        name: "mistral",
        model_types: &["mistral"],
        architectures: &["MistralForCausalLM"],
        windows: WindowRule::Every,
        ..LLAMA
    },
    Family {
        name: "qwen2",
        model_types: &["qwen2"],
        architectures: &["Qwen2ForCausalLM"],
        windows: WindowRule::FromMaxWindowLayers,
        ..LLAMA
    },
    Family {
        name: "qwen3",
        model_types: &["qwen3"],
        architectures: &["Qwen3ForCausalLM"],
        qk_norm: QkNorm::PerHead,
        windows: WindowRule::FromMaxWindowLayers,
        ..LLAMA
    },
    Family {
        name: "granite",
        model_types: &["granite"],
        architectures: &["GraniteForCausalLM"],
        multipliers: true,
        ..LLAMA
    },
    Family {
        name: "olmo2",
        model_types: &["olmo2"],
        architectures: &["Olmo2ForCausalLM"],
        norms: NormPlacement::Post,
        qk_norm: QkNorm::Whole,
        default_eps: 1e-5,
        ..LLAMA
    },
    Family {
        name: "phi3",
        model_types: &["phi3"],
        architectures: &["Phi3ForCausalLM"],
        projections: Projections::Fused,
        windows: WindowRule::Every,
        default_eps: 1e-5,
        ..LLAMA
    },
    GEMMA,
    Family {
        name: "gemma2",
        model_types: &["gemma2"],
        architectures: &["Gemma2ForCausalLM"],
        norms: NormPlacement::Sandwich,
        windows: WindowRule::Alternating,
        gemma_attention: true,
        ..GEMMA
    },
    // The text model alone; Gemma3ForConditionalGeneration (model_type gemma3, with a
    // vision tower and `language_model.` weights) is not this row.
    Family {
        name: "gemma3",
        model_types: &["gemma3_text"],
        architectures: &["Gemma3ForCausalLM"],
        norms: NormPlacement::Sandwich,
        qk_norm: QkNorm::PerHead,
        windows: WindowRule::Pattern(6),
        gemma_attention: true,
        local_rope_theta: Some(10_000.0),
        ..GEMMA
    },
    Family {
        name: "mixtral",
        model_types: &["mixtral"],
        architectures: &["MixtralForCausalLM"],
        windows: WindowRule::Every,
        experts: Some(Experts {
            module: "block_sparse_moe",
            projections: ["w1", "w3", "w2"],
            always_normalized: true,
        }),
        ..LLAMA
    },
    Family {
        name: "qwen3_moe",
        model_types: &["qwen3_moe"],
        architectures: &["Qwen3MoeForCausalLM"],
        qk_norm: QkNorm::PerHead,
        windows: WindowRule::FromMaxWindowLayers,
        experts: Some(Experts {
            module: "mlp",
            projections: ["gate_proj", "up_proj", "down_proj"],
            always_normalized: false,
        }),
        ..LLAMA
    },
    // Pythia and GPT-NeoX-20B: partial rotary (`rotary_pct`), LayerNorm, parallel
    // residual, an ungated erf-GELU MLP, biases everywhere.
    Family {
        name: "gpt_neox",
        names: &Names {
            prefix: "gpt_neox",
            embeddings: "embed_in",
            embedding_norm: None,
            blocks: "layers",
            position_embeddings: None,
            block_norms: ["input_layernorm", "post_attention_layernorm"],
            final_norm: "final_layer_norm",
            head: "embed_out",
            attention: "attention",
            attention_output: "dense",
        },
        model_types: &["gpt_neox"],
        architectures: &["GPTNeoXForCausalLM"],
        norms: NormPlacement::Parallel,
        norm_kind: NormKind::Layer,
        projections: Projections::PerHead,
        activation: Activation::Gelu,
        default_eps: 1e-5,
        ..LLAMA
    },
    // TorchServe's accelerate example: ALiBi, LayerNorm after the embeddings too, an
    // ungated tanh-GELU MLP, tied head.
    Family {
        name: "bloom",
        names: &Names {
            prefix: "transformer",
            embeddings: "word_embeddings",
            embedding_norm: Some("word_embeddings_layernorm"),
            blocks: "h",
            position_embeddings: None,
            block_norms: ["input_layernorm", "post_attention_layernorm"],
            final_norm: "ln_f",
            head: "lm_head",
            attention: "self_attention",
            attention_output: "dense",
        },
        model_types: &["bloom"],
        architectures: &["BloomForCausalLM"],
        norm_kind: NormKind::Layer,
        positions: Positions::Alibi,
        projections: Projections::PerHead,
        activation: Activation::GeluTanh,
        default_eps: 1e-5,
        tied_by_default: true,
        ..LLAMA
    },
    // Learned absolute positions, LayerNorm, Conv1D weights, an ungated tanh-GELU MLP;
    // the Hub's checkpoints lack the `transformer.` prefix.
    Family {
        name: "gpt2",
        names: &Names {
            prefix: "transformer",
            embeddings: "wte",
            embedding_norm: None,
            blocks: "h",
            position_embeddings: Some("wpe"),
            block_norms: ["ln_1", "ln_2"],
            final_norm: "ln_f",
            head: "lm_head",
            attention: "attn",
            attention_output: "c_proj",
        },
        model_types: &["gpt2"],
        architectures: &["GPT2LMHeadModel"],
        norm_kind: NormKind::Layer,
        positions: Positions::Learned,
        projections: Projections::Conv1D,
        activation: Activation::GeluTanh,
        default_eps: 1e-5,
        tied_by_default: true,
        ..LLAMA
    },
];

/// The family of a config.json: by `model_type`, else by its first `architectures` entry.
pub fn family_of(model_type: &str, architectures: &[&str]) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type))
        .or_else(|| {
            FAMILIES.iter().find(|f| {
                architectures
                    .first()
                    .is_some_and(|a| f.architectures.contains(a))
            })
        })
}

/// The `model_type`s served, for errors and docs.
pub fn served_model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_found_by_model_type_or_architecture_and_names_are_unique() {
        assert_eq!(family_of("qwen3", &[]).map(|f| f.name), Some("qwen3"));
        assert_eq!(
            family_of("", &["Phi3ForCausalLM"]).map(|f| f.name),
            Some("phi3")
        );
        assert_eq!(family_of("smollm2", &[]).map(|f| f.name), Some("llama"));
        assert!(family_of("gptj", &["GPTJForCausalLM"]).is_none());
        let mut types = served_model_types();
        let all = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), all, "a model_type names two families");
    }
}
