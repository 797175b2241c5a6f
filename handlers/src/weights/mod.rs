//! Where a model's bytes come from and where its units live.
//!
//! - [`files`]: [`ModelFiles`](files::ModelFiles), how a handler reads the files of its
//!   model archive.
//! - [`source`]: [`WeightSource`], safetensors mapped from disk (also from inside a
//!   zip-store archive) and served to candle's `VarBuilder`.
//! - [`guarded_map`]: [`guarded_map::GuardedMap`], a read-only file mapping that
//!   survives its file being truncated or rewritten underneath, and says so.
//! - [`huge_map`]: [`huge_map::HugeMap`], the file mapping under it, laid out so the
//!   kernel can map the page cache 2 MiB at a time.
//! - [`offload`]: the offload folder: converted weights written once, tensor by tensor.
//! - [`pickle`]: PyTorch state dicts (`.pth`) converted once to safetensors there.
//! - [`quantize`]: a float checkpoint's block matrices quantized once to GGML blocks
//!   there (in-situ quantization).
//! - [`layer_stack`]: [`layer_stack::LayerStack`], runs units where the plan put them;
//!   streams disk units from their memory map with read-ahead.

pub mod files;
pub mod guarded_map;
pub mod huge_map;
pub mod layer_stack;
pub mod offload;
pub mod pickle;
pub mod progress;
pub mod quantize;
pub mod source;

pub use source::{WeightSource, WeightSpan, WeightsWatch};
