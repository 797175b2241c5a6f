//! Budgets: how many bytes each device may hold, from `max_memory` and what the machine
//! reports free. Absent entries default to the free memory less a reserve (the larger of
//! 2% of the device and 512 MiB, as mistral.rs keeps); given entries are capped at what is
//! free (the machine cannot lend more); disk is unlimited unless `max_memory["disk"]`
//! says otherwise.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{ByteSize, Device, DeviceType, PlanError};

/// One GPU as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GpuMemory {
    pub ordinal: usize,
    pub free: u64,
    pub total: u64,
}

/// What the machine has now. Gathered by the caller (the planner does no I/O).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub gpus: Vec<GpuMemory>,
    pub cpu_available: u64,
    pub cpu_total: u64,
    /// Bytes kept free on the CPU when `max_memory` gives it no budget; `None`: the
    /// default reserve ([`default_reserve`]). A device manager that hands over a budget
    /// of its own already kept its margin, so it passes `Some(0)`.
    pub cpu_reserve: Option<u64>,
}

/// `max_memory` as parsed: device → bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaxMemory {
    pub limits: BTreeMap<Device, ByteSize>,
    /// Values that ended in a lowercase `b` and were read as bits (worth a warning).
    pub read_as_bits: Vec<String>,
}

impl MaxMemory {
    /// Reads accelerate's `max_memory` object: keys "0", "cuda:0", "cpu", "disk"; values
    /// integers (bytes) or strings ("10GiB").
    pub fn from_json(value: &serde_json::Value) -> Result<Self, PlanError> {
        let object = value.as_object().ok_or_else(|| {
            PlanError::BadDeviceMap(format!("max_memory must be an object, found {value}"))
        })?;
        let mut out = MaxMemory::default();
        for (key, v) in object {
            let device = parse_memory_key(key)?;
            let size = match v {
                serde_json::Value::Number(n) => {
                    ByteSize(n.as_u64().ok_or_else(|| PlanError::BadByteSize {
                        given: n.to_string(),
                    })?)
                }
                serde_json::Value::String(s) => {
                    let parsed = ByteSize::parse(s)?;
                    if parsed.read_as_bits {
                        out.read_as_bits.push(format!("{key}: {s}"));
                    }
                    parsed.bytes
                }
                other => {
                    return Err(PlanError::BadByteSize {
                        given: other.to_string(),
                    });
                }
            };
            out.limits.insert(device, size);
        }
        Ok(out)
    }
}

fn parse_memory_key(key: &str) -> Result<Device, PlanError> {
    let bad = || PlanError::BadMemoryKey {
        given: key.to_string(),
    };
    if let Ok(ordinal) = key.trim().parse::<usize>() {
        return Ok(Device::cuda(ordinal));
    }
    let device: Device = key.parse().map_err(|_| bad())?;
    if device.kind == DeviceType::Metal {
        return Err(bad());
    }
    Ok(device)
}

/// The reserve kept free on a device whose budget was not given.
pub fn default_reserve(total: u64) -> u64 {
    (total / 50).max(512 * ByteSize::MIB)
}

/// How much one device may hold. `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceBudget {
    pub device: Device,
    #[serde(rename = "budget")]
    pub bytes: Option<u64>,
}

/// Budgets of every device in chain order (GPUs, CPU, disk), with notes on how they
/// were chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budgets {
    pub devices: Vec<DeviceBudget>,
    pub notes: Vec<String>,
}

impl Budgets {
    pub fn of(&self, device: Device) -> Option<Option<u64>> {
        self.devices
            .iter()
            .find(|b| b.device == device)
            .map(|b| b.bytes)
    }

    pub fn gpus(&self) -> impl Iterator<Item = &DeviceBudget> {
        self.devices.iter().filter(|b| b.device.is_gpu())
    }

    /// Budgets for `machine` under `max_memory`.
    pub fn new(machine: &Machine, max_memory: &MaxMemory) -> Result<Self, PlanError> {
        let mut notes = Vec::new();
        let available: Vec<String> = machine
            .gpus
            .iter()
            .map(|g| Device::cuda(g.ordinal).to_string())
            .chain(["cpu".to_string(), "disk".to_string()])
            .collect();
        for device in max_memory.limits.keys() {
            if device.is_gpu()
                && !machine
                    .gpus
                    .iter()
                    .any(|g| Device::cuda(g.ordinal) == *device)
            {
                return Err(PlanError::Unavailable {
                    device: device.to_string(),
                    available,
                });
            }
        }
        for bits in &max_memory.read_as_bits {
            notes.push(format!(
                "max_memory {bits} ends in a lowercase b and was read as bits, as accelerate does"
            ));
        }
        let mut budget = |device: Device, free: u64, total: u64, reserve: Option<u64>| -> u64 {
            let default = free.saturating_sub(reserve.unwrap_or_else(|| default_reserve(total)));
            match max_memory.limits.get(&device) {
                None => default,
                Some(given) if given.0 > free => {
                    notes.push(format!(
                        "max_memory for {device} ({given}) is more than is free ({}); using what is free",
                        ByteSize(free)
                    ));
                    free
                }
                Some(given) => given.0,
            }
        };
        let mut devices: Vec<DeviceBudget> = machine
            .gpus
            .iter()
            .map(|g| {
                let device = Device::cuda(g.ordinal);
                DeviceBudget {
                    device,
                    bytes: Some(budget(device, g.free, g.total, None)),
                }
            })
            .collect();
        devices.push(DeviceBudget {
            device: Device::CPU,
            bytes: Some(budget(
                Device::CPU,
                machine.cpu_available,
                machine.cpu_total,
                machine.cpu_reserve,
            )),
        });
        devices.push(DeviceBudget {
            device: Device::DISK,
            bytes: max_memory.limits.get(&Device::DISK).map(|b| b.0),
        });
        Ok(Budgets { devices, notes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn machine() -> Machine {
        Machine {
            gpus: vec![
                GpuMemory {
                    ordinal: 0,
                    free: 78 * GIB,
                    total: 80 * GIB,
                },
                GpuMemory {
                    ordinal: 1,
                    free: 10 * GIB,
                    total: 16 * GIB,
                },
            ],
            cpu_available: 20 * GIB,
            cpu_total: 24 * GIB,
            cpu_reserve: None,
        }
    }

    #[test]
    fn given_limits_apply_and_absent_ones_default_to_free_less_a_reserve() {
        let max =
            MaxMemory::from_json(&serde_json::json!({"0": "10GiB", "cpu": 1000})).expect("parse");
        let b = Budgets::new(&machine(), &max).expect("budgets");
        assert_eq!(b.of(Device::cuda(0)), Some(Some(10 * GIB)));
        // GPU 1: 10 GiB free less max(2% of 16 GiB, 512 MiB) = 512 MiB.
        assert_eq!(
            b.of(Device::cuda(1)),
            Some(Some(10 * GIB - 512 * ByteSize::MIB))
        );
        assert_eq!(b.of(Device::CPU), Some(Some(1000)));
        assert_eq!(b.of(Device::DISK), Some(None));
        // On an 80 GiB GPU, 2% is more than 512 MiB.
        let b = Budgets::new(&machine(), &MaxMemory::default()).expect("budgets");
        assert_eq!(b.of(Device::cuda(0)), Some(Some(78 * GIB - 80 * GIB / 50)));
    }

    #[test]
    fn limits_beyond_what_is_free_are_capped_with_a_note() {
        let max = MaxMemory::from_json(&serde_json::json!({"cuda:1": "30GiB", "disk": "1GB"}))
            .expect("parse");
        let b = Budgets::new(&machine(), &max).expect("budgets");
        assert_eq!(b.of(Device::cuda(1)), Some(Some(10 * GIB)));
        assert_eq!(b.of(Device::DISK), Some(Some(1_000_000_000)));
        assert!(
            b.notes.iter().any(|n| n.contains("cuda:1")),
            "{:?}",
            b.notes
        );
    }

    #[test]
    fn bad_keys_missing_gpus_and_bits_are_reported() {
        assert!(MaxMemory::from_json(&serde_json::json!({"mps": "1GiB"})).is_err());
        assert!(MaxMemory::from_json(&serde_json::json!({"cpu": "lots"})).is_err());
        let max = MaxMemory::from_json(&serde_json::json!({"5": "1GiB"})).expect("parse");
        let err = Budgets::new(&machine(), &max).expect_err("no GPU 5");
        assert!(
            err.to_string().contains("cuda:5") && err.to_string().contains("cuda:1"),
            "{err}"
        );
        let max = MaxMemory::from_json(&serde_json::json!({"cpu": "80Gb"})).expect("parse");
        assert_eq!(max.limits[&Device::CPU], ByteSize(10_000_000_000));
        let b = Budgets::new(&machine(), &max).expect("budgets");
        assert!(b.notes.iter().any(|n| n.contains("bits")));
    }
}
