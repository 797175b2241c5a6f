//! Weight rows dequantized to f32, for the prompt path of [`super::matmul`]: a prompt's
//! product is compute-bound, so it dequantizes tiles of a few dozen weight rows into a
//! thread's scratch and multiplies them with the f32 GEMM, the weights staying in their
//! blocks in memory. Pure.
//!
//! Each value is what llama.cpp's `dequantize_row_*` gives: `d·(u − z)` without a
//! minimum, `d·u + m` with one (the formats' layout is in [`super::weights`]).

use super::weights::{BLOCK, Format, f16_bits_to_f32};

/// Writes the f32 weights of `rows` (whole blocks of `format`) to `out`, 32 per block.
///
/// # Panics
/// If `rows` is not whole blocks or `out` not 32 values for each.
pub fn dequantize(format: Format, rows: &[u8], out: &mut [f32]) {
    let size = format.block_bytes();
    assert!(
        rows.len().is_multiple_of(size) && out.len() == rows.len() / size * BLOCK,
        "{} bytes of {format:?} into {} values",
        rows.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        return unsafe { avx512(format, rows, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2(format, rows, out) };
    }
    blocks(format, rows, out)
}

/// Each block in 512-bit vectors: its nibbles (or bytes) widened to 16 lanes of i32 at a
/// time, the fifth bits merged under a mask, converted, scaled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn avx512(format: Format, rows: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let size = format.block_bytes();
    let half =
        |block: &[u8], at: usize| f16_bits_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
    let low_bits = _mm512_set1_epi32(0x0f);
    let sixteen = _mm512_set1_epi32(16);
    for (block, out) in rows.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK)) {
        let d = half(block, 0);
        let out = out.as_mut_ptr();
        if format == Format::Q8_0 {
            let scale = _mm512_set1_ps(d);
            // SAFETY: a Q8_0 block is 34 bytes (2 + 32, `chunks_exact`), `out` 32 values.
            unsafe {
                let q = block.as_ptr().add(2);
                let low = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.cast()));
                let high = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(16).cast()));
                _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(low), scale));
                _mm512_storeu_ps(out.add(16), _mm512_mul_ps(_mm512_cvtepi32_ps(high), scale));
            }
            continue;
        }
        let (zero, min) = match format {
            Format::Q4_0 => (8.0, 0.0),
            Format::Q5_0 => (16.0, 0.0),
            _ => (0.0, half(block, 2)),
        };
        let qh = match format {
            Format::Q5_0 => u32::from_le_bytes([block[2], block[3], block[4], block[5]]),
            Format::Q5_1 => u32::from_le_bytes([block[4], block[5], block[6], block[7]]),
            _ => 0,
        };
        let scale = _mm512_set1_ps(d);
        // (u − z)·d = fma(u, d, −z·d) exactly: −z·d is exact (z a power of two) and fma
        // rounds the same real number once.
        let shift = _mm512_set1_ps(-zero * d);
        let min = _mm512_set1_ps(min);
        // SAFETY: the 16 nibble bytes end every 4- and 5-bit block (`chunks_exact` of its
        // size); `out` holds 32 values.
        unsafe {
            let n = _mm512_cvtepu8_epi32(_mm_loadu_si128(block.as_ptr().add(size - 16).cast()));
            let mut low = _mm512_and_si512(n, low_bits);
            let mut high = _mm512_srli_epi32(n, 4);
            low = _mm512_mask_or_epi32(low, (qh & 0xffff) as u16, low, sixteen);
            high = _mm512_mask_or_epi32(high, (qh >> 16) as u16, high, sixteen);
            let (low, high) = (_mm512_cvtepi32_ps(low), _mm512_cvtepi32_ps(high));
            let (low, high) = if format.has_min() {
                (
                    _mm512_add_ps(_mm512_mul_ps(low, scale), min),
                    _mm512_add_ps(_mm512_mul_ps(high, scale), min),
                )
            } else {
                (
                    _mm512_fmadd_ps(low, scale, shift),
                    _mm512_fmadd_ps(high, scale, shift),
                )
            };
            _mm512_storeu_ps(out, low);
            _mm512_storeu_ps(out.add(16), high);
        }
    }
}

/// [`blocks`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2(format: Format, rows: &[u8], out: &mut [f32]) {
    blocks(format, rows, out)
}

/// One loop per format, so the block loop has no format test in it.
#[inline(always)]
fn blocks(format: Format, rows: &[u8], out: &mut [f32]) {
    let size = format.block_bytes();
    let pairs = rows.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK));
    let half =
        |block: &[u8], at: usize| f16_bits_to_f32(u16::from_le_bytes([block[at], block[at + 1]]));
    match format {
        Format::Q4_0 => {
            for (block, out) in pairs {
                nibbles(&block[2..18], 0, half(block, 0), -8.0, 0.0, out);
            }
        }
        Format::Q4_1 => {
            for (block, out) in pairs {
                nibbles(&block[4..20], 0, half(block, 0), 0.0, half(block, 2), out);
            }
        }
        Format::Q5_0 => {
            for (block, out) in pairs {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                nibbles(&block[6..22], qh, half(block, 0), -16.0, 0.0, out);
            }
        }
        Format::Q5_1 => {
            for (block, out) in pairs {
                let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                nibbles(&block[8..24], qh, half(block, 0), 0.0, half(block, 2), out);
            }
        }
        Format::Q8_0 => {
            for (block, out) in pairs {
                let d = half(block, 0);
                for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
    }
}

/// One block of 16 nibble bytes (weight `j` low, `16 + j` high) with fifth bits `qh`
/// (zero for the 4-bit formats): `(u + z)·d + m`, `z` the negated zero point.
#[inline(always)]
fn nibbles(bytes: &[u8], qh: u32, d: f32, z: f32, m: f32, out: &mut [f32]) {
    let (low, high) = out.split_at_mut(16);
    for (j, ((l, h), &n)) in low.iter_mut().zip(high.iter_mut()).zip(bytes).enumerate() {
        let fifth_low = ((qh >> j) & 1) << 4;
        let fifth_high = ((qh >> (j + 16)) & 1) << 4;
        let u_low = (u32::from(n & 0x0f) | fifth_low) as f32;
        let u_high = (u32::from(n >> 4) | fifth_high) as f32;
        *l = (u_low + z) * d + m;
        *h = (u_high + z) * d + m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Every format against candle's dequantization of the same blocks, exactly (both
    /// compute `(u − z)·d` or `u·d + m` in f32).
    #[test]
    fn values_equal_candles_dequantization() {
        for (dtype, format) in [
            (GgmlDType::Q4_0, Format::Q4_0),
            (GgmlDType::Q4_1, Format::Q4_1),
            (GgmlDType::Q5_0, Format::Q5_0),
            (GgmlDType::Q5_1, Format::Q5_1),
            (GgmlDType::Q8_0, Format::Q8_0),
        ] {
            let w = Tensor::randn(0f32, 1.0, (7, 96), &Device::Cpu)
                .and_then(|w| w.affine(0.1, 0.02))
                .expect("weights");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("dequantize");
            let bytes = q.data().expect("bytes");
            let mut got = vec![f32::NAN; 7 * 96];
            dequantize(format, &bytes, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{format:?} value {i}: {g} against {w}"
                );
            }
            let mut portable = vec![f32::NAN; 7 * 96];
            blocks(format, &bytes, &mut portable);
            assert_eq!(got, portable, "{format:?}: vector and portable code agree");
        }
    }

    #[test]
    #[should_panic(expected = "into 31 values")]
    fn a_short_output_is_refused() {
        dequantize(Format::Q4_0, &[0u8; 18], &mut [0.0; 31]);
    }
}
