//! [`FusedBertBlock`]: one BERT encoder block for f32 on the CPU, computing what
//! candle-transformers' `BertLayer` computes with four matmuls and three fused passes
//! ([`crate::cpu::kernels`]) instead of some twenty tensor ops: the query, key and value
//! projections are one matmul over the packed `[3·hidden, hidden]` weight; attention
//! reads its heads out of that result directly (no transposes or copies); the bias adds,
//! GELU, residuals and LayerNorms are folded into in-place passes over matmul outputs.
//! Every matmul runs over `[batch·tokens, hidden]` as one 2-D product, so a batch of 32
//! short sentences is one large GEMM instead of 32 small ones.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

use crate::cpu::fused_ops::{self, NormParams};
use crate::cpu::kernels::AttentionShape;
use crate::cpu::linear::CpuLinear;

/// A weight `[out, in]` and its bias, applied as `x · Wᵀ (+ b in the fused pass after)`.
struct Dense {
    weight: CpuLinear,
    bias: Vec<f32>,
}

impl Dense {
    fn load(vb: &VarBuilder, out: usize, inp: usize) -> Result<Self> {
        Self::new(
            &vb.get((out, inp), "weight")?,
            vb.get(out, "bias")?.to_vec1()?,
        )
    }

    fn new(weight: &Tensor, bias: Vec<f32>) -> Result<Self> {
        Ok(Self {
            weight: CpuLinear::new(weight)?,
            bias,
        })
    }

    /// `x · Wᵀ` without the bias.
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.forward(x)
    }
}

/// One encoder block, fused for f32 on the CPU.
pub struct FusedBertBlock {
    qkv: Dense,
    attention_out: Dense,
    attention_norm: NormParams,
    intermediate: Dense,
    output: Dense,
    output_norm: NormParams,
    heads: usize,
}

impl FusedBertBlock {
    /// Whether blocks of this model on `device` in `dtype` can run fused.
    pub fn applies(config: &Config, device: &Device, dtype: DType) -> bool {
        device.is_cpu()
            && dtype == DType::F32
            && config.hidden_act == HiddenAct::Gelu
            && config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
    }

    /// Loads block weights from `vb` (rooted at `…encoder.layer.{i}`).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let attention = vb.pp("attention");
        let projections = attention.pp("self");
        let (mut weights, mut bias) = (Vec::new(), Vec::new());
        for part in ["query", "key", "value"] {
            weights.push(projections.pp(part).get((h, h), "weight")?);
            bias.extend(projections.pp(part).get(h, "bias")?.to_vec1::<f32>()?);
        }
        let qkv = Dense::new(&Tensor::cat(&weights, 0)?, bias)?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            qkv,
            attention_out: Dense::load(&attention.pp("output").pp("dense"), h, h)?,
            attention_norm: NormParams::load(&attention.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: Dense::load(&vb.pp("intermediate").pp("dense"), i, h)?,
            output: Dense::load(&vb.pp("output").pp("dense"), h, i)?,
            output_norm: NormParams::load(&vb.pp("output").pp("LayerNorm"), h, eps)?,
            heads: config.num_attention_heads,
        })
    }

    /// `hidden` `[batch, tokens, hidden]` → the block's output, same shape. `keep` is the
    /// attention mask flattened (`batch · tokens`, true where a token may be attended to).
    pub fn forward(&self, hidden: &Tensor, keep: &[bool]) -> Result<Tensor> {
        let (batch, tokens, size) = hidden.dims3()?;
        if keep.len() != batch * tokens {
            candle_core::bail!("mask has {} entries for {batch}×{tokens}", keep.len());
        }
        let x = hidden.reshape((batch * tokens, size))?.contiguous()?;
        let qkv = self.qkv.matmul(&x)?;
        let shape = AttentionShape {
            batch,
            tokens,
            heads: self.heads,
            head_dim: size / self.heads,
        };
        let context = fused_ops::self_attention(&qkv, &self.qkv.bias, keep, shape)?;
        let attended = self.attention_out.matmul(&context)?;
        fused_ops::add_norm_in_place(
            &attended,
            &x,
            &self.attention_out.bias,
            &self.attention_norm,
        )?;
        let intermediate = self.intermediate.matmul(&attended)?;
        fused_ops::bias_gelu_in_place(&intermediate, &self.intermediate.bias)?;
        let out = self.output.matmul(&intermediate)?;
        fused_ops::add_norm_in_place(&out, &attended, &self.output.bias, &self.output_norm)?;
        out.reshape((batch, tokens, size))
    }
}
