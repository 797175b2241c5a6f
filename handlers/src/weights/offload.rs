//! The offload folder: where weights go when they cannot be mapped as they are — a
//! dtype conversion, a GGUF source — written once as safetensors, keyed by a fingerprint
//! of the source (file, byte range, size, mtime, target dtype) so a restart reuses them,
//! then mapped like any checkpoint. Files are written header first and then tensor by
//! tensor, so the peak memory of a conversion is one tensor, never the state dict; each
//! folder is filled under a temporary name and renamed into place.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::huge_map;
use crate::error::CandleContext;
use crate::{HandlerError, WeightSource};

/// One tensor of a file about to be written.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// For GGML blocks kept as they are: their type. The tensor is then `U8`
    /// `[rows, bytes per row]`, and the file's metadata says `ggml.<name>: <type>`
    /// (read back by [`crate::WeightSource::quantized`]).
    pub ggml: Option<GgmlDType>,
}

/// The `__metadata__` key holding the GGML type of the quantized tensor `name`.
pub fn ggml_key(name: &str) -> String {
    format!("ggml.{name}")
}

fn st_dtype(dtype: DType) -> Result<&'static str, HandlerError> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::U32 => "U32",
        DType::U8 => "U8",
        other => {
            return Err(HandlerError::Unsupported(format!(
                "cannot write {other:?} tensors to the offload folder"
            )));
        }
    })
}

/// A name for the file at `path` that changes whenever the file does: its name (made
/// safe for a folder name), size and modification time. Keys every cache of derived
/// copies (unpacked archives, inflated entries, converted weights).
pub fn source_key(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stem: String = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("source")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(format!("{stem}-{:x}-{modified:x}", meta.len()))
}

/// A folder name for `path[range]` converted to `dtype` that changes whenever the source does.
pub fn fingerprint(path: &Path, range: &Range<u64>, dtype: DType) -> Result<String, HandlerError> {
    fingerprint_as(path, range, &format!("{dtype:?}").to_lowercase())
}

/// [`fingerprint`] for a copy named `target` (`"ggml"`: GGML blocks kept as they are).
pub fn fingerprint_as(
    path: &Path,
    range: &Range<u64>,
    target: &str,
) -> Result<String, HandlerError> {
    let source = source_key(path).map_err(|source| HandlerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "{source}-{:x}-{:x}-{target}",
        range.start,
        range.end - range.start,
    ))
}

/// `root/key`, filled by `fill` unless a previous run already did (`done` names the file
/// whose presence says so).
pub fn folder(
    root: &Path,
    key: &str,
    done: &str,
    fill: impl FnOnce(&Path) -> Result<(), HandlerError>,
) -> Result<PathBuf, HandlerError> {
    remove_abandoned_partials(root);
    let target = root.join(key);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| HandlerError::Io { path: p, source }
    };
    if target.join(done).is_file() {
        if lengths_intact(&target) {
            return Ok(target);
        }
        // A file in it was truncated or rewritten since it was written: written again.
        tracing::warn!(folder = %target.display(), "a file in this folder changed since it was written: writing it again");
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    let staging = root.join(format!(".partial-{}-{key}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let result = fill(&staging)
        .and_then(|()| record_lengths(&staging).map_err(io(&staging)))
        .map(|()| drop_pages_of_files_in(&staging))
        .and_then(|()| match std::fs::rename(&staging, &target) {
            Ok(()) => Ok(()),
            // Another process finished first: its copy is as good as ours.
            Err(_) if target.join(done).is_file() => Ok(()),
            Err(e) => Err(io(&target)(e)),
        });
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| target)
}

/// Drops the page cache of the files just written into `dir`, so that reading them
/// through their mapping fills it again in huge pages (see [`huge_map`]).
fn drop_pages_of_files_in(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            huge_map::drop_written_pages(&entry.path());
        }
    }
}

/// Removes what processes that are no longer running left half written in `dir`: the
/// files and folders named `...partial-PID...` (where writers stage their work before
/// renaming it into place) of a PID that is not alive. A process killed mid-write
/// leaves these; nothing ever reads them, and this keeps them from piling up.
pub fn remove_abandoned_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, after)) = name
            .split_once(".partial-")
            .or_else(|| name.split_once("partial-"))
        else {
            continue;
        };
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what a stopped process left half written")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove what a stopped process left half written")
            }
        }
    }
}

/// The file in a written folder (offload, conversion, unpacked archive) that lists every
/// file's length as written.
pub const LENGTHS_FILE: &str = ".spillway-lengths.json";

/// Writes [`LENGTHS_FILE`] into `dir`: the length of every file under it.
pub fn record_lengths(dir: &Path) -> std::io::Result<()> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<String, u64>,
    ) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &entry.path(), out)?;
            } else if kind.is_file() {
                let relative = entry
                    .path()
                    .strip_prefix(root)
                    .unwrap_or(&entry.path())
                    .to_path_buf();
                out.insert(
                    relative.to_string_lossy().into_owned(),
                    entry.metadata()?.len(),
                );
            }
        }
        Ok(())
    }
    let mut lengths = std::collections::BTreeMap::new();
    walk(dir, dir, &mut lengths)?;
    lengths.remove(LENGTHS_FILE);
    std::fs::write(dir.join(LENGTHS_FILE), serde_json::to_vec(&lengths)?)
}

/// Whether every file [`LENGTHS_FILE`] lists in `dir` still has the length it was
/// written with (false without the list: a folder from before it, or never finished).
/// What a truncation or a rewrite to another length since breaks.
pub fn lengths_intact(dir: &Path) -> bool {
    let Ok(list) = std::fs::read(dir.join(LENGTHS_FILE)) else {
        return false;
    };
    let Ok(lengths) = serde_json::from_slice::<std::collections::BTreeMap<String, u64>>(&list)
    else {
        return false;
    };
    lengths.iter().all(|(relative, &len)| {
        std::fs::metadata(dir.join(relative)).is_ok_and(|m| m.is_file() && m.len() == len)
    })
}

/// Writes `tensors` to `path` as safetensors: the header first, then each tensor from
/// `produce`, one at a time.
pub fn write_streaming(
    path: &Path,
    tensors: &[PlannedTensor],
    mut produce: impl FnMut(&PlannedTensor) -> Result<Tensor, HandlerError>,
) -> Result<(), HandlerError> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in tensors {
        let end = t
            .shape
            .iter()
            .try_fold(t.dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .and_then(|bytes| offset.checked_add(bytes))
            .ok_or_else(|| {
                HandlerError::Unsupported(format!(
                    "tensor {} of shape {:?} is too large to write",
                    t.name, t.shape
                ))
            })?;
        header.insert(
            t.name.clone(),
            json!({"dtype": st_dtype(t.dtype)?, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut metadata = json!({"format": "pt", "written_by": "spillway"});
    for t in tensors {
        if let Some(ggml) = t.ggml {
            metadata[ggml_key(&t.name)] = json!(format!("{ggml:?}"));
        }
    }
    header.insert("__metadata__".into(), metadata);
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let io = |source| HandlerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let name = path.parent().and_then(|p| p.file_name()).map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    super::progress::begin(format!("writing weights to {name}"), offset as u64);
    file.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&header).map_err(io)?;
    for t in tensors {
        let tensor = produce(t)?;
        if tensor.dims() != t.shape.as_slice() || tensor.dtype() != t.dtype {
            return Err(HandlerError::Unsupported(format!(
                "{} came out as {:?} {:?}",
                t.name,
                tensor.dtype(),
                tensor.dims()
            )));
        }
        let bytes = tensor_bytes(&tensor).context(|| format!("cannot read {}", t.name))?;
        file.write_all(&bytes).map_err(io)?;
        super::progress::advance(bytes.len() as u64);
    }
    file.flush().map_err(io)
}

fn tensor_bytes(tensor: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match flat.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U32 => flat
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        other => {
            return Err(candle_core::Error::Msg(format!(
                "unexpected dtype {other:?}"
            )));
        }
    })
}

/// A folder name for all of `source`'s files converted to `dtype`: [`fingerprint`] of a
/// single file; for shards the first one's, the count, and a stable hash of them all
/// (a folder name must stay short however many shards there are).
fn source_fingerprint(source: &WeightSource, dtype: DType) -> Result<String, HandlerError> {
    source_fingerprint_as(source, &format!("{dtype:?}").to_lowercase())
}

/// [`source_fingerprint`] for a copy named `target` (`"q4k"`: quantized to Q4_K).
pub fn source_fingerprint_as(source: &WeightSource, target: &str) -> Result<String, HandlerError> {
    let keys = source
        .files()
        .map(|(path, range)| fingerprint_as(path, &range, target))
        .collect::<Result<Vec<_>, _>>()?;
    match keys.as_slice() {
        [one] => Ok(one.clone()),
        [first, ..] => {
            // FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
            let hash = keys
                .join("/")
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            Ok(format!("{first}-of-{}-{hash:016x}", keys.len()))
        }
        [] => Err(HandlerError::Unsupported(
            "a weight source without files".into(),
        )),
    }
}

/// `source` with its floating-point tensors converted to `dtype`, written once into
/// `root`; returns the converted file.
pub fn convert(source: &WeightSource, dtype: DType, root: &Path) -> Result<PathBuf, HandlerError> {
    let key = source_fingerprint(source, dtype)?;
    let dir = folder(root, &key, "model.safetensors", |staging| {
        let planned: Vec<PlannedTensor> = source
            .tensor_names()
            .into_iter()
            .filter_map(|name| {
                let info = source.info(&name)?;
                let stored = DType::try_from(info.dtype).ok()?;
                let out = if stored.is_float() { dtype } else { stored };
                Some(PlannedTensor {
                    ggml: source.ggml_type(&name),
                    name,
                    dtype: out,
                    shape: info.shape.clone(),
                })
            })
            .collect();
        write_streaming(&staging.join("model.safetensors"), &planned, |t| {
            source
                .load(&t.name, t.dtype, &Device::Cpu)
                .context(|| format!("cannot convert {}", t.name))
        })
    })?;
    Ok(dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_once_and_reads_back_the_same_values_in_the_new_dtype() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let tensors: std::collections::HashMap<String, Tensor> = [
            (
                "a".to_string(),
                Tensor::new(&[[1.5f32, -2.25], [3.0, 0.125]], &Device::Cpu).expect("a"),
            ),
            (
                "ids".to_string(),
                Tensor::new(&[7u32, 9], &Device::Cpu).expect("ids"),
            ),
        ]
        .into_iter()
        .collect();
        candle_core::safetensors::save(&tensors, &path).expect("save");
        let source = WeightSource::open(&path).expect("source");
        let root = dir.path().join("offload");
        let converted = convert(&source, DType::BF16, &root).expect("convert");
        let out = WeightSource::open(&converted).expect("open converted");
        assert_eq!(
            out.info("a").map(|i| format!("{:?}", i.dtype)),
            Some("BF16".into())
        );
        assert_eq!(
            out.info("ids").map(|i| format!("{:?}", i.dtype)),
            Some("U32".into()),
            "integers stay as they are"
        );
        let a: Vec<f32> = out
            .load("a", DType::F32, &Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("a");
        assert_eq!(a, [1.5, -2.25, 3.0, 0.125], "exactly representable in bf16");
        let modified = std::fs::metadata(&converted)
            .and_then(|m| m.modified())
            .expect("mtime");
        let again = convert(&source, DType::BF16, &root).expect("reuse");
        assert_eq!(again, converted);
        assert_eq!(
            std::fs::metadata(&again)
                .and_then(|m| m.modified())
                .expect("mtime"),
            modified,
            "not rewritten"
        );
    }

    #[test]
    fn a_folder_whose_files_changed_length_since_written_is_written_again() {
        let root = tempfile::tempdir().expect("tempdir");
        let fills = std::cell::Cell::new(0);
        let fill = |staging: &Path| {
            fills.set(fills.get() + 1);
            std::fs::create_dir_all(staging.join("sub")).expect("mkdir");
            std::fs::write(staging.join("model.safetensors"), [1u8; 100]).expect("write");
            std::fs::write(staging.join("sub/tokenizer.json"), b"{}").expect("write");
            Ok(())
        };
        let dir = folder(root.path(), "k", "model.safetensors", fill).expect("first");
        assert!(lengths_intact(&dir));
        folder(root.path(), "k", "model.safetensors", fill).expect("reused");
        assert_eq!(fills.get(), 1, "an intact folder is reused");
        // Truncated under us (a nested file too), or its list gone: written again.
        for break_it in [
            |d: &Path| std::fs::write(d.join("model.safetensors"), [0u8; 10]).expect("truncate"),
            |d: &Path| std::fs::write(d.join("sub/tokenizer.json"), b"").expect("truncate"),
            |d: &Path| std::fs::remove_file(d.join(LENGTHS_FILE)).expect("remove"),
        ] {
            break_it(&dir);
            assert!(!lengths_intact(&dir));
            folder(root.path(), "k", "model.safetensors", fill).expect("again");
            assert!(lengths_intact(&dir));
            assert_eq!(
                std::fs::read(dir.join("model.safetensors")).expect("read"),
                [1u8; 100]
            );
        }
        assert_eq!(fills.get(), 4);
    }

    #[test]
    fn only_what_dead_processes_left_half_written_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A PID above the kernel's largest is never alive.
        let dead = 4_194_305;
        let ours = std::process::id();
        let names = [
            format!(".partial-{dead}-key"),
            format!(".model.partial-{dead}"),
            format!(".partial-{ours}-key"),
            "key".to_string(),
            ".partial-notapid".to_string(),
        ];
        for name in &names[..3] {
            std::fs::create_dir_all(dir.path().join(name)).expect("mkdir");
        }
        std::fs::write(dir.path().join(format!(".3.partial-{dead}")), b"half").expect("file");
        std::fs::create_dir_all(dir.path().join(&names[3])).expect("mkdir");
        std::fs::create_dir_all(dir.path().join(&names[4])).expect("mkdir");
        remove_abandoned_partials(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![names[2].clone(), names[3].clone(), names[4].clone()];
        want.sort();
        assert_eq!(left, want);
    }
}
