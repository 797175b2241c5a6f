//! [`EncoderSpec`]: what an encoder's graph depends on, read once from config.json, and
//! the encoder families as rows of one table ([`FAMILIES`]): BERT, RoBERTa (and the
//! checkpoints built on its graph: XLM-RoBERTa, CamemBERT) and DistilBERT. A family is
//! its tensor names (a map from the canonical BERT names the graph asks for), how its
//! positions are numbered, whether it has token types, and its classification head. A
//! key that changes the computation and is not modelled is refused by name.

use candle_transformers::models::bert::{Config as CandleBertConfig, HiddenAct};
use serde_json::Value;

use crate::HandlerError;

/// A `*ForSequenceClassification` head on the first token: a dense layer with its
/// activation, then the output projection to one logit per label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifierHead {
    /// The dense layer's tensors' prefix.
    pub dense: &'static str,
    /// Whether the dense layer is part of the base model (BERT's pooler: under the
    /// base prefix) or of the head (at the checkpoint's root).
    pub dense_in_base: bool,
    /// ReLU after the dense layer (DistilBERT's pre_classifier), else tanh.
    pub relu: bool,
    /// The output projection's prefix.
    pub out: &'static str,
}

/// One encoder family.
#[derive(Debug)]
pub struct EncoderFamily {
    pub name: &'static str,
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
        model_types: &["bert"],
        prefix: "bert",
        blocks: "encoder.layer",
        block_tensor: same,
        positions_after_padding: false,
        token_types: true,
        head: ClassifierHead {
            dense: "pooler.dense",
            dense_in_base: true,
            relu: false,
            out: "classifier",
        },
    },
    EncoderFamily {
        name: "roberta",
        model_types: &["roberta", "xlm-roberta", "camembert"],
        prefix: "roberta",
        blocks: "encoder.layer",
        block_tensor: same,
        positions_after_padding: true,
        token_types: true,
        head: ClassifierHead {
            dense: "classifier.dense",
            dense_in_base: false,
            relu: false,
            out: "classifier.out_proj",
        },
    },
    EncoderFamily {
        name: "distilbert",
        model_types: &["distilbert"],
        prefix: "distilbert",
        blocks: "transformer.layer",
        block_tensor: distilbert_block,
        positions_after_padding: false,
        token_types: false,
        head: ClassifierHead {
            dense: "pre_classifier",
            dense_in_base: false,
            relu: true,
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
}

fn bad(reason: impl std::fmt::Display) -> HandlerError {
    HandlerError::bad_file("config.json", reason)
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
        let act_key = if family.name == "distilbert" {
            "activation"
        } else {
            "hidden_act"
        };
        let activation = match present(&[act_key])
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluApproximate,
            "relu" => HiddenAct::Relu,
            other => {
                return Err(refuse(
                    act_key,
                    &Value::from(other),
                    "an activation other than gelu, tanh-gelu or relu",
                ));
            }
        };
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
                _ => present(&["layer_norm_eps"])
                    .and_then(Value::as_f64)
                    .unwrap_or(1e-12),
            },
            pad_token_id,
        };
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
        if has(&format!("{dotted}embeddings.word_embeddings.weight")) {
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
            if self.family.positions_after_padding {
                format!("from {} (after padding)", self.position_offset())
            } else {
                "from 0".into()
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
        let other = refusal(json!({"model_type": "modernbert"}));
        assert!(
            other.contains("modernbert") && other.contains("xlm-roberta"),
            "{other}"
        );
        // Spellings of tanh-GELU are one activation.
        let mut config = bert();
        config["hidden_act"] = json!("gelu_new");
        let spec = EncoderSpec::from_config(&config, "text_embedding").expect("spec");
        assert_eq!(spec.activation, HiddenAct::GeluApproximate);
    }
}
