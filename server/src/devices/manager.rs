//! [`DeviceManager`]: the one owner of the managed devices' memory. It keeps the
//! allocation map — which model version holds how many bytes on which device (a
//! [`Lease`], the plan's weights and reserve), whether it is still loading, and when it
//! was last used — and admits a model by planning it within the pools' budgets and
//! asking the pure policy (`spillway_placement::ledger`) which least recently used
//! models must leave for it to fit. Carrying out an eviction is the lifecycle's job
//! (`lifecycle::supervisor`).
//!
//! Planning, deciding and leasing happen under one lock, so two loads never both count
//! the same free bytes. An [`Admission`] is a transaction: the bytes it promises (its own
//! lease, and the victims' bytes counted as leaving) stand from the moment it is made;
//! dropped before its evictions are carried out, it gives every victim its bytes back. A
//! lease is dropped when its model's workers have been joined and its weights freed, so
//! the map always says what is really in use. Leases have ids unique per loaded
//! instance: two instances of one model version (a replacement loading beside the old
//! one) never share or zero each other's entry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::{DeviceSettings, OffloadStrategy};
use spillway_placement::{Device, DeviceRequest, DeviceType, GpuMemory, Machine, Plan};

pub use spillway_placement::ledger::DeviceBytes;
use spillway_placement::ledger::{
    self as policy, AllocationMap, Eviction, Holding, ModelKey, Refusal,
};

/// How the manager is set up (config.properties / `SPILLWAY_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// The host RAM pool's budget.
    pub host_budget: u64,
    /// Whether the operator gave that budget (`max_host_memory`): then all of it is the
    /// models', and the planner keeps no reserve of its own out of it.
    pub host_budget_given: bool,
    /// The managed GPUs and their budgets.
    pub gpus: Vec<GpuMemory>,
    /// Whether models may share a GPU (host RAM always packs).
    pub pack_gpus: bool,
    /// Whether an eviction moves a model's units to disk (`disk`, `cpu`) rather than
    /// unloading it (`restart`): then it frees only what its resident units held.
    pub evicts_to_disk: bool,
}

impl ManagerConfig {
    /// The pools the operator's settings give on a machine whose memory `probed` says.
    pub fn from_settings(settings: &DeviceSettings, probed: &Machine) -> Self {
        let gpus = probed
            .gpus
            .iter()
            .filter(|g| {
                settings
                    .managed_gpus
                    .as_ref()
                    .is_none_or(|managed| managed.contains(&g.ordinal))
            })
            .cloned()
            .collect();
        ManagerConfig {
            host_budget: settings.max_host_memory.unwrap_or(probed.cpu_available),
            host_budget_given: settings.max_host_memory.is_some(),
            gpus,
            pack_gpus: settings.allow_multiple_per_device,
            evicts_to_disk: settings.offload_strategy != OffloadStrategy::Restart,
        }
    }
}

#[derive(Debug)]
struct Entry {
    model: ModelKey,
    bytes: DeviceBytes,
    /// Still loading: not yet where the probe sees it, and never evicted.
    loading: Arc<AtomicBool>,
    last_used: Arc<AtomicU64>,
    last_used_at: Arc<Mutex<SystemTime>>,
    /// What it would hold with its units moved to disk (evictions to disk only).
    after_demotion: Option<DeviceBytes>,
    /// Its units are on disk already: evicting it again unloads it.
    demoted: Arc<AtomicBool>,
}

impl Entry {
    /// Counts the eviction decided for it at once: what it will still hold afterwards
    /// (nothing when unloaded; its streaming room when its units go to disk). The bytes
    /// leave the map the moment they are promised to another model, so no pool's `used`
    /// ever passes its budget, while memory itself is taken only after they have left
    /// (the loader evicts, waiting, before it builds).
    fn evicting(&mut self, unload: bool) {
        self.bytes = match (&self.after_demotion, unload) {
            (Some(kept), false) => kept.clone(),
            _ => DeviceBytes::new(),
        };
    }

    /// What evicting it frees now.
    fn frees(&self) -> DeviceBytes {
        match (&self.after_demotion, self.demoted.load(Ordering::SeqCst)) {
            (Some(kept), false) => self
                .bytes
                .iter()
                .map(|(device, n)| {
                    (
                        *device,
                        n.saturating_sub(kept.get(device).copied().unwrap_or(0)),
                    )
                })
                .collect(),
            _ => self.bytes.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    next_id: u64,
    leases: BTreeMap<u64, Entry>,
    /// By admission: the bytes its victims were counted down by, while the admission may
    /// still roll back. No other admission may plan on them — a rollback gives them back
    /// to their victims, and the pool would then hold more than its budget.
    limbo: BTreeMap<u64, DeviceBytes>,
}

impl Entries {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// The managed devices' pools and who holds what in them.
#[derive(Debug, Clone)]
pub struct DeviceManager {
    config: Arc<ManagerConfig>,
    entries: Arc<Mutex<Entries>>,
    /// The manager's clock: every use takes the next tick.
    clock: Arc<AtomicU64>,
}

/// A model's hold on its bytes. Dropping it gives them back.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    loading: Arc<AtomicBool>,
    demoted: Arc<AtomicBool>,
    manager: DeviceManager,
}

/// What admitting a model decided: its plan, its lease, and the models that must leave
/// for it. A transaction: dropped before [`Admission::evict_now`], it rolls back — the
/// lease goes and each victim holds again what it held.
pub struct Admission {
    plan: Plan,
    lease: Option<Lease>,
    /// Models that must be evicted, least recently used first, before this one loads.
    evict: Vec<Eviction>,
    /// Each victim's lease and what it held before this admission counted it as leaving
    /// (and what it counted it down to): what a rollback puts back.
    victims: Vec<Victim>,
    /// Its lease's id, which keys its victims' bytes in limbo.
    id: u64,
    manager: DeviceManager,
}

#[derive(Debug)]
struct Victim {
    lease: u64,
    held: DeviceBytes,
    promised: DeviceBytes,
}

impl Admission {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The models that must leave first.
    pub fn evictions(&self) -> &[Eviction] {
        &self.evict
    }

    /// The lease's id.
    pub fn lease_id(&self) -> u64 {
        self.lease.as_ref().map_or(u64::MAX, |l| l.id)
    }

    /// The lease it holds until it commits.
    pub fn lease(&self) -> &Lease {
        self.lease
            .as_ref()
            .expect("an admission holds its lease until it commits")
    }

    /// The evictions, to be carried out now: from here on the victims' bytes stay
    /// counted as gone (their evictions free them), whatever becomes of this model.
    pub fn evict_now(&mut self) -> Vec<Eviction> {
        self.settle_victims();
        std::mem::take(&mut self.evict)
    }

    /// The model was built: its plan and lease are its own from now on.
    pub fn commit(mut self) -> (Plan, Lease) {
        self.settle_victims();
        let lease = self
            .lease
            .take()
            .expect("an admission holds its lease until it commits");
        (self.plan.clone(), lease)
    }
}

impl Admission {
    /// The victims' bytes leave for good: no rollback from here.
    fn settle_victims(&mut self) {
        self.victims.clear();
        self.manager.entries().limbo.remove(&self.id);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.victims.is_empty() {
            return;
        }
        let mut entries = self.manager.entries();
        entries.limbo.remove(&self.id);
        for victim in self.victims.drain(..) {
            // Only an entry still as this admission left it: one that left meanwhile
            // (unloaded, unregistered) or changed (evicted by another) stays as it is.
            if let Some(entry) = entries.leases.get_mut(&victim.lease)
                && entry.bytes == victim.promised
            {
                entry.bytes = victim.held;
            }
        }
    }
}

/// A model that cannot be admitted, or whose plan failed.
pub enum AdmitError<E> {
    Plan(E),
    Refused(Refusal),
    /// It fits only by evicting others, which the caller did not allow.
    WouldEvict,
}

/// One pool as `GET /devices` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolView {
    pub device: String,
    pub budget: u64,
    pub used: u64,
    pub free: u64,
    pub models: Vec<HoldingView>,
}

/// One model's hold on a pool.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldingView {
    pub model_name: String,
    pub model_version: String,
    pub bytes: u64,
    pub loading: bool,
    pub last_used: String,
}

impl DeviceManager {
    pub fn new(config: ManagerConfig) -> Self {
        Self {
            config: Arc::new(config),
            entries: Arc::default(),
            clock: Arc::default(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each managed device's budget.
    pub fn budgets(&self) -> BTreeMap<Device, u64> {
        std::iter::once((Device::CPU, self.config.host_budget))
            .chain(
                self.config
                    .gpus
                    .iter()
                    .map(|g| (Device::cuda(g.ordinal), g.total)),
            )
            .collect()
    }

    /// The allocation map now; `busy` says which models have requests in flight.
    fn map(&self, entries: &Entries, busy: &dyn Fn(&ModelKey) -> bool) -> AllocationMap {
        let mut budgets = self.budgets();
        for (device, bytes) in entries.limbo.values().flatten() {
            if let Some(budget) = budgets.get_mut(device) {
                *budget = budget.saturating_sub(*bytes);
            }
        }
        AllocationMap {
            budgets,
            holdings: entries
                .leases
                .iter()
                .map(|(&lease, e)| Holding {
                    lease,
                    model: e.model.clone(),
                    bytes: e.bytes.clone(),
                    frees: e.frees(),
                    last_used: e.last_used.load(Ordering::SeqCst),
                    busy: e.loading.load(Ordering::SeqCst) || busy(&e.model),
                })
                .collect(),
        }
    }

    /// Admits `model`: the GPUs `request` gets (`None`: every managed GPU, shared), a
    /// plan made by `plan` on those devices' budgets less what cannot be evicted, and the
    /// least recently used models to evict for it to fit. The lease is taken at once (loading), so the bytes are promised
    /// while the evicted models leave and this one loads.
    pub fn admit<E>(
        &self,
        model: &ModelKey,
        request: &Option<DeviceRequest>,
        may_evict: bool,
        busy: &dyn Fn(&ModelKey) -> bool,
        plan: impl Fn(&Machine) -> Result<Plan, E>,
    ) -> Result<Admission, AdmitError<E>> {
        let mut entries = self.entries();
        let map = self.map(&entries, busy);
        let grant = match request {
            Some(request) => {
                policy::grant(&map, request, self.config.pack_gpus).map_err(AdmitError::Refused)?
            }
            None => policy::Grant {
                gpus: self
                    .config
                    .gpus
                    .iter()
                    .map(|g| Device::cuda(g.ordinal))
                    .collect(),
                evict: Vec::new(),
            },
        };
        // The model is planned on what it could have if every idle model left: it
        // evicts rather than spilling to disk when the pools could hold it.
        // What stays held on `device` when every idle model is evicted: all of a busy
        // model's bytes, and what moving an idle model's units to disk keeps (`unload`:
        // nothing of an idle model).
        let kept = |device: Device, unload: bool| -> u64 {
            map.holdings
                .iter()
                .map(|h| {
                    let held = h.bytes.get(&device).copied().unwrap_or(0);
                    let freed = match (h.busy, unload) {
                        (true, _) => 0,
                        (false, true) => held,
                        (false, false) => h.frees.get(&device).copied().unwrap_or(0),
                    };
                    held - freed.min(held)
                })
                .sum()
        };
        let machine = |kept: &dyn Fn(Device) -> u64| Machine {
            gpus: grant
                .gpus
                .iter()
                .filter_map(|gpu| {
                    let budget = map.budgets.get(gpu)?;
                    Some(GpuMemory {
                        ordinal: gpu.ordinal,
                        free: budget.saturating_sub(kept(*gpu)),
                        total: *budget,
                    })
                })
                .collect(),
            cpu_available: map
                .budgets
                .get(&Device::CPU)
                .copied()
                .unwrap_or(self.config.host_budget)
                .saturating_sub(kept(Device::CPU)),
            cpu_total: self.config.host_budget,
            cpu_reserve: self.config.host_budget_given.then_some(0),
        };
        // The model is planned on what it could have if idle models moved to disk, else
        // if they were unloaded: it evicts rather than spilling to disk itself when the
        // pools could hold it.
        let planned =
            plan(&machine(&|d| kept(d, false))).or_else(|_| plan(&machine(&|d| kept(d, true))));
        let plan = match planned {
            Ok(plan) => plan,
            Err(e) => {
                // Would it fit the pools alone? Then busy models hold the room: a
                // resource runs short, and the refusal says who holds it.
                return Err(match plan(&machine(&|_| 0)) {
                    // It fits the pools once others leave, which the caller did not
                    // allow (a start-up model): it is planned again when it loads.
                    Ok(_) if !may_evict => AdmitError::WouldEvict,
                    Ok(alone) => {
                        match policy::make_room(&map, None, &held_by(&alone), &grant.evict) {
                            Err(refusal) => AdmitError::Refused(refusal),
                            Ok(_) => AdmitError::Plan(e),
                        }
                    }
                    // It does not fit the pools at all: the planner says why.
                    Err(alone) => AdmitError::Plan(alone),
                });
            }
        };
        let bytes = held_by(&plan);
        let evict =
            policy::make_room(&map, None, &bytes, &grant.evict).map_err(AdmitError::Refused)?;
        let mut evict_all: Vec<Eviction> = map
            .holdings
            .iter()
            .filter(|h| grant.evict.contains(&h.lease))
            .map(|h| Eviction {
                lease: h.lease,
                model: h.model.clone(),
                unload: true,
            })
            .collect();
        evict_all.extend(evict);
        if !evict_all.is_empty() && !may_evict {
            return Err(AdmitError::WouldEvict);
        }
        let victims = count_evictions(&mut entries, &evict_all);
        let mut freed = DeviceBytes::new();
        for victim in &victims {
            for (device, held) in &victim.held {
                let kept = victim.promised.get(device).copied().unwrap_or(0);
                *freed.entry(*device).or_default() += held.saturating_sub(kept);
            }
        }
        let id = entries.next_id();
        if !freed.is_empty() {
            entries.limbo.insert(id, freed);
        }
        let loading = Arc::new(AtomicBool::new(true));
        let demoted = Arc::new(AtomicBool::new(false));
        let resident = demotable_units(&plan);
        entries.leases.insert(
            id,
            Entry {
                model: model.clone(),
                bytes: bytes.clone(),
                loading: loading.clone(),
                last_used: Arc::new(AtomicU64::new(self.tick())),
                last_used_at: Arc::new(Mutex::new(SystemTime::now())),
                after_demotion: self
                    .config
                    .evicts_to_disk
                    .then(|| demoted_bytes(&plan, &resident)),
                demoted: demoted.clone(),
            },
        );
        Ok(Admission {
            plan,
            lease: Some(Lease {
                id,
                loading,
                demoted,
                manager: self.clone(),
            }),
            evict: evict_all,
            victims,
            id,
            manager: self.clone(),
        })
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Model `name` `version` was just used (every request: no key is built for it).
    pub fn touch(&self, name: &str, version: &str) {
        let tick = self.tick();
        for entry in self.entries().leases.values() {
            if entry.model.name == name && entry.model.version == version {
                entry.last_used.store(tick, Ordering::SeqCst);
                *entry.last_used_at.lock().unwrap_or_else(|e| e.into_inner()) = SystemTime::now();
            }
        }
    }

    /// What every lease holds now, per device.
    pub fn held(&self) -> DeviceBytes {
        let mut total = DeviceBytes::new();
        for entry in self.entries().leases.values() {
            for (device, n) in &entry.bytes {
                *total.entry(*device).or_default() += n;
            }
        }
        total
    }

    /// Lets `lease` hold `bytes` instead, after its model gave memory back (a demoted
    /// model) — or, with [`DeviceManager::grow`], before it takes more.
    pub fn resize(&self, lease: &Lease, bytes: DeviceBytes) {
        if let Some(entry) = self.entries().leases.get_mut(&lease.id) {
            entry.bytes = bytes;
        }
    }

    /// Lets `lease`'s model grow to `bytes` (a demoted model promoted back): the bytes
    /// are promised at once, and the models to evict first, least recently used first,
    /// are returned. The model is busy meanwhile: nobody evicts it.
    pub fn grow(
        &self,
        lease: &Lease,
        bytes: DeviceBytes,
        busy: &dyn Fn(&ModelKey) -> bool,
    ) -> Result<Vec<Eviction>, Refusal> {
        let mut entries = self.entries();
        let map = self.map(&entries, busy);
        let Some(entry) = entries.leases.get_mut(&lease.id) else {
            return Ok(Vec::new());
        };
        let more: DeviceBytes = bytes
            .iter()
            .map(|(device, n)| {
                (
                    *device,
                    n.saturating_sub(entry.bytes.get(device).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let evict = policy::make_room(&map, Some(lease.id), &more, &[])?;
        entry.bytes = bytes;
        count_evictions(&mut entries, &evict);
        let Some(entry) = entries.leases.get_mut(&lease.id) else {
            return Ok(evict);
        };
        // Loading again until `settle`: nobody evicts it halfway through.
        entry.loading.store(true, Ordering::SeqCst);
        Ok(evict)
    }

    /// When `model` was last used (admitted or asked for), if it holds a lease.
    pub fn last_used(&self, model: &ModelKey) -> Option<SystemTime> {
        self.entries()
            .leases
            .values()
            .find(|e| e.model == *model)
            .map(|e| *e.last_used_at.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every pool: budget, use, and who holds it.
    pub fn pools(&self) -> Vec<PoolView> {
        let entries = self.entries();
        self.budgets()
            .into_iter()
            .map(|(device, budget)| {
                let models: Vec<HoldingView> = entries
                    .leases
                    .values()
                    .filter_map(|e| {
                        let bytes = *e.bytes.get(&device)?;
                        let at = *e.last_used_at.lock().unwrap_or_else(|p| p.into_inner());
                        Some(HoldingView {
                            model_name: e.model.name.clone(),
                            model_version: e.model.version.clone(),
                            bytes,
                            loading: e.loading.load(Ordering::SeqCst),
                            last_used: crate::timestamp::rfc3339(at),
                        })
                    })
                    .collect();
                let used: u64 = models.iter().map(|m| m.bytes).sum();
                PoolView {
                    device: device.to_string(),
                    budget,
                    used,
                    free: budget.saturating_sub(used),
                    models,
                }
            })
            .collect()
    }
}

impl Lease {
    /// Unique to the loaded instance that holds it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The model has loaded: it may be evicted from now on.
    pub fn settle(&self) {
        self.loading.store(false, Ordering::SeqCst);
    }

    /// Its model's units were moved to disk (or brought back).
    pub fn set_demoted(&self, demoted: bool) {
        self.demoted.store(demoted, Ordering::SeqCst);
    }

    /// What the lease holds now.
    pub fn bytes(&self) -> DeviceBytes {
        self.manager
            .entries()
            .leases
            .get(&self.id)
            .map(|e| e.bytes.clone())
            .unwrap_or_default()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.manager.entries().leases.remove(&self.id);
    }
}

/// Marks the leases `evictions` name as leaving ([`Entry::evicting`]); what each held
/// before, for a rollback.
fn count_evictions(entries: &mut Entries, evictions: &[Eviction]) -> Vec<Victim> {
    let mut victims = Vec::new();
    for eviction in evictions {
        if let Some(entry) = entries.leases.get_mut(&eviction.lease) {
            let held = entry.bytes.clone();
            entry.evicting(eviction.unload);
            victims.push(Victim {
                lease: eviction.lease,
                held,
                promised: entry.bytes.clone(),
            });
        }
    }
    victims
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

/// What a plan holds once `demoted` units are streamed instead of resident: their bytes
/// leave, and room to build two of them at a time (one computing, the next read ahead:
/// at most the two largest) stays on the stream device.
/// The units that moving a model to disk streams: every resident unit except one that
/// shares its weights with another (an embedding tied to the output head), which the
/// handler keeps resident — counting it as freed would let the policy promise bytes
/// that never come back.
pub fn demotable_units(plan: &Plan) -> Vec<String> {
    plan.units
        .iter()
        .filter(|u| u.device != Device::DISK && u.tied.is_empty())
        .map(|u| u.name.clone())
        .collect()
}

pub fn demoted_bytes(plan: &Plan, demoted: &[String]) -> DeviceBytes {
    let mut bytes = held_by(plan);
    let units: Vec<_> = plan
        .units
        .iter()
        .filter(|u| demoted.contains(&u.name))
        .collect();
    for unit in &units {
        if let Some(held) = bytes.get_mut(&unit.device) {
            *held = held.saturating_sub(unit.bytes);
        }
    }
    let mut sizes: Vec<u64> = units.iter().map(|u| u.bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    *bytes.entry(plan.stream_device).or_default() += sizes.iter().take(2).sum::<u64>();
    bytes.retain(|_, n| *n > 0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(host: u64) -> DeviceManager {
        DeviceManager::new(ManagerConfig {
            host_budget: host,
            host_budget_given: true,
            gpus: Vec::new(),
            pack_gpus: false,
            evicts_to_disk: false,
        })
    }

    fn key(name: &str) -> ModelKey {
        ModelKey {
            name: name.into(),
            version: "1".into(),
        }
    }

    /// A plan that puts `bytes` of weights on the CPU, or fails when they do not fit.
    fn plan_of(bytes: u64) -> impl Fn(&Machine) -> Result<Plan, String> {
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

    fn admit(
        manager: &DeviceManager,
        name: &str,
        bytes: u64,
        busy: &dyn Fn(&ModelKey) -> bool,
    ) -> Result<Admission, String> {
        manager
            .admit(
                &key(name),
                &Some(DeviceRequest::Cpu),
                true,
                busy,
                plan_of(bytes),
            )
            .map_err(|e| match e {
                AdmitError::Plan(e) => e,
                AdmitError::Refused(r) => r.to_string(),
                AdmitError::WouldEvict => "would evict".into(),
            })
    }

    const IDLE: &dyn Fn(&ModelKey) -> bool = &|_| false;

    #[test]
    fn a_tied_embedding_stays_resident_when_the_rest_moves_to_disk() {
        let unit = |name: &str, bytes: u64, device: Device, kind, tied: &[&str]| {
            spillway_placement::PlacedUnit {
                name: name.into(),
                bytes,
                device,
                kind,
                tied: tied.iter().map(|t| t.to_string()).collect(),
            }
        };
        use spillway_placement::UnitKind;
        let plan = Plan {
            strategy: "cpu".into(),
            units: vec![
                unit(
                    "model.embed_tokens",
                    100,
                    Device::CPU,
                    UnitKind::Pre,
                    &["lm_head"],
                ),
                unit("model.layers.0", 30, Device::CPU, UnitKind::Block(0), &[]),
                unit("model.layers.1", 20, Device::CPU, UnitKind::Block(1), &[]),
                unit("model.layers.2", 20, Device::DISK, UnitKind::Block(2), &[]),
                unit("model.norm", 1, Device::CPU, UnitKind::Post, &[]),
            ],
            devices: vec![spillway_placement::DeviceUsage {
                device: Device::CPU,
                budget: None,
                reserve: 10,
                weights: 151,
            }],
            stream_device: Device::CPU,
            streamed_bytes_per_forward: 20,
            notes: Vec::new(),
        };
        let demotable = demotable_units(&plan);
        assert_eq!(
            demotable,
            ["model.layers.0", "model.layers.1", "model.norm"]
        );
        // Kept: the embedding (100), the reserve (10) and room for the two largest
        // demoted units (30 + 20).
        assert_eq!(demoted_bytes(&plan, &demotable)[&Device::CPU], 160);
    }

    #[test]
    fn two_loads_never_count_the_same_bytes_and_a_loading_model_is_not_evicted() {
        let manager = manager(100);
        let first = admit(&manager, "a", 60, IDLE).expect("fits");
        assert!(first.evict.is_empty());
        let names =
            |a: &Admission| -> Vec<ModelKey> { a.evict.iter().map(|e| e.model.clone()).collect() };
        assert_eq!(manager.held()[&Device::CPU], 60);
        // a is still loading: it cannot leave, so b finds 40 bytes, and the refusal
        // says who holds the rest.
        let refused = admit(&manager, "b", 60, IDLE).err().expect("no room");
        assert!(refused.contains("cpu is 20 B short"), "{refused}");
        assert!(refused.contains("a version 1 (60 B, busy)"), "{refused}");
        // Larger than the pool itself: the plan's own error.
        let too_big = admit(&manager, "huge", 200, IDLE)
            .err()
            .expect("never fits");
        assert!(too_big.contains("200 > 100"), "{too_big}");
        first.lease().settle();
        // Loaded and idle, a is evicted for b.
        let second = admit(&manager, "b", 60, IDLE).expect("a leaves");
        assert_eq!(names(&second), [key("a")]);
        // A model with requests in flight stays.
        second.lease().settle();
        drop(first);
        let busy_b = |m: &ModelKey| m.name == "b";
        assert!(admit(&manager, "c", 60, &busy_b).is_err());
        assert_eq!(manager.held()[&Device::CPU], 60, "only b's lease is left");
        drop(second);
        assert!(manager.held().is_empty());
    }

    #[test]
    fn a_model_that_may_not_evict_takes_nothing_from_the_others() {
        let manager = manager(100);
        let a = admit(&manager, "a", 60, IDLE).expect("a");
        a.lease().settle();
        let deferred = manager.admit(
            &key("b"),
            &Some(DeviceRequest::Cpu),
            false,
            IDLE,
            plan_of(60),
        );
        assert!(matches!(deferred, Err(AdmitError::WouldEvict)));
        assert_eq!(manager.held()[&Device::CPU], 60, "a still counts in full");
    }

    #[test]
    fn a_model_growing_back_is_not_evicted_until_it_settles() {
        let manager = manager(100);
        let a = admit(&manager, "a", 30, IDLE).expect("a");
        a.lease().settle();
        // a's units went to disk (it holds 10), then come back (it grows to 30 again).
        manager.resize(a.lease(), [(Device::CPU, 10)].into_iter().collect());
        let evict = manager.grow(a.lease(), [(Device::CPU, 30)].into_iter().collect(), IDLE);
        assert_eq!(evict, Ok(vec![]));
        assert_eq!(manager.held()[&Device::CPU], 30);
        let refused = admit(&manager, "b", 80, IDLE)
            .err()
            .expect("a is busy growing");
        assert!(refused.contains("busy"), "{refused}");
        a.lease().settle();
        let b = admit(&manager, "b", 80, IDLE).expect("a may leave now");
        assert_eq!(b.evict.len(), 1);
    }

    #[test]
    fn the_least_recently_used_model_is_the_one_evicted() {
        let manager = manager(100);
        let a = admit(&manager, "a", 40, IDLE).expect("a");
        a.lease().settle();
        let b = admit(&manager, "b", 40, IDLE).expect("b");
        b.lease().settle();
        manager.touch("a", "1");
        let c = admit(&manager, "c", 40, IDLE).expect("c");
        let evicted: Vec<ModelKey> = c.evict.iter().map(|e| e.model.clone()).collect();
        assert_eq!(evicted, [key("b")], "a was used after b was loaded");
        let pools = manager.pools();
        assert_eq!(pools[0].device, "cpu");
        assert_eq!(
            (pools[0].used, pools[0].free),
            (80, 20),
            "b's bytes left the map when they were promised to c: never over budget"
        );
        assert_eq!(pools[0].models.len(), 2);
    }

    #[test]
    fn a_refused_admission_gives_its_victims_their_bytes_back() {
        // The scenario: room for two; a and b loaded; a second `a` is admitted
        // (evicting b on paper) and then refused as a duplicate; then c.
        let manager = manager(250);
        let a = admit(&manager, "a", 107, IDLE).expect("a");
        a.lease().settle();
        let b = admit(&manager, "b", 107, IDLE).expect("b");
        b.lease().settle();
        let duplicate = admit(&manager, "a", 107, IDLE).expect("fits by evicting");
        assert_eq!(duplicate.evictions().len(), 1);
        assert_eq!(manager.held()[&Device::CPU], 214, "b counted as leaving");
        drop(duplicate);
        assert_eq!(manager.held()[&Device::CPU], 214, "a and b, as before");
        let c = admit(&manager, "c", 107, IDLE).expect("c evicts one");
        assert_eq!(c.evictions().len(), 1, "b's bytes were given back");
        // Two instances of one version are two leases: evicting one leaves the other.
        let victim = c.evictions()[0].lease;
        assert!(victim == a.lease().id() || victim == b.lease().id());
    }

    /// Found by the property test below: a pending admission's victims' bytes were lent
    /// to a later admission, and rolling the first back then put the pool over budget.
    #[test]
    fn a_pending_admissions_victims_bytes_are_not_lent_to_another() {
        let manager = manager(100);
        let a = admit(&manager, "a", 60, IDLE).expect("a");
        a.lease().settle();
        let b = admit(&manager, "b", 60, IDLE).expect("evicts a on paper");
        assert_eq!(b.evictions().len(), 1);
        // a's 60 are promised to b until b carries its eviction out or rolls back.
        let c = admit(&manager, "c", 30, IDLE);
        assert!(c.is_err(), "c would have used a's bytes");
        drop(b);
        assert_eq!(manager.held()[&Device::CPU], 60, "a holds its bytes again");
        let c = admit(&manager, "c", 30, IDLE).expect("room for c beside a");
        assert!(c.evictions().is_empty());
        assert!(manager.held()[&Device::CPU] <= 100);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit {
            model: u8,
            bytes: u64,
        },
        /// Carry out the evictions of a pending admission and build it (committed).
        Commit(usize),
        /// Its build failed, or it was refused or cancelled: dropped.
        Abandon(usize),
        /// Carry out its evictions, then fail the build.
        EvictThenFail(usize),
        /// A loaded model is unloaded (unregistered, or evicted by restart).
        Unload(usize),
        Touch(u8),
        /// A request starts or ends on a loaded model.
        Busy(usize, bool),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..4, 10u64..70).prop_map(|(model, bytes)| Op::Admit { model, bytes }),
            (0usize..4).prop_map(Op::Commit),
            (0usize..4).prop_map(Op::Abandon),
            (0usize..4).prop_map(Op::EvictThenFail),
            (0usize..4).prop_map(Op::Unload),
            (0u8..4).prop_map(Op::Touch),
            (0usize..4, proptest::bool::ANY).prop_map(|(i, b)| Op::Busy(i, b)),
        ]
    }

    proptest::proptest! {
        /// Whatever the order of admissions, commits, refusals, failed builds and
        /// unloads: no pool is ever over its budget, and once no admission is pending
        /// the ledger holds exactly the bytes of the loaded instances.
        #[test]
        fn the_ledger_equals_what_is_loaded_whatever_the_order_of_events(
            ops in proptest::collection::vec(op(), 0..60)
        ) {
            const BUDGET: u64 = 150;
            let manager = manager(BUDGET);
            let mut pending: Vec<(ModelKey, Admission)> = Vec::new();
            // Loaded instances: their lease, bytes, and whether busy.
            let mut loaded: Vec<(ModelKey, Lease, u64, bool)> = Vec::new();
            for op in ops {
                let busy_names: Vec<ModelKey> =
                    loaded.iter().filter(|l| l.3).map(|l| l.0.clone()).collect();
                let busy = |m: &ModelKey| busy_names.contains(m);
                match op {
                    Op::Admit { model, bytes } => {
                        let name = format!("m{model}");
                        if let Ok(admission) = admit(&manager, &name, bytes, &busy) {
                            pending.push((key(&name), admission));
                        }
                    }
                    Op::Commit(i) | Op::EvictThenFail(i) if i < pending.len() => {
                        let (model, mut admission) = pending.remove(i);
                        for eviction in admission.evict_now() {
                            loaded.retain(|l| l.1.id() != eviction.lease);
                        }
                        if matches!(op, Op::Commit(_)) {
                            let bytes = held_by(admission.plan())[&Device::CPU];
                            let (_, lease) = admission.commit();
                            lease.settle();
                            loaded.push((model, lease, bytes, false));
                        }
                    }
                    Op::Abandon(i) if i < pending.len() => drop(pending.remove(i)),
                    Op::Unload(i) if i < loaded.len() => drop(loaded.remove(i)),
                    Op::Busy(i, busy) if i < loaded.len() => loaded[i].3 = busy,
                    Op::Touch(model) => manager.touch(&format!("m{model}"), "1"),
                    _ => {}
                }
                let held = manager.held().get(&Device::CPU).copied().unwrap_or(0);
                proptest::prop_assert!(held <= BUDGET, "over budget: {held}");
                if pending.is_empty() {
                    let loaded_bytes: u64 = loaded.iter().map(|l| l.2).sum();
                    proptest::prop_assert_eq!(held, loaded_bytes);
                }
            }
        }
    }
}
