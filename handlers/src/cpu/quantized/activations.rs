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
    /// `rows × blocks × 8`: `scale × Σvalues` (rounded to f16 unless `exact`), in lane 0
    /// (formats with a minimum only; empty otherwise).
    pub sums: Vec<f32>,
    /// `rows × blocks × 2`: each block's scale and (formats with a minimum; else 0) its
    /// `scale × Σvalues`, side by side (the decode kernel reads both with one load).
    pub scale_sums: Vec<f32>,
    /// Whether scales and sums are kept in f32 ([`quantize_rows_as`]) rather than
    /// rounded to f16.
    pub exact: bool,
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
    quantize_rows_as(x, rows, cols, zero_point, with_sums, false)
}

/// [`quantize_rows`], with each block's scale and `scale × Σq` kept in f32 where `exact`
/// (llama.cpp's Q8_K keeps them so for the k-quants, whose minimum terms are large: an
/// f16 sum lost ~0.7 % of a Q4_K product).
pub fn quantize_rows_as(
    x: &[f32],
    rows: usize,
    cols: usize,
    zero_point: i32,
    with_sums: bool,
    exact: bool,
) -> QuantizedRows {
    assert!(
        cols.is_multiple_of(BLOCK),
        "{cols} is not a multiple of {BLOCK}"
    );
    assert_eq!(x.len(), rows * cols, "{rows} × {cols} values expected");
    let mut out = QuantizedRows::zeros(rows, cols / BLOCK, with_sums);
    out.exact = exact;
    // A prompt's rows are shared out to the team: quantizing 128 rows alone was ~3 % of
    // a quantized prefill, the other thread waiting (SmolLM2 Q4_0, perf).
    let blocks = out.rows * out.blocks;
    let parts = if blocks >= PARALLEL_BLOCKS {
        crate::cpu::threads::calling_thread_limit().max(1)
    } else {
        1
    };
    let per_part = blocks.div_ceil(parts).max(1);
    let views: Vec<std::sync::Mutex<(&[f32], BlocksMut<'_>)>> = x
        .chunks(per_part * BLOCK)
        .zip(out.blocks_mut(per_part))
        .map(std::sync::Mutex::new)
        .collect();
    crate::cpu::team::for_each_task(views.len(), &|t| {
        let mut part = views[t].lock().unwrap_or_else(|e| e.into_inner());
        let (x, view) = &mut *part;
        quantize_part(x, view, zero_point, with_sums);
    });
    drop(views);
    out
}

/// Blocks from which [`quantize_rows_as`] shares the work out to the team (a decode
/// step's row stays on the calling thread).
const PARALLEL_BLOCKS: usize = 512;

/// The quantizer the CPU runs, over one part's blocks.
fn quantize_part(x: &[f32], out: &mut BlocksMut<'_>, zero_point: i32, with_sums: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::dot::Kernel::best() == super::dot::Kernel::Avx512Vnni {
        // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C (`Kernel::detect`
        // checked them for the VNNI kernel).
        unsafe { avx512::quantize_blocks(x, out, zero_point, with_sums) };
        return;
    }
    quantize_blocks(x, out, zero_point, with_sums);
}

/// [`quantize_rows`]' loop over blocks, portable.
fn quantize_blocks(x: &[f32], out: &mut BlocksMut<'_>, zero_point: i32, with_sums: bool) {
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = inverse_of(d);
        let values = &mut out.values[b * BLOCK..(b + 1) * BLOCK];
        for (q, &v) in values.iter_mut().zip(block) {
            // Round half away from zero, as llama.cpp's reference `roundf` (written out:
            // the baseline x86-64 build calls libm's `roundf` for `f32::round`).
            let r = (v * inverse + 0.5f32.copysign(v)) as i32;
            *q = r.clamp(-127, 127) as i8;
        }
        let total: i32 = values.iter().map(|&q| i32::from(q)).sum();
        out.set_block(b, d, total, zero_point, with_sums);
    }
}

/// `1 / d`, or 0 where that is not finite (an all-zero block, or one so small that its
/// scale is subnormal: its values round to 0 either way, and both quantizers agree).
#[inline(always)]
fn inverse_of(d: f32) -> f32 {
    let inverse = 1.0 / d;
    if inverse.is_finite() { inverse } else { 0.0 }
}

impl QuantizedRows {
    /// `rows` rows of `blocks` blocks, all zero.
    fn zeros(rows: usize, blocks: usize, with_sums: bool) -> Self {
        let lanes = rows * blocks * LANES;
        Self {
            rows,
            blocks,
            values: vec![0; rows * blocks * BLOCK],
            scales: vec![0.0; lanes],
            biases: vec![0; lanes],
            sums: if with_sums {
                vec![0.0; lanes]
            } else {
                Vec::new()
            },
            scale_sums: vec![0.0; rows * blocks * 2],
            exact: false,
        }
    }

    /// The blocks as consecutive parts of `per_part` blocks each (the last may be
    /// shorter), each writable on its own.
    fn blocks_mut(&mut self, per_part: usize) -> Vec<BlocksMut<'_>> {
        let exact = self.exact;
        let sums: Box<dyn Iterator<Item = &mut [f32]>> = if self.sums.is_empty() {
            Box::new(std::iter::repeat_with(|| &mut [][..]))
        } else {
            Box::new(self.sums.chunks_mut(per_part * LANES))
        };
        self.values
            .chunks_mut(per_part * BLOCK)
            .zip(self.scales.chunks_mut(per_part * LANES))
            .zip(self.biases.chunks_mut(per_part * LANES))
            .zip(sums)
            .zip(self.scale_sums.chunks_mut(per_part * 2))
            .map(
                |((((values, scales), biases), sums), scale_sums)| BlocksMut {
                    values,
                    scales,
                    biases,
                    sums,
                    scale_sums,
                    exact,
                },
            )
            .collect()
    }
}

/// Consecutive blocks of [`QuantizedRows`], numbered from 0, that a quantizer writes.
struct BlocksMut<'a> {
    values: &'a mut [i8],
    scales: &'a mut [f32],
    biases: &'a mut [i32],
    sums: &'a mut [f32],
    scale_sums: &'a mut [f32],
    exact: bool,
}

impl BlocksMut<'_> {
    /// Block `b`'s scale, bias and sums from its exact scale `d` and `Σq`.
    #[inline(always)]
    fn set_block(&mut self, b: usize, d: f32, total: i32, zero_point: i32, with_sums: bool) {
        let lanes = b * LANES..(b + 1) * LANES;
        let round = |v: f32| match self.exact {
            true => v,
            false => half::f16::from_f32(v).to_f32(),
        };
        let scale = round(d);
        self.scales[lanes.clone()].fill(scale);
        self.scale_sums[2 * b] = scale;
        self.biases[lanes.start] = -zero_point * total;
        if with_sums {
            let sum = round(d * total as f32);
            self.sums[lanes.start] = sum;
            self.scale_sums[2 * b + 1] = sum;
        }
    }
}

/// [`quantize_blocks`] in AVX-512: the same values (the same f32 operations in the same
/// order, per lane) with a block's 32 values in two vectors; the scalar version's
/// `max` chain and per-value conversions were 7–10 % of a quantized prompt's time.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) fn quantize_blocks(
        x: &[f32],
        out: &mut BlocksMut<'_>,
        zero_point: i32,
        with_sums: bool,
    ) {
        let sign = _mm512_set1_epi32(i32::MIN);
        let half = _mm512_set1_ps(0.5);
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            // SAFETY: `block` holds 32 floats and `out.values` 32 bytes at b·32 (sized by
            // `quantize_rows` from the same rows and columns).
            unsafe {
                let x0 = _mm512_loadu_ps(block.as_ptr());
                let x1 = _mm512_loadu_ps(block.as_ptr().add(16));
                let amax =
                    _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
                let d = amax / 127.0;
                let inverse = _mm512_set1_ps(inverse_of(d));
                let round = |v: __m512| {
                    let signed_half = _mm512_castsi512_ps(_mm512_or_si512(
                        _mm512_and_si512(_mm512_castps_si512(v), sign),
                        _mm512_castps_si512(half),
                    ));
                    let r =
                        _mm512_cvttps_epi32(_mm512_add_ps(_mm512_mul_ps(v, inverse), signed_half));
                    _mm512_max_epi32(
                        _mm512_min_epi32(r, _mm512_set1_epi32(127)),
                        _mm512_set1_epi32(-127),
                    )
                };
                let (q0, q1) = (round(x0), round(x1));
                let values = out.values.as_mut_ptr().add(b * BLOCK);
                _mm_storeu_si128(values.cast(), _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(values.add(16).cast(), _mm512_cvtepi32_epi8(q1));
                let total = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
                out.set_block(b, d, total, zero_point, with_sums);
            }
        }
    }
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
    fn the_vector_path_gives_the_portable_values_bit_for_bit() {
        let x: Vec<f32> = (0..3 * 96)
            .map(|i| {
                ((i * 7919 % 1013) as f32 - 506.5) * 0.0137 * if i % 7 == 0 { 9.0 } else { 1.0 }
            })
            .chain([0.0; 32])
            // A block whose scale is subnormal (1/d overflows).
            .chain((0..32).map(|i| if i % 2 == 0 { 1e-40 } else { -2e-40 }))
            .collect();
        let rows = x.len() / 32;
        if super::super::dot::Kernel::best() != super::super::dot::Kernel::Avx512Vnni {
            eprintln!("skipped the_vector_path_gives_the_portable_values_bit_for_bit: no AVX-512");
            return;
        }
        for exact in [false, true] {
            let vector = quantize_rows_as(&x, rows, 32, 8, true, exact);
            let mut portable = QuantizedRows::zeros(rows, 1, true);
            portable.exact = exact;
            for mut whole in portable.blocks_mut(rows) {
                quantize_blocks(&x, &mut whole, 8, true);
            }
            assert!(portable.values.iter().any(|&v| v != 0));
            assert_eq!(vector, portable, "exact: {exact}");
        }
    }

    #[test]
    fn rows_quantized_in_parts_equal_rows_quantized_whole() {
        let (rows, blocks) = (40, 16);
        let x: Vec<f32> = (0..rows * blocks * BLOCK)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 0.003)
            .collect();
        for (zero_point, with_sums) in [(8, true), (0, false)] {
            // Through the team (parts once there are enough blocks) ...
            let shared = quantize_rows(&x, rows, blocks * BLOCK, zero_point, with_sums);
            assert!(rows * blocks >= PARALLEL_BLOCKS);
            // ... and by hand in uneven parts (7 blocks: parts straddle rows).
            let mut parts = QuantizedRows::zeros(rows, blocks, with_sums);
            let views = parts.blocks_mut(7);
            assert_eq!(views.len(), (rows * blocks).div_ceil(7));
            for (x, mut view) in x.chunks(7 * BLOCK).zip(views) {
                quantize_blocks(x, &mut view, zero_point, with_sums);
            }
            let mut whole = QuantizedRows::zeros(rows, blocks, with_sums);
            for mut view in whole.blocks_mut(rows * blocks) {
                quantize_blocks(&x, &mut view, zero_point, with_sums);
            }
            assert!(whole.values.iter().any(|&v| v != 0));
            assert_eq!(parts, whole);
            assert_eq!(shared, whole);
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
