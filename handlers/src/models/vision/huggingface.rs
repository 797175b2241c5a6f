//! Hugging Face's convolutional image classifiers, named by config.json's `model_type`
//! and written as [`Graph`]s for the one executor: `ResNetForImageClassification`
//! (`resnet`: microsoft/resnet-*) and `ConvNextForImageClassification` (`convnext`:
//! facebook/convnext-*). The config says the structure (stage depths, block kind, where
//! the stride sits); the names are transformers'. Config values that change the math and
//! that these graphs do not run are refused by name.

use serde_json::Value;

use super::graph::{Act, BATCH_NORM_EPS, Graph, Op};
use super::torchvision::Shapes;
use crate::HandlerError;

/// The `model_type`s this module writes graphs for.
pub const MODEL_TYPES: [&str; 2] = ["resnet", "convnext"];

/// Whether `config` names a model this module serves.
pub fn serves(config: &Value) -> bool {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| MODEL_TYPES.contains(&t))
}

/// The graph of the classifier `config` describes, whose tensors `shapes` holds.
pub fn graph(config: &Value, shapes: &Shapes) -> Result<Graph, HandlerError> {
    let model_type = config.get("model_type").and_then(Value::as_str);
    if let Some(channels) = config.get("num_channels").and_then(Value::as_u64)
        && channels != 3
    {
        return Err(unsupported(format!(
            "num_channels {channels} (images are decoded to 3 channels)"
        )));
    }
    match model_type {
        Some("resnet") => resnet(config, shapes),
        Some("convnext") => convnext(config, shapes),
        other => Err(unsupported(format!("model_type {other:?}"))),
    }
}

fn unsupported(what: String) -> HandlerError {
    HandlerError::Unsupported(format!(
        "config.json: {what} is not served for image models"
    ))
}

fn bad(what: String) -> HandlerError {
    HandlerError::bad_file("config.json", what)
}

fn numbers(config: &Value, key: &str) -> Result<Vec<usize>, HandlerError> {
    config
        .get(key)
        .and_then(Value::as_array)
        .and_then(|items| {
            items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|v| !v.is_empty())
        .ok_or_else(|| bad(format!("`{key}` must be a list of whole numbers")))
}

fn flag(config: &Value, key: &str) -> bool {
    config.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Only the activation these graphs run (`expected`) is accepted for `hidden_act`.
fn require_act(config: &Value, expected: &str) -> Result<(), HandlerError> {
    match config.get("hidden_act").and_then(Value::as_str) {
        None => Ok(()),
        Some(act) if act == expected => Ok(()),
        Some(act) => Err(unsupported(format!("hidden_act `{act}` (only {expected})"))),
    }
}

/// The classifier's rows, from `head`'s weight; a bare backbone is not a classifier.
fn classes(shapes: &Shapes, head: &str, model: &str) -> Result<usize, HandlerError> {
    shapes
        .get(&format!("{head}.weight"))
        .and_then(|s| s.first().copied())
        .ok_or_else(|| {
            HandlerError::Unsupported(format!(
                "the weights have no `{head}.weight`: a {model} without its classification head \
                 is not an image classifier"
            ))
        })
}

/// A kernel's side, from its weight's shape (`[out, in, k, k]`).
fn kernel(shapes: &Shapes, conv: &str) -> Result<usize, HandlerError> {
    shapes
        .get(&format!("{conv}.weight"))
        .and_then(|s| s.get(2).copied())
        .ok_or_else(|| {
            HandlerError::bad_file("weights", format!("tensor `{conv}.weight` is missing"))
        })
}

/// transformers' ResNet: a 7×7 stem and max pool, stages of basic or bottleneck layers
/// (the first of each striding 2, but the first stage's only with
/// `downsample_in_first_stage`; in a bottleneck the 3×3 strides, or the first 1×1 with
/// `downsample_in_bottleneck`), a projection shortcut where the shape changes.
fn resnet(config: &Value, shapes: &Shapes) -> Result<Graph, HandlerError> {
    require_act(config, "relu")?;
    let depths = numbers(config, "depths")?;
    let bottleneck = match config.get("layer_type").and_then(Value::as_str) {
        None | Some("bottleneck") => true,
        Some("basic") => false,
        Some(other) => return Err(unsupported(format!("layer_type `{other}`"))),
    };
    let stride_in_first_1x1 = flag(config, "downsample_in_bottleneck");
    let conv = |name: &str, stride: usize, act: Act| -> Result<Op, HandlerError> {
        let k = kernel(shapes, &format!("{name}.convolution"))?;
        Ok(Op::conv(
            &format!("{name}.convolution"),
            Some(&format!("{name}.normalization")),
            stride,
            k / 2,
            act,
        ))
    };
    let mut ops = vec![
        conv("resnet.embedder.embedder", 2, Act::Relu)?,
        Op::MaxPool {
            kernel: 3,
            stride: 2,
            padding: 1,
            ceil: false,
        },
    ];
    for (s, &depth) in depths.iter().enumerate() {
        let stage_stride = if s > 0 || flag(config, "downsample_in_first_stage") {
            2
        } else {
            1
        };
        for l in 0..depth {
            let layer = format!("resnet.encoder.stages.{s}.layers.{l}");
            let stride = if l == 0 { stage_stride } else { 1 };
            let part = |j: usize| format!("{layer}.layer.{j}");
            let body = if bottleneck {
                let (first, middle) = if stride_in_first_1x1 {
                    (stride, 1)
                } else {
                    (1, stride)
                };
                vec![
                    conv(&part(0), first, Act::Relu)?,
                    conv(&part(1), middle, Act::Relu)?,
                    conv(&part(2), 1, Act::None)?,
                ]
            } else {
                vec![
                    conv(&part(0), stride, Act::Relu)?,
                    conv(&part(1), 1, Act::None)?,
                ]
            };
            let shortcut = format!("{layer}.shortcut");
            let shortcut = if shapes.contains_key(&format!("{shortcut}.convolution.weight")) {
                vec![conv(&shortcut, stride, Act::None)?]
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
    let classes = classes(shapes, "classifier.1", "ResNetModel")?;
    super::torchvision::pooled_classifier(&mut ops, "classifier.1");
    Ok(Graph {
        architecture: format!(
            "ResNetForImageClassification (depths {depths:?}, {})",
            if bottleneck { "bottleneck" } else { "basic" }
        ),
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

/// transformers' ConvNeXt: a patchify stem and a channels-first layer norm; stages
/// (after the first) downsampled by a layer norm and a 2×2 stride-2 convolution; each
/// layer `x + scale · pw2(gelu(pw1(norm(dwconv7x7(x)))))`; the final layer norm over the
/// pooled features, then the classifier.
fn convnext(config: &Value, shapes: &Shapes) -> Result<Graph, HandlerError> {
    require_act(config, "gelu")?;
    let depths = numbers(config, "depths")?;
    // transformers fixes these norms' eps at 1e-6; only the last one reads the config.
    const NORM_EPS: f64 = 1e-6;
    let final_eps = config
        .get("layer_norm_eps")
        .and_then(Value::as_f64)
        .unwrap_or(1e-12);
    let stem = "convnext.embeddings.patch_embeddings";
    let patch = kernel(shapes, stem)?;
    let mut ops = vec![
        Op::Conv {
            conv: stem.into(),
            norm: None,
            stride: patch,
            padding: 0,
            groups: 1,
            act: Act::None,
        },
        Op::ChannelNorm {
            norm: "convnext.embeddings.layernorm".into(),
            eps: NORM_EPS,
        },
    ];
    for (s, &depth) in depths.iter().enumerate() {
        let stage = format!("convnext.encoder.stages.{s}");
        let down = format!("{stage}.downsampling_layer");
        if shapes.contains_key(&format!("{down}.1.weight")) {
            let k = kernel(shapes, &format!("{down}.1"))?;
            ops.push(Op::ChannelNorm {
                norm: format!("{down}.0"),
                eps: NORM_EPS,
            });
            ops.push(Op::Conv {
                conv: format!("{down}.1"),
                norm: None,
                stride: k,
                padding: 0,
                groups: 1,
                act: Act::None,
            });
        }
        for l in 0..depth {
            let layer = format!("{stage}.layers.{l}");
            let dwconv = format!("{layer}.dwconv");
            let k = kernel(shapes, &dwconv)?;
            let channels = shapes
                .get(&format!("{dwconv}.weight"))
                .and_then(|s| s.first().copied())
                .unwrap_or(1);
            let scale = format!("{layer}.layer_scale_parameter");
            ops.push(Op::Residual {
                body: vec![
                    Op::Conv {
                        conv: dwconv,
                        norm: None,
                        stride: 1,
                        padding: k / 2,
                        groups: channels,
                        act: Act::None,
                    },
                    Op::ChannelNorm {
                        norm: format!("{layer}.layernorm"),
                        eps: NORM_EPS,
                    },
                    Op::Pointwise {
                        linear: format!("{layer}.pwconv1"),
                        scale: None,
                        act: Act::Gelu,
                    },
                    Op::Pointwise {
                        linear: format!("{layer}.pwconv2"),
                        scale: shapes.contains_key(&scale).then_some(scale),
                        act: Act::None,
                    },
                ],
                shortcut: Vec::new(),
                act: Act::None,
            });
        }
    }
    let classes = classes(shapes, "classifier", "ConvNextModel")?;
    ops.extend([
        Op::AdaptiveAvgPool {
            height: 1,
            width: 1,
        },
        Op::ChannelNorm {
            norm: "convnext.layernorm".into(),
            eps: final_eps,
        },
        Op::Flatten,
        Op::Linear {
            name: "classifier".into(),
            act: Act::None,
        },
    ]);
    Ok(Graph {
        architecture: format!("ConvNextForImageClassification (depths {depths:?})"),
        ops,
        classes,
        batch_norm_eps: BATCH_NORM_EPS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_graphs_do_not_run_is_refused_by_name() {
        let shapes = Shapes::new();
        for (config, names) in [
            (
                serde_json::json!({"model_type": "resnet", "hidden_act": "gelu", "depths": [1]}),
                "hidden_act `gelu`",
            ),
            (
                serde_json::json!({"model_type": "resnet", "layer_type": "preact", "depths": [1]}),
                "layer_type `preact`",
            ),
            (
                serde_json::json!({"model_type": "convnext", "hidden_act": "relu", "depths": [1]}),
                "hidden_act `relu`",
            ),
            (
                serde_json::json!({"model_type": "convnext", "num_channels": 1, "depths": [1]}),
                "num_channels 1",
            ),
        ] {
            let err = graph(&config, &shapes).expect_err("refused");
            assert!(err.to_string().contains(names), "{err}");
        }
    }
}
