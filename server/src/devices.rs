//! What this machine has, for the planner: free and total RAM (from /proc/meminfo) and
//! GPUs (none in a CPU build). The only place the server reads device memory.

use spillway_placement::Machine;

/// Reads the machine's memory now.
pub fn probe() -> Machine {
    let (available, total) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .map(|text| {
            (
                meminfo_kib(&text, "MemAvailable:"),
                meminfo_kib(&text, "MemTotal:"),
            )
        })
        .unwrap_or((None, None));
    Machine {
        gpus: Vec::new(),
        cpu_available: available.unwrap_or(0) * 1024,
        cpu_total: total.unwrap_or(0) * 1024,
    }
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
