//! Spillway's built-in model handlers and the model code they run.
//!
//! A handler turns validated request inputs into outputs on a worker thread. It never
//! sees HTTP, tokio or the model store's layout: the server hands it a [`ModelFiles`]
//! view of an archive and gets back an `Arc<dyn Handler>` that all workers share.
//! No code is ever executed from an archive: handlers are named, built-in types.
//!
//! # Layout
//! - [`handler`]: the [`Handler`] trait, request [`Input`] / [`Output`], [`HandlerKind`]
//!   and [`load`], which builds a handler by kind.
//! - [`files`]: [`ModelFiles`], how a handler reads the files of its model archive.
//! - [`gguf`]: GGUF models converted once to a HuggingFace-layout folder (weights,
//!   config, tokenizer) in the offload folder.
//! - [`offload`]: the offload folder: converted weights written once, tensor by tensor.
//! - [`weights`]: [`WeightSource`], safetensors mapped from disk (also from inside a
//!   zip-store archive) and served to candle's `VarBuilder`.
//! - [`layer_stack`]: [`layer_stack::LayerStack`], runs units where the plan put them;
//!   streams disk units from their memory map with read-ahead.
//! - [`bert`]: BERT built as a layer stack (embeddings, each block) from a plan.
//! - [`bert_block`]: a BERT block fused for f32 on the CPU; [`cpu_kernels`] the fused
//!   kernels on slices, [`fused_ops`] the same as candle operations on tensors.
//! - [`cpu_linear`]: `x · Wᵀ` for f32 on the CPU (weights packed once for MKL).
//! - [`cpu_simd`]: runs a kernel's loop compiled for the CPU's widest vector extension.
//! - [`cpu_team`]: the thread team the fused kernels run their loops on (MKL's OpenMP
//!   team with `mkl`, rayon without).
//! - [`cpu_threads`]: how candle's CPU thread pools are set up (call at start-up).
//! - [`llama`]: Llama-family decoders built as a layer stack, with a KV cache.
//! - [`bert_text`]: tokenization and batching shared by the BERT text handlers.
//! - [`text_embedding`]: BERT sentence embeddings with sentence-transformers pooling.
//! - [`text_classification`]: `BertForSequenceClassification`, labels from `id2label`.
//! - [`text_generation`]: Llama-family generation (greedy or seeded sampling, stop
//!   sequences) behind a token iterator.
//! - [`sentence_transformers`]: reads the sentence-transformers files of a model folder.
//! - [`echo`]: returns its input unchanged; measures the server itself.
//! - [`error`]: [`HandlerError`], the crate's one error type.
//! - `testing` (feature `testing`): tiny random-weight models for tests.

pub mod bert;
pub mod bert_block;
pub mod bert_text;
pub mod cpu_kernels;
#[allow(unsafe_code)] // FFI into MKL's packed GEMM (feature `mkl`).
pub mod cpu_linear;
#[allow(unsafe_code)] // Calls code compiled for CPU features it has checked for.
pub mod cpu_simd;
#[allow(unsafe_code)] // FFI into the OpenMP runtime and disjoint chunks handed to threads.
pub mod cpu_team;
pub mod cpu_threads;
pub mod echo;
pub mod error;
pub mod files;
pub mod fused_ops;
pub mod gguf;
pub mod handler;
pub mod layer_stack;
pub mod llama;
pub mod offload;
pub mod sentence_transformers;
pub mod text_classification;
pub mod text_embedding;
pub mod text_generation;
pub mod weights;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::HandlerError;
pub use files::ModelFiles;
pub use handler::{
    Handler, HandlerInfo, HandlerKind, Input, InputSize, LoadOptions, Output, RawBody, StepBatch,
    load,
};
pub use weights::WeightSource;

// The tensor vocabulary handlers are configured with, so the server needs no candle dependency.
pub use candle_core::{DType, Device};
