//! How candle's CPU thread pools are set up in a Spillway process, and how many threads
//! one worker's compute may use ([`with_threads`]).
//!
//! With MKL three pools share the cores: MKL's OpenMP team (matmuls, and Spillway's fused
//! kernels, see [`crate::cpu::team`]), rayon (candle-nn's softmax and norms) and candle's own barrier pool
//! (element-wise ops). Each spins after its work, so on a small machine every candle
//! element-wise op after a matmul fights a spinning OpenMP thread for a core. Running
//! candle's element-wise ops on the calling thread removes that fight: SmolLM2's
//! 128-token prefill 168 ms instead of 213 ms, MiniLM batch 32 66.8–69.9 ms instead of
//! 71.0–72.0 ms, the rest unchanged (interleaved runs, docs/cpu-performance.md).

/// Candle's only knob for its element-wise pool, and the value Spillway runs with.
pub const ELEMENTWISE_THREADS: (&str, &str) = ("CANDLE_NUM_THREADS", "1");

/// Whether this process runs candle's element-wise ops on the calling thread (the
/// binary sets it in `main`; `.cargo/config.toml` sets it for tests and examples).
pub fn elementwise_ops_run_on_the_calling_thread() -> bool {
    std::env::var(ELEMENTWISE_THREADS.0).is_ok_and(|v| v == ELEMENTWISE_THREADS.1)
}

/// Sets `CANDLE_NUM_THREADS=1` (candle's element-wise pool = the calling thread) unless
/// the environment already sets it. The one environment write Spillway makes: candle
/// reads nothing else.
///
/// # Safety
///
/// Changes the process environment: call it first thing in `main`, before any other
/// thread exists (the contract of [`std::env::set_var`]).
#[allow(unsafe_code)]
pub unsafe fn run_elementwise_ops_on_the_calling_thread() {
    let (name, value) = ELEMENTWISE_THREADS;
    if std::env::var_os(name).is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var(name, value) };
    }
}

/// Runs `f` with at most `threads` threads for its model compute: MKL's OpenMP team
/// (matmuls and [`crate::cpu::team`]'s fused kernels, with the `mkl` feature) and rayon
/// (candle-nn's CPU ops, and the fused kernels without MKL) both get `threads`. Workers
/// of a model call it so that `n` workers on `n × threads` cores compute side by side
/// instead of each starting a team the size of the machine.
///
/// `f` runs on a thread of a fresh rayon pool of `threads` threads named `name`; the
/// calling thread waits for it. Without MKL, candle's own matmul threads (its `gemm`
/// backend reads `RAYON_NUM_THREADS` once for the process) are not limited.
pub fn with_threads<R: Send>(
    threads: usize,
    name: &str,
    f: impl FnOnce() -> R + Send,
) -> std::io::Result<R> {
    let threads = threads.max(1);
    let prefix = name.to_string();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{prefix}.{i}"))
        .build()
        .map_err(std::io::Error::other)?;
    Ok(pool.install(|| {
        team_size::limit_calling_thread(threads);
        f()
    }))
}

/// The most threads a parallel region started on the calling thread uses (rayon's in a
/// rayon pool; with MKL the OpenMP team's, which is never more than that).
pub fn calling_thread_limit() -> usize {
    team_size::limit().min(rayon::current_num_threads())
}

#[cfg(feature = "mkl")]
#[allow(unsafe_code)] // FFI into the OpenMP runtime and MKL's per-thread settings.
mod team_size {
    //! The calling thread's OpenMP team size (an ICV per OpenMP root thread) and MKL's
    //! thread-local thread count.
    use std::ffi::c_int;

    unsafe extern "C" {
        fn omp_set_num_threads(threads: c_int);
        fn omp_get_max_threads() -> c_int;
        /// The C entry point (by value); the lowercase symbol is the Fortran one (by reference).
        fn MKL_Set_Num_Threads_Local(threads: c_int) -> c_int;
    }

    pub(super) fn limit_calling_thread(threads: usize) {
        let threads = c_int::try_from(threads).unwrap_or(c_int::MAX);
        // SAFETY: both set per-thread settings and take any positive count.
        unsafe {
            omp_set_num_threads(threads);
            MKL_Set_Num_Threads_Local(threads);
        }
    }

    pub(super) fn limit() -> usize {
        // SAFETY: reads the calling thread's setting.
        usize::try_from(unsafe { omp_get_max_threads() }).unwrap_or(1)
    }
}

#[cfg(not(feature = "mkl"))]
mod team_size {
    //! Without MKL the rayon pool is the whole team.
    pub(super) fn limit_calling_thread(_threads: usize) {}

    pub(super) fn limit() -> usize {
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_inside_is_limited_and_the_caller_is_not() {
        let outside = calling_thread_limit();
        let (inside, name) = with_threads(1, "worker-test", || {
            (
                calling_thread_limit(),
                std::thread::current().name().map(str::to_string),
            )
        })
        .expect("pool");
        assert_eq!(inside, 1);
        assert_eq!(name.as_deref(), Some("worker-test.0"));
        assert_eq!(calling_thread_limit(), outside, "the caller keeps its team");
        let two = with_threads(2, "worker-test", calling_thread_limit).expect("pool");
        assert_eq!(two, 2);
    }

    #[test]
    fn fused_kernels_inside_use_only_the_pool() {
        // Tasks on a one-thread team all run on the thread that started them.
        let threads = with_threads(1, "worker-one", || {
            let seen = std::sync::Mutex::new(std::collections::HashSet::new());
            crate::cpu::team::for_each_task(64, &|_| {
                seen.lock()
                    .expect("lock")
                    .insert(format!("{:?}", std::thread::current().id()));
            });
            seen.into_inner().expect("lock").len()
        })
        .expect("pool");
        assert_eq!(threads, 1);
    }
}
