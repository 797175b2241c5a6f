//! candle operations over [`crate::cpu::kernels`]: each takes and returns tensors, checks
//! shapes, and runs the kernel on the tensors' f32 CPU storage (in place where the result
//! has its input's shape, so no new buffer is allocated). Callers use them only where
//! the tensors are f32 on the CPU; anywhere else they fail rather than guess.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, InplaceOp1, InplaceOp2, Layout, Result, Shape, Storage,
    Tensor,
};
use candle_nn::VarBuilder;

use crate::cpu::kernels::{self, AttentionShape, CachedKeys, CausalShape, Norm};

/// LayerNorm parameters over the last dimension.
pub struct NormParams {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl NormParams {
    pub fn load(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        // Older checkpoints name LayerNorm parameters gamma/beta.
        let pick = |names: [&str; 2]| -> Result<Vec<f32>> {
            let name = names
                .into_iter()
                .find(|n| vb.contains_tensor(n))
                .unwrap_or(names[0]);
            vb.get(size, name)?.to_vec1()
        };
        Ok(Self {
            gamma: pick(["weight", "gamma"])?,
            beta: pick(["bias", "beta"])?,
            eps: eps as f32,
        })
    }
}

/// BERT self-attention from the packed QKV projection (see
/// [`kernels::self_attention`]) → `[batch · tokens, hidden]`.
pub fn self_attention(
    qkv: &Tensor,
    bias: &[f32],
    keep: &[bool],
    shape: AttentionShape,
) -> Result<Tensor> {
    qkv.apply_op1_no_bwd(&SelfAttention { bias, keep, shape })
}

/// SwiGLU's gate in place: `gate = silu(gate) · up` (same shapes).
pub fn silu_mul_in_place(gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() {
        candle_core::bail!("silu·up over {:?} and {:?}", gate.dims(), up.dims());
    }
    gate.inplace_op2(up, &SiluMul)
}

/// `x = gelu(x + bias)` over rows of `x`.
pub fn bias_gelu_in_place(x: &Tensor, bias: &[f32]) -> Result<()> {
    x.inplace_op1(&BiasGelu { bias })
}

/// `x = LayerNorm(x + bias + residual)` over rows of `x`.
pub fn add_norm_in_place(
    x: &Tensor,
    residual: &Tensor,
    bias: &[f32],
    norm: &NormParams,
) -> Result<()> {
    x.inplace_op2(residual, &AddNorm { bias, norm })
}

/// One sequence's cache for [`causal_attention`]: `k`/`v` `[1, kv_heads, capacity,
/// head_dim]`, f32 on the CPU, with the first `keys` positions filled.
pub struct CachedKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub keys: usize,
    /// The first key attended to: a sliding window's start for one query (0: all).
    pub first: usize,
}

/// Causal grouped-query attention of `q` `[caches.len(), heads, queries, head_dim]`, row
/// b over `caches[b]` (see [`kernels::causal_attention`]) →
/// `[caches.len(), heads, queries, head_dim]`. One parallel loop over every row's heads,
/// read straight out of the caches (no copy, no `[b, …]` stacking of different lengths).
pub fn causal_attention(q: &Tensor, caches: &[CachedKv<'_>]) -> Result<Tensor> {
    let (batch, heads, queries, head_dim) = q.dims4()?;
    let mismatch = || {
        candle_core::Error::Msg(format!(
            "causal attention of q {:?} over {} caches",
            q.dims(),
            caches.len()
        ))
    };
    let kv_heads = caches.first().ok_or_else(mismatch)?.k.dim(1)?;
    if caches.len() != batch || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(mismatch());
    }
    for cache in caches {
        let (one, h, capacity, d) = cache.k.dims4()?;
        if (one, h, d) != (1, kv_heads, head_dim)
            || cache.v.dims() != cache.k.dims()
            || cache.keys > capacity
            || cache.keys < cache.first + queries
        {
            return Err(mismatch());
        }
    }
    let q = q.contiguous()?;
    let guards: Vec<_> = caches
        .iter()
        .map(|c| (c.k.storage_and_layout(), c.v.storage_and_layout()))
        .collect();
    let rows = guards
        .iter()
        .zip(caches)
        .map(|(((k, kl), (v, vl)), cache)| {
            Ok(CachedKeys {
                k: cpu_elements(k, kl)?,
                v: cpu_elements(v, vl)?,
                keys: cache.keys,
                first: cache.first,
                stride: cache.k.dim(2)? * head_dim,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (storage, layout) = q.storage_and_layout();
    let queries_in = cpu_elements(&storage, layout)?;
    let mut out = vec![0.0f32; queries_in.len()];
    let shape = CausalShape {
        heads,
        kv_heads,
        queries,
        head_dim,
    };
    kernels::causal_attention(queries_in, &rows, shape, &mut out);
    Tensor::from_vec(out, (batch, heads, queries, head_dim), q.device())
}

/// The contiguous f32 elements of a tensor's CPU storage.
fn cpu_elements<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => elements(cpu, layout),
        _ => candle_core::bail!("fused kernels run on the CPU"),
    }
}

/// `x · wᵀ` for `x` `[rows, k]` with few rows and a large `w` `[n, k]` → `[rows, n]`
/// (see [`kernels::few_rows_times_weight`]).
pub fn few_rows_times_weight(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("{rows}×{k} rows against a {n}×{wk} weight");
    }
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &FewRowsTimesWeight)
}

/// The contiguous f32 elements of a CPU tensor.
fn elements<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = contiguous(layout)?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

fn elements_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) = contiguous(layout)?;
    match storage {
        CpuStorage::F32(values) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("fused BERT kernels need f32"),
    }
}

fn contiguous(layout: &Layout) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused BERT kernels need contiguous input".into()))
}

struct SelfAttention<'a> {
    bias: &'a [f32],
    keep: &'a [bool],
    shape: AttentionShape,
}

impl CustomOp1 for SelfAttention<'_> {
    fn name(&self) -> &'static str {
        "fused-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = elements(storage, layout)?;
        let AttentionShape {
            batch,
            tokens,
            heads,
            head_dim,
        } = self.shape;
        let hidden = heads * head_dim;
        if qkv.len() != batch * tokens * 3 * hidden || self.bias.len() != 3 * hidden {
            candle_core::bail!(
                "packed QKV of {} elements does not match {:?}",
                qkv.len(),
                self.shape
            );
        }
        let mut out = vec![0.0f32; batch * tokens * hidden];
        kernels::self_attention(qkv, self.bias, self.keep, self.shape, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((batch * tokens, hidden))))
    }
}

struct BiasGelu<'a> {
    bias: &'a [f32],
}

impl InplaceOp1 for BiasGelu<'_> {
    fn name(&self) -> &'static str {
        "fused-bias-gelu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let x = elements_mut(storage, layout)?;
        if x.len() % self.bias.len() != 0 {
            candle_core::bail!("{} elements are not rows of {}", x.len(), self.bias.len());
        }
        kernels::bias_gelu(x, self.bias);
        Ok(())
    }
}

struct AddNorm<'a> {
    bias: &'a [f32],
    norm: &'a NormParams,
}

impl InplaceOp2 for AddNorm<'_> {
    fn name(&self) -> &'static str {
        "fused-add-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let residual = elements(s2, l2)?;
        let x = elements_mut(s1, l1)?;
        if x.len() != residual.len() || x.len() % self.bias.len() != 0 {
            candle_core::bail!("add & norm over mismatched shapes");
        }
        let norm = Norm {
            gamma: &self.norm.gamma,
            beta: &self.norm.beta,
            eps: self.norm.eps,
        };
        kernels::bias_residual_layer_norm(x, self.bias, residual, &norm);
        Ok(())
    }
}

struct FewRowsTimesWeight;

impl CustomOp2 for FewRowsTimesWeight {
    fn name(&self) -> &'static str {
        "fused-few-rows-times-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (elements(s1, l1)?, elements(s2, l2)?);
        let (rows, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let mut by_weight_row = vec![0.0f32; n * rows];
        kernels::few_rows_times_weight(x, w, k, &mut by_weight_row);
        let mut out = vec![0.0f32; rows * n];
        for (v, values) in by_weight_row.chunks_exact(rows).enumerate() {
            for (r, value) in values.iter().enumerate() {
                out[r * n + v] = *value;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }
}

struct SiluMul;

impl InplaceOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let up = elements(s2, l2)?;
        let gate = elements_mut(s1, l1)?;
        if gate.len() != up.len() {
            candle_core::bail!("silu·up over {} and {} elements", gate.len(), up.len());
        }
        kernels::silu_mul(gate, up);
        Ok(())
    }
}
