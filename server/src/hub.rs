//! `spillway pull org/name[@revision]`: fetches a model from the Hugging Face Hub into the
//! local HF cache with the `hf-hub` crate, the files Spillway reads only (weights as
//! safetensors or GGUF, configs, the tokenizer), with a progress bar on a terminal. A file
//! already in the cache is not fetched again, and one cut off half-way is resumed from
//! where it stopped (the crate keeps the partial `.part` blob and asks for the rest with
//! `Range`). `HF_ENDPOINT` (another Hub, a mirror) and `HF_HOME` (the cache's root) are
//! honoured, as by the Hub's own tools. `spillway plan` and `spillway archive --model-dir`
//! then take the cached `org/name`. The server itself never downloads.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use spillway_handlers::HandlerKind;

use crate::error::{Error, Result};

/// A model on the Hub: `org/name`, and a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub id: String,
    pub revision: String,
}

impl std::str::FromStr for ModelRef {
    type Err = Error;

    /// `org/name` or `org/name@revision` (revision `main` when not given).
    fn from_str(spec: &str) -> Result<Self> {
        let (id, revision) = match spec.split_once('@') {
            Some((id, revision)) => (id, revision),
            None => (spec, "main"),
        };
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let ok_id = matches!(id.split_once('/'), Some((org, name)) if part(org) && part(name));
        let ok_revision = !revision.is_empty()
            && !revision.contains("..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !ok_id || !ok_revision {
            return Err(Error::BadRequest(format!(
                "`{spec}` is not a Hub model: expected org/name or org/name@revision"
            )));
        }
        Ok(ModelRef {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Whether Spillway reads a repository file: weights (safetensors, GGUF), JSON configs
/// and tokenizers, sentencepiece models, vocabularies, chat templates. PyTorch pickles,
/// ONNX, TensorFlow and Flax copies of the weights are left on the Hub.
pub fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    [
        ".safetensors",
        ".gguf",
        ".json",
        ".txt",
        ".jinja",
        "tokenizer.model",
        "spiece.model",
    ]
    .iter()
    .any(|end| name.ends_with(end))
        && !file.starts_with("onnx/")
        && !file.starts_with("openvino/")
}

/// Fetches `model`'s files into the HF cache; the snapshot folder they are in.
pub fn pull(model: &ModelRef, progress: bool) -> Result<PathBuf> {
    let hub_error = |e: hf_hub::api::sync::ApiError| {
        Error::BadRequest(format!("the Hub ({}): {e}", endpoint()))
    };
    let api = ApiBuilder::from_env()
        .with_progress(progress)
        // A dropped connection is taken up again where it stopped.
        .with_retries(3)
        .build()
        .map_err(hub_error)?;
    let repo = api.repo(Repo::with_revision(
        model.id.clone(),
        RepoType::Model,
        model.revision.clone(),
    ));
    let info = repo.info().map_err(hub_error)?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    if !files
        .iter()
        .any(|f| f.ends_with(".safetensors") || f.ends_with(".gguf"))
    {
        return Err(Error::BadRequest(format!(
            "{}@{} has no safetensors or GGUF weights (Spillway reads no other format)",
            model.id, model.revision
        )));
    }
    let mut snapshot = None;
    for file in &files {
        let path = repo.get(file).map_err(hub_error)?;
        // snapshots/<commit>/<file>: the folder is the path less the file's own parts.
        let depth = file.split('/').count();
        snapshot = path.ancestors().nth(depth).map(PathBuf::from);
    }
    snapshot.ok_or_else(|| Error::Internal("no file was fetched".into()))
}

/// A registration url that names a model pulled into the HF cache (`org/name[@rev]`,
/// not an entry of the store): it and its snapshot folder.
pub fn cached_snapshot(
    state: &crate::app::AppState,
    url: &str,
) -> Result<Option<(ModelRef, PathBuf)>> {
    if state.config().model_store.join(url).exists() {
        return Ok(None);
    }
    let Ok(model) = url.parse::<ModelRef>() else {
        return Ok(None);
    };
    match crate::placement::hf_cache_snapshot(&model.id, Some(&model.revision)) {
        Some(snapshot) => Ok(Some((model, snapshot))),
        None => Err(Error::ArchiveNotFound(format!(
            "{url} (neither in the model store nor pulled into the HF cache: spillway pull {url})"
        ))),
    }
}

/// The manifest a cached model is registered with: its name, the snapshot's commit
/// (first 12 digits) as its version, and `handler`, or the one its config.json's
/// `architectures` imply.
pub fn manifest_for(
    model: &ModelRef,
    snapshot: &std::path::Path,
    handler: Option<HandlerKind>,
) -> Result<crate::manifest::Manifest> {
    let handler = match handler {
        Some(handler) => handler,
        None => implied_handler(snapshot).ok_or_else(|| {
            Error::BadRequest(format!(
                "cannot tell which handler {} needs from its config.json: register it with \
                 handler=text_embedding, text_classification or text_generation",
                model.id
            ))
        })?,
    };
    let commit = snapshot
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(12).collect::<String>())
        .unwrap_or_else(|| model.revision.clone());
    Ok(crate::manifest::Manifest {
        created_on: String::new(),
        runtime: "spillway".into(),
        model: crate::manifest::ManifestModel {
            model_name: model.id.rsplit('/').next().unwrap_or(&model.id).to_string(),
            model_version: commit,
            handler: handler.name().to_string(),
            serialized_file: None,
            config_file: None,
        },
        archiver_version: String::new(),
    })
}

/// The handler a model's `architectures` imply: causal LMs generate, sequence
/// classifiers classify, sentence-transformers folders (and plain BERT encoders) embed.
fn implied_handler(folder: &std::path::Path) -> Option<HandlerKind> {
    if folder.join("modules.json").is_file() {
        return Some(HandlerKind::TextEmbedding);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).ok()?).ok()?;
    let architectures: Vec<&str> = config["architectures"]
        .as_array()?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    if architectures.iter().any(|a| a.ends_with("ForCausalLM")) {
        Some(HandlerKind::TextGeneration)
    } else if architectures
        .iter()
        .any(|a| a.ends_with("ForSequenceClassification"))
    {
        Some(HandlerKind::TextClassification)
    } else if architectures.contains(&"BertModel") {
        Some(HandlerKind::TextEmbedding)
    } else {
        None
    }
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_references_are_org_name_and_an_optional_revision() {
        let plain: ModelRef = "HuggingFaceTB/SmolLM2-135M-Instruct".parse().expect("ok");
        assert_eq!(plain.revision, "main");
        let pinned: ModelRef = "org/m@v1.0".parse().expect("ok");
        assert_eq!(
            (pinned.id.as_str(), pinned.revision.as_str()),
            ("org/m", "v1.0")
        );
        for bad in [
            "name-only",
            "a/b/c",
            "../etc",
            "org/..",
            "org/m@",
            "org/m@../../x",
            "org /m",
            "",
        ] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_files_spillway_reads_are_fetched() {
        for file in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "vocab.txt",
            "chat_template.jinja",
            "smollm2-q4_1.gguf",
            "1_Pooling/config.json",
        ] {
            assert!(wanted(file), "{file}");
        }
        for file in [
            "pytorch_model.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "onnx/model.onnx",
            "onnx/config.json",
            "README.md",
            ".gitattributes",
        ] {
            assert!(!wanted(file), "{file}");
        }
    }
}
