//! [`Manifest`]: `MAR-INF/MANIFEST.json`, written and read exactly as torch-model-archiver
//! does (`createdOn`, `runtime`, `model: {modelName, modelVersion, handler,
//! serializedFile, configFile}`, `archiverVersion`).

use serde::{Deserialize, Serialize};

pub const MANIFEST_PATH: &str = "MAR-INF/MANIFEST.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub created_on: String,
    #[serde(default)]
    pub runtime: String,
    pub model: ManifestModel,
    #[serde(default)]
    pub archiver_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestModel {
    pub model_name: String,
    #[serde(default = "default_version")]
    pub model_version: String,
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialized_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
}

fn default_version() -> String {
    "1.0".to_string()
}
