//! The `token_classification` handler: `*ForTokenClassification` checkpoints of every
//! encoder family (named-entity recognition and the like). The encoder runs as a
//! [`MappedEncoder`] stack as the plan says; the classifier (ModernBERT's head before it)
//! labels every token. Each text is answered with its entities as transformers'
//! token-classification pipeline with `aggregation_strategy="simple"` reports them: per
//! token the most probable label (softmax) with special tokens left out, neighbouring
//! tokens of one tag joined unless a `B-` label starts a new entity, each group's score
//! the mean of its tokens', `O` groups dropped:
//! `[[{"entity_group": "PER", "score": 0.99, "word": "ada lovelace", "start": 0, "end": 12}]]`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear};
use candle_transformers::models::bert::HiddenAct;
use tokenizers::Encoding;

use crate::error::CandleContext;
use crate::models::encoder::modern_block::{activate, norm};
use crate::models::encoder::{EncoderSpec, MappedEncoder};
use crate::tasks::encoder_text::EncoderText;
use crate::tasks::text_classification::labels;
use crate::weights::WeightsWatch;
use crate::{
    Entity, Handler, HandlerError, HandlerInfo, HandlerKind, Input, LoadOptions, ModelFiles,
    Output, Request,
};

/// ModernBERT's prediction head before its token classifier.
struct ModernHead {
    dense: Linear,
    activation: HiddenAct,
    norm: LayerNorm,
}

pub struct TokenClassification {
    model: MappedEncoder,
    text: EncoderText,
    head: Option<ModernHead>,
    classifier: Linear,
    labels: Vec<String>,
    device: Device,
    dtype: DType,
    parameters: usize,
    /// Whether the files it still maps changed underneath.
    watch: WeightsWatch,
}

/// One token's best label.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLabel {
    pub label: usize,
    pub score: f32,
    pub id: u32,
    pub start: usize,
    pub end: usize,
}

/// `B-PER` → (true, "PER"); `I-PER` and any other label → (false, the tag), as
/// transformers' `get_tag`.
fn tag(label: &str) -> (bool, &str) {
    match (label.strip_prefix("B-"), label.strip_prefix("I-")) {
        (Some(tag), _) => (true, tag),
        (None, Some(tag)) => (false, tag),
        (None, None) => (false, label),
    }
}

/// Groups tokens into entities as transformers' `group_entities` does (a token joins the
/// group before it when its tag is the group's last token's and it does not begin with
/// `B-`), then drops the `O` groups. `decode` gives a group's text from its token ids.
pub fn group_entities(
    tokens: &[TokenLabel],
    labels: &[String],
    decode: impl Fn(&[u32]) -> Result<String, HandlerError>,
) -> Result<Vec<Entity>, HandlerError> {
    let name = |t: &TokenLabel| labels.get(t.label).map_or("", String::as_str);
    let mut groups: Vec<Vec<&TokenLabel>> = Vec::new();
    for token in tokens {
        let joins = groups.last().and_then(|g| g.last()).is_some_and(|last| {
            let (begins, tag_now) = tag(name(token));
            tag_now == tag(name(last)).1 && !begins
        });
        match (joins, groups.last_mut()) {
            (true, Some(group)) => group.push(token),
            _ => groups.push(vec![token]),
        }
    }
    groups
        .into_iter()
        .filter(|group| tag(name(group[0])).1 != "O")
        .map(|group| {
            let ids: Vec<u32> = group.iter().map(|t| t.id).collect();
            Ok(Entity {
                entity_group: tag(name(group[0])).1.to_string(),
                score: group.iter().map(|t| t.score).sum::<f32>() / group.len() as f32,
                word: decode(&ids)?,
                start: group[0].start,
                end: group[group.len() - 1].end,
            })
        })
        .collect()
}

impl TokenClassification {
    pub fn load(files: &dyn ModelFiles, options: &LoadOptions) -> Result<Self, HandlerError> {
        let mut text = EncoderText::load(files, "token_classification", options.max_length)?;
        text.char_offsets = true;
        let labels = labels(&text.config_json)?;
        let weights = files.model_weights()?;
        let dtype = options.dtype.unwrap_or(DType::F32);
        let device = options.device.clone();
        let spec: &EncoderSpec = &text.spec;
        let h = spec.hidden_size;
        let vb = weights.var_builder(dtype, &device);
        let head = match &spec.modern {
            Some(modern) => Some(ModernHead {
                dense: candle_nn::linear_b(h, h, modern.classifier_bias, vb.pp("head.dense"))
                    .context(|| "cannot load ModernBERT's `head.dense`".into())?,
                activation: modern.classifier_activation,
                norm: norm(vb.pp("head.norm"), spec, modern)
                    .context(|| "cannot load ModernBERT's `head.norm`".into())?,
            }),
            None => None,
        };
        let classifier = candle_nn::linear(h, labels.len(), vb.pp("classifier")).context(|| {
            format!(
                "cannot load the token classifier for {} labels (a *ForTokenClassification checkpoint has `classifier`)",
                labels.len()
            )
        })?;
        let parameters = weights.parameters();
        let model = MappedEncoder::load(&weights, spec, dtype, |unit| options.placement_of(unit))?;
        if let Some(changed) = weights.changed() {
            return Err(changed);
        }
        Ok(Self {
            model,
            text,
            head,
            classifier,
            labels,
            device,
            dtype,
            parameters,
            watch: weights.watch(),
        })
    }

    /// Per-token label logits of each input, `[inputs][tokens][labels]` (the inputs'
    /// own tokens, padding left out).
    pub fn logits(&self, encodings: &[&Encoding]) -> Result<Vec<Vec<Vec<f32>>>, HandlerError> {
        let forward = || -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
            let inputs = self.text.inputs(encodings, &self.device)?;
            let mut hidden: Tensor = self.model.forward(&inputs)?.to_device(&self.device)?;
            if let Some(head) = &self.head {
                let dense = activate(&head.dense.forward(&hidden)?, head.activation)?;
                hidden = head.norm.forward(&dense)?;
            }
            let logits = self
                .classifier
                .forward(&hidden)?
                .to_dtype(DType::F32)?
                .to_vec3::<f32>()?;
            Ok(logits
                .into_iter()
                .zip(encodings)
                .map(|(mut rows, e)| {
                    rows.truncate(e.len());
                    rows
                })
                .collect())
        };
        forward().context(|| {
            format!(
                "token classification forward pass failed (batch of {})",
                encodings.len()
            )
        })
    }

    /// One input's entities from its tokens' logits.
    fn entities(
        &self,
        encoding: &Encoding,
        logits: &[Vec<f32>],
    ) -> Result<Vec<Entity>, HandlerError> {
        let tokens: Vec<TokenLabel> = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| encoding.get_special_tokens_mask().get(*i) != Some(&1))
            .map(|(i, row)| {
                let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let total: f32 = row.iter().map(|l| (l - top).exp()).sum();
                let (label, best) = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or((0, 0.0), |(j, l)| (j, *l));
                let (start, end) = encoding.get_offsets().get(i).copied().unwrap_or_default();
                TokenLabel {
                    label,
                    score: (best - top).exp() / total,
                    id: encoding.get_ids()[i],
                    start,
                    end,
                }
            })
            .collect();
        group_entities(&tokens, &self.labels, |ids| self.text.decode(ids))
    }
}

impl Handler for TokenClassification {
    fn weights_changed(&self) -> Option<HandlerError> {
        self.watch.changed()
    }

    fn prepare(&self, request: Request) -> Result<Input, HandlerError> {
        if let Request::Pairs(_) = request {
            return Err(HandlerError::Input(
                "token_classification labels the tokens of texts, not of text pairs".into(),
            ));
        }
        self.text.prepare(request, "token_classification")
    }

    fn run(&self, batch: &[Input]) -> Result<Vec<Result<Output, HandlerError>>, HandlerError> {
        self.text.run_batch(
            batch,
            "token_classification",
            |chunk| {
                let logits = self.logits(chunk)?;
                chunk
                    .iter()
                    .zip(&logits)
                    .map(|(encoding, logits)| self.entities(encoding, logits))
                    .collect()
            },
            Output::Entities,
        )
    }

    fn units(&self) -> Option<&dyn crate::weights::layer_stack::Units> {
        Some(self.model.units())
    }

    fn info(&self) -> HandlerInfo {
        self.text.info(
            HandlerKind::TokenClassification,
            &self.model,
            self.dtype,
            &self.device,
            self.parameters,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BERT's token classifier and ModernBERT's (its head before the classifier) against
    /// transformers' per-token logits, the encoder resident, partly and wholly on disk.
    #[test]
    fn token_classifiers_match_transformers_logits_at_every_placement() {
        use crate::models::encoder::fixture_tests::{
            FixtureModel, PLACEMENTS, TOLERANCE, encodings, largest_difference,
        };
        use crate::weights::files::FolderFiles;
        for name in ["bert_ner", "modernbert_ner"] {
            let fixture = FixtureModel::new(name);
            let encodings = encodings(&fixture.want);
            let encodings: Vec<&Encoding> = encodings.iter().collect();
            let mut handler = Some(
                TokenClassification::load(
                    &FolderFiles::new(fixture.folder.path()),
                    &LoadOptions::default(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
            for placement in PLACEMENTS {
                let current = TokenClassification {
                    model: fixture.encoder(&fixture.spec, placement),
                    ..handler.take().expect("handler")
                };
                let got = current.logits(&encodings).expect("logits");
                assert_eq!(got.len(), fixture.want.token_logits.len());
                for (row, (g, w)) in got.iter().zip(&fixture.want.token_logits).enumerate() {
                    assert_eq!(g.len(), encodings[row].len());
                    let diff = largest_difference(&g.concat(), &w[..g.len()].concat());
                    assert!(
                        diff <= TOLERANCE,
                        "{name} {placement:?} row {row}: token logits differ by {diff}"
                    );
                }
                handler = Some(current);
            }
        }
    }

    fn token(label: usize, score: f32, id: u32, start: usize, end: usize) -> TokenLabel {
        TokenLabel {
            label,
            score,
            id,
            start,
            end,
        }
    }

    /// transformers' grouping, case by case: B- starts a group, I- of the same tag joins,
    /// a bare label joins its own kind, O groups are dropped, scores are means.
    #[test]
    fn tokens_group_into_entities_as_transformers_simple_strategy() {
        let labels: Vec<String> = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]
            .iter()
            .map(|l| l.to_string())
            .collect();
        let tokens = [
            token(1, 0.9, 10, 0, 3),  // B-PER
            token(2, 0.7, 11, 4, 8),  // I-PER joins
            token(1, 0.8, 12, 9, 12), // B-PER starts another
            token(0, 0.99, 13, 13, 15),
            token(4, 0.6, 14, 16, 20), // I-LOC after O: a group of its own
            token(4, 0.4, 15, 20, 22), // joins
            token(3, 0.5, 16, 23, 25), // B-LOC: new
            token(5, 0.3, 17, 26, 28), // MISC
            token(5, 0.5, 18, 29, 30), // MISC joins (bare labels continue)
        ];
        let decode = |ids: &[u32]| -> Result<String, HandlerError> {
            Ok(ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join("+"))
        };
        let got = group_entities(&tokens, &labels, decode).expect("groups");
        let summary: Vec<(&str, String, usize, usize)> = got
            .iter()
            .map(|e| (e.entity_group.as_str(), e.word.clone(), e.start, e.end))
            .collect();
        assert_eq!(
            summary,
            [
                ("PER", "10+11".to_string(), 0, 8),
                ("PER", "12".to_string(), 9, 12),
                ("LOC", "14+15".to_string(), 16, 22),
                ("LOC", "16".to_string(), 23, 25),
                ("MISC", "17+18".to_string(), 26, 30),
            ]
        );
        assert!((got[0].score - 0.8).abs() < 1e-6);
        assert!((got[2].score - 0.5).abs() < 1e-6);
    }
}
