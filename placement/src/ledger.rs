//! The device ledger's policy, pure: from the pools' budgets and who holds what (an
//! [`AllocationMap`]), decide which GPUs a model gets ([`grant`]) and which models must
//! give their bytes back for it to fit ([`make_room`]). No I/O and no clock: the server's
//! device manager (`spillway::devices::manager`) gathers the map and carries out the
//! decision.
//!
//! Eviction takes the least recently used models first, across every device, and never
//! one that is busy (requests in flight, or still loading).

use std::collections::BTreeMap;
use std::fmt;

use crate::{ByteSize, Device, DeviceRequest, DeviceType};

/// Bytes per device.
pub type DeviceBytes = BTreeMap<Device, u64>;

/// A registered model version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelKey {
    pub name: String,
    pub version: String,
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} version {}", self.name, self.version)
    }
}

/// What one loaded instance of a model holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Its lease: one per loaded instance, never reused (two instances of one model
    /// version — a replacement loading beside the old one — are two holdings).
    pub lease: u64,
    pub model: ModelKey,
    pub bytes: DeviceBytes,
    /// What evicting it frees (all of `bytes` when it is unloaded; less when its units
    /// are only moved to disk).
    pub frees: DeviceBytes,
    /// When it was last used (any increasing count: the manager's tick).
    pub last_used: u64,
    /// Requests in flight or still loading: never evicted.
    pub busy: bool,
}

/// The managed pools and who holds what in them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationMap {
    /// Each managed device's budget; a device not listed is not managed (unlimited).
    pub budgets: BTreeMap<Device, u64>,
    pub holdings: Vec<Holding>,
}

impl AllocationMap {
    /// Bytes held on `device`.
    pub fn used(&self, device: Device) -> u64 {
        self.holdings
            .iter()
            .filter_map(|h| h.bytes.get(&device))
            .sum()
    }

    /// Bytes free on `device` (`None`: not managed, unlimited).
    pub fn free(&self, device: Device) -> Option<u64> {
        self.budgets
            .get(&device)
            .map(|budget| budget.saturating_sub(self.used(device)))
    }

    fn gpus(&self) -> impl Iterator<Item = Device> + '_ {
        self.budgets
            .keys()
            .copied()
            .filter(|d| d.kind == DeviceType::Cuda)
    }

    fn holders(&self, device: Device) -> impl Iterator<Item = &Holding> {
        self.holdings
            .iter()
            .filter(move |h| h.bytes.get(&device).is_some_and(|b| *b > 0))
    }
}

/// Why a model cannot have what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough bytes even after evicting every model that may be evicted.
    NoRoom {
        device: Device,
        missing: u64,
        /// Who holds the device: model, bytes, busy.
        holders: Vec<(ModelKey, u64, bool)>,
    },
    /// The request names GPUs this server does not manage, or more than it has.
    NoSuchGpus(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoRoom {
                device,
                missing,
                holders,
            } => {
                write!(f, "{device} is {} short", ByteSize(*missing))?;
                if holders.is_empty() {
                    return Ok(());
                }
                let held: Vec<String> = holders
                    .iter()
                    .map(|(model, bytes, busy)| {
                        let busy = if *busy { ", busy" } else { "" };
                        format!("{model} ({}{busy})", ByteSize(*bytes))
                    })
                    .collect();
                write!(f, "; held by {}", held.join(", "))
            }
            Refusal::NoSuchGpus(reason) => f.write_str(reason),
        }
    }
}

/// The GPUs a request gets, and the models that must leave them first (a pinned GPU's
/// occupants, or, without packing, the least recently used GPU's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub gpus: Vec<Device>,
    /// The leases that must leave first.
    pub evict: Vec<u64>,
}

/// Which GPUs `request` gets. With `pack`, models share GPUs (the fit is checked later,
/// from the plan's bytes, by [`make_room`]); without, a GPU holds one model.
pub fn grant(map: &AllocationMap, request: &DeviceRequest, pack: bool) -> Result<Grant, Refusal> {
    let managed: Vec<Device> = map.gpus().collect();
    let occupants = |gpu: Device| -> Vec<&Holding> { map.holders(gpu).collect() };
    let evict_all = |gpus: &[Device]| -> Result<Vec<u64>, Refusal> {
        let mut evict = Vec::new();
        for &gpu in gpus {
            for holding in occupants(gpu) {
                if holding.busy {
                    return Err(no_room(map, gpu, map.used(gpu)));
                }
                if !evict.contains(&holding.lease) {
                    evict.push(holding.lease);
                }
            }
        }
        Ok(evict)
    };
    match request {
        DeviceRequest::Cpu => Ok(Grant {
            gpus: Vec::new(),
            evict: Vec::new(),
        }),
        DeviceRequest::Gpus(ordinals) => {
            let gpus: Vec<Device> = ordinals.iter().map(|&o| Device::cuda(o)).collect();
            if let Some(missing) = gpus.iter().find(|g| !managed.contains(g)) {
                return Err(Refusal::NoSuchGpus(format!(
                    "{missing} is not a managed GPU (managed: {})",
                    list(&managed)
                )));
            }
            // Pinned: what occupies them leaves, unless models may share a GPU (then
            // only what the plan's bytes need, which make_room decides).
            let evict = if pack { Vec::new() } else { evict_all(&gpus)? };
            Ok(Grant { gpus, evict })
        }
        DeviceRequest::AnyGpus(n) => {
            if *n > managed.len() {
                return Err(Refusal::NoSuchGpus(format!(
                    "{n} GPUs asked for, {} managed ({})",
                    managed.len(),
                    list(&managed)
                )));
            }
            let mut order = managed.clone();
            if pack {
                // The emptiest GPUs first.
                order.sort_by_key(|&g| std::cmp::Reverse(map.free(g).unwrap_or(u64::MAX)));
                return Ok(Grant {
                    gpus: order.into_iter().take(*n).collect(),
                    evict: Vec::new(),
                });
            }
            // Free GPUs first, then those whose occupants were used longest ago; a GPU
            // with a busy occupant is not taken.
            let last_use = |g: Device| occupants(g).iter().map(|h| h.last_used).max();
            let busy = |g: Device| occupants(g).iter().any(|h| h.busy);
            order.retain(|&g| !busy(g));
            order.sort_by_key(|&g| last_use(g).map_or((0, 0), |t| (1, t)));
            if order.len() < *n {
                let full = managed.iter().copied().find(|&g| busy(g));
                return Err(match full {
                    Some(gpu) => no_room(map, gpu, map.used(gpu)),
                    None => Refusal::NoSuchGpus(format!("{n} GPUs asked for")),
                });
            }
            let gpus: Vec<Device> = order.into_iter().take(*n).collect();
            let evict = evict_all(&gpus)?;
            Ok(Grant { gpus, evict })
        }
    }
}

/// A model to evict, and whether it must be unloaded (all of its bytes) or may only
/// move its units to disk (what its holding `frees`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The lease of the instance that leaves.
    pub lease: u64,
    pub model: ModelKey,
    pub unload: bool,
}

/// The models to evict, least recently used first, so that `needed` fits every managed
/// device's free bytes. Moving units to disk is tried first; where that cannot make
/// room, models are unloaded. `already` are leases being unloaded anyway (a grant's
/// evictions); `own` (the lease of a model growing back) is never evicted.
pub fn make_room(
    map: &AllocationMap,
    own: Option<u64>,
    needed: &DeviceBytes,
    already: &[u64],
) -> Result<Vec<Eviction>, Refusal> {
    let mut candidates: Vec<&Holding> = map
        .holdings
        .iter()
        .filter(|h| !h.busy && Some(h.lease) != own && !already.contains(&h.lease))
        .collect();
    candidates.sort_by_key(|h| (h.last_used, h.model.clone(), h.lease));
    // One pass over the candidates, oldest first, each freeing `frees` (or everything
    // when `unload`); what is still short after it.
    let pass = |unload: bool| -> (Vec<Eviction>, Vec<(Device, u64)>) {
        let frees = |h: &Holding, device: &Device| -> u64 {
            let kept = if unload { &h.bytes } else { &h.frees };
            kept.get(device).copied().unwrap_or(0)
        };
        let mut evicted: Vec<&Holding> = Vec::new();
        let short = |evicted: &[&Holding]| -> Vec<(Device, u64)> {
            needed
                .iter()
                .filter_map(|(&device, &bytes)| {
                    let freed: u64 = map
                        .holdings
                        .iter()
                        .filter(|h| already.contains(&h.lease))
                        .map(|h| h.bytes.get(&device).copied().unwrap_or(0))
                        .chain(evicted.iter().map(|h| frees(h, &device)))
                        .sum();
                    let free = map.free(device)? + freed;
                    (bytes > free).then(|| (device, bytes - free))
                })
                .collect()
        };
        for &candidate in &candidates {
            let shortages = short(&evicted);
            if shortages.is_empty() {
                break;
            }
            if shortages
                .iter()
                .any(|(device, _)| frees(candidate, device) > 0)
            {
                evicted.push(candidate);
            }
        }
        let still_short = short(&evicted);
        let evictions = evicted
            .iter()
            .map(|h| Eviction {
                lease: h.lease,
                model: h.model.clone(),
                unload: unload || h.frees == h.bytes,
            })
            .collect();
        (evictions, still_short)
    };
    let (to_disk, short) = pass(false);
    if short.is_empty() {
        return Ok(to_disk);
    }
    let (unloaded, short) = pass(true);
    match short.first() {
        None => Ok(unloaded),
        Some(&(device, missing)) => Err(no_room(map, device, missing)),
    }
}

fn no_room(map: &AllocationMap, device: Device, missing: u64) -> Refusal {
    Refusal::NoRoom {
        device,
        missing,
        holders: map
            .holders(device)
            .map(|h| (h.model.clone(), h.bytes[&device], h.busy))
            .collect(),
    }
}

fn list(devices: &[Device]) -> String {
    if devices.is_empty() {
        return "none".into();
    }
    devices
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn key(name: &str) -> ModelKey {
        ModelKey {
            name: name.into(),
            version: "1".into(),
        }
    }

    /// A lease id for a model named in a test.
    fn id(name: &str) -> u64 {
        name.bytes().fold(7, |h, b| h * 31 + u64::from(b))
    }

    fn holding(name: &str, bytes: &[(Device, u64)], last_used: u64, busy: bool) -> Holding {
        Holding {
            lease: id(name),
            model: key(name),
            bytes: bytes.iter().copied().collect(),
            frees: bytes.iter().copied().collect(),
            last_used,
            busy,
        }
    }

    /// Two 24 GiB GPUs and 64 GiB of host RAM.
    fn two_gpus(holdings: Vec<Holding>) -> AllocationMap {
        AllocationMap {
            budgets: [
                (Device::cuda(0), 24 * GIB),
                (Device::cuda(1), 24 * GIB),
                (Device::CPU, 64 * GIB),
            ]
            .into_iter()
            .collect(),
            holdings,
        }
    }

    fn needs(bytes: &[(Device, u64)]) -> DeviceBytes {
        bytes.iter().copied().collect()
    }

    /// The models `make_room` evicts, by name (every holding here frees all it holds).
    fn evicted(result: Result<Vec<Eviction>, Refusal>) -> Result<Vec<ModelKey>, Refusal> {
        result.map(|e| {
            assert!(e.iter().all(|e| e.unload));
            e.into_iter().map(|e| e.model).collect()
        })
    }

    #[test]
    fn the_least_recently_used_models_leave_first_across_devices() {
        let map = two_gpus(vec![
            holding("a", &[(Device::cuda(0), 10 * GIB)], 5, false),
            holding("b", &[(Device::cuda(0), 10 * GIB)], 1, false),
            holding("c", &[(Device::cuda(1), 20 * GIB)], 0, false),
            holding("d", &[(Device::CPU, 30 * GIB)], 2, false),
        ]);
        // 12 GiB on cuda:0 (4 free): b is older than a; c and d hold nothing there.
        let evict = evicted(make_room(
            &map,
            None,
            &needs(&[(Device::cuda(0), 12 * GIB)]),
            &[],
        ));
        assert_eq!(evict, Ok(vec![key("b")]));
        // 20 GiB: both.
        let evict = evicted(make_room(
            &map,
            None,
            &needs(&[(Device::cuda(0), 20 * GIB)]),
            &[],
        ));
        assert_eq!(evict, Ok(vec![key("b"), key("a")]));
        // Room on two devices at once: c (oldest) for cuda:1, then d for the CPU.
        let evict = evicted(make_room(
            &map,
            None,
            &needs(&[(Device::cuda(1), 10 * GIB), (Device::CPU, 40 * GIB)]),
            &[],
        ));
        assert_eq!(evict, Ok(vec![key("c"), key("d")]));
        // What fits evicts nothing; unmanaged devices (disk) never need room.
        let evict = evicted(make_room(
            &map,
            None,
            &needs(&[(Device::cuda(0), 4 * GIB), (Device::DISK, 500 * GIB)]),
            &[],
        ));
        assert_eq!(evict, Ok(vec![]));
    }

    #[test]
    fn units_move_to_disk_first_and_models_unload_only_where_that_cannot_make_room() {
        let on_disk_keeps_30 = |name: &str, last_used| Holding {
            frees: needs(&[(Device::CPU, 10)]),
            ..holding(name, &[(Device::CPU, 40)], last_used, false)
        };
        let map = AllocationMap {
            budgets: [(Device::CPU, 100)].into_iter().collect(),
            holdings: vec![on_disk_keeps_30("a", 1), on_disk_keeps_30("b", 2)],
        };
        let make = |bytes| make_room(&map, None, &needs(&[(Device::CPU, bytes)]), &[]);
        let to_disk = |name: &str| Eviction {
            lease: id(name),
            model: key(name),
            unload: false,
        };
        let unload = |name: &str| Eviction {
            lease: id(name),
            model: key(name),
            unload: true,
        };
        assert_eq!(make(20), Ok(vec![]), "20 are free");
        assert_eq!(make(30), Ok(vec![to_disk("a")]));
        assert_eq!(make(40), Ok(vec![to_disk("a"), to_disk("b")]));
        assert_eq!(make(60), Ok(vec![unload("a")]), "disk frees 20 at most");
        assert_eq!(make(100), Ok(vec![unload("a"), unload("b")]));
        assert!(make(101).is_err());
    }

    #[test]
    fn busy_models_are_never_evicted_and_the_refusal_names_them() {
        let map = two_gpus(vec![
            holding("old-but-busy", &[(Device::cuda(0), 16 * GIB)], 0, true),
            holding("idle", &[(Device::cuda(0), 4 * GIB)], 9, false),
        ]);
        let refused = make_room(&map, None, &needs(&[(Device::cuda(0), 10 * GIB)]), &[])
            .expect_err("16 GiB stay held");
        let Refusal::NoRoom {
            device,
            missing,
            ref holders,
        } = refused
        else {
            panic!("no room: {refused}");
        };
        assert_eq!(
            (device, missing),
            (Device::cuda(0), 2 * GIB),
            "8 free after evicting idle"
        );
        assert_eq!(holders.len(), 2);
        let text = refused.to_string();
        assert!(
            text.contains("cuda:0") && text.contains("old-but-busy") && text.contains("busy"),
            "{text}"
        );
    }

    #[test]
    fn a_pinned_request_evicts_the_occupants_of_its_gpus() {
        let map = two_gpus(vec![
            holding("a", &[(Device::cuda(1), GIB)], 9, false),
            holding("b", &[(Device::cuda(0), GIB)], 1, false),
        ]);
        let grant_of = |r: &str, pack| grant(&map, &r.parse().expect("request"), pack);
        assert_eq!(
            grant_of("cuda:1", false),
            Ok(Grant {
                gpus: vec![Device::cuda(1)],
                evict: vec![id("a")],
            }),
            "without packing, a GPU holds one model"
        );
        assert_eq!(
            grant_of("cuda:1", true).map(|g| g.evict),
            Ok(vec![]),
            "with packing the plan's bytes decide"
        );
        assert_eq!(
            grant_of("cuda:0,1", false).map(|g| g.evict),
            Ok(vec![id("b"), id("a")])
        );
        assert!(matches!(
            grant_of("cuda:2", false),
            Err(Refusal::NoSuchGpus(_))
        ));
        assert_eq!(grant_of("cpu", false).map(|g| g.gpus), Ok(vec![]));
    }

    #[test]
    fn any_gpus_take_free_ones_first_then_the_least_recently_used() {
        let one_busy = two_gpus(vec![holding("a", &[(Device::cuda(0), GIB)], 9, false)]);
        let grant_of =
            |map: &AllocationMap, r: &str, pack| grant(map, &r.parse().expect("request"), pack);
        assert_eq!(
            grant_of(&one_busy, "cuda", false),
            Ok(Grant {
                gpus: vec![Device::cuda(1)],
                evict: vec![],
            })
        );
        assert_eq!(
            grant_of(&one_busy, "cudax2", false).map(|g| (g.gpus.len(), g.evict)),
            Ok((2, vec![id("a")]))
        );
        let full = two_gpus(vec![
            holding("new", &[(Device::cuda(0), GIB)], 7, false),
            holding("old", &[(Device::cuda(1), GIB)], 3, false),
        ]);
        assert_eq!(
            grant_of(&full, "cuda", false),
            Ok(Grant {
                gpus: vec![Device::cuda(1)],
                evict: vec![id("old")],
            })
        );
        // Packing: the emptiest GPU, nobody evicted.
        let packed = two_gpus(vec![
            holding("a", &[(Device::cuda(0), 2 * GIB)], 7, false),
            holding("b", &[(Device::cuda(1), 9 * GIB)], 3, false),
        ]);
        assert_eq!(
            grant_of(&packed, "cuda", true),
            Ok(Grant {
                gpus: vec![Device::cuda(0)],
                evict: vec![],
            })
        );
        // A GPU whose model is busy is not taken; three GPUs do not exist.
        let busy = two_gpus(vec![holding("a", &[(Device::cuda(0), GIB)], 0, true)]);
        assert_eq!(
            grant_of(&busy, "cuda", false).map(|g| g.gpus),
            Ok(vec![Device::cuda(1)])
        );
        assert!(grant_of(&busy, "cudax2", false).is_err());
        assert!(matches!(
            grant_of(&busy, "cudax3", true),
            Err(Refusal::NoSuchGpus(_))
        ));
    }

    #[test]
    fn evictions_a_grant_already_makes_count_towards_the_room() {
        let map = two_gpus(vec![
            holding("pinned-out", &[(Device::cuda(0), 20 * GIB)], 9, false),
            holding("old", &[(Device::CPU, 60 * GIB)], 0, false),
        ]);
        let evict = evicted(make_room(
            &map,
            None,
            &needs(&[(Device::cuda(0), 22 * GIB)]),
            &[id("pinned-out")],
        ));
        assert_eq!(evict, Ok(vec![]), "cuda:0 is free once the occupant leaves");
    }

    fn arbitrary_map() -> impl Strategy<Value = (AllocationMap, DeviceBytes)> {
        let devices = [Device::CPU, Device::cuda(0), Device::cuda(1)];
        let holding = (
            proptest::collection::vec(0u64..40, 3),
            0u64..20,
            proptest::bool::weighted(0.25),
            // The share of its bytes an eviction frees (disk evictions keep some).
            proptest::sample::select(vec![1u64, 2, 4]),
        );
        (
            proptest::collection::vec(20u64..100, 3),
            proptest::collection::vec(holding, 0..8),
            proptest::collection::vec(0u64..60, 3),
        )
            .prop_map(move |(budgets, holdings, needed)| {
                let budgets: BTreeMap<Device, u64> = devices.iter().copied().zip(budgets).collect();
                // Holdings are admitted one by one while they fit, as the manager does.
                let mut map = AllocationMap {
                    budgets,
                    holdings: Vec::new(),
                };
                for (i, (bytes, last_used, busy, share)) in holdings.into_iter().enumerate() {
                    let bytes: DeviceBytes = devices.iter().copied().zip(bytes).collect();
                    let frees = bytes.iter().map(|(d, b)| (*d, b / share)).collect();
                    if bytes
                        .iter()
                        .all(|(d, b)| map.free(*d).is_some_and(|f| *b <= f))
                    {
                        map.holdings.push(Holding {
                            lease: i as u64,
                            model: key(&format!("m{i}")),
                            bytes,
                            frees,
                            last_used,
                            busy,
                        });
                    }
                }
                let needed = devices.iter().copied().zip(needed).collect();
                (map, needed)
            })
    }

    /// `map` once `evictions` have freed what they free (all, when unloaded).
    fn evicting(map: &AllocationMap, evictions: &[Eviction]) -> AllocationMap {
        let mut after = map.clone();
        for e in evictions {
            if let Some(h) = after.holdings.iter_mut().find(|h| h.lease == e.lease) {
                h.bytes = h
                    .bytes
                    .iter()
                    .map(|(d, b)| (*d, if e.unload { 0 } else { b - h.frees[d] }))
                    .collect();
            }
        }
        after
    }

    proptest! {
        #[test]
        fn no_pool_is_ever_over_budget_and_only_idle_models_leave_oldest_first(
            (map, needed) in arbitrary_map()
        ) {
            match make_room(&map, None, &needed, &[]) {
                Ok(evictions) => {
                    let evicted: Vec<ModelKey> = evictions.iter().map(|e| e.model.clone()).collect();
                    // An evicted model keeps what its eviction does not free.
                    let mut after = evicting(&map, &evictions);
                    after.holdings.push(Holding { lease: 99, model: key("new"), bytes: needed.clone(), frees: needed.clone(), last_used: 99, busy: true });
                    for (&device, &budget) in &after.budgets {
                        prop_assert!(after.used(device) <= budget, "{device} over budget");
                    }
                    for model in &evicted {
                        let h = map.holdings.iter().find(|h| h.model == *model).expect("held");
                        prop_assert!(!h.busy, "{model} was busy");
                    }
                    // Each eviction was needed: the ones before it did not make room.
                    for (n, _) in evicted.iter().enumerate() {
                        let partial = evicting(&map, &evictions[..n]);
                        prop_assert!(needed.iter().any(|(d, b)| partial.free(*d).is_some_and(|f| *b > f)));
                    }
                    let ages: Vec<u64> = evicted.iter().map(|m| map.holdings.iter().find(|h| h.model == *m).map_or(0, |h| h.last_used)).collect();
                    prop_assert!(ages.windows(2).all(|w| w[0] <= w[1]), "oldest first: {ages:?}");
                }
                Err(Refusal::NoRoom { device, missing, .. }) => {
                    // Even with every idle model evicted it does not fit.
                    let idle: Vec<Eviction> = map.holdings.iter().filter(|h| !h.busy).map(|h| Eviction { lease: h.lease, model: h.model.clone(), unload: true }).collect();
                    let emptied = evicting(&map, &idle);
                    let free = emptied.free(device).expect("managed");
                    prop_assert_eq!(needed[&device] - free, missing);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
