//! Encoders as a [`LayerStack`]: the embeddings and each block are separate units, each
//! resident on its device or streamed from disk, as the plan says. Every family of
//! [`spec::FAMILIES`] runs this one graph: the embeddings unit adds word, position (as
//! the family numbers them) and token-type embeddings and normalises; block i is
//! candle-transformers' 1-block `BertEncoder` reading the checkpoint's block i through
//! the family's tensor-name map, so a device-mapped encoder computes what the
//! single-device model computes. Blocks that run in f32 on the CPU use
//! [`FusedBertBlock`] instead: the same math in fewer, fused passes (the tests hold
//! both to transformers' outputs). ModernBERT's units are its embeddings (tokens and a
//! norm), its [`ModernBertBlock`]s and its final norm.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::BertEncoder;

pub use crate::models::encoder::spec::EncoderSpec;
pub use crate::weights::layer_stack::UnitPlacement;
use crate::weights::layer_stack::{Activations, Flow, LayerStack, Residence, StackModule, Units};
use crate::{HandlerError, WeightSource};
use fused_block::FusedBertBlock;
use modern_block::{ModernBertBlock, ModernPass};
use spec::Graph;

#[cfg(test)]
pub(crate) mod fixture_tests;
pub mod fused_block;
pub mod modern_block;
pub mod spec;

/// Word, position and token-type embeddings, summed and normalised.
pub struct EncoderEmbeddings {
    words: Embedding,
    positions: Embedding,
    types: Option<Embedding>,
    norm: LayerNorm,
}

/// ModernBERT's embeddings: tokens, normalised (positions are RoPE, in the blocks).
pub struct ModernEmbeddings {
    tokens: Embedding,
    norm: LayerNorm,
}

impl ModernEmbeddings {
    fn load(vb: VarBuilder, spec: &EncoderSpec) -> candle_core::Result<Self> {
        let modern = spec
            .modern
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("not a ModernBERT".into()))?;
        Ok(Self {
            tokens: candle_nn::embedding(
                spec.vocab_size,
                spec.hidden_size,
                vb.pp("tok_embeddings"),
            )?,
            norm: modern_block::norm(vb.pp("norm"), spec, modern)?,
        })
    }
}

impl EncoderEmbeddings {
    fn load(vb: VarBuilder, spec: &EncoderSpec) -> candle_core::Result<Self> {
        let h = spec.hidden_size;
        Ok(Self {
            words: candle_nn::embedding(spec.vocab_size, h, vb.pp("word_embeddings"))?,
            positions: candle_nn::embedding(
                spec.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            types: (spec.type_vocab_size > 0)
                .then(|| {
                    candle_nn::embedding(spec.type_vocab_size, h, vb.pp("token_type_embeddings"))
                })
                .transpose()?,
            norm: candle_nn::layer_norm(h, spec.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// In transformers' order: words, plus token types, plus positions, normalised.
    fn forward(&self, inputs: &EncoderInputs) -> candle_core::Result<Tensor> {
        let mut sum = self.words.forward(&inputs.ids)?;
        if let Some(types) = &self.types {
            sum = (sum + types.forward(&inputs.type_ids)?)?;
        }
        let sum = (sum + self.positions.forward(&inputs.positions)?)?;
        self.norm.forward(&sum)
    }
}

/// One unit of an encoder stack.
pub enum EncoderUnit {
    // Boxed: one embeddings unit per model, many blocks.
    Embeddings(Box<EncoderEmbeddings>),
    Block(BertEncoder),
    FusedBlock(Box<FusedBertBlock>),
    ModernEmbeddings(Box<ModernEmbeddings>),
    ModernBlock(Box<ModernBertBlock>),
    /// ModernBERT's norm after the last block.
    FinalNorm(LayerNorm),
}

impl StackModule for EncoderUnit {
    /// The units hold candle's (or the fused kernels' packed) copies of their weights.
    fn reads_in_place(&self) -> bool {
        false
    }
}

/// A batch's inputs, each `[batch, tokens]`: token ids, token types, position ids and the
/// 0/1 attention mask.
#[derive(Debug, Clone)]
pub struct EncoderInputs {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub positions: Tensor,
    pub mask: Tensor,
    /// ModernBERT's RoPE tables and masks, made by [`MappedEncoder::forward`].
    pub modern: Option<ModernPass>,
}

/// An encoder laid out by a plan.
pub struct MappedEncoder {
    stack: LayerStack<EncoderUnit>,
    spec: EncoderSpec,
}

impl MappedEncoder {
    /// The placement unit names of this checkpoint, in order (as the planner names them).
    pub fn unit_names(source: &WeightSource, spec: &EncoderSpec) -> Vec<String> {
        let prefix = spec.prefix_in(|t| source.info(t).is_some());
        std::iter::once(format!("{prefix}embeddings"))
            .chain(
                (0..spec.num_hidden_layers).map(|i| format!("{prefix}{}.{i}", spec.family.blocks)),
            )
            .chain((spec.family.graph == Graph::ModernBert).then(|| format!("{prefix}final_norm")))
            .collect()
    }

    /// Builds the stack; `place` says where each unit (by name) lives.
    pub fn load(
        source: &WeightSource,
        spec: &EncoderSpec,
        dtype: DType,
        place: impl Fn(&str) -> Result<UnitPlacement, HandlerError>,
    ) -> Result<Self, HandlerError> {
        let prefix = spec.prefix_in(|t| source.info(t).is_some());
        let mut stack = LayerStack::default();

        let embeddings_name = format!("{prefix}embeddings");
        let build_embeddings = {
            let (source, spec, root) = (source.clone(), spec.clone(), embeddings_name.clone());
            move |device: &Device, _: Residence| {
                let vb = source.var_builder(dtype, device).pp(&root);
                match spec.family.graph {
                    Graph::Bert => EncoderEmbeddings::load(vb, &spec)
                        .map(|e| EncoderUnit::Embeddings(Box::new(e))),
                    Graph::ModernBert => ModernEmbeddings::load(vb, &spec)
                        .map(|e| EncoderUnit::ModernEmbeddings(Box::new(e))),
                }
            }
        };
        stack.push_planned(
            &embeddings_name,
            place(&embeddings_name)?,
            source,
            build_embeddings,
        )?;

        let block_config = spec.candle_config(1);
        for i in 0..spec.num_hidden_layers {
            let name = format!("{prefix}{}.{i}", spec.family.blocks);
            let build = {
                let (source, config, spec) = (source.clone(), block_config.clone(), spec.clone());
                let block = name.clone();
                move |device: &Device, _: Residence| {
                    if spec.family.graph == Graph::ModernBert {
                        let vb = source.var_builder(dtype, device).pp(&block);
                        return ModernBertBlock::load(vb, &spec, i)
                            .map(|b| EncoderUnit::ModernBlock(Box::new(b)));
                    }
                    // The graph asks for BERT's names of block 0; the family's map and
                    // the block's index say where the checkpoint keeps them.
                    let (block, family) = (block.clone(), spec.family);
                    let vb = source
                        .var_builder(dtype, device)
                        .rename_f(move |tensor: &str| {
                            let Some(rest) = tensor.strip_prefix("encoder.layer.0.") else {
                                return tensor.to_string();
                            };
                            let (module, parameter) = rest.rsplit_once('.').unwrap_or((rest, ""));
                            format!("{block}.{}.{parameter}", (family.block_tensor)(module))
                        });
                    if FusedBertBlock::applies(&config, device, dtype) {
                        return FusedBertBlock::load(vb.pp("encoder.layer.0"), &config)
                            .map(|b| EncoderUnit::FusedBlock(Box::new(b)));
                    }
                    BertEncoder::load(vb.pp("encoder"), &config).map(EncoderUnit::Block)
                }
            };
            stack.push_planned(&name, place(&name)?, source, build)?;
        }
        if let Some(modern) = spec.modern.clone() {
            let name = format!("{prefix}final_norm");
            let build = {
                let (source, spec, root) = (source.clone(), spec.clone(), name.clone());
                move |device: &Device, _: Residence| {
                    let vb = source.var_builder(dtype, device).pp(&root);
                    modern_block::norm(vb, &spec, &modern).map(EncoderUnit::FinalNorm)
                }
            };
            stack.push_planned(&name, place(&name)?, source, build)?;
        }
        Ok(Self {
            stack,
            spec: spec.clone(),
        })
    }

    /// Its units, for metrics and the device manager.
    pub fn units(&self) -> &dyn Units {
        &self.stack
    }

    /// Units kept on disk and streamed each pass.
    pub fn streamed_units(&self) -> usize {
        self.stack.streamed_units()
    }

    /// The last hidden states `[batch, tokens, hidden]`.
    pub fn forward(&self, inputs: &EncoderInputs) -> candle_core::Result<Tensor> {
        let keep: Vec<bool> = inputs
            .mask
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m != 0.0)
            .collect();
        let mut inputs = inputs.clone();
        if let Some(modern) = &self.spec.modern {
            let rows = inputs.mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
            inputs.modern = Some(ModernPass::new(&self.spec, modern, &rows, &Device::Cpu)?);
        }
        let flow = Flow::new(inputs);
        let flow = self.stack.forward(flow, |_, unit, mut flow| {
            flow.hidden = Some(match unit {
                EncoderUnit::Embeddings(embeddings) => embeddings.forward(&flow.inputs)?,
                EncoderUnit::Block(encoder) => {
                    let hidden = flow.hidden()?;
                    let mask = extended_attention_mask(&flow.inputs.mask, hidden.dtype())?;
                    encoder.forward(hidden, &mask)?
                }
                EncoderUnit::FusedBlock(block) => block.forward(flow.hidden()?, &keep)?,
                EncoderUnit::ModernEmbeddings(embeddings) => embeddings
                    .norm
                    .forward(&embeddings.tokens.forward(&flow.inputs.ids)?)?,
                EncoderUnit::ModernBlock(block) => {
                    let pass = flow.inputs.modern.as_ref().ok_or_else(|| {
                        candle_core::Error::Msg("a ModernBERT pass without its tables".into())
                    })?;
                    block.forward(flow.hidden()?, pass)?
                }
                EncoderUnit::FinalNorm(norm) => norm.forward(flow.hidden()?)?,
            });
            Ok(flow)
        })?;
        flow.hidden
            .ok_or_else(|| candle_core::Error::Msg("the model has no units".into()))
    }
}

impl EncoderInputs {
    /// A batch from rows of equal length (padded by the caller): positions as `spec`'s
    /// family numbers them.
    pub fn from_rows(
        spec: &EncoderSpec,
        ids: &[Vec<u32>],
        type_ids: &[Vec<u32>],
        mask: &[Vec<u32>],
        device: &Device,
    ) -> candle_core::Result<Self> {
        let batch = ids.len();
        let tokens = ids.first().map_or(0, Vec::len);
        let flat = |rows: &[Vec<u32>]| -> candle_core::Result<Tensor> {
            if rows.len() != batch || rows.iter().any(|r| r.len() != tokens) {
                candle_core::bail!("the batch's rows differ in length");
            }
            Tensor::from_vec(rows.concat(), (batch, tokens), device)
        };
        let positions: Vec<Vec<u32>> = ids.iter().map(|row| spec.positions(row)).collect();
        Ok(Self {
            ids: flat(ids)?,
            type_ids: flat(type_ids)?,
            positions: flat(&positions)?,
            mask: flat(mask)?,
            modern: None,
        })
    }
}

impl Activations for EncoderInputs {
    fn to_device(self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            ids: self.ids.to_device(device)?,
            type_ids: self.type_ids.to_device(device)?,
            positions: self.positions.to_device(device)?,
            mask: self.mask.to_device(device)?,
            modern: self
                .modern
                .as_ref()
                .map(|pass| pass.to_device(device))
                .transpose()?,
        })
    }
}

/// `[batch, tokens]` 0/1 → `[batch, 1, 1, tokens]` additive mask: 0 where attended, the
/// dtype's most negative finite value where padded (as transformers uses
/// `torch.finfo(dtype).min`). candle's BertModel multiplies by `f32::MIN`, which is −inf
/// in f16, so `0 · −inf` turns every attended position into NaN there.
fn extended_attention_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let most_negative = match dtype {
        DType::F16 => f32::from(half::f16::MIN),
        DType::BF16 => f32::from(half::bf16::MIN),
        _ => f32::MIN,
    };
    let mask = mask.unsqueeze(1)?.unsqueeze(1)?.to_dtype(DType::F32)?;
    ((mask.ones_like()? - &mask)? * f64::from(most_negative))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CandleContext;
    use crate::testing::TinyBert;
    use candle_transformers::models::bert::BertModel;

    fn rows() -> [Vec<Vec<u32>>; 3] {
        [
            vec![vec![2, 10, 11, 12, 13, 3], vec![2, 20, 21, 3, 0, 0]],
            vec![vec![0; 6], vec![0; 6]],
            vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]],
        ]
    }

    fn spec_of(tiny: &TinyBert) -> EncoderSpec {
        EncoderSpec::from_config(&tiny.config(), "test").expect("spec")
    }

    fn inputs(spec: &EncoderSpec) -> EncoderInputs {
        let [ids, types, mask] = rows();
        EncoderInputs::from_rows(spec, &ids, &types, &mask, &Device::Cpu).expect("inputs")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    #[test]
    fn every_placement_equals_candles_single_device_bert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tiny = TinyBert {
            layers: 4,
            ..TinyBert::default()
        };
        tiny.write(dir.path()).expect("write");
        let spec = spec_of(&tiny);
        let path = dir.path().join("model.safetensors");
        #[allow(unsafe_code)]
        // SAFETY: the test's own file, not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)
        }
        .expect("vb");
        let reference = BertModel::load(vb, &spec.candle_config(4)).expect("reference");
        let inputs = inputs(&spec);
        let want = reference
            .forward(&inputs.ids, &inputs.type_ids, Some(&inputs.mask))
            .expect("reference forward");

        let source = WeightSource::open(&path).expect("source");
        let names = MappedEncoder::unit_names(&source, &spec);
        assert_eq!(
            names,
            [
                "embeddings",
                "encoder.layer.0",
                "encoder.layer.1",
                "encoder.layer.2",
                "encoder.layer.3"
            ]
        );
        type OnDisk = fn(usize) -> bool;
        let layouts: [(&str, OnDisk); 4] = [
            ("all resident", |_| false),
            ("all on disk", |_| true),
            ("blocks on disk", |i| i > 0),
            ("alternating", |i| i % 2 == 1),
        ];
        for (label, on_disk) in layouts {
            let stack = MappedEncoder::load(&source, &spec, DType::F32, |name| {
                let i = names.iter().position(|n| n == name).expect("known unit");
                Ok(if on_disk(i) {
                    UnitPlacement::Streamed(Device::Cpu)
                } else {
                    UnitPlacement::Resident(Device::Cpu)
                })
            })
            .expect("load");
            for pass in 0..2 {
                let got = stack.forward(&inputs).expect("forward");
                assert_eq!(got.dims(), want.dims());
                let diff = max_diff(&got, &want);
                assert!(diff <= 1e-5, "{label}, pass {pass}: differs by {diff}");
            }
        }
    }

    #[test]
    fn half_precision_stays_within_2e_2_of_the_f32_reference() {
        for seed in 1..=3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let tiny = TinyBert {
                layers: 3,
                seed: Some(seed),
                ..TinyBert::default()
            };
            tiny.write(dir.path()).expect("write");
            let spec = spec_of(&tiny);
            let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
            let inputs = inputs(&spec);
            let run = |dtype: DType, streamed: bool| {
                MappedEncoder::load(&source, &spec, dtype, |_| {
                    Ok(if streamed {
                        UnitPlacement::Streamed(Device::Cpu)
                    } else {
                        UnitPlacement::Resident(Device::Cpu)
                    })
                })
                .and_then(|m| m.forward(&inputs).context(|| "forward".into()))
                .and_then(|t| t.to_dtype(DType::F32).context(|| "f32".into()))
                .expect("run")
            };
            let want = run(DType::F32, false);
            let scale = want
                .abs()
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.max(0))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("max");
            for dtype in [DType::F16, DType::BF16] {
                for streamed in [false, true] {
                    let relative = max_diff(&run(dtype, streamed), &want) / scale;
                    assert!(
                        relative <= 2e-2,
                        "{dtype:?} streamed={streamed}: relative difference {relative}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_bert_prefixed_checkpoint_is_mapped_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tiny = TinyBert::default();
        tiny.write(dir.path()).expect("write");
        let path = dir.path().join("model.safetensors");
        let plain = WeightSource::open(&path)
            .expect("source")
            .load_all(&Device::Cpu)
            .expect("tensors");
        let prefixed: std::collections::HashMap<String, Tensor> = plain
            .into_iter()
            .map(|(k, v)| (format!("bert.{k}"), v))
            .collect();
        let prefixed_path = dir.path().join("prefixed.safetensors");
        candle_core::safetensors::save(&prefixed, &prefixed_path).expect("save");
        let spec = spec_of(&tiny);
        let inputs = inputs(&spec);
        let run = |p: &std::path::Path| {
            let source = WeightSource::open(p).expect("source");
            MappedEncoder::load(&source, &spec, DType::F32, |_| {
                Ok(UnitPlacement::Streamed(Device::Cpu))
            })
            .and_then(|m| m.forward(&inputs).context(|| "forward".into()))
            .expect("run")
        };
        let source = WeightSource::open(&prefixed_path).expect("source");
        assert_eq!(
            MappedEncoder::unit_names(&source, &spec)[0],
            "bert.embeddings"
        );
        assert_eq!(max_diff(&run(&path), &run(&prefixed_path)), 0.0);
    }
}
