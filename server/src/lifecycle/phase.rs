//! Where a model version is in its life, and what each event does to it: pure, so that
//! every order of events can be checked (the property test below). [`step`] takes the
//! phase and an event and says the next phase and the [`Command`]s the supervisor
//! carries out; an event that does not apply in a phase changes nothing (a load that
//! finishes after its model was unregistered, an eviction of a model that is loading).
//!
//! ```text
//!                 Stage(s)                 Evict{to_disk}        PromoteStarted
//!              ┌──────────┐            ┌──────────────────┐    ┌─────────────────┐
//!              ▼          │            │                  ▼    │                 ▼
//!  register → Loading(s) ─┴─ Loaded ─→ Ready(Resident)   Ready(Demoted) ←─ Ready(Promoting)
//!              │  ▲                     │   ▲ Promoted{ok}       │  Promoted{!ok}
//!   LoadFailed │  │ Reload              │   └────────────────────┘
//!              ▼  │ Deferred            │ Evict{restart} / WeightsChanged
//!           Failed ── Retry ──→ Unloaded ◀──┘
//!
//!  Unregister, from any phase → Gone (its serving machinery retired, if any)
//! ```

use serde::Serialize;

/// What a loading model is doing now (shown by describe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadStage {
    /// Registered; the slow part has not started yet.
    Queued,
    /// Converting a GGUF checkpoint into the offload folder.
    Converting,
    /// Planning where each unit lives and leasing its device bytes.
    Planning,
    /// Waiting for the models evicted to make room to give their memory back.
    Evicting,
    /// Writing disk units in the serving dtype to the offload folder.
    Offloading,
    /// Reading the weights and building the handler.
    Building,
}

impl LoadStage {
    pub fn describe(self) -> &'static str {
        match self {
            LoadStage::Queued => "about to start",
            LoadStage::Converting => "converting its GGUF weights",
            LoadStage::Planning => "planning its placement",
            LoadStage::Evicting => "waiting for the models it evicts to leave",
            LoadStage::Offloading => "writing its disk units to the offload folder",
            LoadStage::Building => "reading its weights",
        }
    }
}

/// Where a serving model's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Residency {
    /// Where its plan put them.
    Resident,
    /// Evicted to disk: its units are streamed from their mapping until promoted.
    Demoted,
    /// A request is bringing its demoted units back (it serves from disk meanwhile).
    Promoting,
}

/// A model version's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Registered, its load under way.
    Loading(LoadStage),
    /// Serving.
    Ready(Residency),
    /// Registered, its weights not loaded (evicted to make room, or waiting for its
    /// first request): a request loads it.
    Unloaded,
    /// Its load failed; tried again once its archive changes.
    Failed,
    /// Unregistered: never served again.
    Gone,
}

/// What happens to a model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The load reached another stage.
    Stage(LoadStage),
    /// The load built the model.
    Loaded,
    /// The load failed (or ran past its startup timeout).
    LoadFailed,
    /// A request arrived for the unloaded model.
    Reload,
    /// No room for it now (the pools are full of busy models, or it is a start-up
    /// model that would evict another): it waits, unloaded, for a request to load it.
    Deferred,
    /// The device manager gave its bytes to another model: its units move to disk, or
    /// (`to_disk: false`, or when they are on disk already) it is unloaded.
    Evict { to_disk: bool },
    /// A request arrived for the demoted model: its units are brought back.
    PromoteStarted,
    /// Its units came back (`ok`), or stay on disk.
    Promoted { ok: bool },
    /// The archive of the failed model changed since its load: it may load again.
    Retry,
    /// The files its weights are mapped from changed under it.
    WeightsChanged,
    /// Taken out of the registry.
    Unregister,
}

/// What the supervisor does for a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Start the workers around what the load built; its admission commits.
    StartServing,
    /// Drop what the load built without serving it: its admission rolls back.
    DiscardBuild,
    /// Stop serving: close the queue, answer the queued jobs, join the workers, then
    /// drop the weights and the lease.
    Retire,
    /// Stream the resident units from their mapping and shrink the lease.
    Demote,
    /// Bring the demoted units back, the lease grown first.
    Promote,
    /// Load the model (a reload: planned and leased anew).
    Load,
}

/// The next phase and what to do, or `None` when `event` does not apply in `phase`.
pub fn step(phase: Phase, event: Event) -> Option<(Phase, Vec<Command>)> {
    use Command::*;
    use Event as E;
    use Phase as P;
    use Residency::*;
    let next = match (phase, event) {
        (P::Loading(_), E::Loaded) => (P::Ready(Resident), vec![StartServing]),
        // A build that finds its model gone, failed (past its startup timeout) or
        // already serving another build is dropped, and its lease with it.
        (_, E::Loaded) => (phase, vec![DiscardBuild]),
        (P::Gone, _) => return None,
        (_, E::Unregister) => match phase {
            P::Ready(_) => (P::Gone, vec![Retire]),
            _ => (P::Gone, vec![]),
        },
        (P::Loading(_), E::Stage(stage)) => (P::Loading(stage), vec![]),
        (P::Loading(_), E::LoadFailed) => (P::Failed, vec![]),
        (P::Unloaded, E::Reload) => (P::Loading(LoadStage::Queued), vec![Load]),
        (P::Loading(_), E::Deferred) => (P::Unloaded, vec![]),
        (P::Ready(Resident), E::Evict { to_disk: true }) => (P::Ready(Demoted), vec![Demote]),
        (P::Ready(Resident | Demoted), E::Evict { .. }) => (P::Unloaded, vec![Retire]),
        (P::Ready(Demoted), E::PromoteStarted) => (P::Ready(Promoting), vec![Promote]),
        (P::Ready(Promoting), E::Promoted { ok }) => {
            (P::Ready(if ok { Resident } else { Demoted }), vec![])
        }
        (P::Ready(_), E::WeightsChanged) => (P::Unloaded, vec![Retire]),
        (P::Failed, E::Retry) => (P::Unloaded, vec![]),
        _ => return None,
    };
    Some(next)
}

impl Phase {
    /// TorchServe's status word for it (describe's `status`).
    pub fn status(self) -> &'static str {
        match self {
            Phase::Loading(_) => "LOADING",
            Phase::Ready(_) => "READY",
            Phase::Unloaded => "UNLOADED",
            Phase::Failed => "FAILED",
            Phase::Gone => "UNREGISTERED",
        }
    }

    /// Where its weights are, for describe's `deviceState`.
    pub fn device_state(self) -> Option<&'static str> {
        match self {
            Phase::Ready(Residency::Resident) => Some("resident"),
            Phase::Ready(Residency::Demoted | Residency::Promoting) => Some("disk"),
            Phase::Unloaded => Some("unloaded"),
            Phase::Loading(_) | Phase::Failed | Phase::Gone => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        let stage = prop_oneof![
            Just(LoadStage::Queued),
            Just(LoadStage::Converting),
            Just(LoadStage::Planning),
            Just(LoadStage::Evicting),
            Just(LoadStage::Offloading),
            Just(LoadStage::Building),
        ];
        prop_oneof![
            stage.prop_map(Event::Stage),
            Just(Event::Loaded),
            Just(Event::LoadFailed),
            Just(Event::Reload),
            Just(Event::Deferred),
            any::<bool>().prop_map(|to_disk| Event::Evict { to_disk }),
            Just(Event::PromoteStarted),
            any::<bool>().prop_map(|ok| Event::Promoted { ok }),
            Just(Event::Retry),
            Just(Event::WeightsChanged),
            Just(Event::Unregister),
        ]
    }

    proptest! {
        /// Over any order of events: a model serves exactly between a `StartServing`
        /// and its one `Retire`; every build is either served or discarded, once;
        /// nothing is loaded or served once it is gone, and it never comes back; only a
        /// serving model is demoted or promoted, and only an unloaded one reloaded.
        #[test]
        fn every_order_of_events_keeps_the_promises(events in prop::collection::vec(event(), 0..80)) {
            let mut phase = Phase::Loading(LoadStage::Queued);
            let mut serving = 0i32;
            for event in events {
                let before = phase;
                let Some((next, commands)) = step(phase, event) else {
                    prop_assert!(event != Event::Loaded, "a build is never ignored");
                    continue;
                };
                let taken = commands
                    .iter()
                    .filter(|c| matches!(c, Command::StartServing | Command::DiscardBuild))
                    .count();
                prop_assert_eq!(taken, usize::from(event == Event::Loaded));
                for command in &commands {
                    match command {
                        Command::StartServing => serving += 1,
                        Command::Retire => serving -= 1,
                        Command::Load => prop_assert_eq!(before, Phase::Unloaded),
                        Command::Demote | Command::Promote => {
                            prop_assert!(matches!(before, Phase::Ready(_)))
                        }
                        Command::DiscardBuild => prop_assert_eq!(before, next),
                    }
                }
                prop_assert!(before != Phase::Gone || next == Phase::Gone, "came back from gone");
                prop_assert_eq!(serving, i32::from(matches!(next, Phase::Ready(_))));
                phase = next;
            }
        }
    }

    #[test]
    fn a_load_that_finishes_after_its_model_left_is_discarded_not_served() {
        let (gone, commands) =
            step(Phase::Loading(LoadStage::Building), Event::Unregister).expect("applies");
        assert_eq!((gone, commands), (Phase::Gone, vec![]));
        assert_eq!(
            step(gone, Event::Loaded),
            Some((Phase::Gone, vec![Command::DiscardBuild]))
        );
        assert_eq!(step(gone, Event::Reload), None);
        // A load past its startup timeout failed the model; its build comes late.
        assert_eq!(
            step(Phase::Failed, Event::Loaded),
            Some((Phase::Failed, vec![Command::DiscardBuild]))
        );
    }

    #[test]
    fn an_evicted_model_moves_to_disk_once_then_unloads() {
        let resident = Phase::Ready(Residency::Resident);
        let (demoted, commands) = step(resident, Event::Evict { to_disk: true }).expect("applies");
        assert_eq!(
            (demoted, commands),
            (Phase::Ready(Residency::Demoted), vec![Command::Demote])
        );
        assert_eq!(
            step(demoted, Event::Evict { to_disk: true }),
            Some((Phase::Unloaded, vec![Command::Retire]))
        );
        // A model bringing its units back is busy: it is not evicted meanwhile.
        assert_eq!(
            step(
                Phase::Ready(Residency::Promoting),
                Event::Evict { to_disk: false }
            ),
            None
        );
        assert_eq!(
            step(
                Phase::Loading(LoadStage::Building),
                Event::Evict { to_disk: false }
            ),
            None
        );
    }
}
