//! What a model weighs, from tensor headers alone: [`TensorInfo`] (name, dtype, shape)
//! grouped into [`PlacementUnit`]s — embeddings, each transformer block, final norm,
//! head — in execution order, sized in the target dtype.
//!
//! Grouping needs no per-architecture table: blocks are found as the numbered children
//! of the most common container (`model.layers.N`, `encoder.layer.N`, `transformer.h.N`);
//! every other tensor belongs to the child of its deepest ancestor shared with that
//! container (`model.embed_tokens`, `model.norm`, `lm_head`, `embeddings`, `pooler`).

use std::collections::BTreeMap;

use serde::Serialize;

/// Element types of checkpoint tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDType {
    F64,
    F32,
    F16,
    BF16,
    F8,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl TensorDType {
    pub fn size_bytes(self) -> u64 {
        match self {
            TensorDType::F64 | TensorDType::I64 | TensorDType::U64 => 8,
            TensorDType::F32 | TensorDType::I32 | TensorDType::U32 => 4,
            TensorDType::F16 | TensorDType::BF16 | TensorDType::I16 | TensorDType::U16 => 2,
            TensorDType::F8 | TensorDType::I8 | TensorDType::U8 | TensorDType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            TensorDType::F64
                | TensorDType::F32
                | TensorDType::F16
                | TensorDType::BF16
                | TensorDType::F8
        )
    }

    /// Reads safetensors' and torch's spellings ("F32", "float32", "bfloat16", ...).
    pub fn parse(text: &str) -> Option<Self> {
        Some(
            match text.to_ascii_lowercase().trim_start_matches("torch.") {
                "f64" | "float64" | "double" => TensorDType::F64,
                "f32" | "float32" | "float" | "fp32" => TensorDType::F32,
                "f16" | "float16" | "half" | "fp16" => TensorDType::F16,
                "bf16" | "bfloat16" => TensorDType::BF16,
                "f8_e4m3" | "f8_e5m2" | "float8_e4m3fn" | "float8_e5m2" => TensorDType::F8,
                "i64" | "int64" => TensorDType::I64,
                "i32" | "int32" => TensorDType::I32,
                "i16" | "int16" => TensorDType::I16,
                "i8" | "int8" => TensorDType::I8,
                "u64" | "uint64" => TensorDType::U64,
                "u32" | "uint32" => TensorDType::U32,
                "u16" | "uint16" => TensorDType::U16,
                "u8" | "uint8" => TensorDType::U8,
                "bool" => TensorDType::Bool,
                _ => return None,
            },
        )
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            TensorDType::F64 => "float64",
            TensorDType::F32 => "float32",
            TensorDType::F16 => "float16",
            TensorDType::BF16 => "bfloat16",
            TensorDType::F8 => "float8",
            TensorDType::I64 => "int64",
            TensorDType::I32 => "int32",
            TensorDType::I16 => "int16",
            TensorDType::I8 => "int8",
            TensorDType::U64 => "uint64",
            TensorDType::U32 => "uint32",
            TensorDType::U16 => "uint16",
            TensorDType::U8 => "uint8",
            TensorDType::Bool => "bool",
        }
    }
}

/// One tensor's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Bytes in `target` (floating-point tensors only; others keep their own type).
    pub fn bytes_as(&self, target: Option<TensorDType>) -> u64 {
        let dtype = match target {
            Some(t) if self.dtype.is_float() => t,
            _ => self.dtype,
        };
        self.elements() * dtype.size_bytes()
    }
}

/// Where a unit runs in the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum UnitKind {
    /// Before the blocks (embeddings).
    Pre,
    /// Transformer block N.
    Block(usize),
    /// Block N's routed experts (`<block>.<moe>.experts`): a unit of their own, so a
    /// plan can keep attention resident and put experts on the CPU or disk (llama.cpp's
    /// `--cpu-moe`). They run inside block N, after its router, and only the experts
    /// the router picks are read.
    Experts(usize),
    /// After the blocks (final norm, pooler, head).
    Post,
}

/// A group of tensors that is placed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlacementUnit {
    pub name: String,
    pub bytes: u64,
    #[serde(flatten)]
    pub kind: UnitKind,
    /// Units merged into this one because they share weights (`lm_head` tied to the
    /// embedding).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tied: Vec<String>,
}

impl PlacementUnit {
    pub fn is_block(&self) -> bool {
        matches!(self.kind, UnitKind::Block(_))
    }
}

/// The experts module inside a block (`block_sparse_moe.experts`, `mlp.experts`) that
/// `rest` — a tensor name after its block — lies in, if any: the path up to a component
/// `experts` that has children.
fn experts_module(rest: &str) -> Option<&str> {
    let mut end = 0;
    for part in rest.split('.') {
        end += part.len();
        if part == "experts" && end < rest.len() {
            return Some(&rest[..end]);
        }
        end += 1;
    }
    None
}

/// Module path of a tensor (its name without the parameter).
fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(module, _)| module)
}

/// The container of numbered blocks: the path before the first numeric component that
/// has the most distinct numbers.
fn block_container(tensors: &[TensorInfo]) -> Option<String> {
    let mut containers: BTreeMap<String, std::collections::BTreeSet<usize>> = BTreeMap::new();
    for tensor in tensors {
        let parts: Vec<&str> = tensor.name.split('.').collect();
        if let Some(i) = parts.iter().position(|p| p.parse::<usize>().is_ok()) {
            let index = parts[i].parse().unwrap_or(0);
            containers
                .entry(parts[..i].join("."))
                .or_default()
                .insert(index);
        }
    }
    containers
        .into_iter()
        .max_by_key(|(name, indices)| (indices.len(), std::cmp::Reverse(name.clone())))
        .map(|(name, _)| name)
}

fn is_embedding(name: &str) -> bool {
    // GPT-NeoX's head is `embed_out`: it runs last.
    !name.ends_with("embed_out")
        && ["embed", "wte", "wpe", "word_embeddings"]
            .iter()
            .any(|k| name.contains(k))
}

/// Order of post-block units: final norms, then poolers, then heads.
fn post_rank(name: &str) -> u8 {
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.contains("norm") || last == "ln_f" || last.contains("final") {
        0
    } else if last.contains("pooler") {
        1
    } else {
        2
    }
}

/// Groups tensors into units in execution order. With `tie_word_embeddings`, an
/// `lm_head` unit joins the embedding unit (and if the checkpoint has no `lm_head`
/// tensor, the embedding unit records the tie).
pub fn units(
    tensors: &[TensorInfo],
    target: Option<TensorDType>,
    tie_word_embeddings: bool,
) -> Vec<PlacementUnit> {
    let container = block_container(tensors);
    let container_parts: Vec<&str> = container
        .as_deref()
        .map(|c| c.split('.').collect())
        .unwrap_or_default();
    let mut by_unit: BTreeMap<(UnitKind, String), u64> = BTreeMap::new();
    let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
    for (position, tensor) in tensors.iter().enumerate() {
        let parts: Vec<&str> = tensor.name.split('.').collect();
        let block = container.as_ref().and_then(|c| {
            let rest = tensor.name.strip_prefix(c.as_str())?.strip_prefix('.')?;
            let (index, inside) = rest.split_once('.').unwrap_or((rest, ""));
            Some((index.parse::<usize>().ok()?, inside))
        });
        let (kind, name) = match (block, &container) {
            (Some((index, inside)), Some(c)) => match experts_module(inside) {
                Some(experts) => (UnitKind::Experts(index), format!("{c}.{index}.{experts}")),
                None => (UnitKind::Block(index), format!("{c}.{index}")),
            },
            _ => {
                let module: Vec<&str> = module_of(&tensor.name).split('.').collect();
                let shared = module
                    .iter()
                    .zip(&container_parts)
                    .take_while(|(a, b)| a == b)
                    .count();
                let depth = (shared + 1).min(parts.len());
                let name = parts[..depth].join(".");
                let kind = if is_embedding(&name) {
                    UnitKind::Pre
                } else {
                    UnitKind::Post
                };
                (kind, name)
            }
        };
        first_seen.entry(name.clone()).or_insert(position);
        *by_unit.entry((kind, name)).or_default() += tensor.bytes_as(target);
    }
    let mut units: Vec<PlacementUnit> = by_unit
        .into_iter()
        .map(|((kind, name), bytes)| PlacementUnit {
            name,
            bytes,
            kind,
            tied: Vec::new(),
        })
        .collect();
    units.sort_by(|a, b| {
        let key = |u: &PlacementUnit| match u.kind {
            UnitKind::Pre => (0, 0, first_seen.get(&u.name).copied().unwrap_or(0)),
            UnitKind::Block(i) => (1, i, 0),
            UnitKind::Experts(i) => (1, i, 1),
            UnitKind::Post => (
                2,
                post_rank(&u.name) as usize,
                first_seen.get(&u.name).copied().unwrap_or(0),
            ),
        };
        key(a).cmp(&key(b))
    });
    if tie_word_embeddings {
        tie_head(&mut units);
    }
    units
}

fn tie_head(units: &mut Vec<PlacementUnit>) {
    let Some(embedding) = units
        .iter()
        .position(|u| {
            u.kind == UnitKind::Pre
                && (u.name.contains("embed_tokens")
                    || u.name.contains("wte")
                    || u.name.contains("word_embeddings"))
        })
        .or_else(|| units.iter().position(|u| u.kind == UnitKind::Pre))
    else {
        return;
    };
    match units.iter().position(|u| u.name == "lm_head") {
        Some(head) => {
            let head = units.remove(head);
            let target = &mut units[embedding];
            target.bytes += head.bytes;
            target.tied.push(head.name);
        }
        None => units[embedding].tied.push("lm_head".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: TensorDType::F32,
            shape: shape.to_vec(),
        }
    }

    fn names(units: &[PlacementUnit]) -> Vec<&str> {
        units.iter().map(|u| u.name.as_str()).collect()
    }

    /// GPT-NeoX's head `embed_out` runs after the final norm, not with the embeddings;
    /// BLOOM's norm after the embeddings runs before the blocks.
    #[test]
    fn neox_and_bloom_units_run_in_order() {
        let neox = [
            t("embed_out.weight", &[10, 4]),
            t("gpt_neox.embed_in.weight", &[10, 4]),
            t("gpt_neox.final_layer_norm.weight", &[4]),
            t("gpt_neox.layers.0.attention.dense.weight", &[4, 4]),
        ];
        assert_eq!(
            names(&units(&neox, None, false)),
            [
                "gpt_neox.embed_in",
                "gpt_neox.layers.0",
                "gpt_neox.final_layer_norm",
                "embed_out"
            ]
        );
        let bloom = [
            t("h.0.self_attention.dense.weight", &[4, 4]),
            t("ln_f.weight", &[4]),
            t("word_embeddings.weight", &[10, 4]),
            t("word_embeddings_layernorm.weight", &[4]),
        ];
        assert_eq!(
            names(&units(&bloom, None, true)),
            [
                "word_embeddings",
                "word_embeddings_layernorm",
                "h.0",
                "ln_f"
            ]
        );
    }

    #[test]
    fn llama_tensors_group_into_embedding_blocks_norm_and_head() {
        let mut tensors = vec![
            t("lm_head.weight", &[10, 4]),
            t("model.embed_tokens.weight", &[10, 4]),
            t("model.norm.weight", &[4]),
        ];
        for i in [0, 1, 10, 2] {
            tensors.push(t(
                &format!("model.layers.{i}.self_attn.q_proj.weight"),
                &[4, 4],
            ));
            tensors.push(t(&format!("model.layers.{i}.input_layernorm.weight"), &[4]));
        }
        let units = units(&tensors, None, false);
        assert_eq!(
            names(&units),
            [
                "model.embed_tokens",
                "model.layers.0",
                "model.layers.1",
                "model.layers.2",
                "model.layers.10",
                "model.norm",
                "lm_head"
            ]
        );
        assert_eq!(units[1].bytes, (16 + 4) * 4);
        assert_eq!(units[1].kind, UnitKind::Block(0));
        let in_half = super::units(&tensors, Some(TensorDType::F16), false);
        assert_eq!(in_half[1].bytes, (16 + 4) * 2);
    }

    /// Mixtral's and Qwen 3 MoE's experts are units of their own after their block;
    /// the router (`gate`) and the dense MLP of a block without experts stay in it.
    #[test]
    fn routed_experts_are_a_unit_after_their_block() {
        let mut tensors = vec![
            t("model.embed_tokens.weight", &[10, 4]),
            t("model.norm.weight", &[4]),
            t("model.layers.1.mlp.down_proj.weight", &[4, 8]),
        ];
        for e in 0..3 {
            for p in ["w1", "w2", "w3"] {
                tensors.push(t(
                    &format!("model.layers.0.block_sparse_moe.experts.{e}.{p}.weight"),
                    &[8, 4],
                ));
            }
        }
        tensors.push(t("model.layers.0.block_sparse_moe.gate.weight", &[3, 4]));
        tensors.push(t("model.layers.0.self_attn.q_proj.weight", &[4, 4]));
        // transformers 5's fused expert tensors sit under `experts` without an index.
        tensors.push(t("model.layers.2.mlp.experts.gate_up_proj", &[3, 16, 4]));
        tensors.push(t("model.layers.2.mlp.gate.weight", &[3, 4]));
        let units = units(&tensors, None, false);
        assert_eq!(
            names(&units),
            [
                "model.embed_tokens",
                "model.layers.0",
                "model.layers.0.block_sparse_moe.experts",
                "model.layers.1",
                "model.layers.2",
                "model.layers.2.mlp.experts",
                "model.norm"
            ]
        );
        assert_eq!(units[1].bytes, (12 + 16) * 4);
        assert_eq!(units[2].kind, UnitKind::Experts(0));
        assert_eq!(units[2].bytes, 9 * 32 * 4);
        assert_eq!(units[5].kind, UnitKind::Experts(2));
        // A module merely named like it is not split off.
        assert_eq!(experts_module("mlp.experts"), None);
        assert_eq!(experts_module("mlp.shared_experts.w1.weight"), None);
        assert_eq!(
            experts_module("mlp.experts.7.w1.weight"),
            Some("mlp.experts")
        );
    }

    #[test]
    fn bert_tensors_group_without_a_wrapper_prefix() {
        let tensors = vec![
            t("embeddings.word_embeddings.weight", &[10, 4]),
            t("embeddings.LayerNorm.weight", &[4]),
            t("encoder.layer.0.attention.self.query.weight", &[4, 4]),
            t("encoder.layer.1.attention.self.query.weight", &[4, 4]),
            t("pooler.dense.weight", &[4, 4]),
        ];
        assert_eq!(
            names(&units(&tensors, None, false)),
            ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
        );
        let wrapped: Vec<TensorInfo> = tensors
            .iter()
            .map(|x| t(&format!("bert.{}", x.name), &x.shape))
            .chain([t("classifier.weight", &[2, 4])])
            .collect();
        assert_eq!(
            names(&units(&wrapped, None, false)),
            [
                "bert.embeddings",
                "bert.encoder.layer.0",
                "bert.encoder.layer.1",
                "bert.pooler",
                "classifier"
            ]
        );
    }

    #[test]
    fn a_tied_head_travels_with_the_embedding() {
        let tensors = vec![
            t("model.embed_tokens.weight", &[10, 4]),
            t("model.layers.0.w", &[4]),
            t("model.norm.weight", &[4]),
        ];
        let tied = units(&tensors, None, true);
        assert_eq!(tied[0].tied, vec!["lm_head"]);
        let with_head: Vec<_> = tensors
            .iter()
            .cloned()
            .chain([t("lm_head.weight", &[10, 4])])
            .collect();
        let tied = units(&with_head, None, true);
        assert_eq!(
            names(&tied),
            ["model.embed_tokens", "model.layers.0", "model.norm"]
        );
        assert_eq!(tied[0].bytes, 2 * 40 * 4);
    }
}
