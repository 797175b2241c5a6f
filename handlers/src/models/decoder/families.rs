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
}

/// One family: what its config.json's `model_type` or `architectures` say, and its graph.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// The name `plan` and errors use.
    pub name: &'static str,
    pub model_types: &'static [&'static str],
    pub architectures: &'static [&'static str],
    pub norms: NormPlacement,
    pub qk_norm: QkNorm,
    pub projections: Projections,
    /// Whether `sliding_window` means an attention window in this family (else a
    /// `sliding_window` in its config is refused by name).
    pub sliding_window: bool,
    /// Granite's `embedding_multiplier`, `residual_multiplier`, `attention_multiplier`
    /// and `logits_scaling`.
    pub multipliers: bool,
    /// transformers' `rms_norm_eps` default for the family.
    pub default_eps: f64,
}

const LLAMA: Family = Family {
    name: "llama",
    model_types: &["llama", "smollm", "smollm2"],
    architectures: &["LlamaForCausalLM"],
    norms: NormPlacement::Pre,
    qk_norm: QkNorm::None,
    projections: Projections::Separate,
    sliding_window: false,
    multipliers: false,
    default_eps: 1e-6,
};

/// Every family, in the order `plan` lists them.
pub const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        name: "mistral",
        model_types: &["mistral"],
        architectures: &["MistralForCausalLM"],
        sliding_window: true,
        ..LLAMA
    },
    Family {
        name: "qwen2",
        model_types: &["qwen2"],
        architectures: &["Qwen2ForCausalLM"],
        sliding_window: true,
        ..LLAMA
    },
    Family {
        name: "qwen3",
        model_types: &["qwen3"],
        architectures: &["Qwen3ForCausalLM"],
        qk_norm: QkNorm::PerHead,
        sliding_window: true,
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
        sliding_window: true,
        default_eps: 1e-5,
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
        assert!(family_of("gpt2", &["GPT2LMHeadModel"]).is_none());
        let mut types = served_model_types();
        let all = types.len();
        types.sort();
        types.dedup();
        assert_eq!(types.len(), all, "a model_type names two families");
    }
}
