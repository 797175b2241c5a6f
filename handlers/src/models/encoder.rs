//! BERT as a [`LayerStack`]: the embeddings and each encoder block are separate units,
//! each resident on its device or streamed from disk, as the plan says. The math is
//! candle-transformers' own: a 0-block `BertModel` is the embeddings unit, and block i is
//! a 1-block `BertEncoder` whose tensor names are remapped from layer 0 to layer i, so a
//! device-mapped BERT computes exactly what the single-device `BertModel` computes.
//! Blocks that run in f32 on the CPU use [`FusedBertBlock`] instead: the same math in
//! fewer, fused passes (the tests hold both to `BertModel`).

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertEncoder, BertModel, Config};

use crate::models::encoder::fused_block::FusedBertBlock;
pub use crate::weights::layer_stack::UnitPlacement;
use crate::weights::layer_stack::{Flow, LayerStack, Residence, StackModule, Units};
use crate::{HandlerError, WeightSource};

pub mod fused_block;

/// One unit of a BERT stack.
pub enum BertUnit {
    // Boxed: one embeddings unit per model, many blocks.
    Embeddings(Box<BertModel>),
    Block(BertEncoder),
    FusedBlock(Box<FusedBertBlock>),
}

impl StackModule for BertUnit {
    /// BERT's units hold candle's (or the fused kernels' packed) copies of their weights.
    fn reads_in_place(&self) -> bool {
        false
    }
}

/// A BERT encoder laid out by a plan.
pub struct MappedBert {
    stack: LayerStack<BertUnit>,
}

/// The prefix of checkpoints saved from `BertFor*` heads ("bert."), or none.
fn prefix_of(source: &WeightSource) -> &'static str {
    if source
        .info("bert.embeddings.word_embeddings.weight")
        .is_some()
    {
        "bert."
    } else {
        ""
    }
}

impl MappedBert {
    /// The placement unit names of this checkpoint, in order (as the planner names them).
    pub fn unit_names(source: &WeightSource, config: &Config) -> Vec<String> {
        let prefix = prefix_of(source);
        std::iter::once(format!("{prefix}embeddings"))
            .chain((0..config.num_hidden_layers).map(|i| format!("{prefix}encoder.layer.{i}")))
            .collect()
    }

    /// Builds the stack; `place` says where each unit (by name) lives.
    pub fn load(
        source: &WeightSource,
        config: &Config,
        dtype: DType,
        place: impl Fn(&str) -> Result<UnitPlacement, HandlerError>,
    ) -> Result<Self, HandlerError> {
        let prefix = prefix_of(source);
        let mut stack = LayerStack::default();

        let embeddings_config = Config {
            num_hidden_layers: 0,
            ..config.clone()
        };
        let embeddings_name = format!("{prefix}embeddings");
        let build_embeddings = {
            let (source, config, root) = (
                source.clone(),
                embeddings_config,
                prefix.trim_end_matches('.').to_string(),
            );
            move |device: &Device, _: Residence| {
                let vb = source.var_builder(dtype, device);
                let vb = if root.is_empty() { vb } else { vb.pp(&root) };
                BertModel::load(vb, &config).map(|m| BertUnit::Embeddings(Box::new(m)))
            }
        };
        stack.push_planned(
            &embeddings_name,
            place(&embeddings_name)?,
            source,
            build_embeddings,
        )?;

        let block_config = Config {
            num_hidden_layers: 1,
            ..config.clone()
        };
        for i in 0..config.num_hidden_layers {
            let name = format!("{prefix}encoder.layer.{i}");
            let build = {
                let (source, config) = (source.clone(), block_config.clone());
                let from = format!("{prefix}encoder.layer.0.");
                let to = format!("{name}.");
                let encoder = format!("{prefix}encoder");
                move |device: &Device, _: Residence| {
                    if FusedBertBlock::applies(&config, device, dtype) {
                        let vb = source
                            .var_builder(dtype, device)
                            .pp(to.trim_end_matches('.'));
                        return FusedBertBlock::load(vb, &config)
                            .map(|b| BertUnit::FusedBlock(Box::new(b)));
                    }
                    let (from, to) = (from.clone(), to.clone());
                    let vb = source
                        .var_builder(dtype, device)
                        .rename_f(move |tensor: &str| match tensor.strip_prefix(&from) {
                            Some(rest) => format!("{to}{rest}"),
                            None => tensor.to_string(),
                        })
                        .pp(&encoder);
                    BertEncoder::load(vb, &config).map(BertUnit::Block)
                }
            };
            stack.push_planned(&name, place(&name)?, source, build)?;
        }
        Ok(Self { stack })
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
    pub fn forward(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let keep: Vec<bool> = mask
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m != 0.0)
            .collect();
        let flow = Flow::new((ids.clone(), type_ids.clone(), mask.clone()));
        let flow = self.stack.forward(flow, |_, unit, mut flow| {
            let (ids, type_ids, mask) = &flow.inputs;
            flow.hidden = Some(match unit {
                BertUnit::Embeddings(model) => model.forward(ids, type_ids, Some(mask))?,
                BertUnit::Block(encoder) => {
                    let hidden = flow.hidden()?;
                    let mask = extended_attention_mask(mask, hidden.dtype())?;
                    encoder.forward(hidden, &mask)?
                }
                BertUnit::FusedBlock(block) => block.forward(flow.hidden()?, &keep)?,
            });
            Ok(flow)
        })?;
        flow.hidden
            .ok_or_else(|| candle_core::Error::Msg("the model has no units".into()))
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

    fn inputs() -> (Tensor, Tensor, Tensor) {
        let ids = Tensor::new(
            &[[2u32, 10, 11, 12, 13, 3], [2, 20, 21, 3, 0, 0]],
            &Device::Cpu,
        )
        .expect("ids");
        let mask =
            Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).expect("mask");
        (ids.clone(), ids.zeros_like().expect("types"), mask)
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
        let spec = TinyBert {
            layers: 4,
            ..TinyBert::default()
        };
        spec.write(dir.path()).expect("write");
        let config: Config = serde_json::from_value(spec.config()).expect("config");
        let path = dir.path().join("model.safetensors");
        #[allow(unsafe_code)]
        // SAFETY: the test's own file, not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)
        }
        .expect("vb");
        let reference = BertModel::load(vb, &config).expect("reference");
        let (ids, types, mask) = inputs();
        let want = reference
            .forward(&ids, &types, Some(&mask))
            .expect("reference forward");

        let source = WeightSource::open(&path).expect("source");
        let names = MappedBert::unit_names(&source, &config);
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
            let stack = MappedBert::load(&source, &config, DType::F32, |name| {
                let i = names.iter().position(|n| n == name).expect("known unit");
                Ok(if on_disk(i) {
                    UnitPlacement::Streamed(Device::Cpu)
                } else {
                    UnitPlacement::Resident(Device::Cpu)
                })
            })
            .expect("load");
            for pass in 0..2 {
                let got = stack.forward(&ids, &types, &mask).expect("forward");
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
            let spec = TinyBert {
                layers: 3,
                seed: Some(seed),
                ..TinyBert::default()
            };
            spec.write(dir.path()).expect("write");
            let config: Config = serde_json::from_value(spec.config()).expect("config");
            let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
            let (ids, types, mask) = inputs();
            let run = |dtype: DType, streamed: bool| {
                MappedBert::load(&source, &config, dtype, |_| {
                    Ok(if streamed {
                        UnitPlacement::Streamed(Device::Cpu)
                    } else {
                        UnitPlacement::Resident(Device::Cpu)
                    })
                })
                .and_then(|m| m.forward(&ids, &types, &mask).context(|| "forward".into()))
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
        let spec = TinyBert::default();
        spec.write(dir.path()).expect("write");
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
        let config: Config = serde_json::from_value(spec.config()).expect("config");
        let (ids, types, mask) = inputs();
        let run = |p: &std::path::Path| {
            let source = WeightSource::open(p).expect("source");
            MappedBert::load(&source, &config, DType::F32, |_| {
                Ok(UnitPlacement::Streamed(Device::Cpu))
            })
            .and_then(|m| m.forward(&ids, &types, &mask).context(|| "forward".into()))
            .expect("run")
        };
        let source = WeightSource::open(&prefixed_path).expect("source");
        assert_eq!(
            MappedBert::unit_names(&source, &config)[0],
            "bert.embeddings"
        );
        assert_eq!(max_diff(&run(&path), &run(&prefixed_path)), 0.0);
    }
}
