//! A vision network as data: a list of [`Op`]s naming the checkpoint tensors each reads
//! (convolutions with their batch norms, pools, residual sums, dense concatenations,
//! branches), which a recognizer such as [`super::torchvision`] writes from a state
//! dict's names and shapes, and one executor, [`Network`], that loads and runs any such
//! list. Batch norms that follow a convolution are folded into its weights at load (as
//! inference engines do); a batch norm that stands alone (DenseNet's pre-activation)
//! becomes one per-channel scale and shift.

use std::collections::HashMap;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::Linear;

use crate::HandlerError;
use crate::error::CandleContext;

/// An activation after an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    /// min(max(x, 0), 6): MobileNet's.
    Relu6,
    /// `x · relu6(x + 3) / 6`: MobileNet v3's.
    Hardswish,
    /// `relu6(x + 3) / 6`: MobileNet v3's squeeze-and-excitation gate.
    Hardsigmoid,
    /// `x · sigmoid(x)`: EfficientNet's.
    Silu,
    Sigmoid,
    /// `x · Φ(x)`, the exact (erf) GELU: ConvNeXt's.
    Gelu,
}

/// One step of a network, with the names of the tensors it reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A 2-D convolution (`<conv>.weight`, `<conv>.bias` if present), then the batch
    /// norm `norm` if any (`.weight`, `.bias`, `.running_mean`, `.running_var`), then `act`.
    Conv {
        conv: String,
        norm: Option<String>,
        stride: usize,
        padding: usize,
        groups: usize,
        act: Act,
    },
    /// A batch norm on its own, then `act`.
    Norm {
        norm: String,
        act: Act,
    },
    /// A layer norm over the channels at each position (`<norm>.weight`, `<norm>.bias`):
    /// ConvNeXt's, channels-first or -last alike.
    ChannelNorm {
        norm: String,
        eps: f64,
    },
    /// A fully connected layer applied at each position (`<linear>.weight` `[out, in]`,
    /// `<linear>.bias`): a 1×1 convolution. Its output is multiplied by the per-channel
    /// `scale` tensor if given (ConvNeXt's layer scale, folded into the weights), then `act`.
    Pointwise {
        linear: String,
        scale: Option<String>,
        act: Act,
    },
    /// Max pooling, zero-padded (it follows a ReLU in every network that pads: the
    /// inputs are never negative), with PyTorch's `ceil_mode`.
    MaxPool {
        kernel: usize,
        stride: usize,
        padding: usize,
        ceil: bool,
    },
    AvgPool {
        kernel: usize,
        stride: usize,
    },
    /// PyTorch's `AdaptiveAvgPool2d((height, width))`.
    AdaptiveAvgPool {
        height: usize,
        width: usize,
    },
    /// `[batch, c, h, w]` → `[batch, c·h·w]`.
    Flatten,
    /// A fully connected layer (`<name>.weight`, `<name>.bias`), then `act`.
    Linear {
        name: String,
        act: Act,
    },
    /// `act(body(x) + shortcut(x))`; an empty shortcut is the identity.
    Residual {
        body: Vec<Op>,
        shortcut: Vec<Op>,
        act: Act,
    },
    /// `cat([x, body(x)], channels)`: a DenseNet layer.
    DenseConcat {
        body: Vec<Op>,
    },
    /// `cat([branch(x) for branch], channels)`: SqueezeNet's Fire expands.
    Branches(Vec<Vec<Op>>),
    /// `x · body(x)`, `body` giving one value per image and channel (`[batch, c, 1, 1]`):
    /// squeeze-and-excitation (MobileNet v3, EfficientNet).
    ChannelGate {
        body: Vec<Op>,
    },
}

impl Op {
    /// The convolution `conv` with its batch norm `norm`.
    pub fn conv(conv: &str, norm: Option<&str>, stride: usize, padding: usize, act: Act) -> Op {
        Op::Conv {
            conv: conv.into(),
            norm: norm.map(str::to_string),
            stride,
            padding,
            groups: 1,
            act,
        }
    }
}

/// A recognized network: what it is and its ops.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// torchvision's name for it: "densenet161", "resnet50", "vgg16_bn".
    pub architecture: String,
    pub ops: Vec<Op>,
    /// Output classes (the last layer's rows).
    pub classes: usize,
    /// Every batch norm's eps: PyTorch's default 1e-5, or 1e-3 where the family's
    /// definition sets it (MobileNet v3, EfficientNet).
    pub batch_norm_eps: f64,
}

impl Graph {
    /// Ops in all, nested ones included.
    pub fn count_ops(&self) -> usize {
        fn count(ops: &[Op]) -> usize {
            ops.iter()
                .map(|op| {
                    1 + match op {
                        Op::Residual { body, shortcut, .. } => count(body) + count(shortcut),
                        Op::DenseConcat { body } | Op::ChannelGate { body } => count(body),
                        Op::Branches(branches) => branches.iter().map(|b| count(b)).sum(),
                        _ => 0,
                    }
                })
                .sum()
        }
        count(&self.ops)
    }
}

/// Where a checkpoint's tensors are, by the names the graph uses (the stored names may
/// differ: DenseNet's legacy `norm.1`, a `module.` prefix).
pub trait TensorSource {
    fn tensor(&self, name: &str) -> Result<Tensor, HandlerError>;
    fn has(&self, name: &str) -> bool;
}

/// PyTorch's `BatchNorm2d` eps, which most torchvision networks keep.
pub const BATCH_NORM_EPS: f64 = 1e-5;

/// Where an op's tensors come from and go.
struct Loading<'a> {
    source: &'a dyn TensorSource,
    device: &'a Device,
    batch_norm_eps: f64,
}

/// An op with its tensors loaded.
enum Loaded {
    /// Ungrouped on the CPU: one GEMM per image ([`crate::cpu::conv`]).
    CpuConv(crate::cpu::conv::Conv),
    /// Depthwise (one filter per channel) on the CPU.
    CpuDepthwise(crate::cpu::conv::DepthwiseConv),
    /// A batch norm alone on the CPU, in one pass.
    CpuAffine(crate::cpu::conv::ChannelAffine),
    Conv {
        weight: Tensor,
        /// `[1, out, 1, 1]`.
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        groups: usize,
        act: Act,
    },
    Affine {
        scale: Tensor,
        shift: Tensor,
        act: Act,
    },
    /// A layer norm over channels on the CPU, in two passes.
    CpuChannelNorm(crate::cpu::conv::ChannelLayerNorm),
    /// `[1, c, 1, 1]` each.
    ChannelNorm {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    /// An op without tensors (pools, flatten), as written.
    Plain(Op),
    Linear(Linear, Act),
    Residual(Vec<Loaded>, Vec<Loaded>, Act),
    DenseConcat(Vec<Loaded>),
    Branches(Vec<Vec<Loaded>>),
    ChannelGate(Vec<Loaded>),
}

/// A batch norm as `x * scale + shift`, per channel (`[channels]` each).
fn norm_affine(at: &Loading, norm: &str) -> Result<(Tensor, Tensor), HandlerError> {
    let get = |part: &str| at.source.tensor(&format!("{norm}.{part}"));
    let (gamma, beta, mean, var) = (
        get("weight")?,
        get("bias")?,
        get("running_mean")?,
        get("running_var")?,
    );
    let folded = || -> candle_core::Result<(Tensor, Tensor)> {
        let scale = gamma.broadcast_div(&(var + at.batch_norm_eps)?.sqrt()?)?;
        let shift = (beta - mean.mul(&scale)?)?;
        Ok((scale, shift))
    };
    folded().context(|| format!("cannot fold the batch norm `{norm}`"))
}

fn load_ops(ops: &[Op], at: &Loading) -> Result<Vec<Loaded>, HandlerError> {
    ops.iter().map(|op| load_op(op, at)).collect()
}

fn load_op(op: &Op, at: &Loading) -> Result<Loaded, HandlerError> {
    let (source, device) = (at.source, at.device);
    let on = |t: Tensor, what: &str| {
        t.to_device(device)
            .context(|| format!("cannot place `{what}`"))
    };
    Ok(match op {
        Op::Conv {
            conv,
            norm,
            stride,
            padding,
            groups,
            act,
        } => {
            let weight = source.tensor(&format!("{conv}.weight"))?;
            let bias_name = format!("{conv}.bias");
            let bias = if source.has(&bias_name) {
                Some(source.tensor(&bias_name)?)
            } else {
                None
            };
            let (weight, bias) = match norm {
                None => (weight, bias),
                Some(norm) => {
                    let (scale, shift) = norm_affine(at, norm)?;
                    let fold = || -> candle_core::Result<(Tensor, Tensor)> {
                        let weight = weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
                        let bias = match &bias {
                            Some(b) => (b.mul(&scale)? + &shift)?,
                            None => shift.clone(),
                        };
                        Ok((weight, bias))
                    };
                    let (w, b) =
                        fold().context(|| format!("cannot fold `{norm}` into `{conv}`"))?;
                    (w, Some(b))
                }
            };
            load_conv(weight, bias, (*stride, *padding, *groups), *act, at, conv)?
        }
        Op::Pointwise { linear, scale, act } => {
            let weight = source.tensor(&format!("{linear}.weight"))?;
            let bias = source.tensor(&format!("{linear}.bias"))?;
            let scaled = || -> candle_core::Result<(Tensor, Tensor)> {
                let weight = weight.unsqueeze(2)?.unsqueeze(3)?;
                Ok(match scale {
                    None => (weight, bias.clone()),
                    Some(name) => {
                        let scale = source
                            .tensor(name)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        (
                            weight.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?,
                            bias.mul(&scale)?,
                        )
                    }
                })
            };
            let (weight, bias) =
                scaled().context(|| format!("cannot load `{linear}` as a 1x1 convolution"))?;
            load_conv(weight, Some(bias), (1, 0, 1), *act, at, linear)?
        }
        Op::ChannelNorm { norm, eps } if device.is_cpu() => {
            let values = |part: &str| -> Result<Vec<f32>, HandlerError> {
                let t = source.tensor(&format!("{norm}.{part}"))?;
                t.to_vec1::<f32>().context(|| norm.clone())
            };
            Loaded::CpuChannelNorm(crate::cpu::conv::ChannelLayerNorm {
                weight: values("weight")?,
                bias: values("bias")?,
                eps: *eps as f32,
            })
        }
        Op::ChannelNorm { norm, eps } => {
            let get = |part: &str| -> Result<Tensor, HandlerError> {
                let t = source.tensor(&format!("{norm}.{part}"))?;
                on(t.reshape((1, (), 1, 1)).context(|| norm.clone())?, norm)
            };
            Loaded::ChannelNorm {
                weight: get("weight")?,
                bias: get("bias")?,
                eps: *eps,
            }
        }
        Op::Norm { norm, act } => {
            let (scale, shift) = norm_affine(at, norm)?;
            if device.is_cpu() {
                let values = |t: &Tensor| t.to_vec1::<f32>().context(|| norm.clone());
                return Ok(Loaded::CpuAffine(crate::cpu::conv::ChannelAffine {
                    scale: values(&scale)?,
                    shift: values(&shift)?,
                    act: cpu_act(*act),
                }));
            }
            let shape = |t: Tensor| t.reshape((1, (), 1, 1)).context(|| norm.clone());
            Loaded::Affine {
                scale: on(shape(scale)?, norm)?,
                shift: on(shape(shift)?, norm)?,
                act: *act,
            }
        }
        Op::MaxPool { .. } | Op::AvgPool { .. } | Op::AdaptiveAvgPool { .. } | Op::Flatten => {
            Loaded::Plain(op.clone())
        }
        Op::Linear { name, act } => {
            let weight = on(source.tensor(&format!("{name}.weight"))?, name)?;
            let bias = on(source.tensor(&format!("{name}.bias"))?, name)?;
            Loaded::Linear(Linear::new(weight, Some(bias)), *act)
        }
        Op::Residual {
            body,
            shortcut,
            act,
        } => Loaded::Residual(load_ops(body, at)?, load_ops(shortcut, at)?, *act),
        Op::DenseConcat { body } => Loaded::DenseConcat(load_ops(body, at)?),
        Op::Branches(branches) => Loaded::Branches(
            branches
                .iter()
                .map(|b| load_ops(b, at))
                .collect::<Result<_, _>>()?,
        ),
        Op::ChannelGate { body } => Loaded::ChannelGate(load_ops(body, at)?),
    })
}

/// A convolution with its (folded) weight and bias, on the kernel that fits it: one GEMM
/// per image or the depthwise kernel on the CPU, candle's conv2d otherwise.
fn load_conv(
    weight: Tensor,
    bias: Option<Tensor>,
    (stride, padding, groups): (usize, usize, usize),
    act: Act,
    at: &Loading,
    name: &str,
) -> Result<Loaded, HandlerError> {
    let device = at.device;
    if groups == 1 && device.is_cpu() {
        return crate::cpu::conv::Conv::new(&weight, bias.as_ref(), stride, padding, cpu_act(act))
            .map(Loaded::CpuConv)
            .context(|| format!("cannot load `{name}`"));
    }
    if device.is_cpu() && weight.dims().get(1) == Some(&1) && weight.dim(0).ok() == Some(groups) {
        return crate::cpu::conv::DepthwiseConv::new(
            &weight,
            bias.as_ref(),
            stride,
            padding,
            cpu_act(act),
        )
        .map(Loaded::CpuDepthwise)
        .context(|| format!("cannot load `{name}`"));
    }
    let on = |t: Tensor| {
        t.to_device(device)
            .context(|| format!("cannot place `{name}`"))
    };
    let bias = bias
        .map(|b| b.reshape((1, (), 1, 1)))
        .transpose()
        .context(|| format!("`{name}`'s bias"))?;
    Ok(Loaded::Conv {
        weight: on(weight.contiguous().context(|| name.to_string())?)?,
        bias: bias.map(on).transpose()?,
        stride,
        padding,
        groups,
        act,
    })
}

fn cpu_act(act: Act) -> crate::cpu::conv::Activation {
    match act {
        Act::None => crate::cpu::conv::Activation::None,
        Act::Relu => crate::cpu::conv::Activation::Relu,
        Act::Relu6 => crate::cpu::conv::Activation::Relu6,
        Act::Hardswish => crate::cpu::conv::Activation::Hardswish,
        Act::Hardsigmoid => crate::cpu::conv::Activation::Hardsigmoid,
        Act::Silu => crate::cpu::conv::Activation::Silu,
        Act::Sigmoid => crate::cpu::conv::Activation::Sigmoid,
        Act::Gelu => crate::cpu::conv::Activation::Gelu,
    }
}

fn activate(x: Tensor, act: Act) -> candle_core::Result<Tensor> {
    match act {
        Act::None => Ok(x),
        Act::Relu => x.relu(),
        Act::Relu6 => x.clamp(0f32, 6f32),
        Act::Hardswish => x.mul(&hard_sigmoid(&x)?),
        Act::Hardsigmoid => hard_sigmoid(&x),
        Act::Silu => x.silu(),
        Act::Sigmoid => candle_nn::ops::sigmoid(&x),
        Act::Gelu => x.gelu_erf(),
    }
}

/// `relu6(x + 3) / 6`.
fn hard_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x + 3.0)?.clamp(0f32, 6f32)? / 6.0
}

/// Output size of a pooling window along one axis, PyTorch's rule.
fn pooled(size: usize, kernel: usize, stride: usize, padding: usize, ceil: bool) -> usize {
    let span = size + 2 * padding - kernel;
    let mut out = if ceil {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    // With ceil_mode, the last window must start inside the input or the left padding.
    if ceil && (out - 1) * stride >= size + padding {
        out -= 1;
    }
    out
}

/// Zero-pads the last two dims: `before` on top/left, `after_h`/`after_w` below/right.
fn pad_hw(
    x: &Tensor,
    before: usize,
    after_h: usize,
    after_w: usize,
) -> candle_core::Result<Tensor> {
    x.pad_with_zeros(2, before, after_h)?
        .pad_with_zeros(3, before, after_w)
}

fn forward_ops(ops: &[Loaded], mut x: Tensor) -> candle_core::Result<Tensor> {
    for op in ops {
        x = if profile::on()
            && !matches!(
                op,
                Loaded::Residual(..)
                    | Loaded::DenseConcat(_)
                    | Loaded::Branches(_)
                    | Loaded::ChannelGate(_)
            ) {
            let started = std::time::Instant::now();
            let y = forward_op(op, x)?;
            profile::add(op.kind(), started.elapsed());
            y
        } else {
            forward_op(op, x)?
        };
    }
    Ok(x)
}

/// Time spent per kind of op, when `SPILLWAY_VISION_PROFILE` is set (examples/image_timing).
pub mod profile {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    static TOTALS: Mutex<BTreeMap<&'static str, Duration>> = Mutex::new(BTreeMap::new());

    pub fn on() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("SPILLWAY_VISION_PROFILE").is_some())
    }

    pub(super) fn add(kind: &'static str, took: Duration) {
        if let Ok(mut totals) = TOTALS.lock() {
            *totals.entry(kind).or_default() += took;
        }
    }

    pub fn reset() {
        if let Ok(mut totals) = TOTALS.lock() {
            totals.clear();
        }
    }

    /// Milliseconds per kind since the last reset.
    pub fn totals() -> Vec<(&'static str, f64)> {
        TOTALS
            .lock()
            .map(|t| t.iter().map(|(k, d)| (*k, d.as_secs_f64() * 1e3)).collect())
            .unwrap_or_default()
    }
}

impl Loaded {
    /// What the profile calls it.
    fn kind(&self) -> &'static str {
        match self {
            Loaded::CpuConv(conv) if conv.is_one_by_one() => "conv 1x1",
            Loaded::Conv { weight, .. } if weight.dims().get(2) == Some(&1) => "conv 1x1",
            Loaded::CpuConv(_) | Loaded::Conv { .. } => "conv kxk",
            Loaded::CpuDepthwise(_) => "conv depthwise",
            Loaded::CpuAffine(_) | Loaded::Affine { .. } => "batch norm",
            Loaded::ChannelNorm { .. } | Loaded::CpuChannelNorm(_) => "layer norm",
            Loaded::Plain(Op::MaxPool { .. } | Op::AvgPool { .. } | Op::AdaptiveAvgPool { .. }) => {
                "pool"
            }
            Loaded::Plain(_) => "reshape",
            Loaded::Linear(..) => "linear",
            Loaded::Residual(..)
            | Loaded::DenseConcat(_)
            | Loaded::Branches(_)
            | Loaded::ChannelGate(_) => "structure",
        }
    }
}

fn forward_op(op: &Loaded, x: Tensor) -> candle_core::Result<Tensor> {
    match op {
        Loaded::CpuConv(conv) => conv.forward(&x),
        Loaded::CpuDepthwise(conv) => conv.forward(&x),
        Loaded::CpuAffine(affine) => affine.forward(&x),
        Loaded::Conv {
            weight,
            bias,
            stride,
            padding,
            groups,
            act,
        } => {
            let y = x.conv2d(weight, *padding, *stride, 1, *groups)?;
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            activate(y, *act)
        }
        Loaded::Affine { scale, shift, act } => {
            activate(x.broadcast_mul(scale)?.broadcast_add(shift)?, *act)
        }
        Loaded::CpuChannelNorm(norm) => norm.forward(&x),
        Loaded::ChannelNorm { weight, bias, eps } => {
            let centered = x.broadcast_sub(&x.mean_keepdim(1)?)?;
            let variance = centered.sqr()?.mean_keepdim(1)?;
            centered
                .broadcast_div(&(variance + *eps)?.sqrt()?)?
                .broadcast_mul(weight)?
                .broadcast_add(bias)
        }
        Loaded::Plain(Op::MaxPool {
            kernel,
            stride,
            padding,
            ceil,
        }) => {
            let (_, _, h, w) = x.dims4()?;
            let (oh, ow) = (
                pooled(h, *kernel, *stride, *padding, *ceil),
                pooled(w, *kernel, *stride, *padding, *ceil),
            );
            let need =
                |o: usize, size: usize| ((o - 1) * stride + kernel).saturating_sub(size + padding);
            let x = if *padding > 0 || *ceil {
                pad_hw(&x, *padding, need(oh, h), need(ow, w))?
            } else {
                x
            };
            x.max_pool2d_with_stride(*kernel, *stride)
        }
        Loaded::Plain(Op::AvgPool { kernel, stride }) => x.avg_pool2d_with_stride(*kernel, *stride),
        Loaded::Plain(Op::AdaptiveAvgPool { height, width }) => {
            let (_, _, h, w) = x.dims4()?;
            if (h, w) == (*height, *width) {
                return Ok(x);
            }
            if (*height, *width) == (1, 1) {
                return x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2);
            }
            // PyTorch's windows: [floor(i·h/out), ceil((i+1)·h/out)).
            let window = |i: usize, size: usize, out: usize| {
                (i * size / out, ((i + 1) * size).div_ceil(out))
            };
            let mut rows = Vec::with_capacity(*height);
            for i in 0..*height {
                let (y0, y1) = window(i, h, *height);
                let band = x.narrow(2, y0, y1 - y0)?.mean_keepdim(2)?;
                let mut cells = Vec::with_capacity(*width);
                for j in 0..*width {
                    let (x0, x1) = window(j, w, *width);
                    cells.push(band.narrow(3, x0, x1 - x0)?.mean_keepdim(3)?);
                }
                rows.push(Tensor::cat(&cells, 3)?);
            }
            Tensor::cat(&rows, 2)
        }
        Loaded::Plain(Op::Flatten) => x.flatten_from(1),
        Loaded::Plain(other) => Err(candle_core::Error::Msg(format!(
            "{other:?} holds tensors: it is loaded, not plain"
        ))),
        Loaded::Linear(linear, act) => activate(linear.forward(&x.contiguous()?)?, *act),
        Loaded::Residual(body, shortcut, act) => {
            let short = if shortcut.is_empty() {
                x.clone()
            } else {
                forward_ops(shortcut, x.clone())?
            };
            activate((forward_ops(body, x)? + short)?, *act)
        }
        Loaded::DenseConcat(body) => {
            let new = forward_ops(body, x.clone())?;
            let started = std::time::Instant::now();
            let joined = Tensor::cat(&[x, new], 1);
            if profile::on() {
                profile::add("concat", started.elapsed());
            }
            joined
        }
        Loaded::Branches(branches) => {
            let outs = branches
                .iter()
                .map(|b| forward_ops(b, x.clone()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&outs, 1)
        }
        Loaded::ChannelGate(body) => {
            let gate = forward_ops(body, x.clone())?;
            x.broadcast_mul(&gate)
        }
    }
}

/// A loaded network, ready to run.
pub struct Network {
    pub graph: Graph,
    ops: Vec<Loaded>,
    device: Device,
}

impl Network {
    /// Loads every tensor `graph` names from `source` onto `device`, in f32.
    pub fn load(
        graph: Graph,
        source: &dyn TensorSource,
        device: &Device,
    ) -> Result<Self, HandlerError> {
        let ops = load_ops(
            &graph.ops,
            &Loading {
                source,
                device,
                batch_norm_eps: graph.batch_norm_eps,
            },
        )?;
        Ok(Self {
            graph,
            ops,
            device: device.clone(),
        })
    }

    /// `[batch, 3, h, w]` images → `[batch, classes]` logits.
    pub fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let logits = forward_ops(
            &self.ops,
            images.to_device(&self.device)?.to_dtype(DType::F32)?,
        )?;
        logits.flatten_from(1)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// Tensors held in memory, by name (tests, and checkpoints read whole).
impl TensorSource for HashMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Tensor, HandlerError> {
        self.get(name)
            .cloned()
            .ok_or_else(|| HandlerError::bad_file("weights", format!("tensor `{name}` is missing")))
    }

    fn has(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_sizes_follow_pytorch() {
        // ResNet's stem pool: 112 → 56; SqueezeNet's ceil_mode pools: 109 → 54, 54 → 27.
        assert_eq!(pooled(112, 3, 2, 1, false), 56);
        assert_eq!(pooled(109, 3, 2, 0, true), 54);
        assert_eq!(pooled(54, 3, 2, 0, true), 27);
        assert_eq!(pooled(13, 3, 2, 0, false), 6);
        assert_eq!(pooled(6, 3, 2, 0, true), 3);
    }

    /// A conv followed by a batch norm, folded, equals the two applied in turn.
    #[test]
    fn a_folded_batch_norm_equals_the_norm_after_the_conv() {
        let dev = Device::Cpu;
        let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).expect("tensor");
        let mut w: HashMap<String, Tensor> = HashMap::new();
        w.insert(
            "c.weight".into(),
            t(
                (0..2 * 3 * 9).map(|i| (i as f32 * 0.37).sin()).collect(),
                &[2, 3, 3, 3],
            ),
        );
        w.insert("n.weight".into(), t(vec![1.5, -0.5], &[2]));
        w.insert("n.bias".into(), t(vec![0.25, 0.1], &[2]));
        w.insert("n.running_mean".into(), t(vec![0.3, -0.2], &[2]));
        w.insert("n.running_var".into(), t(vec![2.0, 0.5], &[2]));
        let x = t(
            (0..3 * 5 * 5).map(|i| (i as f32 * 0.11).cos()).collect(),
            &[1, 3, 5, 5],
        );
        let graph = |ops| Graph {
            architecture: "t".into(),
            ops,
            classes: 2,
            batch_norm_eps: BATCH_NORM_EPS,
        };
        let folded = Network::load(
            graph(vec![Op::conv("c", Some("n"), 1, 1, Act::None)]),
            &w,
            &dev,
        )
        .expect("load");
        let apart = Network::load(
            graph(vec![
                Op::conv("c", None, 1, 1, Act::None),
                Op::Norm {
                    norm: "n".into(),
                    act: Act::None,
                },
            ]),
            &w,
            &dev,
        )
        .expect("load");
        let run = |network: &Network| -> Vec<f32> {
            network
                .forward(&x)
                .and_then(|y| y.flatten_all()?.to_vec1())
                .expect("run")
        };
        let (a, b) = (run(&folded), run(&apart));
        assert_eq!(a.len(), 2 * 25);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
