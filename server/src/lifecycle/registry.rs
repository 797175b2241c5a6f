//! [`ModelRegistry`]: registered models by name and version, and each name's default
//! version. Pure bookkeeping: loading and unloading happen elsewhere.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::lifecycle::model::ModelHandle;

struct Versions {
    default: String,
    versions: BTreeMap<String, Arc<ModelHandle>>,
}

/// All registered models.
#[derive(Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, Versions>>,
}

impl ModelRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Versions>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Versions>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a model version; the first version of a name becomes its default.
    pub fn insert(&self, handle: Arc<ModelHandle>) -> Result<()> {
        let mut models = self.write();
        let (name, version) = (handle.spec.name.clone(), handle.spec.version.clone());
        let entry = models.entry(name.clone()).or_insert_with(|| Versions {
            default: version.clone(),
            versions: BTreeMap::new(),
        });
        if entry.versions.contains_key(&version) {
            return Err(Error::Conflict(format!(
                "Model version {version} for model {name} is already registered"
            )));
        }
        entry.versions.insert(version, handle);
        Ok(())
    }

    /// Puts `handle` in place of the registered model of the same name and version, and
    /// returns that one; or adds it (then `None`; a new name's only version is its default).
    pub fn replace(&self, handle: Arc<ModelHandle>) -> Option<Arc<ModelHandle>> {
        let mut models = self.write();
        let (name, version) = (handle.spec.name.clone(), handle.spec.version.clone());
        let entry = models.entry(name).or_insert_with(|| Versions {
            default: version.clone(),
            versions: BTreeMap::new(),
        });
        entry.versions.insert(version, handle)
    }

    /// The named version, or the default one.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelHandle>> {
        let models = self.read();
        let entry = models
            .get(name)
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))?;
        let version = version.unwrap_or(&entry.default);
        entry
            .versions
            .get(version)
            .cloned()
            .ok_or_else(|| Error::VersionNotFound {
                name: name.to_string(),
                version: version.to_string(),
            })
    }

    /// Every version of a model, the default first.
    pub fn versions(&self, name: &str) -> Result<Vec<Arc<ModelHandle>>> {
        let models = self.read();
        let entry = models
            .get(name)
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))?;
        let mut all: Vec<_> = entry.versions.values().cloned().collect();
        all.sort_by_key(|h| h.spec.version != entry.default);
        Ok(all)
    }

    /// Each model's default version, by name.
    pub fn defaults(&self) -> Vec<Arc<ModelHandle>> {
        self.read()
            .values()
            .filter_map(|entry| entry.versions.get(&entry.default).cloned())
            .collect()
    }

    /// Every registered version of every model.
    pub fn all(&self) -> Vec<Arc<ModelHandle>> {
        self.read()
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    /// Removes one version, or (with `None`) every version of the model. The default
    /// version cannot be removed alone while others remain (as in TorchServe).
    pub fn remove(&self, name: &str, version: Option<&str>) -> Result<Vec<Arc<ModelHandle>>> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))?;
        let Some(version) = version else {
            let removed = models
                .remove(name)
                .map(|e| e.versions.into_values().collect());
            return Ok(removed.unwrap_or_default());
        };
        if !entry.versions.contains_key(version) {
            return Err(Error::VersionNotFound {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        if entry.default == version && entry.versions.len() > 1 {
            return Err(Error::Conflict(format!(
                "Cannot remove default version {version} of model {name}: set another default first"
            )));
        }
        let removed = entry.versions.remove(version).into_iter().collect();
        if entry.versions.is_empty() {
            models.remove(name);
        }
        Ok(removed)
    }

    pub fn set_default(&self, name: &str, version: &str) -> Result<()> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| Error::ModelNotFound(name.to_string()))?;
        if !entry.versions.contains_key(version) {
            return Err(Error::VersionNotFound {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
        entry.default = version.to_string();
        Ok(())
    }
}
