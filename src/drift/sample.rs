//! Sampling texts for embedding under a budget.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A uniform sample of at most `k` items: the ones whose event ids hash lowest (bottom-k
/// sampling). Deterministic — a rerun, a replay or another instance picks the same events —
/// and mergeable: the bottom k of a union is the bottom k of the parts' bottom ks, so the
/// samples of two windows, or of two instances, combine exactly. A redelivered event (same
/// id) is kept once.
#[derive(Debug, Clone)]
pub struct BottomK<T> {
    k: usize,
    items: BTreeMap<u64, T>,
}

/// The sampling hash of an event id (seeded, so the choice is independent of other hashes
/// of the same ids).
pub fn sample_hash(event_id: &str) -> u64 {
    xxh3_64_with_seed(event_id.as_bytes(), 0x5eed_d41f)
}

impl<T> BottomK<T> {
    pub fn new(k: usize) -> BottomK<T> {
        BottomK {
            k,
            items: BTreeMap::new(),
        }
    }

    /// Whether an event with this hash would be kept now; `make` runs only then.
    pub fn offer(&mut self, hash: u64, make: impl FnOnce() -> T) {
        if self.k == 0 {
            return;
        }
        if self.items.len() >= self.k
            && self
                .items
                .last_key_value()
                .is_some_and(|(max, _)| hash >= *max)
        {
            return;
        }
        self.items.entry(hash).or_insert_with(make);
        if self.items.len() > self.k {
            self.items.pop_last();
        }
    }

    pub fn merge(&mut self, other: BottomK<T>) {
        for (h, v) in other.items {
            self.offer(h, || v);
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The kept items, lowest hash first.
    pub fn items(&self) -> impl Iterator<Item = (&u64, &T)> {
        self.items.iter()
    }

    pub fn into_items(self) -> Vec<T> {
        self.items.into_values().collect()
    }
}
