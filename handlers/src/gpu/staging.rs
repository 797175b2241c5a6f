//! Weights from a host mapping onto a GPU: mapping → pinned buffer → device, in chunks,
//! through two pinned buffers per GPU, on a copy stream of its own. While the DMA engine
//! copies one buffer to the device, the CPU fills the other from the mapping (the page
//! reads of a disk unit happen here), and the model's compute stream keeps running: a
//! streamed unit is staged by the layer stack's read-ahead thread while the unit before it
//! computes. candle's own upload copies from pageable memory, synchronously, into a fresh
//! allocation (7-8 GB/s on an H100 against 54 through pinned buffers; ../shared/gpu).
//!
//! The device memory a tensor lands in is allocated on the copy stream; cudarc's event
//! tracking makes the compute stream wait for its copy before reading it, and its free wait
//! for the compute stream's last read.
//!
//! The plan of the chunks ([`chunks`]) is pure and tested everywhere; the copies need the
//! `cuda` feature and a GPU.

use std::ops::Range;

/// Bytes per pinned buffer: large enough that each DMA runs at full speed (a copy of a few
/// MiB already reaches it), small enough that two per GPU stay a rounding error of host
/// memory.
pub const BUFFER_BYTES: usize = 16 << 20;

/// Pinned buffers per GPU: one filling while the other is copied.
pub const BUFFERS: usize = 2;

/// How `len` bytes are staged: consecutive ranges of at most `buffer` bytes, each through
/// the buffer after the last one used (`first` is the buffer the copy starts in). Each
/// range's length is a multiple of `element` except the tensor's own remainder, so every
/// chunk copies whole elements.
pub fn chunks(
    len: usize,
    element: usize,
    buffer: usize,
    first: usize,
) -> impl Iterator<Item = (Range<usize>, usize)> {
    let element = element.max(1);
    let step = (buffer / element).max(1) * element;
    (0..len.div_ceil(step)).map(move |i| {
        let start = i * step;
        (start..(start + step).min(len), (first + i) % BUFFERS)
    })
}

#[cfg(feature = "cuda")]
pub use copy::upload;

#[cfg(feature = "cuda")]
mod copy {
    //! The copies. Unsafe only where cudarc's API is: allocating device memory that the
    //! copies then fill, and viewing a pinned byte buffer as the elements it holds.
    #![allow(unsafe_code)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use candle_core::cuda_backend::cudarc::driver::{
        CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{DType, Device, Result, Shape, Storage, Tensor};

    use super::{BUFFER_BYTES, BUFFERS, chunks};

    /// One GPU's copy stream and pinned buffers; `next` is the buffer the next copy uses,
    /// `done[i]` the event after buffer i's last copy.
    struct Stager {
        stream: Arc<CudaStream>,
        buffers: Vec<PinnedHostSlice<u8>>,
        done: Vec<Option<CudaEvent>>,
        next: usize,
    }

    fn wrap<E: std::fmt::Display>(e: E) -> candle_core::Error {
        candle_core::Error::Msg(format!("staging weights onto the GPU: {e}"))
    }

    impl Stager {
        fn new(device: &candle_core::CudaDevice) -> Result<Self> {
            let ctx = device.cuda_stream().context().clone();
            let stream = ctx.new_stream().map_err(wrap)?;
            let buffers = (0..BUFFERS)
                // SAFETY: the buffers' bytes are written before any is read (`copy`).
                .map(|_| unsafe { ctx.alloc_pinned::<u8>(BUFFER_BYTES) }.map_err(wrap))
                .collect::<Result<Vec<_>>>()?;
            Ok(Self {
                stream,
                buffers,
                done: (0..BUFFERS).map(|_| None).collect(),
                next: 0,
            })
        }

        /// Copies `bytes` (whole `T`s) into new device memory through the pinned buffers.
        fn copy<T: DeviceRepr>(&mut self, bytes: &[u8]) -> Result<CudaSlice<T>> {
            let size = std::mem::size_of::<T>();
            let len = bytes.len() / size;
            // SAFETY: every element is written by the copies below before the slice is
            // returned; cudarc orders later reads on other streams after them.
            let mut device = unsafe { self.stream.alloc::<T>(len) }.map_err(wrap)?;
            let mut used = self.next;
            for (range, buffer) in chunks(len * size, size, BUFFER_BYTES, self.next) {
                // The buffer's previous copy must have left it before it is refilled.
                if let Some(done) = self.done[buffer].take() {
                    done.synchronize().map_err(wrap)?;
                }
                let pinned = self.buffers[buffer].as_mut_slice().map_err(wrap)?;
                let n = range.len();
                pinned[..n].copy_from_slice(&bytes[range.clone()]);
                // SAFETY: the pinned buffer is page-aligned and `n` is a whole number of
                // `T`s (chunks() cuts at element boundaries), all of them initialised above.
                let host: &[T] =
                    unsafe { std::slice::from_raw_parts(pinned.as_ptr().cast::<T>(), n / size) };
                let mut view = device.slice_mut(range.start / size..range.end / size);
                self.stream.memcpy_htod(host, &mut view).map_err(wrap)?;
                self.done[buffer] = Some(self.stream.record_event(None).map_err(wrap)?);
                used = buffer + 1;
            }
            self.next = used % BUFFERS;
            Ok(device)
        }
    }

    /// The stager of each GPU (by its device), made on first use.
    fn stager(device: &candle_core::CudaDevice) -> Result<Arc<Mutex<Stager>>> {
        static STAGERS: Mutex<BTreeMap<usize, Arc<Mutex<Stager>>>> = Mutex::new(BTreeMap::new());
        let ordinal = match candle_core::backend::BackendDevice::location(device) {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            other => candle_core::bail!("not a GPU: {other:?}"),
        };
        let mut stagers = STAGERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stager) = stagers.get(&ordinal) {
            return Ok(stager.clone());
        }
        let stager = Arc::new(Mutex::new(Stager::new(device)?));
        stagers.insert(ordinal, stager.clone());
        Ok(stager)
    }

    fn tensor<T: DeviceRepr + CudaDType>(
        stager: &mut Stager,
        bytes: &[u8],
        shape: Shape,
        device: &candle_core::CudaDevice,
    ) -> Result<Tensor> {
        let slice = stager.copy::<T>(bytes)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
        Ok(Tensor::from_storage(
            storage,
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }

    /// The tensor stored as `bytes` (`stored`, `shape`, little-endian as in safetensors)
    /// on the GPU `device`, or `None` when staging does not handle `stored` (the caller
    /// then uses candle's own upload).
    pub fn upload(
        bytes: &[u8],
        stored: DType,
        shape: Shape,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let cuda = device.as_cuda_device()?;
        if bytes.len() != shape.elem_count() * stored.size_in_bytes() {
            candle_core::bail!(
                "{} bytes do not hold a {stored:?} tensor of shape {shape:?}",
                bytes.len()
            );
        }
        let stager = stager(cuda)?;
        let mut stager = stager.lock().unwrap_or_else(|e| e.into_inner());
        let stager = &mut *stager;
        Ok(Some(match stored {
            DType::F32 => tensor::<f32>(stager, bytes, shape, cuda)?,
            DType::BF16 => tensor::<half::bf16>(stager, bytes, shape, cuda)?,
            DType::F16 => tensor::<half::f16>(stager, bytes, shape, cuda)?,
            DType::F64 => tensor::<f64>(stager, bytes, shape, cuda)?,
            DType::U8 => tensor::<u8>(stager, bytes, shape, cuda)?,
            DType::U32 => tensor::<u32>(stager, bytes, shape, cuda)?,
            DType::I64 => tensor::<i64>(stager, bytes, shape, cuda)?,
            _ => return Ok(None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `chunks` covers `0..len` once, in order, in whole elements, alternating
    /// buffers from `first`.
    fn check(len: usize, element: usize, buffer: usize, first: usize) {
        let plan: Vec<_> = chunks(len, element, buffer, first).collect();
        let mut at = 0;
        for (i, (range, used)) in plan.iter().enumerate() {
            assert_eq!(range.start, at, "contiguous");
            assert!(range.len() <= buffer.max(element), "fits its buffer");
            assert!(!range.is_empty());
            if range.end != len {
                assert_eq!(range.len() % element, 0, "whole elements");
            }
            assert_eq!(*used, (first + i) % BUFFERS, "alternates");
            at = range.end;
        }
        assert_eq!(at, len, "covers every byte");
    }

    #[test]
    fn chunks_cover_a_tensor_once_in_whole_elements_alternating_buffers() {
        for (len, element, buffer, first) in [
            (0, 4, 16, 0),
            (4, 4, 16, 1),
            (16, 4, 16, 0),
            (17 * 4, 4, 16, 1),
            (3 * 6, 6, 16, 0), // an element size that does not divide the buffer
            (1000, 2, 7, 0),
            (BUFFER_BYTES * 3 + 12, 4, BUFFER_BYTES, 1),
        ] {
            check(len, element, buffer, first);
        }
        let plan: Vec<_> = chunks(3 * 6, 6, 16, 0).collect();
        assert_eq!(
            plan,
            [(0..12, 0), (12..18, 1)],
            "12 = two whole 6-byte elements"
        );
    }

    /// Tensors staged onto the GPU equal the stored ones bit for bit: one larger than a
    /// pinned buffer (several chunks, both buffers), odd sizes, every staged dtype.
    #[test]
    #[cfg_attr(not(feature = "cuda"), ignore = "needs a CUDA build and a GPU")]
    fn staged_tensors_equal_the_stored_ones_bit_for_bit() {
        use candle_core::{DType, Device, Tensor};
        let gpu = crate::gpu::device(0).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let big = BUFFER_BYTES / 4 * 2 + 3; // f32s: two buffers and a few bytes more
        let tensors: Vec<(String, Tensor)> = vec![
            (
                "big".into(),
                Tensor::arange(0u32, big as u32, &Device::Cpu).and_then(|t| t.to_dtype(DType::F32)),
            ),
            (
                "bf16".into(),
                Tensor::arange(0f32, 1001., &Device::Cpu).and_then(|t| t.to_dtype(DType::BF16)),
            ),
            (
                "f16".into(),
                Tensor::arange(0f32, 7., &Device::Cpu).and_then(|t| t.to_dtype(DType::F16)),
            ),
            ("ids".into(), Tensor::arange(0i64, 5, &Device::Cpu)),
        ]
        .into_iter()
        .map(|(n, t)| (n, t.expect("tensor")))
        .collect();
        candle_core::safetensors::save(&tensors.iter().cloned().collect(), &path).expect("save");
        let source = crate::WeightSource::open(&path).expect("open");
        for _ in 0..2 {
            // twice: the second pass starts in the other buffer
            for (name, want) in &tensors {
                let got = source.load(name, want.dtype(), &gpu).expect("staged");
                assert!(got.device().same_device(&gpu), "{name} is on the GPU");
                let got = got.to_device(&Device::Cpu).expect("back");
                let same = got
                    .eq(want)
                    .and_then(|e| e.to_dtype(DType::F32))
                    .and_then(|e| e.min_all())
                    .and_then(|m| m.to_scalar::<f32>())
                    .expect("compare");
                assert_eq!(same, 1.0, "{name} differs after staging");
            }
        }
    }
}
