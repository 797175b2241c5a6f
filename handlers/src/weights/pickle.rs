//! PyTorch checkpoints (`torch.save` of a state dict: a zip holding a pickle and one
//! file per storage, `.pth`/`.pt`/`.bin`) converted once to safetensors in the offload
//! folder, so that they are planned from headers, memory-mapped and served as any
//! safetensors model. Only tensors are read: the pickle is interpreted by candle's
//! reader, which rebuilds tensors and dicts and runs no code; a pickled whole model
//! (`torch.save(model)`) holds classes, not a state dict, and is refused.

use std::path::{Path, PathBuf};

use crate::weights::offload;
use crate::{HandlerError, ModelFiles};

/// Version of what [`materialize`] writes, part of the folder's key.
const CONVERSION: u32 = 1;

/// Where the safetensors copy of the PyTorch checkpoint `name` lives, writing it if
/// needed; returns the folder (holding `model.safetensors`).
pub fn materialize(
    files: &dyn ModelFiles,
    name: &str,
    offload_root: &Path,
) -> Result<PathBuf, HandlerError> {
    let (path, range) = files
        .locate(name)?
        .ok_or_else(|| HandlerError::MissingFile(name.to_string()))?;
    let key = format!(
        "{}-v{CONVERSION}",
        offload::fingerprint_as(&path, &range, "pickle")?
    );
    offload::folder(
        offload_root,
        &key,
        crate::weights::files::SINGLE_WEIGHTS,
        |staging| {
            let whole_file = range.start == 0
                && std::fs::metadata(&path)
                    .map(|m| m.len() == range.end)
                    .unwrap_or(false);
            let target = staging.join(crate::weights::files::SINGLE_WEIGHTS);
            if whole_file {
                return convert(&Checkpoint::File(path.clone()), name, &target, staging);
            }
            // An archive entry (a .mar's .pth, deflated by torch-model-archiver) is read
            // into memory, never written out whole.
            let bytes = files.read_required(name)?;
            convert(&Checkpoint::Bytes(bytes), name, &target, staging)
        },
    )
}

/// A PyTorch checkpoint's zip: a file, or an archive entry's bytes.
enum Checkpoint {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Checkpoint {
    fn zip(&self) -> Result<zip::ZipArchive<Box<dyn ReadSeek + '_>>, zip::result::ZipError> {
        let reader: Box<dyn ReadSeek + '_> = match self {
            Checkpoint::File(path) => Box::new(std::io::BufReader::new(std::fs::File::open(path)?)),
            Checkpoint::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes.as_slice())),
        };
        zip::ZipArchive::new(reader)
    }

    /// A file candle's pickle reader can open (it takes a path): the file itself, or
    /// for bytes a zip in `staging` holding only their pickle (`*/data.pkl`) — the
    /// storages stay in memory — or, with `whole`, all of them.
    fn readable(&self, staging: &Path, whole: bool) -> Result<PathBuf, Box<dyn std::error::Error>> {
        use std::io::Write;
        let bytes = match self {
            Checkpoint::File(path) => return Ok(path.clone()),
            Checkpoint::Bytes(bytes) => bytes,
        };
        let path = staging.join(if whole {
            "checkpoint.pth"
        } else {
            "pickle.pth"
        });
        if whole {
            std::fs::write(&path, bytes)?;
            return Ok(path);
        }
        let mut zip = self.zip()?;
        let pickle = zip
            .file_names()
            .filter_map(Result::ok)
            .find(|n| n.ends_with("data.pkl"))
            .map(|n| n.into_owned())
            .ok_or("no data.pkl in the checkpoint")?;
        let mut entry = zip.by_name(&pickle)?;
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        let mut out = zip::ZipWriter::new(std::fs::File::create(&path)?);
        out.start_file(
            pickle,
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )?;
        out.write_all(&data)?;
        out.finish()?;
        Ok(path)
    }
}

trait ReadSeek: std::io::Read + std::io::Seek {}
impl<T: std::io::Read + std::io::Seek> ReadSeek for T {}

fn convert(
    checkpoint: &Checkpoint,
    name: &str,
    target: &Path,
    staging: &Path,
) -> Result<(), HandlerError> {
    let bad = |reason: String| HandlerError::bad_file(name, reason);
    let source = &checkpoint
        .readable(staging, false)
        .map_err(|e| bad(format!("not a PyTorch zip checkpoint ({e})")))?;
    let not_a_state_dict = |e: candle_core::Error| {
        bad(format!(
            "not a PyTorch zip checkpoint with a state dict ({e}); one saved before PyTorch 1.6 \
             or by pickle alone must be saved again with torch.save(model.state_dict(), ...)"
        ))
    };
    let mut infos =
        candle_core::pickle::read_pth_tensor_info(source, false, None).map_err(not_a_state_dict)?;
    if infos.is_empty() {
        // Training scripts often save {"state_dict": ..., "epoch": ...}.
        infos = candle_core::pickle::read_pth_tensor_info(source, false, Some("state_dict"))
            .unwrap_or_default();
    }
    if matches!(checkpoint, Checkpoint::Bytes(_)) {
        // Only the pickle was written out; the folder keeps the copy alone.
        let _ = std::fs::remove_file(source);
    }
    if infos.is_empty() {
        return Err(bad(
            "it holds no state dict of tensors (a pickled whole model is never unpickled: its \
             classes would be code; save model.state_dict() instead)"
                .into(),
        ));
    }
    if let Some(plan) = StoragePlan::new(&infos) {
        return plan
            .write(checkpoint, target)
            .map_err(|e| bad(format!("cannot write its safetensors copy: {e}")));
    }
    // Views that are not a contiguous run of their storage: through candle's tensors.
    let whole = checkpoint
        .readable(staging, true)
        .map_err(|e| bad(format!("cannot write it out: {e}")))?;
    let tensors = candle_core::pickle::read_all(&whole).map_err(not_a_state_dict);
    if matches!(checkpoint, Checkpoint::Bytes(_)) {
        let _ = std::fs::remove_file(&whole);
    }
    let tensors = tensors?;
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, target)
        .map_err(|e| bad(format!("cannot write its safetensors copy: {e}")))
}

/// A state dict whose tensors are each a contiguous run of bytes of a storage (what
/// `torch.save(model.state_dict())` writes): its safetensors copy is a header and those
/// runs copied straight from the zip's entries, without building any tensor.
struct StoragePlan {
    /// (name, dtype, shape, zip entry, byte offset in the entry, bytes), in file order.
    tensors: Vec<(String, safetensors::Dtype, Vec<usize>, String, usize, usize)>,
}

impl StoragePlan {
    fn new(infos: &[candle_core::pickle::TensorInfo]) -> Option<Self> {
        let mut tensors = Vec::with_capacity(infos.len());
        for info in infos {
            let dtype = safetensors_dtype(info.dtype)?;
            if !info.layout.is_contiguous() {
                return None;
            }
            let size = info.dtype.size_in_bytes();
            let bytes = info.layout.shape().elem_count() * size;
            let offset = info.layout.start_offset() * size;
            if offset + bytes > info.storage_size * size {
                return None;
            }
            tensors.push((
                info.name.clone(),
                dtype,
                info.layout.dims().to_vec(),
                info.path.clone(),
                offset,
                bytes,
            ));
        }
        // As safetensors orders them: widest dtype first (every tensor stays aligned),
        // then by name.
        tensors.sort_by(|a, b| {
            b.1.bitsize()
                .cmp(&a.1.bitsize())
                .then_with(|| a.0.cmp(&b.0))
        });
        Some(Self { tensors })
    }

    fn write(
        &self,
        checkpoint: &Checkpoint,
        target: &Path,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use std::io::{Read, Write};
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut at = 0usize;
        for (name, dtype, shape, _, _, bytes) in &self.tensors {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            at += bytes;
        }
        let mut json = serde_json::to_vec(&header)?;
        // The data starts 8-byte aligned, as safetensors' own writer pads it.
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(target)?);
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        let mut zip = checkpoint.zip()?;
        let mut buffer = Vec::new();
        for (name, _, _, entry, offset, bytes) in &self.tensors {
            let mut file = zip.by_name(entry)?;
            // Skip to the view's start, then copy its bytes.
            std::io::copy(&mut (&mut file).take(*offset as u64), &mut std::io::sink())?;
            buffer.resize(*bytes, 0);
            file.read_exact(&mut buffer)
                .map_err(|e| format!("tensor {name}: its storage `{entry}` is short: {e}"))?;
            out.write_all(&buffer)?;
        }
        // Not synced: like the other conversions it lands by a rename of its staging
        // folder, which a killed server never leaves half done.
        out.into_inner()?;
        Ok(())
    }
}

/// The safetensors dtype of a checkpoint's tensor; `None` for what safetensors lacks.
fn safetensors_dtype(dtype: candle_core::DType) -> Option<safetensors::Dtype> {
    use candle_core::DType as D;
    use safetensors::Dtype as S;
    Some(match dtype {
        D::F32 => S::F32,
        D::F16 => S::F16,
        D::BF16 => S::BF16,
        D::F64 => S::F64,
        D::I64 => S::I64,
        D::U8 => S::U8,
        D::U32 => S::U32,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// A state dict of several dtypes and odd sizes becomes a safetensors file the
    /// safetensors crate accepts, every tensor equal to the checkpoint's and aligned.
    #[test]
    fn a_state_dict_is_copied_to_safetensors_tensor_for_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pth = dir.path().join("w.pth");
        let dev = &Device::Cpu;
        let tensors = vec![
            (
                "features.conv0.weight".to_string(),
                Tensor::arange(0f32, 2.0 * 3.0 * 5.0, dev)
                    .and_then(|t| (t * 0.25)?.reshape((2, 3, 5)))
                    .expect("f32"),
            ),
            (
                "features.norm0.num_batches_tracked".to_string(),
                Tensor::new(&[3i64], dev).expect("i64"),
            ),
            (
                "classifier.bias".to_string(),
                Tensor::new(&[1.5f32, -2.0, 0.125], dev).expect("bias"),
            ),
            (
                "half".to_string(),
                Tensor::new(&[1f32, 2.0, 3.0], dev)
                    .and_then(|t| t.to_dtype(DType::F16))
                    .expect("f16"),
            ),
        ];
        crate::testing::pth::write_state_dict(&tensors, &pth).expect("pth");
        let target = dir.path().join("model.safetensors");
        convert(&Checkpoint::File(pth.clone()), "w.pth", &target, dir.path()).expect("convert");
        // The same checkpoint as an archive entry's bytes converts to the same file.
        let from_bytes = dir.path().join("from-bytes.safetensors");
        let bytes = std::fs::read(&pth).expect("pth bytes");
        convert(&Checkpoint::Bytes(bytes), "w.pth", &from_bytes, dir.path()).expect("bytes");
        assert_eq!(
            std::fs::read(&from_bytes).expect("read"),
            std::fs::read(&target).expect("read")
        );
        let bytes = std::fs::read(&target).expect("read");
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let header = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        assert_eq!(header % 8, 0, "the data starts aligned");
        for (name, want) in &tensors {
            let view = file.tensor(name).expect("present");
            assert_eq!(view.shape(), want.dims(), "{name}");
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(
                start % view.dtype().bitsize().div_ceil(8),
                0,
                "{name} aligned"
            );
            let got = Tensor::from_raw_buffer(view.data(), want.dtype(), want.dims(), dev)
                .expect("tensor");
            let same = got
                .to_dtype(DType::F64)
                .and_then(|g| {
                    g.sub(&want.to_dtype(DType::F64)?)?
                        .abs()?
                        .sum_all()?
                        .to_scalar::<f64>()
                })
                .expect("diff");
            assert_eq!(same, 0.0, "{name}");
        }
        assert_eq!(file.names().len(), tensors.len());
    }

    #[test]
    fn a_file_that_is_not_a_checkpoint_is_refused_saying_how_to_save_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pth = dir.path().join("w.pth");
        std::fs::write(&pth, b"not a zip").expect("write");
        let err = convert(
            &Checkpoint::File(pth),
            "w.pth",
            &dir.path().join("out"),
            dir.path(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("state_dict()"), "{err}");
    }
}
