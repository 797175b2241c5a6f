//! Reads what a sentence-transformers model folder says about pooling, normalisation and
//! input length: `modules.json`, the pooling module's `config.json` and
//! `sentence_bert_config.json`. A folder without these files gets sentence-transformers'
//! own fallback for a bare transformer: mean pooling, no normalisation.

use serde::Deserialize;

use crate::weights::files::read_json;
use crate::{HandlerError, ModelFiles};

/// How token embeddings become one sentence embedding. When several modes are on,
/// their results are concatenated in sentence-transformers' order: cls, max, mean,
/// mean_sqrt_len.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub cls: bool,
    pub max: bool,
    pub mean: bool,
    pub mean_sqrt_len: bool,
}

impl Pooling {
    pub const MEAN: Pooling = Pooling {
        cls: false,
        max: false,
        mean: true,
        mean_sqrt_len: false,
    };

    /// Number of pooled vectors concatenated per sentence.
    pub fn modes(&self) -> usize {
        [self.cls, self.max, self.mean, self.mean_sqrt_len]
            .iter()
            .filter(|on| **on)
            .count()
    }
}

/// The sentence-transformers settings of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentenceTransformerConfig {
    pub pooling: Pooling,
    pub normalize: bool,
    /// `max_seq_length` from sentence_bert_config.json.
    pub max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

#[derive(Deserialize)]
struct SentenceBertFile {
    max_seq_length: Option<usize>,
}

impl SentenceTransformerConfig {
    /// Reads the configuration from the model's files.
    pub fn read(files: &dyn ModelFiles) -> Result<Self, HandlerError> {
        let max_seq_length = read_json::<SentenceBertFile>(files, "sentence_bert_config.json")?
            .and_then(|f| f.max_seq_length);
        let Some(modules) = read_json::<Vec<Module>>(files, "modules.json")? else {
            return Ok(Self {
                pooling: Pooling::MEAN,
                normalize: false,
                max_seq_length,
            });
        };
        let mut pooling = None;
        let mut normalize = false;
        for module in &modules {
            match module.kind.rsplit('.').next().unwrap_or_default() {
                "Pooling" => {
                    let path = format!("{}/config.json", module.path.trim_end_matches('/'));
                    let file = read_json::<PoolingFile>(files, &path)?
                        .ok_or_else(|| HandlerError::MissingFile(path.clone()))?;
                    pooling = Some(Self::pooling_from(&file, &path)?);
                }
                "Normalize" => normalize = true,
                "Transformer" => {}
                other => {
                    return Err(HandlerError::Unsupported(format!(
                        "sentence-transformers module `{other}` (in modules.json) is not supported; \
                         supported: Transformer, Pooling, Normalize"
                    )));
                }
            }
        }
        Ok(Self {
            pooling: pooling.unwrap_or(Pooling::MEAN),
            normalize,
            max_seq_length,
        })
    }

    fn pooling_from(file: &PoolingFile, path: &str) -> Result<Pooling, HandlerError> {
        if file.pooling_mode_weightedmean_tokens || file.pooling_mode_lasttoken {
            return Err(HandlerError::Unsupported(format!(
                "{path}: weighted-mean and last-token pooling are not supported; \
                 supported: cls, max, mean, mean_sqrt_len"
            )));
        }
        let pooling = Pooling {
            cls: file.pooling_mode_cls_token,
            max: file.pooling_mode_max_tokens,
            mean: file.pooling_mode_mean_tokens,
            mean_sqrt_len: file.pooling_mode_mean_sqrt_len_tokens,
        };
        if pooling.modes() == 0 {
            return Err(HandlerError::bad_file(path, "no pooling mode is enabled"));
        }
        Ok(pooling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::files::FolderFiles;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, content) in files {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
            std::fs::write(full, content).expect("write");
        }
        dir
    }

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn reads_minilm_style_files() {
        let dir = folder(&[
            ("modules.json", MODULES),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
            ),
            (
                "sentence_bert_config.json",
                r#"{"max_seq_length": 256, "do_lower_case": false}"#,
            ),
        ]);
        let config = SentenceTransformerConfig::read(&FolderFiles::new(dir.path())).expect("read");
        assert!(config.normalize);
        assert!(config.pooling.cls && !config.pooling.mean);
        assert_eq!(config.max_seq_length, Some(256));
    }

    #[test]
    fn a_bare_transformer_folder_gets_mean_pooling_without_normalisation() {
        let dir = folder(&[]);
        let config = SentenceTransformerConfig::read(&FolderFiles::new(dir.path())).expect("read");
        assert_eq!(config.pooling, Pooling::MEAN);
        assert!(!config.normalize);
        assert_eq!(config.max_seq_length, None);
    }

    #[test]
    fn unsupported_modules_and_modes_are_named_in_the_error() {
        let dir = folder(&[(
            "modules.json",
            r#"[{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#,
        )]);
        let err =
            SentenceTransformerConfig::read(&FolderFiles::new(dir.path())).expect_err("dense");
        assert!(err.to_string().contains("Dense"), "{err}");

        let dir = folder(&[
            ("modules.json", MODULES),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_lasttoken": true}"#,
            ),
        ]);
        let err =
            SentenceTransformerConfig::read(&FolderFiles::new(dir.path())).expect_err("lasttoken");
        assert!(err.to_string().contains("last-token"), "{err}");
    }
}
