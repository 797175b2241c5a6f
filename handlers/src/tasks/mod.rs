//! The built-in handlers, one per task, and [`load`], which builds one by kind.
//!
//! - [`text_embedding`]: BERT sentence embeddings with sentence-transformers pooling.
//! - [`text_classification`]: `*ForSequenceClassification` of the encoder families,
//!   labels from `id2label`; text pairs for cross-encoders.
//! - [`token_classification`]: `*ForTokenClassification`, entities as transformers'
//!   pipeline groups them.
//! - [`text_generation`]: Llama-family generation (greedy or seeded sampling, stop
//!   sequences) behind a token iterator.
//! - [`image_classifier`]: torchvision classifiers recognized from their weights,
//!   TorchServe's top-5 answer.
//! - [`encoder_text`]: tokenization and batching shared by the encoder text handlers.
//! - [`echo`]: returns its input unchanged; measures the server itself.

pub mod echo;
pub mod encoder_text;
pub mod image_classifier;
pub mod text_classification;
pub mod text_embedding;
pub mod text_generation;
pub mod token_classification;

use std::sync::Arc;

use crate::handler::{Handler, HandlerKind, LoadOptions};
use crate::{HandlerError, ModelFiles};
use echo::Echo;
use text_embedding::TextEmbedding;

/// Builds the handler `kind` from the model's files.
pub fn load(
    kind: HandlerKind,
    files: &dyn ModelFiles,
    options: &LoadOptions,
) -> Result<Arc<dyn Handler>, HandlerError> {
    Ok(match kind {
        HandlerKind::TextEmbedding => Arc::new(TextEmbedding::load(files, options)?),
        HandlerKind::TextClassification => Arc::new(text_classification::TextClassification::load(
            files, options,
        )?),
        HandlerKind::TokenClassification => Arc::new(
            token_classification::TokenClassification::load(files, options)?,
        ),
        HandlerKind::TextGeneration => {
            Arc::new(text_generation::TextGeneration::load(files, options)?)
        }
        HandlerKind::ImageClassifier => {
            Arc::new(image_classifier::ImageClassifier::load(files, options)?)
        }
        HandlerKind::Echo => Arc::new(Echo),
    })
}
