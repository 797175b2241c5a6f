//! An image's preprocessing, as data: resize, center crop, rescale and normalize into
//! the `[3, height, width]` floats a vision model takes. Two sources: TorchServe's
//! `image_classifier` transform for torchvision models (`Resize(256)`, `CenterCrop(224)`,
//! `ToTensor`, ImageNet's `Normalize`), and a Hugging Face `preprocessor_config.json`.
//! Each step rounds where its reference does (Pillow's 8-bit resize, torchvision's
//! round-half-even crop offsets, f32 arithmetic in torch's order). Pure.

use crate::HandlerError;
use crate::images::decode::Rgb;
use crate::images::resample::{Filter, resize};

/// ImageNet's channel means and deviations (torchvision's and most image processors').
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How the image is first resized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resize {
    /// The shorter side to this many pixels, the longer in proportion (truncated), as
    /// torchvision's `Resize(int)` and Hugging Face's `shortest_edge`.
    ShorterSide(usize),
    /// To exactly this size, ignoring the aspect ratio.
    Exact { width: usize, height: usize },
}

/// How the resized image is cropped to the model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRounding {
    /// torchvision's `center_crop`: offsets `round((size - crop) / 2)`, half to even.
    HalfEven,
    /// Hugging Face's `center_crop`: offsets `(size - crop) // 2`.
    Floor,
}

/// A model's preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub resize: Option<Resize>,
    pub filter: Filter,
    /// (width, height) of the center crop; the input's size.
    pub crop: Option<(usize, usize)>,
    pub crop_rounding: CropRounding,
    /// Multiplies the bytes (1/255: torchvision's `ToTensor`).
    pub rescale: Option<f32>,
    /// `(x - mean) / std` per channel.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// Whether `rescale` divides by 255 (torchvision: `div(255)`) rather than multiplies
    /// (Hugging Face: `* rescale_factor`): the two round differently in f32.
    pub divide: bool,
}

impl Preprocess {
    /// TorchServe's `image_classifier` transform: `Resize(256)`, `CenterCrop(224)`,
    /// `ToTensor()`, `Normalize(ImageNet)`.
    pub fn torchserve_image_classifier() -> Self {
        Self {
            resize: Some(Resize::ShorterSide(256)),
            filter: Filter::Bilinear,
            crop: Some((224, 224)),
            crop_rounding: CropRounding::HalfEven,
            rescale: Some(255.0),
            normalize: Some((IMAGENET_MEAN, IMAGENET_STD)),
            divide: true,
        }
    }

    /// A Hugging Face image processor's steps from its `preprocessor_config.json`
    /// (ViT's, ConvNeXT's with `crop_pct`, BiT/CLIP's `shortest_edge` + `crop_size`).
    pub fn from_hf(config: &serde_json::Value) -> Result<Self, HandlerError> {
        let bad = |reason: String| HandlerError::bad_file("preprocessor_config.json", reason);
        let flag = |key: &str| config.get(key).and_then(|v| v.as_bool()).unwrap_or(true);
        let number = |v: &serde_json::Value, key: &str| v.get(key).and_then(|v| v.as_u64());
        let size = config.get("size");
        let filter = match config.get("resample").and_then(|v| v.as_u64()) {
            None => Filter::Bilinear,
            Some(code) => Filter::from_pil_code(code).ok_or_else(|| {
                bad(format!(
                    "resample {code} (NEAREST or unknown) is not served"
                ))
            })?,
        };
        let crop_size = config.get("crop_size").and_then(|c| match c {
            serde_json::Value::Number(n) => n.as_u64().map(|n| (n as usize, n as usize)),
            other => Some((
                number(other, "width")? as usize,
                number(other, "height")? as usize,
            )),
        });
        let mut crop = if config.get("do_center_crop").and_then(|v| v.as_bool()) == Some(true) {
            crop_size
        } else {
            None
        };
        let resize = match size {
            _ if !flag("do_resize") => None,
            Some(serde_json::Value::Number(n)) => {
                let n = n.as_u64().unwrap_or(224) as usize;
                Some(Resize::Exact {
                    width: n,
                    height: n,
                })
            }
            Some(size) => match (
                number(size, "shortest_edge"),
                number(size, "height"),
                number(size, "width"),
            ) {
                (Some(edge), _, _) => {
                    let edge = edge as usize;
                    match config.get("crop_pct").and_then(|v| v.as_f64()) {
                        // ConvNeXT's: below 384, resize to edge / crop_pct and crop to edge.
                        Some(pct) if edge < 384 => {
                            crop = Some((edge, edge));
                            Some(Resize::ShorterSide((edge as f64 / pct) as usize))
                        }
                        Some(_) => Some(Resize::Exact {
                            width: edge,
                            height: edge,
                        }),
                        None => Some(Resize::ShorterSide(edge)),
                    }
                }
                (None, Some(height), Some(width)) => Some(Resize::Exact {
                    width: width as usize,
                    height: height as usize,
                }),
                _ => return Err(bad(format!("size {size} is not a shape Spillway reads"))),
            },
            None => return Err(bad("do_resize is set but there is no size".into())),
        };
        let channels = |key: &str| -> Result<Option<[f32; 3]>, HandlerError> {
            match config.get(key) {
                None => Ok(None),
                Some(v) => serde_json::from_value::<[f32; 3]>(v.clone())
                    .map(Some)
                    .map_err(|e| bad(format!("{key}: {e}"))),
            }
        };
        let normalize = if flag("do_normalize") {
            Some((
                channels("image_mean")?.unwrap_or(IMAGENET_MEAN),
                channels("image_std")?.unwrap_or(IMAGENET_STD),
            ))
        } else {
            None
        };
        let rescale = flag("do_rescale").then(|| {
            config
                .get("rescale_factor")
                .and_then(|v| v.as_f64())
                .map_or(1.0 / 255.0, |f| f as f32)
        });
        Ok(Self {
            resize,
            filter,
            crop,
            crop_rounding: CropRounding::Floor,
            rescale,
            normalize,
            divide: false,
        })
    }

    /// The (width, height) of what [`Self::apply`] makes from a `width` × `height` image.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        self.crop
            .unwrap_or_else(|| self.resized_size(width, height))
    }

    fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (width, height),
            Some(Resize::Exact { width, height }) => (width, height),
            Some(Resize::ShorterSide(short)) => {
                if width <= height {
                    (
                        short,
                        (short as f64 * height as f64 / width as f64) as usize,
                    )
                } else {
                    (
                        (short as f64 * width as f64 / height as f64) as usize,
                        short,
                    )
                }
            }
        }
    }

    /// The model input for `image`: `[3, height, width]` floats, channel-major.
    pub fn apply(&self, image: &Rgb) -> Vec<f32> {
        let (width, height) = self.resized_size(image.width, image.height);
        let resized = if (width, height) == (image.width, image.height) {
            std::borrow::Cow::Borrowed(&image.pixels)
        } else {
            std::borrow::Cow::Owned(resize(
                &image.pixels,
                (image.width, image.height),
                3,
                (width, height),
                self.filter,
            ))
        };
        let (out_w, out_h) = self.crop.unwrap_or((width, height));
        let offset = |size: usize, crop: usize| -> isize {
            let diff = size as isize - crop as isize;
            match self.crop_rounding {
                // Python's round() of a half: to even. Negative (padding) offsets too.
                CropRounding::HalfEven => {
                    let half = diff as f64 / 2.0;
                    let down = half.floor();
                    let rounded = if half - down == 0.5 && (down as i64) % 2 == 0 {
                        down
                    } else {
                        half.round()
                    };
                    rounded as isize
                }
                CropRounding::Floor => diff.div_euclid(2),
            }
        };
        let (left, top) = (offset(width, out_w), offset(height, out_h));
        let mut out = vec![0f32; 3 * out_w * out_h];
        for c in 0..3 {
            let plane = &mut out[c * out_w * out_h..][..out_w * out_h];
            for y in 0..out_h {
                let sy = y as isize + top;
                for x in 0..out_w {
                    let sx = x as isize + left;
                    let inside =
                        (0..height as isize).contains(&sy) && (0..width as isize).contains(&sx);
                    let byte = if inside {
                        resized[(sy as usize * width + sx as usize) * 3 + c]
                    } else {
                        0
                    };
                    let mut v = f32::from(byte);
                    if let Some(scale) = self.rescale {
                        v = if self.divide { v / scale } else { v * scale };
                    }
                    if let Some((mean, std)) = &self.normalize {
                        v = (v - mean[c]) / std[c];
                    }
                    plane[y * out_w + x] = v;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_resizes_the_shorter_side_and_crops_the_center() {
        let p = Preprocess::torchserve_image_classifier();
        assert_eq!(p.resized_size(640, 480), (341, 256));
        assert_eq!(p.resized_size(480, 640), (256, 341));
        assert_eq!(p.output_size(640, 480), (224, 224));
        // A gradient along x: the crop starts round((341 - 224) / 2) = round(58.5) = 58
        // columns in (Python rounds half to even).
        let width = 341;
        let pixels: Vec<u8> = (0..256)
            .flat_map(|_| (0..width).flat_map(|x| [(x % 256) as u8; 3]))
            .collect();
        let image = Rgb {
            width,
            height: 256,
            pixels,
        };
        let out = p.apply(&image);
        let first = (58.0f32 / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0];
        assert_eq!(out[0], first);
        assert_eq!(out.len(), 3 * 224 * 224);
    }

    /// TorchServe's transform of each fixture image against torchvision's
    /// (scripts/make-image-fixtures.py): per-channel sums and 256 sampled values. The
    /// lossless formats decode to Pillow's pixels, so the floats agree to rounding; a
    /// JPEG goes through another decoder than Pillow's libjpeg and may differ by a level.
    #[test]
    fn the_torchserve_transform_matches_torchvision_on_every_format() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images");
        let fixture: serde_json::Value = serde_json::from_slice(
            &std::fs::read(format!("{root}/preprocess.json")).expect("fixture"),
        )
        .expect("json");
        let positions: Vec<usize> =
            serde_json::from_value(fixture["positions"].clone()).expect("positions");
        let images = fixture["images"].as_object().expect("images");
        assert_eq!(images.len(), 8);
        let p = Preprocess::torchserve_image_classifier();
        for (name, want) in images {
            let bytes = std::fs::read(format!("{root}/inputs/{name}")).expect("image");
            let rgb = crate::images::decode_rgb(&bytes, &crate::images::ImageLimits::default())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = p.apply(&rgb);
            assert_eq!(got.len(), 3 * 224 * 224, "{name}");
            let values: Vec<f32> = serde_json::from_value(want["values"].clone()).expect("values");
            let worst = positions
                .iter()
                .zip(&values)
                .map(|(i, v)| (got[*i] - v).abs())
                .fold(0f32, f32::max);
            // One level of the 8-bit image is 1/255/0.225 = 0.0174 after normalizing.
            let bound = if name.ends_with(".jpg") {
                0.0175 * 3.0
            } else {
                1e-6
            };
            assert!(
                worst <= bound,
                "{name}: sampled values differ by up to {worst}"
            );
            let sums: Vec<f64> =
                serde_json::from_value(want["channel_sums"].clone()).expect("sums");
            for (c, sum) in sums.iter().enumerate() {
                let ours: f64 = got[c * 224 * 224..][..224 * 224]
                    .iter()
                    .map(|v| f64::from(*v))
                    .sum();
                let bound = if name.ends_with(".jpg") {
                    224.0 * 224.0 * 0.0175 * 0.5
                } else {
                    0.05
                };
                assert!(
                    (ours - sum).abs() <= bound,
                    "{name} channel {c}: sum {ours} vs {sum}"
                );
            }
        }
    }

    #[test]
    fn hugging_face_processors_read_their_sizes() {
        let vit = serde_json::json!({"do_resize": true, "size": {"height": 32, "width": 32},
            "resample": 2, "do_normalize": true, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098});
        let p = Preprocess::from_hf(&vit).expect("vit");
        assert_eq!(
            p.resize,
            Some(Resize::Exact {
                width: 32,
                height: 32
            })
        );
        assert_eq!(p.output_size(100, 50), (32, 32));
        let convnext = serde_json::json!({"size": {"shortest_edge": 224}, "crop_pct": 0.875,
            "resample": 3});
        let p = Preprocess::from_hf(&convnext).expect("convnext");
        assert_eq!(p.resize, Some(Resize::ShorterSide(256)));
        assert_eq!((p.crop, p.filter), (Some((224, 224)), Filter::Bicubic));
        assert!(Preprocess::from_hf(&serde_json::json!({"size": 3, "resample": 0})).is_err());
    }
}
