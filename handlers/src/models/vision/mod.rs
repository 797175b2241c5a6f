//! Vision networks: a network is a [`graph::Graph`] of ops naming checkpoint tensors,
//! written by a recognizer ([`torchvision`]: from a state dict's names and shapes) and
//! run by one executor ([`graph::Network`]); [`checkpoint`] reads the weights (a
//! PyTorch `.pth` state dict converted once to safetensors, or safetensors). Hugging
//! Face's convolutional classifiers, named by their config.json, are graphs too
//! ([`huggingface`]); its transformer classifiers are their own modules: [`vit`].

pub mod checkpoint;
pub mod graph;
pub mod huggingface;
pub mod torchvision;
pub mod vit;

use crate::ModelFiles;

/// Whether `config` (a config.json) names a vision model served here: such a config
/// describes no layer stack to plan reserves for.
pub fn serves_config(config: &serde_json::Value) -> bool {
    vit::serves(config) || huggingface::serves(config)
}

/// What `spillway plan` says of a model's weights as an image network: the architecture
/// recognized, its classes and op count, or why none was. `None` for a model with a
/// config.json naming another `model_type` (a text model, ViT) or without weights.
pub fn describe(files: &dyn ModelFiles) -> Option<String> {
    let config: Option<serde_json::Value> =
        crate::weights::files::read_json(files, "config.json").ok()?;
    let hugging_face = config.as_ref().filter(|c| huggingface::serves(c));
    if hugging_face.is_none()
        && config
            .as_ref()
            .is_some_and(|c| c.get("model_type").is_some())
    {
        return None;
    }
    let weights = checkpoint::CanonicalWeights::new(files.model_weights().ok()?);
    let (graph, source) = match hugging_face {
        Some(config) => (
            huggingface::graph(config, &weights.shapes()),
            "Hugging Face's, from config.json",
        ),
        None => (
            torchvision::recognize(&weights.shapes()),
            "torchvision's, recognized from the weights",
        ),
    };
    Some(match graph {
        Ok(graph) => format!(
            "{}, {} classes, {} ops ({source}; runs resident)",
            graph.architecture,
            graph.classes,
            graph.count_ops()
        ),
        Err(e) => format!("refused: {e}"),
    })
}
