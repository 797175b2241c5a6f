//! Model code, one family per file.
//!
//! - [`encoder`]: BERT built as a layer stack (embeddings, each block) from a plan, with
//!   its block fused for f32 on the CPU.
//! - [`decoder`]: decoders built as a layer stack, with a KV cache.
//! - [`gguf`]: GGUF models converted once to a HuggingFace-layout folder (weights,
//!   config, tokenizer) in the offload folder.
//! - [`sentence_transformers`]: reads the sentence-transformers files of a model folder.
//! - [`vision`]: image networks as graphs of ops, torchvision's recognized from their
//!   state dicts.

pub mod decoder;
pub mod encoder;
pub mod gguf;
pub mod sentence_transformers;
pub mod vision;
