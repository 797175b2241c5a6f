//! [`DecoderSpec`]: everything a decoder's graph depends on, read once from config.json —
//! in transformers 4's spelling (`rope_theta` and `rope_scaling` at the top, `torch_dtype`)
//! or 5's (`rope_parameters` holding both, `layer_types`) — and checked: a key that
//! changes the computation and that the spec does not model is refused by name.

use serde_json::Value;

use super::families::{
    Activation, Family, NormKind, NormPlacement, Positions, Projections, WindowRule, family_of,
    served_model_types,
};
use crate::HandlerError;

/// RoPE: the base, the scaling, and how much of each head rotates.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub theta: f64,
    /// `rope_type` and its parameters (`factor`, ...), `None` for the default.
    pub scaling: Option<Value>,
    /// Dimensions of each head that rotate (`partial_rotary_factor` × `head_dim`, even).
    pub rotary_dim: usize,
}

/// A mixture of experts: each token's MLP is the weighted sum of its `per_token`
/// highest-scoring experts' (softmax over the router's logits).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub per_token: usize,
    /// The chosen experts' weights are divided by their sum.
    pub normalize: bool,
    /// Each expert's intermediate width.
    pub intermediate_size: usize,
    /// Per layer: routed experts (true) or the dense MLP of `intermediate_size`.
    pub sparse: Vec<bool>,
}

/// A decoder, as its config.json describes it.
#[derive(Debug, Clone)]
pub struct DecoderSpec {
    pub family: &'static Family,
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The norms' epsilon (`rms_norm_eps`, `layer_norm_eps` or `layer_norm_epsilon`).
    pub rms_norm_eps: f64,
    /// Where the norms sit: the family's, unless config.json turns GPT-NeoX's parallel
    /// residual off.
    pub norms: NormPlacement,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// RoPE of full-attention layers (and of sliding ones where `local_rope` is `None`).
    pub rope: RopeSpec,
    /// RoPE of sliding-window layers where it differs (Gemma 3's local base).
    pub local_rope: Option<RopeSpec>,
    /// The gated MLP's activation.
    pub activation: Activation,
    /// Each layer's attention window (`None`: the whole context). A key at distance
    /// `window` or more behind a query is not attended to (transformers'
    /// `kv_idx > q_idx - sliding_window`).
    pub windows: Vec<Option<usize>>,
    /// Multiplies the embeddings (Granite).
    pub embedding_multiplier: f64,
    /// Multiplies each block's attention and MLP outputs before the residual add (Granite).
    pub residual_multiplier: f64,
    /// The attention scores' scale; `1/sqrt(head_dim)` unless the family sets one (Granite's
    /// `attention_multiplier`).
    pub attention_scale: f64,
    /// Divides the logits (Granite's `logits_scaling`).
    pub logits_divisor: f64,
    /// Attention scores become `cap × tanh(score / cap)` (Gemma 2).
    pub attention_softcap: Option<f64>,
    /// Logits become `cap × tanh(logit / cap)` (Gemma 2).
    pub logit_softcap: Option<f64>,
    /// Routed experts (Mixtral, Qwen 3 MoE).
    pub moe: Option<MoeSpec>,
    pub eos_token_id: Option<Value>,
}

fn bad(reason: impl std::fmt::Display) -> HandlerError {
    HandlerError::bad_file("config.json", reason)
}

fn refuse(family: &Family, key: &str, value: &Value, why: &str) -> HandlerError {
    HandlerError::Unsupported(format!(
        "config.json `{key}` = {value} ({why}) is not implemented for {}; refused rather than served with different math",
        family.name
    ))
}

impl DecoderSpec {
    /// Reads and checks config.json.
    pub fn from_config(config: &Value) -> Result<Self, HandlerError> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let architectures: Vec<&str> = config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let family = family_of(&model_type, &architectures).ok_or_else(|| {
            HandlerError::Unsupported(format!(
                "text_generation serves the decoder families {}; this model's model_type is {model_type:?}{}",
                served_model_types().join(", "),
                architectures
                    .first()
                    .map(|a| format!(" ({a})"))
                    .unwrap_or_default()
            ))
        })?;
        let present = |key: &str| config.get(key).filter(|v| !v.is_null());
        let count = |key: &str| -> Result<Option<usize>, HandlerError> {
            match present(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{key}` is {v}, not a positive whole number"))),
            }
        };
        let need = |key: &str| count(key)?.ok_or_else(|| bad(format!("`{key}` is missing")));
        let number = |key: &str, default: f64| -> Result<f64, HandlerError> {
            match present(key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| bad(format!("`{key}` is {v}, not a number"))),
            }
        };
        // GPT-2's and BLOOM's own spellings where transformers' are absent.
        let either = |keys: &[&str]| -> Result<usize, HandlerError> {
            for &key in keys {
                if let Some(n) = count(key)? {
                    return Ok(n);
                }
            }
            Err(bad(format!("`{}` is missing", keys[0])))
        };
        let hidden_size = either(&["hidden_size", "n_embed", "n_embd"])?;
        let heads = either(&["num_attention_heads", "n_head"])?;
        let kv_heads = count("num_key_value_heads")?.unwrap_or(heads);
        let layers = either(&["num_hidden_layers", "n_layer"])?;
        if heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} attention heads are not groups of {kv_heads} key/value heads"
            )));
        }
        let head_dim = count("head_dim")?.unwrap_or(hidden_size / heads);

        // What the spec does not model, by name.
        let activation = activation(config, family)?;
        let softcap = |key: &str| -> Result<Option<f64>, HandlerError> {
            match present(key) {
                None => Ok(None),
                Some(v) if !family.gemma_attention => Err(refuse(family, key, v, "soft-capping")),
                Some(v) => v
                    .as_f64()
                    .filter(|c| *c > 0.0)
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{key}` is {v}, not a positive number"))),
            }
        };
        let attention_softcap = softcap("attn_logit_softcapping")?;
        let logit_softcap = softcap("final_logit_softcapping")?;
        if let Some(v) = present("query_pre_attn_scalar")
            && !family.gemma_attention
        {
            return Err(refuse(family, "query_pre_attn_scalar", v, "a score scale"));
        }
        if !family.multipliers {
            for key in [
                "embedding_multiplier",
                "residual_multiplier",
                "attention_multiplier",
                "logits_scaling",
            ] {
                if let Some(v) = present(key)
                    && v.as_f64() != Some(1.0)
                {
                    return Err(refuse(family, key, v, "a Granite multiplier"));
                }
            }
        }

        let (rope, local_rope) = rope_specs(config, family, head_dim)?;
        // Ungated MLPs default to four times the width (BLOOM states none).
        let intermediate_size = match (
            count("intermediate_size")?.or(count("n_inner")?),
            family.projections,
        ) {
            (Some(i), _) => i,
            (None, Projections::PerHead | Projections::Conv1D) => 4 * hidden_size,
            (None, _) => need("intermediate_size")?,
        };
        // Switches whose other setting is math the graph does not have.
        for (key, served, why) in [
            (
                "use_bidirectional_attention",
                false,
                "attention without a causal mask",
            ),
            (
                "apply_residual_connection_post_layernorm",
                false,
                "a residual taken after the norm",
            ),
            (
                "scale_attn_by_inverse_layer_idx",
                false,
                "GPT-2's other attention",
            ),
            ("scale_attn_weights", true, "GPT-2's other attention"),
            ("add_cross_attention", false, "GPT-2's other attention"),
        ] {
            if let Some(v) = present(key)
                && v.as_bool() != Some(served)
            {
                return Err(refuse(family, key, v, why));
            }
        }
        let norms = match family.norms {
            NormPlacement::Parallel
                if present("use_parallel_residual").and_then(Value::as_bool) == Some(false) =>
            {
                NormPlacement::Pre
            }
            placement => placement,
        };
        if let Some(v) = present("slow_but_exact")
            && v.as_bool() == Some(true)
            && count("pretraining_tp")?.unwrap_or(1) > 1
        {
            return Err(refuse(
                family,
                "slow_but_exact",
                v,
                "BLOOM's sliced matmuls",
            ));
        }
        let moe = match &family.experts {
            None => None,
            Some(experts) => {
                // transformers 5 writes `num_local_experts`, Qwen's own configs `num_experts`.
                let total = count("num_local_experts")?
                    .or(count("num_experts")?)
                    .ok_or_else(|| bad("`num_local_experts` (or `num_experts`) is missing"))?;
                let per_token = need("num_experts_per_tok")?;
                if per_token > total {
                    return Err(bad(format!(
                        "{per_token} experts per token of {total} experts"
                    )));
                }
                let dense: Vec<u64> = present("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|l| l.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                let step = count("decoder_sparse_step")?.unwrap_or(1);
                Some(MoeSpec {
                    experts: total,
                    per_token,
                    normalize: experts.always_normalized
                        || present("norm_topk_prob").and_then(Value::as_bool) == Some(true),
                    intermediate_size: count("moe_intermediate_size")?.unwrap_or(intermediate_size),
                    sparse: (0..layers)
                        .map(|i| !dense.contains(&(i as u64)) && (i + 1) % step == 0)
                        .collect(),
                })
            }
        };
        for key in ["shared_expert_intermediate_size", "n_shared_experts"] {
            if let Some(v) = present(key)
                && v.as_u64() != Some(0)
            {
                return Err(refuse(family, key, v, "a shared expert"));
            }
        }
        let max_position_embeddings = count("max_position_embeddings")?
            .or(count("n_positions")?)
            .unwrap_or(4096);
        let windows = windows(config, family, layers)?;
        let multiplier = |key: &str, default: f64| match family.multipliers {
            true => number(key, default),
            false => Ok(default),
        };
        let attention_scale = if family.multipliers && present("attention_multiplier").is_some() {
            number("attention_multiplier", 1.0)?
        } else if family.gemma_attention {
            // transformers' default where config.json leaves it out.
            number("query_pre_attn_scalar", 256.0)?.powf(-0.5)
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        // Gemma multiplies by sqrt(hidden_size) as a float32 tensor.
        let embedding_multiplier = match family.scaled_embeddings {
            true => f64::from((hidden_size as f32).sqrt()),
            false => multiplier("embedding_multiplier", 1.0)?,
        };
        Ok(Self {
            family,
            model_type,
            hidden_size,
            intermediate_size,
            vocab_size: need("vocab_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            kv_heads,
            head_dim,
            rms_norm_eps: match ["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"]
                .into_iter()
                .find(|k| present(k).is_some())
            {
                Some(key) => number(key, family.default_eps)?,
                None => family.default_eps,
            },
            norms,
            max_position_embeddings,
            tie_word_embeddings: present("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(family.tied_by_default),
            rope,
            local_rope,
            activation,
            windows,
            embedding_multiplier,
            residual_multiplier: multiplier("residual_multiplier", 1.0)?,
            attention_scale,
            logits_divisor: multiplier("logits_scaling", 1.0)?,
            attention_softcap,
            logit_softcap,
            moe,
            eos_token_id: present("eos_token_id").cloned(),
        })
    }

    /// Positions a sequence may use: `max_position_embeddings` (a sliding window bounds
    /// what each position attends to, not how long a sequence may be), stretched by a
    /// dynamic NTK scaling's factor ([`RopeSpec::served_positions`]).
    pub fn positions(&self) -> usize {
        self.rope.served_positions(self.max_position_embeddings)
    }

    /// End-of-sequence ids (`eos_token_id`: one id or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(ids)) => ids
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|n| n as u32)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the keys a position gets depend on how long its sequence grows: LongRoPE
    /// whose long set applies within the model's positions (a sequence switches sets past
    /// the original context), and dynamic NTK scaling past it (the base grows with the
    /// sequence). A prefix's cached keys are then not the same for every
    /// sequence sharing it, so neither the decoder nor the planner keeps a prefix cache.
    pub fn keys_depend_on_length(&self) -> bool {
        let switches = |rope: &RopeSpec| {
            matches!(rope.long_context_within(self.positions()), Ok(Some(_)))
                || matches!(rope.dynamic_ntk(), Ok(Some((original, _))) if original < self.positions())
        };
        switches(&self.rope) || self.local_rope.as_ref().is_some_and(switches)
    }

    /// The spec as `plan` prints it: the family and what sets this model apart.
    pub fn describe(&self) -> String {
        let mut parts = vec![
            format!("family {}", self.family.name),
            format!(
                "{} layers, {} heads ({} key/value) of {}",
                self.num_hidden_layers, self.num_attention_heads, self.kv_heads, self.head_dim
            ),
        ];
        match self.family.positions {
            Positions::Rope => {
                parts.push(format!("rope theta {}", self.rope.theta));
                if let Some(kind) = self.rope.scaling.as_ref().and_then(|s| s.get("rope_type")) {
                    parts.push(format!("rope scaling {kind}"));
                }
                if self.rope.rotary_dim != self.head_dim {
                    parts.push(format!("rotary dims {}", self.rope.rotary_dim));
                }
            }
            Positions::Alibi => parts.push("ALiBi".into()),
            Positions::Learned => parts.push("learned positions".into()),
        }
        if self.family.norm_kind == NormKind::Layer {
            parts.push("LayerNorm".into());
        }
        match self.norms {
            NormPlacement::Pre => {}
            NormPlacement::Post => parts.push("norms after each branch".into()),
            NormPlacement::Sandwich => parts.push("norms before and after each branch".into()),
            NormPlacement::Parallel => parts.push("parallel residual".into()),
        }
        let windowed = self.windows.iter().filter(|w| w.is_some()).count();
        if let Some(Some(w)) = self.windows.iter().find(|w| w.is_some()) {
            parts.push(format!("window {w} on {windowed} layers"));
        }
        if let Some(moe) = &self.moe {
            parts.push(format!(
                "{} of {} experts a token on {} layers",
                moe.per_token,
                moe.experts,
                moe.sparse.iter().filter(|s| **s).count()
            ));
        }
        if let Some(local) = &self.local_rope {
            parts.push(format!("sliding layers' rope theta {}", local.theta));
        }
        match self.activation {
            Activation::Silu => {}
            Activation::GeluTanh => parts.push("tanh-GELU".into()),
            Activation::Gelu => parts.push("GELU".into()),
        }
        if let Some(cap) = self.attention_softcap {
            parts.push(format!("scores capped at {cap}"));
        }
        if let Some(cap) = self.logit_softcap {
            parts.push(format!("logits capped at {cap}"));
        }
        parts.push(format!("{} positions", self.positions()));
        parts.join(", ")
    }
}

/// The gated MLP's activation: `hidden_activation` (Gemma 2 and 3 read it) or else
/// `hidden_act`. Gemma 1's `gelu` means the tanh approximation (transformers rewrites it).
fn activation(config: &Value, family: &Family) -> Result<Activation, HandlerError> {
    let (key, value) = match ["hidden_activation", "hidden_act", "activation_function"]
        .into_iter()
        .find_map(|k| config.get(k).filter(|v| !v.is_null()).map(|v| (k, v)))
    {
        None => return Ok(family.activation),
        Some(found) => found,
    };
    match value.as_str() {
        Some("silu" | "swish") => Ok(Activation::Silu),
        Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") => Ok(Activation::GeluTanh),
        Some("gelu") if family.activation == Activation::GeluTanh => Ok(Activation::GeluTanh),
        Some("gelu") => Ok(Activation::Gelu),
        _ => Err(refuse(family, key, value, "only SiLU and GELU MLPs are")),
    }
}

/// RoPE of full-attention layers and, where it differs, of sliding-window ones: from
/// `rope_parameters` (transformers 5; Gemma 3's keyed by layer type) or from
/// `rope_theta` / `rope_scaling` / `partial_rotary_factor` / `rope_local_base_freq`
/// (transformers 4).
fn rope_specs(
    config: &Value,
    family: &Family,
    head_dim: usize,
) -> Result<(RopeSpec, Option<RopeSpec>), HandlerError> {
    let present = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    let number = |k: &str| config.get(k).filter(|v| v.is_number());
    let context = &RopeContext {
        original: number("original_max_position_embeddings")
            .or_else(|| number("max_position_embeddings")),
        max_positions: number("max_position_embeddings"),
    };
    let (global, local) = match present(config.get("rope_parameters")) {
        Some(p) if !p.is_object() => {
            return Err(bad(format!("`rope_parameters` is {p}, not an object")));
        }
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => {
            let of = |kind: &str| -> Result<Option<RopeSpec>, HandlerError> {
                let label = format!("`rope_parameters.{kind}`");
                match p.get(kind).filter(|v| !v.is_null()) {
                    None => Ok(None),
                    Some(v) if !v.is_object() => Err(bad(format!("{label} is {v}, not an object"))),
                    Some(v) => rope_from_parameters(v, family, head_dim, &label, context).map(Some),
                }
            };
            let global = of("full_attention")?
                .ok_or_else(|| bad("`rope_parameters` has no `full_attention` entry"))?;
            (global, of("sliding_attention")?)
        }
        Some(p) => (
            rope_from_parameters(&p, family, head_dim, "`rope_parameters`", context)?,
            None,
        ),
        None => {
            let global = rope_spec(
                present(config.get("rope_theta"))
                    .or_else(|| present(config.get("rotary_emb_base"))),
                present(config.get("rope_scaling")),
                present(config.get("partial_rotary_factor"))
                    .or_else(|| present(config.get("rotary_pct"))),
                family,
                head_dim,
                "`rope_scaling`",
                context,
            )?;
            let local_theta = present(config.get("rope_local_base_freq"))
                .or_else(|| family.local_rope_theta.map(Value::from));
            let local = local_theta
                .map(|theta| {
                    rope_spec(
                        Some(theta),
                        None,
                        present(config.get("partial_rotary_factor")),
                        family,
                        head_dim,
                        "`rope_local_base_freq`",
                        context,
                    )
                })
                .transpose()?;
            (global, local)
        }
    };
    Ok((global.clone(), local.filter(|l| *l != global)))
}

/// What a RoPE scaling may need from the rest of config.json: the context the model was
/// pretrained with (`original_max_position_embeddings`, else `max_position_embeddings`)
/// and the one it is extended to.
struct RopeContext<'a> {
    original: Option<&'a Value>,
    max_positions: Option<&'a Value>,
}

/// transformers 5's RoPE parameters (`rope_theta`, `partial_rotary_factor` and the
/// scaling in one object).
fn rope_from_parameters(
    parameters: &Value,
    family: &Family,
    head_dim: usize,
    label: &str,
    context: &RopeContext,
) -> Result<RopeSpec, HandlerError> {
    let mut scaling = parameters.clone();
    let object = scaling
        .as_object_mut()
        .ok_or_else(|| bad(format!("{label} is {parameters}, not an object")))?;
    let theta = object.remove("rope_theta");
    let partial = object.remove("partial_rotary_factor");
    rope_spec(
        theta,
        Some(scaling),
        partial,
        family,
        head_dim,
        label,
        context,
    )
}

/// One RoPE from its base, scaling and partial-rotary factor (each as config.json has
/// it, absent as `None`); `label` names where they came from in errors.
fn rope_spec(
    theta: Option<Value>,
    scaling: Option<Value>,
    partial: Option<Value>,
    family: &Family,
    head_dim: usize,
    label: &str,
    context: &RopeContext,
) -> Result<RopeSpec, HandlerError> {
    let theta = match theta {
        None => 10_000.0,
        Some(v) => v
            .as_f64()
            .filter(|t| *t > 0.0)
            .ok_or_else(|| bad(format!("`rope_theta` is {v}, not a positive number")))?,
    };
    let partial = match partial {
        None => 1.0,
        Some(v) => v
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| bad(format!("`partial_rotary_factor` is {v}, not in (0, 1]")))?,
    };
    let rotary_dim = ((head_dim as f64 * partial) as usize) & !1;
    if rotary_dim == 0 {
        return Err(bad("`partial_rotary_factor` leaves no dimension to rotate"));
    }
    // `type` is transformers' older spelling of `rope_type`; the default is no scaling.
    let scaling = scaling.and_then(|mut s| {
        let mut kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        // Phi-3's early configs name LongRoPE `su` (and Phi-3.5-MoE's `yarn`), which
        // transformers' Phi3Config reads as longrope.
        if family.name == "phi3" && matches!(kind.as_str(), "su" | "yarn") {
            kind = "longrope".into();
        }
        if let Some(object) = s.as_object_mut() {
            object.remove("type");
            object.insert("rope_type".into(), Value::String(kind.clone()));
            // transformers' default where llama3, yarn or longrope scaling names no
            // original_max_position_embeddings: the config's own (Phi-3 keeps one at the
            // top), else max_position_embeddings.
            if matches!(kind.as_str(), "llama3" | "yarn" | "longrope")
                && !object.contains_key("original_max_position_embeddings")
                && let Some(original) = context.original
            {
                object.insert("original_max_position_embeddings".into(), original.clone());
            }
            // Dynamic NTK grows the base past the model's own context, which transformers
            // reads from max_position_embeddings whatever else the scaling says.
            if kind == "dynamic"
                && let Some(max) = context.max_positions
            {
                object.insert("original_max_position_embeddings".into(), max.clone());
            }
            // LongRoPE without a `factor` takes the extension's ratio (Phi-3: 131072 / 4096).
            if kind == "longrope"
                && !object.contains_key("factor")
                && let (Some(max), Some(original)) = (
                    context.max_positions.and_then(Value::as_f64),
                    object
                        .get("original_max_position_embeddings")
                        .and_then(Value::as_f64),
                )
                && original > 0.0
            {
                object.insert("factor".into(), Value::from(max / original));
            }
        }
        (kind != "default").then_some(s)
    });
    let rope = RopeSpec {
        theta,
        scaling,
        rotary_dim,
    };
    // An unknown or unimplemented scaling is refused here, before any weight is read.
    rope.inverse_frequencies().map_err(|e| match e {
        HandlerError::Unsupported(why) => {
            HandlerError::Unsupported(format!("config.json's {label} for {}: {why}", family.name))
        }
        other => other,
    })?;
    Ok(rope)
}

/// Each layer's attention window: transformers 5's `layer_types` where given; else
/// transformers 4's rule (Mistral and Phi-3: every layer; Qwen 2/3: with
/// `use_sliding_window`, the layers from `max_window_layers` on).
fn windows(
    config: &Value,
    family: &Family,
    layers: usize,
) -> Result<Vec<Option<usize>>, HandlerError> {
    let window = config
        .get("sliding_window")
        .filter(|v| !v.is_null())
        .map(|v| {
            v.as_u64()
                .filter(|&w| w > 0)
                .map(|w| w as usize)
                .ok_or_else(|| bad(format!("`sliding_window` is {v}, not a positive number")))
        })
        .transpose()?;
    let use_sliding = config.get("use_sliding_window").and_then(Value::as_bool);
    if let Some(types) = config.get("layer_types").filter(|v| !v.is_null()) {
        let types = types
            .as_array()
            .filter(|t| t.len() == layers)
            .ok_or_else(|| {
                bad(format!(
                    "`layer_types` does not name each of {layers} layers"
                ))
            })?;
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") if family.windows != WindowRule::Never => match window {
                    Some(w) => Ok(Some(w)),
                    None => Err(bad(
                        "`layer_types` has sliding layers but no `sliding_window`",
                    )),
                },
                _ => Err(refuse(
                    family,
                    "layer_types",
                    t,
                    "a layer type other than full_attention and sliding_attention",
                )),
            })
            .collect();
    }
    let Some(w) = window else {
        return Ok(vec![None; layers]);
    };
    let off = use_sliding == Some(false);
    let pattern = |default: usize| -> Result<usize, HandlerError> {
        match config
            .get("sliding_window_pattern")
            .filter(|v| !v.is_null())
        {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&p| p > 0)
                .map(|p| p as usize)
                .ok_or_else(|| {
                    bad(format!(
                        "`sliding_window_pattern` is {v}, not a positive number"
                    ))
                }),
        }
    };
    Ok(match family.windows {
        WindowRule::Never if off => vec![None; layers],
        WindowRule::Never => {
            return Err(refuse(
                family,
                "sliding_window",
                &Value::from(w),
                "an attention window",
            ));
        }
        _ if off => vec![None; layers],
        WindowRule::Every => vec![Some(w); layers],
        WindowRule::FromMaxWindowLayers => {
            if use_sliding != Some(true) {
                return Ok(vec![None; layers]);
            }
            let from = config
                .get("max_window_layers")
                .and_then(Value::as_u64)
                .map_or(layers, |n| n as usize);
            (0..layers).map(|i| (i >= from).then_some(w)).collect()
        }
        WindowRule::Alternating => (0..layers).map(|i| (i % 2 == 0).then_some(w)).collect(),
        WindowRule::Pattern(default) => {
            let every = pattern(default)?;
            (0..layers)
                .map(|i| ((i + 1) % every != 0).then_some(w))
                .collect()
        }
    })
}

impl RopeSpec {
    /// What the RoPE tables' cos and sin are multiplied by: YaRN's attention factor
    /// (`attention_factor`, else from `mscale`/`mscale_all_dim`, else
    /// `0.1·ln(factor) + 1`); LongRoPE's (`attention_factor`, else
    /// `sqrt(1 + ln(factor) / ln(original context))`); 1 for the others.
    pub fn attention_factor(&self) -> f64 {
        let Some(scaling) = &self.scaling else {
            return 1.0;
        };
        let number = |key: &str| scaling.get(key).and_then(Value::as_f64);
        let kind = scaling.get("rope_type").and_then(Value::as_str);
        if kind == Some("longrope") {
            // LongRoPE's: sqrt(1 + ln(factor) / ln(original context)), 1 when not extended.
            if let Some(factor) = number("attention_factor") {
                return factor;
            }
            let factor = number("factor").unwrap_or(1.0);
            return match number("original_max_position_embeddings") {
                Some(original) if factor > 1.0 && original > 1.0 => {
                    (1.0 + factor.ln() / original.ln()).sqrt()
                }
                _ => 1.0,
            };
        }
        if kind != Some("yarn") {
            return 1.0;
        }
        if let Some(factor) = number("attention_factor") {
            return factor;
        }
        let factor = number("factor").unwrap_or(1.0);
        let mscale = |m: f64| match factor <= 1.0 {
            true => 1.0,
            false => 0.1 * m * factor.ln() + 1.0,
        };
        match (number("mscale"), number("mscale_all_dim")) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
            _ => mscale(1.0),
        }
    }

    /// RoPE's inverse frequencies, `theta^(-2i/rotary_dim)`, with the scaling applied:
    /// none; `linear` (positions divided by `factor`); `llama3` (Llama 3.1's banded
    /// rescaling: long wavelengths divided by `factor`, short ones kept, a smooth blend
    /// between); `frequency_factors` (what a GGUF's `rope_freqs` tensor holds: each
    /// frequency divided by its own entry of `factors`, as llama.cpp does); `longrope`
    /// (each frequency divided by its `short_factor`: the set used while a sequence fits
    /// the original context; [`Self::long_context`] gives the other). Other types are
    /// refused rather than silently ignored.
    pub fn inverse_frequencies(&self) -> Result<Vec<f32>, HandlerError> {
        self.frequencies(false)
    }

    /// LongRoPE's second set: past `original` positions a sequence's new tokens use
    /// `(original, inverse frequencies divided by long_factor)`, as transformers switches
    /// when the sequence outgrows the pretrained context. `None` for other scalings.
    pub fn long_context(&self) -> Result<Option<(usize, Vec<f32>)>, HandlerError> {
        let Some(scaling) = &self.scaling else {
            return Ok(None);
        };
        if scaling.get("rope_type").and_then(Value::as_str) != Some("longrope") {
            return Ok(None);
        }
        let original = scaling
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                bad("rope scaling of type longrope needs `original_max_position_embeddings`")
            })?;
        Ok(Some((original as usize, self.frequencies(true)?)))
    }

    /// Dynamic NTK scaling's `(original context, factor)`: a sequence of `len` tokens
    /// past the original context rotates its new tokens with
    /// [`Self::frequencies_at_length`], as transformers recomputes the frequencies for each
    /// forward pass from the sequence's length. `None` for other scalings.
    pub fn dynamic_ntk(&self) -> Result<Option<(usize, f64)>, HandlerError> {
        let Some(scaling) = &self.scaling else {
            return Ok(None);
        };
        if scaling.get("rope_type").and_then(Value::as_str) != Some("dynamic") {
            return Ok(None);
        }
        let factor = (scaling.get("factor").and_then(Value::as_f64))
            .filter(|f| *f >= 1.0)
            .ok_or_else(|| bad("rope scaling of type dynamic needs a `factor` of at least 1"))?;
        let original = (scaling.get("original_max_position_embeddings"))
            .and_then(Value::as_u64)
            .filter(|o| *o > 0)
            .ok_or_else(|| bad("rope scaling of type dynamic needs `max_position_embeddings`"))?;
        Ok(Some((original as usize, factor)))
    }

    /// The inverse frequencies of a sequence `len` tokens long under dynamic NTK scaling:
    /// past the original context the base grows to
    /// `theta · (factor · len / original − (factor − 1))^(dim / (dim − 2))`; within it, or
    /// for another scaling, [`Self::inverse_frequencies`].
    pub fn frequencies_at_length(&self, len: usize) -> Result<Vec<f32>, HandlerError> {
        match self.dynamic_ntk()? {
            Some((original, factor)) if len > original => {
                let dim = self.rotary_dim as f64;
                let grown = factor * len as f64 / original as f64 - (factor - 1.0);
                let base = (self.theta * grown.powf(dim / (dim - 2.0))) as f32;
                Ok((0..self.rotary_dim)
                    .step_by(2)
                    .map(|i| 1f32 / base.powf(i as f32 / dim as f32))
                    .collect())
            }
            _ => self.inverse_frequencies(),
        }
    }

    /// The context a model of `max_position_embeddings` serves: dynamic NTK scaling
    /// stretches it by its factor (what vLLM serves such a model with); the others keep it.
    pub fn served_positions(&self, max_position_embeddings: usize) -> usize {
        match self.dynamic_ntk() {
            Ok(Some((_, factor))) => (max_position_embeddings as f64 * factor) as usize,
            _ => max_position_embeddings,
        }
    }

    /// [`Self::long_context`] where a sequence of up to `positions` reaches it (the long
    /// set applies only past the original context); `None` otherwise.
    pub fn long_context_within(
        &self,
        positions: usize,
    ) -> Result<Option<(usize, Vec<f32>)>, HandlerError> {
        Ok(self
            .long_context()?
            .filter(|(original, _)| *original < positions))
    }

    fn frequencies(&self, long: bool) -> Result<Vec<f32>, HandlerError> {
        let hd = self.rotary_dim;
        let theta = self.theta as f32;
        let base = (0..hd)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / hd as f32));
        let Some(scaling) = &self.scaling else {
            return Ok(base.collect());
        };
        let kind = scaling
            .get("rope_type")
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let number = |key: &str| -> Result<f32, HandlerError> {
            scaling
                .get(key)
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .ok_or_else(|| {
                    bad(format!(
                        "rope scaling of type {kind} needs a number `{key}`"
                    ))
                })
        };
        match kind {
            "default" => Ok(base.collect()),
            "linear" => {
                let factor = number("factor")?;
                Ok(base.map(|f| f / factor).collect())
            }
            // Within the original context dynamic NTK is the plain RoPE; past it see
            // `Self::dynamic_ntk`.
            "dynamic" => match self.dynamic_ntk()? {
                Some(_) => Ok(base.collect()),
                None => unreachable!("a dynamic scaling has its parameters"),
            },
            "llama3" => {
                let factor = number("factor")?;
                let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
                let original = number("original_max_position_embeddings")?;
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                Ok(base
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect())
            }
            "frequency_factors" => {
                let factors: Vec<f32> = scaling
                    .get("factors")
                    .and_then(|f| f.as_array())
                    .map(|f| {
                        f.iter()
                            .filter_map(|v| v.as_f64())
                            .map(|v| v as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                if factors.len() != hd / 2 || factors.iter().any(|f| f.is_nan() || *f <= 0.0) {
                    return Err(bad(format!(
                        "rope_scaling frequency_factors needs {} positive `factors`",
                        hd / 2
                    )));
                }
                Ok(base.zip(factors).map(|(f, factor)| f / factor).collect())
            }
            "longrope" => {
                let factors = |key: &str| -> Result<Vec<f32>, HandlerError> {
                    let values: Option<Vec<f32>> = scaling
                        .get(key)
                        .and_then(|f| f.as_array())
                        .and_then(|f| f.iter().map(|v| v.as_f64().map(|v| v as f32)).collect());
                    values
                        .filter(|f| f.len() == hd / 2 && f.iter().all(|f| *f > 0.0))
                        .ok_or_else(|| {
                            bad(format!(
                                "rope scaling of type longrope needs {} positive `{key}`s",
                                hd / 2
                            ))
                        })
                };
                let (short, long_factors) = (factors("short_factor")?, factors("long_factor")?);
                let chosen = if long { long_factors } else { short };
                Ok(base.zip(chosen).map(|(f, factor)| f / factor).collect())
            }
            "yarn" => {
                // YaRN: each frequency blends interpolated (÷ factor) and kept, by a
                // ramp over the dimensions whose wavelengths fall between beta_fast and
                // beta_slow rotations of the original context.
                let factor = number("factor")?;
                let original = number("original_max_position_embeddings")?;
                let optional = |key: &str, default: f32| {
                    scaling
                        .get(key)
                        .and_then(|v| v.as_f64())
                        .map_or(default, |v| v as f32)
                };
                let (beta_fast, beta_slow) =
                    (optional("beta_fast", 32.0), optional("beta_slow", 1.0));
                let dim = hd as f32;
                let correction = |rotations: f32| {
                    dim * (original / (rotations * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if scaling.get("truncate").and_then(|v| v.as_bool()) != Some(false) {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                Ok(base
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let kept = 1.0 - ramp;
                        (f / factor) * (1.0 - kept) + f * kept
                    })
                    .collect())
            }
            other => Err(HandlerError::Unsupported(format!(
                "rope_type `{other}` is not implemented (supported: default, linear, dynamic, llama3, yarn, longrope, frequency_factors)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(model_type: &str) -> Value {
        json!({
            "model_type": model_type, "hidden_size": 32, "intermediate_size": 64,
            "vocab_size": 100, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2,
        })
    }

    fn with(model_type: &str, extra: Value) -> Value {
        let mut config = base(model_type);
        for (k, v) in extra.as_object().expect("object") {
            config[k] = v.clone();
        }
        config
    }

    fn refusal(config: Value) -> String {
        match DecoderSpec::from_config(&config) {
            Err(HandlerError::Unsupported(why)) => why,
            other => panic!("{config} was not refused as unsupported: {other:?}"),
        }
    }

    #[test]
    fn both_spellings_of_rope_give_the_same_spec() {
        let t4 = with(
            "llama",
            json!({"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}}),
        );
        let t5 = with(
            "llama",
            json!({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}}),
        );
        let (a, b) = (
            DecoderSpec::from_config(&t4).expect("t4"),
            DecoderSpec::from_config(&t5).expect("t5"),
        );
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 500000.0);
        assert_eq!(
            a.rope.inverse_frequencies().expect("t4"),
            b.rope.inverse_frequencies().expect("t5")
        );
        // Not the unscaled table: the scaling is applied.
        let plain = DecoderSpec::from_config(&base("llama")).expect("plain");
        assert_ne!(
            plain.rope.inverse_frequencies().expect("plain"),
            a.rope.inverse_frequencies().expect("scaled")
        );
    }

    #[test]
    fn a_sliding_window_is_an_attention_window_not_the_context_length() {
        let mistral = DecoderSpec::from_config(&with(
            "mistral",
            json!({"sliding_window": 4096, "max_position_embeddings": 32768}),
        ))
        .expect("mistral");
        assert_eq!(mistral.positions(), 32768);
        assert_eq!(mistral.windows, vec![Some(4096); 3]);
        // Qwen's window applies only with use_sliding_window, from max_window_layers on.
        let qwen = |extra| DecoderSpec::from_config(&with("qwen2", extra)).expect("qwen2");
        assert_eq!(
            qwen(json!({"sliding_window": 8, "use_sliding_window": false})).windows,
            vec![None; 3]
        );
        assert_eq!(
            qwen(json!({"sliding_window": 8, "use_sliding_window": true, "max_window_layers": 1}))
                .windows,
            vec![None, Some(8), Some(8)]
        );
        // transformers 5's layer_types say it per layer.
        assert_eq!(
            qwen(json!({"sliding_window": 8, "layer_types":
                ["sliding_attention", "full_attention", "sliding_attention"]}))
            .windows,
            vec![Some(8), None, Some(8)]
        );
    }

    /// LongRoPE: Phi-3's older `su` spelling read as it, the factor from the context's
    /// extension when absent, and a configuration without its factors refused naming them.
    #[test]
    fn longrope_is_read_in_each_spelling_and_refused_without_its_factors() {
        let factors = json!([1.0, 2.0, 3.0, 4.0]);
        let phi3 = with(
            "phi3",
            json!({"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                   "rope_scaling": {"type": "su", "short_factor": factors,
                                    "long_factor": factors}}),
        );
        let spec = DecoderSpec::from_config(&phi3).expect("su is longrope");
        let scaling = spec.rope.scaling.as_ref().expect("scaling");
        assert_eq!(scaling["rope_type"], "longrope");
        assert_eq!(scaling["factor"].as_f64(), Some(32.0));
        assert_eq!(scaling["original_max_position_embeddings"], 4096);
        let (original, _) = spec.rope.long_context().expect("long").expect("some");
        assert_eq!(original, 4096);
        let err = DecoderSpec::from_config(&with(
            "llama",
            json!({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}),
        ))
        .expect_err("no factors");
        assert!(err.to_string().contains("short_factor"), "{err}");
    }

    /// Dynamic NTK needs its factor, and reads the original context from
    /// max_position_embeddings in either spelling (as transformers does).
    #[test]
    fn dynamic_scaling_is_read_in_each_spelling_and_needs_its_factor() {
        let t5 = DecoderSpec::from_config(&with(
            "llama",
            json!({"max_position_embeddings": 4096,
                   "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0,
                                       "original_max_position_embeddings": 1024}}),
        ))
        .expect("t5");
        let t4 = DecoderSpec::from_config(&with(
            "llama",
            json!({"max_position_embeddings": 4096, "rope_theta": 1e4,
                   "rope_scaling": {"type": "dynamic", "factor": 2.0}}),
        ))
        .expect("t4");
        assert_eq!(t5.rope.dynamic_ntk().expect("t5"), Some((4096, 2.0)));
        assert_eq!(t4.rope.dynamic_ntk().expect("t4"), Some((4096, 2.0)));
        assert_eq!(t4.positions(), 8192);
        let err =
            DecoderSpec::from_config(&with("llama", json!({"rope_scaling": {"type": "dynamic"}})))
                .expect_err("no factor");
        assert!(err.to_string().contains("`factor`"), "{err}");
    }

    #[test]
    fn keys_that_change_the_math_and_are_not_modelled_are_refused_by_name() {
        for (model_type, extra, key) in [
            ("llama", json!({"hidden_act": "relu"}), "hidden_act"),
            (
                "llama",
                json!({"rope_scaling": {"rope_type": "su", "factor": 4.0}}),
                "`su`",
            ),
            (
                "qwen2",
                json!({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}),
                "proportional",
            ),
            (
                "llama",
                json!({"rope_scaling": {"type": "ntk_by_parts", "factor": 2.0}}),
                "ntk_by_parts",
            ),
            ("llama", json!({"sliding_window": 16}), "sliding_window"),
            (
                "qwen3",
                json!({"final_logit_softcapping": 30.0}),
                "final_logit_softcapping",
            ),
            (
                "llama",
                json!({"residual_multiplier": 0.2}),
                "residual_multiplier",
            ),
            (
                "mistral",
                json!({"sliding_window": 4, "layer_types":
                ["chunked_attention", "full_attention", "full_attention"]}),
                "layer_types",
            ),
            (
                "gemma2",
                json!({"hidden_activation": "relu"}),
                "hidden_activation",
            ),
            (
                "llama",
                json!({"query_pre_attn_scalar": 64}),
                "query_pre_attn_scalar",
            ),
            (
                "gemma3_text",
                json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                "bloom",
                json!({"apply_residual_connection_post_layernorm": true}),
                "apply_residual_connection_post_layernorm",
            ),
            (
                "gpt2",
                json!({"scale_attn_by_inverse_layer_idx": true}),
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                "bloom",
                json!({"slow_but_exact": true, "pretraining_tp": 4}),
                "slow_but_exact",
            ),
        ] {
            let why = refusal(with(model_type, extra));
            assert!(why.contains(key), "{model_type}: {why} does not name {key}");
        }
        let why = refusal(base("gptj"));
        assert!(why.contains("\"gptj\"") && why.contains("qwen3"), "{why}");
    }

    #[test]
    fn partial_rotary_and_granite_multipliers_are_read() {
        let phi = DecoderSpec::from_config(&with(
            "phi3",
            json!({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
        ))
        .expect("phi3");
        assert_eq!((phi.head_dim, phi.rope.rotary_dim), (8, 4));
        assert_eq!(phi.rope.inverse_frequencies().expect("rope").len(), 2);
        let granite = DecoderSpec::from_config(&with(
            "granite",
            json!({"attention_multiplier": 0.125, "logits_scaling": 8.0,
                "embedding_multiplier": 12.0, "residual_multiplier": 0.22}),
        ))
        .expect("granite");
        assert_eq!(
            (
                granite.attention_scale,
                granite.logits_divisor,
                granite.embedding_multiplier,
                granite.residual_multiplier
            ),
            (0.125, 8.0, 12.0, 0.22)
        );
        let llama = DecoderSpec::from_config(&base("llama")).expect("llama");
        assert_eq!(llama.attention_scale, 1.0 / 8f64.sqrt());
    }

    #[test]
    fn gemma_configs_from_the_hub_and_from_transformers_5_read_alike() {
        // Gemma 3 as the Hub has it (transformers 4): a window pattern, a local RoPE base,
        // scaling on the global RoPE only, no tie_word_embeddings (Gemma ties by default).
        let t4 = DecoderSpec::from_config(&with(
            "gemma3_text",
            json!({"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        ))
        .expect("t4");
        let t5 = DecoderSpec::from_config(&with(
            "gemma3_text",
            json!({"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        ))
        .expect("t5");
        for spec in [&t4, &t5] {
            assert_eq!(spec.windows, vec![Some(4), Some(4), None]);
            assert_eq!(spec.rope.theta, 1e6);
            assert!(spec.rope.scaling.is_some());
            let local = spec.local_rope.as_ref().expect("a local rope");
            assert_eq!((local.theta, &local.scaling), (1e4, &None));
            assert!(spec.tie_word_embeddings);
            assert_eq!(spec.attention_scale, 0.25);
            assert_eq!(spec.activation, Activation::GeluTanh);
            assert_eq!(spec.embedding_multiplier, f64::from(32f32.sqrt()));
        }
        // Gemma 2 alternates from a sliding first layer; Gemma 1's legacy `gelu` is the
        // tanh approximation, where Llama's would be refused.
        let gemma2 = DecoderSpec::from_config(&with("gemma2", json!({"sliding_window": 4})))
            .expect("gemma2");
        assert_eq!(gemma2.windows, vec![Some(4), None, Some(4)]);
        assert_eq!(gemma2.attention_scale, 1.0 / 16.0);
        let gemma =
            DecoderSpec::from_config(&with("gemma", json!({"hidden_act": "gelu"}))).expect("gemma");
        assert_eq!(gemma.activation, Activation::GeluTanh);
        assert!(gemma.local_rope.is_none());
    }
}
