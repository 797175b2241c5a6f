//! [`ModelStore`]: the folder of model archives. Resolves the `url` of a registration
//! request or a start-up model to a path inside the store, and refuses anything else:
//! remote URLs, absolute paths and paths that climb out of the store (TorchServe's
//! ShellTorch chain started with registration from any URL).

pub mod archive;
pub mod hub;
pub mod manifest;
pub mod watch;

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// What identifies one form of an archive in the store: its length, modification time
/// and inode — of the file, or of a model folder's manifest. An archive rewritten in
/// place, or replaced by renaming another over it, gets another key. The watcher and
/// the lifecycle (a failed model is tried again once its archive's key changed) read
/// the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    pub len: u64,
    pub modified: Option<std::time::SystemTime>,
    pub inode: u64,
}

/// An archive's key now (`None` where it cannot be read).
pub fn archive_key(path: &Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt;
    // A model folder changes with its manifest.
    let file = if path.is_dir() {
        path.join(manifest::MANIFEST_PATH)
    } else {
        path.to_path_buf()
    };
    let meta = std::fs::metadata(file).ok()?;
    Some(FileKey {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode: meta.ino(),
    })
}

/// The model store folder.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of the archive or folder that `url` names.
    pub fn resolve(&self, url: &str) -> Result<PathBuf> {
        if url.contains("://") {
            return Err(Error::BadRequest(format!(
                "`{url}`: registering models from remote URLs is not allowed; copy the archive into \
                 the model store and register it by file name"
            )));
        }
        let relative = Path::new(url);
        let plain = !url.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(Error::BadRequest(format!(
                "`{url}`: a model url must name an archive inside the model store (no absolute \
                 paths, no `..`)"
            )));
        }
        let path = self.root.join(relative);
        if !path.exists() {
            return Err(Error::ArchiveNotFound(url.to_string()));
        }
        // A symlink inside the store could still point outside it.
        let store = self.root.canonicalize().map_err(Error::io(&self.root))?;
        let real = path.canonicalize().map_err(Error::io(&path))?;
        if !real.starts_with(&store) {
            return Err(Error::BadRequest(format!(
                "`{url}` resolves outside the model store"
            )));
        }
        Ok(path)
    }

    /// Every archive and unpacked model folder in the store, by file name, sorted.
    pub fn archives(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.root).map_err(Error::io(&self.root))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io(&self.root))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let is_archive = [".mar", ".tar.gz", ".tgz"]
                .iter()
                .any(|ext| name.ends_with(ext))
                && path.is_file();
            let is_model_folder = path.join(crate::store::manifest::MANIFEST_PATH).is_file();
            if is_archive || is_model_folder {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_inside_the_store_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.mar"), b"x").expect("write");
        let store = ModelStore::new(dir.path());
        assert_eq!(
            store.resolve("a.mar").expect("a.mar"),
            dir.path().join("a.mar")
        );
        for bad in [
            "https://example.com/a.mar",
            "/etc/passwd",
            "../a.mar",
            "x/../../a.mar",
            "",
        ] {
            let err = store.resolve(bad).expect_err(bad);
            assert_eq!(
                err.kind(),
                crate::error::ErrorKind::BadRequest,
                "{bad}: {err}"
            );
        }
        assert_eq!(
            store.resolve("missing.mar").expect_err("missing").kind(),
            crate::error::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_symlink_out_of_the_store_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret.mar"), b"x").expect("write");
        std::os::unix::fs::symlink(
            outside.path().join("secret.mar"),
            dir.path().join("link.mar"),
        )
        .expect("link");
        let err = ModelStore::new(dir.path())
            .resolve("link.mar")
            .expect_err("escape");
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn lists_archives_and_model_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["b.mar", "a.tar.gz", "notes.txt", ".hidden.mar"] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        std::fs::create_dir_all(dir.path().join("folder/MAR-INF")).expect("mkdir");
        std::fs::write(dir.path().join("folder/MAR-INF/MANIFEST.json"), b"{}").expect("write");
        std::fs::create_dir_all(dir.path().join("not-a-model")).expect("mkdir");
        let names = ModelStore::new(dir.path()).archives().expect("list");
        assert_eq!(names, vec!["a.tar.gz", "b.mar", "folder"]);
    }
}
