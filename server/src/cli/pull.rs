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

use crate::error::{Error, Result};
use crate::store::hub::ModelRef;

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

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
}

#[cfg(test)]
mod tests {
    use super::*;

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
