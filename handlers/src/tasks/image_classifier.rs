//! The `image_classifier` handler, TorchServe's name and contract: each image decoded
//! and preprocessed before queueing (a broken image fails only its request), batches of
//! images through one vision network, a softmax, and each image's top 5 labels with
//! their probabilities, most likely first. Labels from the archive's
//! `index_to_name.json` (values `"label"` or `["wnid", "label"]`: the last element), else
//! config.json's `id2label`, else the class index. Preprocessing is TorchServe's for
//! torchvision checkpoints, a `preprocessor_config.json`'s where the model has one.
//!
//! The network is recognized from its weights ([`crate::models::vision::torchvision`]):
//! no `model.py` is run. Vision networks are small and compute-bound: the whole network
//! is resident where the plan puts it; a plan that streams part of it from disk is
//! refused with the room it needs.

use candle_core::{D, DType, Device, Tensor};

use crate::error::CandleContext;
use crate::images::{ImageLimits, Preprocess, decode_rgb};
use crate::models::vision::checkpoint::CanonicalWeights;
use crate::models::vision::graph::{Graph, Network};
use crate::models::vision::vit::{self, Vit};
use crate::models::vision::{huggingface, torchvision};
use crate::tasks::encoder_text::device_name;
use crate::weights::WeightsWatch;
use crate::weights::files::read_json;
use crate::weights::layer_stack::UnitPlacement;
use crate::{
    Handler, HandlerError, HandlerInfo, HandlerKind, ImageInput, Input, LoadOptions, ModelFiles,
    Output, Request, ScoredLabel,
};

/// Labels each image is answered with unless model-config.yaml's `handler:` section sets
/// `topk` (TorchServe's image_classifier attribute, 5).
pub const TOP_K: usize = 5;

/// `topk` from the handler settings: a whole number of at least 1, else [`TOP_K`].
fn top_k(settings: &serde_json::Map<String, serde_json::Value>) -> Result<usize, HandlerError> {
    match settings.get("topk") {
        None => Ok(TOP_K),
        Some(v) => v
            .as_u64()
            .filter(|k| *k >= 1)
            .map(|k| k as usize)
            .ok_or_else(|| {
                HandlerError::bad_file(
                    "model-config.yaml",
                    format!("handler.topk must be a whole number of at least 1, got {v}"),
                )
            }),
    }
}

/// The decoding limits, [`ImageLimits::default`] unless the handler settings set
/// `max_pixels` (width × height, checked from the header before decoding) or
/// `max_decoded_bytes` (what the decoder may allocate): whole numbers of at least 1.
fn image_limits(
    settings: &serde_json::Map<String, serde_json::Value>,
) -> Result<ImageLimits, HandlerError> {
    let read = |key: &str, default: u64| match settings.get(key) {
        None => Ok(default),
        Some(v) => v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            HandlerError::bad_file(
                "model-config.yaml",
                format!("handler.{key} must be a whole number of at least 1, got {v}"),
            )
        }),
    };
    let default = ImageLimits::default();
    Ok(ImageLimits {
        max_pixels: read("max_pixels", default.max_pixels)?,
        max_decoded_bytes: read("max_decoded_bytes", default.max_decoded_bytes)?,
    })
}

/// Images per forward pass: bounds activation memory whatever the batch size.
const MAX_IMAGES_PER_FORWARD: usize = 16;

/// The network an image classifier runs.
enum Classifier {
    /// A torchvision network, recognized from its weights.
    Graph(Network),
    /// A Hugging Face ViT, named by its config.json.
    Vit(Vit),
}

impl Classifier {
    fn forward(&self, images: &Tensor, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Classifier::Graph(network) => network.forward(images),
            Classifier::Vit(model) => model.forward(&images.to_device(device)?),
        }
    }
}

pub struct ImageClassifier {
    network: Classifier,
    /// Labels per image in an answer.
    top_k: usize,
    architecture: String,
    device: Device,
    preprocess: Preprocess,
    limits: ImageLimits,
    labels: Vec<String>,
    parameters: usize,
    watch: WeightsWatch,
}

/// Class names in index order: `index_to_name.json`, else config.json's `id2label`, else
/// the indices themselves.
fn labels(files: &dyn ModelFiles, classes: usize) -> Result<Vec<String>, HandlerError> {
    let mut labels: Vec<String> = (0..classes).map(|i| i.to_string()).collect();
    if let Some(map) =
        read_json::<serde_json::Map<String, serde_json::Value>>(files, "index_to_name.json")?
    {
        for (key, value) in map {
            let bad =
                |why: &str| HandlerError::bad_file("index_to_name.json", format!("`{key}`: {why}"));
            let index: usize = key.parse().map_err(|_| bad("keys are class indices"))?;
            let label = match &value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) => items
                    .last()
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| bad("a list value must end with the label"))?
                    .to_string(),
                _ => return Err(bad("values are a label or a list ending with one")),
            };
            if let Some(slot) = labels.get_mut(index) {
                *slot = label;
            }
        }
    } else if let Some(config) = read_json::<serde_json::Value>(files, "config.json")?
        && config.get("id2label").is_some()
    {
        let named = crate::tasks::text_classification::labels(&config)?;
        for (slot, label) in labels.iter_mut().zip(named) {
            *slot = label;
        }
    }
    Ok(labels)
}

/// The one device every unit of the plan is resident on (the CPU without a plan).
fn resident_device(options: &LoadOptions) -> Result<Device, HandlerError> {
    let Some(plan) = &options.plan else {
        return Ok(options.device.clone());
    };
    let mut device: Option<Device> = None;
    for unit in &plan.units {
        match options.placement_of(&unit.name)? {
            UnitPlacement::Streamed(_) => {
                let total: u64 = plan.units.iter().map(|u| u.bytes).sum();
                return Err(HandlerError::Unsupported(format!(
                    "image models run resident, but the plan puts `{}` on disk: the model needs \
                     {:.1} MiB on one device (raise max_memory)",
                    unit.name,
                    total as f64 / (1 << 20) as f64
                )));
            }
            UnitPlacement::Resident(d) => match &device {
                Some(first) if !first.same_device(&d) => {
                    return Err(HandlerError::Unsupported(format!(
                        "image models run on one device, but the plan splits them ({} and {})",
                        device_name(first),
                        device_name(&d)
                    )));
                }
                Some(_) => {}
                None => device = Some(d),
            },
        }
    }
    Ok(device.unwrap_or_else(|| options.device.clone()))
}

impl ImageClassifier {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        if options.dtype.is_some_and(|d| d != DType::F32) {
            return Err(HandlerError::Unsupported(format!(
                "image_classifier runs in float32; torch_dtype {:?} is not served for image models yet",
                options.dtype
            )));
        }
        let weights = CanonicalWeights::new(files.model_weights()?);
        let device = resident_device(options)?;
        let parameters = weights.source().parameters();
        let config = read_json::<serde_json::Value>(files, "config.json")?;
        let (network, architecture, labels) = match &config {
            Some(config) if vit::serves(config) => {
                let classes = crate::tasks::text_classification::labels(config)?.len();
                let model = Vit::load(config, classes, weights.source(), &device)?;
                (
                    Classifier::Vit(model),
                    "vit".to_string(),
                    labels(files, classes)?,
                )
            }
            _ => {
                let graph: Graph = match &config {
                    Some(config) if huggingface::serves(config) => {
                        huggingface::graph(config, &weights.shapes())?
                    }
                    _ => torchvision::recognize(&weights.shapes())?,
                };
                let labels = labels(files, graph.classes)?;
                let architecture = graph.architecture.clone();
                (
                    Classifier::Graph(Network::load(graph, &weights, &device)?),
                    architecture,
                    labels,
                )
            }
        };
        let preprocess = match read_json::<serde_json::Value>(files, "preprocessor_config.json")? {
            Some(config) => Preprocess::from_hf(&config)?,
            None => Preprocess::torchserve_image_classifier(),
        };
        if let Some(changed) = weights.source().changed() {
            return Err(changed);
        }
        Ok(Self {
            network,
            top_k: top_k(&options.handler_config)?,
            architecture,
            device,
            preprocess,
            limits: image_limits(&options.handler_config)?,
            labels,
            parameters,
            watch: weights.source().watch(),
        })
    }

    /// Class probabilities of each image, `[images][classes]`.
    pub fn probabilities(&self, images: &[&ImageInput]) -> Result<Vec<Vec<f32>>, HandlerError> {
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let mut rows = Vec::with_capacity(images.len());
            // Images of one size share a forward pass (they all do once cropped).
            let mut start = 0;
            while start < images.len() {
                let (w, h) = (images[start].width, images[start].height);
                let end = (start..images.len())
                    .take(MAX_IMAGES_PER_FORWARD)
                    .take_while(|&i| (images[i].width, images[i].height) == (w, h))
                    .last()
                    .map_or(start + 1, |i| i + 1);
                let pixels: Vec<f32> = images[start..end]
                    .iter()
                    .flat_map(|i| i.pixels.iter().copied())
                    .collect();
                let batch = Tensor::from_vec(pixels, (end - start, 3, h, w), &Device::Cpu)?;
                let logits = self.network.forward(&batch, &self.device)?;
                let probabilities =
                    candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
                rows.extend(probabilities.to_device(&Device::Cpu)?.to_vec2::<f32>()?);
                start = end;
            }
            Ok(rows)
        };
        forward().context(|| format!("image forward pass failed (batch of {})", images.len()))
    }

    /// The top labels of one image's probabilities, most likely first.
    fn top(&self, probabilities: &[f32]) -> Vec<ScoredLabel> {
        let mut order: Vec<usize> = (0..probabilities.len()).collect();
        order.sort_by(|a, b| {
            probabilities[*b]
                .total_cmp(&probabilities[*a])
                .then(a.cmp(b))
        });
        order
            .into_iter()
            .take(self.top_k)
            .map(|i| ScoredLabel {
                label: self.labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
                probability: probabilities[i],
            })
            .collect()
    }
}

impl Handler for ImageClassifier {
    fn weights_changed(&self) -> Option<HandlerError> {
        self.watch.changed()
    }

    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        let Request::Images(images) = request else {
            return Err(HandlerError::Input(
                "image_classifier takes images (the image as the body, a multipart field `data`, \
                 or base64 in JSON)"
                    .into(),
            ));
        };
        if images.is_empty() {
            return Err(HandlerError::Input("the request has no image".into()));
        }
        let inputs = images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let rgb = decode_rgb(bytes, &self.limits).map_err(|e| match e {
                    HandlerError::Input(why) if images.len() > 1 => {
                        HandlerError::Input(format!("image {i}: {why}"))
                    }
                    other => other,
                })?;
                let (width, height) = self.preprocess.output_size(rgb.width, rgb.height);
                Ok(ImageInput {
                    width,
                    height,
                    pixels: self.preprocess.apply(&rgb),
                })
            })
            .collect::<Result<Vec<_>, HandlerError>>()?;
        Ok(Input::Images(inputs))
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        let mut images = Vec::new();
        for input in batch {
            match input {
                Input::Images(inputs) => images.extend(inputs.iter()),
                _ => {
                    return Err(HandlerError::Input(
                        "image_classifier runs images only".into(),
                    ));
                }
            }
        }
        let probabilities = self.probabilities(&images)?;
        let mut rows = probabilities.iter();
        Ok(batch
            .iter()
            .map(|input| {
                let count = match input {
                    Input::Images(inputs) => inputs.len(),
                    _ => 0,
                };
                Ok(Output::Labels(
                    rows.by_ref().take(count).map(|p| self.top(p)).collect(),
                ))
            })
            .collect())
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            handler: HandlerKind::ImageClassifier,
            architecture: Some(self.architecture.clone()),
            dtype: Some("float32".into()),
            device: device_name(&self.device),
            max_input_tokens: None,
            streamed_units: None,
            parameters: Some(self.parameters),
            weights: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::*;
    use crate::testing::decoder_fixtures::{rebuild, write_weights};
    use crate::weights::files::{ConvertedWeights, FolderFiles};

    /// Each fixture family and the architecture it must be recognized as.
    const FAMILIES: [(&str, &str); 16] = [
        ("densenet", "densenet (growth 8, blocks [2, 3])"),
        ("resnet", "resnet (blocks [1, 1, 1, 1])"),
        ("resnext", "resnet (blocks [1, 1, 1, 1], bottleneck)"),
        ("vgg_bn", "vgg9_bn"),
        ("vgg", "vgg10"),
        ("alexnet", "alexnet"),
        ("squeezenet1_0", "squeezenet1_0"),
        ("squeezenet1_1", "squeezenet1_1"),
        ("mobilenet_v2", "mobilenet_v2"),
        ("mobilenet_v3_large", "mobilenet_v3_large"),
        ("mobilenet_v3_small", "mobilenet_v3_small"),
        (
            "efficientnet",
            "efficientnet (blocks [1, 1, 1, 2, 2, 2, 1])",
        ),
        ("vit", "vit"),
        (
            "hf_resnet",
            "ResNetForImageClassification (depths [1, 2, 1], bottleneck)",
        ),
        (
            "hf_resnet_basic",
            "ResNetForImageClassification (depths [2, 1], basic)",
        ),
        (
            "convnext",
            "ConvNextForImageClassification (depths [1, 2, 1])",
        ),
    ];

    /// Families preprocessed by a Hugging Face processor resizing bicubic with both sides
    /// shrinking (see the bound in `every_image_family_matches_its_references_probabilities`).
    const PILLOW_BICUBIC: [&str; 3] = ["hf_resnet", "hf_resnet_basic", "convnext"];

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
    }

    /// The fixture images by name.
    fn inputs() -> Vec<(String, Vec<u8>)> {
        let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures().join("inputs"))
            .expect("inputs")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        inputs.sort();
        inputs
    }

    /// The DenseNet fixture as the quickstart ships it: a `.pth` with the legacy names,
    /// converted as the server converts it, labels read from the archive beside it.
    fn densenet_from_pth(dir: &Path) -> ConvertedWeights {
        let archive = dir.join("archive");
        std::fs::create_dir_all(&archive).expect("mkdir");
        let tensors = rebuild(&fixtures().join("densenet")).expect("recipe");
        assert!(
            tensors
                .iter()
                .any(|(n, _)| n.contains("denselayer1.norm.1.weight"))
        );
        crate::testing::pth::write_state_dict(&tensors, &archive.join("densenet.pth"))
            .expect("pth");
        let files = FolderFiles::new(&archive);
        let converted =
            crate::weights::pickle::materialize(&files, "densenet.pth", &dir.join("offload"))
                .expect("convert");
        ConvertedWeights {
            weights: FolderFiles::new(converted),
            rest: Arc::new(files),
        }
    }

    /// Every family through decoding, its preprocessing and the network, all images
    /// in one batch, against torchvision's (transformers' for ViT) probabilities.
    #[test]
    fn every_image_family_matches_its_references_probabilities() {
        let inputs = inputs();
        for (family, architecture) in FAMILIES {
            let dir = tempfile::tempdir().expect("tempdir");
            let handler = if family == "densenet" {
                ImageClassifier::load(&densenet_from_pth(dir.path()), &LoadOptions::default())
            } else {
                write_weights(&fixtures().join(family), dir.path()).expect("weights");
                // A Hugging Face model's config.json and preprocessor_config.json.
                for file in ["config.json", "preprocessor_config.json"] {
                    let from = fixtures().join(family).join(file);
                    if from.is_file() {
                        std::fs::copy(&from, dir.path().join(file)).expect("copy");
                    }
                }
                ImageClassifier::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            }
            .unwrap_or_else(|e| panic!("{family}: {e}"));
            assert_eq!(handler.info().architecture.as_deref(), Some(architecture));
            let reference: serde_json::Value = serde_json::from_slice(
                &std::fs::read(fixtures().join(family).join("reference.json")).expect("reference"),
            )
            .expect("json");
            let prepared: Vec<ImageInput> = inputs
                .iter()
                .flat_map(|(_, bytes)| {
                    match handler.prepare(Request::Images(vec![bytes.clone()])) {
                        Ok(Input::Images(images)) => images,
                        other => panic!("{family}: {other:?}"),
                    }
                })
                .collect();
            let got = handler
                .probabilities(&prepared.iter().collect::<Vec<_>>())
                .expect("forward");
            let (mut lossless, mut jpeg) = (0f32, 0f32);
            for ((name, _), got) in inputs.iter().zip(&got) {
                let want: Vec<f32> =
                    serde_json::from_value(reference["probabilities"][name].clone())
                        .expect("probabilities");
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                // Every format decodes to Pillow's pixels (JPEG by libjpeg-turbo's decoder, as
                // Pillow's) and resizes to its bytes: what differs is float rounding.
                // But Pillow 13 resizes some shapes vertical pass first (its rule is not
                // published; 117x251 -> 73x156 bicubic is one), where Pillow 12 and this
                // resampler go horizontal first: 642 of the 34,164 bytes then differ by one
                // level. tall.png under the Hugging Face processors' bicubic 73-pixel edge
                // is such a shape; the bar, 1e-3, holds there.
                let pillow_13_order = name == "tall.png" && PILLOW_BICUBIC.contains(&family);
                let bound = if pillow_13_order { 1e-3 } else { 1e-4 };
                assert!(
                    worst <= bound,
                    "{family} {name}: {got:?} vs torchvision {want:?}"
                );
                let slot = if name.ends_with(".jpg") {
                    &mut jpeg
                } else {
                    &mut lossless
                };
                *slot = slot.max(worst);
            }
            eprintln!(
                "{family}: largest |p - torchvision's| {lossless:.1e} (lossless inputs), {jpeg:.1e} (JPEG)"
            );
        }
    }

    /// Labels from index_to_name.json (a label or `[wnid, label]`), most likely first,
    /// five of them; one answer per image of each request in a batch.
    #[test]
    fn answers_are_the_top_five_labels_of_each_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_weights(&fixtures().join("squeezenet1_1"), dir.path()).expect("weights");
        let names: serde_json::Map<String, serde_json::Value> = (0..10)
            .map(|i| {
                let label = if i % 2 == 0 {
                    serde_json::json!([format!("n0{i}"), format!("class {i}")])
                } else {
                    serde_json::json!(format!("class {i}"))
                };
                (i.to_string(), label)
            })
            .collect();
        std::fs::write(
            dir.path().join("index_to_name.json"),
            serde_json::to_vec(&names).expect("json"),
        )
        .expect("write");
        let handler = ImageClassifier::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .expect("load");
        let inputs = inputs();
        let batch = vec![
            handler
                .prepare(Request::Images(vec![
                    inputs[0].1.clone(),
                    inputs[1].1.clone(),
                ]))
                .expect("two"),
            handler
                .prepare(Request::Images(vec![inputs[2].1.clone()]))
                .expect("one"),
        ];
        let answers = handler.run(&batch).expect("run");
        let counts: Vec<usize> = answers
            .iter()
            .map(|a| match a {
                Ok(Output::Labels(per_image)) => per_image.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counts, [2, 1]);
        let Ok(Output::Labels(per_image)) = &answers[1] else {
            unreachable!()
        };
        let top = &per_image[0];
        assert_eq!(top.len(), TOP_K);
        assert!(
            top.windows(2).all(|w| w[0].probability >= w[1].probability),
            "{top:?}"
        );
        assert!(top.iter().all(|l| l.label.starts_with("class ")), "{top:?}");
        // model-config.yaml's `handler: {topk: 3}` answers three.
        let three = ImageClassifier::load(
            &FolderFiles::new(dir.path()),
            &LoadOptions {
                handler_config: serde_json::json!({"topk": 3})
                    .as_object()
                    .cloned()
                    .expect("map"),
                ..LoadOptions::default()
            },
        )
        .expect("load");
        let input = three
            .prepare(Request::Images(vec![inputs[2].1.clone()]))
            .expect("p");
        let Ok(Output::Labels(short)) = three.run(&[input]).expect("run").remove(0) else {
            unreachable!()
        };
        assert_eq!(short[0], top[..3]);
        let zero = LoadOptions {
            handler_config: serde_json::json!({"topk": 0})
                .as_object()
                .cloned()
                .expect("map"),
            ..LoadOptions::default()
        };
        assert!(ImageClassifier::load(&FolderFiles::new(dir.path()), &zero).is_err());
        // `max_pixels` under `handler:` tightens the decoding limit: the 160x120 image
        // (19,200 pixels) is refused by name at 10,000, a bad value refuses the model.
        let settings = |json: serde_json::Value| LoadOptions {
            handler_config: json.as_object().cloned().expect("map"),
            ..LoadOptions::default()
        };
        let small = ImageClassifier::load(
            &FolderFiles::new(dir.path()),
            &settings(serde_json::json!({"max_pixels": 10_000})),
        )
        .expect("load");
        let (name, bytes) = inputs
            .iter()
            .find(|(n, _)| n == "small.bmp")
            .expect("small.bmp");
        let err = small
            .prepare(Request::Images(vec![bytes.clone()]))
            .expect_err("past the limit");
        assert!(err.to_string().contains("10000"), "{name}: {err}");
        assert!(
            handler
                .prepare(Request::Images(vec![bytes.clone()]))
                .is_ok()
        );
        for bad in [
            serde_json::json!({"max_pixels": 0}),
            serde_json::json!({"max_decoded_bytes": "1MB"}),
        ] {
            assert!(ImageClassifier::load(&FolderFiles::new(dir.path()), &settings(bad)).is_err());
        }
        // The same image alone gives the same answer as in a batch.
        let alone = handler
            .run(&[handler
                .prepare(Request::Images(vec![inputs[2].1.clone()]))
                .expect("p")])
            .expect("run");
        assert_eq!(
            alone[0].as_ref().expect("ok"),
            answers[1].as_ref().expect("ok")
        );
    }

    #[test]
    fn a_broken_image_fails_its_request_with_a_client_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_weights(&fixtures().join("squeezenet1_1"), dir.path()).expect("weights");
        let handler = ImageClassifier::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .expect("load");
        let good = inputs()[0].1.clone();
        let err = handler
            .prepare(Request::Images(vec![
                good,
                b"PK\x03\x04not an image".to_vec(),
            ]))
            .expect_err("broken");
        assert!(matches!(err, HandlerError::Input(_)), "{err:?}");
        assert!(err.to_string().starts_with("image 1:"), "{err}");
        assert!(
            handler
                .prepare(Request::Texts(vec!["a cat".into()]))
                .is_err()
        );
    }

    /// Image models run resident: a plan that puts one of their units on disk is refused,
    /// naming the unit and the room the model needs; an all-CPU plan loads.
    #[test]
    fn a_plan_with_units_on_disk_is_refused_by_name() {
        use spillway_placement::{Device as Placed, PlacedUnit, Plan, UnitKind};
        let dir = tempfile::tempdir().expect("tempdir");
        write_weights(&fixtures().join("squeezenet1_1"), dir.path()).expect("weights");
        let plan = |second: Placed| Plan {
            strategy: "auto".into(),
            units: vec![
                PlacedUnit {
                    name: "features".into(),
                    bytes: 3 << 20,
                    device: Placed::CPU,
                    kind: UnitKind::Post,
                    tied: vec![],
                },
                PlacedUnit {
                    name: "classifier".into(),
                    bytes: 1 << 20,
                    device: second,
                    kind: UnitKind::Post,
                    tied: vec![],
                },
            ],
            devices: vec![],
            stream_device: Placed::CPU,
            streamed_bytes_per_forward: 0,
            notes: vec![],
        };
        let options = |second| LoadOptions {
            plan: Some(plan(second)),
            ..LoadOptions::default()
        };
        let err = ImageClassifier::load(&FolderFiles::new(dir.path()), &options(Placed::DISK))
            .err()
            .expect("refused");
        let message = err.to_string();
        assert!(
            message.contains("`classifier` on disk") && message.contains("4.0 MiB"),
            "{message}"
        );
        assert!(
            ImageClassifier::load(&FolderFiles::new(dir.path()), &options(Placed::CPU)).is_ok()
        );
    }

    /// Weights that are no torchvision classifier are refused, naming what they hold.
    #[test]
    fn unrecognized_weights_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = candle_core::Tensor::zeros((4, 4), DType::F32, &Device::Cpu).expect("t");
        let tensors: std::collections::HashMap<String, candle_core::Tensor> =
            [("encoder.block.0.weight".to_string(), t)].into();
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))
            .expect("save");
        let err = ImageClassifier::load(&FolderFiles::new(dir.path()), &LoadOptions::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("encoder.block.0.weight"), "{err}");
    }
}
