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
/// `f` runs on a thread of a rayon pool of `threads` threads, named `name.0`, `name.1`,
/// ... while it runs (the name the OS shows, as in `top -H`); the calling thread waits
/// for it. Without MKL, candle's own matmul threads (its `gemm` backend reads
/// `RAYON_NUM_THREADS` once for the process) are not limited.
///
/// Pools outlive the workers that use them: when `f` returns, its pool is kept for the
/// next worker that asks for as many threads (at most as many pools as workers ever ran
/// at once). A new pool per worker leaked with MKL: every thread that starts an OpenMP
/// region is an OpenMP root with its own team, and libiomp5 kept each exited root's team
/// thread and memory, so scaling a model between one and two workers every few seconds
/// left one more `openmp_worker` thread and ~2 MiB more RSS per new worker, without end
/// (`bench/soak.py --clients minilm:4`).
pub fn with_threads<R: Send>(
    threads: usize,
    name: &str,
    f: impl FnOnce() -> R + Send,
) -> std::io::Result<R> {
    let threads = threads.max(1);
    let pool = idle_pools::take(threads)?;
    pool.broadcast(|context| os_thread_name::set(&format!("{name}.{}", context.index())));
    // A panic in `f` still hands the pool back (its threads are unharmed).
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.install(|| {
            team_size::limit_calling_thread(threads);
            f()
        })
    }));
    pool.broadcast(|context| os_thread_name::set(&format!("idle-compute.{}", context.index())));
    idle_pools::give_back(pool);
    Ok(result.unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
}

mod idle_pools {
    //! Compute pools no worker uses at present, for the next one.
    use std::sync::Mutex;

    static IDLE: Mutex<Vec<rayon::ThreadPool>> = Mutex::new(Vec::new());

    /// An idle pool of `threads` threads, or a new one.
    pub(super) fn take(threads: usize) -> std::io::Result<rayon::ThreadPool> {
        let mut idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = idle.iter().position(|p| p.current_num_threads() == threads) {
            return Ok(idle.swap_remove(at));
        }
        drop(idle);
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("idle-compute.{i}"))
            .build()
            .map_err(std::io::Error::other)
    }

    pub(super) fn give_back(pool: rayon::ThreadPool) {
        IDLE.lock().unwrap_or_else(|e| e.into_inner()).push(pool);
    }

    #[cfg(test)]
    pub(super) fn count(threads: usize) -> usize {
        let idle = IDLE.lock().unwrap_or_else(|e| e.into_inner());
        idle.iter()
            .filter(|p| p.current_num_threads() == threads)
            .count()
    }
}

#[allow(unsafe_code)] // FFI: the kernel's name for the calling thread.
mod os_thread_name {
    /// Sets the calling thread's name as the OS shows it (15 bytes at most on Linux;
    /// longer names are cut).
    pub(super) fn set(name: &str) {
        #[cfg(target_os = "linux")]
        {
            let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
            bytes.push(0);
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes,
            // which `bytes` is, and keeps no pointer to it.
            unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = name;
    }

    /// The calling thread's name as the OS shows it.
    #[cfg(all(test, target_os = "linux"))]
    pub(super) fn get() -> String {
        std::fs::read_to_string("/proc/thread-self/comm")
            .unwrap_or_default()
            .trim_end()
            .to_string()
    }
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
            (calling_thread_limit(), os_thread_name::get())
        })
        .expect("pool");
        assert_eq!(inside, 1);
        assert_eq!(name, "worker-test.0");
        assert_eq!(calling_thread_limit(), outside, "the caller keeps its team");
        let two = with_threads(2, "worker-test", calling_thread_limit).expect("pool");
        assert_eq!(two, 2);
    }

    #[test]
    fn a_later_worker_runs_on_the_threads_of_one_that_ended() {
        /// The pool's threads, seen from inside it.
        fn pool_threads() -> Vec<std::thread::ThreadId> {
            let mut ids = rayon::broadcast(|_| std::thread::current().id());
            ids.sort_by_key(|id| format!("{id:?}"));
            ids
        }
        // Five threads: no other test asks for as many, so the idle pool is this test's.
        let first = with_threads(5, "worker-a", pool_threads).expect("pool");
        assert_eq!(first.len(), 5);
        assert_eq!(idle_pools::count(5), 1, "kept when the worker ended");
        let (second, name) =
            with_threads(5, "worker-b", || (pool_threads(), os_thread_name::get())).expect("pool");
        assert_eq!(second, first, "the same threads, not new OpenMP roots");
        assert!(
            name.starts_with("worker-b."),
            "named for the worker using it now: {name}"
        );
        let inner = with_threads(5, "worker-c", || {
            with_threads(5, "worker-d", pool_threads).expect("pool")
        })
        .expect("pool");
        assert!(
            inner.iter().all(|id| !first.contains(id)),
            "workers running at once have a pool each"
        );
        assert_eq!(idle_pools::count(5), 2);
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
