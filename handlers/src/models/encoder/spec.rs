//! [`EncoderSpec`]: what an encoder's graph depends on, read once from config.json, and
//! the encoder families as rows of one table ([`FAMILIES`]): BERT, RoBERTa (and the
//! checkpoints built on its graph: XLM-RoBERTa, CamemBERT), DistilBERT and ModernBERT. A
//! family is its graph (BERT's post-norm blocks with learned positions, or ModernBERT's
//! pre-norm blocks with RoPE, local and global attention and a GeGLU MLP), its tensor
//! names (a map from the canonical names the graph asks for), how its positions are
//! numbered, whether it has token types, and its classification head. A key that changes
//! the computation and is not modelled is refused by name.

use candle_transformers::models::bert::{Config as CandleBertConfig, HiddenAct};
use serde_json::Value;

use crate::HandlerError;

/// The graph a family's blocks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    /// Post-norm blocks, learned absolute positions, a GELU MLP (BERT, RoBERTa,
    /// DistilBERT).
    Bert,
    /// Pre-norm blocks with RoPE, global attention every few layers and a bidirectional
    /// window in between, a GeGLU MLP, a final norm (ModernBERT).
    ModernBert,
}

/// The activation after a classifier head's dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadActivation {
    Tanh,
    Relu,
    /// config.json's `classifier_activation` (ModernBERT's).
    FromConfig,
}

/// A `*ForSequenceClassification` head on the first token (or the mean of the tokens,
/// where ModernBERT's `classifier_pooling` says so): a dense layer with its activation
/// (and a norm, for ModernBERT), then the output projection to one logit per label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifierHead {
    /// The dense layer's tensors' prefix.
    pub dense: &'static str,
    /// Whether the dense layer is part of the base model (BERT's pooler: under the
    /// base prefix) or of the head (at the checkpoint's root).
    pub dense_in_base: bool,
    pub activation: HeadActivation,
    /// A LayerNorm after the activation (ModernBERT's `head.norm`).
    pub norm: Option<&'static str>,
    /// The output projection's prefix.
    pub out: &'static str,
}

/// One encoder family.
#[derive(Debug)]
pub struct EncoderFamily {
    pub name: &'static str,
    pub graph: Graph,
    /// The `model_type`s it serves.
    pub model_types: &'static [&'static str],
    /// The base model's prefix in checkpoints saved from a task head (`bert`, `roberta`,
    /// `distilbert`); checkpoints of the bare model have none.
    pub prefix: &'static str,
    /// Where the numbered blocks live under the prefix.
    pub blocks: &'static str,
    /// The checkpoint's name for a block tensor, from the canonical (BERT) one.
    pub block_tensor: fn(&str) -> &str,
    /// Positions start after the padding index and skip padding (RoBERTa's
    /// `create_position_ids_from_input_ids`).
    pub positions_after_padding: bool,
    /// Whether the embeddings add token types.
    pub token_types: bool,
    /// Its sequence classification head.
    pub head: ClassifierHead,
}

fn same(name: &str) -> &str {
    name
}

/// DistilBERT's names for BERT's block tensors.
fn distilbert_block(name: &str) -> &str {
    match name {
        "attention.self.query" => "attention.q_lin",
        "attention.self.key" => "attention.k_lin",
        "attention.self.value" => "attention.v_lin",
        "attention.output.dense" => "attention.out_lin",
        "attention.output.LayerNorm" => "sa_layer_norm",
        "intermediate.dense" => "ffn.lin1",
        "output.dense" => "ffn.lin2",
        "output.LayerNorm" => "output_layer_norm",
        other => other,
    }
}

/// The encoder families, one row each.
pub static FAMILIES: &[EncoderFamily] = &[
    EncoderFamily {
        name: "bert",
        graph: Graph::Bert,
        model_types: &["bert"],
        prefix: "bert",
        blocks: "encoder.layer",
        block_tensor: same,
        positions_after_padding: false,
        token_types: true,
        head: ClassifierHead {
            dense: "pooler.dense",
            dense_in_base: true,
            activation: HeadActivation::Tanh,
            norm: None,
            out: "classifier",
        },
    },
    EncoderFamily {
        name: "roberta",
        graph: Graph::Bert,
        model_types: &["roberta", "xlm-roberta", "camembert"],
        prefix: "roberta",
        blocks: "encoder.layer",
        block_tensor: same,
        positions_after_padding: true,
        token_types: true,
        head: ClassifierHead {
            dense: "classifier.dense",
            dense_in_base: false,
            activation: HeadActivation::Tanh,
            norm: None,
            out: "classifier.out_proj",
        },
    },
    EncoderFamily {
        name: "distilbert",
        graph: Graph::Bert,
        model_types: &["distilbert"],
        prefix: "distilbert",
        blocks: "transformer.layer",
        block_tensor: distilbert_block,
        positions_after_padding: false,
        token_types: false,
        head: ClassifierHead {
            dense: "pre_classifier",
            dense_in_base: false,
            activation: HeadActivation::Relu,
            norm: None,
            out: "classifier",
        },
    },
    EncoderFamily {
        name: "modernbert",
        graph: Graph::ModernBert,
        model_types: &["modernbert"],
        prefix: "model",
        blocks: "layers",
        block_tensor: same,
        positions_after_padding: false,
        token_types: false,
        head: ClassifierHead {
            dense: "head.dense",
            dense_in_base: false,
            activation: HeadActivation::FromConfig,
            norm: Some("head.norm"),
            out: "classifier",
        },
    },
];

/// Every model_type an encoder handler serves.
pub fn served_model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.model_types)
        .copied()
        .collect()
}

/// What ModernBERT's graph adds: RoPE per layer type, which layers attend locally and how
/// far, which layers carry biases, and how its classifier pools.
#[derive(Debug, Clone, PartialEq)]
pub struct ModernSpec {
    /// RoPE base of global (full-attention) layers and of local (sliding) ones.
    pub global_theta: f64,
    pub local_theta: f64,
    /// Tokens each side a local layer attends to (`local_attention` / 2).
    pub half_window: usize,
    /// Per layer: local (sliding-window) attention.
    pub local: Vec<bool>,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub classifier_bias: bool,
    /// The classifier pools the mean of the tokens (else the first token's state).
    pub classifier_mean: bool,
    /// The classifier head's activation (`classifier_activation`).
    pub classifier_activation: HiddenAct,
}

/// An encoder, as its config.json describes it.
#[derive(Debug, Clone)]
pub struct EncoderSpec {
    pub family: &'static EncoderFamily,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub activation: HiddenAct,
    pub max_position_embeddings: usize,
    /// 0 where the family has no token types.
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// ModernBERT's graph, for that family.
    pub modern: Option<ModernSpec>,
}

fn bad(reason: impl std::fmt::Display) -> HandlerError {
    HandlerError::bad_file("config.json", reason)
}

/// ModernBERT's keys in transformers 5's spelling (`layer_types`, `rope_parameters` by
/// layer type) or 4's (`global_attn_every_n_layers`, `global_rope_theta`,
/// `local_rope_theta`).
fn modern_spec(
    config: &Value,
    refuse: &dyn Fn(&str, &Value, &str) -> HandlerError,
    activation_of: &dyn Fn(&str) -> Result<HiddenAct, HandlerError>,
) -> Result<ModernSpec, HandlerError> {
    let present = |key: &str| config.get(key).filter(|v| !v.is_null());
    let flag = |key: &str| present(key).and_then(Value::as_bool).unwrap_or(false);
    let layers = present("num_hidden_layers")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    let local = match present("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(bad(format!("layer_types holds {t}"))),
            })
            .collect::<Result<Vec<bool>, _>>()?,
        None => {
            let every = present("global_attn_every_n_layers")
                .and_then(Value::as_u64)
                .unwrap_or(3)
                .max(1) as usize;
            (0..layers).map(|i| i % every != 0).collect()
        }
    };
    let theta = |layer_type: &str, t4_key: &str, default: f64| -> Result<f64, HandlerError> {
        if let Some(rope) = present("rope_parameters").and_then(|r| r.get(layer_type)) {
            if let Some(kind) = rope
                .get("rope_type")
                .filter(|k| k.as_str() != Some("default"))
            {
                return Err(refuse(
                    "rope_parameters",
                    kind,
                    "RoPE scaling of a ModernBERT",
                ));
            }
            if let Some(theta) = rope.get("rope_theta").and_then(Value::as_f64) {
                return Ok(theta);
            }
        }
        if let Some(kind) = present("rope_scaling") {
            return Err(refuse("rope_scaling", kind, "RoPE scaling of a ModernBERT"));
        }
        Ok(present(t4_key).and_then(Value::as_f64).unwrap_or(default))
    };
    let pooling = present("classifier_pooling")
        .and_then(Value::as_str)
        .unwrap_or("cls");
    if !matches!(pooling, "cls" | "mean") {
        return Err(refuse(
            "classifier_pooling",
            &Value::from(pooling),
            "a pooling other than cls or mean",
        ));
    }
    Ok(ModernSpec {
        global_theta: theta("full_attention", "global_rope_theta", 160_000.0)?,
        local_theta: theta("sliding_attention", "local_rope_theta", 10_000.0)?,
        half_window: present("local_attention")
            .and_then(Value::as_u64)
            .unwrap_or(128) as usize
            / 2,
        local,
        norm_bias: flag("norm_bias"),
        attention_bias: flag("attention_bias"),
        mlp_bias: flag("mlp_bias"),
        classifier_bias: flag("classifier_bias"),
        classifier_mean: pooling == "mean",
        classifier_activation: activation_of("classifier_activation")?,
    })
}

impl EncoderSpec {
    /// Reads and checks config.json; `handler` names who asks, for the refusal.
    pub fn from_config(config: &Value, handler: &str) -> Result<Self, HandlerError> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let family = FAMILIES
            .iter()
            .find(|f| f.model_types.contains(&model_type.as_str()))
            .ok_or_else(|| {
                HandlerError::Unsupported(format!(
                    "{handler} serves the encoder families {}; this model's model_type is {model_type:?}",
                    served_model_types().join(", ")
                ))
            })?;
        // DistilBERT's own spellings stand in for BERT's names.
        let present = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| config.get(*k).filter(|v| !v.is_null()))
        };
        let count = |keys: &[&str]| -> Result<Option<usize>, HandlerError> {
            match present(keys) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{}` is {v}, not a whole number", keys[0]))),
            }
        };
        let need = |keys: &[&str]| {
            count(keys)?
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(format!("`{}` is missing or zero", keys[0])))
        };
        let refuse = |key: &str, value: &Value, why: &str| {
            HandlerError::Unsupported(format!(
                "config.json `{key}` = {value} ({why}) is not implemented for {}; refused rather than served with different math",
                family.name
            ))
        };
        if let Some(kind) = present(&["position_embedding_type"])
            && kind.as_str() != Some("absolute")
        {
            return Err(refuse(
                "position_embedding_type",
                kind,
                "relative position scores",
            ));
        }
        for key in ["is_decoder", "add_cross_attention"] {
            if let Some(on) = present(&[key]).filter(|v| v.as_bool() == Some(true)) {
                return Err(refuse(key, on, "a decoder's causal or cross attention"));
            }
        }
        let activation_of =
            |key: &str| match present(&[key]).and_then(Value::as_str).unwrap_or("gelu") {
                "gelu" => Ok(HiddenAct::Gelu),
                "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(HiddenAct::GeluApproximate),
                "relu" => Ok(HiddenAct::Relu),
                other => Err(refuse(
                    key,
                    &Value::from(other),
                    "an activation other than gelu, tanh-gelu or relu",
                )),
            };
        let activation = activation_of(match family.name {
            "distilbert" => "activation",
            "modernbert" => "hidden_activation",
            _ => "hidden_act",
        })?;
        let hidden_size = need(&["hidden_size", "dim"])?;
        let num_attention_heads = need(&["num_attention_heads", "n_heads"])?;
        if !hidden_size.is_multiple_of(num_attention_heads) {
            return Err(bad(format!(
                "hidden size {hidden_size} is not a multiple of {num_attention_heads} heads"
            )));
        }
        let type_vocab_size = if family.token_types {
            count(&["type_vocab_size"])?.unwrap_or(2)
        } else {
            0
        };
        let pad_token_id = count(&["pad_token_id"])?.unwrap_or(0) as u32;
        let spec = Self {
            family,
            model_type,
            vocab_size: need(&["vocab_size"])?,
            hidden_size,
            num_hidden_layers: need(&["num_hidden_layers", "n_layers"])?,
            num_attention_heads,
            intermediate_size: need(&["intermediate_size", "hidden_dim"])?,
            activation,
            max_position_embeddings: need(&["max_position_embeddings"])?,
            type_vocab_size,
            // DistilBERT's LayerNorms are built with 1e-12 whatever the config says.
            layer_norm_eps: match family.name {
                "distilbert" => 1e-12,
                _ => present(&["layer_norm_eps", "norm_eps"])
                    .and_then(Value::as_f64)
                    .unwrap_or(1e-12),
            },
            pad_token_id,
            modern: match family.graph {
                Graph::Bert => None,
                Graph::ModernBert => Some(modern_spec(config, &refuse, &activation_of)?),
            },
        };
        if let Some(modern) = &spec.modern
            && modern.local.len() != spec.num_hidden_layers
        {
            return Err(bad(format!(
                "layer_types names {} layers, the model has {}",
                modern.local.len(),
                spec.num_hidden_layers
            )));
        }
        if spec.max_tokens() == 0 {
            return Err(bad(format!(
                "max_position_embeddings {} leaves no positions after the padding index {pad_token_id}",
                spec.max_position_embeddings
            )));
        }
        Ok(spec)
    }

    /// The first position id: RoBERTa's start after the padding index.
    pub fn position_offset(&self) -> usize {
        if self.family.positions_after_padding {
            self.pad_token_id as usize + 1
        } else {
            0
        }
    }

    /// The longest input the position table allows.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    /// Position ids of one row of token ids: 0, 1, ... or, for RoBERTa, the padding index
    /// plus the count of non-padding tokens so far (padding keeps the padding index).
    pub fn positions(&self, ids: &[u32]) -> Vec<u32> {
        if !self.family.positions_after_padding {
            return (0..ids.len() as u32).collect();
        }
        let pad = self.pad_token_id;
        let mut seen = 0;
        ids.iter()
            .map(|&id| {
                if id == pad {
                    pad
                } else {
                    seen += 1;
                    pad + seen
                }
            })
            .collect()
    }

    /// The tensor prefix of the base model in this checkpoint ("" for a bare model).
    pub fn prefix_in(&self, has: impl Fn(&str) -> bool) -> String {
        let dotted = format!("{}.", self.family.prefix);
        let words = match self.family.graph {
            Graph::Bert => "embeddings.word_embeddings.weight",
            Graph::ModernBert => "embeddings.tok_embeddings.weight",
        };
        if has(&format!("{dotted}{words}")) {
            dotted
        } else {
            String::new()
        }
    }

    /// The block graph's configuration in candle-transformers' terms.
    pub fn candle_config(&self, layers: usize) -> CandleBertConfig {
        CandleBertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.activation,
            hidden_dropout_prob: 0.0,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size.max(1),
            initializer_range: 0.02,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: self.pad_token_id as usize,
            position_embedding_type: Default::default(),
            use_cache: false,
            classifier_dropout: None,
            model_type: Some(self.model_type.clone()),
        }
    }

    /// One line for describe and `spillway plan`.
    pub fn describe(&self) -> String {
        format!(
            "{} encoder ({}): {} blocks, {} wide, {} heads, {:?}, positions {}{}",
            self.family.name,
            self.model_type,
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.activation,
            match (&self.modern, self.family.positions_after_padding) {
                (Some(m), _) => format!(
                    "RoPE (theta {} global, {} local), {} of {} layers local within {} tokens each side",
                    m.global_theta,
                    m.local_theta,
                    m.local.iter().filter(|l| **l).count(),
                    m.local.len(),
                    m.half_window
                ),
                (None, true) => format!("from {} (after padding)", self.position_offset()),
                (None, false) => "from 0".into(),
            },
            if self.type_vocab_size > 0 {
                format!(", {} token types", self.type_vocab_size)
            } else {
                String::new()
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bert() -> Value {
        json!({"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
               "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu"})
    }

    #[test]
    fn distilberts_own_spellings_are_read() {
        let config = json!({"model_type": "distilbert", "vocab_size": 100, "dim": 32, "n_layers": 3,
            "n_heads": 4, "hidden_dim": 64, "max_position_embeddings": 64, "activation": "gelu",
            "pad_token_id": 0});
        let spec = EncoderSpec::from_config(&config, "text_embedding").expect("spec");
        assert_eq!(
            (
                spec.hidden_size,
                spec.num_hidden_layers,
                spec.num_attention_heads,
                spec.intermediate_size,
                spec.type_vocab_size
            ),
            (32, 3, 4, 64, 0)
        );
        assert_eq!((spec.family.block_tensor)("output.dense"), "ffn.lin2");
    }

    #[test]
    fn roberta_positions_start_after_padding_and_skip_it() {
        let mut config = bert();
        config["model_type"] = json!("xlm-roberta");
        config["pad_token_id"] = json!(1);
        config["max_position_embeddings"] = json!(66);
        let spec = EncoderSpec::from_config(&config, "text_embedding").expect("spec");
        assert_eq!(spec.positions(&[0, 7, 8, 2, 1, 1]), [2, 3, 4, 5, 1, 1]);
        assert_eq!(spec.max_tokens(), 64);
        let bert = EncoderSpec::from_config(&bert(), "text_embedding").expect("spec");
        assert_eq!(bert.positions(&[2, 7, 0]), [0, 1, 2]);
        assert_eq!(bert.max_tokens(), 64);
    }

    #[test]
    fn math_changing_keys_and_other_families_are_refused_by_name() {
        let refusal = |patch: Value| {
            let mut config = bert();
            for (k, v) in patch.as_object().expect("object") {
                config[k] = v.clone();
            }
            EncoderSpec::from_config(&config, "text_embedding")
                .expect_err("refused")
                .to_string()
        };
        assert!(
            refusal(json!({"position_embedding_type": "relative_key"}))
                .contains("position_embedding_type")
        );
        assert!(refusal(json!({"is_decoder": true})).contains("is_decoder"));
        assert!(refusal(json!({"hidden_act": "silu"})).contains("hidden_act"));
        let other = refusal(json!({"model_type": "deberta-v2"}));
        assert!(
            other.contains("deberta-v2") && other.contains("xlm-roberta"),
            "{other}"
        );
        // Spellings of tanh-GELU are one activation.
        let mut config = bert();
        config["hidden_act"] = json!("gelu_new");
        let spec = EncoderSpec::from_config(&config, "text_embedding").expect("spec");
        assert_eq!(spec.activation, HiddenAct::GeluApproximate);
    }

    /// ModernBERT's config in transformers 4's spelling (as the Hub's checkpoints have
    /// it: `global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`, no
    /// `layer_types` or `rope_parameters`) reads as its transformers 5 fixture does.
    #[test]
    fn modernberts_two_spellings_read_alike() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/encoders/modernbert/config.json");
        let t5: Value =
            serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
        let mut t4 = t5.clone();
        let object = t4.as_object_mut().expect("object");
        object.remove("layer_types");
        object.remove("rope_parameters");
        object.insert("global_rope_theta".into(), json!(160000.0));
        object.insert("local_rope_theta".into(), json!(10000.0));
        let (a, b) = (
            EncoderSpec::from_config(&t5, "test").expect("t5"),
            EncoderSpec::from_config(&t4, "test").expect("t4"),
        );
        assert_eq!(a.modern, b.modern);
        let modern = a.modern.expect("modern");
        assert_eq!(modern.local, [false, true, true]);
        assert_eq!((modern.half_window, modern.global_theta), (2, 160000.0));
        assert!(modern.classifier_mean && !modern.norm_bias);
        // Scaled RoPE is refused by name.
        let mut scaled = t5.clone();
        scaled["rope_parameters"]["full_attention"]["rope_type"] = json!("linear");
        let err = EncoderSpec::from_config(&scaled, "test").expect_err("scaled");
        assert!(err.to_string().contains("rope_parameters"), "{err}");
    }
}
