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
    fn weights(&self, path: &str) -> Result<WeightSource, HandlerError>;

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

    fn weights(&self, path: &str) -> Result<WeightSource, HandlerError> {
        let full = self.path(path)?;
        if !full.is_file() {
            return Err(HandlerError::MissingFile(path.to_string()));
        }
        WeightSource::open(&full)
    }
}
