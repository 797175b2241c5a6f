//! The GGML block formats Spillway multiplies with its own kernels, and a weight row
//! expanded into the layout those kernels read. Pure.
//!
//! A block holds 32 weights:
//! - Q4_0 (18 bytes): f16 scale `d`, 16 bytes of nibbles; `w = d·(u − 8)`.
//! - Q4_1 (20 bytes): f16 `d`, f16 minimum `m`, 16 bytes of nibbles; `w = d·u + m`.
//! - Q5_0 (22 bytes): f16 `d`, 32 high bits `qh`, 16 bytes of nibbles;
//!   `w = d·(u − 16)`, `u` the nibble plus 16 × its high bit.
//! - Q5_1 (24 bytes): f16 `d`, f16 `m`, `qh`, 16 bytes of nibbles; `w = d·u + m`.
//! - Q8_0 (34 bytes): f16 `d`, 32 signed bytes `q`; `w = d·q = d·(u − 128)` with
//!   `u = q + 128`.
//!
//! Nibble `j` of a 4- or 5-bit block holds weight `j` in its low half and weight
//! `16 + j` in its high half; bit `i` of `qh` (little-endian) is weight `i`'s fifth bit
//! (llama.cpp's layout).

use candle_core::quantized::GgmlDType;

/// Weights per block, in every format here (and activations per block).
pub const BLOCK: usize = 32;
/// Lanes each block's scale is spread over in the kernels' layouts (one AVX2 vector).
pub const LANES: usize = 8;

/// A block format with Spillway's own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Format {
    /// The format of `dtype`, if Spillway has kernels for it.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// The `z` of `w = d·(u − z)` for the unsigned values the kernels multiply.
    pub fn zero_point(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q4_1 | Self::Q5_1 => 0,
            Self::Q5_0 => 16,
            Self::Q8_0 => 128,
        }
    }

    /// Whether blocks carry a minimum `m` (`w = d·u + m`).
    pub fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// Whether blocks carry a fifth bit per weight in the 4 bytes before the nibbles.
    pub fn has_high_bits(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }
}

/// One weight row in the kernels' layout: unsigned values, each block's scale in eight
/// lanes, and its minimum in lane 0 of eight (zeros where the format has none).
#[derive(Debug, Clone, Default)]
pub struct ExpandedRow {
    pub values: Vec<u8>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
}

impl ExpandedRow {
    /// Room for rows of `blocks` blocks.
    pub fn with_blocks(blocks: usize) -> Self {
        Self {
            values: vec![0; blocks * BLOCK],
            scales: vec![0.0; blocks * LANES],
            mins: vec![0.0; blocks * LANES],
        }
    }

    /// Fills `self` from `row`, one row of `format` blocks. Inlined into each kernel's
    /// loop so it is compiled (and vectorized) for that kernel's extension.
    #[inline(always)]
    pub fn expand(&mut self, format: Format, row: &[u8]) {
        let size = format.block_bytes();
        for (b, block) in row.chunks_exact(size).enumerate() {
            let d = f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
            self.scales[b * LANES..(b + 1) * LANES].fill(d);
            let values = &mut self.values[b * BLOCK..(b + 1) * BLOCK];
            match format {
                Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => {
                    let nibbles = &block[size - 16..];
                    let (low, high) = values.split_at_mut(16);
                    for ((l, h), &n) in low.iter_mut().zip(high.iter_mut()).zip(nibbles) {
                        *l = n & 0x0f;
                        *h = n >> 4;
                    }
                    if format.has_high_bits() {
                        let qh = &block[size - 20..size - 16];
                        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                        for (i, u) in values.iter_mut().enumerate() {
                            *u |= (((qh >> i) & 1) as u8) << 4;
                        }
                    }
                }
                Format::Q8_0 => {
                    for (u, &q) in values.iter_mut().zip(&block[2..]) {
                        *u = q ^ 0x80;
                    }
                }
            }
            if format.has_min() {
                self.mins[b * LANES] = f16_bits_to_f32(u16::from_le_bytes([block[2], block[3]]));
            }
        }
    }
}

/// IEEE half → single, in plain integer arithmetic (inlined into the kernels; `half`'s
/// conversion checks the CPU on every call unless built for F16C).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    match exponent {
        0 => {
            // Zero or subnormal: mantissa · 2⁻²⁴.
            let magnitude = mantissa as f32 * (1.0 / 16_777_216.0);
            f32::from_bits(sign | magnitude.to_bits())
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_conversion_matches_the_half_crate_on_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let ours = f16_bits_to_f32(bits);
            let theirs = half::f16::from_bits(bits).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{bits:#06x}: {ours} against {theirs}"
            );
        }
    }

    #[test]
    fn an_expanded_row_holds_the_values_the_blocks_mean() {
        // One Q4_1 block: d = 0.5, m = -1, nibble j = (j, 15 - j).
        let mut block = Vec::new();
        block.extend(half::f16::from_f32(0.5).to_le_bytes());
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut row = ExpandedRow::with_blocks(1);
        row.expand(Format::Q4_1, &block);
        let weights: Vec<f32> = row
            .values
            .iter()
            .map(|&u| 0.5 * f32::from(u) - 1.0)
            .collect();
        let expected: Vec<f32> = (0..32)
            .map(|j| if j < 16 { j } else { 31 - j })
            .map(|u| 0.5 * u as f32 - 1.0)
            .collect();
        assert_eq!(weights, expected);
        assert_eq!(row.scales, vec![0.5; 8]);
        assert_eq!(row.mins[0], -1.0);
        assert!(row.mins[1..].iter().all(|&m| m == 0.0));

        // One Q8_0 block: q = j - 16.
        let mut block = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..32i8).map(|j| (j - 16) as u8));
        row.expand(Format::Q8_0, &block);
        let zero = Format::Q8_0.zero_point();
        let back: Vec<i32> = row.values.iter().map(|&u| i32::from(u) - zero).collect();
        assert_eq!(back, (0..32).map(|j| j - 16).collect::<Vec<_>>());
    }
}
