//! Dot products of expanded weight rows ([`ExpandedRow`]) with quantized activation rows
//! ([`QuantizedRows`]), in integers per block and f32 across blocks, as llama.cpp's
//! `vec_dot_q4_1_q8_1` and friends compute them:
//!
//! `Σ_blocks (Σ_i u_i·q_i − z·Σ_i q_i) · d_w·d_a  (+ m_w · d_a·Σ_i q_i)`
//!
//! Three kernels compute the same sums (they differ only in the order f32 partial sums
//! are added), chosen at run time by [`Kernel::best`]:
//! - [`Kernel::Avx512Vnni`]: two blocks per 512-bit vector, `vpdpbusd` multiplying the
//!   unsigned weights by the signed activations and adding four products per lane;
//! - [`Kernel::Avx2`]: one block per 256-bit vector, widened to 16 bits and `vpmaddwd`;
//! - [`Kernel::Portable`]: plain Rust, for other CPUs and as the tests' baseline.
//!
//! Each block's eight lanes are scaled together: the activation bias (`−z·Σq`) and the
//! minimum term sit in lane 0, so the lanes of a block still add up to its total.

use super::activations::{QuantizedRows, RowView};
use super::weights::{BLOCK, ExpandedRow, Format, LANES};

/// An implementation of the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (and F16C).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        *Self::available().last().unwrap_or(&Self::Portable)
    }

    /// Every kernel this CPU runs, slowest first (detected once: every chunk of every
    /// product checks its kernel against this).
    pub fn available() -> &'static [Self] {
        static AVAILABLE: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(Self::detect)
    }

    fn detect() -> Vec<Self> {
        let mut kernels = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                kernels.push(Self::Avx2);
                if has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vl")
                    && has!("avx512vnni")
                    && has!("f16c")
                {
                    kernels.push(Self::Avx512Vnni);
                }
            }
        }
        kernels
    }
}

/// For each weight row `r` in `rows` (whole rows of `format` blocks, as wide as the
/// activation rows) and each activation row `a`: `out[r · acts.rows + a]` = their dot
/// product. `scratch` holds one expanded row (reused across calls).
///
/// # Panics
/// If `kernel` is not one of [`Kernel::available`], or the sizes disagree.
pub fn rows_times_activations(
    kernel: Kernel,
    format: Format,
    rows: &[u8],
    acts: &QuantizedRows,
    out: &mut [f32],
    scratch: &mut ExpandedRow,
) {
    let row_bytes = acts.blocks * format.block_bytes();
    assert!(
        row_bytes > 0 && rows.len().is_multiple_of(row_bytes),
        "weight rows of {row_bytes} bytes"
    );
    assert_eq!(out.len(), rows.len() / row_bytes * acts.rows);
    if scratch.values.len() != acts.blocks * BLOCK {
        *scratch = ExpandedRow::with_blocks(acts.blocks);
    }
    assert!(
        Kernel::available().contains(&kernel),
        "{kernel:?} does not run on this CPU"
    );
    match kernel {
        Kernel::Portable => portable::rows(format, rows, acts, out, scratch),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` found AVX2 and FMA on this CPU.
        Kernel::Avx2 => unsafe { avx2::rows(format, rows, acts, out, scratch) },
        // A few activation rows (decode): blocks decoded straight from the bytes; more
        // (a prompt): each weight row expanded once and met by every activation row.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` found AVX-512 F/BW/VL and VNNI on this CPU.
        Kernel::Avx512Vnni if acts.rows < FEW_ROWS => unsafe {
            avx512::rows_direct(format, rows, acts, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx512Vnni => unsafe { avx512::rows(format, rows, acts, out, scratch) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable kernel is available off x86-64"),
    }
}

/// Activation rows from which expanding each weight row first pays (measured with
/// `examples/quantized_matmul_timing`).
pub(super) const FEW_ROWS: usize = 4;

/// The loop every kernel runs: expand a weight row once, then meet every activation row.
/// A macro, so that the loop and the expansion are compiled inside each kernel's
/// `target_feature` function.
macro_rules! each_row {
    ($format:expr, $rows:expr, $acts:expr, $out:expr, $scratch:expr, $dot:ident) => {{
        let row_bytes = $acts.blocks * $format.block_bytes();
        let has_min = $format.has_min();
        for (r, row) in $rows.chunks_exact(row_bytes).enumerate() {
            $scratch.expand($format, row);
            for a in 0..$acts.rows {
                $out[r * $acts.rows + a] = $dot($scratch, $acts.row(a), has_min);
            }
        }
    }};
}

/// Checks the lengths the vector kernels read without bounds checks.
#[inline(always)]
fn check(w: &ExpandedRow, a: &RowView<'_>, has_min: bool) -> usize {
    let blocks = a.values.len() / BLOCK;
    assert!(w.values.len() == blocks * BLOCK && a.values.len() == blocks * BLOCK);
    assert!(w.scales.len() == blocks * LANES && a.scales.len() == blocks * LANES);
    assert!(w.mins.len() == blocks * LANES && a.biases.len() == blocks * LANES);
    assert!(!has_min || a.sums.len() == blocks * LANES);
    blocks
}

mod portable {
    use super::*;

    pub(super) fn rows(
        format: Format,
        rows: &[u8],
        acts: &QuantizedRows,
        out: &mut [f32],
        scratch: &mut ExpandedRow,
    ) {
        each_row!(format, rows, acts, out, scratch, dot)
    }

    pub(super) fn dot(w: &ExpandedRow, a: RowView<'_>, has_min: bool) -> f32 {
        let blocks = check(w, &a, has_min);
        let mut total = 0f32;
        for b in 0..blocks {
            let (values, lane) = (b * BLOCK..(b + 1) * BLOCK, b * LANES);
            let products: i32 = w.values[values.clone()]
                .iter()
                .zip(&a.values[values])
                .map(|(&u, &q)| i32::from(u) * i32::from(q))
                .sum();
            let integer = products + a.biases[lane];
            total += integer as f32 * (w.scales[lane] * a.scales[lane]);
            if has_min {
                total += w.mins[lane] * a.sums[lane];
            }
        }
        total
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rows(
        format: Format,
        rows: &[u8],
        acts: &QuantizedRows,
        out: &mut [f32],
        scratch: &mut ExpandedRow,
    ) {
        each_row!(format, rows, acts, out, scratch, dot)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot(w: &ExpandedRow, a: RowView<'_>, has_min: bool) -> f32 {
        let blocks = check(w, &a, has_min);
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let (v, l) = (b * BLOCK, b * LANES);
            // SAFETY: `check` proved every row holds `blocks` whole blocks, so each
            // unaligned load below reads inside its slice.
            unsafe {
                let wv = w.values.as_ptr().add(v);
                let av = a.values.as_ptr().add(v);
                let w_low = _mm256_cvtepu8_epi16(_mm_loadu_si128(wv.cast()));
                let w_high = _mm256_cvtepu8_epi16(_mm_loadu_si128(wv.add(16).cast()));
                let a_low = _mm256_cvtepi8_epi16(_mm_loadu_si128(av.cast()));
                let a_high = _mm256_cvtepi8_epi16(_mm_loadu_si128(av.add(16).cast()));
                let products = _mm256_add_epi32(
                    _mm256_madd_epi16(w_low, a_low),
                    _mm256_madd_epi16(w_high, a_high),
                );
                let bias = _mm256_loadu_si256(a.biases.as_ptr().add(l).cast());
                let integer = _mm256_add_epi32(products, bias);
                let scale = _mm256_mul_ps(
                    _mm256_loadu_ps(w.scales.as_ptr().add(l)),
                    _mm256_loadu_ps(a.scales.as_ptr().add(l)),
                );
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integer), scale, acc);
                if has_min {
                    let mins = _mm256_loadu_ps(w.mins.as_ptr().add(l));
                    acc = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a.sums.as_ptr().add(l)), acc);
                }
            }
        }
        sum8(acc)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sum8(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) fn rows(
        format: Format,
        rows: &[u8],
        acts: &QuantizedRows,
        out: &mut [f32],
        scratch: &mut ExpandedRow,
    ) {
        each_row!(format, rows, acts, out, scratch, dot)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    fn dot(w: &ExpandedRow, a: RowView<'_>, has_min: bool) -> f32 {
        let blocks = check(w, &a, has_min);
        let mut acc = _mm512_setzero_ps();
        // Two blocks per vector: lanes 0-7 the first block's, 8-15 the second's.
        for p in 0..blocks / 2 {
            let (v, l) = (p * 2 * BLOCK, p * 2 * LANES);
            // SAFETY: `check` proved every row holds `blocks` whole blocks; blocks 2p
            // and 2p+1 exist, so each 64-byte load reads inside its slice.
            unsafe {
                let wv = _mm512_loadu_si512(w.values.as_ptr().add(v).cast());
                let av = _mm512_loadu_si512(a.values.as_ptr().add(v).cast());
                let bias = _mm512_loadu_si512(a.biases.as_ptr().add(l).cast());
                let integer = _mm512_dpbusd_epi32(bias, wv, av);
                let scale = _mm512_mul_ps(
                    _mm512_loadu_ps(w.scales.as_ptr().add(l)),
                    _mm512_loadu_ps(a.scales.as_ptr().add(l)),
                );
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(integer), scale, acc);
                if has_min {
                    let mins = _mm512_loadu_ps(w.mins.as_ptr().add(l));
                    acc = _mm512_fmadd_ps(mins, _mm512_loadu_ps(a.sums.as_ptr().add(l)), acc);
                }
            }
        }
        let mut tail = _mm256_setzero_ps();
        if blocks % 2 == 1 {
            let (v, l) = ((blocks - 1) * BLOCK, (blocks - 1) * LANES);
            // SAFETY: the last block exists (as above); 32-byte loads inside it.
            unsafe {
                let wv = _mm256_loadu_si256(w.values.as_ptr().add(v).cast());
                let av = _mm256_loadu_si256(a.values.as_ptr().add(v).cast());
                let bias = _mm256_loadu_si256(a.biases.as_ptr().add(l).cast());
                let integer = _mm256_dpbusd_epi32(bias, wv, av);
                let scale = _mm256_mul_ps(
                    _mm256_loadu_ps(w.scales.as_ptr().add(l)),
                    _mm256_loadu_ps(a.scales.as_ptr().add(l)),
                );
                tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(integer), scale, tail);
                if has_min {
                    let mins = _mm256_loadu_ps(w.mins.as_ptr().add(l));
                    tail = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a.sums.as_ptr().add(l)), tail);
                }
            }
        }
        _mm512_reduce_add_ps(acc) + super::avx2::sum8(tail)
    }

    /// As [`rows`], decoding each block from the bytes as it goes (no expanded row).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(super) fn rows_direct(format: Format, rows: &[u8], acts: &QuantizedRows, out: &mut [f32]) {
        // One loop per format, so the block loop has no format test in it.
        match format {
            Format::Q4_0 => rows_direct_of::<Q4_0>(rows, acts, out),
            Format::Q4_1 => rows_direct_of::<Q4_1>(rows, acts, out),
            Format::Q5_0 => rows_direct_of::<Q5_0>(rows, acts, out),
            Format::Q5_1 => rows_direct_of::<Q5_1>(rows, acts, out),
            Format::Q8_0 => rows_direct_of::<Q8_0>(rows, acts, out),
        }
    }

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;
    const Q5_0: u8 = 2;
    const Q5_1: u8 = 3;
    const Q8_0: u8 = 4;

    const fn format_of(f: u8) -> Format {
        match f {
            Q4_0 => Format::Q4_0,
            Q4_1 => Format::Q4_1,
            Q5_0 => Format::Q5_0,
            Q5_1 => Format::Q5_1,
            _ => Format::Q8_0,
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn rows_direct_of<const F: u8>(rows: &[u8], acts: &QuantizedRows, out: &mut [f32]) {
        let row_bytes = acts.blocks * format_of(F).block_bytes();
        // Sliced once: a row of a decode step's matrices is a few dozen nanoseconds of
        // work, and slicing the activations per weight row was 3 % of the step.
        let views: Vec<RowView<'_>> = (0..acts.rows).map(|a| acts.row(a)).collect();
        for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
            for (a, view) in views.iter().enumerate() {
                out[r * acts.rows + a] = dot_direct::<F>(row, *view);
            }
        }
    }

    /// One block's contribution: the integer dot product in 8 lanes times the block's
    /// scale product, added to `acc`; the product of `[d, m]` with `[d, s]` is returned
    /// for the minimum term of Q4_1 and Q5_1.
    ///
    /// # Safety
    /// `block` has the format's bytes (≥ 18: d and, for Q4_1 and Q5_1, m in its first 4;
    /// nibbles in its last 16 and the 5-bit formats' high bits in the 4 before them,
    /// Q8_0's values in its last 32); `values` 32 activation values,
    /// `biases` 8 lanes and `scale_sum` 2 floats readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn block_direct<const F: u8>(
        block: *const u8,
        values: *const i8,
        biases: *const i32,
        scale_sum: *const f32,
        acc: __m256,
    ) -> (__m256, __m128) {
        let size = format_of(F).block_bytes();
        // SAFETY: the caller's contract bounds every read.
        unsafe {
            let weights = if F == Q8_0 {
                _mm256_xor_si256(
                    _mm256_loadu_si256(block.add(2).cast()),
                    _mm256_set1_epi8(-128),
                )
            } else {
                let nibbles = _mm_loadu_si128(block.add(size - 16).cast());
                let both = _mm256_set_m128i(_mm_srli_epi16(nibbles, 4), nibbles);
                let low = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
                if F == Q5_0 || F == Q5_1 {
                    // Bit i of qh is weight i's fifth bit: 16 in byte i where it is set.
                    let qh = std::ptr::read_unaligned(block.add(size - 20).cast::<u32>());
                    _mm256_or_si256(low, _mm256_maskz_set1_epi8(qh, 0x10))
                } else {
                    low
                }
            };
            let av = _mm256_loadu_si256(values.cast());
            let integer = if F == Q4_1 || F == Q5_1 {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), weights, av)
            } else {
                _mm256_dpbusd_epi32(_mm256_loadu_si256(biases.cast()), weights, av)
            };
            // [d, m] of the weights (m: Q4_1 and Q5_1 only), times [d, s] of the
            // activations.
            let head = std::ptr::read_unaligned(block.cast::<i32>());
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(head));
            let ds = _mm_castpd_ps(_mm_load_sd(scale_sum.cast()));
            let products = _mm_mul_ps(dm, ds);
            let acc = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(integer),
                _mm256_broadcastss_ps(products),
                acc,
            );
            (acc, products)
        }
    }

    /// Two blocks at a time into two accumulators, so that consecutive blocks' adds do
    /// not wait on each other.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn dot_direct<const F: u8>(row: &[u8], a: RowView<'_>) -> f32 {
        let size = format_of(F).block_bytes();
        let blocks = a.values.len() / BLOCK;
        assert!(row.len() == blocks * size && a.scale_sums.len() == blocks * 2);
        assert!(a.biases.len() == blocks * LANES);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        // Lane 1 gathers the minimum terms (lane 0 holds scale products, unused).
        let (mut mins0, mut mins1) = (_mm_setzero_ps(), _mm_setzero_ps());
        let (w, v, l, s) = (
            row.as_ptr(),
            a.values.as_ptr(),
            a.biases.as_ptr(),
            a.scale_sums.as_ptr(),
        );
        // SAFETY (of every call): the asserts above bound the reads of every block
        // `b < blocks`, and only such blocks are passed.
        let block = |b: usize, acc| unsafe {
            block_direct::<F>(
                w.add(b * size),
                v.add(b * BLOCK),
                l.add(b * LANES),
                s.add(2 * b),
                acc,
            )
        };
        let mut b = 0;
        while b + 1 < blocks {
            let ((next0, p0), (next1, p1)) = (block(b, acc0), block(b + 1, acc1));
            (acc0, acc1) = (next0, next1);
            if F == Q4_1 || F == Q5_1 {
                mins0 = _mm_add_ps(mins0, p0);
                mins1 = _mm_add_ps(mins1, p1);
            }
            b += 2;
        }
        if b < blocks {
            let (next, p) = block(b, acc0);
            acc0 = next;
            if F == Q4_1 || F == Q5_1 {
                mins0 = _mm_add_ps(mins0, p);
            }
        }
        let min_terms = _mm_cvtss_f32(_mm_movehdup_ps(_mm_add_ps(mins0, mins1)));
        super::avx2::sum8(_mm256_add_ps(acc0, acc1)) + min_terms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quantized::activations::quantize_rows;

    /// Random bytes for `rows` rows of `blocks` blocks, with sane f16 scales.
    fn random_rows(format: Format, rows: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * blocks {
            let d = half::f16::from_f32((next() % 1000) as f32 * 1e-5 + 1e-4);
            bytes.extend(d.to_le_bytes());
            if format.has_min() {
                let m = half::f16::from_f32(((next() % 2001) as f32 - 1000.0) * 1e-4);
                bytes.extend(m.to_le_bytes());
            }
            let rest = format.block_bytes() - bytes.len() % format.block_bytes();
            bytes.extend((0..rest).map(|_| next() as u8));
        }
        bytes
    }

    #[test]
    fn every_kernel_computes_the_same_sums() {
        let kernels = Kernel::available();
        for format in [
            Format::Q4_0,
            Format::Q4_1,
            Format::Q5_0,
            Format::Q5_1,
            Format::Q8_0,
        ] {
            // Odd and even block counts (the AVX-512 kernel pairs blocks).
            for blocks in [1, 2, 3, 17, 18, 48] {
                let (rows, acts_rows) = (5, 3);
                let weights = random_rows(format, rows, blocks, blocks as u64);
                let x: Vec<f32> = (0..acts_rows * blocks * BLOCK)
                    .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.01)
                    .collect();
                let acts = quantize_rows(
                    &x,
                    acts_rows,
                    blocks * BLOCK,
                    format.zero_point(),
                    format.has_min(),
                );
                let mut baseline = vec![0.0; rows * acts_rows];
                let mut scratch = ExpandedRow::default();
                rows_times_activations(
                    Kernel::Portable,
                    format,
                    &weights,
                    &acts,
                    &mut baseline,
                    &mut scratch,
                );
                for &kernel in &kernels[1..] {
                    let mut out = vec![0.0; rows * acts_rows];
                    rows_times_activations(kernel, format, &weights, &acts, &mut out, &mut scratch);
                    for (o, b) in out.iter().zip(&baseline) {
                        assert!(
                            (o - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{kernel:?} {format:?} {blocks} blocks: {o} against {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "weight rows of")]
    fn rows_of_the_wrong_width_are_refused() {
        let acts = quantize_rows(&[0.5; 64], 1, 64, 8, false);
        let mut out = vec![0.0; 1];
        let mut scratch = ExpandedRow::default();
        rows_times_activations(
            Kernel::Portable,
            Format::Q4_0,
            &[0; 18],
            &acts,
            &mut out,
            &mut scratch,
        );
    }
}
