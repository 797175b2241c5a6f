//! [`QuantizedMatrix`]: `x · Wᵀ` with `W` kept in its GGML blocks.
//!
//! Q4_0, Q4_1 and Q8_0 run Spillway's kernels ([`super::dot`]) on the bytes where they
//! are (a memory map of the model file, with no copy): the activations are quantized
//! per row, and the weight rows are shared out to the thread team in chunks. Other
//! formats (the k-quants) run candle's `QMatMul`, whose kernels for them were measured
//! fast (docs/gguf.md), on a copy of the bytes.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, ggml_file::qtensor_from_ggml};
use candle_core::{DType, Device, Module, Result, Tensor};

use super::activations::quantize_rows;
use super::dot::{FEW_ROWS, Kernel, rows_times_activations};
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
}

impl QuantizedMatrix {
    /// `bytes` hold `out` rows of `inp / block` blocks of `dtype` (GGML's row-major
    /// layout). Formats without Spillway kernels are copied into candle's `QMatMul`.
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
        let candle = match Format::of(dtype) {
            Some(_) => None,
            None => Some(QMatMul::from_qtensor(qtensor_from_ggml(
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

    /// The weight dequantized to f32 `[out, in]` (for devices without these kernels).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        qtensor_from_ggml(
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
                qtensor_from_ggml(self.dtype, bytes, vec![1, self.inp], &Device::Cpu)?
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
    /// and v; its gate and up). When they share a format with Spillway's kernels, `x` is
    /// quantized once and one parallel region computes them all; otherwise each runs on
    /// its own.
    pub fn forward_shared(matrices: &[&Self], x: &Tensor) -> Result<Vec<Tensor>> {
        let Some(first) = matrices.first() else {
            return Ok(Vec::new());
        };
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
        let format = Format::of(first.dtype);
        let shared = matrices
            .iter()
            .all(|m| m.candle.is_none() && m.dtype == first.dtype);
        match format {
            Some(format) if shared => {
                let values = x.flatten_all()?.to_vec1::<f32>()?;
                Self::products(matrices, format, Kernel::best(), &values, rows)
                    .into_iter()
                    .zip(matrices)
                    .map(|(y, m)| shaped(Tensor::from_vec(y, (rows, m.out), &Device::Cpu)?, m.out))
                    .collect()
            }
            _ => matrices
                .iter()
                .map(|m| {
                    let y = match (&m.candle, Format::of(m.dtype)) {
                        (Some(candle), _) => candle.forward(&x)?,
                        (None, Some(format)) => {
                            let values = x.flatten_all()?.to_vec1::<f32>()?;
                            let y = Self::products(&[m], format, Kernel::best(), &values, rows);
                            Tensor::from_vec(y.concat(), (rows, m.out), &Device::Cpu)?
                        }
                        (None, None) => unreachable!("formats without kernels have candle's"),
                    };
                    shaped(y, m.out)
                })
                .collect(),
        }
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
        let outs: Vec<usize> = matrices.iter().map(|m| m.out).collect();
        let total: usize = outs.iter().sum();
        // The largest chunk that divides every matrix's rows and leaves the team enough
        // chunks to balance. A decode step's products are memory-bound and short: 4
        // chunks a thread let each thread read long runs of weight bytes (the hardware
        // prefetcher starts over at every jump) and claim chunks less often. SmolLM2
        // Q4_1's decode step (`examples/generate_timing`) took 6.9 ms with 16 chunks a
        // thread, 4.6 with 4, about the same with 2, 5.3 with 8. Prompts are
        // compute-bound and keep 16 (4 was no faster).
        let per_thread = if rows < FEW_ROWS { 4 } else { 16 };
        let enough = crate::cpu::threads::calling_thread_limit() * per_thread;
        let chunk = [256usize, 128, 64, 32, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|&c| outs.iter().all(|o| o % c == 0) && total / c >= enough)
            .unwrap_or(1);
        let starts: Vec<usize> = outs
            .iter()
            .scan(0, |start, &o| {
                let s = *start;
                *start += o;
                Some(s)
            })
            .collect();
        let mut by_weight_row = vec![0f32; total * rows];
        crate::cpu::team::for_each_chunk_mut(&mut by_weight_row, chunk * rows, |index, out| {
            let global = index * chunk;
            let which = starts.partition_point(|&s| s <= global) - 1;
            let first = global - starts[which];
            let count = out.len() / rows;
            let bytes = &matrices[which].data()[first * row_bytes..(first + count) * row_bytes];
            SCRATCH.with_borrow_mut(|scratch| {
                rows_times_activations(kernel, format, bytes, &acts, out, scratch)
            });
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

    /// Each format's product against dequantize-then-f32 matmul: the only difference is
    /// the activations' 8-bit rounding, a bounded relative error.
    #[test]
    fn products_match_the_dequantized_weights_within_activation_rounding() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            for (out, inp, rows) in [(96, 256, 1), (40, 768, 7), (300, 512, 3)] {
                let (reference, matrix) = quantized(dtype, out, inp, out as u64);
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).expect("x");
                let want = x.matmul(&reference.t().expect("t")).expect("matmul");
                let got = matrix.forward(&x).expect("forward");
                assert_eq!(got.dims(), &[rows, out]);
                let error = relative_error(&got, &want);
                assert!(
                    error < 2e-2,
                    "{dtype:?} [{out}, {inp}] × {rows} rows: {error}"
                );
                assert_eq!(matrix.in_place(), Format::of(dtype).is_some());
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
        for rows in [1, 6] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 128), &Device::Cpu).expect("x");
            for group in [vec![&q, &k], vec![&q, &k, &other]] {
                let together = QuantizedMatrix::forward_shared(&group, &x).expect("shared");
                for (m, y) in group.iter().zip(&together) {
                    let alone = m.forward(&x).expect("alone");
                    assert_eq!(y.dims(), alone.dims());
                    assert_eq!(relative_error(y, &alone), 0.0);
                }
            }
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
