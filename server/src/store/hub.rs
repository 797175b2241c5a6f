//! Models pulled into the local Hugging Face cache (`spillway pull`, `cli::pull`): a
//! registration url `org/name[@revision]` resolved to its cached snapshot folder, and the
//! manifest such a folder is served with (its handler implied by `config.json`).

use std::path::PathBuf;

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

/// A registration url that names a model pulled into the HF cache (`org/name[@rev]`,
/// not an entry of the store): it and its snapshot folder.
pub fn cached_snapshot(
    store: &crate::store::ModelStore,
    url: &str,
) -> Result<Option<(ModelRef, PathBuf)>> {
    if store.root().join(url).exists() {
        return Ok(None);
    }
    let Ok(model) = url.parse::<ModelRef>() else {
        return Ok(None);
    };
    match crate::devices::placement::hf_cache_snapshot(&model.id, Some(&model.revision)) {
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
) -> Result<crate::store::manifest::Manifest> {
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
    Ok(crate::store::manifest::Manifest {
        created_on: String::new(),
        runtime: "spillway".into(),
        model: crate::store::manifest::ManifestModel {
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
/// classifiers classify, sentence-transformers folders (and bare encoders of the encoder
/// families) embed.
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
    } else if architectures
        .iter()
        .any(|a| a.ends_with("ForTokenClassification"))
    {
        Some(HandlerKind::TokenClassification)
    } else if architectures.iter().any(|a| {
        matches!(
            *a,
            "BertModel"
                | "RobertaModel"
                | "XLMRobertaModel"
                | "CamembertModel"
                | "DistilBertModel"
                | "ModernBertModel"
        )
    }) {
        Some(HandlerKind::TextEmbedding)
    } else {
        None
    }
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
}
