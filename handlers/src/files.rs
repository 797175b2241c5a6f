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
        WeightSource::open_range(&file, range)
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
