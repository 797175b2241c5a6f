//! [`ModelFiles`]: how a handler reads the files of its model, wherever they live.
//!
//! The server implements this for unpacked folders and for archives; handlers only ask
//! for files by their path inside the archive ("config.json", "1_Pooling/config.json").

use crate::{HandlerError, WeightSource};

/// Read access to one model's files.
pub trait ModelFiles: Send + Sync {
    /// The bytes of the file at `path`, or `None` when the archive has no such file.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, HandlerError>;

    /// The safetensors file at `path`, memory-mapped without copying.
    fn weights(&self, path: &str) -> Result<WeightSource, HandlerError> {
        let (file, range) = self
            .locate(path)?
            .ok_or_else(|| HandlerError::MissingFile(path.to_string()))?;
        // Name the model file, not the archive it may sit in.
        WeightSource::open_range(&file, range).map_err(|e| match e {
            HandlerError::BadFile { reason, .. } => HandlerError::bad_file(path, reason),
            other => other,
        })
    }

    /// The model's weights: `model.safetensors`, or else the shards that
    /// `model.safetensors.index.json` maps tensors to, read as one source.
    /// [`HandlerError::MissingFile`] (naming `model.safetensors`) when there are neither.
    fn model_weights(&self) -> Result<WeightSource, HandlerError> {
        match self.weights(SINGLE_WEIGHTS) {
            Err(HandlerError::MissingFile(_)) => {}
            found => return found,
        }
        let Some(shards) = shard_names(self)? else {
            return Err(HandlerError::MissingFile(SINGLE_WEIGHTS.to_string()));
        };
        let sources = shards
            .iter()
            .map(|shard| match self.weights(shard) {
                Err(HandlerError::MissingFile(_)) => Err(HandlerError::bad_file(
                    SHARD_INDEX,
                    format!("it maps tensors to {shard}, which is not in the model"),
                )),
                other => other,
            })
            .collect::<Result<Vec<_>, _>>()?;
        WeightSource::sharded(sources)
    }

    /// Where the bytes of `path` lie on disk — a file and a byte range in it (an
    /// uncompressed archive entry is a range of the archive) — or `None` if absent.
    fn locate(
        &self,
        path: &str,
    ) -> Result<Option<(std::path::PathBuf, std::ops::Range<u64>)>, HandlerError>;

    /// Names of the files whose name ends with `suffix`, sorted.
    fn find(&self, suffix: &str) -> Vec<String>;

    /// The file at `path`, which must exist.
    fn read_required(&self, path: &str) -> Result<Vec<u8>, HandlerError> {
        self.read(path)?
            .ok_or_else(|| HandlerError::MissingFile(path.to_string()))
    }

    /// The file at `path` parsed as JSON, or `None` when it does not exist.
    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, HandlerError>
    where
        Self: Sized,
    {
        read_json(self, path)
    }
}

/// The weights file of an unsharded checkpoint.
pub const SINGLE_WEIGHTS: &str = "model.safetensors";
/// The index of a sharded checkpoint (HuggingFace's layout: `weight_map` maps each
/// tensor name to its shard file).
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The shard files `model.safetensors.index.json` names, sorted and without repeats;
/// `None` when the model has no index.
pub fn shard_names(
    files: &(impl ModelFiles + ?Sized),
) -> Result<Option<Vec<String>>, HandlerError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let Some(index) = read_json::<Index>(files, SHARD_INDEX)? else {
        return Ok(None);
    };
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    if shards.is_empty() {
        return Err(HandlerError::bad_file(
            SHARD_INDEX,
            "its weight_map is empty",
        ));
    }
    Ok(Some(shards))
}

/// [`ModelFiles::read_json`] for trait objects.
pub fn read_json<T: serde::de::DeserializeOwned>(
    files: &(impl ModelFiles + ?Sized),
    path: &str,
) -> Result<Option<T>, HandlerError> {
    match files.read(path)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HandlerError::bad_file(path, e)),
    }
}

/// [`ModelFiles`] over a plain folder on disk.
#[derive(Debug, Clone)]
pub struct FolderFiles {
    root: std::path::PathBuf,
}

impl FolderFiles {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, path: &str) -> Result<std::path::PathBuf, HandlerError> {
        let relative = std::path::Path::new(path);
        // Handlers name files by constant relative paths; refuse anything that could
        // leave the model folder all the same.
        if relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(HandlerError::Input(format!(
                "invalid model file path `{path}`"
            )));
        }
        Ok(self.root.join(relative))
    }
}

impl ModelFiles for FolderFiles {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, HandlerError> {
        let full = self.path(path)?;
        match std::fs::read(&full) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HandlerError::Io { path: full, source }),
        }
    }

    fn locate(
        &self,
        path: &str,
    ) -> Result<Option<(std::path::PathBuf, std::ops::Range<u64>)>, HandlerError> {
        let full = self.path(path)?;
        match std::fs::metadata(&full) {
            Ok(meta) if meta.is_file() => Ok(Some((full, 0..meta.len()))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HandlerError::Io { path: full, source }),
        }
    }

    fn find(&self, suffix: &str) -> Vec<String> {
        let mut found: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(suffix))
            .collect();
        found.sort();
        found
    }
}

/// A model's files with its weights taken from elsewhere: `model.safetensors` from a
/// converted copy (a PyTorch checkpoint's, in the offload folder), every other file
/// (labels, configs) from the archive as it is now.
pub struct ConvertedWeights {
    pub weights: FolderFiles,
    pub rest: std::sync::Arc<dyn ModelFiles>,
}

impl ConvertedWeights {
    fn from_weights(path: &str) -> bool {
        path == SINGLE_WEIGHTS
    }
}

impl ModelFiles for ConvertedWeights {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, HandlerError> {
        match Self::from_weights(path) {
            true => self.weights.read(path),
            false => self.rest.read(path),
        }
    }

    fn locate(
        &self,
        path: &str,
    ) -> Result<Option<(std::path::PathBuf, std::ops::Range<u64>)>, HandlerError> {
        match Self::from_weights(path) {
            true => self.weights.locate(path),
            false => self.rest.locate(path),
        }
    }

    fn find(&self, suffix: &str) -> Vec<String> {
        let mut found = self.rest.find(suffix);
        found.extend(
            self.weights
                .find(suffix)
                .into_iter()
                .filter(|n| Self::from_weights(n)),
        );
        found.sort();
        found.dedup();
        found
    }
}

/// `Read + Seek` over a byte range of a file (an archive entry, say).
pub struct RangeReader {
    file: std::fs::File,
    range: std::ops::Range<u64>,
    at: u64,
}

impl RangeReader {
    pub fn open(path: &std::path::Path, range: std::ops::Range<u64>) -> Result<Self, HandlerError> {
        let file = std::fs::File::open(path).map_err(|source| HandlerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            at: range.start,
            range,
        })
    }
}

impl std::io::Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Seek;
        let left = self.range.end.saturating_sub(self.at);
        let take = (buf.len() as u64).min(left) as usize;
        if take == 0 {
            return Ok(0);
        }
        self.file.seek(std::io::SeekFrom::Start(self.at))?;
        let n = self.file.read(&mut buf[..take])?;
        self.at += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for RangeReader {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        let len = self.range.end - self.range.start;
        let relative = match pos {
            std::io::SeekFrom::Start(n) => n as i128,
            std::io::SeekFrom::End(n) => len as i128 + n as i128,
            std::io::SeekFrom::Current(n) => (self.at - self.range.start) as i128 + n as i128,
        };
        if relative < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start",
            ));
        }
        self.at = self.range.start + relative as u64;
        Ok(relative as u64)
    }
}

/// A model's files with `model.safetensors` replaced by another file (its converted copy
/// in the offload folder); everything else comes from `base`.
pub struct WithWeights {
    base: std::sync::Arc<dyn ModelFiles>,
    weights: std::path::PathBuf,
}

impl WithWeights {
    pub fn new(base: std::sync::Arc<dyn ModelFiles>, weights: std::path::PathBuf) -> Self {
        Self { base, weights }
    }
}

impl ModelFiles for WithWeights {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, HandlerError> {
        self.base.read(path)
    }

    fn locate(
        &self,
        path: &str,
    ) -> Result<Option<(std::path::PathBuf, std::ops::Range<u64>)>, HandlerError> {
        if path != "model.safetensors" {
            return self.base.locate(path);
        }
        let len = std::fs::metadata(&self.weights)
            .map_err(|source| HandlerError::Io {
                path: self.weights.clone(),
                source,
            })?
            .len();
        Ok(Some((self.weights.clone(), 0..len)))
    }

    fn find(&self, suffix: &str) -> Vec<String> {
        self.base.find(suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn write_shard(dir: &std::path::Path, file: &str, names: &[&str]) {
        let tensors: std::collections::HashMap<String, Tensor> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let t = Tensor::full(i as f32 + 1.0, (2, 3), &Device::Cpu).expect("tensor");
                (n.to_string(), t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(file)).expect("save");
    }

    fn write_index(dir: &std::path::Path, map: &[(&str, &str)]) {
        let map: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(t, f)| (t.to_string(), (*f).into()))
            .collect();
        let index = serde_json::json!({ "weight_map": map });
        std::fs::write(dir.join(SHARD_INDEX), index.to_string()).expect("index");
    }

    #[test]
    fn shards_named_by_the_index_read_as_one_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_shard(dir.path(), "a.safetensors", &["x.weight", "y.weight"]);
        write_shard(dir.path(), "b.safetensors", &["y.bias"]);
        write_index(
            dir.path(),
            &[
                ("x.weight", "a.safetensors"),
                ("y.weight", "a.safetensors"),
                ("y.bias", "b.safetensors"),
            ],
        );
        let source = FolderFiles::new(dir.path())
            .model_weights()
            .expect("source");
        assert_eq!(source.tensor_names(), ["x.weight", "y.bias", "y.weight"]);
        let bias = source.load("y.bias", candle_core::DType::F32, &Device::Cpu);
        let bias: Vec<f32> = bias.and_then(|t| t.flatten_all()?.to_vec1()).expect("load");
        assert_eq!(bias, [1.0; 6]);
        // One unit ("y") whose tensors sit in two files spans both.
        let span = source.span_of(["y.weight", "y.bias"]).expect("span");
        assert_eq!(span.len(), 2 * 6 * 4);
    }

    #[test]
    fn an_index_naming_a_missing_or_escaping_shard_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_shard(dir.path(), "a.safetensors", &["x.weight"]);
        write_index(
            dir.path(),
            &[
                ("x.weight", "a.safetensors"),
                ("z.weight", "gone.safetensors"),
            ],
        );
        let files = FolderFiles::new(dir.path());
        let message = files
            .model_weights()
            .expect_err("missing shard")
            .to_string();
        assert!(message.contains("gone.safetensors"), "{message}");
        write_index(dir.path(), &[("x.weight", "../a.safetensors")]);
        assert!(
            files.model_weights().is_err(),
            "a shard outside the model folder"
        );
        write_index(dir.path(), &[]);
        assert!(files.model_weights().is_err(), "an empty weight_map");
    }

    #[test]
    fn a_tensor_in_two_shards_is_an_error_and_no_weights_is_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FolderFiles::new(dir.path());
        assert!(matches!(
            files.model_weights(),
            Err(HandlerError::MissingFile(name)) if name == SINGLE_WEIGHTS
        ));
        write_shard(dir.path(), "a.safetensors", &["x.weight"]);
        write_shard(dir.path(), "b.safetensors", &["x.weight"]);
        write_index(
            dir.path(),
            &[("x.weight", "a.safetensors"), ("y", "b.safetensors")],
        );
        let message = files.model_weights().expect_err("duplicate").to_string();
        assert!(message.contains("x.weight"), "{message}");
    }
}
