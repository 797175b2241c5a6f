//! How candle's CPU thread pools are set up in a Spillway process.
//!
//! With MKL three pools share the cores: MKL's OpenMP team (matmuls, and Spillway's fused
//! kernels, see [`crate::cpu_team`]), rayon (candle-nn's softmax and norms) and candle's own barrier pool
//! (element-wise ops). Each spins after its work, so on a small machine every candle
//! element-wise op after a matmul fights a spinning OpenMP thread for a core. Running
//! candle's element-wise ops on the calling thread removes that fight: SmolLM2's
//! 128-token prefill 168 ms instead of 213 ms, MiniLM batch 32 66.8–69.9 ms instead of
//! 71.0–72.0 ms, the rest unchanged (interleaved runs, docs/cpu-performance.md).

/// Sets `CANDLE_NUM_THREADS=1` (candle's element-wise pool = the calling thread) unless
/// the environment already sets it.
///
/// # Safety
///
/// Changes the process environment: call it first thing in `main`, before any other
/// thread exists (the contract of [`std::env::set_var`]).
#[allow(unsafe_code)]
pub unsafe fn run_elementwise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}
