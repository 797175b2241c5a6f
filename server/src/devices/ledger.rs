//! [`DeviceLedger`]: the bytes each loaded or loading model holds per device, as
//! [`Lease`]s. A lease is taken when a model is planned and dropped when its workers
//! have been joined and its weights freed, so the ledger always says what is really in
//! use. Planning and reserving happen under one lock ([`DeviceLedger::plan_and_reserve`]):
//! the planner sees the probed free memory less what loads still in progress have been
//! promised (a loaded model's bytes are already missing from the probe), so two models
//! planned at once never both count the same free bytes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use spillway_placement::{Device, DeviceType, Machine, Plan};

/// Bytes per device.
pub type DeviceBytes = BTreeMap<Device, u64>;

#[derive(Debug, Default)]
struct Entries {
    next_id: u64,
    /// Lease id → (bytes per device, still loading).
    leases: BTreeMap<u64, (DeviceBytes, Arc<AtomicBool>)>,
}

/// Leases on device memory, shared by the loader and the models.
#[derive(Debug, Clone, Default)]
pub struct DeviceLedger {
    entries: Arc<Mutex<Entries>>,
}

/// A model's hold on its bytes. Dropping it releases them.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    bytes: DeviceBytes,
    pending: Arc<AtomicBool>,
    ledger: DeviceLedger,
}

impl DeviceLedger {
    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plans with `plan` on `probed` less the bytes of loads in progress, and leases
    /// what the plan places, in one step.
    pub fn plan_and_reserve<E>(
        &self,
        probed: Machine,
        plan: impl FnOnce(&Machine) -> Result<Plan, E>,
    ) -> Result<(Plan, Lease), E> {
        let mut entries = self.entries();
        let pending: Vec<&DeviceBytes> = entries
            .leases
            .values()
            .filter(|(_, pending)| pending.load(Ordering::SeqCst))
            .map(|(bytes, _)| bytes)
            .collect();
        let machine = less_pending(probed, &pending);
        let plan = plan(&machine)?;
        let bytes = held_by(&plan);
        let id = entries.next_id;
        entries.next_id += 1;
        let pending = Arc::new(AtomicBool::new(true));
        entries.leases.insert(id, (bytes.clone(), pending.clone()));
        Ok((
            plan,
            Lease {
                id,
                bytes,
                pending,
                ledger: self.clone(),
            },
        ))
    }

    /// What every lease holds now, per device.
    pub fn held(&self) -> DeviceBytes {
        let mut total = DeviceBytes::new();
        for (bytes, _) in self.entries().leases.values() {
            for (device, n) in bytes {
                *total.entry(*device).or_default() += n;
            }
        }
        total
    }
}

impl Lease {
    /// The model's weights are in memory now, where the probe sees them.
    pub fn settle(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    pub fn bytes(&self) -> &DeviceBytes {
        &self.bytes
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ledger.entries().leases.remove(&self.id);
    }
}

/// The bytes a plan holds in memory: weights and reserve on the CPU and each GPU (disk
/// units hold only their mapping).
pub fn held_by(plan: &Plan) -> DeviceBytes {
    plan.devices
        .iter()
        .filter(|usage| usage.device.kind != DeviceType::Disk)
        .map(|usage| (usage.device, usage.weights + usage.reserve))
        .filter(|(_, bytes)| *bytes > 0)
        .collect()
}

/// `machine` with `pending` bytes taken from each device's free memory.
pub fn less_pending(mut machine: Machine, pending: &[&DeviceBytes]) -> Machine {
    for bytes in pending {
        for (device, n) in bytes.iter() {
            match device.kind {
                DeviceType::Cpu => machine.cpu_available = machine.cpu_available.saturating_sub(*n),
                DeviceType::Cuda => {
                    if let Some(gpu) = machine
                        .gpus
                        .iter_mut()
                        .find(|g| g.ordinal == device.ordinal)
                    {
                        gpu.free = gpu.free.saturating_sub(*n);
                    }
                }
                DeviceType::Disk | DeviceType::Metal => {}
            }
        }
    }
    machine
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpu: u64) -> Machine {
        Machine {
            gpus: Vec::new(),
            cpu_available: cpu,
            cpu_total: cpu,
        }
    }

    /// A plan that puts `bytes` of weights on the CPU, or fails when they do not fit.
    fn plan_of(bytes: u64) -> impl FnOnce(&Machine) -> Result<Plan, String> {
        move |machine: &Machine| {
            if bytes > machine.cpu_available {
                return Err(format!("{bytes} > {}", machine.cpu_available));
            }
            Ok(Plan {
                strategy: "cpu".into(),
                units: Vec::new(),
                devices: vec![spillway_placement::DeviceUsage {
                    device: Device::CPU,
                    budget: None,
                    reserve: 0,
                    weights: bytes,
                }],
                stream_device: Device::CPU,
                streamed_bytes_per_forward: 0,
                notes: Vec::new(),
            })
        }
    }

    #[test]
    fn a_load_in_progress_is_not_counted_twice_and_a_dropped_lease_frees_its_bytes() {
        let ledger = DeviceLedger::default();
        let (_, first) = ledger
            .plan_and_reserve(machine(100), plan_of(60))
            .expect("fits");
        assert_eq!(ledger.held()[&Device::CPU], 60);
        // The probe still says 100 free: the first model has not allocated yet.
        assert!(
            ledger.plan_and_reserve(machine(100), plan_of(60)).is_err(),
            "the second plan sees 40 bytes, not 100"
        );
        let (_, second) = ledger
            .plan_and_reserve(machine(100), plan_of(40))
            .expect("fits");
        // Once loaded, the first model's bytes are missing from the probe itself.
        first.settle();
        assert!(ledger.plan_and_reserve(machine(40), plan_of(40)).is_err());
        second.settle();
        let (_, third) = ledger
            .plan_and_reserve(machine(40), plan_of(40))
            .expect("fits");
        drop(third);
        drop(first);
        assert_eq!(
            ledger.held()[&Device::CPU],
            40,
            "only the second lease is left"
        );
        drop(second);
        assert!(ledger.held().is_empty());
    }

    #[test]
    fn pending_bytes_come_off_the_device_they_are_on() {
        let probed = Machine {
            gpus: vec![spillway_placement::GpuMemory {
                ordinal: 1,
                free: 1000,
                total: 2000,
            }],
            cpu_available: 500,
            cpu_total: 800,
        };
        let pending: DeviceBytes = [
            (Device::CPU, 100),
            (
                Device {
                    kind: DeviceType::Cuda,
                    ordinal: 1,
                },
                300,
            ),
            (Device::DISK, 7),
        ]
        .into_iter()
        .collect();
        let less = less_pending(probed, &[&pending]);
        assert_eq!(less.cpu_available, 400);
        assert_eq!(less.gpus[0].free, 700);
        assert_eq!(less.cpu_total, 800, "totals stay");
    }
}
