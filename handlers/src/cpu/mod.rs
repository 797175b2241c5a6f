//! Compute on the CPU: Spillway's fused f32 kernels and the threads they run on.
//!
//! - [`kernels`]: the fused kernels on slices; [`fused_ops`] the same as candle
//!   operations on tensors.
//! - [`linear`]: `x · Wᵀ` for f32 on the CPU (weights packed once for MKL).
//! - [`conv`]: convolutions as one GEMM per image and per-channel affine maps (vision).
//! - [`quantized`]: products on GGML-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//!   kernels of its own; candle's block dot products for the k-quants).
//! - [`simd`]: runs a kernel's loop compiled for the CPU's widest vector extension.
//! - [`team`]: the thread team the fused kernels run their loops on (MKL's OpenMP team
//!   with `mkl`, rayon without).
//! - [`threads`]: how candle's CPU thread pools are set up (call at start-up).

pub mod conv;
pub mod fused_ops;
pub mod kernels;
#[allow(unsafe_code)] // FFI into MKL's packed GEMM (feature `mkl`).
pub mod linear;
pub mod quantized;
#[allow(unsafe_code)] // Calls code compiled for CPU features it has checked for.
pub mod simd;
#[allow(unsafe_code)] // FFI into the OpenMP runtime and disjoint chunks handed to threads.
pub mod team;
pub mod threads;
