//! [`WeightSource`]: a safetensors file mapped into memory, handed to candle without a copy
//! of the file.
//!
//! The mapping may cover a whole file or a byte range of one: a zip-store `.mar` keeps
//! its safetensors uncompressed, so the server maps them straight out of the archive.
//! The header is parsed once at open; tensors are read from the mapping on demand
//! (on the CPU candle copies each tensor it loads into owned memory, so the mapping's
//! pages are only touched while a tensor is being materialised).
//!
//! This module holds the crate's only `unsafe`: creating the memory map.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo, TensorView};

use crate::HandlerError;

/// A memory-mapped safetensors file (or a safetensors byte range inside a larger file).
/// Cheap to clone: clones share the mapping.
#[derive(Clone)]
pub struct WeightSource {
    inner: Arc<Mapped>,
}

struct Mapped {
    path: PathBuf,
    map: Mmap,
    /// Where the safetensors bytes sit inside `map`.
    range: Range<usize>,
    /// Offset of the tensor data (after the 8-byte length and the JSON header), relative
    /// to `range.start`.
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightSource")
            .field("path", &self.inner.path)
            .field("range", &self.inner.range)
            .finish()
    }
}

impl WeightSource {
    /// Maps a whole safetensors file.
    pub fn open(path: &Path) -> Result<Self, HandlerError> {
        let len = std::fs::metadata(path)
            .map_err(|source| HandlerError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Self::open_range(path, 0..len)
    }

    /// Maps the safetensors bytes at `range` of the file at `path` (e.g. an uncompressed
    /// entry of a zip archive).
    pub fn open_range(path: &Path, range: Range<u64>) -> Result<Self, HandlerError> {
        let io = |source| HandlerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and private to this process. Model files in the
        // store are treated as immutable while served (as every mmap-based loader does);
        // a file truncated underneath us would fault, which is the documented contract of
        // the model store (replace archives by writing a new file and renaming it).
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bad_range = || {
            HandlerError::bad_file(
                &path.display().to_string(),
                format!("byte range {range:?} is outside the file"),
            )
        };
        let start = usize::try_from(range.start).map_err(|_| bad_range())?;
        let end = usize::try_from(range.end).map_err(|_| bad_range())?;
        if start > end || end > map.len() {
            return Err(bad_range());
        }
        let bytes = &map[start..end];
        let (header_len, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| HandlerError::bad_file(&path.display().to_string(), e))?;
        Ok(Self {
            inner: Arc::new(Mapped {
                path: path.to_path_buf(),
                data_start: 8 + header_len,
                range: start..end,
                map,
                metadata,
            }),
        })
    }

    /// The file this source maps.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The byte range of the file that holds the safetensors.
    pub fn range(&self) -> Range<u64> {
        self.inner.range.start as u64..self.inner.range.end as u64
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// Number of elements over all tensors (the model's parameter count, buffers included).
    pub fn parameters(&self) -> usize {
        self.inner
            .metadata
            .tensors()
            .values()
            .map(|info| info.shape.iter().product::<usize>())
            .sum()
    }

    /// Header information (dtype, shape, offsets) of one tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.inner.metadata.info(name)
    }

    fn view(&self, name: &str) -> candle_core::Result<TensorView<'_>> {
        let inner = &*self.inner;
        let info =
            inner
                .metadata
                .info(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        let (begin, end) = info.data_offsets;
        let base = inner.range.start + inner.data_start;
        let bytes = inner
            .map
            .get(base + begin..base + end)
            .filter(|_| base + end <= inner.range.end)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("tensor {name} lies outside its file"))
            })?;
        Ok(TensorView::new(info.dtype, info.shape.clone(), bytes)?)
    }

    /// Reads one tensor onto `device` in `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.view(name)?.load(device)?.to_dtype(dtype)
    }

    /// The bytes of the mapping that hold the tensors named `names` (one range spanning
    /// them all), relative to the start of the mapping.
    pub fn span_of<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Option<Range<usize>> {
        let inner = &*self.inner;
        let base = inner.range.start + inner.data_start;
        names
            .into_iter()
            .filter_map(|name| inner.metadata.info(name))
            .map(|info| base + info.data_offsets.0..base + info.data_offsets.1)
            .reduce(|a, b| a.start.min(b.start)..a.end.max(b.end))
    }

    /// Asks the kernel to start reading `span` now (a disk unit about to be needed).
    pub fn prefetch(&self, span: &Range<usize>) {
        let (offset, len) = page_aligned(span);
        // Advice only: failure costs speed, never correctness.
        let _ = self
            .inner
            .map
            .advise_range(memmap2::Advice::WillNeed, offset, len);
    }

    /// Drops `span`'s pages from this process's resident memory (they stay in the page
    /// cache), so streaming disk units through a mapping never grows RSS to the file.
    pub fn release(&self, span: &Range<usize>) {
        let (offset, len) = page_aligned(span);
        // SAFETY: the mapping is read-only and file-backed, and no tensor borrows these
        // bytes any more (every tensor loaded from it on the CPU is an owned copy).
        // MADV_DONTNEED on such a mapping only discards pages; a later read faults them
        // back in from the file with the same contents. Advice failure is harmless.
        #[allow(unsafe_code)]
        let _ = unsafe {
            self.inner
                .map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }

    /// A candle `VarBuilder` reading from this source.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every tensor of the file, loaded onto `device` (for tests and small models).
    pub fn load_all(&self, device: &Device) -> candle_core::Result<HashMap<String, Tensor>> {
        self.tensor_names()
            .into_iter()
            .map(|name| {
                let view = self.view(&name)?;
                Ok((name, view.load(device)?))
            })
            .collect()
    }
}

/// `span` widened to 64 KiB boundaries (a multiple of every page size in use), as
/// madvise wants a page-aligned start.
fn page_aligned(span: &Range<usize>) -> (usize, usize) {
    const ALIGN: usize = 64 * 1024;
    let start = span.start - span.start % ALIGN;
    (start, span.end.saturating_sub(start))
}

impl candle_nn::var_builder::SimpleBackend for WeightSource {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.metadata.info(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample_file(dir: &Path) -> (PathBuf, HashMap<String, Tensor>) {
        let tensors: HashMap<String, Tensor> = [
            (
                "a.weight",
                Tensor::arange(0f32, 12., &Device::Cpu).and_then(|t| t.reshape((3, 4))),
            ),
            ("b.bias", Tensor::new(&[1.5f32, -2.0], &Device::Cpu)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.expect("tensor")))
        .collect();
        let path = dir.join("w.safetensors");
        candle_core::safetensors::save(&tensors, &path).expect("save");
        (path, tensors)
    }

    fn assert_same(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        assert_eq!(a, b);
    }

    #[test]
    fn reads_tensors_of_a_whole_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, expected) = sample_file(dir.path());
        let source = WeightSource::open(&path).expect("open");
        assert_eq!(source.tensor_names(), vec!["a.weight", "b.bias"]);
        for (name, tensor) in &expected {
            assert_same(
                &source.load(name, DType::F32, &Device::Cpu).expect("load"),
                tensor,
            );
        }
    }

    #[test]
    fn reads_tensors_from_a_byte_range_inside_a_larger_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, expected) = sample_file(dir.path());
        let inner = std::fs::read(&path).expect("read");
        let wrapped = dir.path().join("wrapped.bin");
        let mut f = File::create(&wrapped).expect("create");
        f.write_all(b"some leading bytes").expect("write");
        f.write_all(&inner).expect("write");
        f.write_all(b"trailing").expect("write");
        drop(f);
        let start = b"some leading bytes".len() as u64;
        let source =
            WeightSource::open_range(&wrapped, start..start + inner.len() as u64).expect("open");
        let vb = source.var_builder(DType::F32, &Device::Cpu);
        assert_same(
            &vb.get((3, 4), "a.weight").expect("get"),
            &expected["a.weight"],
        );
        assert!(
            vb.get((4, 3), "a.weight").is_err(),
            "a wrong shape is refused"
        );
        assert!(!vb.contains_tensor("missing"));
    }

    #[test]
    fn a_range_past_the_end_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _) = sample_file(dir.path());
        let len = std::fs::metadata(&path).expect("meta").len();
        assert!(WeightSource::open_range(&path, 0..len + 10).is_err());
        assert!(
            WeightSource::open_range(&path, 5..len).is_err(),
            "garbage header is refused"
        );
    }
}
