//! Vision networks: a network is a [`graph::Graph`] of ops naming checkpoint tensors,
//! written by a recognizer ([`torchvision`]: from a state dict's names and shapes) and
//! run by one executor ([`graph::Network`]); [`checkpoint`] reads the weights (a
//! PyTorch `.pth` state dict converted once to safetensors, or safetensors). Hugging
//! Face's transformer classifiers, named by their config.json, are their own modules:
//! [`vit`].

pub mod checkpoint;
pub mod graph;
pub mod torchvision;
pub mod vit;

use crate::ModelFiles;

/// What `spillway plan` says of a model's weights as an image network: the architecture
/// recognized, its classes and op count, or why none was. `None` for a model with a
/// config.json naming a `model_type` (a text model) or without weights.
pub fn describe(files: &dyn ModelFiles) -> Option<String> {
    let config: Option<serde_json::Value> =
        crate::weights::files::read_json(files, "config.json").ok()?;
    if config
        .as_ref()
        .is_some_and(|c| c.get("model_type").is_some())
    {
        return None;
    }
    let weights = checkpoint::CanonicalWeights::new(files.model_weights().ok()?);
    Some(match torchvision::recognize(&weights.shapes()) {
        Ok(graph) => format!(
            "{}, {} classes, {} ops (torchvision's, recognized from the weights; runs resident)",
            graph.architecture,
            graph.classes,
            graph.count_ops()
        ),
        Err(e) => format!("refused: {e}"),
    })
}
