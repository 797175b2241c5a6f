//! Every family against transformers' own answers (scripts/make-decoder-fixtures.py):
//! the greedy tokens and each step's logits, from both spellings of config.json, with
//! every unit resident, the blocks after the first streamed from disk, routed experts
//! alone on disk, and all on disk.
//! Each fixture's weights are rebuilt from its `tensors.json` into a temporary folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::families::{Activation, FAMILIES, NormPlacement};
use super::{DecoderSpec, KvCache, MappedDecoder, argmax};
use crate::WeightSource;
use crate::testing::decoder_fixtures::write_weights;
use crate::weights::layer_stack::UnitPlacement;

/// A difference, NaN counted as the farthest (`f32::max` would skip it).
fn nan_is_far(d: f32) -> f32 {
    if d.is_nan() { f32::INFINITY } else { d }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders")
}

pub(crate) struct Reference {
    prompt: Vec<u32>,
    /// Per step: the logits and the token transformers picked.
    steps: Vec<(Vec<f32>, u32)>,
}

pub(crate) fn reference(dir: &Path) -> Reference {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference"))
            .expect("reference.json");
    let prompt = serde_json::from_value(json["prompt"].clone()).expect("prompt");
    let steps = json["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                serde_json::from_value(s["logits"].clone()).expect("logits"),
                s["token"].as_u64().expect("token") as u32,
            )
        })
        .collect();
    Reference { prompt, steps }
}

fn spec(dir: &Path, file: &str) -> DecoderSpec {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(file)).expect("config")).expect("json");
    DecoderSpec::from_config(&json).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Placement {
    Resident,
    LaterBlocksOnDisk,
    /// Routed experts streamed, everything else resident (llama.cpp's `--cpu-moe`).
    ExpertsOnDisk,
    AllOnDisk,
}

impl Placement {
    fn of(self, spec: &DecoderSpec) -> impl Fn(&str) -> Result<UnitPlacement, crate::HandlerError> {
        // Block units are `<blocks>.N` (their experts `<blocks>.N.<moe>.experts`), with or
        // without the family's prefix.
        let blocks = format!("{}.", spec.family.names.blocks);
        move |unit: &str| {
            let block = unit
                .split_once(&blocks)
                .and_then(|(_, n)| n.split('.').next()?.parse::<usize>().ok());
            let streamed = match self {
                Placement::Resident => false,
                Placement::LaterBlocksOnDisk => block.is_some_and(|n| n > 0),
                Placement::ExpertsOnDisk => unit.ends_with(".experts"),
                Placement::AllOnDisk => true,
            };
            Ok(match streamed {
                true => UnitPlacement::Streamed(Device::Cpu),
                false => UnitPlacement::Resident(Device::Cpu),
            })
        }
    }
}

/// The fixture's checkpoint, written into `work`.
fn weights(dir: &Path, work: &Path) -> WeightSource {
    let path = write_weights(dir, work).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    WeightSource::open(&path).expect("source")
}

pub(crate) fn decode(
    source: &WeightSource,
    spec: &DecoderSpec,
    placement: Placement,
    want: &Reference,
    label: &str,
) {
    let model = MappedDecoder::load(source, spec, DType::F32, placement.of(spec))
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let mut cache = KvCache::default();
    let mut input = want.prompt.clone();
    for (step, (logits, token)) in want.steps.iter().enumerate() {
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        let ours = model
            .forward(&t, &mut cache)
            .and_then(|l| l.squeeze(0))
            .expect("forward");
        let values = ours.to_vec1::<f32>().expect("logits");
        assert_eq!(values.len(), logits.len(), "{label}: vocabulary");
        let diff = values
            .iter()
            .zip(logits)
            .map(|(a, b)| nan_is_far((a - b).abs()))
            .fold(0f32, f32::max);
        // The fixture's logits are rounded to 6 decimals.
        assert!(
            diff <= 1e-4,
            "{label}, step {step}: logits differ from transformers' by {diff}"
        );
        let next = argmax(&ours).expect("argmax");
        assert_eq!(next, *token, "{label}, step {step}: greedy token");
        input = vec![next];
    }
}

#[test]
fn every_family_decodes_like_transformers_from_both_config_spellings_at_every_placement() {
    let root = fixtures();
    let mut seen = Vec::new();
    for family in FAMILIES {
        let dir = root.join(family.name);
        assert!(
            dir.is_dir(),
            "no fixture for family {}: run scripts/make-decoder-fixtures.py",
            family.name
        );
        let want = reference(&dir);
        let work = tempfile::tempdir().expect("tempdir");
        let source = weights(&dir, work.path());
        for file in ["config.json", "config.t4.json"] {
            let spec = spec(&dir, file);
            assert_eq!(spec.family.name, family.name, "{file}");
            let experts = family.experts.is_some();
            for placement in [
                Placement::Resident,
                Placement::LaterBlocksOnDisk,
                Placement::ExpertsOnDisk,
                Placement::AllOnDisk,
            ] {
                if matches!(placement, Placement::ExpertsOnDisk) && !experts {
                    continue;
                }
                let label = format!("{} ({file}, {placement:?})", family.name);
                decode(&source, &spec, placement, &want, &label);
            }
        }
        seen.push(family.name);
    }
    assert_eq!(seen.len(), FAMILIES.len());
}

/// BLOOM's and GPT-2's checkpoints on the Hub were saved from the bare model: `h.N`,
/// `word_embeddings` or `wte`, `ln_f`, no `transformer.` prefix. They answer alike.
#[test]
fn checkpoints_without_the_transformer_prefix_answer_alike() {
    for family in ["bloom", "gpt2"] {
        let dir = fixtures().join(family);
        let work = tempfile::tempdir().expect("tempdir");
        let path = write_weights(&dir, work.path()).expect("weights");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
        let bare: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| {
                let name = name.strip_prefix("transformer.").map(str::to_string);
                (name.expect("every tensor under transformer."), t)
            })
            .collect();
        let bare_path = work.path().join("bare.safetensors");
        candle_core::safetensors::save(&bare, &bare_path).expect("save");
        let source = WeightSource::open(&bare_path).expect("source");
        let want = reference(&dir);
        let spec = spec(&dir, "config.json");
        for placement in [Placement::Resident, Placement::LaterBlocksOnDisk] {
            decode(
                &source,
                &spec,
                placement,
                &want,
                &format!("bare {family}, {placement:?}"),
            );
        }
    }
}

/// YaRN scaling (a fixture of its own, on Qwen 2): the frequency ramp and the attention
/// factor on cos and sin, from both spellings, resident and on disk.
#[test]
fn yarn_scaling_decodes_like_transformers() {
    let dir = fixtures().join("qwen2_yarn");
    let want = reference(&dir);
    let work = tempfile::tempdir().expect("tempdir");
    let source = weights(&dir, work.path());
    for file in ["config.json", "config.t4.json"] {
        let spec = spec(&dir, file);
        assert!(spec.rope.attention_factor() > 1.0, "{file}");
        let model = MappedDecoder::load(&source, &spec, DType::F32, |_| {
            Ok(UnitPlacement::Resident(Device::Cpu))
        })
        .expect("load");
        assert!(!model.keys_depend_on_length(), "YaRN's keys do not");
        assert!(!spec.keys_depend_on_length(), "nor does its spec say so");
        for placement in [Placement::Resident, Placement::AllOnDisk] {
            decode(
                &source,
                &spec,
                placement,
                &want,
                &format!("yarn ({file}, {placement:?})"),
            );
        }
    }
}

/// LongRoPE (a fixture of its own, on Phi-3): short factors while the sequence fits
/// the original context of 12 (the prompt and two steps), long ones after (the keys
/// cached before the switch kept), and its attention factor — from both spellings
/// (Phi-3's hub configs keep the original context at the top), at every placement.
#[test]
fn longrope_scaling_switches_factors_like_transformers() {
    let dir = fixtures().join("phi3_longrope");
    let want = reference(&dir);
    let work = tempfile::tempdir().expect("tempdir");
    let source = weights(&dir, work.path());
    for file in ["config.json", "config.t4.json"] {
        let spec = spec(&dir, file);
        // sqrt(1 + ln(64 / 12) / ln(12)), from max_position_embeddings / original.
        let factor = (1.0 + (64.0f64 / 12.0).ln() / 12f64.ln()).sqrt();
        assert!(
            (spec.rope.attention_factor() - factor).abs() < 1e-9,
            "{file}"
        );
        decode_resident_and_on_disk(&source, &spec, &want, &format!("longrope ({file})"));
    }
    // With the long factors made the short ones, the steps before the switch still
    // match and the ones after leave the reference: the switch is what they test.
    let mut same = spec(&dir, "config.json");
    if let Some(scaling) = same.rope.scaling.as_mut() {
        scaling["long_factor"] = scaling["short_factor"].clone();
    }
    let model = MappedDecoder::load(&source, &same, DType::F32, |_| {
        Ok(UnitPlacement::Resident(Device::Cpu))
    })
    .expect("load");
    // Its keys depend on the sequence's length: text_generation shares no prefix (and
    // the spec, which the planner reads, says the same).
    assert!(model.keys_depend_on_length());
    assert!(same.keys_depend_on_length());
    let mut short = same.clone();
    short.max_position_embeddings = 12; // no position past the original context
    assert!(!short.keys_depend_on_length());
    let diffs = step_differences(&model, &want);
    // Steps 0-2 end at positions 10, 11, 12: within the original context of 12.
    assert!(diffs[..3].iter().all(|d| *d <= 1e-4), "{diffs:?}");
    assert!(diffs[3..].iter().all(|d| *d > 1e-3), "{diffs:?}");
}

/// [`decode`] at the three placements a fixture is held to: resident, the blocks after
/// the first on disk, all on disk.
fn decode_resident_and_on_disk(
    source: &WeightSource,
    spec: &DecoderSpec,
    want: &Reference,
    label: &str,
) {
    for placement in [
        Placement::Resident,
        Placement::LaterBlocksOnDisk,
        Placement::AllOnDisk,
    ] {
        decode(
            source,
            spec,
            placement,
            want,
            &format!("{label}, {placement:?}"),
        );
    }
}

/// Each step's largest logit difference to the reference, teacher-forced along its
/// tokens.
fn step_differences(model: &MappedDecoder, want: &Reference) -> Vec<f32> {
    let mut cache = KvCache::default();
    let mut input = want.prompt.clone();
    let mut diffs = Vec::new();
    for (logits, token) in &want.steps {
        let t = Tensor::new(input.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        let ours = model
            .forward(&t, &mut cache)
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_vec1::<f32>())
            .expect("forward");
        diffs.push(
            ours.iter()
                .zip(logits)
                .map(|(a, b)| nan_is_far((a - b).abs()))
                .fold(0f32, f32::max),
        );
        input = vec![*token];
    }
    diffs
}

/// Dynamic NTK scaling (a fixture of its own, on Llama): past max_position_embeddings
/// (12) each pass rotates its new tokens with the base grown for the sequence's length,
/// and the model serves factor × 12 positions. Both spellings, every placement; with the
/// scaling taken off, the steps within 12 positions still match and those past it do not.
#[test]
fn dynamic_ntk_scaling_grows_the_base_like_transformers() {
    let dir = fixtures().join("llama_dynamic");
    let want = reference(&dir);
    let work = tempfile::tempdir().expect("tempdir");
    let source = weights(&dir, work.path());
    for file in ["config.json", "config.t4.json"] {
        let spec = spec(&dir, file);
        assert_eq!(
            spec.rope.dynamic_ntk().expect("read"),
            Some((12, 2.0)),
            "{file}"
        );
        assert_eq!(spec.positions(), 24, "{file}");
        assert!(spec.keys_depend_on_length(), "{file}");
        decode_resident_and_on_disk(&source, &spec, &want, &format!("dynamic ({file})"));
    }
    let mut plain = spec(&dir, "config.json");
    plain.rope.scaling = None;
    plain.max_position_embeddings = 24;
    let model = MappedDecoder::load(&source, &plain, DType::F32, |_| {
        Ok(UnitPlacement::Resident(Device::Cpu))
    })
    .expect("load");
    assert!(!model.keys_depend_on_length());
    let diffs = step_differences(&model, &want);
    // Steps 0-2 end at positions 10, 11, 12: within the original context of 12.
    assert!(diffs[..3].iter().all(|d| *d <= 1e-4), "{diffs:?}");
    assert!(diffs[3..].iter().all(|d| *d > 1e-3), "{diffs:?}");
}

/// What each fixture exercises really changes the answer: served without it, the
/// logits leave the reference (else the fixture would not test it).
#[test]
fn each_family_feature_changes_the_fixtures_answer() {
    let root = fixtures();
    let first_logits = |dir: &Path, spec: &DecoderSpec| -> Vec<f32> {
        let work = tempfile::tempdir().expect("tempdir");
        let source = weights(dir, work.path());
        let model = MappedDecoder::load(&source, spec, DType::F32, |_| {
            Ok(UnitPlacement::Resident(Device::Cpu))
        })
        .expect("load");
        let want = reference(dir);
        let t = Tensor::new(want.prompt.as_slice(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("tokens");
        model
            .forward(&t, &mut KvCache::default())
            .and_then(|l| l.squeeze(0))
            .and_then(|l| l.to_vec1::<f32>())
            .expect("forward")
    };
    let departs = |family: &str, change: &dyn Fn(&mut DecoderSpec)| {
        let dir = root.join(family);
        let mut spec = spec(&dir, "config.json");
        change(&mut spec);
        let want = &reference(&dir).steps[0].0;
        let diff = first_logits(&dir, &spec)
            .iter()
            .zip(want)
            .map(|(a, b)| nan_is_far((a - b).abs()))
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-3,
            "{family}: the change left the logits within {diff}"
        );
    };
    departs("llama", &|s| s.rope.scaling = None);
    departs("mistral", &|s| s.windows = vec![None; s.windows.len()]);
    departs("qwen3", &|s| s.windows = vec![None; s.windows.len()]);
    departs("phi3", &|s| s.rope.rotary_dim = s.head_dim);
    departs("granite", &|s| s.residual_multiplier = 1.0);
    departs("granite", &|s| {
        s.attention_scale = 1.0 / (s.head_dim as f64).sqrt()
    });
    departs("gemma", &|s| s.embedding_multiplier = 1.0);
    departs("gemma", &|s| s.activation = Activation::Silu);
    departs("gemma2", &|s| s.attention_softcap = None);
    departs("gemma2", &|s| s.logit_softcap = None);
    departs("gemma2", &|s| {
        s.attention_scale = 1.0 / (s.head_dim as f64).sqrt()
    });
    departs("gemma2", &|s| s.windows = vec![None; s.windows.len()]);
    departs("gemma3", &|s| s.local_rope = None);
    departs("gemma3", &|s| s.rope.scaling = None);
    departs("mixtral", &|s| {
        if let Some(moe) = &mut s.moe {
            moe.per_token = 1
        }
    });
    departs("qwen2_yarn", &|s| s.rope.scaling = None);
    departs("gpt_neox", &|s| s.norms = NormPlacement::Pre);
    departs("gpt_neox", &|s| s.rope.rotary_dim = s.head_dim);
    departs("qwen3_moe", &|s| {
        if let Some(moe) = &mut s.moe {
            moe.normalize = false
        }
    });
}

/// A streamed expert group reads the experts its rows are routed to and no others: one
/// token's step runs `num_experts_per_tok` experts in each sparse block, and the stack
/// counts exactly their bytes, where the whole groups weigh twice that and more.
#[test]
fn streamed_experts_read_only_the_routed_ones() {
    for family in ["mixtral", "qwen3_moe"] {
        let dir = fixtures().join(family);
        let work = tempfile::tempdir().expect("tempdir");
        let source = weights(&dir, work.path());
        let spec = spec(&dir, "config.json");
        let moe = spec.moe.clone().expect("a MoE family");
        assert!(moe.per_token < moe.experts, "{family}");
        let model = MappedDecoder::load(
            &source,
            &spec,
            DType::F32,
            Placement::ExpertsOnDisk.of(&spec),
        )
        .expect("load");
        let sparse = moe.sparse.iter().filter(|s| **s).count();
        assert_eq!(
            model.streamed_units(),
            sparse,
            "{family}: only experts stream"
        );
        let want = reference(&dir);
        let tokens = |ids: &[u32]| {
            Tensor::new(ids, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens")
        };
        let mut cache = KvCache::default();
        model
            .forward(&tokens(&want.prompt), &mut cache)
            .expect("prompt");
        let before = model.units().stream_totals();
        model
            .forward(&tokens(&[want.steps[0].1]), &mut cache)
            .expect("step");
        let after = model.units().stream_totals();
        let expert = (3 * spec.hidden_size * moe.intermediate_size * 4) as u64;
        assert_eq!(after.units - before.units, sparse as u64, "{family}");
        assert_eq!(
            after.bytes - before.bytes,
            (sparse * moe.per_token) as u64 * expert,
            "{family}: one token reads its routed experts"
        );
        assert!(
            before.bytes <= (sparse * moe.experts) as u64 * expert,
            "{family}"
        );
    }
}

/// A sliding-window block's cache rolls (it keeps at most twice its window), and a
/// chunk of several tokens after a roll — masked by positions, not by slots — answers
/// as the same tokens decoded in one pass.
#[test]
fn a_rolled_window_cache_answers_chunks_like_one_pass() {
    let dir = fixtures().join("mistral");
    let work = tempfile::tempdir().expect("tempdir");
    let source = weights(&dir, work.path());
    let spec = spec(&dir, "config.json");
    let window = spec.windows[0].expect("mistral's fixture slides");
    let model = MappedDecoder::load(&source, &spec, DType::F32, |_| {
        Ok(UnitPlacement::Resident(Device::Cpu))
    })
    .expect("load");
    let tokens: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % 128).collect();
    let run = |chunks: &[&[u32]]| -> (Vec<f32>, KvCache) {
        let mut cache = KvCache::default();
        let mut last = Vec::new();
        for chunk in chunks {
            let t = Tensor::new(*chunk, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("tokens");
            last = model
                .forward(&t, &mut cache)
                .and_then(|l| l.squeeze(0))
                .and_then(|l| l.to_vec1::<f32>())
                .expect("forward");
        }
        (last, cache)
    };
    let (whole, _) = run(&[&tokens]);
    let (chunked, cache) = run(&[&tokens[..10], &tokens[10..13], &tokens[13..]]);
    let diff = whole
        .iter()
        .zip(&chunked)
        .map(|(a, b)| nan_is_far((a - b).abs()))
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "chunks after a roll differ by {diff}");
    for layer in cache.layers.iter().flatten() {
        assert!(layer.start > 0, "the cache never rolled");
        assert!(layer.len <= 2 * window, "{} keys kept", layer.len);
    }
}
