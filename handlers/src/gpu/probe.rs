//! What the CUDA driver shows: each visible GPU's name, memory and compute capability, or
//! why there is none, in words a user can act on. The driver applies
//! `CUDA_VISIBLE_DEVICES` itself (ordinals here are the visible ones, as in PyTorch); this
//! module only names it when it is why no GPU shows.

use serde::Serialize;

/// Why a build without the `cuda` feature has no GPU.
pub const NOT_BUILT: &str = "this build has no CUDA support (build the GPU binary with \
                             scripts/build-cuda.sh)";

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// Its index among the visible GPUs (`cuda:N`).
    pub ordinal: usize,
    pub name: String,
    /// Bytes.
    pub total: u64,
    /// Bytes free now.
    pub free: u64,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (u32, u32),
}

/// The GPUs this process can use, or why it can use none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    Found(Vec<GpuInfo>),
    Unavailable(String),
}

impl Gpus {
    /// The GPUs found (none when unavailable).
    pub fn found(&self) -> &[GpuInfo] {
        match self {
            Gpus::Found(gpus) => gpus,
            Gpus::Unavailable(_) => &[],
        }
    }

    /// Why plans that put units on a GPU are refused, when they are.
    pub fn unavailable(&self) -> Option<&str> {
        match self {
            Gpus::Found(_) => None,
            Gpus::Unavailable(why) => Some(why),
        }
    }
}

/// Why the driver showing no GPU may be `CUDA_VISIBLE_DEVICES`' doing, when its value
/// (`visible`) hides every GPU: empty, or a list whose first entry is not a device (the
/// driver stops reading the list at the first invalid entry, so `-1` hides all).
pub fn hidden_by(visible: Option<&str>) -> Option<String> {
    let value = visible?;
    let first = value.split(',').next().unwrap_or("").trim();
    let names_a_device = !first.is_empty()
        && (first.chars().all(|c| c.is_ascii_digit())
            || first.starts_with("GPU-")
            || first.starts_with("MIG-"));
    (!names_a_device).then(|| {
        if value.trim().is_empty() {
            "CUDA_VISIBLE_DEVICES is set and empty, which hides every GPU".to_string()
        } else {
            format!(
                "CUDA_VISIBLE_DEVICES={value} hides every GPU (its first entry is not a device)"
            )
        }
    })
}

/// The sentence saying why no GPU is usable, from the driver's error (or count of zero)
/// and `CUDA_VISIBLE_DEVICES`.
pub fn explain(driver: &str, visible: Option<&str>) -> String {
    match hidden_by(visible) {
        Some(hidden) => format!("no GPU is visible: {hidden} (the CUDA driver said: {driver})"),
        None => format!(
            "no GPU is usable: the CUDA driver said: {driver} (is the NVIDIA driver installed \
             and a GPU attached to this machine or container?)"
        ),
    }
}

/// Asks the driver now: the static facts are read once, free memory every call.
#[cfg(feature = "cuda")]
pub fn probe() -> Gpus {
    use std::sync::OnceLock;
    static FOUND: OnceLock<Result<Vec<GpuInfo>, String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        driver::gpus().map_err(|driver| explain(&driver, visible.as_deref()))
    });
    match found {
        Err(why) => Gpus::Unavailable(why.clone()),
        Ok(gpus) => Gpus::Found(
            gpus.iter()
                .map(|gpu| GpuInfo {
                    free: driver::free_memory(gpu.ordinal).unwrap_or(gpu.free),
                    ..gpu.clone()
                })
                .collect(),
        ),
    }
}

/// Without the `cuda` feature: no GPU, and [`NOT_BUILT`] says why.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> Gpus {
    Gpus::Unavailable(NOT_BUILT.to_string())
}

#[cfg(feature = "cuda")]
mod driver {
    use super::GpuInfo;
    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    fn context(ordinal: usize) -> Result<std::sync::Arc<CudaContext>, String> {
        let device = crate::gpu::device(ordinal).map_err(|e| e.to_string())?;
        let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
        Ok(cuda.cuda_stream().context().clone())
    }

    /// Every visible GPU, or the driver's reason for none.
    pub fn gpus() -> Result<Vec<GpuInfo>, String> {
        let count = CudaContext::device_count().map_err(|e| e.to_string())?;
        if count <= 0 {
            return Err("it sees 0 devices".to_string());
        }
        (0..count as usize)
            .map(|ordinal| {
                let ctx = context(ordinal)?;
                let name = ctx.name().map_err(|e| e.to_string())?;
                let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
                let (free, total) = ctx.mem_get_info().map_err(|e| e.to_string())?;
                Ok(GpuInfo {
                    ordinal,
                    name,
                    total: total as u64,
                    free: free as u64,
                    compute_capability: (major.max(0) as u32, minor.max(0) as u32),
                })
            })
            .collect()
    }

    /// Free bytes on `cuda:ordinal` now (frees made on a stream show once it has synchronized).
    pub fn free_memory(ordinal: usize) -> Option<u64> {
        let ctx = context(ordinal).ok()?;
        ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_is_named_only_when_it_hides_every_gpu() {
        assert_eq!(hidden_by(None), None, "unset: the driver shows every GPU");
        assert_eq!(hidden_by(Some("0")), None);
        assert_eq!(hidden_by(Some("1,0")), None);
        assert_eq!(hidden_by(Some("GPU-8f3e1c2a")), None);
        assert_eq!(hidden_by(Some("MIG-4a1b")), None);
        let empty = hidden_by(Some("")).expect("empty hides all");
        assert!(empty.contains("empty"), "{empty}");
        let minus = hidden_by(Some("-1")).expect("-1 hides all");
        assert!(minus.contains("CUDA_VISIBLE_DEVICES=-1"), "{minus}");
        assert!(hidden_by(Some("none")).is_some());
        assert!(
            hidden_by(Some(" , 0")).is_some(),
            "an empty first entry ends the list"
        );
    }

    #[test]
    fn the_explanation_blames_the_environment_before_the_driver() {
        let hidden = explain("CUDA_ERROR_NO_DEVICE", Some("-1"));
        assert!(
            hidden.starts_with("no GPU is visible: CUDA_VISIBLE_DEVICES=-1"),
            "{hidden}"
        );
        assert!(hidden.contains("CUDA_ERROR_NO_DEVICE"), "{hidden}");
        let driver = explain("CUDA_ERROR_NO_DEVICE", Some("0"));
        assert!(driver.contains("NVIDIA driver installed"), "{driver}");
        assert!(driver.contains("CUDA_ERROR_NO_DEVICE"), "{driver}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_reports_no_gpu_and_how_to_get_one() {
        let gpus = probe();
        assert!(gpus.found().is_empty());
        assert!(
            gpus.unavailable()
                .is_some_and(|why| why.contains("scripts/build-cuda.sh")),
            "{gpus:?}"
        );
        let err = crate::gpu::device(0).expect_err("no cuda in this build");
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }
}
