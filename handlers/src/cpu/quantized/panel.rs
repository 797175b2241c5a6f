//! Prompt products in integers: a tile of quantized weight rows unpacked into 8-bit
//! panels and multiplied with activation rows quantized as llama.cpp quantizes them
//! ([`super::activations`]), by an AVX-512 VNNI micro-kernel with register blocking.
//!
//! A prompt meets every weight row with many activation rows, so the work is in the
//! multiplies, not in reading the weights. The f32 path ([`super::dequantize`] + sgemm)
//! does them at the float GEMM's rate; `vpdpbusd` multiplies 64 byte pairs per
//! instruction where an f32 FMA does 16, so this path does them about twice as fast
//! again (the blocks' scales cost a few instructions per 32 values). It computes the
//! sums the integer dot products ([`super::dot`]) compute, block by block:
//!
//! `Σ_blocks (Σ_i u_i·q_i − z·Σ_i q_i) · d_w·d_a  (+ m_w · d_a·Σ_i q_i)`
//!
//! so for the 32-value block formats its answers are those of llama.cpp's
//! `vec_dot_*_q8_*` up to the order f32 partial sums are added. (For Q4_K/Q5_K the
//! activations are quantized per 32 values with f32 scales, where llama.cpp's Q8_K has
//! one scale per 256.)
//!
//! The panel layout: weight rows in groups of [`GROUP`] (16, one 512-bit vector of
//! outputs). Per group and block, the block's 32 values of each of the 16 rows as 8
//! steps of 64 bytes — step `s` holds values `4s..4s + 4` of row 0, then of row 1, … —
//! so one `vpdpbusd` with four broadcast activation bytes adds four products to each
//! of the 16 rows' sums. Beside them, each block's 16 weight scales and (formats with a
//! minimum) 16 minimums.
//!
//! Besides the block formats of [`super::weights`], Q4_K and Q5_K unpack here: their
//! 256-value super-blocks are eight 32-value blocks of `w = d·sc·u − dmin·m`, a scale and
//! a minimum per 32 values, as Q4_1's blocks. Q6_K's blocks have a scale per 16 values
//! (`w = d·sc·(u − 32)`): its panels keep two scales a block and the kernel scales each
//! half's sums apart.

use candle_core::quantized::GgmlDType;

use super::activations::{QuantizedRows, quantize_rows, quantize_rows_as};
use super::weights::{BLOCK, ExpandedRow, Format, LANES, f16_bits_to_f32};

/// Weight rows per panel group: one 512-bit vector of f32 outputs.
pub const GROUP: usize = 16;
/// Four-byte steps per block.
const STEPS: usize = BLOCK / 4;

/// A weight format the panels unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanelFormat {
    /// One of Spillway's 32-value block formats.
    Block(Format),
    /// GGML's Q4_K: 144-byte super-blocks of 256 values.
    Q4K,
    /// GGML's Q5_K: 176-byte super-blocks of 256 values.
    Q5K,
    /// GGML's Q6_K: 210-byte super-blocks of 256 values, a scale per 16 (so a panel
    /// block has two: [`Panel::halves`]).
    Q6K,
}

impl PanelFormat {
    /// The panel format of `dtype`, if it has one.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            other => Format::of(other).map(Self::Block),
        }
    }

    /// The zero point the activations' biases are computed with (see
    /// [`super::activations::quantize_rows`]).
    pub fn zero_point(self) -> i32 {
        match self {
            Self::Block(f) => f.zero_point(),
            Self::Q4K | Self::Q5K => 0,
            Self::Q6K => 32,
        }
    }

    /// Whether blocks carry a minimum (`w = d·u + m`).
    pub fn has_min(self) -> bool {
        match self {
            Self::Block(f) => f.has_min(),
            Self::Q4K | Self::Q5K => true,
            Self::Q6K => false,
        }
    }

    /// Whether each 32-value block has a scale per 16 values (Q6_K).
    pub fn halves(self) -> bool {
        self == Self::Q6K
    }

    /// `x` (`rows × cols`) quantized for panels of this format: as the integer dot
    /// products quantize it for the block formats, with f32 scales and sums (llama.cpp's
    /// Q8_K) for the k-quants.
    pub fn quantize(self, x: &[f32], rows: usize, cols: usize) -> QuantizedRows {
        match self {
            Self::Block(f) => quantize_rows(x, rows, cols, f.zero_point(), f.has_min()),
            Self::Q4K | Self::Q5K => quantize_rows_as(x, rows, cols, 0, true, true),
            Self::Q6K => {
                // Biases per 16 values: lane 0 for the first half, lane 1 the second.
                let mut acts = quantize_rows_as(x, rows, cols, 0, false, true);
                let z = self.zero_point();
                for (b, block) in acts.values.chunks_exact(BLOCK).enumerate() {
                    let sum = |half: &[i8]| half.iter().map(|&q| i32::from(q)).sum::<i32>();
                    acts.biases[b * LANES] = -z * sum(&block[..BLOCK / 2]);
                    acts.biases[b * LANES + 1] = -z * sum(&block[BLOCK / 2..]);
                }
                acts
            }
        }
    }

    /// Values per block (32) or super-block (256): rows are whole ones.
    pub fn block_values(self) -> usize {
        match self {
            Self::Block(_) => BLOCK,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes of a weight row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Block(f) => cols / BLOCK * f.block_bytes(),
            Self::Q4K => cols / 256 * 144,
            Self::Q5K => cols / 256 * 176,
            Self::Q6K => cols / 256 * 210,
        }
    }

    /// Fills `out` (room for the row's blocks) from one weight row's bytes.
    #[inline(always)]
    fn expand(self, row: &[u8], out: &mut ExpandedRow) {
        match self {
            Self::Block(f) => out.expand(f, row),
            Self::Q4K => expand_k(row, 144, false, out),
            Self::Q5K => expand_k(row, 176, true, out),
            Self::Q6K => expand_q6k(row, out),
        }
    }
}

/// Q4_K (`high` false) or Q5_K super-blocks of `size` bytes into 32-value blocks of
/// unsigned values with a scale and a minimum each (candle's `to_float` layout: per
/// 64 values, 32 bytes whose low nibbles are the first 32 values and high nibbles the
/// next 32; Q5_K's fifth bits in 32 bytes, bit `2j` and `2j + 1` for the `j`-th pair).
#[inline(always)]
fn expand_k(row: &[u8], size: usize, high: bool, out: &mut ExpandedRow) {
    for (s, sb) in row.chunks_exact(size).enumerate() {
        let d = f16_bits_to_f32(u16::from_le_bytes([sb[0], sb[1]]));
        let dmin = f16_bits_to_f32(u16::from_le_bytes([sb[2], sb[3]]));
        let scales = &sb[4..16];
        let (qh, qs) = if high {
            (&sb[16..48], &sb[48..176])
        } else {
            (&sb[0..0], &sb[16..144])
        };
        for j in 0..4 {
            let q = &qs[32 * j..32 * j + 32];
            for half in 0..2 {
                let b = s * 8 + 2 * j + half;
                let (sc, m) = scale_min_k4(2 * j + half, scales);
                out.scales[b * LANES..(b + 1) * LANES].fill(d * f32::from(sc));
                out.mins[b * LANES] = -dmin * f32::from(m);
                let values = &mut out.values[b * BLOCK..(b + 1) * BLOCK];
                let bit = 1u8 << (2 * j + half);
                for (l, v) in values.iter_mut().enumerate() {
                    let nibble = if half == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                    let fifth = if high && qh[l] & bit != 0 { 16 } else { 0 };
                    *v = nibble | fifth;
                }
            }
        }
    }
}

/// Q6_K super-blocks (candle's `BlockQ6K`: 128 bytes of low nibbles, 64 of high bit
/// pairs, 16 signed scales, f16 `d`) into 32-value blocks of unsigned 6-bit values
/// (`w = d·sc·(u − 32)`), each block's two scales `d·sc` in lanes 0 and 1. Per 128
/// values (half `h`), block `j` takes nibbles of `ql[64h + 32·(j % 2) + l]` (low for
/// j < 2, high after) and bits `2j..2j + 2` of `qh[32h + l]`; its scales are
/// `sc[8h + 2j]` and `sc[8h + 2j + 1]`.
#[inline(always)]
fn expand_q6k(row: &[u8], out: &mut ExpandedRow) {
    for (s, sb) in row.chunks_exact(210).enumerate() {
        let (ql, qh, sc) = (&sb[..128], &sb[128..192], &sb[192..208]);
        let d = f16_bits_to_f32(u16::from_le_bytes([sb[208], sb[209]]));
        for h in 0..2 {
            for j in 0..4 {
                let b = s * 8 + h * 4 + j;
                let lanes = &mut out.scales[b * LANES..(b + 1) * LANES];
                lanes[0] = d * f32::from(sc[8 * h + 2 * j] as i8);
                lanes[1] = d * f32::from(sc[8 * h + 2 * j + 1] as i8);
                let values = &mut out.values[b * BLOCK..(b + 1) * BLOCK];
                for (l, v) in values.iter_mut().enumerate() {
                    let byte = ql[64 * h + 32 * (j % 2) + l];
                    let nibble = if j < 2 { byte & 0x0f } else { byte >> 4 };
                    *v = nibble | (((qh[32 * h + l] >> (2 * j)) & 3) << 4);
                }
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a k-quant super-block (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A tile of weight rows in the panel layout (see the module's documentation); reused
/// across tiles and calls.
#[derive(Debug, Default)]
pub struct Panel {
    groups: usize,
    blocks: usize,
    has_min: bool,
    /// `groups × blocks × STEPS × GROUP × 4` unsigned values.
    values: Vec<u8>,
    /// `groups × blocks × GROUP`.
    scales: Vec<f32>,
    /// `groups × blocks × GROUP` (formats with a minimum; else empty).
    mins: Vec<f32>,
    /// Whether each block has a second scale for its last 16 values (Q6_K).
    halves: bool,
    /// `groups × blocks × GROUP`: the second scales (`halves` only; else empty).
    scales_hi: Vec<f32>,
    /// One weight row expanded.
    row: ExpandedRow,
    /// A group's rows expanded, `GROUP × cols`, before they are interleaved.
    staged: Vec<u8>,
}

impl Panel {
    /// Unpacks `bytes`, whole rows of `cols` values in `format` whose count is a multiple
    /// of [`GROUP`].
    ///
    /// # Panics
    /// If the sizes disagree or the CPU lacks AVX-512 ([`available`]).
    pub fn fill(&mut self, format: PanelFormat, bytes: &[u8], cols: usize) {
        let row_bytes = format.row_bytes(cols);
        assert!(cols.is_multiple_of(format.block_values()) && row_bytes > 0);
        assert!(bytes.len().is_multiple_of(row_bytes * GROUP));
        assert!(available(), "panels need AVX-512 VNNI");
        let (rows, blocks) = (bytes.len() / row_bytes, cols / BLOCK);
        self.groups = rows / GROUP;
        self.blocks = blocks;
        self.has_min = format.has_min();
        self.halves = format.halves();
        self.scales_hi
            .resize(if self.halves { rows * blocks } else { 0 }, 0.0);
        self.values.resize(rows * cols, 0);
        self.scales.resize(rows * blocks, 0.0);
        self.mins
            .resize(if self.has_min { rows * blocks } else { 0 }, 0.0);
        if self.row.values.len() != cols {
            self.row = ExpandedRow::with_blocks(blocks);
        }
        self.staged.resize(GROUP * cols.max(row_bytes), 0);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` found AVX-512 F/BW/VL, AVX2, FMA and F16C on this CPU.
        unsafe {
            avx512::fill(self, format, bytes, row_bytes)
        }
    }

    /// Row `r` of group `g` expanded: its values to row `r` of `staged`, its scales and
    /// minimums to the panel's (inlined into [`avx512::fill`], so compiled for it).
    #[inline(always)]
    fn stage(&mut self, format: PanelFormat, row: &[u8], g: usize, r: usize) {
        format.expand(row, &mut self.row);
        let (blocks, cols) = (self.blocks, self.blocks * BLOCK);
        self.staged[r * cols..(r + 1) * cols].copy_from_slice(&self.row.values);
        for b in 0..blocks {
            let at = (g * blocks + b) * GROUP + r;
            self.scales[at] = self.row.scales[b * LANES];
            if self.halves {
                self.scales_hi[at] = self.row.scales[b * LANES + 1];
            }
            if self.has_min {
                self.mins[at] = self.row.mins[b * LANES];
            }
        }
    }

    /// Weight rows held.
    pub fn rows(&self) -> usize {
        self.groups * GROUP
    }
}

/// Whether this CPU runs [`multiply`] (AVX-512 F/BW/VL with VNNI).
pub fn available() -> bool {
    super::dot::Kernel::best() == super::dot::Kernel::Avx512Vnni
}

/// `y[a · ldy + c] = Σ` over the panel's row `c` and activation row `a`, for every row
/// of `acts` and every row of `panel` (the panel's rows are `y`'s columns `0..rows`).
///
/// # Safety
/// `y` is valid for writes of `acts.rows` rows of `ldy` floats, the first
/// `panel.rows()` of each (`ldy ≥ panel.rows()`), and no one else reads or writes them
/// meanwhile.
///
/// # Panics
/// If the CPU lacks the kernel's extensions ([`available`]) or the panel and the
/// activations disagree in width or in the weights' format.
pub unsafe fn multiply(panel: &Panel, acts: &QuantizedRows, y: *mut f32, ldy: usize) {
    assert!(available(), "the panel kernel needs AVX-512 VNNI");
    assert_eq!(panel.blocks, acts.blocks, "panel and activations widths");
    let lanes = acts.rows * acts.blocks * LANES;
    assert_eq!(acts.values.len(), acts.rows * acts.blocks * BLOCK);
    assert!(acts.scales.len() == lanes && acts.biases.len() == lanes);
    assert!(!panel.has_min || acts.sums.len() == lanes);
    assert!(
        !panel.has_min || !panel.halves,
        "a block with two scales has no minimum"
    );
    assert!(ldy >= panel.rows());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the extensions (asserted) and the caller vouches for `y`.
    unsafe {
        avx512::multiply(panel, acts, y, ldy)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no panel kernel off x86-64 ({:p}, {ldy})", y)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// Activation rows per micro-kernel call.
    const ROWS: usize = 4;

    /// [`Panel::fill`]'s work. Each group's rows are expanded into `staged` row by row
    /// (reading the weights in order: reading 16 rows a block at a time stalled on
    /// memory), then interleaved four bytes at a time by gathers (one 64-byte step of the
    /// panel per gather). The 32-value block formats are decoded in vectors, the k-quants
    /// by [`PanelFormat::expand`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn fill(
        panel: &mut Panel,
        format: PanelFormat,
        bytes: &[u8],
        row_bytes: usize,
    ) {
        let (blocks, cols) = (panel.blocks, panel.blocks * BLOCK);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let starts = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(cols as i32));
        for g in 0..panel.groups {
            let out = panel.values[g * blocks * STEPS * GROUP * 4..].as_mut_ptr();
            let group = &bytes[g * GROUP * row_bytes..(g + 1) * GROUP * row_bytes];
            match format {
                PanelFormat::Block(block_format) if !block_format.has_high_bits() => {
                    // Copied in order first (prefetch-friendly), then gathered straight
                    // from the blocks: no expanded copy.
                    panel.staged[..group.len()].copy_from_slice(group);
                    // SAFETY: `staged` holds the group's GROUP whole rows of `row_bytes`;
                    // `values`, `scales` and `mins` the panel's groups (sized by `fill`).
                    unsafe { gather_blocks(panel, block_format, g, row_bytes, out) };
                    continue;
                }
                PanelFormat::Block(block_format) => {
                    let size = block_format.block_bytes();
                    for (r, row) in group.chunks_exact(row_bytes).enumerate() {
                        for (b, block) in row.chunks_exact(size).enumerate() {
                            // SAFETY: `block` holds one whole block of the format;
                            // `staged` GROUP rows of `cols` bytes.
                            unsafe {
                                let values = decode(block_format, block.as_ptr());
                                let at = r * cols + b * BLOCK;
                                _mm256_storeu_si256(
                                    panel.staged.as_mut_ptr().add(at).cast(),
                                    values,
                                );
                            }
                            let lane = (g * blocks + b) * GROUP + r;
                            panel.scales[lane] =
                                f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
                            if panel.has_min {
                                panel.mins[lane] =
                                    f16_bits_to_f32(u16::from_le_bytes([block[2], block[3]]));
                            }
                        }
                    }
                }
                _ => {
                    for (r, row) in group.chunks_exact(row_bytes).enumerate() {
                        panel.stage(format, row, g, r);
                    }
                }
            }
            // SAFETY: `staged` holds GROUP rows of `cols` bytes, `values` `groups` groups
            // of `blocks · STEPS` 64-byte steps.
            unsafe { interleave(panel.staged.as_ptr(), starts, blocks * STEPS, out) };
        }
    }

    /// Group `g` of Q4_0, Q4_1 or Q8_0 rows (staged whole, `row_bytes` apart) into the
    /// panel: per block, each 64-byte step gathered from the 16 rows' bytes (Q4's four
    /// bytes of nibbles give two steps: low and high halves), and the 16 scales (and
    /// minimums) gathered and converted from f16 at once.
    ///
    /// # Safety
    /// `panel.staged` holds GROUP rows of `row_bytes` of `format`'s blocks; the panel's
    /// vectors are sized for group `g` ([`Panel::fill`]); `out` is group `g`'s values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn gather_blocks(
        panel: &mut Panel,
        format: Format,
        g: usize,
        row_bytes: usize,
        out: *mut u8,
    ) {
        let (size, blocks) = (format.block_bytes(), panel.blocks);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let rows = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(row_bytes as i32));
        let staged = panel.staged.as_ptr();
        let low = _mm512_set1_epi8(0x0f);
        for b in 0..blocks {
            let starts = _mm512_add_epi32(rows, _mm512_set1_epi32((b * size) as i32));
            // SAFETY: every offset is inside one of the staged rows' block `b` (a gather
            // of 4 bytes at ≤ size − 4 from its start), and `out` holds the group's
            // `blocks · STEPS` steps.
            unsafe {
                let at = |offset: usize| _mm512_add_epi32(starts, _mm512_set1_epi32(offset as i32));
                let step = |s: usize| out.add((b * STEPS + s) * GROUP * 4);
                if format == Format::Q8_0 {
                    for s in 0..STEPS {
                        let four = _mm512_i32gather_epi32::<1>(at(2 + 4 * s), staged.cast());
                        let unsigned = _mm512_xor_si512(four, _mm512_set1_epi8(-128));
                        _mm512_storeu_si512(step(s).cast(), unsigned);
                    }
                } else {
                    for j in 0..STEPS / 2 {
                        let nibbles =
                            _mm512_i32gather_epi32::<1>(at(size - 16 + 4 * j), staged.cast());
                        _mm512_storeu_si512(step(j).cast(), _mm512_and_si512(nibbles, low));
                        let high = _mm512_and_si512(_mm512_srli_epi32(nibbles, 4), low);
                        _mm512_storeu_si512(step(j + STEPS / 2).cast(), high);
                    }
                }
                let head = _mm512_i32gather_epi32::<1>(starts, staged.cast());
                let lane = (g * blocks + b) * GROUP;
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
                _mm512_storeu_ps(panel.scales.as_mut_ptr().add(lane), d);
                if panel.has_min {
                    let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
                    _mm512_storeu_ps(panel.mins.as_mut_ptr().add(lane), m);
                }
            }
        }
    }

    /// `steps` 64-byte panel steps from 16 staged rows starting at byte offsets `starts`:
    /// step `s` gathers bytes `4s..4s + 4` of each.
    ///
    /// # Safety
    /// Each start + 4·steps bytes is readable from `staged`, 64·steps writable at `out`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn interleave(staged: *const u8, starts: __m512i, steps: usize, out: *mut u8) {
        for step in 0..steps {
            // SAFETY: the caller's contract.
            unsafe {
                let offsets = _mm512_add_epi32(starts, _mm512_set1_epi32((step * 4) as i32));
                let four = _mm512_i32gather_epi32::<1>(offsets, staged.cast());
                _mm512_storeu_si512(out.add(step * GROUP * 4).cast(), four);
            }
        }
    }

    /// One block's 32 unsigned values (see [`ExpandedRow::expand`]).
    ///
    /// # Safety
    /// `block` points at one whole block of `format`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn decode(format: Format, block: *const u8) -> __m256i {
        let size = format.block_bytes();
        // SAFETY: the caller's contract bounds every read.
        unsafe {
            if format == Format::Q8_0 {
                return _mm256_xor_si256(
                    _mm256_loadu_si256(block.add(2).cast()),
                    _mm256_set1_epi8(-128),
                );
            }
            let nibbles = _mm_loadu_si128(block.add(size - 16).cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(nibbles, 4), nibbles);
            let low = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
            if format.has_high_bits() {
                let qh = std::ptr::read_unaligned(block.add(size - 20).cast::<u32>());
                _mm256_or_si256(low, _mm256_maskz_set1_epi8(qh, 0x10))
            } else {
                low
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn multiply(panel: &Panel, acts: &QuantizedRows, y: *mut f32, ldy: usize) {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            match panel.halves {
                false => multiply_as::<1>(panel, acts, y, ldy),
                true => multiply_as::<2>(panel, acts, y, ldy),
            }
        }
    }

    /// [`multiply`] for blocks with `H` scales (1, or 2 for Q6_K's 16-value halves).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn multiply_as<const H: usize>(
        panel: &Panel,
        acts: &QuantizedRows,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut g = 0;
        while g < panel.groups {
            let pair = g + 1 < panel.groups;
            let mut a = 0;
            while a < acts.rows {
                let n = (acts.rows - a).min(ROWS);
                // SAFETY: rows a..a + n and groups g..g + 1 (+1 if pair) exist; the
                // caller vouches for y's rows and columns.
                unsafe {
                    match (n, pair) {
                        (4, true) => tile::<4, 2, H>(panel, acts, g, a, y, ldy),
                        (3, true) => tile::<3, 2, H>(panel, acts, g, a, y, ldy),
                        (2, true) => tile::<2, 2, H>(panel, acts, g, a, y, ldy),
                        (1, true) => tile::<1, 2, H>(panel, acts, g, a, y, ldy),
                        (4, false) => tile::<4, 1, H>(panel, acts, g, a, y, ldy),
                        (3, false) => tile::<3, 1, H>(panel, acts, g, a, y, ldy),
                        (2, false) => tile::<2, 1, H>(panel, acts, g, a, y, ldy),
                        _ => tile::<1, 1, H>(panel, acts, g, a, y, ldy),
                    }
                }
                a += n;
            }
            g += if pair { 2 } else { 1 };
        }
    }

    /// Activation rows `a..a + R` times panel groups `g..g + G`, written to `y`; each
    /// block in `H` parts of its own scale (and activation bias, in lane `h`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const R: usize, const G: usize, const H: usize>(
        panel: &Panel,
        acts: &QuantizedRows,
        g: usize,
        a: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let blocks = panel.blocks;
        let cols = blocks * BLOCK;
        let group_values = blocks * STEPS * GROUP * 4;
        let mut out = [[_mm512_setzero_ps(); G]; R];
        let values = panel.values.as_ptr();
        let x = acts.values.as_ptr();
        // SAFETY (of every read): b < blocks, s < STEPS, r < R and g + G ≤ groups, so
        // each offset lies inside the panel's and the activations' vectors, whose
        // lengths `fill` and `quantize_rows` set from the same counts.
        unsafe {
            for b in 0..blocks {
                let lane = |r: usize| ((a + r) * blocks + b) * LANES;
                for h in 0..H {
                    let mut sums = [[_mm512_setzero_si512(); G]; R];
                    for (r, row) in sums.iter_mut().enumerate() {
                        let bias = _mm512_set1_epi32(*acts.biases.get_unchecked(lane(r) + h));
                        *row = [bias; G];
                    }
                    for s in h * STEPS / H..(h + 1) * STEPS / H {
                        let mut w = [_mm512_setzero_si512(); G];
                        for (k, wk) in w.iter_mut().enumerate() {
                            let at = (g + k) * group_values + (b * STEPS + s) * GROUP * 4;
                            *wk = _mm512_loadu_si512(values.add(at).cast());
                        }
                        for (r, row) in sums.iter_mut().enumerate() {
                            let four = x.add((a + r) * cols + b * BLOCK + s * 4);
                            let q = _mm512_set1_epi32(std::ptr::read_unaligned(four.cast::<i32>()));
                            for (sum, wk) in row.iter_mut().zip(&w) {
                                *sum = _mm512_dpbusd_epi32(*sum, *wk, q);
                            }
                        }
                    }
                    let scales = if h == 0 {
                        &panel.scales
                    } else {
                        &panel.scales_hi
                    };
                    for k in 0..G {
                        let at = ((g + k) * blocks + b) * GROUP;
                        let d = _mm512_loadu_ps(scales.as_ptr().add(at));
                        let m = if panel.has_min {
                            _mm512_loadu_ps(panel.mins.as_ptr().add(at))
                        } else {
                            _mm512_setzero_ps()
                        };
                        for r in 0..R {
                            let da = _mm512_set1_ps(*acts.scales.get_unchecked(lane(r)));
                            let scale = _mm512_mul_ps(d, da);
                            out[r][k] =
                                _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][k]), scale, out[r][k]);
                            if panel.has_min {
                                let s = _mm512_set1_ps(*acts.sums.get_unchecked(lane(r)));
                                out[r][k] = _mm512_fmadd_ps(m, s, out[r][k]);
                            }
                        }
                    }
                }
            }
            for (r, row) in out.iter().enumerate() {
                for (k, v) in row.iter().enumerate() {
                    _mm512_storeu_ps(y.add((a + r) * ldy + (g + k) * GROUP), *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quantized::dot::{Kernel, rows_times_activations};
    use candle_core::quantized::GgmlType;
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// `w` (`out × cols`) quantized to `dtype` blocks by candle.
    fn blocks_of(dtype: GgmlDType, w: &[f32], out: usize, cols: usize) -> Vec<u8> {
        let t = candle_core::Tensor::from_slice(w, (out, cols), &candle_core::Device::Cpu)
            .expect("test tensor");
        let q = candle_core::quantized::QTensor::quantize(&t, dtype).expect("test tensor");
        q.data().expect("test tensor").to_vec()
    }

    /// The panel product, through `panel` (reused across calls as the threads' panels
    /// are: earlier formats and widths must leave nothing behind).
    fn panel_product(
        panel: &mut Panel,
        format: PanelFormat,
        bytes: &[u8],
        acts: &QuantizedRows,
        out: usize,
    ) -> Vec<f32> {
        panel.fill(format, bytes, acts.blocks * BLOCK);
        assert_eq!(panel.rows(), out);
        let mut y = vec![f32::NAN; acts.rows * (out + 3)];
        // SAFETY: y holds acts.rows rows of out + 3 floats and nothing else touches it.
        unsafe { multiply(panel, acts, y.as_mut_ptr(), out + 3) };
        (0..acts.rows)
            .flat_map(|a| y[a * (out + 3)..a * (out + 3) + out].to_vec())
            .collect()
    }

    #[test]
    fn panels_compute_the_integer_dot_products_sums() {
        if !available() {
            eprintln!("skipped panels_compute_the_integer_dot_products_sums: no AVX-512 VNNI");
            return;
        }
        let formats = [
            (GgmlDType::Q4_0, Format::Q4_0),
            (GgmlDType::Q4_1, Format::Q4_1),
            (GgmlDType::Q5_0, Format::Q5_0),
            (GgmlDType::Q5_1, Format::Q5_1),
            (GgmlDType::Q8_0, Format::Q8_0),
        ];
        // Odd and even group counts; 1, 2, 7, 5 and 4 activation rows (every remainder of
        // 4), one panel reused across formats and widths.
        let mut shared = Panel::default();
        let shapes = [
            (16, 64, 1),
            (48, 96, 7),
            (32, 256, 5),
            (16, 64, 2),
            (64, 32, 4),
            (32, 96, 2),
        ];
        for (out, cols, rows) in shapes {
            let w = random(out * cols, (out * cols) as u64);
            let x = random(rows * cols, rows as u64 + 7);
            for (dtype, format) in formats {
                let bytes = blocks_of(dtype, &w, out, cols);
                let acts = quantize_rows(&x, rows, cols, format.zero_point(), format.has_min());
                let got =
                    panel_product(&mut shared, PanelFormat::Block(format), &bytes, &acts, out);
                let mut by_row = vec![0.0; out * rows];
                rows_times_activations(
                    Kernel::Portable,
                    format,
                    &bytes,
                    &acts,
                    &mut by_row,
                    &mut ExpandedRow::default(),
                );
                for a in 0..rows {
                    for c in 0..out {
                        let (g, want) = (got[a * out + c], by_row[c * rows + a]);
                        assert!(
                            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "{format:?} {out}×{cols}, row {a} col {c}: {g} against {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn k_quant_panels_hold_the_values_candle_dequantizes() {
        let (out, cols) = (16, 512);
        let w = random(out * cols, 3);
        for (dtype, format) in [
            (GgmlDType::Q4K, PanelFormat::Q4K),
            (GgmlDType::Q5K, PanelFormat::Q5K),
            (GgmlDType::Q6K, PanelFormat::Q6K),
        ] {
            let bytes = blocks_of(dtype, &w, out, cols);
            let mut expected = vec![0f32; out * cols];
            match dtype {
                GgmlDType::Q4K => BlockQ4K::to_float(bytemuck_blocks(&bytes), &mut expected),
                GgmlDType::Q5K => BlockQ5K::to_float(bytemuck_blocks(&bytes), &mut expected),
                _ => BlockQ6K::to_float(bytemuck_blocks(&bytes), &mut expected),
            }
            let mut row = ExpandedRow::with_blocks(cols / BLOCK);
            for r in 0..out {
                let bytes = &bytes[r * format.row_bytes(cols)..(r + 1) * format.row_bytes(cols)];
                format.expand(bytes, &mut row);
                for i in 0..cols {
                    let (b, u) = (i / BLOCK, f32::from(row.values[i]));
                    let value = match format.halves() {
                        // Q6_K: a scale per 16 values, zero point 32.
                        true => row.scales[b * LANES + (i % BLOCK) / 16] * (u - 32.0),
                        false => row.scales[b * LANES] * u + row.mins[b * LANES],
                    };
                    let want = expected[r * cols + i];
                    assert!(
                        (value - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{dtype:?} row {r} value {i}: {value} against {want}"
                    );
                }
            }
        }
    }

    /// `bytes` viewed as candle's blocks of `T` (candle's own quantization wrote them, so
    /// they are whole, aligned blocks).
    fn bytemuck_blocks<T>(bytes: &[u8]) -> &[T] {
        let size = std::mem::size_of::<T>();
        assert!(bytes.len().is_multiple_of(size));
        assert!((bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: length and alignment checked; candle's block types are plain data for
        // which every bit pattern is a value.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size)
        }
    }

    #[test]
    fn k_quant_panels_multiply_like_candles_dequantized_weights() {
        if !available() {
            eprintln!(
                "skipped k_quant_panels_multiply_like_candles_dequantized_weights: no AVX-512 VNNI"
            );
            return;
        }
        let (out, cols, rows) = (32, 256, 6);
        let mut shared = Panel::default();
        let w = random(out * cols, 11);
        let x = random(rows * cols, 12);
        for (dtype, format) in [
            (GgmlDType::Q4K, PanelFormat::Q4K),
            (GgmlDType::Q5K, PanelFormat::Q5K),
            (GgmlDType::Q6K, PanelFormat::Q6K),
        ] {
            let bytes = blocks_of(dtype, &w, out, cols);
            let acts = format.quantize(&x, rows, cols);
            let got = panel_product(&mut shared, format, &bytes, &acts, out);
            // The reference: candle's dequantized weights times the activations as
            // quantized (values × scales), in f64.
            let t = candle_core::quantized::QTensor::quantize(
                &candle_core::Tensor::from_slice(&w, (out, cols), &candle_core::Device::Cpu)
                    .expect("test tensor"),
                dtype,
            )
            .expect("test tensor")
            .dequantize(&candle_core::Device::Cpu)
            .expect("test tensor")
            .flatten_all()
            .expect("test tensor")
            .to_vec1::<f32>()
            .expect("test tensor");
            for a in 0..rows {
                for c in 0..out {
                    let want: f64 = (0..cols)
                        .map(|i| {
                            let q = f64::from(acts.values[a * cols + i]);
                            let d = f64::from(acts.scales[(a * acts.blocks + i / BLOCK) * LANES]);
                            f64::from(t[c * cols + i]) * q * d
                        })
                        .sum();
                    let g = f64::from(got[a * out + c]);
                    assert!(
                        (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{dtype:?} row {a} col {c}: {g} against {want}"
                    );
                }
            }
        }
    }
}
