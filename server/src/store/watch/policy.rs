//! What a change in the model store means, from listings alone: pure, so that every
//! sequence of listings can be checked (see the property test).
//!
//! An archive counts as complete once it has been the same (length, modification time,
//! inode) for the settle time: a copy still being written keeps changing, and one renamed
//! in complete is taken one settle time after it appears. An archive known before
//! (registered) that disappears is [`Change::Removed`] at once (a rename over it is not a
//! disappearance: the name stays listed, with a new inode, and is [`Change::Replaced`]
//! once settled).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::store::FileKey;

/// What to do about an archive of the store (by its name there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new complete archive: register it.
    Added(String),
    /// A known archive's content changed and settled: load the new one, then drop the old.
    Replaced(String),
    /// A known archive is gone: unregister what it registered.
    Removed(String),
}

/// An archive seen but not yet acted on in its current form.
#[derive(Debug, Clone, Copy)]
struct Pending {
    key: FileKey,
    since: Instant,
}

/// The watcher's memory between listings.
#[derive(Debug)]
pub struct StoreWatch {
    settle: Duration,
    /// Archives acted on (registered), with the form they were acted on in.
    known: BTreeMap<String, FileKey>,
    /// Archives new or changed since, waiting to settle.
    pending: BTreeMap<String, Pending>,
}

impl StoreWatch {
    /// Starts from `listing`: what is in the store now is taken as known (the server
    /// registered it at start, or was told not to).
    pub fn new(settle: Duration, listing: BTreeMap<String, FileKey>) -> Self {
        Self {
            settle,
            known: listing,
            pending: BTreeMap::new(),
        }
    }

    /// The changes the listing `now` shows since the last one, in name order.
    pub fn observe(&mut self, now: Instant, listing: &BTreeMap<String, FileKey>) -> Vec<Change> {
        let mut changes = Vec::new();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|name| !listing.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.known.remove(&name);
            changes.push(Change::Removed(name));
        }
        self.pending.retain(|name, _| listing.contains_key(name));
        for (name, key) in listing {
            if self.known.get(name) == Some(key) {
                self.pending.remove(name);
                continue;
            }
            let pending = self.pending.entry(name.clone()).or_insert(Pending {
                key: *key,
                since: now,
            });
            if pending.key != *key {
                *pending = Pending {
                    key: *key,
                    since: now,
                };
            }
            if now.saturating_duration_since(pending.since) >= self.settle {
                self.pending.remove(name);
                let change = if self.known.insert(name.clone(), *key).is_some() {
                    Change::Replaced(name.clone())
                } else {
                    Change::Added(name.clone())
                };
                changes.push(change);
            }
        }
        changes.sort_by(|a, b| name_of(a).cmp(name_of(b)));
        changes
    }

    /// Archives waiting to settle.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.pending.keys().map(String::as_str)
    }
}

fn name_of(change: &Change) -> &str {
    match change {
        Change::Added(name) | Change::Replaced(name) | Change::Removed(name) => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SETTLE: Duration = Duration::from_secs(2);

    fn key(len: u64, inode: u64) -> FileKey {
        FileKey {
            len,
            modified: None,
            inode,
        }
    }

    fn listing(items: &[(&str, FileKey)]) -> BTreeMap<String, FileKey> {
        items.iter().map(|(n, k)| (n.to_string(), *k)).collect()
    }

    #[test]
    fn an_archive_is_added_once_it_stops_changing() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut watch = StoreWatch::new(SETTLE, listing(&[("old.mar", key(1, 1))]));
        // Being written: it grows at every listing, so it is never taken.
        for (s, len) in [(0, 10), (1, 20), (2, 30), (3, 40)] {
            let seen = listing(&[("old.mar", key(1, 1)), ("new.mar", key(len, 2))]);
            assert_eq!(watch.observe(at(s), &seen), []);
        }
        let done = listing(&[("old.mar", key(1, 1)), ("new.mar", key(40, 2))]);
        assert_eq!(watch.observe(at(4), &done), []);
        assert_eq!(watch.pending().collect::<Vec<_>>(), ["new.mar"]);
        assert_eq!(
            watch.observe(at(5), &done),
            [Change::Added("new.mar".into())]
        );
        assert_eq!(watch.observe(at(9), &done), [], "once");
    }

    #[test]
    fn a_rename_over_an_archive_replaces_it_and_a_removal_removes_it() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut watch = StoreWatch::new(SETTLE, listing(&[("m.mar", key(5, 1))]));
        let renamed = listing(&[("m.mar", key(5, 2))]);
        assert_eq!(watch.observe(at(1), &renamed), []);
        assert_eq!(
            watch.observe(at(3), &renamed),
            [Change::Replaced("m.mar".into())]
        );
        assert_eq!(
            watch.observe(at(4), &listing(&[])),
            [Change::Removed("m.mar".into())]
        );
        // Half-written and removed before it settled: nothing to undo.
        assert_eq!(watch.observe(at(5), &listing(&[("x.mar", key(1, 3))])), []);
        assert_eq!(watch.observe(at(6), &listing(&[])), []);
        assert_eq!(watch.pending().count(), 0);
    }

    enum Kind {
        Replaced,
        Other,
    }

    proptest! {
        /// Over any sequence of listings: an archive is added or replaced only after
        /// being the same for the settle time, removed only after being added (or known
        /// at start), and the known set always ends equal to what is listed and settled.
        #[test]
        fn changes_follow_the_listings(
            steps in proptest::collection::vec(
                (0u64..3, proptest::collection::btree_map(0u8..4, (0u64..3, 0u64..2), 0..4)),
                1..40,
            ),
        ) {
            let start = Instant::now();
            let mut watch = StoreWatch::new(SETTLE, BTreeMap::new());
            let mut now = start;
            let mut registered: BTreeMap<String, FileKey> = BTreeMap::new();
            // When each name last changed form in the listings.
            let mut stable_since: BTreeMap<String, (FileKey, Instant)> = BTreeMap::new();
            for (advance, files) in steps {
                now += Duration::from_secs(advance);
                let seen: BTreeMap<String, FileKey> = files
                    .iter()
                    .map(|(n, (len, inode))| (format!("{n}.mar"), key(*len, *inode)))
                    .collect();
                stable_since.retain(|n, _| seen.contains_key(n));
                for (n, k) in &seen {
                    let entry = stable_since.entry(n.clone()).or_insert((*k, now));
                    if entry.0 != *k {
                        *entry = (*k, now);
                    }
                }
                for change in watch.observe(now, &seen) {
                    let change_kind = match change {
                        Change::Replaced(_) => Kind::Replaced,
                        _ => Kind::Other,
                    };
                    match change {
                        Change::Added(n) | Change::Replaced(n) => {
                            let (k, since) = stable_since[&n];
                            prop_assert!(now.duration_since(since) >= SETTLE);
                            let before = registered.insert(n.clone(), k);
                            prop_assert_ne!(before, Some(k), "{} taken twice as it is", n);
                            prop_assert_eq!(
                                before.is_some(),
                                matches!(change_kind, Kind::Replaced),
                                "added means new, replaced means known"
                            );
                        }
                        Change::Removed(n) => {
                            prop_assert!(registered.remove(&n).is_some());
                            prop_assert!(!seen.contains_key(&n));
                        }
                    }
                }
                for n in registered.keys() {
                    prop_assert!(seen.contains_key(n), "{} registered but gone", n);
                }
            }
        }
    }
}
