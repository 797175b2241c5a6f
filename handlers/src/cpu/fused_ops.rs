//! candle operations over [`crate::cpu::kernels`]: each takes and returns tensors, checks
//! shapes, and runs the kernel on the tensors' f32 CPU storage (in place where the result
//! has its input's shape, so no new buffer is allocated). Callers use them only where
//! the tensors are f32 on the CPU; anywhere else they fail rather than guess.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp1, InplaceOp2, Layout, Result, Shape,
    Storage, Tensor,
};
use candle_nn::VarBuilder;

use crate::cpu::kernels::{self, AttentionShape, CachedKeys, CausalShape, Norm, RopeShape};

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

/// RMSNorm of `x`'s rows (its last dimension) scaled by `weight`, on the team (see
/// [`kernels::rms_norm`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNormRows { eps })
}

/// `x` `[batch, tokens, heads, head_dim]` rotated by RoPE (`cos`/`sin` `[tokens, half]` or
/// `[batch, tokens, half]`, half = head_dim / 2) → `[batch, heads, tokens, head_dim]`,
/// contiguous (see [`kernels::rope_heads_first`]; equal to candle-nn's `rope` of the
/// transposed `x`, but the tables must have exactly `tokens` rows).
pub fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &RopeHeadsFirst)
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
        _ => candle_core::bail!("fused kernels need f32"),
    }
}

fn contiguous(layout: &Layout) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernels need contiguous input".into()))
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

struct RmsNormRows {
    eps: f32,
}

impl CustomOp2 for RmsNormRows {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (elements(s1, l1)?, elements(s2, l2)?);
        if weight.is_empty() || l1.shape().dims().last() != Some(&weight.len()) {
            candle_core::bail!("rms norm of {:?} by {} weights", l1.shape(), weight.len());
        }
        let mut out = vec![0.0f32; x.len()];
        kernels::rms_norm(x, weight, self.eps, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct RopeHeadsFirst;

impl CustomOp3 for RopeHeadsFirst {
    fn name(&self) -> &'static str {
        "fused-rope-heads-first"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (elements(s1, l1)?, elements(s2, l2)?, elements(s3, l3)?);
        let (batch, tokens, heads, head_dim) = l1.shape().dims4()?;
        let half = head_dim / 2;
        let angles = |l: &Layout| match l.shape().dims() {
            [t, h] => *t == tokens && *h == half,
            [b, t, h] => *b == batch && *t == tokens && *h == half,
            _ => false,
        };
        if !head_dim.is_multiple_of(2) || !angles(l2) || l2.shape() != l3.shape() {
            candle_core::bail!(
                "rope of {:?} by angles {:?} / {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let mut out = vec![0.0f32; x.len()];
        let shape = RopeShape {
            heads,
            tokens,
            head_dim,
        };
        kernels::rope_heads_first(x, cos, sin, shape, &mut out);
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, heads, tokens, head_dim)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A deterministic `[dims]` tensor of values in about [-2, 2].
    fn values(dims: &[usize], seed: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919 % 4001) as f32 - 2000.0) / 1000.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("a tensor")
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32 values")
    }

    #[test]
    fn rms_norm_matches_candle_nns() {
        // 400 rows of 96 span several team tasks; 40 columns leave a lane remainder.
        for dims in [vec![400, 96], vec![3, 5, 40], vec![1, 576]] {
            let x = values(&dims, 3);
            let weight = values(&dims[dims.len() - 1..], 11);
            let ours = flat(&rms_norm(&x, &weight, 1e-5).expect("rms norm"));
            let theirs = flat(&candle_nn::ops::rms_norm(&x, &weight, 1e-5).expect("candle's"));
            assert_eq!(ours.len(), theirs.len());
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{dims:?}: relative difference {worst}");
        }
        let x = values(&[2, 8], 0);
        assert!(rms_norm(&x, &values(&[7], 0), 1e-5).is_err());
    }

    #[test]
    fn rope_heads_first_is_candle_nns_rope_of_the_transpose() {
        let (batch, tokens, heads, head_dim) = (2, 7, 3, 8);
        let x = values(&[batch, tokens, heads, head_dim], 5);
        let transposed = x
            .transpose(1, 2)
            .and_then(|t| t.contiguous())
            .expect("transposed");
        // One table for every row, and a table per row (rows at their own positions).
        for angles in [
            vec![tokens, head_dim / 2],
            vec![batch, tokens, head_dim / 2],
        ] {
            let (cos, sin) = (values(&angles, 1).cos(), values(&angles, 2).sin());
            let (cos, sin) = (cos.expect("cos"), sin.expect("sin"));
            let ours = rope_heads_first(&x, &cos, &sin).expect("rope");
            assert_eq!(ours.dims(), &[batch, heads, tokens, head_dim]);
            let theirs = candle_nn::rotary_emb::rope(&transposed, &cos, &sin).expect("candle's");
            assert_eq!(flat(&ours), flat(&theirs), "angles {angles:?}");
        }
        let (cos, sin) = (values(&[tokens + 1, 4], 1), values(&[tokens + 1, 4], 2));
        assert!(rope_heads_first(&x, &cos, &sin).is_err());
    }
}
