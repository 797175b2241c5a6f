//! The decoder: one graph for every family in [`families`] (grouped-query attention, a
//! gated or plain MLP, tied or untied head), shaped by a [`DecoderSpec`] read from
//! config.json — RMSNorm or LayerNorm, where the norms sit and what they multiply by,
//! qk-norm, fused projections, the MLP's activation, RoPE (partial, per-layer-type),
//! ALiBi or learned positions, sliding windows per layer, routed experts, Granite's
//! multipliers, Gemma's scaled embeddings, score scale and soft-capping — as a
//! [`LayerStack`] with a KV cache.
//!
//! candle-transformers' `llama` keeps its blocks, cache and weights private and on one
//! device, so the blocks are written here — with the same math (attention in f32, the same
//! RoPE tables and causal mask), which the tests check against it on the same weights.
//! Units follow the checkpoint (named as its family names them, [`families::Names`]):
//! `model.embed_tokens`, `model.layers.N`, `model.norm`, and
//! `lm_head` unless it is tied to the embedding (then the head reuses the embedding's
//! weight: shared when the embedding is resident, read again when it is streamed).

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use std::sync::Arc;

use crate::cpu::linear::{CpuLinear, InPlaceLinear};
use crate::cpu::quantized::QuantizedMatrix;
use crate::error::CandleContext;
use crate::weights::layer_stack::UnitPlacement;
use crate::weights::layer_stack::{Activations, Flow, LayerStack, Residence, StackModule, Units};
use crate::{HandlerError, WeightSource};

mod experts;
pub mod families;
#[cfg(test)]
pub(crate) mod fixture_tests;
pub mod prefix_cache;
pub mod spec;

use experts::ExpertGroup;
use families::{Activation, NormKind, NormPlacement, NormWeight, Positions, Projections, QkNorm};
pub use spec::DecoderSpec;

/// Per-sequence state: each block's keys and values so far, and the next position.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    pub position: usize,
}

impl KvCache {
    pub fn new(blocks: usize) -> Self {
        Self {
            layers: (0..blocks).map(|_| None).collect(),
            position: 0,
        }
    }
}

impl KvCache {
    /// The first `len` positions' keys and values of a finished sequence (a prefix
    /// other sequences can start from), taken without a copy: its buffers, viewed up to
    /// `len`, and counted whole (their capacity) in [`KvPrefix::bytes`]. `None` where
    /// this cache no longer holds them all (a sliding-window block's cache has rolled
    /// past them) or holds fewer.
    pub fn into_prefix(self, len: usize) -> candle_core::Result<Option<KvPrefix>> {
        if len == 0 || len > self.position {
            return Ok(None);
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut bytes = 0u64;
        for layer in self.layers {
            let Some(cache) = layer else {
                return Ok(None);
            };
            if cache.start > 0 || cache.len < len {
                return Ok(None);
            }
            for buffer in [&cache.k, &cache.v] {
                bytes += (buffer.elem_count() * buffer.dtype().size_in_bytes()) as u64;
            }
            layers.push((cache.k.narrow(2, 0, len)?, cache.v.narrow(2, 0, len)?));
        }
        Ok(Some(KvPrefix { layers, len, bytes }))
    }
}

/// The keys and values of a sequence's first `len` positions in every block
/// (`[1, kv_heads, len, head_dim]` each, on the block's device), from
/// [`KvCache::prefix`]; [`MappedDecoder::resume`] starts a cache from it.
#[derive(Debug, Clone)]
pub struct KvPrefix {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    /// What its buffers hold, room past `len` included.
    bytes: u64,
}

impl KvPrefix {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes its buffers hold.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// One block's keys and values of a sequence: `[1, kv_heads, capacity, head_dim]`
/// buffers filled up to `len` and grown by doubling, so a decode step writes its new
/// key and value in place. Concatenating instead copied the whole cache of every block
/// on every step. A sliding-window block's cache rolls: past twice its window it keeps
/// the last window's keys, slot 0 then holding position `start`.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
    start: usize,
}

impl LayerCache {
    /// Room for at least this many positions from the start.
    const MIN_CAPACITY: usize = 64;

    /// Appends `k`/`v` `[1, kv_heads, seq, head_dim]` to `cache` (starting one if
    /// there is none), growing it up to `limit` positions.
    fn append(
        cache: &mut Option<Self>,
        k: &Tensor,
        v: &Tensor,
        limit: usize,
    ) -> candle_core::Result<()> {
        let seq = k.dim(2)?;
        let len = cache.as_ref().map_or(0, |c| c.len);
        let capacity = cache.as_ref().map_or(0, |c| c.capacity());
        if len + seq > capacity {
            let grown = (len + seq)
                .next_power_of_two()
                .max(Self::MIN_CAPACITY)
                .min(limit.max(len + seq));
            let resized = |old: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
                let (b, heads, _, d) = new.dims4()?;
                let buffer = Tensor::zeros((b, heads, grown, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buffer.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            *cache = Some(Self {
                k: resized(cache.as_ref().map(|c| &c.k), k)?,
                v: resized(cache.as_ref().map(|c| &c.v), v)?,
                len,
                start: cache.as_ref().map_or(0, |c| c.start),
            });
        }
        let Some(cache) = cache.as_mut() else {
            candle_core::bail!("the KV cache was just made");
        };
        cache.k.slice_set(&k.contiguous()?, 2, len)?;
        cache.v.slice_set(&v.contiguous()?, 2, len)?;
        cache.len += seq;
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.k.dims().get(2).copied().unwrap_or(0)
    }

    /// Past twice `window` keys, keeps the last `window` (all the next query can see):
    /// the memory a windowed block holds stays within twice its window, at the cost of
    /// one copy of a window every window steps.
    fn roll(&mut self, window: usize) -> candle_core::Result<()> {
        if self.len <= 2 * window {
            return Ok(());
        }
        let dropped = self.len - window;
        for buffer in [&self.k, &self.v] {
            let tail = buffer.narrow(2, dropped, window)?.contiguous()?;
            buffer.slice_set(&tail, 2, 0)?;
        }
        self.len = window;
        self.start += dropped;
        Ok(())
    }

    fn keys(&self) -> candle_core::Result<Tensor> {
        self.k.narrow(2, 0, self.len)
    }

    fn values(&self) -> candle_core::Result<Tensor> {
        self.v.narrow(2, 0, self.len)
    }
}

struct Attention {
    qkv: Qkv,
    o: Projection,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Whether the qk-norms are over each head (else over the whole projection).
    per_head_norm: bool,
    /// Multiplies the queries where the family's score scale is not 1/sqrt(head_dim).
    query_scale: Option<f64>,
    /// Scores become `cap × tanh(score / cap)` (Gemma 2).
    softcap: Option<f64>,
    /// The layer's sliding window, if it has one.
    window: Option<usize>,
    /// Whether the layer rotates by the sliding layers' own RoPE.
    local_rope: bool,
    /// Whether queries and keys are rotated at all (not under ALiBi).
    rope: bool,
    /// ALiBi's slope per head `[1, heads, 1, 1]` in f32 (BLOOM): scores gain
    /// `slope × key position`.
    alibi: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// A projection `x · Wᵀ (+ b)` over the last dimension.
enum Projection {
    /// candle's `Linear`: any device and dtype.
    Candle(Linear),
    /// f32 on the CPU with the weight packed once for MKL's GEMM (resident units of the
    /// `mkl` build: a streamed unit would repack every pass).
    Packed {
        weight: CpuLinear,
        bias: Option<Tensor>,
        out: usize,
    },
    /// f32 on the CPU read in place from the mapping (a streamed unit of the `mkl`
    /// build: neither copied nor packed each pass).
    InPlace {
        weight: InPlaceLinear,
        bias: Option<Tensor>,
        out: usize,
    },
    /// GGML blocks on the CPU, multiplied as they are (in place in the mapping).
    Quantized {
        weight: QuantizedMatrix,
        bias: Option<Tensor>,
    },
}

impl Projection {
    /// Loads `vb`'s `weight` `[out_dim, in_dim]` and, if `vb` has one, its `bias` (Qwen2
    /// puts biases on q/k/v; Llama has none). `pack`: whether the unit stays resident.
    /// A weight `source` stores quantized stays quantized on the CPU and is dequantized
    /// for other devices.
    fn load(
        in_dim: usize,
        out_dim: usize,
        vb: VarBuilder,
        source: &WeightSource,
        pack: bool,
    ) -> candle_core::Result<Self> {
        if let Some(weight) = source.quantized(&format!("{}.weight", vb.prefix()))? {
            if weight.dims() != (out_dim, in_dim) {
                candle_core::bail!(
                    "{} is {:?}, not [{out_dim}, {in_dim}]",
                    vb.prefix(),
                    weight.dims()
                );
            }
            let bias = match vb.contains_tensor("bias") {
                true => Some(vb.get(out_dim, "bias")?),
                false => None,
            };
            if vb.device().is_cpu() {
                return Ok(Self::Quantized { weight, bias });
            }
            let dense = weight.dequantize(vb.device())?.to_dtype(vb.dtype())?;
            return Ok(Self::Candle(Linear::new(dense, bias)));
        }
        let f32_on_cpu = vb.device().is_cpu() && vb.dtype() == DType::F32;
        if !pack && f32_on_cpu && InPlaceLinear::AVAILABLE {
            let name = format!("{}.weight", vb.prefix());
            // Not in place where the stored dtype or the mapping's alignment does not
            // allow it: copied, as below.
            if let Some((bytes, shape)) = source.f32_bytes(&name)
                && shape == [out_dim, in_dim]
                && let Ok(weight) = InPlaceLinear::new(bytes, out_dim, in_dim)
            {
                let bias = match vb.contains_tensor("bias") {
                    true => Some(vb.get(out_dim, "bias")?),
                    false => None,
                };
                return Ok(Self::InPlace {
                    weight,
                    bias,
                    out: out_dim,
                });
            }
        }
        let packs = pack && CpuLinear::PACKS && f32_on_cpu;
        let linear = if vb.contains_tensor("bias") {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        if !packs {
            return Ok(Self::Candle(linear));
        }
        Ok(Self::Packed {
            weight: CpuLinear::new(linear.weight())?,
            bias: linear.bias().cloned(),
            out: out_dim,
        })
    }

    /// GPT-2's `Conv1D` at `vb`: its weight stored `[in_dim, out_dim]`, transposed
    /// once as it is read, and its bias.
    fn load_conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
        Ok(Self::Candle(Linear::new(
            weight,
            Some(vb.get(out_dim, "bias")?),
        )))
    }

    /// Whether the weight is multiplied where it is mapped (no copy of it is held).
    fn reads_in_place(&self) -> bool {
        match self {
            Self::Quantized { weight, .. } => weight.in_place(),
            Self::InPlace { .. } => true,
            Self::Candle(_) | Self::Packed { .. } => false,
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(linear) => linear.forward(x),
            Self::Packed { weight, bias, out } => {
                over_rows(x, *out, bias.as_ref(), |rows| weight.forward(rows))
            }
            Self::InPlace { weight, bias, out } => {
                over_rows(x, *out, bias.as_ref(), |rows| weight.forward(rows))
            }
            Self::Quantized { weight, bias } => {
                let y = weight.forward(x)?.to_dtype(x.dtype())?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// `product` of `x` seen as `[rows, in]` (every dimension but the last folded into
/// rows), reshaped back to `x`'s leading dimensions and `out`, plus `bias`.
fn over_rows(
    x: &Tensor,
    out: usize,
    bias: Option<&Tensor>,
    product: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inner = dims.pop().unwrap_or(1);
    let rows = x.elem_count() / inner.max(1);
    let y = product(&x.reshape((rows, inner))?)?;
    dims.push(out);
    let y = y.reshape(dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Projection {
    /// `forward` of each of `projections`, all reading `x`: quantized ones share one
    /// quantization of `x` and one parallel region
    /// ([`QuantizedMatrix::forward_shared`]).
    fn forward_shared<const N: usize>(
        projections: [&Self; N],
        x: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        let quantized: Vec<(&QuantizedMatrix, &Option<Tensor>)> = projections
            .iter()
            .filter_map(|p| match p {
                Self::Quantized { weight, bias } => Some((weight, bias)),
                _ => None,
            })
            .collect();
        let outputs: Vec<Tensor> = if quantized.len() == N {
            let weights: Vec<&QuantizedMatrix> = quantized.iter().map(|(w, _)| *w).collect();
            QuantizedMatrix::forward_shared(&weights, x)?
                .into_iter()
                .zip(&quantized)
                .map(|(y, (_, bias))| {
                    let y = y.to_dtype(x.dtype())?;
                    match bias {
                        Some(b) => y.broadcast_add(b),
                        None => Ok(y),
                    }
                })
                .collect::<candle_core::Result<_>>()?
        } else {
            projections
                .iter()
                .map(|p| p.forward(x))
                .collect::<candle_core::Result<_>>()?
        };
        outputs
            .try_into()
            .map_err(|_| candle_core::Error::Msg("a projection went missing".into()))
    }
}

/// The query, key and value projections, as the checkpoint stores them.
enum Qkv {
    Separate {
        q: Projection,
        k: Projection,
        v: Projection,
    },
    /// One `qkv_proj`: q's rows, then k's, then v's (Phi-3).
    Fused(Projection),
    /// One `query_key_value`: per head, its q, k and v rows (GPT-NeoX, BLOOM).
    PerHead(Projection),
}

impl Attention {
    fn load(
        vb: VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        layer: usize,
        pack: bool,
    ) -> candle_core::Result<Self> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let (q, kv) = (spec.num_attention_heads * hd, spec.kv_heads * hd);
        let qkv = match spec.family.projections {
            Projections::Separate => Qkv::Separate {
                q: Projection::load(h, q, vb.pp("q_proj"), source, pack)?,
                k: Projection::load(h, kv, vb.pp("k_proj"), source, pack)?,
                v: Projection::load(h, kv, vb.pp("v_proj"), source, pack)?,
            },
            Projections::Fused => Qkv::Fused(Projection::load(
                h,
                q + 2 * kv,
                vb.pp("qkv_proj"),
                source,
                pack,
            )?),
            Projections::PerHead if q != kv => {
                candle_core::bail!("a per-head query_key_value needs as many kv heads as heads")
            }
            Projections::PerHead => Qkv::PerHead(Projection::load(
                h,
                3 * q,
                vb.pp("query_key_value"),
                source,
                pack,
            )?),
            Projections::Conv1D => {
                Qkv::Fused(Projection::load_conv1d(h, q + 2 * kv, vb.pp("c_attn"))?)
            }
        };
        let norm = |name: &str, width: usize| rms_norm(width, spec, vb.pp(name));
        let (q_norm, k_norm) = match spec.family.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(norm("q_norm", hd)?), Some(norm("k_norm", hd)?)),
            QkNorm::Whole => (Some(norm("q_norm", q)?), Some(norm("k_norm", kv)?)),
        };
        // The fused kernel scales scores by 1/sqrt(head_dim): another scale is folded
        // into the queries.
        let default_scale = 1.0 / (hd as f64).sqrt();
        let query_scale = ((spec.attention_scale - default_scale).abs() > 1e-12)
            .then_some(spec.attention_scale / default_scale);
        let window = spec.windows.get(layer).copied().flatten();
        Ok(Self {
            qkv,
            o: match spec.family.projections {
                Projections::Conv1D => {
                    Projection::load_conv1d(q, h, vb.pp(spec.family.names.attention_output))?
                }
                _ => Projection::load(
                    q,
                    h,
                    vb.pp(spec.family.names.attention_output),
                    source,
                    pack,
                )?,
            },
            q_norm,
            k_norm,
            per_head_norm: spec.family.qk_norm == QkNorm::PerHead,
            query_scale,
            softcap: spec.attention_softcap,
            window,
            local_rope: window.is_some() && spec.local_rope.is_some(),
            rope: spec.family.positions == Positions::Rope,
            alibi: match spec.family.positions {
                Positions::Alibi => Some(
                    Tensor::new(
                        alibi_slopes(spec.num_attention_heads).as_slice(),
                        vb.device(),
                    )?
                    .reshape((1, spec.num_attention_heads, 1, 1))?,
                ),
                Positions::Rope | Positions::Learned => None,
            },
            heads: spec.num_attention_heads,
            kv_heads: spec.kv_heads,
            head_dim: hd,
        })
    }

    fn projections(&self) -> Vec<&Projection> {
        match &self.qkv {
            Qkv::Separate { q, k, v } => vec![q, k, v, &self.o],
            Qkv::Fused(qkv) | Qkv::PerHead(qkv) => vec![qkv, &self.o],
        }
    }

    /// q, k and v `[b, seq, heads × head_dim]` of `x`.
    fn project(&self, x: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        match &self.qkv {
            Qkv::Separate { q, k, v } => Projection::forward_shared([q, k, v], x),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                Ok([
                    y.narrow(2, 0, q)?,
                    y.narrow(2, q, kv)?,
                    y.narrow(2, q + kv, kv)?,
                ])
            }
            Qkv::PerHead(qkv) => {
                let (b, seq, _) = x.dims3()?;
                let y = qkv
                    .forward(x)?
                    .reshape((b, seq, self.heads, 3, self.head_dim))?;
                let part = |i: usize| -> candle_core::Result<Tensor> {
                    y.narrow(3, i, 1)?
                        .contiguous()?
                        .reshape((b, seq, self.heads * self.head_dim))
                };
                Ok([part(0)?, part(1)?, part(2)?])
            }
        }
    }

    /// `x` `[b, seq, hidden]`: row `r` continues the sequence whose keys and values are
    /// `kvs[r]` at position `positions[r]` (`rope` holds those rows' angles). The
    /// projections, RoPE and (for short steps on the CPU) attention run over all rows at
    /// once; appending to the caches per sequence.
    fn forward(
        &self,
        x: &Tensor,
        ropes: &PassRopes,
        kvs: &mut [&mut Option<LayerCache>],
        positions: &[usize],
        limit: usize,
    ) -> candle_core::Result<Tensor> {
        let rope = match (&ropes.local, self.local_rope) {
            (Some(local), true) => local,
            _ => &ropes.global,
        };
        let (b, seq, _) = x.dims3()?;
        if kvs.len() != b || positions.len() != b {
            candle_core::bail!("{b} rows for {} caches", kvs.len());
        }
        let [q, k, v] = self.project(x)?;
        let (q, k) = match (&self.q_norm, &self.k_norm, self.per_head_norm) {
            (Some(qn), Some(kn), false) => (rms_norm_forward(qn, &q)?, rms_norm_forward(kn, &k)?),
            _ => (q, k),
        };
        let split = |t: Tensor, heads: usize| t.reshape((b, seq, heads, self.head_dim));
        let (q, k) = (split(q, self.heads)?, split(k, self.kv_heads)?);
        let (q, k) = match (&self.q_norm, &self.k_norm, self.per_head_norm) {
            (Some(qn), Some(kn), true) => (rms_norm_forward(qn, &q)?, rms_norm_forward(kn, &k)?),
            _ => (q, k),
        };
        let (q, k) = match self.rope {
            true => (rope.apply_heads_first(&q)?, rope.apply_heads_first(&k)?),
            false => (
                q.transpose(1, 2)?.contiguous()?,
                k.transpose(1, 2)?.contiguous()?,
            ),
        };
        let q = match self.query_scale {
            Some(scale) => (q * scale)?,
            None => q,
        };
        let v = split(v, self.kv_heads)?.transpose(1, 2)?.contiguous()?;
        for (r, kv) in kvs.iter_mut().enumerate() {
            LayerCache::append(kv, &k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?, limit)?;
        }
        let caches = kvs
            .iter()
            .map(|kv| {
                kv.as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("a KV cache is missing".into()))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // A window only matters once a sequence holds more keys than it spans.
        let windowed = self
            .window
            .is_some_and(|w| caches.iter().any(|c| c.len > w));
        // f32 on the CPU: the fused kernel, for decode and prompts alike (SmolLM2's
        // 128-token prefill 135 ms against 146 ms through MKL's batched matmuls, mask
        // and softmax; docs/cpu-performance.md), and for a decode step past a sliding
        // window too (its one query sees the window's last keys). Otherwise — several
        // queries past a window, soft-capped scores, ALiBi — candle's ops per sequence.
        let plain = (!windowed || seq == 1) && self.softcap.is_none() && self.alibi.is_none();
        let first = |keys: usize| match (self.window, seq) {
            (Some(w), 1) => keys.saturating_sub(w),
            _ => 0,
        };
        let y = if q.device().is_cpu() && q.dtype() == DType::F32 && plain {
            let cached: Vec<crate::cpu::fused_ops::CachedKv<'_>> = caches
                .iter()
                .map(|c| crate::cpu::fused_ops::CachedKv {
                    k: &c.k,
                    v: &c.v,
                    keys: c.len,
                    first: first(c.len),
                })
                .collect();
            crate::cpu::fused_ops::causal_attention(&q, &cached)?
        } else {
            let mut rows = Vec::with_capacity(b);
            for (r, (cache, &pos)) in caches.iter().zip(positions).enumerate() {
                let (k, v) = (cache.keys()?.contiguous()?, cache.values()?.contiguous()?);
                rows.push(self.attend(q.narrow(0, r, 1)?, k, v, pos, cache.start)?);
            }
            Tensor::cat(&rows, 0)?
        };
        if let Some(window) = self.window {
            for kv in kvs.iter_mut() {
                if let Some(cache) = kv.as_mut() {
                    cache.roll(window)?;
                }
            }
        }
        let y = y
            .transpose(1, 2)?
            .reshape((b, seq, self.heads * self.head_dim))?;
        self.o.forward(&y)
    }

    /// Causal attention of `q` `[1, heads, seq, head_dim]` (at positions `pos`..) over the
    /// cached `k`/`v` `[1, kv_heads, keys, head_dim]` (at positions `start`..) →
    /// `[1, heads, seq, head_dim]`; keys outside the layer's window are masked too.
    fn attend(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos: usize,
        start: usize,
    ) -> candle_core::Result<Tensor> {
        let seq = q.dim(2)?;
        let keys = k.dim(2)?;
        let repeat = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, repeat)?;
        let v = candle_transformers::utils::repeat_kv(v, repeat)?;
        let in_dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = match self.softcap {
            Some(cap) => ((att / cap)?.tanh()? * cap)?,
            None => att,
        };
        let att = match &self.alibi {
            Some(slopes) => {
                let keys = Tensor::arange(0u32, keys as u32, att.device())?
                    .to_dtype(DType::F32)?
                    .reshape((1, 1, 1, keys))?;
                att.broadcast_add(&slopes.broadcast_mul(&keys)?)?
            }
            None => att,
        };
        let hidden = |query: usize, key: usize| {
            let (at, key) = (pos + query, start + key);
            key > at || self.window.is_some_and(|w| key + w <= at)
        };
        let att = if (0..seq).any(|i| (0..keys).any(|j| hidden(i, j))) {
            let mask: Vec<u8> = (0..seq)
                .flat_map(|i| (0..keys).map(move |j| (i, j)))
                .map(|(i, j)| u8::from(hidden(i, j)))
                .collect();
            let mask =
                Tensor::from_vec(mask, (seq, keys), att.device())?.broadcast_as(att.shape())?;
            let neg_inf =
                Tensor::new(f32::NEG_INFINITY, att.device())?.broadcast_as(att.shape())?;
            mask.where_cond(&neg_inf, &att)?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v.contiguous()?)?.to_dtype(in_dtype)
    }
}

/// The SiLU-gated MLP's gate and up projections, as the checkpoint stores them.
enum GateUp {
    Separate {
        gate: Projection,
        up: Projection,
    },
    /// One `gate_up_proj`: the gate's rows, then up's (Phi-3).
    Fused(Projection),
    /// No gate: `down(act(up(x)))` (GPT-NeoX, BLOOM).
    Ungated(Projection),
}

struct Mlp {
    gate_up: GateUp,
    down: Projection,
    activation: Activation,
}

impl Mlp {
    /// The block's dense MLP, named as the family's checkpoints name it.
    fn load(
        vb: VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        pack: bool,
    ) -> candle_core::Result<Self> {
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        match spec.family.projections {
            Projections::Separate => Self::load_separate(
                vb,
                source,
                spec,
                i,
                ["gate_proj", "up_proj", "down_proj"],
                pack,
            ),
            Projections::Fused => Ok(Self {
                gate_up: GateUp::Fused(Projection::load(
                    h,
                    2 * i,
                    vb.pp("gate_up_proj"),
                    source,
                    pack,
                )?),
                down: Projection::load(i, h, vb.pp("down_proj"), source, pack)?,
                activation: spec.activation,
            }),
            Projections::Conv1D => Ok(Self {
                gate_up: GateUp::Ungated(Projection::load_conv1d(h, i, vb.pp("c_fc"))?),
                down: Projection::load_conv1d(i, h, vb.pp("c_proj"))?,
                activation: spec.activation,
            }),
            Projections::PerHead => Ok(Self {
                gate_up: GateUp::Ungated(Projection::load(
                    h,
                    i,
                    vb.pp("dense_h_to_4h"),
                    source,
                    pack,
                )?),
                down: Projection::load(i, h, vb.pp("dense_4h_to_h"), source, pack)?,
                activation: spec.activation,
            }),
        }
    }

    /// An MLP of `width` whose gate, up and down projections are `names` under `vb`
    /// (an expert's too).
    fn load_separate(
        vb: VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        width: usize,
        [gate, up, down]: [&str; 3],
        pack: bool,
    ) -> candle_core::Result<Self> {
        let h = spec.hidden_size;
        Ok(Self {
            gate_up: GateUp::Separate {
                gate: Projection::load(h, width, vb.pp(gate), source, pack)?,
                up: Projection::load(h, width, vb.pp(up), source, pack)?,
            },
            down: Projection::load(width, h, vb.pp(down), source, pack)?,
            activation: spec.activation,
        })
    }

    fn projections(&self) -> Vec<&Projection> {
        match &self.gate_up {
            GateUp::Separate { gate, up } => vec![gate, up, &self.down],
            GateUp::Fused(gate_up) | GateUp::Ungated(gate_up) => vec![gate_up, &self.down],
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let [gate, up] = match &self.gate_up {
            GateUp::Ungated(up) => {
                let y = up.forward(x)?;
                let y = match self.activation {
                    Activation::Silu => candle_nn::ops::silu(&y)?,
                    Activation::GeluTanh => y.gelu()?,
                    Activation::Gelu => y.gelu_erf()?,
                };
                return self.down.forward(&y);
            }
            GateUp::Separate { gate, up } => Projection::forward_shared([gate, up], x)?,
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(x)?;
                let half = y.dim(D::Minus1)? / 2;
                // The gate is written in place below: a storage of its own (a narrow of
                // one row is already contiguous and would share `up`'s).
                let gate = y.narrow(D::Minus1, 0, half)?;
                let gate = match gate.is_contiguous() {
                    true => gate.copy()?,
                    false => gate.contiguous()?,
                };
                [gate, y.narrow(D::Minus1, half, half)?.contiguous()?]
            }
        };
        // Packing gate and up into one matmul was no faster here, and a disk unit would
        // pay the packing copy on every pass: the two matmuls stay, their SiLU and
        // product fuse into one in-place pass.
        let x = match self.activation {
            Activation::Silu if gate.device().is_cpu() && gate.dtype() == DType::F32 => {
                crate::cpu::fused_ops::silu_mul_in_place(&gate, &up)?;
                gate
            }
            Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        self.down.forward(&x)
    }
}

/// A block's MLP: one dense, or the router of the experts that follow the block as a
/// unit of their own ([`experts::ExpertGroup`]).
enum FeedForward {
    Dense(Mlp),
    Routed(experts::Router),
}

impl FeedForward {
    fn load(
        vb: VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        layer: usize,
        pack: bool,
    ) -> candle_core::Result<Self> {
        match (spec.family.experts.as_ref(), spec.moe.as_ref()) {
            (Some(names), Some(moe)) if moe.sparse.get(layer) == Some(&true) => {
                experts::Router::load(vb.pp(names.module), source, spec, moe, pack)
                    .map(Self::Routed)
            }
            _ => Mlp::load(vb.pp("mlp"), source, spec, pack).map(Self::Dense),
        }
    }

    fn projections(&self) -> Vec<&Projection> {
        match self {
            Self::Dense(mlp) => mlp.projections(),
            Self::Routed(router) => vec![router.projection()],
        }
    }
}

/// One transformer block: `h = x + r·post_attn(attn(pre_attn(x)))`, then
/// `h + r·post_mlp(mlp(pre_mlp(h)))`, each norm present or not as the family places them
/// ([`NormPlacement`]) and `r` the residual multiplier.
pub struct Block {
    pre_attention: Option<Norm>,
    attention: Attention,
    post_attention: Option<Norm>,
    pre_mlp: Option<Norm>,
    mlp: FeedForward,
    post_mlp: Option<Norm>,
    /// Both branches read the block's input (GPT-NeoX's parallel residual).
    parallel: bool,
    /// Scales both branches before their residual adds (Granite; else 1).
    residual_multiplier: f64,
}

impl Block {
    /// `pack`: the block stays resident (see [`Projection::Packed`]).
    fn load(
        vb: VarBuilder,
        source: &WeightSource,
        spec: &DecoderSpec,
        layer: usize,
        pack: bool,
    ) -> candle_core::Result<Self> {
        let norm = |name: &str| Norm::load(spec.hidden_size, spec, vb.pp(name)).map(Some);
        // Checkpoint names: Llama's two norms sit before each branch; OLMo 2's two and
        // Gemma's extra pair after.
        let [pre_attention, post_attention, pre_mlp, post_mlp] = match spec.norms {
            NormPlacement::Pre | NormPlacement::Parallel => [
                norm(spec.family.names.block_norms[0])?,
                None,
                norm(spec.family.names.block_norms[1])?,
                None,
            ],
            NormPlacement::Post => [
                None,
                norm("post_attention_layernorm")?,
                None,
                norm("post_feedforward_layernorm")?,
            ],
            NormPlacement::Sandwich => [
                norm("input_layernorm")?,
                norm("post_attention_layernorm")?,
                norm("pre_feedforward_layernorm")?,
                norm("post_feedforward_layernorm")?,
            ],
        };
        let mlp = FeedForward::load(vb.clone(), source, spec, layer, pack)?;
        if matches!(mlp, FeedForward::Routed(_))
            && (post_mlp.is_some() || spec.norms == NormPlacement::Parallel)
        {
            candle_core::bail!(
                "routed experts after a norm on the MLP's output or beside attention are not \
                 implemented"
            );
        }
        Ok(Self {
            pre_attention,
            attention: Attention::load(
                vb.pp(spec.family.names.attention),
                source,
                spec,
                layer,
                pack,
            )?,
            post_attention,
            pre_mlp,
            mlp,
            post_mlp,
            parallel: spec.norms == NormPlacement::Parallel,
            residual_multiplier: spec.residual_multiplier,
        })
    }

    fn projections(&self) -> Vec<&Projection> {
        let mut all = self.attention.projections();
        all.extend(self.mlp.projections());
        all
    }

    /// See [`Attention::forward`] for how rows map to sequences. A block with routed
    /// experts returns the residual stream before its MLP and what its experts' unit
    /// needs to finish it.
    fn forward(
        &self,
        x: &Tensor,
        ropes: &PassRopes,
        kvs: &mut [&mut Option<LayerCache>],
        positions: &[usize],
        limit: usize,
    ) -> candle_core::Result<(Tensor, Option<experts::Routed>)> {
        let normed = |norm: &Option<Norm>, t: &Tensor| match norm {
            Some(n) => n.forward(t),
            None => Ok(t.clone()),
        };
        let scaled = |t: Tensor| match self.residual_multiplier {
            1.0 => Ok(t),
            m => t * m,
        };
        let a = self.attention.forward(
            &normed(&self.pre_attention, x)?,
            ropes,
            kvs,
            positions,
            limit,
        )?;
        let a = scaled(normed(&self.post_attention, &a)?)?;
        let mlp = match &self.mlp {
            FeedForward::Dense(mlp) => mlp,
            FeedForward::Routed(router) => {
                // Neither parallel nor post-normed (refused at load).
                let residual = (a + x)?;
                let (rows, routes) = router.route(&normed(&self.pre_mlp, &residual)?)?;
                let routed = experts::Routed {
                    residual: residual.clone(),
                    rows,
                    routes,
                    residual_multiplier: self.residual_multiplier,
                };
                return Ok((residual, Some(routed)));
            }
        };
        if self.parallel {
            let m = mlp.forward(&normed(&self.pre_mlp, x)?)?;
            let out = ((a + scaled(normed(&self.post_mlp, &m)?)?)? + x)?;
            return Ok((out, None));
        }
        let h = (a + x)?;
        let m = mlp.forward(&normed(&self.pre_mlp, &h)?)?;
        Ok(((scaled(normed(&self.post_mlp, &m)?)? + h)?, None))
    }
}

/// A block's or the model's norm: RMS or LayerNorm, as the family has it.
pub enum Norm {
    Rms(RmsNorm),
    Layer(candle_nn::LayerNorm),
}

impl Norm {
    fn load(width: usize, spec: &DecoderSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        match spec.family.norm_kind {
            NormKind::Rms => rms_norm(width, spec, vb).map(Self::Rms),
            NormKind::Layer => candle_nn::layer_norm(width, spec.rms_norm_eps, vb).map(Self::Layer),
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Rms(n) => rms_norm_forward(n, x),
            Self::Layer(n) => n.forward(x),
        }
    }
}

/// ALiBi's slopes for `heads` heads, as BLOOM computes them: powers of
/// `2^(-8/n)` for the largest power of two `n ≤ heads`, then the odd powers of
/// `2^(-4/n)` for the rest.
fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = |n: usize| 2f32.powf(-(2f32.powf(-((n as f32).log2() - 3.0))));
    let first = base(closest);
    let mut slopes: Vec<f32> = (1..=closest).map(|p| first.powi(p as i32)).collect();
    let extra = base(2 * closest);
    slopes.extend(
        (0..heads - closest)
            .take(closest)
            .map(|i| extra.powi(1 + 2 * i as i32)),
    );
    slopes
}

/// `norm(x)`: for f32 on the CPU on the team ([`crate::cpu::fused_ops::rms_norm`]),
/// elsewhere candle-nn's.
fn rms_norm_forward(norm: &RmsNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    let weight = norm.weight();
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        return crate::cpu::fused_ops::rms_norm(x, weight, norm.eps() as f32);
    }
    norm.forward(&x.contiguous()?)
}

/// An RMSNorm of `width` at `vb`, multiplying by `w` or, for Gemma, by `1 + w`.
fn rms_norm(width: usize, spec: &DecoderSpec, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    match spec.family.norm_weight {
        NormWeight::Plain => candle_nn::rms_norm(width, spec.rms_norm_eps, vb),
        NormWeight::OffsetFromOne => Ok(RmsNorm::new(
            (vb.get(width, "weight")? + 1.0)?,
            spec.rms_norm_eps,
        )),
    }
}

/// RoPE tables (non-interleaved halves, as HF checkpoints expect) for the first
/// `rotary_dim` dimensions of each head. With LongRoPE, a second set of `positions` rows
/// follows the first: a sequence whose length after this pass exceeds `long_after` takes
/// its new tokens' angles from there (transformers switches the whole pass by its
/// longest sequence; here each sequence by its own length, the same for one sequence).
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// Rows of one set.
    positions: usize,
    /// LongRoPE's original context, when the tables hold its long set.
    long_after: Option<usize>,
    /// Dynamic NTK scaling: its original context and the RoPE, whose angles past it are
    /// computed for each pass from the sequence's length.
    dynamic: Option<(usize, spec::RopeSpec)>,
}

impl Rope {
    /// Tables for `positions` positions of `rope`.
    fn new(
        rope: &spec::RopeSpec,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let msg = |e: HandlerError| candle_core::Error::Msg(e.to_string());
        // Dynamic NTK reads the tables within its original context only (past it the
        // angles are computed for each pass).
        let dynamic = match rope.dynamic_ntk().map_err(msg)? {
            Some((original, _)) if original < positions => Some((original, rope.clone())),
            _ => None,
        };
        let positions = dynamic
            .as_ref()
            .map_or(positions, |(original, _)| *original);
        let angles = |inv: Vec<f32>| -> candle_core::Result<Tensor> {
            let inv = Tensor::new(inv.as_slice(), device)?;
            let positions = Tensor::arange(0, positions as u32, device)?
                .to_dtype(DType::F32)?
                .reshape((positions, 1))?;
            positions.matmul(&inv.reshape((1, inv.elem_count()))?)
        };
        let mut table = angles(rope.inverse_frequencies().map_err(msg)?)?;
        // The long set only where a sequence can outgrow the original context.
        let long = rope.long_context_within(positions).map_err(msg)?;
        let long_after = match long {
            Some((original, inv)) => {
                table = Tensor::cat(&[table, angles(inv)?], 0)?;
                Some(original)
            }
            None => None,
        };
        let scale = rope.attention_factor();
        Ok(Self {
            cos: (table.cos()? * scale)?.to_dtype(dtype)?,
            sin: (table.sin()? * scale)?.to_dtype(dtype)?,
            positions,
            long_after,
            dynamic,
        })
    }

    /// The angles of `seq` positions from each of `positions` under dynamic NTK scaling,
    /// when a sequence ends past the original context: each sequence's new tokens
    /// rotate with the frequencies of its length after this pass (as transformers'
    /// forward recomputes them; the keys cached before keep theirs). `None` when every
    /// sequence stays within the original context (the tables hold those angles).
    fn dynamic_rows(
        &self,
        positions: &[usize],
        seq: usize,
    ) -> candle_core::Result<Option<RowRope>> {
        let Some((original, rope)) = &self.dynamic else {
            return Ok(None);
        };
        if positions.iter().all(|p| p + seq <= *original) {
            return Ok(None);
        }
        let half = self.cos.dim(1)?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in positions {
            let inverse = rope
                .frequencies_at_length(p + seq)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            for position in p..p + seq {
                for f in &inverse {
                    let angle = position as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = match positions.len() {
            1 => vec![seq, half],
            rows => vec![rows, seq, half],
        };
        let (device, dtype) = (self.cos.device(), self.cos.dtype());
        Ok(Some(RowRope {
            cos: Tensor::from_vec(cos, shape.as_slice(), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape.as_slice(), device)?.to_dtype(dtype)?,
        }))
    }

    /// The row of the tables holding position `p` of a sequence that reaches `end`.
    fn row(&self, p: usize, end: usize) -> usize {
        match self.long_after {
            Some(original) if end > original => self.positions + p,
            _ => p,
        }
    }

    /// The angles of `seq` positions from each of `positions`, for one forward pass.
    fn rows(&self, positions: &[usize], seq: usize) -> candle_core::Result<RowRope> {
        if let Some(rows) = self.dynamic_rows(positions, seq)? {
            return Ok(rows);
        }
        let half = self.cos.dim(1)?;
        let (cos, sin) = if let [pos] = positions {
            let first = self.row(*pos, pos + seq);
            (
                self.cos.narrow(0, first, seq)?,
                self.sin.narrow(0, first, seq)?,
            )
        } else {
            let index: Vec<u32> = positions
                .iter()
                .flat_map(|&p| (p..p + seq).map(move |i| self.row(i, p + seq) as u32))
                .collect();
            let index = Tensor::new(index.as_slice(), self.cos.device())?;
            let rows = (positions.len(), seq, half);
            (
                self.cos.index_select(&index, 0)?.reshape(rows)?,
                self.sin.index_select(&index, 0)?.reshape(rows)?,
            )
        };
        Ok(RowRope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }
}

/// RoPE angles for the rows of one forward pass: `[seq, half]` for one sequence,
/// `[rows, seq, half]` for rows at their own positions.
struct RowRope {
    cos: Tensor,
    sin: Tensor,
}

impl RowRope {
    /// `x` `[rows, seq, heads, head_dim]` rotated ([`Self::apply`]) and transposed to
    /// `[rows, heads, seq, head_dim]` (contiguous): in one pass on the team for f32 on the
    /// CPU with the whole head rotated (a prompt's transposes and rotations were copies
    /// on the calling thread and on rayon's pool between its matmuls).
    fn apply_heads_first(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let whole = 2 * self.cos.dim(D::Minus1)? == x.dim(D::Minus1)?;
        if whole && x.device().is_cpu() && x.dtype() == DType::F32 && self.cos.dtype() == DType::F32
        {
            return crate::cpu::fused_ops::rope_heads_first(x, &self.cos, &self.sin);
        }
        self.apply(&x.transpose(1, 2)?.contiguous()?)
    }

    /// Rotates the first `2 × half` dimensions of `x` `[rows, heads, seq, head_dim]`
    /// (contiguous); the rest pass through (partial rotary).
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rotary = 2 * self.cos.dim(D::Minus1)?;
        let head_dim = x.dim(D::Minus1)?;
        if rotary == head_dim {
            return candle_nn::rotary_emb::rope(x, &self.cos, &self.sin);
        }
        let rotated = candle_nn::rotary_emb::rope(
            &x.narrow(D::Minus1, 0, rotary)?.contiguous()?,
            &self.cos,
            &self.sin,
        )?;
        Tensor::cat(
            &[rotated, x.narrow(D::Minus1, rotary, head_dim - rotary)?],
            D::Minus1,
        )?
        .contiguous()
    }
}

/// One pass's angles: for full-attention layers, and for sliding ones where their RoPE
/// differs.
struct PassRopes {
    global: RowRope,
    local: Option<RowRope>,
}

impl Activations for PassRopes {
    fn to_device(self, device: &Device) -> candle_core::Result<Self> {
        let moved = |r: RowRope| -> candle_core::Result<RowRope> {
            Ok(RowRope {
                cos: r.cos.to_device(device)?,
                sin: r.sin.to_device(device)?,
            })
        };
        Ok(Self {
            global: moved(self.global)?,
            local: self.local.map(moved).transpose()?,
        })
    }
}

/// One unit of a Llama stack.
pub enum DecoderUnit {
    Embeddings(TokenTable),
    Block(Box<Block>),
    /// A block's routed experts, run after it.
    Experts(experts::ExpertGroup),
    /// The learned positions' table `[positions, hidden]` (GPT-2's `wpe`): each row's
    /// positions' entries are added.
    Positions(Tensor),
    /// The norm right after the embeddings (BLOOM), over every position.
    EmbeddingNorm(Norm),
    /// The final norm, over the last position.
    Norm(Norm),
    Head(OutputHead),
}

impl StackModule for DecoderUnit {
    /// GGML tables and blocks whose projections are all multiplied where they are
    /// mapped; norms (and biases) are small copies.
    fn reads_in_place(&self) -> bool {
        match self {
            Self::Embeddings(TokenTable::Quantized(m)) | Self::Head(OutputHead::Quantized(m)) => {
                m.in_place()
            }
            Self::Block(block) => block.projections().iter().all(|p| p.reads_in_place()),
            Self::Experts(group) => group.reads_in_place(),
            Self::Norm(_) | Self::EmbeddingNorm(_) => true,
            Self::Positions(_) => false,
            Self::Embeddings(TokenTable::Dense(_)) | Self::Head(OutputHead::Dense(_)) => false,
        }
    }

    fn take_read_bytes(&self) -> u64 {
        match self {
            Self::Experts(group) => group.take_read_bytes(),
            _ => 0,
        }
    }
}

/// The token embedding table: candle's, or GGML rows dequantized as they are looked up
/// (on the CPU; other devices get it dequantized).
pub enum TokenTable {
    Dense(Embedding),
    Quantized(Arc<QuantizedMatrix>),
}

/// The weight `[vocab, hidden]` at `name` of `source`, quantized if stored so and
/// `device` is the CPU (the quantized kernels' device), else dense in `dtype`.
fn vocab_matrix(
    source: &WeightSource,
    name: &str,
    (vocab, hidden): (usize, usize),
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Result<Arc<QuantizedMatrix>, Tensor>> {
    match source.quantized(name)? {
        Some(m) if m.dims() != (vocab, hidden) => {
            candle_core::bail!("{name} is {:?}, not [{vocab}, {hidden}]", m.dims())
        }
        Some(m) if device.is_cpu() => Ok(Ok(Arc::new(m))),
        Some(m) => Ok(Err(m.dequantize(device)?.to_dtype(dtype)?)),
        None => {
            let w = source.load(name, dtype, device)?;
            if w.dims() != [vocab, hidden] {
                candle_core::bail!("{name} is {:?}, not [{vocab}, {hidden}]", w.dims());
            }
            Ok(Err(w))
        }
    }
}

impl TokenTable {
    fn load(
        source: &WeightSource,
        name: &str,
        dims: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(match vocab_matrix(source, name, dims, dtype, device)? {
            Ok(quantized) => Self::Quantized(quantized),
            Err(dense) => Self::Dense(Embedding::new(dense, dims.1)),
        })
    }

    /// `ids` `[b, seq]` → `[b, seq, hidden]`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Quantized(table) => {
                let (b, seq) = ids.dims2()?;
                let rows = table.rows(&ids.flatten_all()?.to_vec1::<u32>()?)?;
                rows.reshape((b, seq, table.dims().1))
            }
        }
    }

    /// The output head tied to this table (sharing its weight).
    fn tied_head(&self) -> OutputHead {
        match self {
            Self::Dense(e) => OutputHead::Dense(e.embeddings().clone()),
            Self::Quantized(table) => OutputHead::Quantized(table.clone()),
        }
    }
}

/// The output head: a weight `[vocab, hidden]`, dense or in GGML blocks.
pub enum OutputHead {
    Dense(Tensor),
    Quantized(Arc<QuantizedMatrix>),
}

impl OutputHead {
    fn load(
        source: &WeightSource,
        name: &str,
        dims: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        Ok(match vocab_matrix(source, name, dims, dtype, device)? {
            Ok(quantized) => Self::Quantized(quantized),
            Err(dense) => Self::Dense(dense),
        })
    }

    /// Logits `[b, seq, vocab]` of `hidden` `[b, seq, h]`.
    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(weight) => output_logits(weight, hidden),
            Self::Quantized(weight) => weight.forward(hidden),
        }
    }
}

/// A Llama-family decoder laid out by a plan.
pub struct MappedDecoder {
    stack: LayerStack<DecoderUnit>,
    config: DecoderSpec,
    /// RoPE tables, built on the first block's device (the stack moves each pass's
    /// angles to every block's).
    rope: Rope,
    /// The sliding layers' own tables, where their RoPE differs.
    local_rope: Option<Rope>,
}

/// The stack unit that is the output head tied to the embedding (no placement unit of
/// its own: it lives where the embedding does).
const TIED_HEAD: &str = "lm_head (tied to the embeddings)";

/// One checkpoint's unit names: its family's ([`families::Names`]), under the family's
/// prefix unless the checkpoint was saved from the bare model.
#[derive(Debug, Clone)]
struct UnitNames {
    embeddings: String,
    positions: Option<String>,
    embedding_norm: Option<String>,
    blocks: String,
    final_norm: String,
    head: String,
}

impl UnitNames {
    fn new(names: &families::Names, prefixed: bool) -> Self {
        let under = |n: &str| match prefixed {
            true => format!("{}.{n}", names.prefix),
            false => n.to_string(),
        };
        Self {
            embeddings: under(names.embeddings),
            positions: names.position_embeddings.map(under),
            embedding_norm: names.embedding_norm.map(under),
            blocks: under(names.blocks),
            final_norm: under(names.final_norm),
            head: names.head.to_string(),
        }
    }

    /// The names `source` uses: prefixed unless only the bare embedding is there.
    fn of(names: &families::Names, source: &WeightSource) -> Self {
        let stored = source.tensor_names();
        let bare = format!("{}.weight", names.embeddings);
        let prefixed =
            !stored.contains(&bare) || stored.contains(&format!("{}.{bare}", names.prefix));
        Self::new(names, prefixed)
    }

    fn block(&self, i: usize) -> String {
        format!("{}.{i}", self.blocks)
    }

    /// Block `i`'s routed experts' unit, if it has routed experts.
    fn experts(&self, config: &DecoderSpec, i: usize) -> Option<String> {
        let (names, moe) = (config.family.experts.as_ref()?, config.moe.as_ref()?);
        (moe.sparse.get(i) == Some(&true))
            .then(|| format!("{}.{}.experts", self.block(i), names.module))
    }

    fn weight(unit: &str) -> String {
        format!("{unit}.weight")
    }

    /// In execution order, as the planner names them.
    fn all(&self, config: &DecoderSpec) -> Vec<String> {
        let mut names = vec![self.embeddings.clone()];
        names.extend(self.positions.clone());
        names.extend(self.embedding_norm.clone());
        for i in 0..config.num_hidden_layers {
            names.push(self.block(i));
            names.extend(self.experts(config, i));
        }
        names.push(self.final_norm.clone());
        if !config.tie_word_embeddings {
            names.push(self.head.clone());
        }
        names
    }
}

impl MappedDecoder {
    /// Placement unit names, in order (as the planner names them), for a checkpoint
    /// whose tensors carry the family's prefix.
    pub fn unit_names(config: &DecoderSpec) -> Vec<String> {
        UnitNames::new(config.family.names, true).all(config)
    }

    pub fn config(&self) -> &DecoderSpec {
        &self.config
    }

    pub fn load(
        source: &WeightSource,
        config: &DecoderSpec,
        dtype: DType,
        place: impl Fn(&str) -> Result<UnitPlacement, HandlerError>,
    ) -> Result<Self, HandlerError> {
        // An unsupported rope scaling is a load error, before any weight is read.
        config.rope.inverse_frequencies()?;
        if let Some(local) = &config.local_rope {
            local.inverse_frequencies()?;
        }
        let mut stack = LayerStack::default();
        let cfg = config.clone();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let names = UnitNames::of(cfg.family.names, source);
        let embed_weight = UnitNames::weight(&names.embeddings);

        let embed_place = place(&names.embeddings)?;
        let embed = {
            let (source, weight) = (source.clone(), embed_weight.clone());
            move |d: &Device, _: Residence| {
                TokenTable::load(&source, &weight, (v, h), dtype, d).map(DecoderUnit::Embeddings)
            }
        };
        // A tied head is a unit of its own after the norm, where the embedding lives:
        // resident, it shares the embedding's tensor (an Arc clone) instead of holding a
        // second copy of the largest matrix; streamed, it is read from disk again.
        let mut tied_head = None;
        match (&embed_place, cfg.tie_word_embeddings) {
            (UnitPlacement::Resident(d), true) => {
                let module = embed(d, Residence::Resident)
                    .weights_context(|| format!("cannot load unit {}", names.embeddings))?;
                let DecoderUnit::Embeddings(table) = &module else {
                    unreachable!("the embedding builder builds embeddings")
                };
                tied_head = Some(DecoderUnit::Head(table.tied_head()));
                stack.push_resident(&names.embeddings, d.clone(), module);
            }
            _ => stack.push_planned(&names.embeddings, embed_place.clone(), source, embed)?,
        }
        if let Some(unit) = &names.positions {
            let build = {
                let (source, weight, positions) = (
                    source.clone(),
                    UnitNames::weight(unit),
                    cfg.max_position_embeddings,
                );
                move |d: &Device, _: Residence| {
                    let table = source.load(&weight, dtype, d)?;
                    if table.dims() != [positions, h] {
                        candle_core::bail!(
                            "{weight} is {:?}, not [{positions}, {h}]",
                            table.dims()
                        );
                    }
                    Ok(DecoderUnit::Positions(table))
                }
            };
            stack.push_planned(unit, place(unit)?, source, build)?;
        }
        if let Some(unit) = &names.embedding_norm {
            let build = {
                let (source, cfg, unit) = (source.clone(), cfg.clone(), unit.clone());
                move |d: &Device, _: Residence| {
                    Norm::load(h, &cfg, source.var_builder(dtype, d).pp(&unit))
                        .map(DecoderUnit::EmbeddingNorm)
                }
            };
            stack.push_planned(unit, place(unit)?, source, build)?;
        }
        // Listed once: each block takes its own (less its experts') from it.
        let all_tensors = source.tensor_names();
        for i in 0..cfg.num_hidden_layers {
            let name = names.block(i);
            let placement = place(&name)?;
            let build = {
                let (source, cfg, name) = (source.clone(), cfg.clone(), name.clone());
                move |d: &Device, residence: Residence| {
                    let resident = residence == Residence::Resident;
                    let vb = source.var_builder(dtype, d).pp(&name);
                    Block::load(vb, &source, &cfg, i, resident)
                        .map(|b| DecoderUnit::Block(Box::new(b)))
                }
            };
            // Its tensors, less its experts' when those are a unit of their own.
            let experts = names.experts(&cfg, i);
            let within = |unit: &str| {
                let dotted = format!("{unit}.");
                (all_tensors.iter())
                    .filter(move |t| t.starts_with(&dotted))
                    .cloned()
            };
            let experts_dotted = experts.as_ref().map(|e| format!("{e}."));
            let tensors = within(&name)
                .filter(|t| experts_dotted.as_ref().is_none_or(|e| !t.starts_with(e)))
                .collect();
            stack.push_planned_with(&name, tensors, false, placement, source, build)?;
            if let Some(unit) = experts {
                let placement = place(&unit)?;
                let build = ExpertGroup::builder(source, &cfg, &unit, dtype)?;
                let tensors = within(&unit).collect();
                stack.push_planned_with(&unit, tensors, true, placement, source, build)?;
            }
        }
        let norm = {
            let (source, cfg, unit) = (source.clone(), cfg.clone(), names.final_norm.clone());
            move |d: &Device, _: Residence| {
                Norm::load(h, &cfg, source.var_builder(dtype, d).pp(&unit)).map(DecoderUnit::Norm)
            }
        };
        stack.push_planned(&names.final_norm, place(&names.final_norm)?, source, norm)?;
        if cfg.tie_word_embeddings {
            match (tied_head, &embed_place) {
                (Some(head), UnitPlacement::Resident(d)) => {
                    stack.push_resident(TIED_HEAD, d.clone(), head)
                }
                (_, UnitPlacement::Streamed(d)) => {
                    let source = source.clone();
                    let exec = d.clone();
                    let weight = embed_weight.clone();
                    stack.push_streamed(
                        TIED_HEAD,
                        d.clone(),
                        source.clone(),
                        [embed_weight.as_str()],
                        move || {
                            OutputHead::load(&source, &weight, (v, h), dtype, &exec)
                                .map(DecoderUnit::Head)
                        },
                    );
                }
                (None, UnitPlacement::Resident(_)) => {
                    unreachable!("a resident tied embedding made its head above")
                }
            }
        } else {
            let head = {
                let (source, weight) = (source.clone(), UnitNames::weight(&names.head));
                move |d: &Device, _: Residence| {
                    OutputHead::load(&source, &weight, (v, h), dtype, d).map(DecoderUnit::Head)
                }
            };
            stack.push_planned(&names.head, place(&names.head)?, source, head)?;
        }
        let rope_device = stack
            .device_of(&names.block(0))
            .or_else(|| stack.units().first().map(|u| &u.device))
            .cloned()
            .ok_or_else(|| HandlerError::Unsupported("the model has no units".into()))?;
        let tables = |rope: &spec::RopeSpec| {
            Rope::new(rope, cfg.positions(), dtype, &rope_device)
                .context(|| "cannot build RoPE tables".into())
        };
        let rope = tables(&cfg.rope)?;
        let local_rope = cfg.local_rope.as_ref().map(tables).transpose()?;
        Ok(Self {
            stack,
            config: cfg,
            rope,
            local_rope,
        })
    }

    /// Its units, for metrics and the device manager.
    pub fn units(&self) -> &dyn Units {
        &self.stack
    }

    /// Placement units kept on disk and streamed each pass (a tied head streams with its
    /// embedding and is not counted again).
    pub fn streamed_units(&self) -> usize {
        let tied_head_streamed = self
            .stack
            .units()
            .iter()
            .any(|u| u.name == TIED_HEAD && u.is_streamed());
        self.stack.streamed_units() - usize::from(tied_head_streamed)
    }

    /// Whether the keys a position gets depend on how long its sequence grows (LongRoPE
    /// switching factors, or dynamic NTK growing its base, past the original context): then a prefix's cached keys are
    /// not the same for every sequence that shares it, and are not reused.
    pub fn keys_depend_on_length(&self) -> bool {
        let depends = |r: &Rope| r.long_after.is_some() || r.dynamic.is_some();
        depends(&self.rope) || self.local_rope.as_ref().is_some_and(depends)
    }

    /// A cache holding the first `len` positions of `prefix` (at most its own), ready
    /// for the tokens after them: its own buffers, grown like any other's.
    pub fn resume(&self, prefix: &KvPrefix, len: usize) -> candle_core::Result<KvCache> {
        if prefix.layers.len() != self.config.num_hidden_layers || len > prefix.len || len == 0 {
            candle_core::bail!(
                "a prefix of {} blocks and {} positions cannot start {len} positions of a \
                 {}-block model",
                prefix.layers.len(),
                prefix.len,
                self.config.num_hidden_layers
            );
        }
        let mut cache = KvCache::new(self.config.num_hidden_layers);
        for (layer, (k, v)) in cache.layers.iter_mut().zip(&prefix.layers) {
            let (k, v) = (k.narrow(2, 0, len)?, v.narrow(2, 0, len)?);
            LayerCache::append(layer, &k, &v, self.config.positions())?;
        }
        cache.position = len;
        Ok(cache)
    }

    /// Runs `tokens` (`[1, seq]`) after what `cache` holds; returns the last position's
    /// logits `[1, vocab]` in f32 and advances the cache.
    pub fn forward(&self, tokens: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        self.forward_sequences(tokens, &mut [cache])
    }

    /// Runs `tokens` (`[b, seq]`), row `r` after what `caches[r]` holds (the sequences
    /// may be at different positions); returns each row's last logits `[b, vocab]` in
    /// f32 and advances every cache. One pass reads each weight once for all rows: a
    /// decode step for several sequences costs little more than for one.
    pub fn forward_sequences(
        &self,
        tokens: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Tensor> {
        let (rows, seq) = tokens.dims2()?;
        if rows != caches.len() {
            candle_core::bail!("{rows} token rows for {} caches", caches.len());
        }
        let mut positions = Vec::with_capacity(rows);
        for cache in caches.iter_mut() {
            if cache.layers.len() != self.config.num_hidden_layers {
                **cache = KvCache::new(self.config.num_hidden_layers);
            }
            let pos = cache.position;
            if pos + seq > self.config.positions() {
                return Err(candle_core::Error::Msg(format!(
                    "{} tokens exceed the model's {} positions",
                    pos + seq,
                    self.config.positions()
                )));
            }
            positions.push(pos);
        }
        let limit = self.config.positions();
        // The units read the token ids and this pass's RoPE angles.
        let ropes = PassRopes {
            global: self.rope.rows(&positions, seq)?,
            local: self
                .local_rope
                .as_ref()
                .map(|r| r.rows(&positions, seq))
                .transpose()?,
        };
        let flow = Flow::new((tokens.clone(), ropes, None::<experts::Routed>));
        let mut block = 0;
        let flow = self.stack.forward(flow, |_, unit, mut flow| {
            flow.hidden = Some(match unit {
                DecoderUnit::Embeddings(e) => match self.config.embedding_multiplier {
                    1.0 => e.forward(&flow.inputs.0)?,
                    m => (e.forward(&flow.inputs.0)? * m)?,
                },
                DecoderUnit::Block(b) => {
                    let mut kvs: Vec<&mut Option<LayerCache>> =
                        caches.iter_mut().map(|c| &mut c.layers[block]).collect();
                    let (out, routed) =
                        b.forward(flow.hidden()?, &flow.inputs.1, &mut kvs, &positions, limit)?;
                    flow.inputs.2 = routed;
                    block += 1;
                    out
                }
                DecoderUnit::Experts(group) => {
                    group.forward(flow.inputs.2.take().ok_or_else(|| {
                        candle_core::Error::Msg("experts ran before their block routed".into())
                    })?)?
                }
                DecoderUnit::Positions(table) => {
                    let index: Vec<u32> = positions
                        .iter()
                        .flat_map(|&p| (p..p + seq).map(|i| i as u32))
                        .collect();
                    let index = Tensor::new(index.as_slice(), table.device())?;
                    let hidden = flow.hidden()?;
                    let added = table.index_select(&index, 0)?.reshape(hidden.shape())?;
                    (hidden + added)?
                }
                DecoderUnit::EmbeddingNorm(n) => n.forward(flow.hidden()?)?,
                DecoderUnit::Norm(n) => n.forward(
                    &flow
                        .hidden()?
                        .i((.., seq - 1, ..))?
                        .contiguous()?
                        .unsqueeze(1)?,
                )?,
                DecoderUnit::Head(head) => {
                    let logits = match self.config.logits_divisor {
                        1.0 => head.logits(flow.hidden()?)?,
                        d => (head.logits(flow.hidden()?)? / d)?,
                    };
                    match self.config.logit_softcap {
                        Some(cap) => ((logits / cap)?.tanh()? * cap)?,
                        None => logits,
                    }
                }
            });
            Ok(flow)
        })?;
        let logits = need(flow.hidden)?;
        for cache in caches.iter_mut() {
            cache.position += seq;
        }
        logits.squeeze(1)?.to_dtype(DType::F32)
    }
}

/// Logits `[b, seq, vocab]` of `hidden` `[b, seq, h]` under an output weight
/// `[vocab, h]`. A decode step has one row per sequence; for f32 on the CPU those few
/// rows go through a kernel that streams the large weight once
/// ([`crate::cpu::fused_ops::few_rows_times_weight`]): MKL's sgemm with 8 rows first copied
/// SmolLM2's whole 113 MB head into its panel layout (12.4 ms of a 55 ms step).
fn output_logits(weight: &Tensor, hidden: &Tensor) -> candle_core::Result<Tensor> {
    let (b, seq, h) = hidden.dims3()?;
    let vocab = weight.dim(0)?;
    let rows = hidden.reshape((b * seq, h))?;
    let few = (2..=FEW_ROWS).contains(&(b * seq));
    let logits = if few && weight.device().is_cpu() && weight.dtype() == DType::F32 {
        crate::cpu::fused_ops::few_rows_times_weight(&rows.to_dtype(DType::F32)?, weight)?
    } else {
        rows.matmul(&weight.t()?)?
    };
    logits.reshape((b, seq, vocab))
}

/// Most rows [`output_logits`] runs through the streaming kernel (it reads the weight
/// once per call, so it pays where rows are few; one row is MKL's gemv, as fast).
const FEW_ROWS: usize = 16;

fn need(x: Option<Tensor>) -> candle_core::Result<Tensor> {
    x.ok_or_else(|| candle_core::Error::Msg("a unit ran before the embeddings".into()))
}

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::TinyLlama;
    use crate::weights::files::ModelFiles;
    use candle_transformers::models::llama as reference;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// Greedy decoding with candle-transformers' single-device Llama; the logits of each step.
    fn reference_steps(dir: &std::path::Path, prompt: &[u32], steps: usize) -> Vec<Tensor> {
        let config: reference::LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
                .expect("parse");
        let config = config.into_config(false);
        #[allow(unsafe_code)]
        // SAFETY: the test's own file, not modified while mapped.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .expect("vb");
        let model = reference::Llama::load(vb, &config).expect("reference");
        let mut cache =
            reference::Cache::new(true, DType::F32, &config, &Device::Cpu).expect("cache");
        let mut out = Vec::new();
        let mut input = prompt.to_vec();
        let mut pos = 0;
        for _ in 0..steps {
            let t = Tensor::new(input.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens");
            let logits = model.forward(&t, pos, &mut cache).expect("forward");
            pos += input.len();
            let next = argmax(&logits.squeeze(0).expect("squeeze")).expect("argmax");
            out.push(logits.squeeze(0).expect("squeeze"));
            input = vec![next];
        }
        out
    }

    #[test]
    fn bf16_and_f16_logits_stay_within_2e_2_of_the_f32_reference() {
        for seed in 1..=3 {
            let fixture = referenced_spec(TinyLlama {
                seed,
                ..TinyLlama::default()
            });
            for dtype in [DType::BF16, DType::F16] {
                for streamed in [false, true] {
                    let model =
                        MappedDecoder::load(&fixture.source, &fixture.config, dtype, |_| {
                            Ok(if streamed {
                                UnitPlacement::Streamed(Device::Cpu)
                            } else {
                                UnitPlacement::Resident(Device::Cpu)
                            })
                        })
                        .expect("load");
                    let relative = first_step_relative_error(&model, &fixture);
                    assert!(
                        relative <= 2e-2,
                        "seed {seed} {dtype:?} streamed={streamed}: relative difference {relative}"
                    );
                }
            }
        }
    }

    /// Feeds `prompt`, then each greedy token, through `model` with `cache`, and checks
    /// every step's logits against `want` (the reference's, step by step) to 1e-5.
    fn decodes_greedily_like(
        model: &MappedDecoder,
        cache: &mut KvCache,
        prompt: &[u32],
        want: &[Tensor],
        label: &str,
    ) {
        decodes_greedily_within(model, cache, prompt, want, 1e-5, label)
    }

    /// [`decodes_greedily_like`] to `tolerance`, with the reference's greedy token at every
    /// step (logits come back from whichever device the head is on).
    fn decodes_greedily_within(
        model: &MappedDecoder,
        cache: &mut KvCache,
        prompt: &[u32],
        want: &[Tensor],
        tolerance: f32,
        label: &str,
    ) {
        let mut input = prompt.to_vec();
        for (step, expected) in want.iter().enumerate() {
            let t = Tensor::new(input.as_slice(), &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens");
            let logits = model
                .forward(&t, cache)
                .and_then(|l| l.squeeze(0))
                .and_then(|l| l.to_device(&Device::Cpu))
                .expect("forward");
            let diff = max_diff(&logits, expected);
            assert!(
                diff <= tolerance,
                "{label}, step {step}: logits differ by {diff}"
            );
            let next = argmax(&logits).expect("argmax");
            assert_eq!(
                next,
                argmax(expected).expect("argmax"),
                "{label}, step {step}"
            );
            input = vec![next];
        }
    }

    /// A tiny random Llama written to a temporary folder, its unit source, and
    /// candle-transformers' logits for 6 greedy steps from a fixed prompt.
    struct Referenced {
        _dir: tempfile::TempDir,
        config: DecoderSpec,
        source: WeightSource,
        prompt: [u32; 6],
        want: Vec<Tensor>,
    }

    fn referenced(tied: bool) -> Referenced {
        referenced_spec(TinyLlama {
            tie_word_embeddings: tied,
            ..TinyLlama::default()
        })
    }

    fn referenced_spec(spec: TinyLlama) -> Referenced {
        let dir = tempfile::tempdir().expect("tempdir");
        spec.write(dir.path()).expect("write");
        let prompt = [1u32, 5, 9, 14, 3, 7];
        let want = reference_steps(dir.path(), &prompt, 6);
        let config = DecoderSpec::from_config(&spec.config()).expect("config");
        let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
        Referenced {
            _dir: dir,
            config,
            source,
            prompt,
            want,
        }
    }

    /// The largest difference of `model`'s logits for the fixture's prompt from the
    /// reference's, relative to the reference's largest logit (compared in f32 on the CPU).
    fn first_step_relative_error(model: &MappedDecoder, fixture: &Referenced) -> f32 {
        let want = &fixture.want[0];
        let scale = want
            .abs()
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max");
        let t = Tensor::new(&fixture.prompt[..], &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        let got = model
            .forward(&t, &mut KvCache::default())
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_device(&Device::Cpu))
            .and_then(|l| l.to_dtype(DType::F32))
            .expect("forward");
        max_diff(&got, want) / scale
    }

    /// Every unit in RAM, or every unit streamed from disk.
    fn load_all(source: &WeightSource, config: &DecoderSpec, streamed: bool) -> MappedDecoder {
        MappedDecoder::load(source, config, DType::F32, |_| {
            Ok(if streamed {
                UnitPlacement::Streamed(Device::Cpu)
            } else {
                UnitPlacement::Resident(Device::Cpu)
            })
        })
        .expect("load")
    }

    /// Our logits for `prompt` under `config` (resident, f32) from the weights in `dir`.
    pub(crate) fn our_logits(
        dir: &std::path::Path,
        config: &DecoderSpec,
        prompt: &[u32],
    ) -> Tensor {
        let source = WeightSource::open(&dir.join("model.safetensors")).expect("source");
        let model = load_all(&source, config, false);
        let t = Tensor::new(prompt, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        model
            .forward(&t, &mut KvCache::default())
            .and_then(|l| l.squeeze(0))
            .expect("forward")
    }

    #[test]
    fn sequences_at_different_positions_decode_together_as_each_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinyLlama::default();
        spec.write(dir.path()).expect("write");
        let config = DecoderSpec::from_config(&spec.config()).expect("config");
        let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
        let prompts: [&[u32]; 3] = [&[1, 5, 9], &[1, 7, 3, 12, 30, 4, 8], &[2]];
        let tokens = |ids: &[u32]| {
            Tensor::new(ids, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens")
        };
        for streamed in [false, true] {
            let model = load_all(&source, &config, streamed);
            // Each alone: prefill, then 4 greedy steps.
            let mut alone = Vec::new();
            for prompt in prompts {
                let mut cache = KvCache::default();
                let mut logits = model.forward(&tokens(prompt), &mut cache).expect("prefill");
                let mut steps = Vec::new();
                for _ in 0..4 {
                    let next = argmax(&logits.squeeze(0).expect("row")).expect("argmax");
                    logits = model.forward(&tokens(&[next]), &mut cache).expect("step");
                    steps.push(logits.clone());
                }
                alone.push(steps);
            }
            // Together: the same prefills, then the 4 steps as one batch of 3 rows.
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::default()).collect();
            let mut last: Vec<Tensor> = prompts
                .iter()
                .zip(&mut caches)
                .map(|(p, c)| model.forward(&tokens(p), c).expect("prefill"))
                .collect();
            for step in 0..4 {
                let next: Vec<u32> = last
                    .iter()
                    .map(|l| argmax(&l.squeeze(0).expect("row")).expect("argmax"))
                    .collect();
                let input = Tensor::new(next.as_slice(), &Device::Cpu)
                    .and_then(|t| t.unsqueeze(1))
                    .expect("column");
                let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
                let logits = model.forward_sequences(&input, &mut refs).expect("batched");
                last = (0..3)
                    .map(|r| logits.narrow(0, r, 1).expect("row"))
                    .collect();
                for (r, (row, steps)) in last.iter().zip(&alone).enumerate() {
                    let diff = max_diff(row, &steps[step]);
                    assert!(
                        diff <= 1e-5,
                        "streamed={streamed} seq {r} step {step}: {diff}"
                    );
                }
            }
            assert_eq!(caches[1].position, 7 + 4);
        }
    }

    #[test]
    fn llama3_rope_scaling_decodes_like_candles_llama() {
        let dir = tempfile::tempdir().expect("tempdir");
        // head_dim 8: wavelengths 6.3, 63, 628 and 6283 positions fall in all three
        // bands of Llama 3's rescaling (kept below 16, blended to 64, divided above).
        let spec = TinyLlama {
            rope_scaling: Some(serde_json::json!({
                "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            })),
            ..TinyLlama::default()
        };
        spec.write(dir.path()).expect("write");
        let prompt = [1u32, 5, 9, 14, 3, 7, 11, 20, 30, 2, 8, 4];
        let want = reference_steps(dir.path(), &prompt, 1).remove(0);
        let config = DecoderSpec::from_config(&spec.config()).expect("config");
        let diff = max_diff(&our_logits(dir.path(), &config, &prompt), &want);
        assert!(diff <= 1e-5, "scaled RoPE: logits differ by {diff}");
        let mut unscaled = config.clone();
        unscaled.rope.scaling = None;
        let diff = max_diff(&our_logits(dir.path(), &unscaled, &prompt), &want);
        assert!(diff > 1e-4, "the scaling must matter here ({diff})");
    }

    #[test]
    fn linear_and_frequency_factor_scalings_divide_the_frequencies() {
        let spec = TinyLlama::default();
        let config = |scaling: serde_json::Value| {
            let mut json = spec.config();
            json["rope_scaling"] = scaling;
            DecoderSpec::from_config(&json)
        };
        let plain = DecoderSpec::from_config(&spec.config()).expect("config");
        let base = plain.rope.inverse_frequencies().expect("plain");
        let linear = config(serde_json::json!({"type": "linear", "factor": 2.0})).expect("linear");
        let halved: Vec<f32> = base.iter().map(|f| f / 2.0).collect();
        assert_eq!(linear.rope.inverse_frequencies().expect("linear"), halved);
        let half = base.len();
        let factors = config(serde_json::json!({"rope_type": "frequency_factors",
            "factors": (0..half).map(|i| (i + 1) as f32).collect::<Vec<_>>()}))
        .expect("factors");
        let divided: Vec<f32> = base.iter().zip(1..).map(|(f, i)| f / i as f32).collect();
        assert_eq!(
            factors.rope.inverse_frequencies().expect("factors"),
            divided
        );
        let short = config(serde_json::json!({"rope_type": "frequency_factors", "factors": [1.0]}));
        assert!(short.is_err(), "one factor per frequency");
        // Dynamic NTK: the plain frequencies within max_position_embeddings; at twice it
        // (factor 2) the base grows by (2·2 − 1)^(d / (d − 2)).
        let dynamic =
            config(serde_json::json!({"rope_type": "dynamic", "factor": 2.0})).expect("dynamic");
        let original = plain.max_position_embeddings;
        assert_eq!(dynamic.positions(), 2 * original);
        let within = dynamic
            .rope
            .frequencies_at_length(original)
            .expect("within");
        assert_eq!(within, base);
        let d = dynamic.rope.rotary_dim as f64;
        let grown = dynamic.rope.theta * 3f64.powf(d / (d - 2.0));
        let past = dynamic
            .rope
            .frequencies_at_length(2 * original)
            .expect("past");
        for (i, f) in past.iter().enumerate() {
            let want = grown.powf(-(2.0 * i as f64) / d) as f32;
            assert!(
                (f - want).abs() <= 1e-6 * want.max(1e-3),
                "{i}: {f} vs {want}"
            );
        }
        assert!(past[1] < base[1], "a grown base lowers the frequencies");
    }

    #[test]
    fn a_sharded_checkpoint_decodes_like_the_single_file_in_ram_and_streamed_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinyLlama::default();
        spec.write(dir.path()).expect("write");
        let prompt = [1u32, 5, 9, 14];
        let want = reference_steps(dir.path(), &prompt, 1).remove(0);
        crate::testing::shard_checkpoint(dir.path(), 3).expect("shard");
        assert!(!dir.path().join("model.safetensors").exists());
        let source = crate::weights::files::FolderFiles::new(dir.path())
            .model_weights()
            .expect("sharded source");
        assert_eq!(source.files().count(), 3);
        let config = DecoderSpec::from_config(&spec.config()).expect("config");
        let t = Tensor::new(prompt.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        for streamed in [false, true] {
            let model = load_all(&source, &config, streamed);
            let logits = model
                .forward(&t, &mut KvCache::default())
                .and_then(|l| l.squeeze(0))
                .expect("forward");
            let diff = max_diff(&logits, &want);
            assert!(diff <= 1e-5, "streamed={streamed}: logits differ by {diff}");
        }
    }

    #[test]
    fn streamed_f32_projections_multiply_in_place_and_match_resident_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinyLlama::default();
        spec.write(dir.path()).expect("write");
        let source =
            crate::WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
        assert_eq!(
            source
                .holding()
                .contains("streamed units excepted: read in place"),
            InPlaceLinear::AVAILABLE,
            "describe says so: {}",
            source.holding()
        );
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        let load = |name: &str, inp: usize, out: usize, resident: bool| {
            let vb = source.var_builder(DType::F32, &Device::Cpu).pp(name);
            Projection::load(inp, out, vb, &source, resident).expect("load")
        };
        for (name, inp, out) in [
            ("model.layers.0.self_attn.q_proj", h, h),
            ("model.layers.1.mlp.up_proj", h, i),
            ("model.layers.2.mlp.down_proj", i, h),
        ] {
            let streamed = load(name, inp, out, false);
            assert_eq!(
                matches!(streamed, Projection::InPlace { .. }),
                InPlaceLinear::AVAILABLE,
                "{name}: a streamed f32 weight is read in place exactly where the build can"
            );
            assert_eq!(
                streamed.reads_in_place(),
                InPlaceLinear::AVAILABLE,
                "{name}"
            );
            let resident = load(name, inp, out, true);
            assert!(!matches!(resident, Projection::InPlace { .. }), "{name}");
            assert!(
                !resident.reads_in_place(),
                "{name}: a resident copy is not in place"
            );
            for rows in [1, 5] {
                let x = Tensor::randn(0f32, 1., (1, rows, inp), &Device::Cpu).expect("x");
                let got = streamed.forward(&x).expect("streamed");
                let want = resident.forward(&x).expect("resident");
                assert_eq!(got.dims(), [1, rows, out]);
                let diff = max_diff(&got, &want);
                assert!(diff <= 1e-5, "{name}, {rows} rows: {diff}");
            }
        }
    }

    #[test]
    fn every_placement_decodes_like_candles_single_device_llama() {
        for tied in [true, false] {
            let Referenced {
                config,
                source,
                prompt,
                want,
                ..
            } = referenced(tied);
            let names = MappedDecoder::unit_names(&config);
            type OnDisk = fn(usize, usize) -> bool;
            let layouts: [(&str, OnDisk); 4] = [
                ("resident", |_, _| false),
                ("all on disk", |_, _| true),
                ("second half on disk", |i, n| i >= n / 2),
                ("alternating", |i, _| i % 2 == 1),
            ];
            for (label, on_disk) in layouts {
                let model = MappedDecoder::load(&source, &config, DType::F32, |name| {
                    let i = names.iter().position(|n| n == name).expect("known unit");
                    Ok(if on_disk(i, names.len()) {
                        UnitPlacement::Streamed(Device::Cpu)
                    } else {
                        UnitPlacement::Resident(Device::Cpu)
                    })
                })
                .expect("load");
                let mut cache = KvCache::default();
                decodes_greedily_like(
                    &model,
                    &mut cache,
                    &prompt,
                    &want,
                    &format!("tied={tied} {label}"),
                );
            }
        }
    }

    /// Every layout a plan can make with GPUs, decoded against candle's single-device Llama
    /// on the CPU. Needs the `cuda` feature and a GPU: ignored (named as such) in a CPU
    /// build, failing with the driver's reason in a CUDA build on a host without one.
    mod gpu_layouts {
        use super::*;

        const NEEDS_GPU: &str = "needs a CUDA build and a GPU (bench/gpu.sh runs these on one)";

        fn gpu(ordinal: usize) -> Device {
            crate::gpu::device(ordinal).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}"))
        }

        /// A second GPU: cuda:1 when the driver shows one, else cuda:0 on a second stream,
        /// a device of its own to candle, so activations still hop GPU to GPU.
        fn second_gpu() -> Device {
            if crate::gpu::probe().found().len() > 1 {
                gpu(1)
            } else {
                Device::new_cuda_with_stream(0).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}"))
            }
        }

        /// Where unit `i` of `n` goes.
        type Layout = Box<dyn Fn(usize, usize) -> UnitPlacement>;

        /// The layouts, by name.
        fn layouts() -> Vec<(&'static str, Layout)> {
            let (g0, g1) = (gpu(0), second_gpu());
            let cpu = || Device::Cpu;
            vec![
                ("all on one GPU", {
                    let g0 = g0.clone();
                    Box::new(move |_, _| UnitPlacement::Resident(g0.clone()))
                }),
                ("layers over two GPUs", {
                    let (g0, g1) = (g0.clone(), g1.clone());
                    Box::new(move |i, n| {
                        UnitPlacement::Resident(if i < n / 2 { g0.clone() } else { g1.clone() })
                    })
                }),
                ("GPU + CPU", {
                    let g0 = g0.clone();
                    Box::new(move |i, n| {
                        UnitPlacement::Resident(if i < n / 2 { g0.clone() } else { cpu() })
                    })
                }),
                ("GPU + CPU + disk streamed to the GPU", {
                    let g0 = g0.clone();
                    Box::new(move |i, n| match i * 3 / n {
                        0 => UnitPlacement::Resident(g0.clone()),
                        1 => UnitPlacement::Resident(cpu()),
                        _ => UnitPlacement::Streamed(g0.clone()),
                    })
                }),
                ("all on disk, streamed to the GPU", {
                    Box::new(move |_, _| UnitPlacement::Streamed(g0.clone()))
                }),
            ]
        }

        fn load(
            source: &WeightSource,
            config: &DecoderSpec,
            dtype: DType,
            place: &dyn Fn(usize, usize) -> UnitPlacement,
        ) -> MappedDecoder {
            let names = MappedDecoder::unit_names(config);
            MappedDecoder::load(source, config, dtype, |name| {
                let i = names.iter().position(|n| n == name).expect("known unit");
                Ok(place(i, names.len()))
            })
            .expect("load")
        }

        #[test]
        #[cfg_attr(not(feature = "cuda"), ignore = "needs a CUDA build and a GPU")]
        fn gpu_layouts_decode_greedily_like_candles_cpu_llama_in_f32() {
            for tied in [true, false] {
                let fixture = referenced(tied);
                for (label, place) in layouts() {
                    let model = load(&fixture.source, &fixture.config, DType::F32, &*place);
                    // cuBLAS sums in another order than the CPU's gemm.
                    decodes_greedily_within(
                        &model,
                        &mut KvCache::default(),
                        &fixture.prompt,
                        &fixture.want,
                        1e-4,
                        &format!("tied={tied} {label}"),
                    );
                }
            }
        }

        #[test]
        #[cfg_attr(not(feature = "cuda"), ignore = "needs a CUDA build and a GPU")]
        fn gpu_layouts_in_bf16_and_f16_stay_within_2e_2_of_the_f32_reference() {
            let fixture = referenced(false);
            for dtype in [DType::BF16, DType::F16] {
                for (label, place) in layouts() {
                    let model = load(&fixture.source, &fixture.config, dtype, &*place);
                    let relative = first_step_relative_error(&model, &fixture);
                    assert!(relative <= 2e-2, "{dtype:?} {label}: {relative}");
                }
            }
        }

        #[test]
        #[cfg_attr(not(feature = "cuda"), ignore = "needs a CUDA build and a GPU")]
        fn kv_caches_live_on_the_device_of_their_block() {
            let dir = tempfile::tempdir().expect("tempdir");
            let spec = TinyLlama::default();
            spec.write(dir.path()).expect("write");
            let config = DecoderSpec::from_config(&spec.config()).expect("config");
            let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
            let (label, place) = layouts().swap_remove(2);
            assert_eq!(label, "GPU + CPU");
            let model = load(&source, &config, DType::F32, &*place);
            let mut cache = KvCache::default();
            let t = Tensor::new(&[1u32, 2, 3][..], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens");
            model.forward(&t, &mut cache).expect("forward");
            let names = MappedDecoder::unit_names(&config);
            for (block, layer) in cache.layers.iter().enumerate() {
                let layer = layer.as_ref().expect("every block cached the prompt");
                let unit = names
                    .iter()
                    .position(|n| *n == format!("model.layers.{block}"))
                    .expect("block unit");
                let want = match place(unit, names.len()) {
                    UnitPlacement::Resident(d) | UnitPlacement::Streamed(d) => d,
                };
                assert!(layer.k.device().same_device(&want), "block {block} keys");
                assert!(layer.v.device().same_device(&want), "block {block} values");
            }
        }
    }

    #[test]
    fn the_kv_cache_grows_past_its_first_capacity_without_changing_the_answer() {
        // A 60-token prompt fills most of the first 64 slots; decoding then runs past
        // them (the cache doubles, up to the model's 128 positions and no further).
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = TinyLlama::default();
        spec.write(dir.path()).expect("write");
        let prompt: Vec<u32> = (0..60).map(|i| (i * 7 % 61) as u32 + 1).collect();
        let want = reference_steps(dir.path(), &prompt, 8);
        let config = DecoderSpec::from_config(&spec.config()).expect("config");
        let source = WeightSource::open(&dir.path().join("model.safetensors")).expect("source");
        let model = load_all(&source, &config, false);
        let mut cache = KvCache::default();
        decodes_greedily_like(&model, &mut cache, &prompt, &want, "growing cache");
        assert_eq!(cache.position, 60 + 7);
        let layer = cache.layers[0].as_ref().expect("filled");
        assert_eq!((layer.len, layer.capacity()), (67, 128));
        let more: Vec<u32> = (0..70).map(|i| (i % 50) as u32 + 3).collect();
        let t = Tensor::new(more.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        let err = model
            .forward(&t, &mut cache)
            .expect_err("past 128 positions");
        assert!(err.to_string().contains("positions"), "{err}");
    }
}
