//! Tiny random-weight models for tests (feature `testing`).
//!
//! [`TinyBert::write`] writes a complete sentence-transformers BERT folder: the tensors
//! candle-transformers' own `BertModel::load` asks for (through a `VarMap`), filled from a
//! seed at kaiming scale and saved as safetensors, a `config.json`, a WordPiece `tokenizer.json` whose vocabulary covers
//! any lowercase ASCII text (letters and `##letters`), and the pooling files.

pub mod decoder_fixtures;
pub mod images;
pub mod pth;

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde_json::json;

use crate::HandlerError;
use crate::error::CandleContext;

/// The shape and sentence-transformers settings of a tiny BERT.
#[derive(Debug, Clone)]
pub struct TinyBert {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_position_embeddings: usize,
    /// `max_seq_length` written to sentence_bert_config.json (`None`: no such file).
    pub max_seq_length: Option<usize>,
    /// "mean", "cls", "max" or "mean_sqrt_len".
    pub pooling: &'static str,
    pub normalize: bool,
    /// Weights are a deterministic function of the seed; `None` takes the next one of a
    /// process-wide counter, so two models written without a seed differ.
    pub seed: Option<u64>,
}

static NEXT_SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);

impl Default for TinyBert {
    fn default() -> Self {
        Self {
            hidden_size: 32,
            layers: 2,
            heads: 4,
            max_position_embeddings: 64,
            max_seq_length: Some(24),
            pooling: "mean",
            normalize: true,
            seed: None,
        }
    }
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const WORDS: [&str; 12] = [
    "hello", "world", "the", "quick", "brown", "fox", "model", "server", "rust", "spill", "##way",
    "##s",
];

/// The tokenizer vocabulary, in id order.
pub fn vocabulary() -> Vec<String> {
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    for c in ('a'..='z').chain('0'..='9') {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    for p in [".", ",", "!", "?", "'", "-"] {
        vocab.push(p.to_string());
    }
    vocab.dedup();
    vocab
}

impl TinyBert {
    /// The config.json this model is written with.
    pub fn config(&self) -> serde_json::Value {
        json!({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": vocabulary().len(),
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.hidden_size * 4,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": 2,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute"
        })
    }

    /// Writes the model folder into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> Result<(), HandlerError> {
        let io = |source| HandlerError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join("1_Pooling")).map_err(io)?;
        let config = self.config();
        let write_json = |name: &str, value: &serde_json::Value| {
            std::fs::write(dir.join(name), value.to_string()).map_err(io)
        };
        write_json("config.json", &config)?;
        write_json("tokenizer.json", &tokenizer_json())?;
        let mut modules = vec![
            json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
            json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
        ];
        if self.normalize {
            modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}));
        }
        write_json("modules.json", &serde_json::Value::Array(modules))?;
        let mode = |m: &str| self.pooling == m;
        write_json(
            "1_Pooling/config.json",
            &json!({
                "word_embedding_dimension": self.hidden_size,
                "pooling_mode_cls_token": mode("cls"),
                "pooling_mode_mean_tokens": mode("mean"),
                "pooling_mode_max_tokens": mode("max"),
                "pooling_mode_mean_sqrt_len_tokens": mode("mean_sqrt_len")
            }),
        )?;
        if let Some(max) = self.max_seq_length {
            write_json(
                "sentence_bert_config.json",
                &json!({"max_seq_length": max, "do_lower_case": false}),
            )?;
        }

        let bert: BertConfig =
            serde_json::from_value(config).map_err(|e| HandlerError::bad_file("config.json", e))?;
        let varmap = VarMap::new();
        BertModel::load(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &bert,
        )
        .context(|| "cannot initialise a random BERT".into())?;
        let seed = self
            .seed
            .unwrap_or_else(|| NEXT_SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        reseed(&varmap, seed)?;
        varmap
            .save(dir.join("model.safetensors"))
            .context(|| "cannot save random BERT weights".into())
    }
}

impl TinyBert {
    /// Writes a `BertForSequenceClassification`: this BERT's encoder under `bert.`, a
    /// random pooler, and a classifier over `labels` (in config.json's `id2label`).
    pub fn write_sequence_classifier(
        &self,
        dir: &Path,
        labels: &[&str],
    ) -> Result<(), HandlerError> {
        self.write(dir)?;
        let weights = dir.join("model.safetensors");
        let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
            crate::WeightSource::open(&weights)?
                .load_all(&Device::Cpu)
                .context(|| "cannot read the encoder".into())?
                .into_iter()
                .map(|(k, v)| (format!("bert.{k}"), v))
                .collect();
        let h = self.hidden_size;
        let rand = |shape: &[usize]| {
            candle_core::Tensor::randn(0f32, 0.5, shape, &Device::Cpu).context(|| "random".into())
        };
        tensors.insert("bert.pooler.dense.weight".into(), rand(&[h, h])?);
        tensors.insert("bert.pooler.dense.bias".into(), rand(&[h])?);
        tensors.insert("classifier.weight".into(), rand(&[labels.len(), h])?);
        tensors.insert("classifier.bias".into(), rand(&[labels.len()])?);
        candle_core::safetensors::save(&tensors, &weights)
            .context(|| "cannot save the classifier".into())?;
        let mut config = self.config();
        config["architectures"] = json!(["BertForSequenceClassification"]);
        config["id2label"] = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(|source| {
            HandlerError::Io {
                path: dir.to_path_buf(),
                source,
            }
        })
    }
}

/// Writes [`tokenizer_json`]'s tokenizer.json into `dir`.
pub fn write_tokenizer(dir: &Path) -> Result<(), HandlerError> {
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).map_err(|source| {
        HandlerError::Io {
            path: dir.join("tokenizer.json"),
            source,
        }
    })
}

/// A WordPiece tokenizer.json in the layout BERT checkpoints ship, with fixed padding and
/// truncation at 128 as MiniLM's has (the handler must override both).
pub fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, json!(id)))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": {"max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

/// The shape of a tiny Llama-family decoder.
#[derive(Debug, Clone)]
pub struct TinyLlama {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    /// config.json's `rope_scaling`, if any.
    pub rope_scaling: Option<serde_json::Value>,
    /// Weights are a deterministic function of this seed.
    pub seed: u64,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self {
            hidden_size: 32,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            intermediate_size: 48,
            vocab_size: 64,
            tie_word_embeddings: true,
            rope_scaling: None,
            seed: 7,
        }
    }
}

impl TinyLlama {
    pub fn config(&self) -> serde_json::Value {
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 128,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32"
        });
        if let Some(scaling) = &self.rope_scaling {
            config["rope_scaling"] = scaling.clone();
        }
        config
    }

    /// Writes config.json and weights: the tensors candle-transformers' own `Llama::load`
    /// asks for, filled deterministically from `seed` (RMSNorm weights too, so norms are
    /// not trivial), so a test sees the same model on every run.
    pub fn write(&self, dir: &Path) -> Result<(), HandlerError> {
        use candle_transformers::models::llama;
        let io = |source| HandlerError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config_json = self.config();
        std::fs::write(dir.join("config.json"), config_json.to_string()).map_err(io)?;
        let config: llama::LlamaConfig = serde_json::from_value(config_json)
            .map_err(|e| HandlerError::bad_file("config.json", e))?;
        let varmap = VarMap::new();
        llama::Llama::load(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &config.into_config(false),
        )
        .context(|| "cannot initialise a random Llama".into())?;
        reseed(&varmap, self.seed)?;
        varmap
            .save(dir.join("model.safetensors"))
            .context(|| "cannot save random Llama weights".into())
    }
}

impl TinyLlama {
    /// A `text_generation` model folder: [`TinyLlama::write`] plus a tokenizer.json (the
    /// tiny BERT's WordPiece vocabulary, without padding or truncation). The vocabulary
    /// has [`vocabulary`]`().len()` tokens, so `vocab_size` must be at least that.
    pub fn write_generator(&self, dir: &Path) -> Result<(), HandlerError> {
        if self.vocab_size < vocabulary().len() {
            return Err(HandlerError::Unsupported(format!(
                "a generator needs vocab_size >= {}",
                vocabulary().len()
            )));
        }
        self.write(dir)?;
        let mut tokenizer = tokenizer_json();
        tokenizer["padding"] = serde_json::Value::Null;
        tokenizer["truncation"] = serde_json::Value::Null;
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).map_err(|source| {
            HandlerError::Io {
                path: dir.join("tokenizer.json"),
                source,
            }
        })
    }
}

/// The end-of-sequence token of [`byte_level_tokenizer_json`].
pub const BYTE_LEVEL_EOS: u32 = 256;

/// A GPT-2-style byte-level BPE tokenizer.json (as SmolLM2's, Llama 3's and Qwen's
/// are): one token per byte (id = the byte), `<|endoftext|>` (id
/// [`BYTE_LEVEL_EOS`], special) and three merged tokens, `{"`, `":` and ` "` (ids
/// 257–259), so masks see tokens of several bytes. 260 tokens in all.
pub fn byte_level_tokenizer_json() -> serde_json::Value {
    // GPT-2's map of bytes to printable characters.
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    let mut vocab = serde_json::Map::new();
    let mut char_of = std::collections::HashMap::new();
    for byte in 0..=255u8 {
        let c = if printable(byte) {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or('?');
            next += 1;
            c
        };
        char_of.insert(byte, c);
        vocab.insert(c.to_string(), json!(byte));
    }
    // In the model's vocabulary too, as GPT-2's is (an added token that is not gets
    // the next free id instead of its own).
    vocab.insert("<|endoftext|>".into(), json!(BYTE_LEVEL_EOS));
    let spell = |text: &str| -> String { text.bytes().map(|b| char_of[&b]).collect() };
    let merges = [("{", "\""), ("\"", ":"), (" ", "\"")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(
            spell(&format!("{a}{b}")),
            json!(BYTE_LEVEL_EOS as usize + 1 + i),
        );
    }
    let merges: Vec<String> = merges
        .iter()
        .map(|(a, b)| format!("{} {}", spell(a), spell(b)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": BYTE_LEVEL_EOS, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    })
}

impl TinyLlama {
    /// A `text_generation` model folder with [`byte_level_tokenizer_json`]'s tokenizer
    /// (260 tokens; `vocab_size` is set to that) and its end-of-sequence token.
    pub fn write_byte_level_generator(&self, dir: &Path) -> Result<(), HandlerError> {
        let spec = TinyLlama {
            vocab_size: BYTE_LEVEL_EOS as usize + 4,
            ..self.clone()
        };
        spec.write(dir)?;
        let io = |source| HandlerError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut config = spec.config();
        config["eos_token_id"] = json!(BYTE_LEVEL_EOS);
        config["bos_token_id"] = serde_json::Value::Null;
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
        std::fs::write(
            dir.join("tokenizer.json"),
            byte_level_tokenizer_json().to_string(),
        )
        .map_err(io)
    }
}

/// Refills every variable deterministically from `seed`: norm weights uniform in
/// [0.5, 1.5], embeddings in [-1, 1], other matrices in ±1/sqrt(fan_in) (kaiming-uniform's
/// range), biases in ±0.1.
fn reseed(varmap: &VarMap, seed: u64) -> Result<(), HandlerError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| HandlerError::Unsupported("a VarMap lock was poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let (low, high) = if name.to_ascii_lowercase().ends_with("norm.weight") {
            (0.5, 1.5)
        } else if name.contains("embed") {
            (-1.0, 1.0)
        } else if name.ends_with("bias") {
            (-0.1, 0.1)
        } else {
            let bound = 1.0 / (*dims.last().unwrap_or(&1) as f32).sqrt();
            (-bound, bound)
        };
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let unit =
                    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                low + (high - low) * unit
            })
            .collect();
        let tensor = candle_core::Tensor::from_vec(values, dims, &Device::Cpu)
            .context(|| format!("reseed {name}"))?;
        var.set(&tensor).context(|| format!("reseed {name}"))?;
    }
    Ok(())
}

/// Splits `dir/model.safetensors` into `shards` files in HuggingFace's sharded layout
/// (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`) and removes the
/// single file. Tensors are dealt out in name order in equal runs, so a run boundary can
/// fall inside a layer: one unit's tensors then come from two shards.
pub fn shard_checkpoint(dir: &Path, shards: usize) -> Result<(), HandlerError> {
    let single = dir.join("model.safetensors");
    let tensors = crate::WeightSource::open(&single)?
        .load_all(&Device::Cpu)
        .context(|| "cannot read the checkpoint to shard".into())?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let per_shard = names.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (i, run) in names.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let part: std::collections::HashMap<&str, candle_core::Tensor> = run
            .iter()
            .map(|name| (name.as_str(), tensors[*name].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file))
            .context(|| format!("cannot write {file}"))?;
        for name in run {
            weight_map.insert(name.to_string(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    let io = |source| HandlerError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(io)?;
    std::fs::remove_file(&single).map_err(io)
}
