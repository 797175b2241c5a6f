//! What this machine has, for the planner: free and total RAM (from /proc/meminfo) and
//! the GPUs the CUDA driver shows (none in a CPU build; [`gpus`] says why). The only place
//! the server reads device memory.
//!
//! - [`manager`]: the device manager — the pools' budgets and the allocation map (who
//!   holds which bytes, loading or not, last used), admission through the policy.
//! - the pure least-recently-used policy the manager applies is
//!   `spillway_placement::ledger`.
//! - [`placement`]: a model's tensor inventory from its headers, planned on the pools.

pub mod manager;
pub mod placement;

use spillway_placement::Machine;

/// Reads the machine's memory now.
pub fn probe() -> Machine {
    let memory = host_memory();
    Machine {
        gpus: gpu_memory(&gpus()),
        cpu_available: memory.map_or(0, |m| m.available_bytes),
        cpu_total: memory.map_or(0, |m| m.total_bytes),
        cpu_reserve: None,
    }
}

/// The GPUs this process can use now, or why none.
pub fn gpus() -> spillway_handlers::gpu::Gpus {
    spillway_handlers::gpu::probe()
}

/// What the planner needs of each GPU: its memory.
fn gpu_memory(gpus: &spillway_handlers::gpu::Gpus) -> Vec<spillway_placement::GpuMemory> {
    gpus.found()
        .iter()
        .map(|g| spillway_placement::GpuMemory {
            ordinal: g.ordinal,
            free: g.free,
            total: g.total,
        })
        .collect()
}

/// Says once, at start, which GPUs serve, or why plans that put units on a GPU are refused.
pub fn log_gpus() {
    match gpus() {
        spillway_handlers::gpu::Gpus::Found(found) => {
            for g in found {
                tracing::info!(
                    "GPU cuda:{}: {}, compute capability {}.{}, {:.1} GiB of {:.1} GiB free",
                    g.ordinal,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.free as f64 / (1u64 << 30) as f64,
                    g.total as f64 / (1u64 << 30) as f64
                );
            }
        }
        spillway_handlers::gpu::Gpus::Unavailable(why) => tracing::info!(
            "models run on the CPU and disk only; plans that put units on a GPU are refused: {why}"
        ),
    }
}

/// Builds weights with `build` so that freeing them later gives their memory back to
/// the OS at once. glibc serves a large allocation from its heap once its dynamic mmap
/// threshold has grown past it (up to 32 MiB), and heap memory freed in a thread's
/// arena is not always returned, even by `malloc_trim`: an evicted MiniLM's 117 MiB
/// then stayed in RSS while the model that needed the room was built (peak 1,052 MiB
/// under a 950 MiB budget in 4 of 5 runs; with every weight mmapped, 902–905 MiB).
/// While any model is being built, allocations from 64 KiB up are mmapped; outside,
/// the threshold is 32 MiB — glibc's own steady state, so inference allocates as fast
/// as before (a fixed 1 MiB threshold cost MiniLM batches of 32 a quarter more time).
pub fn building_weights<T>(build: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static BUILDING: AtomicUsize = AtomicUsize::new(0);
    static SETTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    /// Sets glibc's mmap threshold as the number of builds in progress says.
    fn settle() {
        let _one_at_a_time = SETTING.lock().unwrap_or_else(|e| e.into_inner());
        let threshold = if BUILDING.load(Ordering::SeqCst) > 0 {
            64 << 10
        } else {
            32 << 20
        };
        set_mmap_threshold(threshold);
    }
    struct Building;
    impl Drop for Building {
        fn drop(&mut self) {
            BUILDING.fetch_sub(1, Ordering::SeqCst);
            settle();
        }
    }
    BUILDING.fetch_add(1, Ordering::SeqCst);
    settle();
    let _building = Building;
    build()
}

/// Sets glibc's mmap threshold, and its trim threshold to twice that: where glibc's
/// own dynamic adjustment would put it (setting one by hand turns the adjustment off,
/// and a heap trimmed at the default 128 KiB would hand activations back to the OS
/// and fault them in again at every step).
#[allow(unsafe_code)]
fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; it changes malloc tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes.saturating_mul(2));
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Hands memory freed with a model's weights back to the OS. glibc keeps freed heap
/// memory in its per-thread arenas (and, past its dynamic mmap threshold, serves large
/// buffers from them): without this, every evict-and-reload cycle left the freed
/// weights counted in the process's RSS — MiniLM under a budget for two copies grew by
/// ~30 MiB per reload (bench/devices.py). Called after a model's weights are dropped.
#[allow(unsafe_code)]
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The host's RAM from /proc/meminfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// The host's RAM now (`None` where /proc/meminfo cannot be read).
pub fn host_memory() -> Option<HostMemory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(HostMemory {
        total_bytes: meminfo_kib(&text, "MemTotal:")? * 1024,
        available_bytes: meminfo_kib(&text, "MemAvailable:")? * 1024,
    })
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(key))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_meminfo_lines() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(super::meminfo_kib(text, "MemTotal:"), Some(24_576_000));
        assert_eq!(super::meminfo_kib(text, "MemAvailable:"), Some(20_000_000));
        assert_eq!(super::meminfo_kib(text, "Nope:"), None);
    }
}
