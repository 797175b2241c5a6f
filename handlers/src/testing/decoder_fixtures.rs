//! The decoder fixtures' weights, rebuilt from their recipe.
//!
//! `scripts/make-decoder-fixtures.py` commits, per family, a `tensors.json` instead of
//! the weights: each tensor's name, shape, offset and scale. A tensor's values are
//! `offset + scale * u` in f32, `u` uniform in [-1, 1) drawn from splitmix64 counters
//! seeded by FNV-1a of `"<family>/<tensor name>"`. The script checks that this
//! reproduces, bit for bit, the checkpoint transformers saved and computed its reference
//! answers from; [`write_weights`] writes that checkpoint again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::HandlerError;
use crate::error::CandleContext;

/// The generator the recipe names; a different one would rebuild different weights.
const GENERATOR: &str = "splitmix64-fnv1a-v1";

#[derive(Deserialize)]
struct Manifest {
    generator: String,
    dtype: String,
    tensors: Vec<Recipe>,
}

#[derive(Deserialize)]
struct Recipe {
    name: String,
    shape: Vec<usize>,
    offset: f64,
    scale: f64,
}

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// The `i`-th value of the stream seeded `seed`: splitmix64's output's top 24 bits,
/// mapped exactly onto [-1, 1).
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as i64 - (1 << 23)) as f32 / (1u32 << 23) as f32
}

/// The values of `family`'s tensor `name`, `count` of them.
fn values(family: &str, name: &str, count: usize, offset: f32, scale: f32) -> Vec<f32> {
    let seed = fnv1a64(&format!("{family}/{name}"));
    (0..count as u64)
        .map(|i| offset + scale * uniform(seed, i))
        .collect()
}

/// The tensors the recipe in `fixture/tensors.json` makes (the family is `fixture`'s
/// folder name), in the recipe's order.
pub fn rebuild(fixture: &Path) -> Result<Vec<(String, Tensor)>, HandlerError> {
    let recipe_path = fixture.join("tensors.json");
    let bytes = std::fs::read(&recipe_path).map_err(|source| HandlerError::Io {
        path: recipe_path.clone(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| HandlerError::bad_file("tensors.json", e))?;
    if manifest.generator != GENERATOR || manifest.dtype != "F32" {
        return Err(HandlerError::bad_file(
            "tensors.json",
            format!(
                "generator {} in {}: this build rebuilds {GENERATOR} in F32",
                manifest.generator, manifest.dtype
            ),
        ));
    }
    let family = fixture
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    manifest
        .tensors
        .iter()
        .map(|t| {
            let count = t.shape.iter().product();
            let data = values(family, &t.name, count, t.offset as f32, t.scale as f32);
            Tensor::from_vec(data, t.shape.as_slice(), &Device::Cpu)
                .map(|tensor| (t.name.clone(), tensor))
                .context(|| format!("tensor {}", t.name))
        })
        .collect()
}

/// Writes `into/model.safetensors` from the recipe in `fixture/tensors.json` (see
/// [`rebuild`]) and returns its path.
pub fn write_weights(fixture: &Path, into: &Path) -> Result<PathBuf, HandlerError> {
    let tensors: HashMap<String, Tensor> = rebuild(fixture)?.into_iter().collect();
    std::fs::create_dir_all(into).map_err(|source| HandlerError::Io {
        path: into.to_path_buf(),
        source,
    })?;
    let path = into.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator's first outputs, as numpy computes them in the fixture script
    /// (`uniform(fnv1a64("llama/x"), 3)`), pinned so a change to either side shows.
    #[test]
    fn the_stream_is_splitmix64_over_fnv1a() {
        assert_eq!(fnv1a64(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
        let u: Vec<f32> = (0..4).map(|i| uniform(fnv1a64("llama/x"), i)).collect();
        assert!(u.iter().all(|v| (-1.0..1.0).contains(v)), "{u:?}");
        // Exact multiples of 2^-23: compared as those integers.
        let k: Vec<i32> = u.iter().map(|v| (v * (1u32 << 23) as f32) as i32).collect();
        assert_eq!(k, [-2_350_960, 6_166_737, -1_744_249, 484_337]);
    }
}
