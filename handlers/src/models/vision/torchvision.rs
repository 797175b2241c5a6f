//! torchvision's classifiers recognized from a state dict alone — names and shapes, no
//! `model.py` — and written as a [`Graph`]: DenseNet 121/161/169/201 (and other growth
//! rates and block counts), ResNet 18–152 with ResNeXt and Wide ResNet, VGG 11–19 with
//! and without batch norm, AlexNet, SqueezeNet 1.0 and 1.1, MobileNet v2 and v3 (large
//! and small), EfficientNet B0–B7. What shapes cannot say (strides, paddings,
//! activations, batch norm eps) is torchvision's definition of each family.
//!
//! Names are first made canonical: a `module.` prefix (DataParallel) is dropped and the
//! legacy DenseNet names of the published weights (`denselayer1.norm.1.weight`) become
//! today's (`denselayer1.norm1.weight`), as torchvision's own loader renames them.

use std::collections::BTreeMap;

use super::graph::{Act, BATCH_NORM_EPS, Graph, Op};
use crate::HandlerError;

/// A state dict's tensor shapes by canonical name.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The canonical name of a stored tensor name.
pub fn canonical_name(stored: &str) -> String {
    let name = stored.strip_prefix("module.").unwrap_or(stored);
    // `...denselayerN.norm.1.weight` → `...denselayerN.norm1.weight` (norm, relu, conv).
    if let Some(at) = name.find("denselayer") {
        let (head, tail) = name.split_at(at);
        let mut parts: Vec<&str> = tail.split('.').collect();
        if parts.len() == 4
            && matches!(parts[1], "norm" | "relu" | "conv")
            && matches!(parts[2], "1" | "2")
        {
            let joined = format!("{}{}", parts[1], parts[2]);
            parts.splice(1..3, [joined.as_str()]);
            return format!("{head}{}", parts.join("."));
        }
    }
    name.to_string()
}

fn shape<'a>(shapes: &'a Shapes, name: &str) -> Option<&'a [usize]> {
    shapes.get(name).map(Vec::as_slice)
}

/// Rows of a linear or output channels of a conv.
fn out_dim(shapes: &Shapes, name: &str) -> Option<usize> {
    shape(shapes, name).and_then(|s| s.first().copied())
}

/// Recognizes the network `shapes` hold; the refusal names what was found.
pub fn recognize(shapes: &Shapes) -> Result<Graph, HandlerError> {
    let recognizers: [fn(&Shapes) -> Option<Graph>; 8] = [
        densenet,
        resnet,
        mobilenet_v2,
        mobilenet_v3,
        efficientnet,
        squeezenet,
        alexnet,
        vgg,
    ];
    recognizers.iter().find_map(|r| r(shapes)).ok_or_else(|| {
        let sample: Vec<String> = shapes
            .iter()
            .take(6)
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect();
        HandlerError::Unsupported(format!(
            "the weights match no image architecture Spillway recognizes (torchvision's DenseNet, \
             ResNet/ResNeXt/Wide ResNet, VGG, AlexNet, SqueezeNet, MobileNet v2/v3, EfficientNet \
             B0-B7); found {} tensors: \
             {}{}",
            shapes.len(),
            sample.join(", "),
            if shapes.len() > 6 { ", ..." } else { "" }
        ))
    })
}

/// Indices `i` for which `format!("{prefix}{i}{suffix}")` is a tensor, ascending.
fn indices(shapes: &Shapes, prefix: &str, suffix: &str) -> Vec<usize> {
    let mut found: Vec<usize> = shapes
        .keys()
        .filter_map(|n| n.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Global average pooling, flattening and the linear classifier `linear`: the end of
/// DenseNet, ResNet, MobileNet and EfficientNet (and Hugging Face's ResNet).
pub(super) fn pooled_classifier(ops: &mut Vec<Op>, linear: &str) {
    ops.push(Op::AdaptiveAvgPool {
        height: 1,
        width: 1,
    });
    ops.push(Op::Flatten);
    ops.push(Op::Linear {
        name: linear.into(),
        act: Act::None,
    });
}

fn classes_of(shapes: &Shapes, head: &str) -> Option<usize> {
    out_dim(shapes, &format!("{head}.weight"))
}

fn densenet(shapes: &Shapes) -> Option<Graph> {
    shape(shapes, "features.conv0.weight")?;
    let classes = classes_of(shapes, "classifier")?;
    let mut ops = vec![
        Op::conv("features.conv0", Some("features.norm0"), 2, 3, Act::Relu),
        Op::MaxPool {
            kernel: 3,
            stride: 2,
            padding: 1,
            ceil: false,
        },
    ];
    let blocks = indices(shapes, "features.denseblock", ".denselayer1.conv1.weight");
    if blocks.is_empty() || blocks != (1..=blocks.len()).collect::<Vec<_>>() {
        return None;
    }
    let mut layer_counts = Vec::new();
    for &b in &blocks {
        let block = format!("features.denseblock{b}");
        let layers = indices(shapes, &format!("{block}.denselayer"), ".conv1.weight");
        layer_counts.push(layers.len());
        for l in layers {
            let layer = format!("{block}.denselayer{l}");
            ops.push(Op::DenseConcat {
                body: vec![
                    Op::Norm {
                        norm: format!("{layer}.norm1"),
                        act: Act::Relu,
                    },
                    Op::conv(
                        &format!("{layer}.conv1"),
                        Some(&format!("{layer}.norm2")),
                        1,
                        0,
                        Act::Relu,
                    ),
                    Op::conv(&format!("{layer}.conv2"), None, 1, 1, Act::None),
                ],
            });
        }
        let transition = format!("features.transition{b}");
        if shapes.contains_key(&format!("{transition}.conv.weight")) {
            ops.push(Op::Norm {
                norm: format!("{transition}.norm"),
                act: Act::Relu,
            });
            ops.push(Op::conv(
                &format!("{transition}.conv"),
                None,
                1,
                0,
                Act::None,
            ));
            ops.push(Op::AvgPool {
                kernel: 2,
                stride: 2,
            });
        }
    }
    ops.push(Op::Norm {
        norm: "features.norm5".into(),
        act: Act::Relu,
    });
    pooled_classifier(&mut ops, "classifier");
    let growth = out_dim(shapes, "features.denseblock1.denselayer1.conv2.weight")?;
    let init = out_dim(shapes, "features.conv0.weight")?;
    let architecture = match (growth, init, layer_counts.as_slice()) {
        (32, 64, [6, 12, 24, 16]) => "densenet121".to_string(),
        (48, 96, [6, 12, 36, 24]) => "densenet161".to_string(),
        (32, 64, [6, 12, 32, 32]) => "densenet169".to_string(),
        (32, 64, [6, 12, 48, 32]) => "densenet201".to_string(),
        _ => format!("densenet (growth {growth}, blocks {layer_counts:?})"),
    };
    Some(Graph {
        architecture,
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

fn resnet(shapes: &Shapes) -> Option<Graph> {
    shape(shapes, "conv1.weight")?;
    shape(shapes, "layer1.0.conv1.weight")?;
    let classes = classes_of(shapes, "fc")?;
    let mut ops = vec![
        Op::conv("conv1", Some("bn1"), 2, 3, Act::Relu),
        Op::MaxPool {
            kernel: 3,
            stride: 2,
            padding: 1,
            ceil: false,
        },
    ];
    let bottleneck = shapes.contains_key("layer1.0.conv3.weight");
    let mut counts = Vec::new();
    let mut groups = 1;
    for stage in 1..=4 {
        let blocks = indices(shapes, &format!("layer{stage}."), ".conv1.weight");
        if blocks.is_empty() {
            return None;
        }
        counts.push(blocks.len());
        for b in blocks {
            let block = format!("layer{stage}.{b}");
            let stride = if stage > 1 && b == 0 { 2 } else { 1 };
            let conv = |i: usize| format!("{block}.conv{i}");
            let bn = |i: usize| format!("{block}.bn{i}");
            let body = if bottleneck {
                let width = out_dim(shapes, &format!("{}.weight", conv(2)))?;
                let per_group = shape(shapes, &format!("{}.weight", conv(2)))?
                    .get(1)
                    .copied()?;
                groups = width / per_group.max(1);
                vec![
                    Op::conv(&conv(1), Some(&bn(1)), 1, 0, Act::Relu),
                    Op::Conv {
                        conv: conv(2),
                        norm: Some(bn(2)),
                        stride,
                        padding: 1,
                        groups,
                        act: Act::Relu,
                    },
                    Op::conv(&conv(3), Some(&bn(3)), 1, 0, Act::None),
                ]
            } else {
                vec![
                    Op::conv(&conv(1), Some(&bn(1)), stride, 1, Act::Relu),
                    Op::conv(&conv(2), Some(&bn(2)), 1, 1, Act::None),
                ]
            };
            let shortcut = if shapes.contains_key(&format!("{block}.downsample.0.weight")) {
                vec![Op::conv(
                    &format!("{block}.downsample.0"),
                    Some(&format!("{block}.downsample.1")),
                    stride,
                    0,
                    Act::None,
                )]
            } else {
                Vec::new()
            };
            ops.push(Op::Residual {
                body,
                shortcut,
                act: Act::Relu,
            });
        }
    }
    pooled_classifier(&mut ops, "fc");
    let depth = match (bottleneck, counts.as_slice()) {
        (false, [2, 2, 2, 2]) => Some(18),
        (false, [3, 4, 6, 3]) => Some(34),
        (true, [3, 4, 6, 3]) => Some(50),
        (true, [3, 4, 23, 3]) => Some(101),
        (true, [3, 8, 36, 3]) => Some(152),
        _ => None,
    };
    let width = out_dim(shapes, "layer1.0.conv2.weight")?;
    let architecture = match (depth, bottleneck) {
        (Some(d), true) if groups > 1 => format!("resnext{d}_{groups}x{}d", width / groups / 2),
        (Some(d), true) if width > 64 => format!("wide_resnet{d}_{}", width / 64),
        (Some(d), _) => format!("resnet{d}"),
        (None, _) => format!(
            "resnet (blocks {counts:?}{})",
            if bottleneck { ", bottleneck" } else { "" }
        ),
    };
    Some(Graph {
        architecture,
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

/// Where VGG's and AlexNet's `features` put a max pool: at each index that holds no
/// tensor, past the first layer's activation.
fn pools_between(indices_with_tensors: &[usize], per_layer: usize) -> Vec<bool> {
    // For each layer after the first: a pool before it if its index jumped further than
    // one layer's modules.
    indices_with_tensors
        .windows(2)
        .map(|w| w[1] - w[0] > per_layer)
        .collect()
}

fn vgg(shapes: &Shapes) -> Option<Graph> {
    let classes = classes_of(shapes, "classifier.6")?;
    shape(shapes, "classifier.3.weight")?;
    let convs = indices(shapes, "features.", ".weight")
        .into_iter()
        .filter(|i| shape(shapes, &format!("features.{i}.weight")).is_some_and(|s| s.len() == 4))
        .collect::<Vec<_>>();
    if convs.is_empty() {
        return None;
    }
    let bn = shapes.contains_key(&format!("features.{}.running_mean", convs[0] + 1));
    let per_layer = if bn { 3 } else { 2 };
    let pools = pools_between(&convs, per_layer);
    let mut ops = Vec::new();
    for (k, &i) in convs.iter().enumerate() {
        if k > 0 && pools[k - 1] {
            ops.push(Op::MaxPool {
                kernel: 2,
                stride: 2,
                padding: 0,
                ceil: false,
            });
        }
        let norm = bn.then(|| format!("features.{}", i + 1));
        ops.push(Op::conv(
            &format!("features.{i}"),
            norm.as_deref(),
            1,
            1,
            Act::Relu,
        ));
    }
    ops.push(Op::MaxPool {
        kernel: 2,
        stride: 2,
        padding: 0,
        ceil: false,
    });
    ops.push(Op::AdaptiveAvgPool {
        height: 7,
        width: 7,
    });
    ops.push(Op::Flatten);
    ops.push(Op::Linear {
        name: "classifier.0".into(),
        act: Act::Relu,
    });
    ops.push(Op::Linear {
        name: "classifier.3".into(),
        act: Act::Relu,
    });
    ops.push(Op::Linear {
        name: "classifier.6".into(),
        act: Act::None,
    });
    let depth = convs.len() + 3;
    let architecture = format!("vgg{depth}{}", if bn { "_bn" } else { "" });
    Some(Graph {
        architecture,
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

fn alexnet(shapes: &Shapes) -> Option<Graph> {
    let classes = classes_of(shapes, "classifier.6")?;
    shape(shapes, "classifier.1.weight")?;
    let convs = indices(shapes, "features.", ".weight");
    if convs != [0, 3, 6, 8, 10] || shape(shapes, "features.0.weight")?.get(2) != Some(&11) {
        return None;
    }
    let pool = || Op::MaxPool {
        kernel: 3,
        stride: 2,
        padding: 0,
        ceil: false,
    };
    let ops = vec![
        Op::conv("features.0", None, 4, 2, Act::Relu),
        pool(),
        Op::conv("features.3", None, 1, 2, Act::Relu),
        pool(),
        Op::conv("features.6", None, 1, 1, Act::Relu),
        Op::conv("features.8", None, 1, 1, Act::Relu),
        Op::conv("features.10", None, 1, 1, Act::Relu),
        pool(),
        Op::AdaptiveAvgPool {
            height: 6,
            width: 6,
        },
        Op::Flatten,
        Op::Linear {
            name: "classifier.1".into(),
            act: Act::Relu,
        },
        Op::Linear {
            name: "classifier.4".into(),
            act: Act::Relu,
        },
        Op::Linear {
            name: "classifier.6".into(),
            act: Act::None,
        },
    ];
    Some(Graph {
        architecture: "alexnet".into(),
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

fn squeezenet(shapes: &Shapes) -> Option<Graph> {
    let head = shape(shapes, "classifier.1.weight")?;
    if head.len() != 4 {
        return None;
    }
    let classes = head[0];
    let first = shape(shapes, "features.0.weight")?;
    let version = match first.get(2) {
        Some(7) => "squeezenet1_0",
        Some(3) => "squeezenet1_1",
        _ => return None,
    };
    let fires = indices(shapes, "features.", ".squeeze.weight");
    let last = *fires.last()?;
    let mut ops = vec![Op::conv("features.0", None, 2, 0, Act::Relu)];
    for i in 2..=last {
        if fires.contains(&i) {
            let fire = format!("features.{i}");
            ops.push(Op::conv(&format!("{fire}.squeeze"), None, 1, 0, Act::Relu));
            ops.push(Op::Branches(vec![
                vec![Op::conv(
                    &format!("{fire}.expand1x1"),
                    None,
                    1,
                    0,
                    Act::Relu,
                )],
                vec![Op::conv(
                    &format!("{fire}.expand3x3"),
                    None,
                    1,
                    1,
                    Act::Relu,
                )],
            ]));
        } else {
            ops.push(Op::MaxPool {
                kernel: 3,
                stride: 2,
                padding: 0,
                ceil: true,
            });
        }
    }
    ops.push(Op::conv("classifier.1", None, 1, 0, Act::Relu));
    ops.push(Op::AdaptiveAvgPool {
        height: 1,
        width: 1,
    });
    ops.push(Op::Flatten);
    Some(Graph {
        architecture: version.into(),
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

fn mobilenet_v2(shapes: &Shapes) -> Option<Graph> {
    shape(shapes, "features.0.0.weight")?;
    shape(shapes, "features.1.conv.0.0.weight")?;
    let classes = classes_of(shapes, "classifier.1")?;
    let blocks = indices(shapes, "features.", ".conv.0.0.weight");
    let last = blocks.last()? + 1;
    shape(shapes, &format!("features.{last}.0.weight"))?;
    let mut ops = vec![Op::conv(
        "features.0.0",
        Some("features.0.1"),
        2,
        1,
        Act::Relu6,
    )];
    for &i in &blocks {
        let block = format!("features.{i}.conv");
        // torchvision's inverted residual settings: the first block of the 24-, 32-, 64-
        // and 160-channel stages strides 2 (features 2, 4, 7 and 14) at any width.
        let stride = if [2, 4, 7, 14].contains(&i) { 2 } else { 1 };
        let expands = shapes.contains_key(&format!("{block}.3.weight"));
        let depthwise = |conv: String, norm: String| {
            let channels = out_dim(shapes, &format!("{conv}.weight")).unwrap_or(1);
            Op::Conv {
                conv,
                norm: Some(norm),
                stride,
                padding: 1,
                groups: channels,
                act: Act::Relu6,
            }
        };
        let body = if expands {
            vec![
                Op::conv(
                    &format!("{block}.0.0"),
                    Some(&format!("{block}.0.1")),
                    1,
                    0,
                    Act::Relu6,
                ),
                depthwise(format!("{block}.1.0"), format!("{block}.1.1")),
                Op::conv(
                    &format!("{block}.2"),
                    Some(&format!("{block}.3")),
                    1,
                    0,
                    Act::None,
                ),
            ]
        } else {
            vec![
                depthwise(format!("{block}.0.0"), format!("{block}.0.1")),
                Op::conv(
                    &format!("{block}.1"),
                    Some(&format!("{block}.2")),
                    1,
                    0,
                    Act::None,
                ),
            ]
        };
        let input = shape(shapes, &format!("{block}.0.0.weight"))?;
        let in_channels = if expands { input[1] } else { input[0] };
        let out_channels = out_dim(
            shapes,
            &format!(
                "{}.weight",
                if expands {
                    format!("{block}.2")
                } else {
                    format!("{block}.1")
                }
            ),
        )?;
        if stride == 1 && in_channels == out_channels {
            ops.push(Op::Residual {
                body,
                shortcut: Vec::new(),
                act: Act::None,
            });
        } else {
            ops.extend(body);
        }
    }
    ops.push(Op::conv(
        &format!("features.{last}.0"),
        Some(&format!("features.{last}.1")),
        1,
        0,
        Act::Relu6,
    ));
    pooled_classifier(&mut ops, "classifier.1");
    Some(Graph {
        architecture: "mobilenet_v2".into(),
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

/// An inverted residual block's body (MobileNet v3's and EfficientNet's `block`
/// Sequential, under `block`): an optional 1×1 expansion, one depthwise convolution
/// striding `stride`, an optional squeeze-and-excitation gate (`fc1` with `gate_inner`,
/// `fc2` with `gate`), a 1×1 projection without activation; `act` after the others.
/// Wrapped in a residual when it keeps the stride and the channels. `None` when the
/// layers are not that shape (EfficientNet V2's fused blocks, say).
fn inverted_residual(
    shapes: &Shapes,
    block: &str,
    stride: usize,
    act: Act,
    gate_inner: Act,
    gate: Act,
) -> Option<Vec<Op>> {
    let mut body = Vec::new();
    let (mut input, mut output, mut depthwise) = (None, None, 0);
    let mut j = 0;
    loop {
        let layer = format!("{block}.{j}");
        let is_last = !shapes.contains_key(&format!("{block}.{}.0.weight", j + 1))
            && !shapes.contains_key(&format!("{block}.{}.fc1.weight", j + 1));
        if shapes.contains_key(&format!("{layer}.fc1.weight")) {
            let conv = |name: &str, act| Op::conv(&format!("{layer}.{name}"), None, 1, 0, act);
            body.push(Op::ChannelGate {
                body: vec![
                    Op::AdaptiveAvgPool {
                        height: 1,
                        width: 1,
                    },
                    conv("fc1", gate_inner),
                    conv("fc2", gate),
                ],
            });
        } else if let Some(weight) = shape(shapes, &format!("{layer}.0.weight")) {
            let &[out, per_group, kh, kw] = weight else {
                return None;
            };
            let (conv, norm) = (format!("{layer}.0"), Some(format!("{layer}.1")));
            if per_group == 1 && kh > 1 && kh == kw {
                depthwise += 1;
                input.get_or_insert(out);
                body.push(Op::Conv {
                    conv,
                    norm,
                    stride,
                    padding: (kh - 1) / 2,
                    groups: out,
                    act,
                });
            } else if (kh, kw) == (1, 1) {
                input.get_or_insert(per_group);
                body.push(Op::conv(
                    &conv,
                    norm.as_deref(),
                    1,
                    0,
                    if is_last { Act::None } else { act },
                ));
                if is_last {
                    output = Some(out);
                }
            } else {
                return None;
            }
        } else {
            break;
        }
        j += 1;
    }
    let (input, output) = (input?, output?);
    if depthwise != 1 {
        return None;
    }
    Some(if stride == 1 && input == output {
        vec![Op::Residual {
            body,
            shortcut: Vec::new(),
            act: Act::None,
        }]
    } else {
        body
    })
}

/// torchvision's MobileNet v3, large (15 blocks) or small (11): each block's stride and
/// activation (ReLU or hardswish) are its definition's table, by position.
fn mobilenet_v3(shapes: &Shapes) -> Option<Graph> {
    shape(shapes, "features.0.0.weight")?;
    shape(shapes, "features.1.block.0.0.weight")?;
    shape(shapes, "classifier.0.weight")?;
    let classes = classes_of(shapes, "classifier.3")?;
    let blocks = indices(shapes, "features.", ".block.0.0.weight");
    if blocks != (1..=blocks.len()).collect::<Vec<_>>() {
        return None;
    }
    // (architecture, strides, blocks using ReLU before hardswish takes over).
    let (architecture, strides, relu_blocks): (&str, &[usize], usize) = match blocks.len() {
        15 => (
            "mobilenet_v3_large",
            &[1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1],
            6,
        ),
        11 => ("mobilenet_v3_small", &[2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1], 3),
        _ => return None,
    };
    let mut ops = vec![Op::conv(
        "features.0.0",
        Some("features.0.1"),
        2,
        1,
        Act::Hardswish,
    )];
    for (k, &i) in blocks.iter().enumerate() {
        let act = if k < relu_blocks {
            Act::Relu
        } else {
            Act::Hardswish
        };
        ops.extend(inverted_residual(
            shapes,
            &format!("features.{i}.block"),
            strides[k],
            act,
            Act::Relu,
            Act::Hardsigmoid,
        )?);
    }
    let last = blocks.len() + 1;
    ops.push(Op::conv(
        &format!("features.{last}.0"),
        Some(&format!("features.{last}.1")),
        1,
        0,
        Act::Hardswish,
    ));
    ops.extend([
        Op::AdaptiveAvgPool {
            height: 1,
            width: 1,
        },
        Op::Flatten,
        Op::Linear {
            name: "classifier.0".into(),
            act: Act::Hardswish,
        },
        Op::Linear {
            name: "classifier.3".into(),
            act: Act::None,
        },
    ]);
    Some(Graph {
        architecture: architecture.into(),
        ops,
        classes,
        batch_norm_eps: 1e-3,
    })
}

/// torchvision's EfficientNet B0–B7: seven stages of inverted residual blocks (SiLU,
/// squeeze-and-excitation gated by a sigmoid) whose first blocks stride as B0's table
/// says; the variant is named by its block count and head width. B5–B7's batch norms
/// use eps 1e-3, B0–B4's PyTorch's default.
fn efficientnet(shapes: &Shapes) -> Option<Graph> {
    shape(shapes, "features.0.0.weight")?;
    shape(shapes, "features.1.0.block.0.0.weight")?;
    let classes = classes_of(shapes, "classifier.1")?;
    let stages = indices(shapes, "features.", ".0.block.0.0.weight");
    if stages != (1..=7).collect::<Vec<_>>() {
        return None;
    }
    const FIRST_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];
    let mut ops = vec![Op::conv(
        "features.0.0",
        Some("features.0.1"),
        2,
        1,
        Act::Silu,
    )];
    let mut counts = Vec::new();
    for (&stage, first_stride) in stages.iter().zip(FIRST_STRIDES) {
        let blocks = indices(shapes, &format!("features.{stage}."), ".block.0.0.weight");
        counts.push(blocks.len());
        for b in blocks {
            let stride = if b == 0 { first_stride } else { 1 };
            ops.extend(inverted_residual(
                shapes,
                &format!("features.{stage}.{b}.block"),
                stride,
                Act::Silu,
                Act::Silu,
                Act::Sigmoid,
            )?);
        }
    }
    ops.push(Op::conv(
        "features.8.0",
        Some("features.8.1"),
        1,
        0,
        Act::Silu,
    ));
    pooled_classifier(&mut ops, "classifier.1");
    let head = out_dim(shapes, "features.8.0.weight")?;
    let variant = match (counts.iter().sum::<usize>(), head) {
        (16, 1280) => Some(0),
        (23, 1280) => Some(1),
        (23, 1408) => Some(2),
        (26, 1536) => Some(3),
        (32, 1792) => Some(4),
        (39, 2048) => Some(5),
        (45, 2304) => Some(6),
        (55, 2560) => Some(7),
        _ => None,
    };
    Some(Graph {
        architecture: match variant {
            Some(b) => format!("efficientnet_b{b}"),
            None => format!("efficientnet (blocks {counts:?})"),
        },
        ops,
        classes,
        batch_norm_eps: if variant.is_some_and(|b| b >= 5) {
            1e-3
        } else {
            BATCH_NORM_EPS
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_densenet_names_and_dataparallel_prefixes_become_canonical() {
        assert_eq!(
            canonical_name("features.denseblock1.denselayer1.norm.1.weight"),
            "features.denseblock1.denselayer1.norm1.weight"
        );
        assert_eq!(
            canonical_name("module.features.denseblock2.denselayer10.conv.2.weight"),
            "features.denseblock2.denselayer10.conv2.weight"
        );
        assert_eq!(
            canonical_name("features.transition1.norm.weight"),
            "features.transition1.norm.weight"
        );
        assert_eq!(
            canonical_name("layer1.0.conv1.weight"),
            "layer1.0.conv1.weight"
        );
    }

    /// Real-size torchvision networks (their state dicts' shapes, written by
    /// scripts/make-image-fixtures.py) get their names and their batch norms' eps.
    #[test]
    fn real_size_efficientnets_are_named_and_v2_is_refused() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/images/architectures.json");
        let all: BTreeMap<String, Shapes> =
            serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
        for (name, eps) in [
            ("efficientnet_b0", BATCH_NORM_EPS),
            ("efficientnet_b1", BATCH_NORM_EPS),
            ("efficientnet_b2", BATCH_NORM_EPS),
            ("efficientnet_b5", 1e-3),
            ("efficientnet_b7", 1e-3),
        ] {
            let graph = recognize(&all[name]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(graph.architecture, name);
            assert_eq!(graph.batch_norm_eps, eps, "{name}");
            assert_eq!(graph.classes, 1000, "{name}");
        }
        // Its first stages are fused blocks (a full 3x3 convolution, no depthwise one).
        let err = recognize(&all["efficientnet_v2_s"]).expect_err("V2 is not served");
        assert!(err.to_string().contains("EfficientNet"), "{err}");
    }

    #[test]
    fn unknown_weights_are_refused_naming_what_was_found() {
        let shapes: Shapes = [("encoder.layer.0.weight".to_string(), vec![4, 4])].into();
        let err = recognize(&shapes).expect_err("unknown");
        assert!(
            err.to_string().contains("encoder.layer.0.weight [4, 4]"),
            "{err}"
        );
        assert!(err.to_string().contains("DenseNet"), "{err}");
    }
}
