//! ModernBERT's block, and what a forward pass shares between its blocks: pre-norm
//! attention with RoPE (global layers at one base, local ones at another and within a
//! bidirectional window) and a GeGLU MLP, each added to the residual stream. Written with
//! candle's ops, for every dtype and device; held to transformers' ModernBERT by the
//! encoder fixtures.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use candle_transformers::models::bert::HiddenAct;

use super::spec::{EncoderSpec, ModernSpec};

/// One layer's LayerNorm, with a bias where the config says so.
pub fn norm(vb: VarBuilder, spec: &EncoderSpec, modern: &ModernSpec) -> Result<LayerNorm> {
    if modern.norm_bias {
        candle_nn::layer_norm(spec.hidden_size, spec.layer_norm_eps, vb)
    } else {
        candle_nn::layer_norm_no_bias(spec.hidden_size, spec.layer_norm_eps, vb)
    }
}

pub fn activate(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    match act {
        HiddenAct::Gelu => x.gelu_erf(),
        HiddenAct::GeluApproximate => x.gelu(),
        HiddenAct::Relu => x.relu(),
    }
}

/// A pass's RoPE tables and additive masks, for global and local layers.
#[derive(Debug, Clone)]
pub struct ModernPass {
    pub global_cos: Tensor,
    pub global_sin: Tensor,
    pub local_cos: Tensor,
    pub local_sin: Tensor,
    /// `[batch, 1, tokens, tokens]`: 0 where a query may attend to a key, f32's most
    /// negative value where the key is padding (and, in `local`, farther than the
    /// window) — finite, as transformers', so a padding query with no key in reach
    /// averages them all instead of making NaN that would reach other tokens.
    pub global_mask: Tensor,
    pub local_mask: Tensor,
}

impl ModernPass {
    /// The tables and masks of a batch with attention `mask` rows (1 = token).
    pub fn new(
        spec: &EncoderSpec,
        modern: &ModernSpec,
        mask: &[Vec<u32>],
        device: &Device,
    ) -> Result<Self> {
        let tokens = mask.first().map_or(0, Vec::len);
        let head_dim = spec.hidden_size / spec.num_attention_heads;
        let tables = |theta: f64| -> Result<(Tensor, Tensor)> {
            let half = head_dim / 2;
            let mut angles = Vec::with_capacity(tokens * half);
            for position in 0..tokens {
                for i in 0..half {
                    // transformers: 1 / base^(2i / dim) in f32, times the position in f32.
                    let inverse = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                    angles.push(position as f32 * inverse);
                }
            }
            let angles = Tensor::from_vec(angles, (tokens, half), device)?;
            Ok((angles.cos()?, angles.sin()?))
        };
        let (global_cos, global_sin) = tables(modern.global_theta)?;
        let (local_cos, local_sin) = tables(modern.local_theta)?;
        let masks = |window: Option<usize>| -> Result<Tensor> {
            let mut values = Vec::with_capacity(mask.len() * tokens * tokens);
            for row in mask {
                for q in 0..tokens {
                    for (k, &keep) in row.iter().enumerate() {
                        let near = window.is_none_or(|w| q.abs_diff(k) <= w);
                        values.push(if keep != 0 && near { 0f32 } else { f32::MIN });
                    }
                }
            }
            Tensor::from_vec(values, (mask.len(), 1, tokens, tokens), device)
        };
        Ok(Self {
            global_cos,
            global_sin,
            local_cos,
            local_sin,
            global_mask: masks(None)?,
            local_mask: masks(Some(modern.half_window))?,
        })
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            global_cos: self.global_cos.to_device(device)?,
            global_sin: self.global_sin.to_device(device)?,
            local_cos: self.local_cos.to_device(device)?,
            local_sin: self.local_sin.to_device(device)?,
            global_mask: self.global_mask.to_device(device)?,
            local_mask: self.local_mask.to_device(device)?,
        })
    }
}

/// One ModernBERT block.
pub struct ModernBertBlock {
    /// None in the first block (transformers' `nn.Identity`).
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    wo: Linear,
    mlp_norm: LayerNorm,
    wi: Linear,
    mlp_out: Linear,
    activation: HiddenAct,
    heads: usize,
    local: bool,
}

impl ModernBertBlock {
    /// Loads block `index` from `vb` (rooted at the block).
    pub fn load(vb: VarBuilder, spec: &EncoderSpec, index: usize) -> Result<Self> {
        let modern = spec
            .modern
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("not a ModernBERT".into()))?;
        let (h, i) = (spec.hidden_size, spec.intermediate_size);
        let linear = |inp, out, bias, name: &str| candle_nn::linear_b(inp, out, bias, vb.pp(name));
        Ok(Self {
            attn_norm: (index > 0)
                .then(|| norm(vb.pp("attn_norm"), spec, modern))
                .transpose()?,
            wqkv: linear(h, 3 * h, modern.attention_bias, "attn.Wqkv")?,
            wo: linear(h, h, modern.attention_bias, "attn.Wo")?,
            mlp_norm: norm(vb.pp("mlp_norm"), spec, modern)?,
            wi: linear(h, 2 * i, modern.mlp_bias, "mlp.Wi")?,
            mlp_out: linear(i, h, modern.mlp_bias, "mlp.Wo")?,
            activation: spec.activation,
            heads: spec.num_attention_heads,
            local: modern.local.get(index).copied().unwrap_or(false),
        })
    }

    /// `hidden` `[batch, tokens, hidden]` → the block's output, same shape.
    pub fn forward(&self, hidden: &Tensor, pass: &ModernPass) -> Result<Tensor> {
        let (batch, tokens, size) = hidden.dims3()?;
        let head_dim = size / self.heads;
        let normed = match &self.attn_norm {
            Some(norm) => norm.forward(hidden)?,
            None => hidden.clone(),
        };
        let qkv = self
            .wqkv
            .forward(&normed)?
            .reshape((batch, tokens, 3, self.heads, head_dim))?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin, mask) = match self.local {
            true => (&pass.local_cos, &pass.local_sin, &pass.local_mask),
            false => (&pass.global_cos, &pass.global_sin, &pass.global_mask),
        };
        let dtype = hidden.dtype();
        // transformers rotates in f32 and casts back.
        let rotate = |x: Tensor| -> Result<Tensor> {
            candle_nn::rotary_emb::rope(&x.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
        };
        let (q, k, v) = (rotate(part(0)?)?, rotate(part(1)?)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let attended = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, tokens, size))?;
        let hidden = (hidden + self.wo.forward(&attended)?)?;
        let gated = self.wi.forward(&self.mlp_norm.forward(&hidden)?)?;
        let width = gated.dim(D::Minus1)? / 2;
        let input = activate(&gated.narrow(D::Minus1, 0, width)?, self.activation)?;
        let gate = gated.narrow(D::Minus1, width, width)?;
        hidden + self.mlp_out.forward(&(input * gate)?)?
    }
}
