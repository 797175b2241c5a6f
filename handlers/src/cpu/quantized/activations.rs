//! Activation rows quantized to 8 bits per 32-element block, as llama.cpp quantizes them
//! before its dot products (its `quantize_row_q8_0` / `q8_1`): per block the scale is
//! `max|x| / 127` (stored rounded to f16, while the values are rounded with the exact
//! scale), each value `round(x / scale)`, and for formats with a per-block minimum the
//! block's `scale × Σq` (rounded to f16, as Q8_1 carries it).
//!
//! Pure: the kernels in [`super::dot`] read the layout built here.

use super::weights::{BLOCK, LANES};

/// Rows of activations in the layout the kernels read. Per block of 32 values, besides
/// the values: eight lanes of its scale (the same value, so a vector multiplies a block's
/// eight partial sums at once), and lane 0 of eight of the integer bias and of the
/// min-term the weight format needs (the other lanes zero, so that a block's lanes still
/// sum to the right total).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizedRows {
    pub rows: usize,
    /// Blocks per row (the row's length / 32).
    pub blocks: usize,
    /// `rows × blocks × 32` values in -127..=127.
    pub values: Vec<i8>,
    /// `rows × blocks × 8`: each block's scale, in all eight lanes.
    pub scales: Vec<f32>,
    /// `rows × blocks × 8`: `-zero_point × Σvalues` in lane 0 (see [`quantize_rows`]).
    pub biases: Vec<i32>,
    /// `rows × blocks × 8`: `scale × Σvalues` rounded to f16, in lane 0 (formats with a
    /// minimum only; empty otherwise).
    pub sums: Vec<f32>,
    /// `rows × blocks × 2`: each block's scale and (formats with a minimum; else 0) its
    /// `scale × Σvalues`, side by side (the decode kernel reads both with one load).
    pub scale_sums: Vec<f32>,
}

impl QuantizedRows {
    /// Row `r`'s slices.
    pub fn row(&self, r: usize) -> RowView<'_> {
        let (n, l) = (self.blocks * BLOCK, self.blocks * LANES);
        RowView {
            values: &self.values[r * n..(r + 1) * n],
            scales: &self.scales[r * l..(r + 1) * l],
            biases: &self.biases[r * l..(r + 1) * l],
            sums: if self.sums.is_empty() {
                &[]
            } else {
                &self.sums[r * l..(r + 1) * l]
            },
            scale_sums: &self.scale_sums[r * 2 * self.blocks..(r + 1) * 2 * self.blocks],
        }
    }
}

/// One row of [`QuantizedRows`].
#[derive(Debug, Clone, Copy)]
pub struct RowView<'a> {
    pub values: &'a [i8],
    pub scales: &'a [f32],
    pub biases: &'a [i32],
    pub sums: &'a [f32],
    pub scale_sums: &'a [f32],
}

/// Quantizes `x` (`rows × cols`, row-major; `cols` a multiple of 32). The weights the
/// rows will meet store unsigned values `u` meaning `d·(u − zero_point) (+ m)`: the bias
/// `-zero_point·Σq` lets the kernels multiply the unsigned values directly and correct
/// the total in integers; `with_sums` keeps what a format with a per-block minimum `m`
/// needs (`m · scale · Σq`).
pub fn quantize_rows(
    x: &[f32],
    rows: usize,
    cols: usize,
    zero_point: i32,
    with_sums: bool,
) -> QuantizedRows {
    assert!(
        cols.is_multiple_of(BLOCK),
        "{cols} is not a multiple of {BLOCK}"
    );
    assert_eq!(x.len(), rows * cols, "{rows} × {cols} values expected");
    let blocks = cols / BLOCK;
    let mut out = QuantizedRows {
        rows,
        blocks,
        values: vec![0; rows * cols],
        scales: vec![0.0; rows * blocks * LANES],
        biases: vec![0; rows * blocks * LANES],
        sums: if with_sums {
            vec![0.0; rows * blocks * LANES]
        } else {
            Vec::new()
        },
        scale_sums: vec![0.0; rows * blocks * 2],
    };
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
        let mut total = 0i32;
        for (q, &v) in out.values[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
            // Round half away from zero, as llama.cpp's reference `roundf` (written out:
            // the baseline x86-64 build calls libm's `roundf` for `f32::round`, 5 % of a
            // prompt's time).
            let r = (v * inverse + 0.5f32.copysign(v)) as i32;
            *q = r.clamp(-127, 127) as i8;
            total += i32::from(*q);
        }
        let lanes = b * LANES..(b + 1) * LANES;
        let scale = half::f16::from_f32(d).to_f32();
        out.scales[lanes.clone()].fill(scale);
        out.scale_sums[2 * b] = scale;
        out.biases[lanes.start] = -zero_point * total;
        if with_sums {
            let sum = half::f16::from_f32(d * total as f32).to_f32();
            out.sums[lanes.start] = sum;
            out.scale_sums[2 * b + 1] = sum;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_scales_and_sums_reconstruct_the_row() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
            .collect();
        let q = quantize_rows(&x, 1, 64, 8, true);
        assert_eq!((q.rows, q.blocks), (1, 2));
        for b in 0..2 {
            let block = &x[b * 32..(b + 1) * 32];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = q.scales[b * 8];
            assert!(q.scales[b * 8..(b + 1) * 8].iter().all(|&s| s == d));
            assert!((d - amax / 127.0).abs() <= amax / 127.0 * 1e-3);
            let values = &q.values[b * 32..(b + 1) * 32];
            assert_eq!(values.iter().map(|v| v.abs()).max(), Some(127));
            for (v, x) in values.iter().zip(block) {
                assert!((f32::from(*v) * d - x).abs() <= d * 0.51, "{v} {x}");
            }
            let total: i32 = values.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(q.biases[b * 8], -8 * total);
            assert!(q.biases[b * 8 + 1..(b + 1) * 8].iter().all(|&v| v == 0));
            assert!((q.sums[b * 8] - d * total as f32).abs() <= (d * total as f32).abs() * 1e-3);
        }
    }

    #[test]
    fn a_zero_block_quantizes_to_zeros_without_dividing_by_zero() {
        let q = quantize_rows(&[0.0; 32], 1, 32, 128, false);
        assert!(q.values.iter().all(|&v| v == 0));
        assert!(q.scales.iter().all(|&s| s == 0.0));
        assert!(q.sums.is_empty());
    }
}
