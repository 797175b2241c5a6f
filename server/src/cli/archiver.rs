//! `spillway archive`: packs a model folder into what torch-model-archiver writes — a
//! `.mar` zip with `MAR-INF/MANIFEST.json` and the model files at its root — or into a
//! `.tar.gz` or an unpacked folder.
//!
//! The default format is `zip-store`: entries are stored uncompressed (safetensors
//! entries 64-byte aligned) so the server maps weights straight out of the archive.
//! Output is written under a temporary name and renamed into place, so a server never
//! sees a half-written archive.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use spillway_handlers::HandlerKind;
use spillway_handlers::weights::progress::{self, Counted};

use crate::error::{Error, Result};
use crate::store::manifest::{MANIFEST_PATH, Manifest, ManifestModel};

/// The archive formats `spillway archive` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// `.mar` zip, entries stored uncompressed (mappable).
    ZipStore,
    /// `.mar` zip, entries deflated (torch-model-archiver's `default`).
    Default,
    /// `.tar.gz`.
    Tgz,
    /// An unpacked folder.
    NoArchive,
}

impl std::str::FromStr for OutputFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "zip-store" => OutputFormat::ZipStore,
            "default" => OutputFormat::Default,
            "tgz" => OutputFormat::Tgz,
            "no-archive" => OutputFormat::NoArchive,
            other => {
                return Err(Error::BadRequest(format!(
                    "unknown archive format `{other}`; expected zip-store, default, tgz or no-archive"
                )));
            }
        })
    }
}

/// What to pack.
#[derive(Debug, Clone)]
pub struct ArchiveSpec {
    pub model_name: String,
    pub version: String,
    pub handler: HandlerKind,
    pub model_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub extra_files: Vec<PathBuf>,
    pub format: OutputFormat,
    pub export_path: PathBuf,
    pub force: bool,
}

/// Writes the archive; returns its path.
pub fn write(spec: &ArchiveSpec) -> Result<PathBuf> {
    if spec.model_name.is_empty()
        || !spec
            .model_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || spec.model_name.starts_with('.')
    {
        return Err(Error::BadRequest(format!(
            "model name `{}` may hold only letters, digits, '-', '_' and '.'",
            spec.model_name
        )));
    }
    let files = collect_files(spec)?;
    let weights = |name: &str| {
        name.ends_with(".safetensors")
            || name.ends_with(".gguf")
            || name.ends_with(".pth")
            || name.ends_with(".pt")
    };
    let has_weights = files
        .iter()
        .any(|(name, _)| name == "model.safetensors.index.json" || weights(name));
    if spec.handler.needs_model_files() && !has_weights {
        return Err(Error::BadRequest(format!(
            "handler {} needs weights in the model folder (model.safetensors, a sharded index, a .gguf, or a PyTorch .pth)",
            spec.handler
        )));
    }
    let manifest = Manifest {
        created_on: crate::timestamp::archiver(std::time::SystemTime::now()),
        runtime: "spillway".into(),
        model: ManifestModel {
            model_name: spec.model_name.clone(),
            model_version: spec.version.clone(),
            handler: spec.handler.name().into(),
            serialized_file: files
                .iter()
                .map(|(name, _)| name)
                .find(|name| weights(name))
                .cloned(),
            config_file: spec
                .config_file
                .as_ref()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
        },
        archiver_version: env!("CARGO_PKG_VERSION").into(),
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::Internal(format!("manifest: {e}")))?;

    let file_name = match spec.format {
        OutputFormat::ZipStore | OutputFormat::Default => format!("{}.mar", spec.model_name),
        OutputFormat::Tgz => format!("{}.tar.gz", spec.model_name),
        OutputFormat::NoArchive => spec.model_name.clone(),
    };
    std::fs::create_dir_all(&spec.export_path).map_err(Error::io(&spec.export_path))?;
    let target = spec.export_path.join(&file_name);
    if target.exists() && !spec.force {
        return Err(Error::Conflict(format!(
            "{} already exists; pass --force to overwrite it",
            target.display()
        )));
    }
    let staging = spec
        .export_path
        .join(format!(".{file_name}.partial-{}", std::process::id()));
    let total: u64 = files
        .iter()
        .filter_map(|(_, source)| std::fs::metadata(source).ok())
        .map(|m| m.len())
        .sum();
    progress::begin(format!("writing {file_name}"), total);
    let written = match spec.format {
        OutputFormat::ZipStore => write_zip(
            &staging,
            &manifest_json,
            &files,
            zip::CompressionMethod::Stored,
        ),
        OutputFormat::Default => write_zip(
            &staging,
            &manifest_json,
            &files,
            zip::CompressionMethod::Deflated,
        ),
        OutputFormat::Tgz => write_tgz(&staging, &manifest_json, &files),
        OutputFormat::NoArchive => write_folder(&staging, &manifest_json, &files),
    };
    let result = written.and_then(|()| {
        if target.is_dir() {
            std::fs::remove_dir_all(&target).map_err(Error::io(&target))?;
        }
        std::fs::rename(&staging, &target).map_err(Error::io(&target))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| target)
}

/// (name inside the archive, file on disk), sorted by name; later sources (config file,
/// extra files) replace model-folder files of the same name.
fn collect_files(spec: &ArchiveSpec) -> Result<Vec<(String, PathBuf)>> {
    let mut files = std::collections::BTreeMap::new();
    if let Some(dir) = &spec.model_dir {
        if !dir.is_dir() {
            return Err(Error::BadRequest(format!(
                "--model-dir {} is not a folder",
                dir.display()
            )));
        }
        walk(dir, dir, &mut files)?;
    }
    for extra in spec.config_file.iter().chain(&spec.extra_files) {
        if !extra.is_file() {
            return Err(Error::BadRequest(format!(
                "{} is not a file",
                extra.display()
            )));
        }
        let name = extra
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.insert(name, extra.clone());
    }
    Ok(files.into_iter().collect())
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut std::collections::BTreeMap<String, PathBuf>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(Error::io(dir))?
        .collect::<std::io::Result<_>>()
        .map_err(Error::io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let file_type = entry.file_type().map_err(Error::io(&path))?;
        // Hidden files (.git, .gitattributes) and an old manifest are not model files.
        if name.starts_with('.') || (dir == root && name == "MAR-INF") {
            continue;
        }
        if file_type.is_dir() {
            walk(root, &path, out)?;
        } else {
            // Follow symlinks in the source folder: the archive holds the files themselves.
            let relative = path
                .strip_prefix(root)
                .map_err(|e| Error::Internal(e.to_string()))?;
            let parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            out.insert(parts.join("/"), path);
        }
    }
    Ok(())
}

fn write_zip(
    target: &Path,
    manifest: &[u8],
    files: &[(String, PathBuf)],
    method: zip::CompressionMethod,
) -> Result<()> {
    let out = File::create(target).map_err(Error::io(target))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(out));
    let zip_err =
        |e: zip::result::ZipError| Error::Internal(format!("writing {}: {e}", target.display()));
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    zip.start_file(MANIFEST_PATH, options).map_err(zip_err)?;
    zip.write_all(manifest).map_err(Error::io(target))?;
    for (name, source) in files {
        let size = std::fs::metadata(source).map_err(Error::io(source))?.len();
        let mut options = options.large_file(size >= u32::MAX as u64);
        if method == zip::CompressionMethod::Stored && name.ends_with(".safetensors") {
            options = options.with_alignment(64);
        }
        zip.start_file(name.as_str(), options).map_err(zip_err)?;
        let mut input = Counted(File::open(source).map_err(Error::io(source))?);
        std::io::copy(&mut input, &mut zip).map_err(Error::io(source))?;
    }
    let mut writer = zip.finish().map_err(zip_err)?;
    writer.flush().map_err(Error::io(target))
}

fn write_tgz(target: &Path, manifest: &[u8], files: &[(String, PathBuf)]) -> Result<()> {
    let out = File::create(target).map_err(Error::io(target))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(out), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, MANIFEST_PATH, manifest)
        .map_err(Error::io(target))?;
    // Small files (configs, setup_config.json, the tokenizer) before the weights, so a
    // reader looking for setup_config.json stops before the large entries.
    let mut ordered: Vec<(u64, &String, &PathBuf)> = files
        .iter()
        .map(|(name, source)| {
            let len = std::fs::metadata(source).map_err(Error::io(source))?.len();
            Ok((len, name, source))
        })
        .collect::<Result<_>>()?;
    ordered.sort_by_key(|(len, _, _)| *len);
    for (len, name, source) in ordered {
        let file = File::open(source).map_err(Error::io(source))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&file.metadata().map_err(Error::io(source))?);
        header.set_size(len);
        tar.append_data(&mut header, name, Counted(file))
            .map_err(Error::io(source))?;
    }
    let gz = tar.into_inner().map_err(Error::io(target))?;
    let mut writer = gz.finish().map_err(Error::io(target))?;
    writer.flush().map_err(Error::io(target))
}

fn write_folder(target: &Path, manifest: &[u8], files: &[(String, PathBuf)]) -> Result<()> {
    let manifest_path = target.join(MANIFEST_PATH);
    let entries = std::iter::once((manifest_path.clone(), None)).chain(
        files
            .iter()
            .map(|(name, source)| (target.join(name), Some(source))),
    );
    for (out, source) in entries {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        match source {
            None => std::fs::write(&out, manifest).map_err(Error::io(&out))?,
            Some(source) => std::fs::copy(source, &out)
                .map(progress::advance)
                .map_err(Error::io(source))?,
        }
    }
    Ok(())
}
