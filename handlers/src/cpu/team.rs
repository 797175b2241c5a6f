//! The thread team Spillway's fused CPU kernels run their parallel loops on.
//!
//! With the `mkl` feature that is MKL's own OpenMP team (libiomp5's `GOMP_parallel`), so
//! a transformer block's matmuls and the fused kernels between them take turns on one set
//! of threads. With a separate pool (rayon) the OpenMP threads kept spinning for the next
//! matmul while rayon's threads ran the kernels: on 2 cores `kmp_flag_64::wait` was 14 %
//! of MiniLM's batch-32 profile (docs/cpu-performance.md). Without MKL there is no
//! OpenMP team and rayon is the team.

/// Runs `task(0..tasks)` in parallel on the team, each index exactly once, and returns
/// when all are done. A panic in a task is re-raised on the calling thread afterwards.
pub fn for_each_task(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    match tasks {
        0 => {}
        1 => task(0),
        _ => backend::run(tasks, task),
    }
}

/// Splits `data` into consecutive chunks of `chunk` elements (the last may be shorter)
/// and runs `f(index, chunk)` for each in parallel on the team.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let base = SharedMut(data.as_mut_ptr());
    let base = &base;
    for_each_task(len.div_ceil(chunk), &|index| {
        let start = index * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: each index is run exactly once and the ranges [start, end) of distinct
        // indices are disjoint and inside `data`, which stays mutably borrowed (so not
        // otherwise accessed) until every task has returned.
        let slice = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(index, slice)
    });
}

/// A pointer into a slice whose disjoint parts are handed to different threads.
struct SharedMut<T>(*mut T);
// SAFETY: only used by `for_each_chunk_mut`, whose tasks touch disjoint ranges.
unsafe impl<T: Send> Sync for SharedMut<T> {}

#[cfg(feature = "mkl")]
mod backend {
    //! The OpenMP team, through the GNU-compatible entry point libiomp5 exports.
    use std::ffi::{c_uint, c_void};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // Named here too (intel-mkl-src links it for MKL's own use), so that a binary whose
    // only OpenMP caller is this module still finds the symbol, wherever the linker
    // puts the archive.
    #[link(name = "iomp5", kind = "static", modifiers = "-bundle")]
    unsafe extern "C" {
        /// Runs `f(data)` on every thread of a new parallel region (0 = the default
        /// team size) and returns when all have finished.
        fn GOMP_parallel(
            f: extern "C" fn(*mut c_void),
            data: *mut c_void,
            num_threads: c_uint,
            flags: c_uint,
        );
    }

    struct Job<'a> {
        tasks: usize,
        next: AtomicUsize,
        task: &'a (dyn Fn(usize) + Sync),
        panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    }

    /// Each thread of the region takes the next unclaimed index until none is left.
    extern "C" fn work(data: *mut c_void) {
        // SAFETY: `run` passes a pointer to a `Job` that outlives the parallel region.
        let job = unsafe { &*(data as *const Job<'_>) };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            loop {
                let index = job.next.fetch_add(1, Ordering::Relaxed);
                if index >= job.tasks {
                    break;
                }
                (job.task)(index);
            }
        }));
        if let Err(payload) = outcome {
            // Stop the others from starting new tasks; keep the first panic.
            job.next.store(job.tasks, Ordering::Relaxed);
            let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
        }
    }

    pub(super) fn run(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            tasks,
            next: AtomicUsize::new(0),
            task,
            panic: Mutex::new(None),
        };
        // SAFETY: `work` only reads `job` through a shared reference, `job` lives until
        // GOMP_parallel returns (after every thread of the region is done), and no panic
        // crosses the C boundary (`work` catches them).
        unsafe { GOMP_parallel(work, &job as *const Job<'_> as *mut c_void, 0, 0) };
        if let Some(payload) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(payload);
        }
    }
}

#[cfg(not(feature = "mkl"))]
mod backend {
    //! rayon's global pool.
    use rayon::prelude::*;

    pub(super) fn run(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_exactly_once() {
        for tasks in [0, 1, 2, 7, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each_task(tasks, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_cover_the_slice_with_their_indices() {
        let mut data = vec![0usize; 1003];
        for_each_chunk_mut(&mut data, 10, |index, chunk| {
            assert!(chunk.len() == 10 || (index == 100 && chunk.len() == 3));
            for (offset, v) in chunk.iter_mut().enumerate() {
                *v += index * 10 + offset + 1;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &v)| v == i + 1));
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_keeps_working() {
        let outcome = std::panic::catch_unwind(|| {
            for_each_task(64, &|i| assert!(i != 17, "task 17 fails"));
        });
        assert!(outcome.is_err());
        let done = AtomicUsize::new(0);
        for_each_task(64, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }
}
