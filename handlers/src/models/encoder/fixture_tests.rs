//! Every encoder family against transformers' own answers
//! (scripts/make-encoder-fixtures.py): the last hidden states of a padded batch (a text
//! and a pair) and the sequence classifier's logits, with every unit resident, the
//! blocks after the first streamed from disk, and all on disk. Each fixture's weights
//! are rebuilt from its `tensors.json` into a temporary folder.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{EncoderInputs, EncoderSpec, MappedEncoder};
use crate::WeightSource;
use crate::testing::decoder_fixtures::write_weights;
use crate::weights::layer_stack::UnitPlacement;

/// transformers' f32 answers, as the fixtures round them (6 decimals).
pub(crate) const TOLERANCE: f32 = 1e-5;

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/encoders")
}

pub(crate) const FIXTURES: [&str; 5] = [
    "bert",
    "roberta",
    "xlm_roberta_reranker",
    "distilbert",
    "modernbert",
];

pub(crate) struct Reference {
    pub(crate) ids: Vec<Vec<u32>>,
    pub(crate) type_ids: Vec<Vec<u32>>,
    pub(crate) mask: Vec<Vec<u32>>,
    pub(crate) hidden: Vec<f32>,
    pub(crate) hidden_shape: Vec<usize>,
    pub(crate) logits: Vec<Vec<f32>>,
    /// A token classifier's logits, `[row][token][label]`.
    pub(crate) token_logits: Vec<Vec<Vec<f32>>>,
}

pub(crate) fn reference(dir: &Path) -> Reference {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference"))
            .expect("reference.json");
    let field = |key: &str| json[key].clone();
    Reference {
        ids: serde_json::from_value(field("ids")).expect("ids"),
        type_ids: serde_json::from_value(field("type_ids")).expect("type_ids"),
        mask: serde_json::from_value(field("mask")).expect("mask"),
        hidden: serde_json::from_value(field("hidden")).expect("hidden"),
        hidden_shape: serde_json::from_value(field("hidden_shape")).expect("shape"),
        logits: serde_json::from_value(field("logits")).expect("logits"),
        token_logits: serde_json::from_value(field("token_logits")).expect("token_logits"),
    }
}

pub(crate) fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config")).expect("json")
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Placement {
    Resident,
    LaterBlocksOnDisk,
    AllOnDisk,
}

pub(crate) const PLACEMENTS: [Placement; 3] = [
    Placement::Resident,
    Placement::LaterBlocksOnDisk,
    Placement::AllOnDisk,
];

impl Placement {
    /// Where `unit` (of the encoder whose block units are `<blocks>.N`) lives.
    pub(crate) fn of(self, unit: &str, blocks: &str) -> UnitPlacement {
        let block = unit
            .split_once(&format!("{blocks}."))
            .and_then(|(_, n)| n.parse::<usize>().ok());
        let streamed = match self {
            Placement::Resident => false,
            Placement::LaterBlocksOnDisk => block.is_some_and(|b| b > 0),
            Placement::AllOnDisk => true,
        };
        if streamed {
            UnitPlacement::Streamed(Device::Cpu)
        } else {
            UnitPlacement::Resident(Device::Cpu)
        }
    }
}

pub(crate) fn largest_difference(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let d = (g - w).abs();
            if d.is_nan() { f32::INFINITY } else { d }
        })
        .fold(0.0, f32::max)
}

/// A fixture's checkpoint rebuilt into a temporary model folder (its weights,
/// config.json and the tiny WordPiece tokenizer), with its spec, weights and answers.
pub(crate) struct FixtureModel {
    pub(crate) folder: tempfile::TempDir,
    pub(crate) spec: EncoderSpec,
    pub(crate) source: WeightSource,
    pub(crate) want: Reference,
}

impl FixtureModel {
    pub(crate) fn new(name: &str) -> Self {
        let dir = fixtures().join(name);
        let folder = tempfile::tempdir().expect("tempdir");
        let path = write_weights(&dir, folder.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::copy(dir.join("config.json"), folder.path().join("config.json")).expect("config");
        crate::testing::write_tokenizer(folder.path()).expect("tokenizer");
        Self {
            spec: EncoderSpec::from_config(&config(&dir), "test").expect("spec"),
            source: WeightSource::open(&path).expect("source"),
            want: reference(&dir),
            folder,
        }
    }

    /// The reference batch as the encoder takes it.
    pub(crate) fn inputs(&self) -> EncoderInputs {
        let want = &self.want;
        EncoderInputs::from_rows(
            &self.spec,
            &want.ids,
            &want.type_ids,
            &want.mask,
            &Device::Cpu,
        )
        .expect("inputs")
    }

    /// The encoder `spec` describes (this fixture's, or one changed on purpose) loaded at
    /// `placement`.
    pub(crate) fn encoder(&self, spec: &EncoderSpec, placement: Placement) -> MappedEncoder {
        MappedEncoder::load(&self.source, spec, DType::F32, |unit| {
            Ok(placement.of(unit, spec.family.blocks))
        })
        .unwrap_or_else(|e| panic!("{placement:?}: {e}"))
    }
}

/// Flattened values of a forward pass.
fn flat(hidden: candle_core::Result<candle_core::Tensor>) -> Vec<f32> {
    hidden
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("forward")
}

#[test]
fn every_encoder_family_matches_transformers_hidden_states_at_every_placement() {
    for name in FIXTURES {
        let fixture = FixtureModel::new(name);
        let (spec, want) = (&fixture.spec, &fixture.want);
        let inputs = fixture.inputs();
        let units = MappedEncoder::unit_names(&fixture.source, spec);
        // The embeddings, the blocks, and ModernBERT's final norm.
        let all = spec.num_hidden_layers + 1 + usize::from(spec.modern.is_some());
        assert_eq!(units.len(), all, "{name}: {units:?}");
        for placement in PLACEMENTS {
            let model = fixture.encoder(spec, placement);
            let streamed = model.streamed_units();
            let expected_streamed = match placement {
                Placement::Resident => 0,
                Placement::LaterBlocksOnDisk => spec.num_hidden_layers - 1,
                Placement::AllOnDisk => all,
            };
            assert_eq!(streamed, expected_streamed, "{name} {placement:?}");
            let hidden = model.forward(&inputs).expect("forward");
            assert_eq!(hidden.dims(), want.hidden_shape.as_slice(), "{name}");
            let diff = largest_difference(&flat(Ok(hidden)), &want.hidden);
            assert!(
                diff <= TOLERANCE,
                "{name} {placement:?}: hidden states differ from transformers' by {diff}"
            );
        }
    }
}

/// The reference rows as the tokenizer would have encoded them (padding stripped).
pub(crate) fn encodings(want: &Reference) -> Vec<tokenizers::Encoding> {
    want.ids
        .iter()
        .zip(&want.type_ids)
        .zip(&want.mask)
        .map(|((ids, types), mask)| {
            let n = mask.iter().filter(|&&m| m == 1).count();
            tokenizers::Encoding::new(
                ids[..n].to_vec(),
                types[..n].to_vec(),
                vec![String::new(); n],
                vec![None; n],
                vec![(0, 0); n],
                vec![0; n],
                vec![1; n],
                Vec::new(),
                Default::default(),
            )
        })
        .collect()
}

/// RoBERTa's fixture holds its position numbering: counted from 0 (BERT's numbering),
/// its answer is far from transformers'.
#[test]
fn robertas_position_numbering_matters_to_its_fixture() {
    let fixture = FixtureModel::new("roberta");
    let model = fixture.encoder(&fixture.spec, Placement::Resident);
    let mut inputs = fixture.inputs();
    let (batch, tokens) = inputs.ids.dims2().expect("dims");
    let from_zero: Vec<u32> = (0..batch).flat_map(|_| 0..tokens as u32).collect();
    inputs.positions =
        candle_core::Tensor::from_vec(from_zero, (batch, tokens), &Device::Cpu).expect("positions");
    let diff = largest_difference(&flat(model.forward(&inputs)), &fixture.want.hidden);
    assert!(diff > 1e-2, "positions from 0 differ by only {diff}");
}

/// ModernBERT's fixture holds its local attention: with every layer global, its answer
/// is far from transformers'.
#[test]
fn modernberts_local_windows_matter_to_its_fixture() {
    let fixture = FixtureModel::new("modernbert");
    let mut spec = fixture.spec.clone();
    if let Some(modern) = spec.modern.as_mut() {
        modern.local.iter_mut().for_each(|l| *l = false);
    }
    let model = fixture.encoder(&spec, Placement::Resident);
    let diff = largest_difference(
        &flat(model.forward(&fixture.inputs())),
        &fixture.want.hidden,
    );
    assert!(diff > 1e-2, "all-global attention differs by only {diff}");
}
