//! [`CpuLinear`]: `x · Wᵀ` for an f32 weight on the CPU, the projection the fused
//! transformer blocks run.
//!
//! With the `mkl` feature the weight is packed once, at load, into MKL's internal GEMM
//! layout (`cblas_sgemm_pack`) and every product runs `cblas_sgemm_compute` on it. A plain
//! `sgemm` repacks the weight on every call: for MiniLM at batch 8 (128 rows) that copy,
//! `mkl_blas_avx512_sgemm_scopy_right48_ea`, was 15 % of the forward pass, since the
//! weight is large next to so few rows. Without MKL the weight stays a candle tensor and
//! the product is candle's matmul.
//!
//! [`InPlaceLinear`] (the `mkl` build) multiplies by an f32 weight that stays where it
//! is, in a file mapping: a unit streamed from disk each pass then reads the pages it
//! needs instead of copying the whole weight into a tensor first.

use candle_core::{Result, Tensor};

/// A linear layer's weight `[out, in]` (no bias), ready for `x · Wᵀ`.
pub struct CpuLinear {
    inner: imp::Weight,
    out: usize,
    inp: usize,
}

impl CpuLinear {
    /// Whether weights are packed (the `mkl` build) rather than used as they are: a
    /// caller that would build a `CpuLinear` afresh for every pass gains nothing then.
    pub const PACKS: bool = cfg!(feature = "mkl");

    /// Takes `weight`, `[out, in]`, f32 on the CPU.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        Ok(Self {
            inner: imp::Weight::new(weight, out, inp)?,
            out,
            inp,
        })
    }

    /// `x · Wᵀ` for `x` `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, inp) = x.dims2()?;
        if inp != self.inp {
            candle_core::bail!(
                "{inp} input features for a [{}, {}] weight",
                self.out,
                self.inp
            );
        }
        self.inner.forward(x)
    }
}

/// `x · Wᵀ` for an f32 weight `[out, in]` read in place from `bytes` (little-endian
/// f32, row-major, 4-byte aligned), with MKL's `sgemm`.
pub struct InPlaceLinear {
    bytes: crate::cpu::quantized::matmul::WeightBytes,
    out: usize,
    inp: usize,
}

impl InPlaceLinear {
    /// Whether this build multiplies in place (the `mkl` build); elsewhere callers copy.
    pub const AVAILABLE: bool = cfg!(feature = "mkl");

    /// Takes `bytes` as an `[out, in]` f32 weight, or says why it cannot: a length that
    /// is not `out · in` floats, or bytes not aligned for f32 (a mapping's tensor can sit
    /// at any offset of its file).
    pub fn new(
        bytes: crate::cpu::quantized::matmul::WeightBytes,
        out: usize,
        inp: usize,
    ) -> Result<Self> {
        let slice = (*bytes).as_ref();
        if slice.len() != out * inp * 4 {
            candle_core::bail!(
                "an f32 [{out}, {inp}] weight needs {} bytes, not {}",
                out * inp * 4,
                slice.len()
            );
        }
        if !(slice.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            candle_core::bail!("the weight's bytes are not aligned for f32");
        }
        if c_dim(out).is_err() || c_dim(inp).is_err() {
            candle_core::bail!("an f32 [{out}, {inp}] weight is too large for sgemm");
        }
        Ok(Self { bytes, out, inp })
    }

    /// `x · Wᵀ` for `x` `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, inp) = x.dims2()?;
        if inp != self.inp {
            candle_core::bail!(
                "{inp} input features for a [{}, {}] weight",
                self.out,
                self.inp
            );
        }
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    fn weight(&self) -> &[f32] {
        let bytes = (*self.bytes).as_ref();
        // SAFETY: `new` checked the length (out · in floats) and the f32 alignment; every
        // bit pattern is an f32; the bytes live as long as `self.bytes`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4)
        }
    }
}

/// `c = a · b` for row-major f32 `a` `[m, k]`, `b` `[k, n]` and `c` `[m, n]`: MKL's sgemm
/// in the `mkl` build, candle's matmul elsewhere (the convolutions' product).
pub fn sgemm_ab(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        candle_core::bail!("sgemm: [{m}, {k}] x [{k}, {n}] with mismatched buffers");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    imp::sgemm_ab(a, b, c, m, n, k)
}

/// `y = x · Wᵀ` for row-major f32 `x` `[rows, inp]`, `w` `[out, inp]` and `y`
/// `[rows, out]`, reading `w` where it is: MKL's sgemm in the `mkl` build (on one thread
/// inside the team's parallel region), candle's matmul over copies elsewhere.
pub fn sgemm_xwt(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: &mut [f32],
) -> Result<()> {
    if x.len() != rows * inp || w.len() != out * inp || y.len() != rows * out {
        candle_core::bail!("sgemm: [{rows}, {inp}] x [{out}, {inp}]ᵀ with mismatched buffers");
    }
    if rows == 0 || out == 0 {
        return Ok(());
    }
    imp::sgemm_xwt(x, rows, w, out, inp, y)
}

/// `y[.., 0..out] = x · Wᵀ` for row-major f32 `x` `[rows, inp]` and `w` `[out, inp]`,
/// written into the first `out` columns of `rows` rows `ldy` apart from `y` on (a
/// column range of a wider output), the rest untouched: MKL's sgemm in the `mkl` build,
/// candle's matmul and a copy elsewhere.
///
/// # Safety
/// `y` must be valid for writes of row `a`'s `out` values at `y + a·ldy` for every `a`
/// below `rows`, and nothing else may access them during the call.
#[allow(unsafe_code)]
pub unsafe fn sgemm_xwt_columns(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: *mut f32,
    ldy: usize,
) -> Result<()> {
    if x.len() != rows * inp || w.len() != out * inp || ldy < out {
        candle_core::bail!("sgemm: [{rows}, {inp}] x [{out}, {inp}]ᵀ with mismatched buffers");
    }
    if rows == 0 || out == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    unsafe { imp::sgemm_xwt_columns(x, rows, w, out, inp, y, ldy) }
}

fn c_dim(v: usize) -> Result<std::ffi::c_int> {
    std::ffi::c_int::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} overflows")))
}

impl candle_core::CustomOp1 for InPlaceLinear {
    fn name(&self) -> &'static str {
        "in-place-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("in-place linear needs contiguous input".into())
        })?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let (rows, inp) = layout.shape().dims2()?;
        if inp != self.inp || x.len() != rows * inp {
            candle_core::bail!("in-place linear: input {:?}", layout.shape());
        }
        let mut y = vec![0.0f32; rows * self.out];
        if rows > 0 {
            imp::sgemm_xwt(x, rows, self.weight(), self.out, self.inp, &mut y)?;
        }
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from((rows, self.out)),
        ))
    }
}

#[cfg(not(feature = "mkl"))]
mod imp {
    //! candle's matmul.
    use candle_core::{Result, Tensor};

    pub(super) struct Weight(Tensor);

    impl Weight {
        pub(super) fn new(weight: &Tensor, _out: usize, _inp: usize) -> Result<Self> {
            Ok(Self(weight.clone()))
        }

        pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
            x.matmul(&self.0.t()?)
        }
    }

    /// `c = a · b` with candle's matmul over copies (lengths checked by the caller).
    pub(super) fn sgemm_ab(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let device = candle_core::Device::Cpu;
        let a = Tensor::from_slice(a, (m, k), &device)?;
        let b = Tensor::from_slice(b, (k, n), &device)?;
        c.copy_from_slice(&a.matmul(&b)?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// [`super::sgemm_xwt_columns`]: the product into a buffer, then copied row by row.
    #[allow(unsafe_code)]
    pub(super) unsafe fn sgemm_xwt_columns(
        x: &[f32],
        rows: usize,
        w: &[f32],
        out: usize,
        inp: usize,
        y: *mut f32,
        ldy: usize,
    ) -> Result<()> {
        let mut product = vec![0f32; rows * out];
        sgemm_xwt(x, rows, w, out, inp, &mut product)?;
        for (a, row) in product.chunks_exact(out).enumerate() {
            // SAFETY: the caller made row `a`'s `out` values at `y + a·ldy` ours.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), y.add(a * ldy), out) };
        }
        Ok(())
    }

    /// `y = x · Wᵀ` with candle's matmul over a copy of `w` (this build has no BLAS to
    /// hand a borrowed weight to; callers check `InPlaceLinear::AVAILABLE` and copy
    /// the weight into a tensor once instead).
    pub(super) fn sgemm_xwt(
        x: &[f32],
        rows: usize,
        w: &[f32],
        out: usize,
        inp: usize,
        y: &mut [f32],
    ) -> Result<()> {
        let device = candle_core::Device::Cpu;
        let x = Tensor::from_slice(x, (rows, inp), &device)?;
        let w = Tensor::from_slice(w, (out, inp), &device)?;
        let product = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        y.copy_from_slice(&product);
        Ok(())
    }
}

#[cfg(feature = "mkl")]
mod imp {
    //! MKL's packed GEMM.
    use std::alloc::Layout as Allocation;
    use std::ffi::c_int;

    use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;
    const PACKED: c_int = 151;
    const B_MATRIX: c_int = 162;
    /// Rows the packing is planned for. MKL's packed B serves products with any number
    /// of rows (the tests check 1 to 700 against a plain product); this only tunes it.
    const PLANNED_ROWS: c_int = 128;

    unsafe extern "C" {
        fn cblas_sgemm_pack_get_size(identifier: c_int, m: c_int, n: c_int, k: c_int) -> usize;
        fn cblas_sgemm_pack(
            layout: c_int,
            identifier: c_int,
            trans: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            src: *const f32,
            ld: c_int,
            dest: *mut f32,
        );
        fn cblas_sgemm(
            layout: c_int,
            transa: c_int,
            transb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn cblas_sgemm_compute(
            layout: c_int,
            transa: c_int,
            transb: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
    }

    /// `y = x · Wᵀ`: `x` `[rows, inp]`, `w` `[out, inp]`, `y` `[rows, out]`, all
    /// row-major, with a plain `sgemm` reading `w` where it is.
    /// `c = a · b` (lengths checked by the caller).
    pub(super) fn sgemm_ab(
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let (cm, cn, ck) = (super::c_dim(m)?, super::c_dim(n)?, super::c_dim(k)?);
        // SAFETY: the caller checked a, b and c against [m, k], [k, n] and [m, n]; beta = 0
        // overwrites c.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                NO_TRANS,
                cm,
                cn,
                ck,
                1.0,
                a.as_ptr(),
                ck,
                b.as_ptr(),
                cn,
                0.0,
                c.as_mut_ptr(),
                cn,
            )
        };
        Ok(())
    }

    /// `y = x · Wᵀ`: [`sgemm_xwt_columns`] over all of y's columns.
    #[allow(unsafe_code)]
    pub(super) fn sgemm_xwt(
        x: &[f32],
        rows: usize,
        w: &[f32],
        out: usize,
        inp: usize,
        y: &mut [f32],
    ) -> Result<()> {
        if x.len() != rows * inp || w.len() != out * inp || y.len() != rows * out {
            candle_core::bail!("sgemm: [{rows}, {inp}] x [{out}, {inp}]ᵀ with mismatched buffers");
        }
        // SAFETY: y holds `rows` rows of `out` values, borrowed mutably for the call.
        unsafe { sgemm_xwt_columns(x, rows, w, out, inp, y.as_mut_ptr(), out) }
    }

    /// [`super::sgemm_xwt_columns`] with `ldc = ldy`.
    pub(super) unsafe fn sgemm_xwt_columns(
        x: &[f32],
        rows: usize,
        w: &[f32],
        out: usize,
        inp: usize,
        y: *mut f32,
        ldy: usize,
    ) -> Result<()> {
        let (m, n, k) = (super::c_dim(rows)?, super::c_dim(out)?, super::c_dim(inp)?);
        let ldc = super::c_dim(ldy)?;
        // SAFETY: x and w were checked against [rows, inp] and [out, inp] by the caller,
        // which also made y's rows (ldy apart, out values each) ours; beta = 0 overwrites
        // them.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                m,
                n,
                k,
                1.0,
                x.as_ptr(),
                k,
                w.as_ptr(),
                k,
                0.0,
                y,
                ldc,
            )
        };
        Ok(())
    }

    /// The packed weight: a heap buffer that never moves (MKL's packed format depends on
    /// its address) and is freed on drop.
    pub(super) struct Weight {
        packed: *mut f32,
        allocation: Allocation,
        out: c_int,
        inp: c_int,
    }

    // SAFETY: the buffer is written once in `new` and only read afterwards.
    unsafe impl Send for Weight {}
    unsafe impl Sync for Weight {}

    impl Weight {
        pub(super) fn new(weight: &Tensor, out: usize, inp: usize) -> Result<Self> {
            let dims = |v: usize| {
                c_int::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} overflows")))
            };
            let (n, k) = (dims(out)?, dims(inp)?);
            let values = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            // SAFETY: plain size query.
            let bytes = unsafe { cblas_sgemm_pack_get_size(B_MATRIX, PLANNED_ROWS, n, k) };
            let allocation = Allocation::from_size_align(bytes.max(64), 64)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            // SAFETY: the size is non-zero.
            let packed = unsafe { std::alloc::alloc(allocation) }.cast::<f32>();
            if packed.is_null() {
                std::alloc::handle_alloc_error(allocation);
            }
            // SAFETY: `values` holds `[out, in]` row-major (ld = in), read as Bᵀ (op(B) is
            // `[in, out]`); `packed` has the size MKL asked for.
            unsafe {
                cblas_sgemm_pack(
                    ROW_MAJOR,
                    B_MATRIX,
                    TRANS,
                    PLANNED_ROWS,
                    n,
                    k,
                    1.0,
                    values.as_ptr(),
                    k,
                    packed,
                )
            };
            Ok(Self {
                packed,
                allocation,
                out: n,
                inp: k,
            })
        }

        pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
            x.contiguous()?.apply_op1_no_bwd(self)
        }
    }

    impl Drop for Weight {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.packed.cast(), self.allocation) }
        }
    }

    impl CustomOp1 for Weight {
        fn name(&self) -> &'static str {
            "mkl-packed-linear"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("packed linear needs contiguous input".into())
            })?;
            let x = &storage.as_slice::<f32>()?[start..end];
            let (rows, inp) = layout.shape().dims2()?;
            if inp != self.inp as usize || x.len() != rows * inp {
                candle_core::bail!("packed linear: input {:?}", layout.shape());
            }
            let out = self.out as usize;
            let mut y = vec![0.0f32; rows * out];
            if rows > 0 {
                let m = c_int::try_from(rows)
                    .map_err(|_| candle_core::Error::Msg(format!("{rows} rows overflow")))?;
                // SAFETY: x is `[rows, inp]` row-major, y `[rows, out]`, the packed weight
                // was made for n = out, k = inp; beta = 0 overwrites y.
                unsafe {
                    cblas_sgemm_compute(
                        ROW_MAJOR,
                        NO_TRANS,
                        PACKED,
                        m,
                        self.out,
                        self.inp,
                        x.as_ptr(),
                        self.inp,
                        self.packed,
                        self.out,
                        0.0,
                        y.as_mut_ptr(),
                        self.out,
                    )
                };
            }
            Ok((CpuStorage::F32(y), Shape::from((rows, out))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Checks `forward` against candle's `x · weightᵀ` for each number of rows.
    fn matches_candles_matmul(
        weight: &Tensor,
        rows: &[usize],
        forward: impl Fn(&Tensor) -> Tensor,
    ) {
        let (out, inp) = weight.dims2().expect("2d");
        for &rows in rows {
            let x = Tensor::randn(0f32, 1., (rows, inp), &Device::Cpu).expect("x");
            let want = x.matmul(&weight.t().expect("t")).expect("matmul");
            let got = forward(&x);
            assert_eq!(got.dims(), [rows, out]);
            let diff: f32 = (got - want)
                .and_then(|d| d.abs()?.flatten_all()?.max(0))
                .and_then(|d| d.to_scalar())
                .expect("diff");
            assert!(diff < 1e-4, "{rows} rows: differs by {diff}");
        }
    }

    #[test]
    fn in_place_products_match_candles_matmul_and_bad_bytes_are_refused() {
        use std::sync::Arc;
        let (out, inp) = (24, 40);
        let weight = Tensor::randn(0f32, 1., (out, inp), &Device::Cpu).expect("weight");
        let values = weight
            .flatten_all()
            .and_then(|w| w.to_vec1::<f32>())
            .expect("values");
        /// The weight's floats, seen as bytes (f32-aligned, as a Vec<f32> is).
        struct Floats(Vec<f32>);
        impl AsRef<[u8]> for Floats {
            fn as_ref(&self) -> &[u8] {
                // SAFETY: any f32 slice is a valid byte slice of 4x the length.
                #[allow(unsafe_code)]
                unsafe {
                    std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 4)
                }
            }
        }
        let linear =
            InPlaceLinear::new(Arc::new(Floats(values.clone())), out, inp).expect("in place");
        matches_candles_matmul(&weight, &[1, 3, 128], |x| {
            linear.forward(x).expect("forward")
        });
        let x = Tensor::zeros((2, inp + 1), candle_core::DType::F32, &Device::Cpu).expect("x");
        assert!(linear.forward(&x).is_err(), "a wrong width is an error");

        /// A window of a byte buffer.
        struct Part(Arc<Vec<u8>>, std::ops::Range<usize>);
        impl AsRef<[u8]> for Part {
            fn as_ref(&self) -> &[u8] {
                &self.0[self.1.clone()]
            }
        }
        let raw: Arc<Vec<u8>> = Arc::new(
            std::iter::once(0u8)
                .chain(values.iter().flat_map(|v| v.to_le_bytes()))
                .collect(),
        );
        let short = (0..2)
            .map(|shift| Part(Arc::clone(&raw), shift..shift + out * inp * 4 - 4))
            .find(|p| (p.as_ref().as_ptr() as usize).is_multiple_of(4))
            .expect("an aligned window");
        let err = InPlaceLinear::new(Arc::new(short), out, inp)
            .err()
            .expect("short refused");
        assert!(err.to_string().contains("needs"), "{err}");
        // One of these two windows starts off a 4-byte boundary.
        let misaligned = (0..2)
            .map(|shift| Part(Arc::clone(&raw), shift..shift + out * inp * 4))
            .find(|p| !(p.as_ref().as_ptr() as usize).is_multiple_of(4))
            .expect("a misaligned window");
        let err = InPlaceLinear::new(Arc::new(misaligned), out, inp)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("aligned"), "{err}");
    }

    #[test]
    fn products_match_candles_matmul_for_any_number_of_rows() {
        let (out, inp) = (96, 40);
        let weight = Tensor::randn(0f32, 1., (out, inp), &Device::Cpu).expect("weight");
        let linear = CpuLinear::new(&weight).expect("linear");
        matches_candles_matmul(&weight, &[1, 3, 16, 128, 129, 700], |x| {
            linear.forward(x).expect("forward")
        });
        let wrong = Tensor::zeros((2, inp + 1), candle_core::DType::F32, &Device::Cpu);
        assert!(linear.forward(&wrong.expect("x")).is_err());
    }
}
