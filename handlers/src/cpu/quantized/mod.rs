//! Matrix products on GGML-quantized weights, computed on the quantized bytes.
//!
//! - [`weights`]: the block formats with Spillway's own kernels (Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q8_0) and a weight row expanded for them.
//! - [`activations`]: activation rows quantized to 8 bits per block, as llama.cpp does.
//! - [`dot`]: the integer dot products (AVX-512 VNNI, AVX2, portable), chosen at run time.
//! - [`dequantize`]: weight rows back to f32, for the prompt path's GEMM on tiles.
//! - [`panel`]: the prompt path in integers: weight tiles unpacked into 8-bit panels and
//!   an AVX-512 VNNI micro-kernel (the f32 tiles where the CPU lacks it).
//! - [`matmul`]: [`QuantizedMatrix`], a linear layer's weight in blocks, its products
//!   shared out to the thread team (candle's block dot products for the k-quants).

#[allow(unsafe_code)] // Vector intrinsics on blocks whose lengths are checked first.
pub mod activations;
#[allow(unsafe_code)] // Calls into code compiled for the CPU's vector extensions, once detected.
pub mod dequantize;
#[allow(unsafe_code)] // Vector intrinsics on slices whose lengths are checked first.
pub mod dot;
pub mod matmul;
#[allow(unsafe_code)] // Vector intrinsics over panels whose sizes are checked first.
pub mod panel;
pub mod weights;

pub use matmul::{GEMM_ROWS, QuantizedMatrix, WeightBytes};
