//! torchvision's classifiers recognized from a state dict alone — names and shapes, no
//! `model.py` — and written as a [`Graph`]: DenseNet 121/161/169/201 (and other growth
//! rates and block counts), ResNet 18–152 with ResNeXt and Wide ResNet, VGG 11–19 with
//! and without batch norm, AlexNet, SqueezeNet 1.0 and 1.1, MobileNet v2. What shapes
//! cannot say (strides, paddings) is torchvision's definition of each family.
//!
//! Names are first made canonical: a `module.` prefix (DataParallel) is dropped and the
//! legacy DenseNet names of the published weights (`denselayer1.norm.1.weight`) become
//! today's (`denselayer1.norm1.weight`), as torchvision's own loader renames them.

use std::collections::BTreeMap;

use super::graph::{Act, Graph, Op};
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
    let recognizers: [fn(&Shapes) -> Option<Graph>; 6] =
        [densenet, resnet, mobilenet_v2, squeezenet, alexnet, vgg];
    recognizers.iter().find_map(|r| r(shapes)).ok_or_else(|| {
        let sample: Vec<String> = shapes
            .iter()
            .take(6)
            .map(|(n, s)| format!("{n} {s:?}"))
            .collect();
        HandlerError::Unsupported(format!(
            "the weights match no image architecture Spillway recognizes (torchvision's DenseNet, \
             ResNet/ResNeXt/Wide ResNet, VGG, AlexNet, SqueezeNet, MobileNet v2); found {} tensors: \
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
/// DenseNet, ResNet and MobileNet.
fn pooled_classifier(ops: &mut Vec<Op>, linear: &str) {
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
