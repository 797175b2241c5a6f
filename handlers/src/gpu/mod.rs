//! GPUs: which ones the driver shows ([`probe`]), the candle device a unit planned on
//! `cuda:N` runs on ([`device`]), and moving weights from a host mapping onto one
//! ([`staging`]). Built without the `cuda` feature, the same functions say why there is
//! no GPU, so no caller needs a `cfg` of its own.

pub mod probe;
pub mod staging;

pub use probe::{GpuInfo, Gpus, probe};

use candle_core::Device;

use crate::HandlerError;

/// The candle device for `cuda:ordinal`. There is one per GPU for the whole process, on a
/// stream of its own (not CUDA's per-thread default stream, which would give each worker
/// thread a different one). Units of any model on the same GPU are therefore on the same
/// device: activations pass between them without a copy, and their work is ordered on one
/// stream.
#[cfg(feature = "cuda")]
pub fn device(ordinal: usize) -> Result<Device, HandlerError> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    static DEVICES: Mutex<BTreeMap<usize, Device>> = Mutex::new(BTreeMap::new());
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(device) = devices.get(&ordinal) {
        return Ok(device.clone());
    }
    let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
        // The driver's words, without the backtrace candle may attach.
        let e = e.to_string();
        let driver = e.lines().next().unwrap_or_default();
        HandlerError::Unsupported(format!("cuda:{ordinal} cannot be used: {driver}"))
    })?;
    devices.insert(ordinal, device.clone());
    Ok(device)
}

/// Without the `cuda` feature there is no GPU device; the error says how to get one.
#[cfg(not(feature = "cuda"))]
pub fn device(ordinal: usize) -> Result<Device, HandlerError> {
    Err(HandlerError::Unsupported(format!(
        "cuda:{ordinal} cannot be used: {}",
        probe::NOT_BUILT
    )))
}
