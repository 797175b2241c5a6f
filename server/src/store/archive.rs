//! Opening model archives: zip `.mar` (zip-store or deflated), `.tar.gz`, and unpacked
//! folders. An [`OpenedArchive`] gives the manifest and a [`ModelFiles`] view for the
//! handler.
//!
//! - zip-store `.mar`: small files are read out of the zip; safetensors entries are
//!   stored uncompressed and mapped straight out of the archive (no extraction, no copy).
//! - deflated `.mar` (torch-model-archiver's default): weights are inflated once into the
//!   cache folder, keyed by the archive's fingerprint, then mapped.
//! - `.tar.gz`: unpacked once, keyed the same way, into the `offload_folder` its
//!   `setup_config.json` names (weights that cannot be mapped as they are go there), else
//!   into the cache folder; a note in the cache folder remembers where, so a restart
//!   neither unpacks nor scans the archive again.
//!
//! Every archive is checked before anything is read from it: entries that would escape
//! the extraction folder (zip-slip), symlinks and hard links, too many entries, and sizes
//! beyond [`ArchiveLimits`] are refused with an error naming the entry.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use spillway_handlers::weights::files::FolderFiles;
use spillway_handlers::weights::offload::lengths_intact;
use spillway_handlers::{HandlerError, ModelFiles, WeightSource};

use crate::error::{Error, Result};
use crate::store::manifest::{MANIFEST_PATH, Manifest};

/// How an archive is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveFormat {
    /// A zip `.mar` whose entries are stored uncompressed.
    ZipStore,
    /// A zip `.mar` with compressed entries (torch-model-archiver's `default`).
    Zip,
    Tgz,
    /// An unpacked model folder (`no-archive`).
    Folder,
}

/// Bounds on what an archive may contain.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    pub max_entries: usize,
    /// Total uncompressed bytes.
    pub max_total_bytes: u64,
    /// Largest uncompressed/compressed ratio of a compressed entry (zip bombs).
    pub max_compression_ratio: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_total_bytes: 1 << 40, // 1 TiB: far beyond any model this server can hold.
            max_compression_ratio: 1_000,
        }
    }
}

/// An archive whose manifest has been read and whose entries have been checked.
#[derive(Clone)]
pub struct OpenedArchive {
    pub path: PathBuf,
    pub format: ArchiveFormat,
    pub manifest: Manifest,
    pub files: Arc<dyn ModelFiles>,
}

impl std::fmt::Debug for OpenedArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedArchive")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("manifest", &self.manifest)
            .finish()
    }
}

/// Opens the archive or model folder at `path`; `cache_dir` receives what must be unpacked.
pub fn open(path: &Path, cache_dir: &Path, limits: &ArchiveLimits) -> Result<OpenedArchive> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (format, files): (ArchiveFormat, Arc<dyn ModelFiles>) = if path.is_dir() {
        (ArchiveFormat::Folder, Arc::new(FolderFiles::new(path)))
    } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        let dir = unpack_tgz(path, cache_dir, limits)?;
        (ArchiveFormat::Tgz, Arc::new(FolderFiles::new(dir)))
    } else {
        let zip = ZipFiles::open(path, cache_dir, limits)?;
        let format = if zip.all_stored() {
            ArchiveFormat::ZipStore
        } else {
            ArchiveFormat::Zip
        };
        (format, Arc::new(zip))
    };
    let manifest_bytes = files
        .read(MANIFEST_PATH)
        .map_err(Error::from)?
        .ok_or_else(|| {
            Error::bad_archive(
                path,
                format!("{MANIFEST_PATH} is missing (pack models with `spillway archive`)"),
            )
        })?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| Error::bad_archive(path, format!("{MANIFEST_PATH}: {e}")))?;
    Ok(OpenedArchive {
        path: path.to_path_buf(),
        format,
        manifest,
        files,
    })
}

/// A model folder without a manifest (a Hugging Face cache snapshot), read as an archive
/// whose manifest is `manifest`.
pub fn open_folder_as(path: &Path, manifest: Manifest) -> OpenedArchive {
    OpenedArchive {
        path: path.to_path_buf(),
        format: ArchiveFormat::Folder,
        manifest,
        files: Arc::new(FolderFiles::new(path)),
    }
}

/// A name for an archive's unpacked copy that changes whenever the archive does.
fn fingerprint(path: &Path) -> Result<String> {
    spillway_handlers::weights::offload::source_key(path).map_err(Error::io(path))
}

/// The archive-relative path of an entry, if it stays inside the archive.
fn safe_relative(name: &str) -> Option<PathBuf> {
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Creates `final_dir` by filling a fresh sibling folder and renaming it into place, so a
/// crash never leaves a half-written cache entry that a restart would trust.
fn fill_atomically(final_dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = final_dir.parent().unwrap_or(final_dir);
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    spillway_handlers::weights::offload::remove_abandoned_partials(parent);
    let staging = parent.join(format!(
        ".{}.partial-{}",
        final_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("x"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(Error::io(&staging))?;
    let result = fill(&staging).and_then(|()| match std::fs::rename(&staging, final_dir) {
        Ok(()) => Ok(()),
        // Another process finished first: its copy is as good as ours.
        Err(_) if final_dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(final_dir)(e)),
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Unpacks the `.tar.gz` at `path` once; an unpacked folder is reused while its files
/// all keep the lengths they were unpacked with ([`lengths_intact`]), else unpacked again.
fn unpack_tgz(path: &Path, cache_dir: &Path, limits: &ArchiveLimits) -> Result<PathBuf> {
    let key = fingerprint(path)?;
    let in_cache = cache_dir.join("unpacked").join(&key);
    spillway_handlers::weights::offload::remove_abandoned_partials(&cache_dir.join("unpacked"));
    if lengths_intact(&in_cache) {
        return Ok(in_cache);
    }
    let note = cache_dir.join("unpacked").join(format!("{key}.location"));
    if let Ok(location) = std::fs::read_to_string(&note) {
        let target = PathBuf::from(location);
        if let Some(parent) = target.parent() {
            spillway_handlers::weights::offload::remove_abandoned_partials(parent);
        }
        if lengths_intact(&target) {
            return Ok(target);
        }
    }
    let target = match tgz_offload_folder(path, limits)? {
        Some(folder) => folder.join("unpacked").join(&key),
        None => in_cache.clone(),
    };
    if !lengths_intact(&target) {
        if target.is_dir() {
            tracing::warn!(folder = %target.display(), "an unpacked archive was changed since it was unpacked: unpacking it again");
            std::fs::remove_dir_all(&target).map_err(Error::io(&target))?;
        }
        fill_atomically(&target, |staging| {
            let compressed = std::fs::metadata(path).map_or(0, |m| m.len());
            spillway_handlers::weights::progress::begin(
                format!("unpacking {}", path.display()),
                compressed,
            );
            for_each_tgz_file(path, limits, |relative, entry| {
                let out = staging.join(relative);
                if let Some(dir) = out.parent() {
                    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                }
                let mut file = File::create(&out).map_err(Error::io(&out))?;
                std::io::copy(entry, &mut file).map_err(unpacking(path, &out))?;
                Ok(true)
            })?;
            spillway_handlers::weights::offload::record_lengths(staging).map_err(Error::io(staging))
        })?;
    }
    if target != in_cache {
        std::fs::create_dir_all(cache_dir.join("unpacked")).map_err(Error::io(cache_dir))?;
        let written = target.display().to_string();
        std::fs::write(&note, written).map_err(Error::io(&note))?;
    }
    Ok(target)
}

/// An error while copying out of the archive at `archive` into `out`: the archive's
/// fault (a 400 naming it) when its bytes cannot be decoded — a corrupt deflate stream,
/// a truncated tar — else an I/O error on `out` (a full disk, say).
fn unpacking(archive: &Path, out: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let (archive, out) = (archive.to_path_buf(), out.to_path_buf());
    move |e| match e.kind() {
        std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::UnexpectedEof => Error::bad_archive(archive, e),
        _ => Error::Io {
            path: out,
            source: e,
        },
    }
}

/// The `offload_folder` of the `setup_config.json` inside a `.tar.gz`, if it names one.
/// Reads entries only until that file (`spillway archive` writes small files first, so
/// this stops before the weights).
fn tgz_offload_folder(path: &Path, limits: &ArchiveLimits) -> Result<Option<PathBuf>> {
    const SETUP_LIMIT: u64 = 1 << 20;
    let mut folder = None;
    for_each_tgz_file(path, limits, |relative, entry| {
        if relative != Path::new("setup_config.json") {
            return Ok(true);
        }
        let mut bytes = Vec::new();
        entry
            .take(SETUP_LIMIT)
            .read_to_end(&mut bytes)
            .map_err(unpacking(path, path))?;
        let setup: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::bad_archive(path, format!("setup_config.json: {e}")))?;
        folder = setup
            .get("offload_folder")
            .and_then(|f| f.as_str())
            .map(PathBuf::from);
        Ok(false)
    })?;
    Ok(folder)
}

/// Runs `visit(relative path, entry)` for each regular file of a `.tar.gz` until it
/// returns false, after checking each entry against `limits` (count, total size, links,
/// escapes), whose violations are errors naming the entry.
fn for_each_tgz_file(
    path: &Path,
    limits: &ArchiveLimits,
    mut visit: impl FnMut(&Path, &mut dyn Read) -> Result<bool>,
) -> Result<()> {
    let file = File::open(path).map_err(Error::io(path))?;
    let counted = spillway_handlers::weights::progress::Counted(file);
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(counted));
    let mut total = 0u64;
    let entries = tar.entries().map_err(|e| Error::bad_archive(path, e))?;
    for (index, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| Error::bad_archive(path, e))?;
        if index >= limits.max_entries {
            return Err(Error::bad_archive(
                path,
                format!("more than {} entries", limits.max_entries),
            ));
        }
        let name = entry
            .path()
            .map_err(|e| Error::bad_archive(path, e))?
            .display()
            .to_string();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(Error::bad_archive(
                path,
                format!(
                    "entry `{name}` is a link or special file; archives may hold regular files only"
                ),
            ));
        }
        let relative = safe_relative(&name).ok_or_else(|| {
            Error::bad_archive(path, format!("entry `{name}` escapes the archive folder"))
        })?;
        total = total.saturating_add(entry.size());
        if total > limits.max_total_bytes {
            return Err(Error::bad_archive(
                path,
                format!("unpacks to more than {} bytes", limits.max_total_bytes),
            ));
        }
        if !visit(&relative, &mut entry)? {
            break;
        }
    }
    Ok(())
}

/// One checked zip entry.
#[derive(Debug, Clone, Copy)]
struct ZipEntry {
    index: usize,
    stored: bool,
    size: u64,
}

/// [`ModelFiles`] over a zip archive.
struct ZipFiles {
    path: PathBuf,
    cache_dir: PathBuf,
    entries: HashMap<String, ZipEntry>,
}

impl ZipFiles {
    fn open(path: &Path, cache_dir: &Path, limits: &ArchiveLimits) -> Result<Self> {
        let mut zip = Self::reader(path)?;
        if zip.len() > limits.max_entries {
            return Err(Error::bad_archive(
                path,
                format!("more than {} entries", limits.max_entries),
            ));
        }
        let mut entries = HashMap::new();
        let mut total = 0u64;
        for index in 0..zip.len() {
            let entry = zip
                .by_index_raw(index)
                .map_err(|e| Error::bad_archive(path, e))?;
            let name = entry
                .name()
                .map_err(|e| Error::bad_archive(path, e))?
                .to_string();
            if entry.is_symlink() {
                return Err(Error::bad_archive(
                    path,
                    format!("entry `{name}` is a symlink"),
                ));
            }
            if entry.enclosed_name().is_none() || safe_relative(&name).is_none() {
                return Err(Error::bad_archive(
                    path,
                    format!("entry `{name}` escapes the archive folder"),
                ));
            }
            if entry.is_dir() {
                continue;
            }
            let (size, packed) = (entry.size(), entry.compressed_size());
            let stored = entry.compression() == zip::CompressionMethod::Stored;
            if !stored && size > (1 << 20) && size / packed.max(1) > limits.max_compression_ratio {
                return Err(Error::bad_archive(
                    path,
                    format!(
                        "entry `{name}` inflates {size} bytes from {packed}: refusing a likely zip bomb"
                    ),
                ));
            }
            total = total.saturating_add(size);
            if total > limits.max_total_bytes {
                return Err(Error::bad_archive(
                    path,
                    format!("unpacks to more than {} bytes", limits.max_total_bytes),
                ));
            }
            let key = safe_relative(&name)
                .map(|p| p.display().to_string())
                .unwrap_or(name);
            entries.insert(
                key,
                ZipEntry {
                    index,
                    stored,
                    size,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            cache_dir: cache_dir.to_path_buf(),
            entries,
        })
    }

    fn reader(path: &Path) -> Result<zip::ZipArchive<File>> {
        let file = File::open(path).map_err(Error::io(path))?;
        zip::ZipArchive::new(file)
            .map_err(|e| Error::bad_archive(path, format!("not a zip or tar.gz archive: {e}")))
    }

    fn all_stored(&self) -> bool {
        self.entries.values().all(|e| e.stored)
    }

    fn handler_error(&self, e: impl std::fmt::Display) -> HandlerError {
        HandlerError::BadFile {
            file: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }

    /// Errors about the archive file as a whole are about one of its entries: say which.
    fn name_entry(&self, entry: &str, error: HandlerError) -> HandlerError {
        match error {
            HandlerError::BadFile { reason, .. } => HandlerError::BadFile {
                file: format!("{entry} (in {})", self.path.display()),
                reason,
            },
            other => other,
        }
    }

    /// Streams an entry into `out`, never past its declared size.
    fn copy_entry(&self, entry: ZipEntry, out: &mut impl Write) -> Result<(), HandlerError> {
        let mut zip = Self::reader(&self.path).map_err(|e| self.handler_error(e))?;
        let file = zip
            .by_index(entry.index)
            .map_err(|e| self.handler_error(e))?;
        let copied = std::io::copy(&mut file.take(entry.size + 1), out)
            .map_err(|e| self.handler_error(e))?;
        if copied != entry.size {
            return Err(self.handler_error(format!(
                "entry size is {copied}, header says {}",
                entry.size
            )));
        }
        Ok(())
    }
}

impl ModelFiles for ZipFiles {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, HandlerError> {
        let Some(&entry) = self.entries.get(path) else {
            return Ok(None);
        };
        // The size is the archive's claim: the buffer grows with what really comes.
        let mut bytes = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0).min(1 << 20));
        self.copy_entry(entry, &mut bytes)?;
        Ok(Some(bytes))
    }

    fn locate(&self, path: &str) -> Result<Option<(PathBuf, std::ops::Range<u64>)>, HandlerError> {
        let Some(&entry) = self.entries.get(path) else {
            return Ok(None);
        };
        if entry.stored {
            let mut zip = Self::reader(&self.path).map_err(|e| self.handler_error(e))?;
            let file = zip
                .by_index_raw(entry.index)
                .map_err(|e| self.handler_error(e))?;
            let start = file
                .data_start()
                .ok_or_else(|| self.handler_error(format!("cannot locate the data of `{path}`")))?;
            return Ok(Some((self.path.clone(), start..start + entry.size)));
        }
        // Compressed entries cannot be mapped: inflate them once into the cache.
        let dir = self
            .cache_dir
            .join("inflated")
            .join(fingerprint(&self.path).map_err(|e| self.handler_error(e))?);
        let target = dir.join(path);
        // A copy of another length was truncated or rewritten since: inflated again.
        let intact = std::fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == entry.size);
        if !intact {
            // Written under a temporary name and renamed, so a crash never leaves a
            // truncated file that a restart would trust.
            let parent = target.parent().unwrap_or(&dir).to_path_buf();
            std::fs::create_dir_all(&parent).map_err(|e| self.handler_error(e))?;
            spillway_handlers::weights::offload::remove_abandoned_partials(&parent);
            let partial = parent.join(format!(".{}.partial-{}", entry.index, std::process::id()));
            let written = File::create(&partial)
                .map_err(|e| self.handler_error(e))
                .and_then(|mut out| self.copy_entry(entry, &mut out))
                .and_then(|()| {
                    std::fs::rename(&partial, &target).map_err(|e| self.handler_error(e))
                });
            if written.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            written?;
        }
        Ok(Some((target, 0..entry.size)))
    }

    fn weights(&self, path: &str) -> Result<WeightSource, HandlerError> {
        let (file, range) = self
            .locate(path)?
            .ok_or_else(|| HandlerError::MissingFile(path.to_string()))?;
        WeightSource::open_range(&file, range).map_err(|e| self.name_entry(path, e))
    }

    fn find(&self, suffix: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .entries
            .keys()
            .filter(|n| n.ends_with(suffix))
            .cloned()
            .collect();
        found.sort();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    const MANIFEST: &str =
        r#"{"model": {"modelName": "m", "modelVersion": "1.0", "handler": "echo"}}"#;

    fn zip_with(
        entries: &[(&str, &[u8])],
        options: SimpleFileOptions,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.mar");
        let mut zip = zip::ZipWriter::new(File::create(&path).expect("create"));
        for (name, bytes) in entries {
            zip.start_file(*name, options).expect("start");
            zip.write_all(bytes).expect("write");
        }
        zip.finish().expect("finish");
        (dir, path)
    }

    fn stored() -> SimpleFileOptions {
        SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored)
    }

    #[test]
    fn reads_the_manifest_and_files_of_a_zip_store_archive() {
        let (dir, path) = zip_with(
            &[(MANIFEST_PATH, MANIFEST.as_bytes()), ("config.json", b"{}")],
            stored(),
        );
        let archive = open(&path, dir.path(), &ArchiveLimits::default()).expect("open");
        assert_eq!(archive.format, ArchiveFormat::ZipStore);
        assert_eq!(archive.manifest.model.model_name, "m");
        assert_eq!(
            archive.files.read("config.json").expect("read"),
            Some(b"{}".to_vec())
        );
        assert_eq!(archive.files.read("absent.json").expect("read"), None);
    }

    #[test]
    fn zip_slip_entries_are_refused() {
        for evil in ["../evil.txt", "/etc/evil", "a/../../evil"] {
            let (dir, path) = zip_with(
                &[(MANIFEST_PATH, MANIFEST.as_bytes()), (evil, b"x")],
                stored(),
            );
            let err = open(&path, dir.path(), &ArchiveLimits::default()).expect_err(evil);
            assert!(err.to_string().contains("escapes"), "{evil}: {err}");
        }
    }

    #[test]
    fn symlinks_in_zips_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.mar");
        let mut zip = zip::ZipWriter::new(File::create(&path).expect("create"));
        zip.start_file(MANIFEST_PATH, stored()).expect("start");
        zip.write_all(MANIFEST.as_bytes()).expect("write");
        zip.add_symlink("model.safetensors", "/etc/passwd", stored())
            .expect("symlink");
        zip.finish().expect("finish");
        let err = open(&path, dir.path(), &ArchiveLimits::default()).expect_err("symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn absurd_sizes_and_entry_counts_are_refused() {
        let big = vec![0u8; 4 << 20];
        let deflated =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        let (dir, path) = zip_with(
            &[(MANIFEST_PATH, MANIFEST.as_bytes()), ("zeros.bin", &big)],
            deflated,
        );
        let err = open(&path, dir.path(), &ArchiveLimits::default()).expect_err("bomb");
        assert!(err.to_string().contains("zip bomb"), "{err}");

        let limits = ArchiveLimits {
            max_total_bytes: 1024,
            ..ArchiveLimits::default()
        };
        let (dir, path) = zip_with(
            &[(MANIFEST_PATH, MANIFEST.as_bytes()), ("big.bin", &big)],
            stored(),
        );
        assert!(open(&path, dir.path(), &limits).is_err());

        let limits = ArchiveLimits {
            max_entries: 1,
            ..ArchiveLimits::default()
        };
        let (dir, path) = zip_with(
            &[(MANIFEST_PATH, MANIFEST.as_bytes()), ("a", b"a")],
            stored(),
        );
        assert!(open(&path, dir.path(), &limits).is_err());
    }

    fn tgz_with(
        build: impl FnOnce(&mut tar::Builder<flate2::write::GzEncoder<File>>),
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            File::create(&path).expect("create"),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let mut header = tar::Header::new_gnu();
        header.set_size(MANIFEST.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, MANIFEST_PATH, MANIFEST.as_bytes())
            .expect("append");
        build(&mut tar);
        tar.into_inner().and_then(|gz| gz.finish()).expect("finish");
        (dir, path)
    }

    #[test]
    fn tgz_archives_unpack_once_into_the_cache() {
        let (dir, path) = tgz_with(|_| {});
        let cache = dir.path().join("cache");
        let archive = open(&path, &cache, &ArchiveLimits::default()).expect("open");
        assert_eq!(archive.format, ArchiveFormat::Tgz);
        assert_eq!(archive.manifest.model.handler, "echo");
        let unpacked: Vec<_> = std::fs::read_dir(cache.join("unpacked"))
            .expect("cache")
            .collect();
        assert_eq!(unpacked.len(), 1);
        open(&path, &cache, &ArchiveLimits::default()).expect("reopen from cache");
    }

    #[test]
    fn tgz_archives_unpack_into_the_offload_folder_their_setup_config_names() {
        let outer = tempfile::tempdir().expect("tempdir");
        let offload = outer.path().join("big-disk");
        let setup = serde_json::json!({ "offload_folder": offload }).to_string();
        let (dir, path) = tgz_with(|tar| {
            let mut header = tar::Header::new_gnu();
            header.set_size(setup.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, "setup_config.json", setup.as_bytes())
                .expect("append");
        });
        let cache = dir.path().join("cache");
        let archive = open(&path, &cache, &ArchiveLimits::default()).expect("open");
        assert_eq!(archive.manifest.model.handler, "echo");
        let unpacked: Vec<PathBuf> = std::fs::read_dir(offload.join("unpacked"))
            .expect("unpacked into the offload folder")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(unpacked.len(), 1);
        assert!(unpacked[0].join("setup_config.json").is_file());
        let in_cache: Vec<PathBuf> = std::fs::read_dir(cache.join("unpacked"))
            .expect("cache")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(in_cache.len(), 1, "only a note stays in the cache");
        let note = std::fs::read_to_string(&in_cache[0]).expect("note");
        assert_eq!(PathBuf::from(note), unpacked[0], "the note says where");
        let again = open(&path, &cache, &ArchiveLimits::default()).expect("reopen");
        assert_eq!(again.manifest.model.handler, "echo");
        assert_eq!(
            std::fs::read_dir(offload.join("unpacked"))
                .expect("dir")
                .count(),
            1,
            "not unpacked twice"
        );
    }

    #[test]
    fn tgz_links_and_escapes_are_refused() {
        let (dir, path) = tgz_with(|tar| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            header.set_cksum();
            tar.append_link(&mut header, "model.safetensors", "/etc/passwd")
                .expect("link");
        });
        let err = open(&path, &dir.path().join("c"), &ArchiveLimits::default()).expect_err("link");
        assert!(err.to_string().contains("link"), "{err}");

        let (dir, path) = tgz_with(|tar| {
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            // Write the name into the raw header: tar's own API refuses `..`.
            header.as_old_mut().name[..9].copy_from_slice(b"../escape");
            header.set_cksum();
            tar.append(&header, &b"x"[..]).expect("append");
        });
        let err =
            open(&path, &dir.path().join("c"), &ArchiveLimits::default()).expect_err("escape");
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    #[test]
    fn a_missing_manifest_says_how_to_make_one() {
        let (dir, path) = zip_with(&[("config.json", b"{}")], stored());
        let err = open(&path, dir.path(), &ArchiveLimits::default()).expect_err("no manifest");
        assert!(err.to_string().contains("spillway archive"), "{err}");
    }
}
