//! [`PrefixCache`]: the keys and values of token sequences the model has seen, found
//! again by a later prompt that starts the same way (vLLM's automatic prefix caching,
//! llama.cpp's `cache_prompt`). Pure: it stores any value with a size in bytes; the
//! text-generation task stores [`super::KvPrefix`]es in it.
//!
//! Sequences are cut into blocks of [`PrefixCache::block`] tokens and found by a hash
//! chained over their blocks (`h(i) = hash(h(i − 1), block i)`), so a prompt is looked up
//! block by block, longest match last, and every match is checked token by token. An
//! entry holds one sequence's whole block-aligned prefix and answers any of its leading
//! blocks; an entry that is a prefix of a newer one is dropped for it. Entries leave
//! least recently used first whenever the bytes held would pass the budget.

use std::collections::HashMap;

/// What a lookup found: `tokens` leading tokens of the prompt are held by `value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<V> {
    pub tokens: usize,
    pub value: V,
}

#[derive(Debug)]
struct Entry<V> {
    tokens: Vec<u32>,
    hashes: Vec<u64>,
    value: V,
    bytes: u64,
    used: u64,
}

/// Token prefixes and their values, within a byte budget.
#[derive(Debug)]
pub struct PrefixCache<V> {
    block: usize,
    budget: u64,
    held: u64,
    clock: u64,
    next_id: u64,
    entries: HashMap<u64, Entry<V>>,
    /// The chained hash of a run of leading blocks → the entry holding them, and how
    /// many blocks that is.
    index: HashMap<u64, (u64, usize)>,
}

impl<V: Clone> PrefixCache<V> {
    /// A cache of prefixes in whole blocks of `block` tokens (at least 1) within
    /// `budget` bytes (0: it holds nothing).
    pub fn new(block: usize, budget: u64) -> Self {
        Self {
            block: block.max(1),
            budget,
            held: 0,
            clock: 0,
            next_id: 0,
            entries: HashMap::new(),
            index: HashMap::new(),
        }
    }

    pub fn block(&self) -> usize {
        self.block
    }

    /// Bytes the entries hold (never more than the budget).
    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// The chained hashes of the whole blocks of `tokens`.
    fn hashes(&self, tokens: &[u32]) -> Vec<u64> {
        use std::hash::{Hash, Hasher};
        let mut previous = 0u64;
        tokens
            .chunks_exact(self.block)
            .map(|block| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                previous.hash(&mut hasher);
                block.hash(&mut hasher);
                previous = hasher.finish();
                previous
            })
            .collect()
    }

    /// The longest run of whole leading blocks of `prompt` held, leaving at least one
    /// token of the prompt to compute (its logits start the answer).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit<V>> {
        self.lookup_leaving(prompt, 1)
    }

    /// [`Self::lookup`], leaving at least `rest` (at least 1) tokens of the prompt to
    /// compute.
    pub fn lookup_leaving(&mut self, prompt: &[u32], rest: usize) -> Option<Hit<V>> {
        let usable = prompt.len().saturating_sub(rest.max(1)) / self.block * self.block;
        let mut found = None;
        for hash in self.hashes(&prompt[..usable]) {
            match self.index.get(&hash) {
                Some(&(id, blocks)) => found = Some((id, blocks)),
                None => break,
            }
        }
        let (id, blocks) = found?;
        let tokens = blocks * self.block;
        self.clock += 1;
        let entry = self.entries.get_mut(&id)?;
        // A hash is not a proof: the tokens themselves must agree.
        if entry.tokens[..tokens] != prompt[..tokens] {
            return None;
        }
        entry.used = self.clock;
        Some(Hit {
            tokens,
            value: entry.value.clone(),
        })
    }

    /// Holds `value`, the state after `tokens` (cut down to whole blocks by the caller's
    /// value, which must hold at least those), taking `bytes`. Returns whether it was
    /// kept: not when it has no whole block, when a held entry already covers it, or
    /// when it alone exceeds the budget.
    pub fn insert(&mut self, tokens: &[u32], value: V, bytes: u64) -> bool {
        let whole = tokens.len() / self.block * self.block;
        let tokens = &tokens[..whole];
        if whole == 0 || bytes > self.budget {
            return false;
        }
        let hashes = self.hashes(tokens);
        self.clock += 1;
        if let Some(&last) = hashes.last()
            && let Some(&(id, _)) = self.index.get(&last)
            && let Some(entry) = self.entries.get_mut(&id)
            && entry.tokens.starts_with(tokens)
        {
            entry.used = self.clock;
            return false;
        }
        while self.held + bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(&id, _)| id)
            else {
                break;
            };
            self.remove(oldest);
        }
        let id = self.next_id;
        self.next_id += 1;
        // Entries this one extends answer nothing it does not: they go.
        let mut extended = Vec::new();
        for (i, &hash) in hashes.iter().enumerate() {
            if let Some((old, blocks)) = self.index.insert(hash, (id, i + 1))
                && self
                    .entries
                    .get(&old)
                    .is_some_and(|e| e.hashes.len() == blocks)
            {
                extended.push(old);
            }
        }
        self.held += bytes;
        self.entries.insert(
            id,
            Entry {
                tokens: tokens.to_vec(),
                hashes,
                value,
                bytes,
                used: self.clock,
            },
        );
        for old in extended {
            self.remove(old);
        }
        true
    }

    /// Drops entry `id` and the index lines that still point at it.
    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            self.held -= entry.bytes;
            for hash in entry.hashes {
                if self.index.get(&hash).is_some_and(|&(owner, _)| owner == id) {
                    self.index.remove(&hash);
                }
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
        self.held = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_prompt_finds_the_longest_whole_block_prefix_and_computes_at_least_one_token() {
        let mut cache = PrefixCache::new(4, 1000);
        let seen: Vec<u32> = (0..10).collect();
        assert!(cache.insert(&seen, "ten", 10));
        // 8 of the 10 are whole blocks.
        let prompt: Vec<u32> = (0..9).chain([99, 98]).collect();
        assert_eq!(
            cache.lookup(&prompt),
            Some(Hit {
                tokens: 8,
                value: "ten"
            })
        );
        // The prompt that is exactly the 8 held tokens still computes its last block.
        let exact: Vec<u32> = (0..8).collect();
        assert_eq!(cache.lookup(&exact).map(|h| h.tokens), Some(4));
        let other: Vec<u32> = (1..12).collect();
        assert_eq!(cache.lookup(&other), None);
        assert_eq!(cache.lookup(&[0, 1, 2]), None, "no whole block to reuse");
        assert_eq!(
            cache.lookup_leaving(&prompt, 4).map(|h| h.tokens),
            Some(4),
            "a whole block fewer, to leave four tokens of the eleven"
        );
        assert_eq!(cache.lookup_leaving(&exact, 5), None);
    }

    #[test]
    fn an_entry_extending_another_replaces_it_and_a_covered_one_is_not_kept() {
        let mut cache = PrefixCache::new(2, 1000);
        assert!(cache.insert(&[1, 2, 3, 4], "short", 10));
        assert!(!cache.insert(&[1, 2], "covered", 5), "already held");
        assert!(cache.insert(&[1, 2, 3, 4, 5, 6], "long", 30));
        assert_eq!(cache.entries(), 1);
        assert_eq!(cache.held(), 30);
        assert_eq!(
            cache.lookup(&[1, 2, 3, 4, 0]).map(|h| h.value),
            Some("long")
        );
        // A branch keeps both: they share the first block only.
        assert!(cache.insert(&[1, 2, 7, 7], "branch", 10));
        assert_eq!(cache.entries(), 2);
        assert_eq!(
            cache.lookup(&[1, 2, 7, 7, 0]).map(|h| h.value),
            Some("branch")
        );
        assert_eq!(
            cache.lookup(&[1, 2, 3, 4, 5, 6, 0]).map(|h| h.value),
            Some("long")
        );
    }

    #[test]
    fn the_least_recently_used_entry_leaves_first_and_a_zero_budget_holds_nothing() {
        let mut cache = PrefixCache::new(1, 25);
        assert!(cache.insert(&[1], "a", 10));
        assert!(cache.insert(&[2], "b", 10));
        assert!(cache.lookup(&[1, 0]).is_some()); // a is now the more recent
        assert!(cache.insert(&[3], "c", 10));
        assert!(
            cache.lookup(&[2, 0]).is_none(),
            "b was the least recently used"
        );
        assert!(cache.lookup(&[1, 0]).is_some());
        assert!(!cache.insert(&[4], "huge", 26), "larger than the budget");
        let mut off = PrefixCache::new(16, 0);
        assert!(!off.insert(&[0; 32], "x", 1));
        assert_eq!(off.lookup(&[0; 40]), None);
    }

    proptest! {
        /// Whatever is inserted, a hit is a true common prefix of the prompt and of a
        /// sequence inserted with that value, in whole blocks, shorter than the prompt;
        /// and the bytes held never pass the budget.
        #[test]
        fn hits_are_true_prefixes_and_the_budget_holds(
            inserts in prop::collection::vec(
                (prop::collection::vec(0u32..3, 0..12), 1u64..40), 0..12),
            prompts in prop::collection::vec(prop::collection::vec(0u32..3, 0..14), 1..8),
            block in 1usize..4,
        ) {
            let mut cache = PrefixCache::new(block, 60);
            for (i, (tokens, bytes)) in inserts.iter().enumerate() {
                cache.insert(tokens, i, *bytes);
                prop_assert!(cache.held() <= 60);
            }
            for prompt in &prompts {
                if let Some(hit) = cache.lookup(prompt) {
                    prop_assert!(hit.tokens > 0 && hit.tokens < prompt.len());
                    prop_assert_eq!(hit.tokens % block, 0);
                    let source = &inserts[hit.value].0;
                    prop_assert!(source.len() >= hit.tokens);
                    prop_assert_eq!(&source[..hit.tokens], &prompt[..hit.tokens]);
                }
            }
        }
    }
}
