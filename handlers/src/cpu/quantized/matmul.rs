//! [`QuantizedMatrix`]: `x · Wᵀ` with `W` kept in its GGML blocks.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 run Spillway's kernels ([`super::dot`]) on the bytes
//! where they are (a memory map of the model file, with no copy): the activations are quantized
//! per row, and the weight rows are shared out to the thread team in chunks. The
//! k-quants (Q2_K to Q6_K) run candle's dot products for their blocks
//! (`GgmlType::vec_dot`, AVX2 where the CPU has it), also on the bytes where they are
//! and shared out to the same team. Bytes that are not aligned for candle's block type
//! are copied once into candle's `QMatMul`.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::activations::quantize_rows;
use super::dequantize::dequantize;
use super::dot::{FEW_ROWS, Kernel, rows_times_activations};
use super::panel::{self, GROUP, Panel, PanelFormat};
use super::weights::{BLOCK, ExpandedRow, Format};

/// A quantized weight's bytes: owned, or a view of a memory map that it keeps alive.
pub type WeightBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A linear layer's weight `[out, in]` in GGML blocks, ready for `x · Wᵀ`.
pub struct QuantizedMatrix {
    dtype: GgmlDType,
    out: usize,
    inp: usize,
    bytes: WeightBytes,
    candle: Option<QMatMul>,
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedMatrix({:?}, [{}, {}])",
            self.dtype, self.out, self.inp
        )
    }
}

thread_local! {
    /// Each thread's expanded weight row, reused across calls.
    static SCRATCH: RefCell<ExpandedRow> = RefCell::new(ExpandedRow::default());
    /// Each thread's tile of weight rows dequantized to f32, reused across calls.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's tile of weight rows unpacked into 8-bit panels, reused across calls.
    static PANEL: RefCell<Panel> = RefCell::new(Panel::default());
}

/// Activation rows from which a product dequantizes tiles of weight rows to f32 and
/// multiplies them with the f32 GEMM instead of running the integer dot products: a
/// prompt is compute-bound, and the GEMM's register blocking does more multiplies per
/// weight read than a dot product per pair of rows.
pub const GEMM_ROWS: usize = 16;

impl QuantizedMatrix {
    /// `bytes` hold `out` rows of `inp / block` blocks of `dtype` (GGML's row-major
    /// layout). Bytes neither Spillway's kernels nor candle's block types can read where
    /// they are are copied into candle's `QMatMul`.
    pub fn new(dtype: GgmlDType, out: usize, inp: usize, bytes: WeightBytes) -> Result<Self> {
        let block = dtype.block_size();
        if !inp.is_multiple_of(block) {
            candle_core::bail!("{dtype:?} rows of {inp} values are not whole {block}-value blocks");
        }
        let expected = out * inp / block * dtype.type_size();
        let len = (*bytes).as_ref().len();
        if len != expected {
            candle_core::bail!(
                "a {dtype:?} [{out}, {inp}] weight needs {expected} bytes, not {len}"
            );
        }
        let in_place = match Format::of(dtype) {
            Some(_) => true,
            None => candle_blocks::fit(dtype, (*bytes).as_ref()),
        };
        let candle = match in_place {
            true => None,
            false => Some(QMatMul::from_qtensor(candle_blocks::tensor(
                dtype,
                (*bytes).as_ref(),
                vec![out, inp],
                &Device::Cpu,
            )?)?),
        };
        Ok(Self {
            dtype,
            out,
            inp,
            bytes,
            candle,
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Whether products read the bytes where they were given (else a copy in candle's
    /// blocks).
    pub fn in_place(&self) -> bool {
        self.candle.is_none()
    }

    /// Whether matrices of `dtype` are multiplied where their bytes are (when aligned
    /// for candle's block type, which a GGUF's or Spillway's converted file is).
    pub fn multiplies_in_place(dtype: GgmlDType) -> bool {
        Format::of(dtype).is_some() || candle_blocks::handles(dtype)
    }

    /// The weight dequantized to f32 `[out, in]` (for devices without these kernels).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        candle_blocks::tensor(
            self.dtype,
            self.data(),
            vec![self.out, self.inp],
            &Device::Cpu,
        )?
        .dequantize(&Device::Cpu)?
        .to_device(device)
    }

    /// Rows `ids` dequantized to f32 `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let row_bytes = self.inp / self.dtype.block_size() * self.dtype.type_size();
        let mut rows = Vec::with_capacity(ids.len());
        for &id in ids {
            let id = id as usize;
            if id >= self.out {
                candle_core::bail!("row {id} of a {}-row table", self.out);
            }
            let bytes = &self.data()[id * row_bytes..(id + 1) * row_bytes];
            rows.push(
                candle_blocks::tensor(self.dtype, bytes, vec![1, self.inp], &Device::Cpu)?
                    .dequantize(&Device::Cpu)?,
            );
        }
        Tensor::cat(&rows, 0)
    }

    fn data(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    /// `x · Wᵀ` for `x` `[..., in]` (any float dtype, on the CPU) → `[..., out]` in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Self::forward_shared(&[self], x)?.remove(0))
    }

    /// `x · Wᵢᵀ` for every matrix of `matrices`, all reading the same `x` (a block's q, k
    /// and v; its gate and up). Neighbours multiplied in place in one dtype share one
    /// quantization of `x` and one parallel region; copies in candle's `QMatMul` run on
    /// their own.
    pub fn forward_shared(matrices: &[&Self], x: &Tensor) -> Result<Vec<Tensor>> {
        if matrices.is_empty() {
            return Ok(Vec::new());
        }
        let mut dims = x.dims().to_vec();
        let inp = dims.pop().unwrap_or(0);
        for m in matrices {
            if inp != m.inp {
                candle_core::bail!("{inp} input features for a [{}, {}] weight", m.out, m.inp);
            }
        }
        let rows = x.elem_count() / inp.max(1);
        let x = x.to_dtype(DType::F32)?.reshape((rows, inp))?;
        let shaped = |y: Tensor, out: usize| {
            let mut dims = dims.clone();
            dims.push(out);
            y.reshape(dims)
        };
        // Neighbours multiplied in place in one dtype share a quantization of x and a
        // parallel region (a Q4_K_M block's q and k are Q5_0, its v Q8_0).
        let groups = matrices
            .chunk_by(|a, b| a.candle.is_none() && b.candle.is_none() && a.dtype == b.dtype);
        // x's values where they are (a CPU tensor, contiguous), else copied once. Not
        // while a candle product runs below: it reads x's storage too, and a second read
        // lock on this thread could wait behind a queued writer.
        let storage = x.storage_and_layout();
        let storage = match matrices.iter().all(|m| m.candle.is_none()) {
            true => Some(storage),
            false => None,
        };
        let in_place = match storage
            .as_ref()
            .map(|(s, l)| (&**s, l.contiguous_offsets()))
        {
            Some((candle_core::Storage::Cpu(cpu), Some((start, end)))) => {
                Some(&cpu.as_slice::<f32>()?[start..end])
            }
            _ => None,
        };
        let mut copied: Option<Vec<f32>> = None;
        let mut outputs = Vec::with_capacity(matrices.len());
        for group in groups {
            if let Some(candle) = &group[0].candle {
                outputs.push(shaped(candle.forward(&x)?, group[0].out)?);
                continue;
            }
            let values = match in_place {
                Some(values) => values,
                None => {
                    if copied.is_none() {
                        copied = Some(x.flatten_all()?.to_vec1::<f32>()?);
                    }
                    copied.as_deref().unwrap_or_default()
                }
            };
            let ys = match Format::of(group[0].dtype) {
                _ if rows >= PANEL_ROWS && Self::multiplies_in_panels(group) => {
                    Self::tiled_products(group, values, rows, true)?
                }
                _ if rows >= GEMM_ROWS => Self::tiled_products(group, values, rows, false)?,
                Some(format) => Self::products(group, format, Kernel::best(), values, rows),
                None => candle_blocks::products(group, values, rows)?,
            };
            for (y, m) in ys.into_iter().zip(group) {
                outputs.push(shaped(
                    Tensor::from_vec(y, (rows, m.out), &Device::Cpu)?,
                    m.out,
                )?);
            }
        }
        Ok(outputs)
    }

    /// `x · Wᵀ` for `x` `rows × in` with `kernel`, returned `rows × out`.
    #[cfg(test)]
    fn product(&self, format: Format, kernel: Kernel, x: &[f32], rows: usize) -> Vec<f32> {
        Self::products(&[self], format, kernel, x, rows).concat()
    }

    /// `x · Wᵢᵀ` for each of `matrices` (all of `format`, as wide as `x`'s `rows` rows),
    /// each returned `rows × out`: `x` quantized once, the weight rows of all matrices
    /// shared out to the team in chunks that never straddle two matrices.
    fn products(
        matrices: &[&Self],
        format: Format,
        kernel: Kernel,
        x: &[f32],
        rows: usize,
    ) -> Vec<Vec<f32>> {
        let inp = matrices[0].inp;
        let acts = quantize_rows(x, rows, inp, format.zero_point(), format.has_min());
        let row_bytes = inp / BLOCK * format.block_bytes();
        let per_thread = if rows < FEW_ROWS { 4 } else { 16 };
        shared_out(matrices, rows, per_thread, |which, first, out| {
            let count = out.len() / rows;
            let bytes = &matrices[which].data()[first * row_bytes..(first + count) * row_bytes];
            SCRATCH.with_borrow_mut(|scratch| {
                rows_times_activations(kernel, format, bytes, &acts, out, scratch)
            });
        })
    }

    /// Whether [`Self::tiled_products`] multiplies `matrices` (one dtype) in 8-bit
    /// panels: the CPU runs the panel kernel, the format unpacks into panels, and the
    /// tiles are whole panel groups.
    fn multiplies_in_panels(matrices: &[&Self]) -> bool {
        let outs: Vec<usize> = matrices.iter().map(|m| m.out).collect();
        PromptKernel::chosen() == PromptKernel::Integer
            && PanelFormat::of(matrices[0].dtype).is_some()
            && panel_chunk_rows(&outs).is_some()
    }

    /// [`Self::products`] by tiles: each chunk of weight rows is unpacked into the
    /// thread's scratch and multiplied by all of `x`, written into its columns of `y`
    /// where they belong. Where the CPU has AVX-512 VNNI and the format unpacks into
    /// 8-bit panels ([`panel`]), `x` is quantized once as the integer products quantize
    /// it and the tiles are multiplied in integers; else each tile is dequantized to f32
    /// and multiplied with the f32 GEMM (`x` stays f32, unrounded). For matrices of one
    /// dtype, in place.
    #[allow(unsafe_code)] // Tasks write disjoint column ranges of the same outputs.
    fn tiled_products(
        matrices: &[&Self],
        x: &[f32],
        rows: usize,
        panels: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let (dtype, inp) = (matrices[0].dtype, matrices[0].inp);
        let row_bytes = inp / dtype.block_size() * dtype.type_size();
        let outs: Vec<usize> = matrices.iter().map(|m| m.out).collect();
        // Two chunks a thread: the GEMM's speed grows with its tile (SmolLM2 Q4_1's
        // 128-token prefill took about the same with 1, 2 or 4, 8 % longer with 8).
        let integer = PanelFormat::of(dtype)
            .filter(|_| panels)
            .map(|format| (format, format.quantize(x, rows, inp)));
        let size = match (&integer, panel_chunk_rows(&outs)) {
            (Some(_), Some(size)) => size,
            _ => chunk_rows(&outs, 2),
        };
        let tiles: Vec<(usize, usize)> = outs
            .iter()
            .enumerate()
            .flat_map(|(which, &out)| (0..out).step_by(size).map(move |first| (which, first)))
            .collect();
        // Panels store every value of their columns; the f32 tiles' GEMM gets zeros.
        let mut ys: Vec<Vec<f32>> = outs
            .iter()
            .map(|&out| match integer {
                Some(_) => Vec::with_capacity(rows * out),
                None => vec![0f32; rows * out],
            })
            .collect();
        let targets: Vec<Columns> = ys.iter_mut().map(|y| Columns(y.as_mut_ptr())).collect();
        let failure = std::sync::OnceLock::new();
        crate::cpu::team::for_each_task(tiles.len(), &|t| {
            let (which, first) = tiles[t];
            let (out, count) = (outs[which], size.min(outs[which] - first));
            let bytes = &matrices[which].data()[first * row_bytes..(first + count) * row_bytes];
            if let Some((format, acts)) = &integer {
                PANEL.with_borrow_mut(|p| {
                    p.fill(*format, bytes, inp);
                    debug_assert_eq!(p.rows(), count, "a panel tile is whole groups");
                    // SAFETY: as below; the panel holds `count` rows, this tile's columns.
                    unsafe { panel::multiply(p, acts, targets[which].0.add(first), out) }
                });
                return;
            }
            let done = TILE.with_borrow_mut(|tile| {
                tile.resize(count * inp, 0.0);
                match Format::of(dtype) {
                    Some(format) => dequantize(format, bytes, tile),
                    None => candle_blocks::dequantize(dtype, bytes, tile)?,
                }
                // SAFETY: y `[rows, out]` stays alive and otherwise untouched until every
                // task has returned; this tile's columns [first, first + count) lie inside
                // it and no other task writes them.
                unsafe {
                    crate::cpu::linear::sgemm_xwt_columns(
                        x,
                        rows,
                        tile,
                        count,
                        inp,
                        targets[which].0.add(first),
                        out,
                    )
                }
            });
            if let Err(e) = done {
                let _ = failure.set(e);
            }
        });
        if integer.is_some() {
            for (y, &out) in ys.iter_mut().zip(&outs) {
                // SAFETY: the tiles cover every column of every output (whole panel
                // groups, `panel_chunk_rows`) and `panel::multiply` stored each of their
                // `rows` values; a panic in a task was re-raised above, before this.
                unsafe { y.set_len(rows * out) };
            }
        }
        match failure.into_inner() {
            Some(e) => Err(e),
            None => Ok(ys),
        }
    }
}

/// Activation rows from which products whose format unpacks into 8-bit panels use them
/// ([`PromptKernel::Integer`]) instead of the integer dot products: a panel is unpacked
/// once per call and met by every row. Measured on SmolLM2 Q4_1
/// (`examples/generate_timing`, one decode step advancing ROWS sequences, ms, panels vs
/// dot products): 2 rows 8.9 / 6.8, 3 rows 9.8 / 9.5, 4 rows 10.7 / 23.8, 8 rows
/// 14.9 / 35.4; 16 rows 21.9 (the f32 tiles took 46.6).
pub const PANEL_ROWS: usize = 4;

/// How prompt products (≥ [`GEMM_ROWS`] activation rows) multiply quantized tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKernel {
    /// 8-bit panels and the VNNI micro-kernel ([`panel`]), activations quantized as the
    /// integer products quantize them.
    Integer,
    /// Tiles dequantized to f32 and the f32 GEMM, activations unrounded.
    Float,
}

impl PromptKernel {
    /// [`Self::Integer`] where the CPU runs it, unless `SPILLWAY_PROMPT_KERNEL=float`
    /// (read once) asks for the f32 tiles (to compare the two; Q6_K and the other
    /// k-quants always take the f32 tiles).
    pub fn chosen() -> Self {
        static CHOSEN: std::sync::OnceLock<PromptKernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let asked = std::env::var("SPILLWAY_PROMPT_KERNEL").ok();
            match asked.as_deref() {
                Some("float") => Self::Float,
                _ if panel::available() => Self::Integer,
                _ => Self::Float,
            }
        })
    }
}

/// An output matrix whose disjoint column ranges different tasks write.
struct Columns(*mut f32);
// SAFETY: only used by `tiled_products`, whose tasks write disjoint columns.
#[allow(unsafe_code)]
unsafe impl Sync for Columns {}

/// The largest number of weight rows a chunk can take that divides every one of `outs`
/// (so no chunk straddles two matrices) and leaves the team `per_thread` chunks a thread
/// to balance (at most 256).
fn chunk_rows(outs: &[usize], per_thread: usize) -> usize {
    let total: usize = outs.iter().sum();
    let enough = crate::cpu::threads::calling_thread_limit() * per_thread;
    [256usize, 128, 64, 32, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|&c| outs.iter().all(|o| o % c == 0) && total / c >= enough)
        .unwrap_or(1)
}

/// [`chunk_rows`] for 8-bit panels: whole panel groups (a multiple of [`GROUP`] rows),
/// even if that leaves the team fewer chunks; `None` where `outs` are not whole groups.
fn panel_chunk_rows(outs: &[usize]) -> Option<usize> {
    if !outs.iter().all(|o| o.is_multiple_of(GROUP)) {
        return None;
    }
    Some(chunk_rows(outs, 2).max(GROUP) / GROUP * GROUP).filter(|c| outs.iter().all(|o| o % c == 0))
}

/// The products of `rows` activation rows with the weight rows of `matrices`, each
/// returned `rows × out`: the weight rows of all matrices are shared out to the team in
/// chunks that never straddle two matrices, and `chunk(which, first, out)` fills `out`
/// with the products of matrix `which`'s rows from `first` on (`out.len() / rows` of
/// them), `rows` values per weight row.
fn shared_out(
    matrices: &[&QuantizedMatrix],
    rows: usize,
    per_thread: usize,
    chunk: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let outs: Vec<usize> = matrices.iter().map(|m| m.out).collect();
    let total: usize = outs.iter().sum();
    // A decode step's products are memory-bound and short: 4 chunks a thread let each
    // thread read long runs of weight bytes (the hardware prefetcher starts over at
    // every jump) and claim chunks less often. SmolLM2 Q4_1's decode step
    // (`examples/generate_timing`) took 6.9 ms with 16 chunks a thread, 4.6 with 4,
    // about the same with 2, 5.3 with 8. Integer products of a few rows keep 16 (4 was
    // no faster).
    let size = chunk_rows(&outs, per_thread);
    let starts: Vec<usize> = outs
        .iter()
        .scan(0, |start, &o| {
            let s = *start;
            *start += o;
            Some(s)
        })
        .collect();
    let mut by_weight_row = vec![0f32; total * rows];
    crate::cpu::team::for_each_chunk_mut(&mut by_weight_row, size * rows, |index, out| {
        let global = index * size;
        let which = starts.partition_point(|&s| s <= global) - 1;
        chunk(which, global - starts[which], out)
    });
    starts
        .iter()
        .zip(&outs)
        .map(|(&start, &out)| {
            let part = &by_weight_row[start * rows..(start + out) * rows];
            if rows == 1 {
                return part.to_vec();
            }
            // Transposed 16 weight rows at a time, so each write fills a cache line
            // (writing one column of y at a time was 10 % of a 128-token prefill).
            let mut y = vec![0f32; rows * out];
            for first in (0..out).step_by(16) {
                let last = (first + 16).min(out);
                for a in 0..rows {
                    for r in first..last {
                        y[a * out + r] = part[r * rows + a];
                    }
                }
            }
            y
        })
        .collect()
}

/// Products with candle's block types, on the bytes where they are.
mod candle_blocks {
    use super::*;

    /// Calls `$f::<T>($args)` with `T` candle's block type for `$dtype`, or evaluates
    /// `$otherwise` for dtypes not handled here.
    macro_rules! with_block {
        ($dtype:expr, $otherwise:expr, $f:ident($($args:expr),*)) => {
            match $dtype {
                GgmlDType::Q2K => $f::<BlockQ2K>($($args),*),
                GgmlDType::Q3K => $f::<BlockQ3K>($($args),*),
                GgmlDType::Q4K => $f::<BlockQ4K>($($args),*),
                GgmlDType::Q5K => $f::<BlockQ5K>($($args),*),
                GgmlDType::Q6K => $f::<BlockQ6K>($($args),*),
                _ => $otherwise,
            }
        };
    }

    /// candle's tensor of `bytes` as `dtype` blocks `dims` (a copy). candle reads its
    /// input as blocks where it lies, so misaligned bytes are first copied to an
    /// aligned buffer.
    pub(super) fn tensor(
        dtype: GgmlDType,
        bytes: &[u8],
        dims: Vec<usize>,
        device: &Device,
    ) -> Result<QTensor> {
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u64>()) {
            return candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype, bytes, dims, device,
            );
        }
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        let copy = words_as_bytes(&mut words, bytes.len());
        copy.copy_from_slice(bytes);
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, copy, dims, device)
    }

    /// The first `len` bytes of `words`.
    #[allow(unsafe_code)]
    fn words_as_bytes(words: &mut [u64], len: usize) -> &mut [u8] {
        assert!(len <= words.len() * 8);
        // SAFETY: `len` bytes lie inside `words` (checked), u8 has no alignment, and
        // the mutable borrow of `words` covers the returned slice's life.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
    }

    /// Whether `dtype` is handled here.
    pub(super) fn handles(dtype: GgmlDType) -> bool {
        with_block!(dtype, None, block_size()).is_some()
    }

    fn block_size<T: GgmlType>() -> Option<usize> {
        Some(std::mem::size_of::<T>())
    }

    /// Whether `bytes` can be read as `dtype`'s blocks where they are (a dtype handled
    /// here, its blocks' alignment, whole blocks).
    pub(super) fn fit(dtype: GgmlDType, bytes: &[u8]) -> bool {
        with_block!(dtype, false, blocks_fit(bytes, dtype))
    }

    fn blocks_fit<T: GgmlType>(bytes: &[u8], dtype: GgmlDType) -> bool {
        std::mem::size_of::<T>() == dtype.type_size() && as_blocks::<T>(bytes).is_some()
    }

    /// `bytes` as blocks of `T`, if aligned for it and a whole number of them.
    #[allow(unsafe_code)]
    fn as_blocks<T: GgmlType>(bytes: &[u8]) -> Option<&[T]> {
        let size = std::mem::size_of::<T>();
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>());
        if !aligned || size == 0 || !bytes.len().is_multiple_of(size) {
            return None;
        }
        // SAFETY: the pointer is aligned for `T` and the length a whole number of `T`s
        // inside `bytes`; candle's block types are `repr(C)` structs of integers and
        // f16s, for which any bytes are a valid value.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
    }

    /// Writes the f32 weights of `bytes`, whole blocks of `dtype` (handled here, fitting
    /// ([`fit`])), to `out`.
    pub(super) fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
        with_block!(
            dtype,
            candle_core::bail!("no in-place dequantization for {dtype:?}"),
            to_float(bytes, out)
        )
    }

    fn to_float<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
        let blocks = as_blocks::<T>(bytes).ok_or_else(|| {
            candle_core::Error::Msg("weights not aligned for their blocks".into())
        })?;
        if out.len() != blocks.len() * T::BLCK_SIZE {
            candle_core::bail!("{} blocks into {} values", blocks.len(), out.len());
        }
        T::to_float(blocks, out);
        Ok(())
    }

    /// [`QuantizedMatrix::products`] for matrices of one dtype handled here, all
    /// fitting ([`fit`]).
    pub(super) fn products(
        matrices: &[&QuantizedMatrix],
        x: &[f32],
        rows: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let dtype = matrices[0].dtype;
        with_block!(
            dtype,
            candle_core::bail!("no in-place products for {dtype:?}"),
            products_of(matrices, x, rows)
        )
    }

    fn products_of<T: GgmlType>(
        matrices: &[&QuantizedMatrix],
        x: &[f32],
        rows: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let inp = matrices[0].inp;
        let blocks = inp / T::BLCK_SIZE;
        let weights = matrices
            .iter()
            .map(|m| as_blocks::<T>(m.data()))
            .collect::<Option<Vec<&[T]>>>()
            .ok_or_else(|| {
                candle_core::Error::Msg("weights not aligned for their blocks".into())
            })?;
        // The activations quantized once, to the blocks `T` multiplies with.
        let mut acts = vec![T::VecDotType::zeros(); rows * blocks];
        for (x, a) in x.chunks_exact(inp).zip(acts.chunks_exact_mut(blocks)) {
            T::VecDotType::from_float(x, a);
        }
        let per_thread = if rows < FEW_ROWS { 4 } else { 16 };
        Ok(shared_out(
            matrices,
            rows,
            per_thread,
            |which, first, out| {
                for (i, products) in out.chunks_exact_mut(rows).enumerate() {
                    let row = &weights[which][(first + i) * blocks..][..blocks];
                    for (product, a) in products.iter_mut().zip(acts.chunks_exact(blocks)) {
                        *product = T::vec_dot(inp, row, a);
                    }
                }
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `out × inp` weights quantized by candle from smooth random values.
    fn quantized(dtype: GgmlDType, out: usize, inp: usize, seed: u64) -> (Tensor, QuantizedMatrix) {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu)
            .and_then(|w| w.affine(0.05, (seed % 7) as f64 * 0.01))
            .expect("weights");
        let q = candle_core::quantized::QTensor::quantize(&w, dtype).expect("quantize");
        let bytes: Vec<u8> = q.data().expect("bytes").into_owned();
        let reference = q.dequantize(&Device::Cpu).expect("dequantize");
        let matrix = QuantizedMatrix::new(dtype, out, inp, Arc::new(bytes)).expect("matrix");
        (reference, matrix)
    }

    fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
        let scale = want
            .abs()
            .and_then(|a| a.max_all())
            .and_then(|m| m.to_scalar::<f32>());
        let diff = (got - want)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|m| m.to_scalar::<f32>());
        diff.expect("diff") / scale.expect("scale")
    }

    /// The formats with Spillway's own 32-value block kernels.
    const BLOCK_FORMATS: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    /// Each format's product against dequantize-then-f32 matmul: the only difference is
    /// the activations' 8-bit rounding, a bounded relative error.
    #[test]
    fn products_match_the_dequantized_weights_within_activation_rounding() {
        let k_quants = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];
        for dtype in BLOCK_FORMATS.into_iter().chain(k_quants) {
            let shapes = [
                (96, 256, 1),
                (40, 768, 7),
                (300, 512, 3),
                (72, 512, 40),
                (96, 512, 24),
            ];
            for (out, inp, rows) in shapes {
                let (reference, matrix) = quantized(dtype, out, inp, out as u64);
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).expect("x");
                let want = x.matmul(&reference.t().expect("t")).expect("matmul");
                let got = matrix.forward(&x).expect("forward");
                assert_eq!(got.dims(), &[rows, out]);
                let error = relative_error(&got, &want);
                // From GEMM_ROWS rows on, f32 tiles meet unrounded activations: the
                // dequantized product, up to f32 summation order (the integer panels
                // round the activations as the dot products do).
                let float_tiles =
                    rows >= GEMM_ROWS && !QuantizedMatrix::multiplies_in_panels(&[&matrix]);
                let bound = if float_tiles { 1e-5 } else { 2e-2 };
                assert!(
                    error < bound,
                    "{dtype:?} [{out}, {inp}] × {rows} rows: {error}"
                );
                assert!(matrix.in_place(), "{dtype:?}");
            }
        }
    }

    /// A prompt's rows through the integer panels give the integer dot products' sums
    /// (the same quantized activations, the same per-block arithmetic).
    #[test]
    fn prompt_panels_equal_the_integer_dot_products() {
        if PromptKernel::chosen() != PromptKernel::Integer {
            eprintln!("skipped prompt_panels_equal_the_integer_dot_products: no AVX-512 VNNI");
            return;
        }
        for dtype in BLOCK_FORMATS {
            let format = Format::of(dtype).expect("format");
            let (_, matrix) = quantized(dtype, 96, 256, 9);
            let rows = GEMM_ROWS + 6;
            let x: Vec<f32> = (0..rows * 256)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) * 0.01)
                .collect();
            let want = matrix.product(format, Kernel::Portable, &x, rows);
            let xt = Tensor::from_vec(x, (rows, 256), &Device::Cpu).expect("x");
            let got = matrix.forward(&xt).expect("forward");
            let got = got
                .flatten_all()
                .and_then(|g| g.to_vec1::<f32>())
                .expect("got");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{dtype:?}: {g} against {w}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_product_and_leading_dims_are_kept() {
        let (_, matrix) = quantized(GgmlDType::Q4_1, 70, 192, 3);
        let x: Vec<f32> = (0..5 * 192)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.02)
            .collect();
        let baseline = matrix.product(Format::Q4_1, Kernel::Portable, &x, 5);
        for &kernel in Kernel::available() {
            let got = matrix.product(Format::Q4_1, kernel, &x, 5);
            for (g, b) in got.iter().zip(&baseline) {
                assert!(
                    (g - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{kernel:?}: {g} against {b}"
                );
            }
        }
        let x3 = Tensor::from_vec(x, (1, 5, 192), &Device::Cpu).expect("x");
        assert_eq!(matrix.forward(&x3).expect("forward").dims(), &[1, 5, 70]);
    }

    /// Matrices sharing an input give, computed together, what each gives alone.
    #[test]
    fn shared_products_equal_separate_ones() {
        let (_, q) = quantized(GgmlDType::Q4_1, 96, 128, 1);
        let (_, k) = quantized(GgmlDType::Q4_1, 32, 128, 2);
        let (_, other) = quantized(GgmlDType::Q8_0, 40, 128, 3);
        let (_, gate) = quantized(GgmlDType::Q4K, 64, 256, 4);
        let (_, up) = quantized(GgmlDType::Q4K, 32, 256, 5);
        let (_, down) = quantized(GgmlDType::Q6K, 16, 256, 6);
        for rows in [1, 6, GEMM_ROWS + 3] {
            for (width, group) in [
                (128, vec![&q, &k]),
                (128, vec![&q, &k, &other]),
                (256, vec![&gate, &up]),
                (256, vec![&gate, &up, &down]),
            ] {
                let x = Tensor::randn(0f32, 1.0, (1, rows, width), &Device::Cpu).expect("x");
                let together = QuantizedMatrix::forward_shared(&group, &x).expect("shared");
                for (m, y) in group.iter().zip(&together) {
                    let alone = m.forward(&x).expect("alone");
                    assert_eq!(y.dims(), alone.dims());
                    // Integer products are exact; together and alone, tiles differ in
                    // size (and may take panels or dot products), so f32 sums may
                    // differ in order.
                    let bound = if rows >= PANEL_ROWS { 1e-6 } else { 0.0 };
                    assert!(relative_error(y, &alone) <= bound, "{rows} rows");
                }
            }
        }
    }

    /// Bytes seen one byte into their buffer: misaligned for candle's block types.
    struct OneIn(Vec<u8>);

    impl AsRef<[u8]> for OneIn {
        fn as_ref(&self) -> &[u8] {
            &self.0[1..]
        }
    }

    #[test]
    fn k_quants_in_place_equal_candles_copy_and_misaligned_bytes_are_copied() {
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q3K,
        ] {
            let (_, matrix) = quantized(dtype, 48, 512, 5);
            assert!(matrix.in_place());
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(matrix.data());
            let copied =
                QuantizedMatrix::new(dtype, 48, 512, Arc::new(OneIn(shifted))).expect("copied");
            assert!(!copied.in_place(), "{dtype:?}: misaligned bytes are copied");
            // Below PANEL_ROWS (the panels quantize activations per 32 values, candle's
            // k-quant dot products per 256).
            for rows in [1, PANEL_ROWS - 1] {
                let x = Tensor::randn(0f32, 1.0, (rows, 512), &Device::Cpu).expect("x");
                let got = matrix.forward(&x).expect("in place");
                let want = copied.forward(&x).expect("candle's QMatMul");
                // The same quantized activations and block dot products; candle's
                // repacked kernels may add in another order.
                let error = relative_error(&got, &want);
                assert!(error < 1e-4, "{dtype:?}, {rows} rows: {error}");
            }
            // A prompt's rows: the in-place tiles and the copy both meet the weights'
            // exact values (candle's QMatMul dequantizes for many rows too, or rounds
            // the activations: within its rounding).
            let x = Tensor::randn(0f32, 1.0, (GEMM_ROWS * 2, 512), &Device::Cpu).expect("x");
            let got = matrix.forward(&x).expect("in place");
            let want = copied.forward(&x).expect("candle's QMatMul");
            let error = relative_error(&got, &want);
            assert!(error < 2e-2, "{dtype:?}, prompt rows: {error}");
        }
    }

    #[test]
    fn embedding_rows_are_the_dequantized_table_rows() {
        let (reference, matrix) = quantized(GgmlDType::Q8_0, 50, 64, 1);
        let rows = matrix.rows(&[3, 49, 3]).expect("rows");
        let want = reference
            .index_select(&Tensor::new(&[3u32, 49, 3], &Device::Cpu).expect("ids"), 0)
            .expect("select");
        assert_eq!(relative_error(&rows, &want), 0.0);
        assert!(
            matrix.rows(&[50]).is_err(),
            "a row past the table is refused"
        );
    }

    #[test]
    fn sizes_that_do_not_match_are_refused() {
        let short: WeightBytes = Arc::new(vec![0u8; 10]);
        assert!(QuantizedMatrix::new(GgmlDType::Q4_0, 1, 32, short.clone()).is_err());
        assert!(QuantizedMatrix::new(GgmlDType::Q4_0, 1, 33, short).is_err());
        let (_, matrix) = quantized(GgmlDType::Q8_0, 4, 64, 0);
        let x = Tensor::zeros((1, 32), DType::F32, &Device::Cpu).expect("x");
        assert!(matrix.forward(&x).is_err());
    }
}
