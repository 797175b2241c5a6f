//! [`LayerStack`]: runs a model's units in plan order, each where the plan put it. The one
//! place where activations hop devices and disk units stream: before each unit runs, the
//! stack moves the [`Activations`] it carries to that unit's device, so model code never
//! names a device.
//!
//! A *resident* unit is built once at load and kept. A *streamed* unit (planned on disk)
//! keeps only its memory map: before its turn it is built from the mapping (on the CPU
//! candle copies each tensor out), run, then dropped, and its pages are released from
//! the process (`madvise(DONTNEED)`; they stay in the page cache), so resident memory
//! never creeps up to the file size. While a unit computes, the next streamed unit is
//! built on the stack's read-ahead thread, so disk reads overlap compute; at most two
//! streamed units exist at once, which is what the planner reserves room for.
//!
//! A streamed unit whose module reads its weights in place from the mapping
//! ([`StackModule::reads_in_place`]: GGML blocks, f32 read by MKL) holds nothing the
//! pages do not, so it is built once and kept: each pass only brings its pages in ahead
//! of its turn and releases them after. Rebuilding it took 13 µs a block on the
//! read-ahead thread, in the compute threads' time on 2 cores.
//!
//! A streamed unit's pages are released by the next read-ahead job, on the read-ahead
//! thread, before it brings the next unit in (so still at most two streamed units are
//! mapped); the last of a pass is released in line. What streaming still costs, timed
//! inside a SmolLM2 Q4_1 decode step on 2 vCPUs: a block's step itself is as fast as a
//! resident block's (157 against 153–163 µs), and the computing thread waits 19–34 µs
//! for the read-ahead job, which is the release (16–18 µs: `madvise(DONTNEED)` and the
//! TLB shootdown it waits for, an inter-processor interrupt in a VM) and the populate
//! (5 µs). With both vCPUs computing, the job runs mostly while the computing thread
//! waits for it, so moving the release onto it did not measurably change the total.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, mpsc};
use std::time::Instant;

use candle_core::{Device, Result};

use crate::error::CandleContext;
use crate::weights::WeightSpan;
use crate::{HandlerError, WeightSource};

/// Totals of one stack's disk-unit streaming (the server exports them per model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTotals {
    /// Streamed units built (materialized from their mapping).
    pub units: u64,
    /// Bytes of the mappings those units were built from.
    pub bytes: u64,
    /// Time spent building them, nanoseconds (on the read-ahead thread or in line).
    pub nanos: u64,
}

impl std::ops::Add for StreamTotals {
    type Output = StreamTotals;

    fn add(self, other: StreamTotals) -> StreamTotals {
        StreamTotals {
            units: self.units + other.units,
            bytes: self.bytes + other.bytes,
            nanos: self.nanos + other.nanos,
        }
    }
}

/// A stack's running [`StreamTotals`].
#[derive(Debug, Default)]
struct StreamCounters {
    units: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl StreamCounters {
    fn count(&self, bytes: u64, took: std::time::Duration) {
        self.units.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn totals(&self) -> StreamTotals {
        StreamTotals {
            units: self.units.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
        }
    }
}

/// What the server reaches of a loaded model's units, whatever the model: what they
/// streamed (metrics), and moving them to disk and back (the device manager's `disk`
/// eviction). Every [`LayerStack`] is one.
pub trait Units: Send + Sync {
    /// What the units streamed from disk so far.
    fn stream_totals(&self) -> StreamTotals;

    /// Streams the units the plan made resident from now on (see [`LayerStack::demote`]);
    /// their names.
    fn demote(&self) -> Vec<String>;

    /// Keeps them resident again; their names.
    fn promote(&self) -> std::result::Result<Vec<String>, HandlerError>;
}

impl<M: StackModule> Units for LayerStack<M> {
    fn stream_totals(&self) -> StreamTotals {
        LayerStack::stream_totals(self)
    }

    fn demote(&self) -> Vec<String> {
        LayerStack::demote(self)
    }

    fn promote(&self) -> std::result::Result<Vec<String>, HandlerError> {
        LayerStack::promote(self)
    }
}

/// What a [`LayerStack`] asks of the modules it runs.
pub trait StackModule: Send + Sync + 'static {
    /// Whether the module reads all its weights in place from the mapping it was built
    /// from, holding no copy of them beyond small ones (norms, biases). A streamed unit
    /// whose module does is built once and kept (only its pages come and go).
    fn reads_in_place(&self) -> bool;

    /// The bytes of its weights the module read since last asked, for a unit read on
    /// demand ([`LayerStack::push_planned_with`]) that knows them (routed experts: those
    /// of the experts it ran); 0 otherwise.
    fn take_read_bytes(&self) -> u64 {
        0
    }
}

/// What a [`LayerStack`] carries from unit to unit (hidden states, and whatever the
/// units read besides: masks, token ids, RoPE angles). The stack moves it to each unit's
/// device before the unit runs; moving to the device it is on costs nothing.
pub trait Activations: Sized {
    fn to_device(self, device: &Device) -> Result<Self>;
}

impl Activations for candle_core::Tensor {
    fn to_device(self, device: &Device) -> Result<Self> {
        candle_core::Tensor::to_device(&self, device)
    }
}

impl<A: Activations> Activations for Option<A> {
    fn to_device(self, device: &Device) -> Result<Self> {
        self.map(|a| a.to_device(device)).transpose()
    }
}

impl<A: Activations, B: Activations> Activations for (A, B) {
    fn to_device(self, device: &Device) -> Result<Self> {
        Ok((self.0.to_device(device)?, self.1.to_device(device)?))
    }
}

impl<A: Activations, B: Activations, C: Activations> Activations for (A, B, C) {
    fn to_device(self, device: &Device) -> Result<Self> {
        Ok((
            self.0.to_device(device)?,
            self.1.to_device(device)?,
            self.2.to_device(device)?,
        ))
    }
}

/// What a model's stack usually carries: the inputs its units read (token ids, masks,
/// RoPE angles) and the hidden states, once the first unit has made them.
pub struct Flow<I> {
    pub inputs: I,
    pub hidden: Option<candle_core::Tensor>,
}

impl<I> Flow<I> {
    pub fn new(inputs: I) -> Self {
        Self {
            inputs,
            hidden: None,
        }
    }

    /// The hidden states (an error before the first unit has run).
    pub fn hidden(&self) -> Result<&candle_core::Tensor> {
        self.hidden.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("a unit ran before the embeddings made hidden states".into())
        })
    }
}

impl<I: Activations> Activations for Flow<I> {
    fn to_device(self, device: &Device) -> Result<Self> {
        Ok(Self {
            inputs: self.inputs.to_device(device)?,
            hidden: self.hidden.to_device(device)?,
        })
    }
}

/// Where one unit lives at run time.
#[derive(Debug, Clone)]
pub enum UnitPlacement {
    /// Built once on this device and kept.
    Resident(Device),
    /// Kept on disk (mapped) and built on this device for each pass.
    Streamed(Device),
}

/// Whether a unit being built will be kept (resident) or used for one pass (streamed):
/// a resident unit may prepare its weights once (pack them for MKL), a streamed one
/// would pay that on every pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    Resident,
    Streamed,
}

type Build<M> = Box<dyn Fn(Residence) -> Result<M> + Send + Sync>;

/// Where a unit's weights are mapped, and how to build it from them.
struct Mapping<M> {
    build: Build<M>,
    source: WeightSource,
    span: Option<WeightSpan>,
    /// Streamed, its pages are not read ahead: the module touches what it needs (a
    /// block's experts, of which a pass runs a few) and reports it.
    on_demand: bool,
}

/// One unit of the stack.
pub struct StackUnit<M> {
    pub name: String,
    /// Where the unit computes.
    pub device: Device,
    /// The built module while the unit is resident; `None` while it is streamed.
    module: RwLock<Option<M>>,
    /// A streamed unit's module, kept across passes because it reads in place.
    kept: RwLock<Option<M>>,
    /// How to build it from its mapping (a unit pushed resident without one stays so).
    mapping: Option<Mapping<M>>,
    /// Whether the plan made it resident (what [`LayerStack::promote`] brings back).
    planned_resident: bool,
}

impl<M> StackUnit<M> {
    fn module(&self) -> std::sync::RwLockReadGuard<'_, Option<M>> {
        self.module.read().unwrap_or_else(|e| e.into_inner())
    }

    fn module_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<M>> {
        self.module.write().unwrap_or_else(|e| e.into_inner())
    }

    fn kept(&self) -> std::sync::RwLockReadGuard<'_, Option<M>> {
        self.kept.read().unwrap_or_else(|e| e.into_inner())
    }

    fn kept_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<M>> {
        self.kept.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_streamed(&self) -> bool {
        self.module().is_none()
    }
}

type ReadAheadJob = Box<dyn FnOnce() + Send>;

/// A stack's read-ahead thread: started by the first pass that streams, and kept for the
/// stack's life, so every streamed unit is built on this one thread. A thread spawned
/// per unit (as before) put each build's tensors in whichever malloc arena that new
/// thread was handed, and glibc kept the freed memory in them: a MiniLM streamed from
/// disk at two clients grew from 692 to 1,075 MiB RSS in two minutes, where building in
/// line stayed at 437–438 MiB (`bench/soak.py --clients minilm_disk:2 --no-churn`).
#[derive(Default)]
struct ReadAhead {
    /// `None` if the thread could not be started (units are then built in line).
    jobs: OnceLock<Option<mpsc::Sender<ReadAheadJob>>>,
}

impl ReadAhead {
    /// Queues `job` on the thread; false if there is no thread to run it.
    fn run(&self, job: ReadAheadJob) -> bool {
        let jobs = self.jobs.get_or_init(|| {
            let (sender, receiver) = mpsc::channel::<ReadAheadJob>();
            std::thread::Builder::new()
                .name("spillway-read-ahead".into())
                .spawn(move || {
                    // Ends when the stack (the only sender) is dropped.
                    for job in receiver {
                        // A panicking build drops its reply, which fails that pass alone.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .ok()
                .map(|_| sender)
        });
        jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok())
    }
}

/// Units in execution order.
pub struct LayerStack<M> {
    units: Vec<Arc<StackUnit<M>>>,
    streamed: Arc<StreamCounters>,
    read_ahead: ReadAhead,
}

impl<M> Default for LayerStack<M> {
    fn default() -> Self {
        Self {
            units: Vec::new(),
            streamed: Arc::default(),
            read_ahead: ReadAhead::default(),
        }
    }
}

impl<M: StackModule> LayerStack<M> {
    /// Adds a unit built now and kept for good (it cannot be demoted: nothing says how
    /// to build it again).
    pub fn push_resident(&mut self, name: impl Into<String>, device: Device, module: M) {
        self.units.push(Arc::new(StackUnit {
            name: name.into(),
            device,
            module: RwLock::new(Some(module)),
            kept: RwLock::new(None),
            mapping: None,
            planned_resident: true,
        }));
    }

    /// Adds a unit read from `mapping`, built already as `built` says (or not at all).
    fn push_mapped(
        &mut self,
        name: impl Into<String>,
        device: Device,
        mapping: Mapping<M>,
        built: Option<(M, Residence)>,
    ) {
        let (module, kept) = match built {
            Some((module, Residence::Resident)) => (Some(module), None),
            // Kept only if it reads in place.
            Some((module, Residence::Streamed)) => (None, Some(module)),
            None => (None, None),
        };
        let planned_resident = module.is_some();
        // The pages the build read leave RSS now. A streamed unit (built once at load to
        // check it) is rebuilt for each pass; a resident one either holds its own copy
        // (f32 packed for MKL, or copied by candle), which the mapped pages would double,
        // or reads its weights in place, which maps back the pages it uses as it uses them.
        if let Some(span) = &mapping.span {
            mapping.source.release(span);
        }
        self.units.push(Arc::new(StackUnit {
            name: name.into(),
            device,
            module: RwLock::new(module),
            kept: RwLock::new(kept.filter(|m| m.reads_in_place())),
            mapping: Some(mapping),
            planned_resident,
        }));
    }

    /// Adds a unit rebuilt from `source` for each pass (never kept: nothing built it at
    /// load); `tensors` are its tensor names (whose pages are released after each use).
    pub fn push_streamed<'n>(
        &mut self,
        name: impl Into<String>,
        device: Device,
        source: WeightSource,
        tensors: impl IntoIterator<Item = &'n str>,
        build: impl Fn() -> Result<M> + Send + Sync + 'static,
    ) {
        let mapping = Mapping {
            build: Box::new(move |_| build()),
            span: source.span_of(tensors),
            source,
            on_demand: false,
        };
        self.push_mapped(name, device, mapping, None);
    }

    /// Adds the unit `name` (whose tensors are those under `name.`) as `placement` says.
    /// It is built once now either way, so a broken checkpoint fails at load, not
    /// mid-request; a streamed unit is then dropped and rebuilt for each pass (kept, if
    /// it reads in place). Either can
    /// later be demoted to streamed or promoted back ([`LayerStack::demote`]).
    pub fn push_planned(
        &mut self,
        name: &str,
        placement: UnitPlacement,
        source: &WeightSource,
        build: impl Fn(&Device, Residence) -> Result<M> + Send + Sync + 'static,
    ) -> std::result::Result<(), HandlerError> {
        let dotted = format!("{name}.");
        let tensors = (source.tensor_names().into_iter())
            .filter(|t| t.starts_with(&dotted))
            .collect();
        self.push_planned_with(name, tensors, false, placement, source, build)
    }

    /// As [`LayerStack::push_planned`], for a unit whose tensors are `tensors` (a block
    /// whose experts are a unit of their own holds its tensors less theirs). A streamed
    /// unit `on_demand` is not read ahead: its module reads the weights it needs as it
    /// runs and says how many bytes ([`StackModule::take_read_bytes`]).
    pub fn push_planned_with(
        &mut self,
        name: &str,
        tensors: Vec<String>,
        on_demand: bool,
        placement: UnitPlacement,
        source: &WeightSource,
        build: impl Fn(&Device, Residence) -> Result<M> + Send + Sync + 'static,
    ) -> std::result::Result<(), HandlerError> {
        let (residence, device) = match &placement {
            UnitPlacement::Resident(device) => (Residence::Resident, device.clone()),
            UnitPlacement::Streamed(device) => (Residence::Streamed, device.clone()),
        };
        let module =
            build(&device, residence).weights_context(|| format!("cannot load unit {name}"))?;
        let exec = device.clone();
        let mapping = Mapping {
            build: Box::new(move |residence| build(&exec, residence)),
            span: source.span_of(tensors.iter().map(String::as_str)),
            source: source.clone(),
            on_demand,
        };
        self.push_mapped(name, device, mapping, Some((module, residence)));
        Ok(())
    }

    pub fn units(&self) -> &[Arc<StackUnit<M>>] {
        &self.units
    }

    /// The device the unit `name` computes on.
    pub fn device_of(&self, name: &str) -> Option<&Device> {
        self.units
            .iter()
            .find(|u| u.name == name)
            .map(|u| &u.device)
    }

    /// Turns every resident unit that has a mapping into a streamed one: its module is
    /// dropped and its pages released, so its memory goes back while the model still
    /// answers (reading those units from disk for each pass). The names of the units
    /// demoted. Waits for a pass using a unit to finish with it.
    pub fn demote(&self) -> Vec<String> {
        let mut demoted = Vec::new();
        for unit in &self.units {
            let Some(mapping) = &unit.mapping else {
                continue;
            };
            let module = unit.module_mut().take();
            if module.is_some() {
                drop(module);
                if let Some(span) = &mapping.span {
                    mapping.source.release(span);
                }
                demoted.push(unit.name.clone());
            }
        }
        demoted
    }

    /// Builds every unit the plan made resident and [`LayerStack::demote`] streamed,
    /// and keeps it again; the names of the units promoted.
    pub fn promote(&self) -> std::result::Result<Vec<String>, HandlerError> {
        let mut promoted = Vec::new();
        for unit in self.units.iter().filter(|u| u.planned_resident) {
            let (Some(mapping), true) = (&unit.mapping, unit.is_streamed()) else {
                continue;
            };
            let module = (mapping.build)(Residence::Resident)
                .weights_context(|| format!("cannot load unit {} again", unit.name))?;
            *unit.module_mut() = Some(module);
            unit.kept_mut().take();
            promoted.push(unit.name.clone());
        }
        Ok(promoted)
    }

    /// Units kept on disk and streamed each pass.
    pub fn streamed_units(&self) -> usize {
        self.units.iter().filter(|u| u.is_streamed()).count()
    }

    /// What this stack has streamed so far.
    pub fn stream_totals(&self) -> StreamTotals {
        self.streamed.totals()
    }

    fn next_streamed(&self, from: usize) -> Option<usize> {
        (from..self.units.len()).find(|&i| self.units[i].is_streamed())
    }

    /// Brings a streamed unit's pages in for a pass and builds its module, unless one
    /// is kept (then `None`).
    fn bring_in(unit: &StackUnit<M>, counters: &StreamCounters) -> Result<Option<M>> {
        let Some(mapping) = &unit.mapping else {
            return Err(candle_core::Error::Msg(format!(
                "{} is resident and has no mapping",
                unit.name
            )));
        };
        let started = Instant::now();
        if let (Some(span), false) = (&mapping.span, mapping.on_demand) {
            mapping.source.prefetch(span);
        }
        let module = match unit.kept().is_some() {
            true => None,
            false => Some((mapping.build)(Residence::Streamed)?),
        };
        // A unit read on demand is counted once it has run (what it read).
        if !mapping.on_demand {
            let bytes = mapping.span.as_ref().map_or(0, |s| s.len() as u64);
            counters.count(bytes, started.elapsed());
        }
        Ok(module)
    }

    /// Runs `step(index, module, state)` for every unit in order, `state` first moved to
    /// the unit's device, and returns the final state.
    pub fn forward<S: Activations>(
        &self,
        mut state: S,
        mut step: impl FnMut(usize, &M, S) -> Result<S>,
    ) -> Result<S> {
        let mut ahead: Option<(usize, mpsc::Receiver<Result<Option<M>>>)> = None;
        // The streamed unit that ran last, whose pages are still to be released: the
        // next read-ahead job releases them (off this thread) before it brings the next
        // unit in, so at most two streamed units stay mapped.
        let mut ran: Option<&Arc<StackUnit<M>>> = None;
        for (i, unit) in self.units.iter().enumerate() {
            let resident = unit.module();
            let streamed = resident.is_none();
            let mut owned = match streamed {
                false => None,
                true => match ahead.take() {
                    Some((j, reply)) if j == i => reply.recv().map_err(|_| {
                        candle_core::Error::Msg(format!("reading {} ahead panicked", unit.name))
                    })??,
                    _ => Self::bring_in(unit, &self.streamed)?,
                },
            };
            // Read the next streamed unit while this one computes.
            if ahead.is_none()
                && let Some(j) = self.next_streamed(i + 1)
            {
                ahead = self
                    .read_ahead_unit(j, ran.take().cloned())
                    .map(|reply| (j, reply));
            }
            let kept = unit.kept();
            if streamed && owned.is_none() && kept.is_none() {
                // Its kept module went (the unit was promoted and demoted meanwhile).
                owned = Some(Self::bring_in(unit, &self.streamed)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!("{} has no module", unit.name))
                })?);
            }
            let module = match (&*resident, &owned, &*kept) {
                (Some(module), _, _) | (None, Some(module), _) | (None, None, Some(module)) => {
                    module
                }
                (None, None, None) => unreachable!("a streamed unit is built above"),
            };
            let started = Instant::now();
            state = step(i, module, state.to_device(&unit.device)?)?;
            if streamed && unit.mapping.as_ref().is_some_and(|m| m.on_demand) {
                self.streamed
                    .count(module.take_read_bytes(), started.elapsed());
            }
            drop(kept);
            if let Some(module) = owned
                && module.reads_in_place()
            {
                unit.kept_mut().get_or_insert(module);
            }
            if streamed && let Some(before) = ran.replace(unit) {
                Self::release(before);
            }
        }
        if let Some(last) = ran {
            Self::release(last);
        }
        Ok(state)
    }

    /// Drops a streamed unit's pages from the process.
    fn release(unit: &StackUnit<M>) {
        if let Some(Mapping {
            source,
            span: Some(span),
            ..
        }) = &unit.mapping
        {
            source.release(span);
        }
    }

    /// Starts building unit `j` on the read-ahead thread, after releasing the pages of
    /// `ran` (a streamed unit done with); where its answer will come, or `None` if there
    /// is no thread (the unit is then built in line at its turn, and `ran` released now).
    fn read_ahead_unit(
        &self,
        j: usize,
        ran: Option<Arc<StackUnit<M>>>,
    ) -> Option<mpsc::Receiver<Result<Option<M>>>> {
        let unit = Arc::clone(&self.units[j]);
        let counters = Arc::clone(&self.streamed);
        let (reply, answer) = mpsc::sync_channel(1);
        let no_thread = ran.clone();
        let job = Box::new(move || {
            if let Some(ran) = ran {
                Self::release(&ran);
            }
            // A pass that failed before this unit's turn no longer waits: the module is
            // dropped here, and its pages released.
            let abandoned = reply.send(Self::bring_in(&unit, &counters)).is_err();
            if abandoned
                && let Some(Mapping {
                    source,
                    span: Some(span),
                    ..
                }) = &unit.mapping
            {
                source.release(span);
            }
        });
        let queued = self.read_ahead.run(job);
        if !queued && let Some(ran) = no_thread {
            Self::release(&ran);
        }
        queued.then_some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count that records the devices it was moved to.
    #[derive(Debug, Default)]
    struct Sum {
        total: u64,
        moved_to: Vec<String>,
    }

    impl Activations for Sum {
        fn to_device(mut self, device: &Device) -> Result<Self> {
            self.moved_to.push(format!("{:?}", device.location()));
            Ok(self)
        }
    }

    /// Test modules that hold their own values.
    impl StackModule for u64 {
        fn reads_in_place(&self) -> bool {
            false
        }
    }

    fn add(_: usize, m: &u64, mut acc: Sum) -> Result<Sum> {
        acc.total += m;
        Ok(acc)
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn source() -> (tempfile::TempDir, WeightSource) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let t = candle_core::Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("tensor");
        candle_core::safetensors::save(&[("w".to_string(), t)].into_iter().collect(), &path)
            .expect("save");
        let source = WeightSource::open(&path).expect("open");
        (dir, source)
    }

    /// Units `a` (resident, 1), `s10` and `s100` (streamed, 10 and 100); `on_build` runs
    /// at every build of a streamed one.
    fn resident_then_two_streamed(
        source: &WeightSource,
        on_build: impl Fn() + Clone + Send + Sync + 'static,
    ) -> LayerStack<u64> {
        let mut stack = LayerStack::default();
        stack.push_resident("a", Device::Cpu, 1u64);
        for value in [10u64, 100] {
            let on_build = on_build.clone();
            stack.push_streamed(
                format!("s{value}"),
                Device::Cpu,
                source.clone(),
                ["w"],
                move || {
                    on_build();
                    Ok(value)
                },
            );
        }
        stack
    }

    /// KiB of `path`'s pages mapped into this process (its mappings' `Rss` in smaps).
    fn mapped_kib(path: &std::path::Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let path = path.to_str().expect("utf-8 path");
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                ours = line.ends_with(path);
            } else if ours && let Some(rss) = line.strip_prefix("Rss:") {
                kib += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
        kib
    }

    #[test]
    fn a_resident_unit_built_from_a_copy_leaves_its_pages_unmapped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let values: Vec<f32> = (0..256 * 1024).map(|i| (i % 7) as f32).collect();
        let t = candle_core::Tensor::new(values.as_slice(), &Device::Cpu).expect("tensor");
        candle_core::safetensors::save(&[("u.w".to_string(), t)].into_iter().collect(), &path)
            .expect("save");
        let source = WeightSource::open(&path).expect("open");
        let mut stack: LayerStack<u64> = LayerStack::default();
        let reader = source.clone();
        stack
            .push_planned(
                "u",
                UnitPlacement::Resident(Device::Cpu),
                &source,
                move |d, _| {
                    // A copy of the 1 MiB tensor, as candle's loads make.
                    reader
                        .load("u.w", candle_core::DType::F32, d)?
                        .sum_all()?
                        .to_scalar::<f32>()
                        .map(|sum| sum as u64)
                },
            )
            .expect("push");
        let total: f32 = values.iter().sum();
        let sum = stack.forward(Sum::default(), add).expect("forward");
        assert_eq!(sum.total, total as u64);
        // The build read all 256 pages; once built, the copy is what the unit holds.
        let mapped = mapped_kib(&path);
        assert!(
            mapped < 64,
            "{mapped} KiB of the file still mapped after the build"
        );
    }

    #[test]
    fn units_run_in_order_and_streamed_ones_are_built_each_pass() {
        let (_dir, source) = source();
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let mut stack = resident_then_two_streamed(&source, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        stack.push_resident("z", Device::Cpu, 1000u64);
        let mut seen = Vec::new();
        let total = stack
            .forward(Sum::default(), |i, m, acc| {
                seen.push(*m);
                add(i, m, acc)
            })
            .expect("forward");
        assert_eq!(total.total, 1111);
        assert_eq!(seen, [1, 10, 100, 1000]);
        assert_eq!(
            total.moved_to.len(),
            4,
            "moved to each unit's device before it ran"
        );
        stack.forward(Sum::default(), add).expect("again");
        assert_eq!(
            builds.load(Ordering::SeqCst),
            4,
            "two streamed units, built on each of two passes"
        );
        let totals = stack.stream_totals();
        assert_eq!(
            totals.units, 4,
            "the stack's own count, whatever else streams"
        );
        assert_eq!(totals.bytes, 4 * 8, "4 builds of one 8-byte tensor");
    }

    #[test]
    fn every_pass_reads_ahead_on_the_stacks_one_thread() {
        let (_dir, source) = source();
        let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = threads.clone();
        let stack = resident_then_two_streamed(&source, move || {
            seen.lock().expect("lock").push(std::thread::current().id());
        });
        for _ in 0..3 {
            let total = stack.forward(Sum::default(), add).expect("forward");
            assert_eq!(total.total, 111);
        }
        // A pass that fails while a unit is being read ahead leaves the thread usable.
        let err = stack
            .forward(Sum::default(), |i, m, acc| {
                if i == 0 {
                    Err(candle_core::Error::Msg("step failed".into()))
                } else {
                    add(i, m, acc)
                }
            })
            .expect_err("the step fails");
        assert!(err.to_string().contains("step failed"));
        assert_eq!(
            stack.forward(Sum::default(), add).expect("after").total,
            111
        );
        let threads = threads.lock().expect("lock");
        assert!(threads.len() >= 8, "two builds a pass: {}", threads.len());
        let distinct: std::collections::HashSet<_> = threads.iter().collect();
        assert_eq!(distinct.len(), 1, "one read-ahead thread, not one per unit");
        assert!(
            !distinct.contains(&std::thread::current().id()),
            "built ahead, not in line"
        );
    }

    /// A module that says whether it reads in place.
    struct Module {
        value: u64,
        in_place: bool,
    }

    impl StackModule for Module {
        fn reads_in_place(&self) -> bool {
            self.in_place
        }
    }

    #[test]
    fn a_streamed_unit_that_reads_in_place_is_built_once_and_its_pages_still_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let t = candle_core::Tensor::zeros(256 * 1024, candle_core::DType::F32, &Device::Cpu)
            .expect("tensor");
        candle_core::safetensors::save(&[("u.w".to_string(), t)].into_iter().collect(), &path)
            .expect("save");
        let source = WeightSource::open(&path).expect("open");
        for in_place in [true, false] {
            let builds = Arc::new(AtomicUsize::new(0));
            let counted = builds.clone();
            let mut stack: LayerStack<Module> = LayerStack::default();
            stack
                .push_planned(
                    "u",
                    UnitPlacement::Streamed(Device::Cpu),
                    &source,
                    move |_, residence| {
                        assert_eq!(residence, Residence::Streamed);
                        Ok(Module {
                            value: counted.fetch_add(1, Ordering::SeqCst) as u64,
                            in_place,
                        })
                    },
                )
                .expect("push");
            for pass in 0..3 {
                let seen = stack.forward(0u64, |_, m, _| Ok(m.value)).expect("forward");
                // Kept: the module built at load; else a new one each pass.
                assert_eq!(seen, if in_place { 0 } else { pass + 1 }, "{in_place}");
                let mapped = mapped_kib(&path);
                assert!(mapped < 64, "{mapped} KiB still mapped after pass {pass}");
            }
            assert_eq!(builds.load(Ordering::SeqCst), if in_place { 1 } else { 4 });
            assert_eq!(stack.streamed_units(), 1, "kept, it is still streamed");
            let totals = stack.stream_totals();
            assert_eq!(totals.units, 3, "each pass brings the unit in");
            assert_eq!(totals.bytes, 3 * 1024 * 1024);
        }
    }

    #[test]
    fn at_most_two_streamed_units_are_mapped_while_a_pass_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let units = 5;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = (0..units)
            .map(|u| {
                let t =
                    candle_core::Tensor::ones(256 * 1024, candle_core::DType::F32, &Device::Cpu)
                        .expect("tensor");
                (format!("u{u}.w"), t)
            })
            .collect();
        candle_core::safetensors::save(&tensors, &path).expect("save");
        let source = WeightSource::open(&path).expect("open");
        let mut stack: LayerStack<Module> = LayerStack::default();
        for u in 0..units {
            stack
                .push_planned(
                    &format!("u{u}"),
                    UnitPlacement::Streamed(Device::Cpu),
                    &source,
                    move |_, _| {
                        Ok(Module {
                            value: u as u64,
                            in_place: true,
                        })
                    },
                )
                .expect("push");
        }
        for _ in 0..3 {
            let mut seen = Vec::new();
            stack
                .forward(0u64, |i, m, total| {
                    // This unit's MiB (brought in ahead of its turn) and the next one's, at
                    // most: the one before was released before the next came in.
                    let mapped = mapped_kib(&path);
                    assert!(mapped <= 2 * 1024 + 64, "{mapped} KiB mapped at unit {i}");
                    assert!(mapped >= 1024, "unit {i} was brought in: {mapped} KiB");
                    seen.push(m.value);
                    Ok(total + m.value)
                })
                .expect("forward");
            assert_eq!(seen, (0..units as u64).collect::<Vec<_>>());
            let mapped = mapped_kib(&path);
            assert!(mapped < 64, "{mapped} KiB still mapped after the pass");
        }
    }

    impl Activations for u64 {
        fn to_device(self, _: &Device) -> Result<Self> {
            Ok(self)
        }
    }

    #[test]
    fn a_failing_build_fails_the_pass_without_hanging() {
        let (_dir, source) = source();
        let mut stack: LayerStack<u64> = LayerStack::default();
        stack.push_resident("a", Device::Cpu, 1);
        stack.push_streamed("bad", Device::Cpu, source, ["w"], || {
            Err(candle_core::Error::Msg("broken".into()))
        });
        let err = stack.forward(Sum::default(), add).expect_err("must fail");
        assert!(err.to_string().contains("broken"));
    }
}
