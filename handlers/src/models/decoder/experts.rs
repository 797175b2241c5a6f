//! Routed experts as a placement unit of their own (`<block>.<moe>.experts`, what the
//! planner's [`spillway_placement::UnitKind::Experts`] names): the block keeps its
//! router ([`Router`]) and hands the [`Routed`] rows on; the block's [`ExpertGroup`],
//! which may live elsewhere (attention in RAM, experts on disk: llama.cpp's
//! `--cpu-moe`), runs each expert the router picked over its rows and adds the result to
//! the residual stream.
//!
//! A streamed group reads only the experts it runs: it is built without reading any
//! weight, each expert is loaded the first time a pass routes rows to it, and the
//! layer stack does not read the group's pages ahead ([`LayerStack::push_planned_with`]
//! `on_demand`), so the pages a pass touches are those of its routed experts. Experts
//! that multiply their weights in place (GGML blocks, f32 through MKL) hold no copy and
//! are kept from pass to pass; copied ones are dropped with the pass.
//!
//! [`LayerStack::push_planned_with`]: crate::weights::layer_stack::LayerStack::push_planned_with

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::{DecoderSpec, DecoderUnit, Mlp, Projection, families, spec};
use crate::weights::layer_stack::{Activations, Residence};
use crate::{HandlerError, WeightSource};

/// A block's router: the softmax of its logits (in f32), the `per_token` highest per
/// row, renormalised to sum to one where the spec says.
pub(super) struct Router {
    gate: Projection,
    experts: usize,
    per_token: usize,
    normalize: bool,
}

impl Router {
    pub(super) fn load(
        vb: candle_nn::VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        moe: &spec::MoeSpec,
        pack: bool,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            gate: Projection::load(spec.hidden_size, moe.experts, vb.pp("gate"), source, pack)?,
            experts: moe.experts,
            per_token: moe.per_token,
            normalize: moe.normalize,
        })
    }

    pub(super) fn projection(&self) -> &Projection {
        &self.gate
    }

    /// Routes `x` (`[b, seq, h]`): its rows `[b·seq, h]` and, per expert, the rows it
    /// takes and their weights.
    pub(super) fn route(&self, x: &Tensor) -> candle_core::Result<(Tensor, Routes)> {
        let (b, seq, h) = x.dims3()?;
        let rows = x.reshape((1, b * seq, h))?;
        let logits = self.gate.forward(&rows)?.squeeze(0)?;
        Ok((rows.squeeze(0)?, self.routes(&logits)?))
    }

    fn routes(&self, logits: &Tensor) -> candle_core::Result<Routes> {
        let probabilities =
            candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;
        let mut routed = vec![(Vec::new(), Vec::new()); self.experts];
        for (row, p) in probabilities.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
            let chosen = &order[..self.per_token.min(p.len())];
            let sum: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                routed[e].0.push(row as u32);
                routed[e]
                    .1
                    .push(if self.normalize { p[e] / sum } else { p[e] });
            }
        }
        Ok(routed)
    }
}

/// Per expert: the rows routed to it and their weights.
pub(super) type Routes = Vec<(Vec<u32>, Vec<f32>)>;

/// What a block hands its experts' unit.
pub(super) struct Routed {
    /// The residual stream after attention, `[b, seq, h]`.
    pub(super) residual: Tensor,
    /// The rows the experts read (the pre-MLP norm's output), `[b·seq, h]`.
    pub(super) rows: Tensor,
    pub(super) routes: Routes,
    /// The block's residual multiplier (Granite's; else 1).
    pub(super) residual_multiplier: f64,
}

impl Activations for Routed {
    fn to_device(self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            residual: self.residual.to_device(device)?,
            rows: self.rows.to_device(device)?,
            ..self
        })
    }
}

type LoadExpert = Box<dyn Fn(usize) -> candle_core::Result<Mlp> + Send + Sync>;

/// One block's experts: all loaded (resident), or each loaded when first routed to
/// (streamed).
pub struct ExpertGroup {
    experts: Vec<OnceLock<Mlp>>,
    load: LoadExpert,
    /// Each expert's bytes in the checkpoint.
    bytes: Vec<u64>,
    /// Bytes of expert weights read since [`ExpertGroup::take_read_bytes`] last asked:
    /// each expert loaded (copied, or mapped in place), and each run of one kept from an
    /// earlier pass that multiplies in place (its pages are read again).
    read: AtomicU64,
}

impl ExpertGroup {
    /// The group whose expert `e` is `load(e)` and weighs `bytes[e]`: every expert
    /// loaded now when `eager`, else none until routed to.
    pub(super) fn new(load: LoadExpert, bytes: Vec<u64>, eager: bool) -> candle_core::Result<Self> {
        let group = Self {
            experts: bytes.iter().map(|_| OnceLock::new()).collect(),
            load,
            bytes,
            read: AtomicU64::new(0),
        };
        if eager {
            for e in 0..group.experts.len() {
                group.expert(e)?;
            }
        }
        Ok(group)
    }

    /// How to build the group `unit` of a block of `spec`: every expert's tensors are
    /// checked to be there now (reading headers only), so a checkpoint missing one fails
    /// at load even when the group is streamed and its experts load later.
    pub(super) fn builder(
        source: &WeightSource,
        spec: &DecoderSpec,
        unit: &str,
        dtype: DType,
    ) -> Result<
        impl Fn(&Device, Residence) -> candle_core::Result<DecoderUnit> + Send + Sync + 'static,
        HandlerError,
    > {
        let (Some(names), Some(moe)) = (spec.family.experts.as_ref(), spec.moe.as_ref()) else {
            return Err(HandlerError::Unsupported(format!(
                "`{unit}` is planned as experts, but the {} family has none",
                spec.family.name
            )));
        };
        let mut bytes = Vec::with_capacity(moe.experts);
        for e in 0..moe.experts {
            let weights = expert_weights(unit, names, e);
            if let Some(missing) = weights.iter().find(|w| source.info(w).is_none()) {
                return Err(HandlerError::BadWeights {
                    context: format!("cannot load unit {unit}"),
                    source: candle_core::Error::CannotFindTensor {
                        path: missing.clone(),
                    },
                });
            }
            let span = source.span_of(weights.iter().map(String::as_str));
            bytes.push(span.map_or(0, |s| s.len() as u64));
        }
        let (source, spec, unit) = (source.clone(), spec.clone(), unit.to_string());
        let (width, projections) = (moe.intermediate_size, names.projections);
        Ok(move |device: &Device, residence: Residence| {
            let eager = residence == Residence::Resident;
            let load: LoadExpert = {
                let (source, spec, unit, device) =
                    (source.clone(), spec.clone(), unit.clone(), device.clone());
                Box::new(move |e| {
                    let vb = source
                        .var_builder(dtype, &device)
                        .pp(&unit)
                        .pp(e.to_string());
                    Mlp::load_separate(vb, &source, &spec, width, projections, eager)
                })
            };
            ExpertGroup::new(load, bytes.clone(), eager).map(DecoderUnit::Experts)
        })
    }

    /// Expert `e`, loaded now if it was not (then counted as read), and whether it was.
    fn expert(&self, e: usize) -> candle_core::Result<(&Mlp, bool)> {
        if let Some(mlp) = self.experts[e].get() {
            return Ok((mlp, false));
        }
        // Two passes may load it at once: one copy is kept (and counted), the other
        // dropped.
        let loaded = self.experts[e].set((self.load)(e)?).is_ok();
        if loaded {
            self.read.fetch_add(self.bytes[e], Ordering::Relaxed);
        }
        let mlp = (self.experts[e].get())
            .ok_or_else(|| candle_core::Error::Msg(format!("expert {e} did not load")))?;
        Ok((mlp, loaded))
    }

    /// Whether every expert loaded so far multiplies its weights where they are mapped
    /// (and at least one has loaded): then the group holds no copy and is kept.
    pub(super) fn reads_in_place(&self) -> bool {
        let mut loaded = self.experts.iter().filter_map(OnceLock::get).peekable();
        loaded.peek().is_some()
            && loaded.all(|mlp| mlp.projections().iter().all(|p| p.reads_in_place()))
    }

    /// Bytes of expert weights read since the last call (what the `read` field counts).
    pub(super) fn take_read_bytes(&self) -> u64 {
        self.read.swap(0, Ordering::Relaxed)
    }

    /// `residual + m·Σ weight·expert(rows)` over the routed experts, in expert order
    /// (as transformers adds them), `[b, seq, h]`.
    pub(super) fn forward(&self, routed: Routed) -> candle_core::Result<Tensor> {
        let Routed {
            residual,
            rows,
            routes,
            residual_multiplier,
        } = routed;
        if routes.len() != self.experts.len() {
            candle_core::bail!(
                "{} experts routed to a group of {}",
                routes.len(),
                self.experts.len()
            );
        }
        let mut out = rows.zeros_like()?;
        for (e, (index, weights)) in routes.into_iter().enumerate() {
            if index.is_empty() {
                continue;
            }
            let (expert, loaded) = self.expert(e)?;
            if !loaded && expert.projections().iter().all(|p| p.reads_in_place()) {
                self.read.fetch_add(self.bytes[e], Ordering::Relaxed);
            }
            let count = index.len();
            let index = Tensor::from_vec(index, count, rows.device())?;
            let y = expert.forward(&rows.index_select(&index, 0)?.unsqueeze(0)?)?;
            let weights =
                Tensor::from_vec(weights, (count, 1), rows.device())?.to_dtype(y.dtype())?;
            out = out.index_add(&index, &y.squeeze(0)?.broadcast_mul(&weights)?, 0)?;
        }
        let out = out.reshape(residual.shape())?;
        let out = match residual_multiplier {
            1.0 => out,
            m => (out * m)?,
        };
        out + residual
    }
}

/// The names of expert `e`'s three projections' weights under the group `unit`.
pub(super) fn expert_weights(unit: &str, names: &families::Experts, e: usize) -> [String; 3] {
    names.projections.map(|p| format!("{unit}.{e}.{p}.weight"))
}
