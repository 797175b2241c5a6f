//! Convolutions and per-channel affine maps on f32 NCHW tensors, for the vision
//! networks: each convolution is one GEMM per image, `W [out, C·k·k] · cols [C·k·k,
//! OH·OW]`, written straight into the NCHW output with its bias and activation applied
//! in the same pass over it. A 1×1 stride-1 convolution multiplies the image itself (no
//! im2col copy); others lay out their patches once per image, one channel per task.
//! candle's CPU conv2d lays patches out the other way round and transposes its output:
//! on DenseNet-161, 1×1 and 3×3 convolutions took 196 and 360 ms of a 765 ms image on 2
//! cores (`examples/image_timing`), a batch norm on its own 222 ms as three tensor
//! passes. A depthwise convolution (MobileNet's, EfficientNet's: one filter per channel)
//! is its own kernel, one plane a task, each filter tap an axpy along output rows —
//! candle's grouped conv2d runs one small convolution per group. Other grouped
//! convolutions (ResNeXt) are left to candle.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::cpu::kernels;
use crate::cpu::linear::sgemm_ab;
use crate::cpu::simd::simd_kernel;
use crate::cpu::team;

/// An activation fused into a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
    /// `x · relu6(x + 3) / 6`: MobileNet v3's.
    Hardswish,
    /// `relu6(x + 3) / 6`: MobileNet v3's squeeze-and-excitation gate.
    Hardsigmoid,
    /// `x · sigmoid(x)`: EfficientNet's.
    Silu,
    Sigmoid,
    /// `x · Φ(x)` with the exact (erf) normal CDF: ConvNeXt's.
    Gelu,
}

impl Activation {
    #[inline]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
            // PyTorch's CPU kernels: `x * min(max(x + 3, 0), 6) / 6`.
            Activation::Hardswish => v * (v + 3.0).clamp(0.0, 6.0) / 6.0,
            Activation::Hardsigmoid => (v + 3.0).clamp(0.0, 6.0) / 6.0,
            Activation::Silu => v / (1.0 + kernels::exp(-v)),
            Activation::Sigmoid => 1.0 / (1.0 + kernels::exp(-v)),
            Activation::Gelu => 0.5 * v * (1.0 + kernels::erf(v * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    /// `v = act(v + bias)` over a slice: one loop per activation (the match hoisted out
    /// of it), so each vectorizes, erf and exp included.
    pub fn add_bias_and_apply(self, values: &mut [f32], bias: f32) {
        simd_kernel! {
            fn run(values: &mut [f32], bias: f32, act: Activation) {
                macro_rules! each {
                    (|$v:ident| $e:expr) => {
                        for slot in values.iter_mut() {
                            let $v = *slot + bias;
                            *slot = $e;
                        }
                    };
                }
                match act {
                    Activation::None => each!(|v| v),
                    Activation::Relu => each!(|v| v.max(0.0)),
                    Activation::Relu6 => each!(|v| v.clamp(0.0, 6.0)),
                    Activation::Hardswish => each!(|v| v * (v + 3.0).clamp(0.0, 6.0) / 6.0),
                    Activation::Hardsigmoid => each!(|v| (v + 3.0).clamp(0.0, 6.0) / 6.0),
                    Activation::Silu => each!(|v| v / (1.0 + kernels::exp(-v))),
                    Activation::Sigmoid => each!(|v| 1.0 / (1.0 + kernels::exp(-v))),
                    Activation::Gelu => each!(|v| {
                        0.5 * v * (1.0 + kernels::erf(v * std::f32::consts::FRAC_1_SQRT_2))
                    }),
                }
            }
        }
        run(values, bias, self)
    }
}

/// The f32 values of an op's input, which must be contiguous (`what` names the op).
fn contiguous_input<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} needs a contiguous input")))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// A convolution's output (height, width) for an input of `(h, w)`: PyTorch's rule.
fn output_size(
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
    (h, w): (usize, usize),
) -> (usize, usize) {
    let out = |size: usize, k: usize| (size + 2 * padding).saturating_sub(k) / stride + 1;
    (out(h, kh), out(w, kw))
}

/// A convolution's weight `[out, C·kh·kw]` (row-major), bias and geometry.
pub struct Conv {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    out: usize,
    channels: usize,
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
    act: Activation,
}

impl Conv {
    /// From a `[out, C, kh, kw]` f32 weight and a `[out]` bias, ungrouped.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
        act: Activation,
    ) -> Result<Self> {
        let (out, channels, kh, kw) = weight.dims4()?;
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1::<f32>()?,
            bias: bias
                .map(|b| b.flatten_all()?.to_vec1::<f32>())
                .transpose()?,
            out,
            channels,
            kernel: (kh, kw),
            stride: stride.max(1),
            padding,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        output_size(self.kernel, self.stride, self.padding, (h, w))
    }

    /// Whether its kernel is 1×1 (what a profile calls it).
    pub fn is_one_by_one(&self) -> bool {
        self.kernel == (1, 1)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == (1, 1) && self.stride == 1 && self.padding == 0
    }

    /// One image's patches, `[C·kh·kw, OH·OW]`, zero outside the image.
    fn im2col(&self, image: &[f32], (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
        let (kh, kw) = self.kernel;
        let per_channel = kh * kw * oh * ow;
        let mut cols = vec![0f32; self.channels * per_channel];
        let (stride, pad) = (self.stride as isize, self.padding as isize);
        team::for_each_chunk_mut(&mut cols, per_channel, |c, rows| {
            let plane = &image[c * h * w..][..h * w];
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &mut rows[(ky * kw + kx) * oh * ow..][..oh * ow];
                    for oy in 0..oh {
                        let y = oy as isize * stride + ky as isize - pad;
                        if y < 0 || y >= h as isize {
                            continue;
                        }
                        let line = &plane[y as usize * w..][..w];
                        let dst = &mut row[oy * ow..][..ow];
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let x = ox as isize * stride + kx as isize - pad;
                            if x >= 0 && x < w as isize {
                                *d = line[x as usize];
                            }
                        }
                    }
                }
            }
        });
        cols
    }

    /// Bias and activation over one image's `[out, OH·OW]` output, one channel a task.
    fn finish(&self, y: &mut [f32], pixels: usize) {
        let (bias, act) = (&self.bias, self.act);
        if bias.is_none() && act == Activation::None {
            return;
        }
        team::for_each_chunk_mut(y, pixels, |o, plane| {
            act.add_bias_and_apply(plane, bias.as_ref().map_or(0.0, |b| b[o]))
        });
    }
}

impl CustomOp1 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_input(storage, layout, "conv2d")?;
        let (batch, channels, h, w) = layout.shape().dims4()?;
        if channels != self.channels {
            candle_core::bail!(
                "conv2d: {channels} input channels for a weight of {}",
                self.channels
            );
        }
        let (oh, ow) = self.output_size(h, w);
        let (kh, kw) = self.kernel;
        let k = channels * kh * kw;
        let pixels = oh * ow;
        let mut y = vec![0f32; batch * self.out * pixels];
        for b in 0..batch {
            let image = &x[b * channels * h * w..][..channels * h * w];
            let out = &mut y[b * self.out * pixels..][..self.out * pixels];
            if self.is_pointwise() {
                sgemm_ab(&self.weight, image, out, self.out, pixels, k)?;
            } else {
                let cols = self.im2col(image, (h, w), (oh, ow));
                sgemm_ab(&self.weight, &cols, out, self.out, pixels, k)?;
            }
            self.finish(out, pixels);
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, self.out, oh, ow))))
    }
}

/// A depthwise convolution: `[channels, 1, kh, kw]` filters, each over its own input
/// channel, with its bias and activation.
pub struct DepthwiseConv {
    /// `[channels, kh·kw]`, row-major.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    channels: usize,
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
    act: Activation,
}

impl DepthwiseConv {
    /// From a `[channels, 1, kh, kw]` f32 weight and a `[channels]` bias.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
        act: Activation,
    ) -> Result<Self> {
        let (channels, per_group, kh, kw) = weight.dims4()?;
        if per_group != 1 {
            candle_core::bail!("a depthwise filter has one input channel, not {per_group}");
        }
        Ok(Self {
            weight: weight.flatten_all()?.to_vec1::<f32>()?,
            bias: bias
                .map(|b| b.flatten_all()?.to_vec1::<f32>())
                .transpose()?,
            channels,
            kernel: (kh, kw),
            stride: stride.max(1),
            padding,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// One output plane from its input plane, copied first into a zero-padded buffer
    /// (so no tap needs a bounds check): the bias, then each tap's weight times the
    /// padded row it reaches, added along the output row.
    fn plane(&self, channel: usize, input: &[f32], (h, w): (usize, usize), out: &mut [f32]) {
        thread_local! {
            static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (kh, kw) = self.kernel;
        let (s, p) = (self.stride, self.padding);
        let filter = &self.weight[channel * kh * kw..][..kh * kw];
        let (oh, ow) = self.output_size(h, w);
        let (ph, pw) = (h + 2 * p, w + 2 * p);
        PADDED.with_borrow_mut(|padded| {
            padded.clear();
            padded.resize(ph * pw, 0.0);
            for (y, line) in input.chunks_exact(w).enumerate() {
                padded[(y + p) * pw + p..][..w].copy_from_slice(line);
            }
            let geometry = Geometry {
                kernel: (kh, kw),
                stride: s,
                padded_width: pw,
                output: (oh, ow),
            };
            depthwise_taps(
                padded,
                filter,
                self.bias.as_ref().map_or(0.0, |b| b[channel]),
                geometry,
                out,
            );
        });
        if self.act != Activation::None {
            self.act.add_bias_and_apply(out, 0.0);
        }
    }

    fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        output_size(self.kernel, self.stride, self.padding, (h, w))
    }
}

impl CustomOp1 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "conv2d-depthwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_input(storage, layout, "a depthwise conv2d")?;
        let (batch, channels, h, w) = layout.shape().dims4()?;
        if channels != self.channels {
            candle_core::bail!(
                "depthwise conv2d: {channels} input channels for {} filters",
                self.channels
            );
        }
        let (oh, ow) = self.output_size(h, w);
        let mut y = vec![0f32; batch * channels * oh * ow];
        team::for_each_chunk_mut(&mut y, oh * ow, |i, out| {
            self.plane(i % channels, &x[i * h * w..][..h * w], (h, w), out)
        });
        Ok((CpuStorage::F32(y), Shape::from((batch, channels, oh, ow))))
    }
}

/// A layer norm over the channels at each position of an NCHW tensor (ConvNeXt's): each
/// pixel's mean and variance over its channels (two passes, f32), then
/// `(x - mean) / sqrt(var + eps) · weight[c] + bias[c]`. Statistics are gathered along
/// rows of pixels (contiguous in NCHW), then written one channel plane a task.
pub struct ChannelLayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

/// Pixels whose statistics one task gathers.
const NORM_PIXELS_PER_TASK: usize = 256;

impl ChannelLayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for ChannelLayerNorm {
    fn name(&self) -> &'static str {
        "channel-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_input(storage, layout, "a channel layer norm")?;
        let (_, channels, h, w) = layout.shape().dims4()?;
        if channels != self.weight.len() || channels != self.bias.len() {
            candle_core::bail!(
                "channel layer norm: {channels} channels for {} weights",
                self.weight.len()
            );
        }
        let plane = h * w;
        // (mean, 1 / sqrt(var + eps)) per pixel of every image, in pixel order.
        let mut stats = vec![(0f32, 0f32); x.len() / channels.max(1)];
        team::for_each_chunk_mut(&mut stats, NORM_PIXELS_PER_TASK, |task, mut out| {
            let mut first = task * NORM_PIXELS_PER_TASK;
            // A run of pixels inside one image: its channels are rows of `plane` floats.
            while !out.is_empty() {
                let (image, pixel) = (first / plane, first % plane);
                let run = out.len().min(plane - pixel);
                let (here, rest) = out.split_at_mut(run);
                let base = image * channels * plane + pixel;
                let row = |c: usize| &x[base + c * plane..][..run];
                for slot in here.iter_mut() {
                    slot.0 = 0.0;
                }
                for c in 0..channels {
                    for (slot, v) in here.iter_mut().zip(row(c)) {
                        slot.0 += v;
                    }
                }
                let n = channels as f32;
                for slot in here.iter_mut() {
                    slot.0 /= n;
                    slot.1 = 0.0;
                }
                for c in 0..channels {
                    for (slot, v) in here.iter_mut().zip(row(c)) {
                        let d = v - slot.0;
                        slot.1 += d * d;
                    }
                }
                for slot in here.iter_mut() {
                    slot.1 = 1.0 / (slot.1 / n + self.eps).sqrt();
                }
                out = rest;
                first += run;
            }
        });
        let mut y = vec![0f32; x.len()];
        team::for_each_chunk_mut(&mut y, plane, |i, out| {
            let (image, c) = (i / channels, i % channels);
            let (weight, bias) = (self.weight[c], self.bias[c]);
            let stats = &stats[image * plane..][..plane];
            for ((o, v), (mean, rstd)) in out.iter_mut().zip(&x[i * plane..][..plane]).zip(stats) {
                *o = (v - mean) * rstd * weight + bias;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

/// A depthwise plane's shape: its filter, stride, the padded input's width, the output.
#[derive(Clone, Copy)]
struct Geometry {
    kernel: (usize, usize),
    stride: usize,
    padded_width: usize,
    output: (usize, usize),
}

simd_kernel! {
    /// `out[oy, ox] = bias + Σ filter[ky, kx] · padded[oy·s + ky, ox·s + kx]`, along rows.
    fn depthwise_taps(padded: &[f32], filter: &[f32], bias: f32, g: Geometry, out: &mut [f32]) {
        let ((kh, kw), s, pw, (oh, ow)) = (g.kernel, g.stride, g.padded_width, g.output);
        for oy in 0..oh {
            let row = &mut out[oy * ow..][..ow];
            row.fill(bias);
            for ky in 0..kh {
                let line = &padded[(oy * s + ky) * pw..][..pw];
                for kx in 0..kw {
                    let weight = filter[ky * kw + kx];
                    if s == 1 {
                        for (o, v) in row.iter_mut().zip(&line[kx..kx + ow]) {
                            *o += weight * v;
                        }
                    } else {
                        for (ox, o) in row.iter_mut().enumerate() {
                            *o += weight * line[ox * s + kx];
                        }
                    }
                }
            }
        }
    }
}

/// `act(x · scale + shift)` per channel of an NCHW tensor, in one pass (a batch norm
/// that stands alone, folded to its scale and shift).
pub struct ChannelAffine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub act: Activation,
}

impl ChannelAffine {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_input(storage, layout, "a channel affine map")?;
        let (_, channels, h, w) = layout.shape().dims4()?;
        if channels != self.scale.len() {
            candle_core::bail!(
                "channel affine: {channels} channels for {} scales",
                self.scale.len()
            );
        }
        let plane = h * w;
        let mut y = vec![0f32; x.len()];
        team::for_each_chunk_mut(&mut y, plane, |i, out| {
            let c = i % channels;
            let (scale, shift) = (self.scale[c], self.shift[c]);
            for (o, v) in out.iter_mut().zip(&x[i * plane..][..plane]) {
                *o = self.act.apply(v * scale + shift);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(dims: &[usize], seed: usize) -> Tensor {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0) - 1.0)
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).expect("tensor")
    }

    /// Against candle's conv2d (then bias and ReLU) for 1×1, 3×3, 7×7, strides and padding.
    #[test]
    fn convolutions_match_candles() {
        for (c, o, k, stride, pad, hw) in [
            (5, 4, 1, 1, 0, 9),
            (5, 4, 1, 2, 0, 9),
            (3, 6, 3, 1, 1, 8),
            (3, 6, 3, 2, 1, 9),
            (3, 4, 7, 2, 3, 17),
            (4, 3, 11, 4, 2, 35),
            (2, 3, 5, 1, 2, 6),
        ] {
            let x = tensor(&[2, c, hw, hw + 1], 1);
            let w = tensor(&[o, c, k, k], 2);
            let b = tensor(&[o], 3);
            let want = x
                .conv2d(&w, pad, stride, 1, 1)
                .and_then(|y| y.broadcast_add(&b.reshape((1, o, 1, 1))?))
                .and_then(|y| y.relu())
                .expect("candle");
            let got = Conv::new(&w, Some(&b), stride, pad, Activation::Relu)
                .and_then(|conv| conv.forward(&x))
                .expect("ours");
            assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{pad}");
            let diff: f32 = (got - want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar())
                .expect("diff");
            assert!(diff < 1e-4, "k{k} s{stride} p{pad}: {diff}");
        }
    }

    /// Against candle's grouped conv2d (groups = channels), then bias and hardswish.
    #[test]
    fn depthwise_convolutions_match_candles() {
        for (c, k, stride, pad, (h, w)) in [
            (3, 3, 1, 1, (8, 9)),
            (4, 3, 2, 1, (9, 8)),
            (5, 5, 1, 2, (7, 11)),
            (2, 5, 2, 2, (12, 7)),
            (3, 3, 1, 0, (5, 5)),
            (2, 7, 1, 3, (4, 6)),
            (2, 3, 2, 1, (1, 1)),
        ] {
            let x = tensor(&[2, c, h, w], 1);
            let wt = tensor(&[c, 1, k, k], 2);
            let b = tensor(&[c], 3);
            let want = x
                .conv2d(&wt, pad, stride, 1, c)
                .and_then(|y| y.broadcast_add(&b.reshape((1, c, 1, 1))?))
                .expect("candle");
            let act = Activation::Hardswish;
            let want = want
                .flatten_all()
                .and_then(|y| y.to_vec1::<f32>())
                .expect("want")
                .into_iter()
                .map(|v| act.apply(v))
                .collect::<Vec<_>>();
            let got = DepthwiseConv::new(&wt, Some(&b), stride, pad, act)
                .and_then(|conv| conv.forward(&x))
                .expect("ours");
            let got = got
                .flatten_all()
                .and_then(|y| y.to_vec1::<f32>())
                .expect("got");
            assert_eq!(got.len(), want.len(), "k{k} s{stride} p{pad}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "k{k} s{stride} p{pad}: {g} vs {w}");
            }
        }
    }

    /// Against the same layer norm in candle's ops, over batches whose pixel runs
    /// straddle images and tasks.
    #[test]
    fn a_channel_layer_norm_matches_candles_ops() {
        for (batch, c, h, w) in [(1, 4, 3, 5), (3, 8, 17, 19), (2, 3, 1, 1)] {
            let x = (tensor(&[batch, c, h, w], 1) * 3.0)
                .and_then(|x| x + 0.5)
                .expect("x");
            let weight: Vec<f32> = (0..c).map(|i| 1.0 + i as f32 * 0.1).collect();
            let bias: Vec<f32> = (0..c).map(|i| i as f32 * -0.05).collect();
            let norm = ChannelLayerNorm {
                weight: weight.clone(),
                bias: bias.clone(),
                eps: 1e-6,
            };
            let got = norm.forward(&x).expect("ours");
            let shape =
                |v: Vec<f32>| Tensor::from_vec(v, (1, c, 1, 1), &Device::Cpu).expect("shape");
            let want = (|| -> Result<Tensor> {
                let centered = x.broadcast_sub(&x.mean_keepdim(1)?)?;
                let var = centered.sqr()?.mean_keepdim(1)?;
                centered
                    .broadcast_div(&(var + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&shape(weight))?
                    .broadcast_add(&shape(bias))
            })()
            .expect("candle");
            let diff: f32 = (got - want)
                .and_then(|d| d.abs()?.max_all()?.to_scalar())
                .expect("diff");
            assert!(diff < 1e-5, "{batch}x{c}x{h}x{w}: {diff}");
        }
    }

    #[test]
    fn a_channel_affine_is_scale_shift_and_activation() {
        let x = tensor(&[2, 3, 2, 2], 5);
        let affine = ChannelAffine {
            scale: vec![2.0, -1.0, 0.5],
            shift: vec![0.5, 0.0, -1.0],
            act: Activation::Relu6,
        };
        let got = affine.forward(&x).expect("affine");
        let scale = Tensor::new(&[2.0f32, -1.0, 0.5], &Device::Cpu)
            .and_then(|t| t.reshape((1, 3, 1, 1)))
            .expect("s");
        let shift = Tensor::new(&[0.5f32, 0.0, -1.0], &Device::Cpu)
            .and_then(|t| t.reshape((1, 3, 1, 1)))
            .expect("s");
        let want = x
            .broadcast_mul(&scale)
            .and_then(|y| y.broadcast_add(&shift))
            .and_then(|y| y.clamp(0f32, 6f32))
            .expect("want");
        let diff: f32 = (got - want)
            .and_then(|d| d.abs()?.max_all()?.to_scalar())
            .expect("diff");
        assert!(diff < 1e-6, "{diff}");
    }
}
