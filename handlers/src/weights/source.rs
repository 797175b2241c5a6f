//! [`WeightSource`]: a model's safetensors — one file or the shards a
//! `model.safetensors.index.json` lists — mapped into memory, handed to candle without a
//! copy of the files.
//!
//! A mapping may cover a whole file or a byte range of one: a zip-store `.mar` keeps
//! its safetensors uncompressed, so the server maps them straight out of the archive.
//! Headers are parsed once at open; tensors are read from the mappings on demand
//! (on the CPU candle copies each tensor it loads into owned memory, so the mapping's
//! pages are only touched while a tensor is being materialised).
//!
//! GGML-quantized tensors (`U8` `[rows, bytes per row]`, their type in the file's
//! metadata; see [`crate::weights::offload::PlannedTensor::ggml`]) are not copied:
//! [`WeightSource::quantized`] hands out a [`QuantizedMatrix`] reading the mapping in
//! place.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use safetensors::tensor::{Metadata, SafeTensors, TensorInfo, TensorView};

use crate::HandlerError;
use crate::cpu::quantized::QuantizedMatrix;
use crate::weights::guarded_map::GuardedMap;

/// Memory-mapped safetensors: one file, a byte range inside a larger file, or several
/// shards read as one. Cheap to clone: clones share the mappings.
#[derive(Clone)]
pub struct WeightSource {
    /// The mapped files, in the order they were given.
    files: Arc<[Arc<Mapped>]>,
    /// Which of `files` holds each tensor.
    owner: Arc<HashMap<String, usize>>,
}

struct Mapped {
    path: PathBuf,
    map: GuardedMap,
    /// Where the safetensors bytes sit inside `map`.
    range: Range<usize>,
    /// Offset of the tensor data (after the 8-byte length and the JSON header), relative
    /// to `range.start`.
    data_start: usize,
    metadata: Metadata,
}

impl Mapped {
    /// Offsets of tensor `info`'s bytes inside `map`.
    fn bytes_of(&self, info: &TensorInfo) -> Range<usize> {
        let base = self.range.start + self.data_start;
        base + info.data_offsets.0..base + info.data_offsets.1
    }
}

/// Watches the files of a [`WeightSource`] for changes while any user of them still
/// maps them (see [`WeightSource::watch`]).
#[derive(Clone, Default)]
pub struct WeightsWatch {
    files: Vec<std::sync::Weak<Mapped>>,
}

impl WeightsWatch {
    /// Why the weights read so far can no longer be trusted, if a file still mapped was
    /// truncated or rewritten.
    pub fn changed(&self) -> Option<HandlerError> {
        self.files
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find_map(|m| {
                m.map.changed().map(|why| HandlerError::WeightsChanged {
                    path: m.path.clone(),
                    why,
                })
            })
    }
}

/// Bytes of one mapping, kept alive by this handle: a quantized weight used in place.
struct MappedBytes {
    file: Arc<Mapped>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MappedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.file.map[self.range.clone()]
    }
}

/// The GGML type names [`WeightSource::ggml_type`] reads (as `{:?}` writes them).
const GGML_TYPES: [GgmlDType; 12] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// The bytes a set of tensors occupies: per mapped file, the ranges of its tensors (see
/// [`WeightSource::span_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpan {
    parts: Vec<(usize, Range<usize>)>,
}

impl WeightSpan {
    /// Bytes covered, over all files.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|(_, r)| r.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.files.iter().map(|m| (&m.path, &m.range)))
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
        // Guarded: a file truncated or rewritten underneath is reported by
        // [`WeightSource::changed`] instead of ending the process.
        let map = GuardedMap::open(path)?;
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
        let mapped = Mapped {
            path: path.to_path_buf(),
            data_start: 8 + header_len,
            range: start..end,
            map,
            metadata,
        };
        for info in mapped.metadata.tensors().values() {
            if mapped.bytes_of(info).end > end {
                return Err(HandlerError::bad_file(
                    &path.display().to_string(),
                    "a tensor lies past the end of the file",
                ));
            }
        }
        Self::sharded(vec![Self::single(mapped)])
    }

    fn single(mapped: Mapped) -> Self {
        let owner = mapped
            .metadata
            .tensors()
            .into_keys()
            .map(|name| (name, 0))
            .collect();
        Self {
            files: Arc::new([Arc::new(mapped)]),
            owner: Arc::new(owner),
        }
    }

    /// The shards of one checkpoint read as one source. A tensor named in two shards is
    /// an error (the index would be ambiguous).
    pub fn sharded(shards: Vec<WeightSource>) -> Result<Self, HandlerError> {
        let mut files = Vec::new();
        let mut owner = HashMap::new();
        for shard in shards {
            for mapped in shard.files.iter() {
                let index = files.len();
                for name in mapped.metadata.tensors().into_keys() {
                    if owner.insert(name.clone(), index).is_some() {
                        return Err(HandlerError::bad_file(
                            &mapped.path.display().to_string(),
                            format!("tensor {name} is also in another shard"),
                        ));
                    }
                }
                files.push(mapped.clone());
            }
        }
        Ok(Self {
            files: files.into(),
            owner: Arc::new(owner),
        })
    }

    /// Each mapped file and the byte range of it that holds safetensors.
    pub fn files(&self) -> impl Iterator<Item = (&Path, Range<u64>)> {
        self.files
            .iter()
            .map(|m| (m.path.as_path(), m.range.start as u64..m.range.end as u64))
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.owner.keys().cloned().collect();
        names.sort();
        names
    }

    /// Number of elements over all tensors (the model's parameter count, buffers
    /// included; a quantized tensor counts its weights, not its bytes).
    pub fn parameters(&self) -> usize {
        self.tensor_names()
            .iter()
            .map(|name| match (self.info(name), self.ggml_type(name)) {
                (Some(info), Some(ggml)) => {
                    info.shape.iter().product::<usize>() / ggml.type_size() * ggml.block_size()
                }
                (Some(info), None) => info.shape.iter().product::<usize>(),
                (None, _) => 0,
            })
            .sum()
    }

    /// How the tensors are held once loaded, for describe: GGML blocks multiplied in
    /// place from the mapping (Spillway's kernels, or candle's dot products for the
    /// k-quants) or copied into candle's blocks (other GGML types), and
    /// float tensors copied out of the mapping (but for the f32 projection
    /// weights of streamed units in the MKL build, multiplied in place).
    pub fn holding(&self) -> String {
        use std::collections::BTreeMap;
        let mut in_place = BTreeMap::<String, usize>::new();
        let mut copied = BTreeMap::<String, usize>::new();
        let mut dense = 0;
        for name in self.tensor_names() {
            match self.ggml_type(&name) {
                Some(t) if crate::cpu::quantized::QuantizedMatrix::multiplies_in_place(t) => {
                    *in_place.entry(format!("{t:?}")).or_default() += 1
                }
                Some(t) => *copied.entry(format!("{t:?}")).or_default() += 1,
                None => dense += 1,
            }
        }
        let list = |counts: &BTreeMap<String, usize>| {
            counts
                .iter()
                .map(|(t, n)| format!("{n} {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !in_place.is_empty() {
            parts.push(format!("quantized, used in place: {}", list(&in_place)));
        }
        if !copied.is_empty() {
            parts.push(format!(
                "quantized, copied into candle's blocks: {}",
                list(&copied)
            ));
        }
        parts.push(format!("{dense} float tensors copied from the mapping"));
        if dense > 0 && crate::cpu::linear::InPlaceLinear::AVAILABLE {
            // Llama's `Projection::InPlace`: f32 matrices of units streamed from disk.
            parts.push("f32 projection weights of streamed units excepted: read in place".into());
        }
        parts.join("; ")
    }

    /// The GGML type of tensor `name` when it is stored quantized (its bytes as they
    /// were in the GGUF file).
    pub fn ggml_type(&self, name: &str) -> Option<GgmlDType> {
        let &file = self.owner.get(name)?;
        let metadata = self.files[file].metadata.metadata().as_ref()?;
        let written = metadata.get(&crate::weights::offload::ggml_key(name))?;
        GGML_TYPES
            .into_iter()
            .find(|t| format!("{t:?}") == *written)
    }

    /// Tensor `name` as a quantized matrix reading the mapping in place, when it is
    /// stored quantized (`None` otherwise). Its logical shape is `[rows, in]`, `in` from
    /// the bytes per row.
    pub fn quantized(&self, name: &str) -> candle_core::Result<Option<QuantizedMatrix>> {
        let Some(ggml) = self.ggml_type(name) else {
            return Ok(None);
        };
        let (file, info) =
            self.locate(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        let &[rows, row_bytes] = info.shape.as_slice() else {
            candle_core::bail!("quantized tensor {name} is not [rows, bytes per row]");
        };
        if info.dtype != safetensors::Dtype::U8 || row_bytes % ggml.type_size() != 0 {
            candle_core::bail!("quantized tensor {name} is not whole {ggml:?} blocks of bytes");
        }
        let inp = row_bytes / ggml.type_size() * ggml.block_size();
        let mapped = &self.files[file];
        let bytes = MappedBytes {
            file: mapped.clone(),
            range: mapped.bytes_of(info),
        };
        QuantizedMatrix::new(ggml, rows, inp, Arc::new(bytes)).map(Some)
    }

    /// Tensor `name`'s bytes in the mapping, with its shape, when it is stored as f32
    /// (`None` otherwise): an f32 weight multiplied in place.
    pub fn f32_bytes(
        &self,
        name: &str,
    ) -> Option<(crate::cpu::quantized::matmul::WeightBytes, Vec<usize>)> {
        let (file, info) = self.locate(name)?;
        if info.dtype != safetensors::Dtype::F32 {
            return None;
        }
        let mapped = &self.files[file];
        let bytes = MappedBytes {
            file: mapped.clone(),
            range: mapped.bytes_of(info),
        };
        Some((Arc::new(bytes), info.shape.clone()))
    }

    fn locate(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        let &file = self.owner.get(name)?;
        Some((file, self.files[file].metadata.info(name)?))
    }

    /// Header information (dtype, shape, offsets) of one tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.locate(name).map(|(_, info)| info)
    }

    fn view(&self, name: &str) -> candle_core::Result<TensorView<'_>> {
        let (file, info) =
            self.locate(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        let bytes = &self.files[file].map[self.files[file].bytes_of(info)];
        Ok(TensorView::new(info.dtype, info.shape.clone(), bytes)?)
    }

    /// Reads one tensor onto `device` in `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.tensor_on(name, device)?.to_dtype(dtype)
    }

    /// One tensor in its stored dtype on `device`: onto a GPU through the pinned staging
    /// buffers ([`crate::gpu::staging`]), elsewhere by candle's copy out of the mapping.
    fn tensor_on(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let view = self.view(name)?;
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let stored = DType::try_from(view.dtype())?;
            let shape = Shape::from(view.shape());
            if let Some(tensor) = crate::gpu::staging::upload(view.data(), stored, shape, device)? {
                return Ok(tensor);
            }
        }
        view.load(device)
    }

    /// The bytes that hold the tensors named `names`: per file, their ranges, those
    /// that meet (or are apart by less than a tensor's alignment) joined. Other tensors'
    /// bytes between them are left out: a block's experts stored between its attention
    /// tensors are not part of the block's span. `None` when no name is known.
    pub fn span_of<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> Option<WeightSpan> {
        // GGUF aligns tensors to 32 bytes by default; safetensors packs them.
        const GAP: usize = 64;
        let mut ranges: Vec<(usize, Range<usize>)> = (names.into_iter())
            .filter_map(|name| self.locate(name))
            .map(|(file, info)| (file, self.files[file].bytes_of(info)))
            .collect();
        ranges.sort_by_key(|(file, r)| (*file, r.start));
        let mut parts: Vec<(usize, Range<usize>)> = Vec::with_capacity(ranges.len());
        for (file, r) in ranges {
            match parts.last_mut() {
                Some((f, last)) if *f == file && r.start <= last.end + GAP => {
                    last.end = last.end.max(r.end)
                }
                _ => parts.push((file, r)),
            }
        }
        (!parts.is_empty()).then_some(WeightSpan { parts })
    }

    /// Asks the kernel to start reading `span` now (a disk unit about to be needed).
    pub fn prefetch(&self, span: &WeightSpan) {
        for (file, range) in &span.parts {
            let (offset, len) = page_aligned(range);
            self.files[*file].map.will_need(offset, len);
        }
    }

    /// Drops `span`'s pages from this process's resident memory (they stay in the page
    /// cache), so streaming disk units through a mapping never grows RSS to the file.
    pub fn release(&self, span: &WeightSpan) {
        for (file, range) in &span.parts {
            let (offset, len) = page_aligned(range);
            self.files[*file].map.dont_need(offset, len);
        }
    }

    /// Why the bytes read from this source can no longer be trusted, if one of its files
    /// was truncated or rewritten while mapped (see [`GuardedMap::changed`]); `None`
    /// while every file is as it was mapped.
    pub fn changed(&self) -> Option<HandlerError> {
        self.files.iter().find_map(|m| {
            m.map.changed().map(|why| HandlerError::WeightsChanged {
                path: m.path.clone(),
                why,
            })
        })
    }

    /// A handle that answers [`WeightSource::changed`] for as long as the source's
    /// mappings live, without keeping them alive (a handler whose weights were all
    /// copied out lets its mappings go, and a change to the files then no longer
    /// matters).
    pub fn watch(&self) -> WeightsWatch {
        WeightsWatch {
            files: self.files.iter().map(Arc::downgrade).collect(),
        }
    }

    /// A candle `VarBuilder` reading from this source.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        candle_nn::VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every tensor, loaded onto `device` (for tests and small models).
    pub fn load_all(&self, device: &Device) -> candle_core::Result<HashMap<String, Tensor>> {
        self.tensor_names()
            .into_iter()
            .map(|name| {
                let tensor = self.tensor_on(&name, device)?;
                Ok((name, tensor))
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
        self.owner.contains_key(name)
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
        let mut f = std::fs::File::create(&wrapped).expect("create");
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

    /// A tensor whose metadata says GGML blocks but whose bytes are not whole rows of
    /// them is refused with an error naming it, never read past its end.
    #[test]
    fn quantized_tensors_that_are_not_whole_blocks_are_refused() {
        use crate::weights::offload::{PlannedTensor, write_streaming};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.safetensors");
        let planned = |name: &str, shape: Vec<usize>, ggml| PlannedTensor {
            name: name.into(),
            dtype: DType::U8,
            shape,
            ggml: Some(ggml),
        };
        let tensors = [
            planned("ragged", vec![2, 19], GgmlDType::Q4_0),
            planned("flat", vec![36], GgmlDType::Q4_0),
            planned("good", vec![2, 36], GgmlDType::Q4_0),
        ];
        write_streaming(&path, &tensors, |t| {
            let bytes = vec![0u8; t.shape.iter().product()];
            Tensor::from_vec(bytes, t.shape.as_slice(), &Device::Cpu)
                .map_err(|e| HandlerError::Unsupported(e.to_string()))
        })
        .expect("write");
        let source = WeightSource::open(&path).expect("open");
        for name in ["ragged", "flat"] {
            let error = source.quantized(name).expect_err(name).to_string();
            assert!(error.contains(name), "{error}");
        }
        let good = source.quantized("good").expect("good").expect("quantized");
        assert_eq!(good.dims(), (2, 64));
        assert!(source.quantized("missing").expect("no error").is_none());
    }
}
