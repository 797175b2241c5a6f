//! PyTorch checkpoints (`torch.save` of a state dict: a zip holding a pickle and one
//! file per storage, `.pth`/`.pt`/`.bin`) converted once to safetensors in the offload
//! folder, so that they are planned from headers, memory-mapped and served as any
//! safetensors model. Only tensors are read: the pickle is interpreted by candle's
//! reader, which rebuilds tensors and dicts and runs no code; a pickled whole model
//! (`torch.save(model)`) holds classes, not a state dict, and is refused.

use std::path::{Path, PathBuf};

use crate::weights::offload;
use crate::{HandlerError, ModelFiles};

/// Version of what [`materialize`] writes, part of the folder's key.
const CONVERSION: u32 = 1;

/// Where the safetensors copy of the PyTorch checkpoint `name` lives, writing it if
/// needed; returns the folder (holding `model.safetensors`).
pub fn materialize(
    files: &dyn ModelFiles,
    name: &str,
    offload_root: &Path,
) -> Result<PathBuf, HandlerError> {
    let (path, range) = files
        .locate(name)?
        .ok_or_else(|| HandlerError::MissingFile(name.to_string()))?;
    let key = format!(
        "{}-v{CONVERSION}",
        offload::fingerprint_as(&path, &range, "pickle")?
    );
    offload::folder(
        offload_root,
        &key,
        crate::weights::files::SINGLE_WEIGHTS,
        |staging| {
            // candle's reader takes a path: a compressed archive entry is written out first.
            let whole_file = range.start == 0
                && std::fs::metadata(&path)
                    .map(|m| m.len() == range.end)
                    .unwrap_or(false);
            let source = if whole_file {
                path.clone()
            } else {
                let copy = staging.join("checkpoint.pth");
                std::fs::write(&copy, files.read_required(name)?).map_err(|source| {
                    HandlerError::Io {
                        path: copy.clone(),
                        source,
                    }
                })?;
                copy
            };
            let converted = convert(
                &source,
                name,
                &staging.join(crate::weights::files::SINGLE_WEIGHTS),
            );
            if source != path {
                let _ = std::fs::remove_file(&source);
            }
            converted
        },
    )
}

fn convert(source: &Path, name: &str, target: &Path) -> Result<(), HandlerError> {
    let bad = |reason: String| HandlerError::bad_file(name, reason);
    let mut tensors = candle_core::pickle::read_all(source).map_err(|e| {
        bad(format!(
            "not a PyTorch zip checkpoint with a state dict ({e}); one saved before PyTorch 1.6 \
             or by pickle alone must be saved again with torch.save(model.state_dict(), ...)"
        ))
    })?;
    if tensors.is_empty() {
        // Training scripts often save {"state_dict": ..., "epoch": ...}.
        tensors =
            candle_core::pickle::read_all_with_key(source, Some("state_dict")).unwrap_or_default();
    }
    if tensors.is_empty() {
        return Err(bad(
            "it holds no state dict of tensors (a pickled whole model is never unpickled: its \
             classes would be code; save model.state_dict() instead)"
                .into(),
        ));
    }
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, target)
        .map_err(|e| bad(format!("cannot write its safetensors copy: {e}")))
}
