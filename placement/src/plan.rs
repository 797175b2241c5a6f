//! [`plan`]: units + budgets + strategy → [`Plan`], or a [`PlanError`] that says by how much
//! the model misses and on which devices. Pure: no I/O, no clock, no GPU.
//!
//! What a unit costs on a device: its weights; on a device that runs anything, one
//! forward pass's activations; per block, its KV cache. Disk units run on the *stream
//! device* (the first GPU, else the CPU), which therefore also holds their KV caches and
//! room for two of the largest disk unit (the one computing and the one read ahead).
//!
//! The fill strategies (auto, balanced, balanced_low_0, sequential) walk the units in
//! execution order along a chain of devices — GPUs by ordinal, CPU, disk — never going
//! back, so consecutive units share a device and activations hop at most once per device.
//! Balanced strategies first cap each GPU at its share of the model (in proportion to the
//! budgets) when the model fits on the GPUs; otherwise every GPU is filled.

use serde::Serialize;

use crate::error::Shortfall;
use crate::inventory::{PlacementUnit, UnitKind};
use crate::shape::Reserve;
use crate::{Budgets, ByteSize, Device, DeviceType, PlanError, Strategy, prefix_matches};

/// Whether units can live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAccess {
    /// Disk units map the model's own safetensors in place.
    Mapped,
    /// Disk units are written once to `offload_folder` and mapped from there.
    OffloadFolder,
    /// Disk units would need `offload_folder`, which is not set (the reason says why).
    NeedsOffloadFolder(String),
}

/// Everything the planner needs.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    pub units: &'a [PlacementUnit],
    pub budgets: &'a Budgets,
    pub strategy: &'a Strategy,
    pub reserve: Reserve,
    pub disk: DiskAccess,
}

/// One unit and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlacedUnit {
    pub name: String,
    pub bytes: u64,
    pub device: Device,
    #[serde(flatten)]
    pub kind: UnitKind,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tied: Vec<String>,
}

/// One device's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceUsage {
    pub device: Device,
    /// `None`: unlimited.
    pub budget: Option<u64>,
    /// Activations, KV cache and (on the stream device) room for disk units.
    pub reserve: u64,
    pub weights: u64,
}

impl DeviceUsage {
    pub fn left(&self) -> Option<u64> {
        self.budget
            .map(|b| b.saturating_sub(self.reserve + self.weights))
    }
}

/// A resolved placement: every unit on one device, within every budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub strategy: String,
    pub units: Vec<PlacedUnit>,
    pub devices: Vec<DeviceUsage>,
    /// Where disk units are materialised and run.
    pub stream_device: Device,
    /// Bytes read from disk units in each forward pass.
    pub streamed_bytes_per_forward: u64,
    pub notes: Vec<String>,
}

impl Plan {
    pub fn device_of(&self, unit: &str) -> Option<Device> {
        self.units.iter().find(|u| u.name == unit).map(|u| u.device)
    }

    pub fn usage(&self, device: Device) -> Option<&DeviceUsage> {
        self.devices.iter().find(|d| d.device == device)
    }

    /// Whether any unit computes on a GPU: one placed there, or a disk unit streamed to a
    /// GPU stream device.
    pub fn computes_on_gpu(&self) -> bool {
        let gpu = |d: Device| d.kind == DeviceType::Cuda;
        self.units
            .iter()
            .any(|u| gpu(u.device) || (u.device == Device::DISK && gpu(self.stream_device)))
    }
}

/// Plans the placement. Disk units run on the first GPU that can hold their working
/// set, else on the CPU: each candidate stream device is tried in that order.
pub fn plan(request: &PlanRequest<'_>) -> Result<Plan, PlanError> {
    let candidates: Vec<Device> = request
        .budgets
        .gpus()
        .map(|b| b.device)
        .chain(std::iter::once(Device::CPU))
        .collect();
    let mut first_error = None;
    for stream in candidates {
        match plan_streaming_on(request, stream) {
            Ok(plan) => return Ok(plan),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| PlanError::BadDeviceMap("no device to run on".into())))
}

fn plan_streaming_on(request: &PlanRequest<'_>, stream: Device) -> Result<Plan, PlanError> {
    let assignment = match request.strategy {
        Strategy::Auto | Strategy::Balanced => fill_strategy(request, stream, false)?,
        Strategy::BalancedLow0 => fill_strategy(request, stream, true)?,
        Strategy::Sequential => fill_with_chain(request, stream, &full_chain(request))?,
        Strategy::Explicit(map) => {
            let assignment = explicit(request, map)?;
            check_fits(request, stream, &assignment)?;
            assignment
        }
        Strategy::LayerCounts(counts) => {
            let assignment = layer_counts(request, counts)?;
            check_fits(request, stream, &assignment)?;
            assignment
        }
        Strategy::Single(device) => {
            check_available(request, *device)?;
            let assignment = vec![*device; request.units.len()];
            check_fits(request, stream, &assignment)?;
            assignment
        }
    };
    Ok(finish(request, stream, assignment))
}

fn cap(budget: Option<u64>) -> u64 {
    budget.unwrap_or(u64::MAX)
}

fn disk_allowed(request: &PlanRequest<'_>) -> bool {
    !matches!(request.disk, DiskAccess::NeedsOffloadFolder(_))
}

/// Every device in order with its whole budget (disk only where allowed).
fn full_chain(request: &PlanRequest<'_>) -> Vec<(Device, u64)> {
    request
        .budgets
        .devices
        .iter()
        .filter(|b| b.device.kind != DeviceType::Disk || disk_allowed(request))
        .map(|b| (b.device, cap(b.bytes)))
        .collect()
}

fn unit_cost(unit: &PlacementUnit, device: Device, reserve: Reserve) -> u64 {
    if device.kind == DeviceType::Disk {
        unit.bytes
    } else if unit.is_block() {
        unit.bytes + reserve.kv_per_block
    } else {
        unit.bytes
    }
}

/// What the stream device must hold for the disk units of `assignment`.
fn stream_extra(request: &PlanRequest<'_>, assignment: &[Device]) -> u64 {
    let on_disk = || {
        request
            .units
            .iter()
            .zip(assignment)
            .filter(|(_, d)| d.kind == DeviceType::Disk)
            .map(|(u, _)| u)
    };
    let largest = on_disk().map(|u| u.bytes).max().unwrap_or(0);
    let kv = on_disk().filter(|u| u.is_block()).count() as u64 * request.reserve.kv_per_block;
    if largest == 0 && kv == 0 {
        0
    } else {
        2 * largest + kv
    }
}

/// Result of one walk along a chain.
enum Walk {
    Placed(Vec<Device>),
    Overflow {
        missing: u64,
        left: Vec<(Device, u64)>,
        /// The device that runs disk units cannot hold their working set (of this size).
        stream_short: Option<(Device, u64)>,
    },
}

/// Walks the units along `chain`, never going back; `extra` is held on `stream` up front.
fn walk(request: &PlanRequest<'_>, chain: &[(Device, u64)], stream: Device, extra: u64) -> Walk {
    let activations = request.reserve.activations;
    let mut used: Vec<u64> = vec![0; chain.len()];
    let mut started = vec![false; chain.len()];
    if extra > 0 {
        match chain.iter().position(|(d, _)| *d == stream) {
            Some(i) if extra.saturating_add(activations) <= chain[i].1 => {
                used[i] = extra + activations;
                started[i] = true;
            }
            // The stream device cannot hold the disk units' working set.
            found => {
                let need = extra.saturating_add(activations);
                let limit = found.map_or(0, |i| chain[i].1);
                return Walk::Overflow {
                    missing: need.saturating_sub(limit),
                    left: chain.iter().map(|(d, limit)| (*d, *limit)).collect(),
                    stream_short: Some((stream, need)),
                };
            }
        }
    }
    let mut assignment = Vec::with_capacity(request.units.len());
    let mut at = 0;
    for (index, unit) in request.units.iter().enumerate() {
        loop {
            let Some(&(device, limit)) = chain.get(at) else {
                let missing = request.units[index..]
                    .iter()
                    .map(|u| unit_cost(u, Device::CPU, request.reserve))
                    .sum::<u64>();
                let left = chain
                    .iter()
                    .zip(&used)
                    .filter(|((d, _), _)| d.kind != DeviceType::Disk || disk_allowed(request))
                    .map(|((d, limit), used)| (*d, limit.saturating_sub(*used)))
                    .collect();
                return Walk::Overflow {
                    missing,
                    left,
                    stream_short: None,
                };
            };
            let start = if started[at] || device.kind == DeviceType::Disk {
                0
            } else {
                activations
            };
            let cost = unit_cost(unit, device, request.reserve).saturating_add(start);
            if used[at].saturating_add(cost) <= limit {
                used[at] += cost;
                started[at] = true;
                assignment.push(device);
                break;
            }
            at += 1;
        }
    }
    Walk::Placed(assignment)
}

/// Walks `chain`, growing the stream device's disk reserve until it covers the disk
/// units that result (each round can only push more units to disk, so this settles).
fn fill_with_chain(
    request: &PlanRequest<'_>,
    stream: Device,
    chain: &[(Device, u64)],
) -> Result<Vec<Device>, PlanError> {
    let mut extra = 0;
    for _ in 0..=request.units.len() + 1 {
        match walk(request, chain, stream, extra) {
            Walk::Placed(assignment) => {
                let needed = stream_extra(request, &assignment);
                if needed <= extra {
                    return Ok(assignment);
                }
                extra = needed;
            }
            Walk::Overflow {
                missing,
                left,
                stream_short,
            } => return Err(does_not_fit(request, missing, left, stream_short)),
        }
    }
    Err(PlanError::BadDeviceMap(
        "placement did not settle; this is a bug".into(),
    ))
}

fn does_not_fit(
    request: &PlanRequest<'_>,
    missing: u64,
    left: Vec<(Device, u64)>,
    stream_short: Option<(Device, u64)>,
) -> PlanError {
    if let DiskAccess::NeedsOffloadFolder(reason) = &request.disk {
        return PlanError::NeedsOffloadFolder(format!(
            "the model does not fit in its GPU and CPU budgets ({} more is needed) and would need disk offload, \
             but {reason}: set offload_folder in setup_config.json, or raise max_memory",
            ByteSize(missing)
        ));
    }
    PlanError::DoesNotFit {
        needed: ByteSize(missing),
        devices: left
            .into_iter()
            .map(|(device, available)| Shortfall { device, available })
            .collect(),
        hint: Some(match stream_short {
            Some((device, need)) => format!(
                "units on disk run on {device}, which needs {} for two of them, their KV caches and one pass of \
                 activations: raise max_memory for {device}, lower max_length or batchSize, or use a smaller torch_dtype",
                ByteSize(need)
            ),
            None => "raise max_memory for a device (or drop its \"disk\" limit), lower max_length or batchSize, \
                     or load in a smaller torch_dtype"
                .into(),
        }),
    }
}

/// auto / balanced / balanced_low_0.
fn fill_strategy(
    request: &PlanRequest<'_>,
    stream: Device,
    low_zero: bool,
) -> Result<Vec<Device>, PlanError> {
    let gpus: Vec<(Device, u64)> = request
        .budgets
        .gpus()
        .map(|b| (b.device, cap(b.bytes)))
        .collect();
    let mut chain = full_chain(request);
    let reserve = request.reserve;
    let total: u64 = request
        .units
        .iter()
        .map(|u| {
            u.bytes
                + if u.is_block() {
                    reserve.kv_per_block
                } else {
                    0
                }
        })
        .sum::<u64>()
        + reserve.activations * gpus.len() as u64;
    let sum: u64 = gpus.iter().map(|(_, b)| *b).sum();
    if gpus.len() > 1 && total <= sum {
        // Each capped GPU may overshoot its share by one block (with its experts), so
        // that granularity never pushes the tail of a model that fits off the GPUs; and a
        // share is never less than the largest unit and a pass of activations (a share
        // smaller than the embeddings sent them to disk while another GPU had room).
        let mut per_block: std::collections::BTreeMap<usize, u64> = Default::default();
        for unit in request.units {
            match unit.kind {
                UnitKind::Block(i) => {
                    *per_block.entry(i).or_default() += unit.bytes + reserve.kv_per_block
                }
                UnitKind::Experts(i) => *per_block.entry(i).or_default() += unit.bytes,
                UnitKind::Pre | UnitKind::Post => {}
            }
        }
        let largest = per_block.values().copied().max().unwrap_or(0);
        let largest_unit = request
            .units
            .iter()
            .map(|u| unit_cost(u, Device::CPU, reserve))
            .max()
            .unwrap_or(0);
        let pre: u64 = request
            .units
            .iter()
            .filter(|u| u.kind == UnitKind::Pre)
            .map(|u| u.bytes)
            .sum();
        // What GPU 0 holds with low_zero: the units before the blocks, as far as its
        // budget allows; the rest is shared by the others.
        let first_share = if low_zero {
            (pre + reserve.activations).min(gpus[0].1)
        } else {
            0
        };
        let shared_total = total - first_share.min(total);
        let shared_budget: u64 = gpus
            .iter()
            .skip(usize::from(low_zero))
            .map(|(_, b)| *b)
            .sum::<u64>()
            .max(1);
        for (i, (_, limit)) in chain.iter_mut().take(gpus.len()).enumerate() {
            let budget = gpus[i].1;
            let is_last = i + 1 == gpus.len();
            *limit = if low_zero && i == 0 {
                // GPU 0 stays light, but takes whatever the other GPUs cannot hold (as
                // accelerate's get_balanced_memory does with low_zero).
                let others: u64 = gpus.iter().skip(1).map(|(_, b)| *b).sum();
                budget.min(first_share.max(total.saturating_sub(others) + largest))
            } else if is_last {
                budget
            } else {
                let share = (shared_total as u128 * budget as u128 / shared_budget as u128) as u64;
                budget.min((share + largest).max(largest_unit + reserve.activations))
            };
        }
    }
    fill_with_chain(request, stream, &chain)
}

fn check_available(request: &PlanRequest<'_>, device: Device) -> Result<(), PlanError> {
    if device.kind == DeviceType::Disk {
        if let DiskAccess::NeedsOffloadFolder(reason) = &request.disk {
            return Err(PlanError::NeedsOffloadFolder(format!(
                "device_map places modules on disk, but {reason}: set offload_folder in setup_config.json"
            )));
        }
        return Ok(());
    }
    if request.budgets.of(device).is_none() {
        return Err(PlanError::Unavailable {
            device: device.to_string(),
            available: request
                .budgets
                .devices
                .iter()
                .map(|b| b.device.to_string())
                .collect(),
        });
    }
    Ok(())
}

fn explicit(request: &PlanRequest<'_>, map: &crate::DeviceMap) -> Result<Vec<Device>, PlanError> {
    let mut unknown = Vec::new();
    for (prefix, device) in &map.entries {
        check_available(request, *device)?;
        let names_unit = request
            .units
            .iter()
            .any(|u| prefix_matches(prefix, &u.name));
        let tied_to = request.units.iter().find(|u| {
            u.tied
                .iter()
                .any(|t| prefix_matches(prefix, t) || prefix_matches(t, prefix))
        });
        // Strictly inside a unit (a `*` of the entry standing for any of its components),
        // unless it names one there (a block's experts).
        let encloses = |unit: &str| {
            let (unit, entry): (Vec<&str>, Vec<&str>) =
                (unit.split('.').collect(), prefix.split('.').collect());
            unit.len() < entry.len() && unit.iter().zip(&entry).all(|(u, e)| *e == "*" || u == e)
        };
        let inside = (request.units.iter())
            .filter(|u| encloses(&u.name))
            .max_by_key(|u| u.name.split('.').count());
        let names_a_whole_unit = request.units.iter().any(|u| {
            prefix.split('.').count() == u.name.split('.').count()
                && prefix_matches(prefix, &u.name)
        });
        if let Some(unit) = inside.filter(|_| !names_a_whole_unit) {
            return Err(PlanError::BadDeviceMap(format!(
                "`{prefix}` is inside the unit `{}`: entries must name whole units (embeddings, blocks, a block's experts, norm, head)",
                unit.name
            )));
        }
        if let Some(unit) = tied_to {
            let unit_device = map.device_of(&unit.name);
            if unit_device.is_some_and(|d| d != *device) {
                return Err(PlanError::BadDeviceMap(format!(
                    "`{prefix}` is tied to `{}` (they share weights) and must be on the same device",
                    unit.name
                )));
            }
        } else if !names_unit {
            unknown.push(prefix.clone());
        }
    }
    if !unknown.is_empty() {
        return Err(PlanError::UnknownPrefix { prefixes: unknown });
    }
    let mut uncovered = Vec::new();
    let assignment: Vec<Device> = request
        .units
        .iter()
        .map(|u| {
            map.device_of(&u.name).unwrap_or_else(|| {
                uncovered.push(u.name.clone());
                Device::CPU
            })
        })
        .collect();
    if !uncovered.is_empty() {
        return Err(PlanError::Uncovered { units: uncovered });
    }
    Ok(assignment)
}

fn layer_counts(
    request: &PlanRequest<'_>,
    counts: &[(usize, usize)],
) -> Result<Vec<Device>, PlanError> {
    let blocks = request.units.iter().filter(|u| u.is_block()).count();
    let asked: usize = counts.iter().map(|(_, c)| c).sum();
    if asked > blocks {
        return Err(PlanError::BadDeviceMap(format!(
            "layer counts place {asked} blocks but the model has {blocks}"
        )));
    }
    let mut block_devices = Vec::with_capacity(blocks);
    for (ordinal, count) in counts {
        check_available(request, Device::cuda(*ordinal))?;
        block_devices.extend(std::iter::repeat_n(Device::cuda(*ordinal), *count));
    }
    block_devices.resize(blocks, Device::CPU);
    let first = block_devices.first().copied().unwrap_or(Device::CPU);
    let last = block_devices.last().copied().unwrap_or(Device::CPU);
    let mut next_block = block_devices.into_iter();
    // A block's experts go where their block went.
    let mut block_device = Device::CPU;
    Ok(request
        .units
        .iter()
        .map(|u| match u.kind {
            UnitKind::Pre => first,
            UnitKind::Block(_) => {
                block_device = next_block.next().unwrap_or(Device::CPU);
                block_device
            }
            UnitKind::Experts(_) => block_device,
            UnitKind::Post => last,
        })
        .collect())
}

/// Per-device usage of an assignment.
fn usage(request: &PlanRequest<'_>, stream: Device, assignment: &[Device]) -> Vec<DeviceUsage> {
    let extra = stream_extra(request, assignment);
    request
        .budgets
        .devices
        .iter()
        .map(|budget| {
            let device = budget.device;
            let mine = || {
                request
                    .units
                    .iter()
                    .zip(assignment)
                    .filter(move |(_, d)| **d == device)
                    .map(|(u, _)| u)
            };
            let weights: u64 = mine().map(|u| u.bytes).sum();
            let reserve = if device.kind == DeviceType::Disk {
                0
            } else {
                let runs = mine().next().is_some() || (device == stream && extra > 0);
                let activations = if runs { request.reserve.activations } else { 0 };
                let kv =
                    mine().filter(|u| u.is_block()).count() as u64 * request.reserve.kv_per_block;
                activations + kv + if device == stream { extra } else { 0 }
            };
            DeviceUsage {
                device,
                budget: budget.bytes,
                reserve,
                weights,
            }
        })
        .collect()
}

fn check_fits(
    request: &PlanRequest<'_>,
    stream: Device,
    assignment: &[Device],
) -> Result<(), PlanError> {
    let usage = usage(request, stream, assignment);
    let over: u64 = usage
        .iter()
        .filter_map(|u| u.budget.map(|b| (u.reserve + u.weights).saturating_sub(b)))
        .sum();
    if over == 0 {
        return Ok(());
    }
    Err(PlanError::DoesNotFit {
        needed: ByteSize(over),
        devices: usage
            .iter()
            .filter(|u| u.device.kind != DeviceType::Disk || u.weights > 0)
            .map(|u| Shortfall {
                device: u.device,
                available: u.left().unwrap_or(u64::MAX),
            })
            .collect(),
        hint: Some(format!(
            "device_map {} puts more on a device than its budget: move modules to a device with room, \
             raise max_memory, or use device_map \"auto\"",
            request.strategy
        )),
    })
}

fn finish(request: &PlanRequest<'_>, stream: Device, assignment: Vec<Device>) -> Plan {
    let devices = usage(request, stream, &assignment);
    let units: Vec<PlacedUnit> = request
        .units
        .iter()
        .zip(&assignment)
        .map(|(u, d)| PlacedUnit {
            name: u.name.clone(),
            bytes: u.bytes,
            device: *d,
            kind: u.kind,
            tied: u.tied.clone(),
        })
        .collect();
    let streamed: u64 = units
        .iter()
        .filter(|u| u.device.kind == DeviceType::Disk)
        .map(|u| u.bytes)
        .sum();
    let mut notes = request.budgets.notes.clone();
    if streamed > 0 {
        let count = units
            .iter()
            .filter(|u| u.device.kind == DeviceType::Disk)
            .count();
        let how = match request.disk {
            DiskAccess::Mapped => "mapped in place from the model's safetensors",
            _ => "written once to offload_folder and mapped from there",
        };
        notes.push(format!(
            "{count} units ({}) stay on disk, {how}, and are read into {stream} for their turn in each forward pass; \
             {stream} keeps room for two of the largest (one computing, one read ahead)",
            ByteSize(streamed)
        ));
        let experts = (units.iter())
            .filter(|u| u.device.kind == DeviceType::Disk && matches!(u.kind, UnitKind::Experts(_)))
            .count();
        if experts > 0 {
            notes.push(format!(
                "{experts} blocks' experts on disk are read on demand, not ahead: a pass reads the pages of \
                 the experts its tokens are routed to, and the bytes streamed per pass above count all of them"
            ));
        }
    }
    Plan {
        strategy: request.strategy.to_string(),
        units,
        devices,
        stream_device: stream,
        streamed_bytes_per_forward: streamed,
        notes,
    }
}
