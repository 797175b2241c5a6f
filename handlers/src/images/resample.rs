//! Resizing as Pillow resizes 8-bit images (`Image.resize`, which torchvision's
//! `Resize` calls on PIL images): a separable convolution, horizontal pass first, with
//! the filter widened by the scale when shrinking (antialiasing), coefficients
//! normalized per output pixel and rounded to fixed point with 22 fractional bits, and
//! the horizontal pass rounded to 8 bits before the vertical one reads it. Following
//! those steps gives Pillow's bytes exactly, so probabilities computed from them agree
//! with torchvision's preprocessing. Pure: no I/O, no tensors.

/// Pillow's resampling filters (`Image.Resampling`): a kernel and its support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `BILINEAR` (2): a triangle of support 1.
    Bilinear,
    /// `BICUBIC` (3): Keys' cubic with a = -0.5, support 2.
    Bicubic,
    /// `LANCZOS` (1): sinc windowed by sinc, support 3.
    Lanczos,
    /// `BOX` (4): support 0.5.
    Box,
    /// `HAMMING` (5): sinc windowed by Hamming, support 1.
    Hamming,
}

impl Filter {
    /// The filter Pillow numbers `code` (Hugging Face's `resample` in
    /// preprocessor_config.json); `None` for NEAREST (0) and unknown codes.
    pub fn from_pil_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            // Pillow's box is (-0.5, 0.5]: a tap exactly half a pixel left counts.
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fractional bits of Pillow's 8-bit coefficients (`PRECISION_BITS`, 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// One output pixel's taps: the first input pixel and its fixed-point weights.
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for `in_size` pixels onto
/// `out_size` (the whole input: box 0..in_size).
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero; negative starts clamp to 0 either way.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let fixed = w * f64::from(1u32 << PRECISION_BITS);
                    if fixed < 0.0 {
                        (fixed - 0.5) as i32
                    } else {
                        (fixed + 0.5) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: a fixed-point sum (rounding bias included) back to a byte.
fn clip8(sum: i64) -> u8 {
    if sum >= 255 << PRECISION_BITS {
        255
    } else if sum <= 0 {
        0
    } else {
        (sum >> PRECISION_BITS) as u8
    }
}

/// Resizes interleaved 8-bit pixels (`channels` per pixel, `width` × `height`) to
/// `out_width` × `out_height` as Pillow's `Image.resize` does.
pub fn resize(
    pixels: &[u8],
    (width, height): (usize, usize),
    channels: usize,
    (out_width, out_height): (usize, usize),
    filter: Filter,
) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), width * height * channels);
    let need_horizontal = out_width != width;
    let need_vertical = out_height != height;
    let vertical = taps(height, out_height, filter);
    let bias = 1i64 << (PRECISION_BITS - 1);
    // The rows the vertical pass reads: the horizontal pass makes only those.
    let (first_row, last_row) = match (vertical.first(), vertical.last()) {
        (Some(first), Some(last)) => (first.first, last.first + last.weights.len()),
        _ => (0, 0),
    };
    let (rows, row_offset, mut current) = if need_horizontal {
        let horizontal = taps(width, out_width, filter);
        let mut out = vec![0u8; (last_row - first_row) * out_width * channels];
        for (y, row) in out.chunks_exact_mut(out_width * channels).enumerate() {
            let source = &pixels[(y + first_row) * width * channels..][..width * channels];
            for (x, tap) in horizontal.iter().enumerate() {
                for c in 0..channels {
                    let mut sum = bias;
                    for (k, w) in tap.weights.iter().enumerate() {
                        sum += i64::from(source[(tap.first + k) * channels + c]) * i64::from(*w);
                    }
                    row[x * channels + c] = clip8(sum);
                }
            }
        }
        (last_row - first_row, first_row, out)
    } else {
        (height, 0, pixels.to_vec())
    };
    let current_width = if need_horizontal { out_width } else { width };
    if need_vertical {
        let stride = current_width * channels;
        let mut out = vec![0u8; out_height * stride];
        for (y, tap) in vertical.iter().enumerate() {
            let first = tap.first - row_offset;
            debug_assert!(first + tap.weights.len() <= rows);
            for i in 0..stride {
                let mut sum = bias;
                for (k, w) in tap.weights.iter().enumerate() {
                    sum += i64::from(current[(first + k) * stride + i]) * i64::from(*w);
                }
                out[y * stride + i] = clip8(sum);
            }
        }
        current = out;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow 13's bytes for a 5×1 gray ramp resized to 2×1 and 3×1 with BILINEAR
    /// (`Image.frombytes("L", (5, 1), bytes([0, 50, 100, 150, 250])).resize(...)`),
    /// and a 2×1 → 5×1 upscale.
    #[test]
    fn matches_pillows_bytes_on_small_ramps() {
        let ramp = [0u8, 50, 100, 150, 250];
        assert_eq!(
            resize(&ramp, (5, 1), 1, (2, 1), Filter::Bilinear),
            [50, 166]
        );
        assert_eq!(
            resize(&ramp, (5, 1), 1, (3, 1), Filter::Bilinear),
            [21, 100, 207]
        );
        assert_eq!(
            resize(&[0, 200], (2, 1), 1, (5, 1), Filter::Bilinear),
            [0, 20, 100, 180, 200]
        );
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Every filter, shrinking and enlarging, each axis alone: byte for byte what
    /// Pillow made of a random RGB image (scripts/make-image-fixtures.py).
    #[test]
    fn every_filter_matches_pillow_byte_for_byte() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/images/resample.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
        let source = hex(fixture["source"].as_str().expect("source"));
        let cases = fixture["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 20);
        for case in cases {
            let name = case["filter"].as_str().expect("filter");
            let filter = match name {
                "bilinear" => Filter::Bilinear,
                "bicubic" => Filter::Bicubic,
                "lanczos" => Filter::Lanczos,
                "box" => Filter::Box,
                "hamming" => Filter::Hamming,
                other => panic!("filter {other}"),
            };
            let size = (
                case["size"][0].as_u64().expect("w") as usize,
                case["size"][1].as_u64().expect("h") as usize,
            );
            let want = hex(case["bytes"].as_str().expect("bytes"));
            let got = resize(&source, (29, 17), 3, size, filter);
            let off = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                off,
                0,
                "{name} to {size:?}: {off} of {} bytes differ",
                want.len()
            );
        }
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point_and_stay_inside_the_input() {
        for filter in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
            Filter::Hamming,
        ] {
            for (from, to) in [(500, 224), (224, 500), (7, 3), (3, 7), (1, 1), (640, 256)] {
                for tap in taps(from, to, filter) {
                    assert!(
                        tap.first + tap.weights.len() <= from,
                        "{filter:?} {from}->{to}"
                    );
                    let sum: i64 = tap.weights.iter().map(|w| i64::from(*w)).sum();
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= tap.weights.len() as i64,
                        "{filter:?} {from}->{to}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let flat = vec![77u8; 9 * 5 * 3];
        for size in [(4, 2), (20, 11), (9, 5), (9, 2), (3, 5)] {
            let out = resize(&flat, (9, 5), 3, size, Filter::Bicubic);
            assert_eq!(out.len(), size.0 * size.1 * 3);
            assert!(out.iter().all(|&v| v == 77), "{size:?}: {out:?}");
        }
    }
}
