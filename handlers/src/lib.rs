//! Spillway's built-in model handlers and the model code they run.
//!
//! A handler turns validated request inputs into outputs on a worker thread. It never
//! sees HTTP, tokio or the model store's layout: the server hands it a [`ModelFiles`]
//! view of an archive and gets back an `Arc<dyn Handler>` that all workers share.
//! No code is ever executed from an archive: handlers are named, built-in types.
//!
//! # Layout
//! - [`handler`]: the [`Handler`] trait and the types that cross it ([`Request`],
//!   [`Input`], [`Output`], [`HandlerKind`], [`LoadOptions`]); nothing below it imports a task.
//! - [`chat`]: chat messages and the model's own chat template (minijinja).
//! - [`generate`]: generation parameters, results and the events streamed on the way.
//! - [`tasks`]: the built-in handlers, one per task, and [`load`], which builds one by kind.
//! - [`models`]: model code, one family per file (BERT, Llama, GGUF conversion, vision).
//! - [`images`]: image bytes to model inputs (decoding within limits, Pillow's resize,
//!   each model's preprocessing as data).
//! - [`weights`]: where bytes come from (model files, mapped safetensors, the offload
//!   folder) and where units live ([`weights::layer_stack::LayerStack`]).
//! - [`cpu`]: Spillway's fused f32 CPU kernels, its products on GGML-quantized weights,
//!   and the threads they run on.
//! - [`gpu`]: the GPUs the driver shows, the device each `cuda:N` unit runs on, and
//!   staging weights onto them (the `cuda` feature; without it, why there are none).
//! - [`error`]: [`HandlerError`], the crate's one error type.
//! - `testing` (feature `testing`): tiny random-weight models for tests.

pub mod chat;
pub mod cpu;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod handler;
pub mod images;
pub mod models;
pub mod sampling;
pub mod tasks;
pub mod tools;
pub mod weights;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use chat::{ChatMessage, ChatRequest, ChatTemplate};
pub use error::{ErrorClass, HandlerError};
pub use generate::{
    EventSender, FinishReason, GenerateParameters, GenerateRequest, Generation, GenerationEvent,
    Grammar, MAX_TOP_LOGPROBS, TokenLogprob, TokenLogprobs,
};
pub use handler::{
    Classification, Entity, Handler, HandlerInfo, HandlerKind, ImageInput, Input, InputSize,
    LoadOptions, Output, PrefixCacheTotals, PromptInput, RawBody, Request, ScoredLabel, StepBatch,
    candle_dtype,
};
pub use tasks::load;
pub use tools::{ChatTools, ToolCall, ToolChoice, ToolFunction};
pub use weights::files::ModelFiles;
pub use weights::{WeightSource, WeightsWatch};

// The tensor vocabulary handlers are configured with, so the server needs no candle dependency.
pub use candle_core::{DType, Device, Error as CandleError, Tensor};
