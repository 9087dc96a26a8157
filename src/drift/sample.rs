//! Sampling texts for embedding under a budget.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::scalar::Scalars;
use crate::event::LlmEvent;

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

    /// Keeps the `k` lowest (and keeps `k` as the new size).
    pub fn shrink(&mut self, k: usize) {
        self.k = self.k.min(k);
        while self.items.len() > self.k {
            self.items.pop_last();
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

/// A sampled text with the event it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub event_id: Box<str>,
    pub text: Box<str>,
}

/// What the drift stage keeps of one series in one window: samples of the users' texts and
/// of the answers (up to `k` each), and the scalar features of every event.
#[derive(Debug, Clone)]
pub struct WindowSample {
    pub inputs: BottomK<Sampled>,
    pub outputs: BottomK<Sampled>,
    pub scalars: Scalars,
    pub events: u64,
}

/// The first `max_chars` characters of a text.
pub fn truncate(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

impl WindowSample {
    pub fn new(k: usize) -> WindowSample {
        WindowSample {
            inputs: BottomK::new(k),
            outputs: BottomK::new(k),
            scalars: Scalars::default(),
            events: 0,
        }
    }

    pub fn observe(&mut self, e: &LlmEvent<'_>, max_chars: usize) {
        self.events += 1;
        let input = e.input.as_deref().filter(|t| !t.trim().is_empty());
        self.scalars.observe(e, input);
        // One text per conversation: turns of one conversation resemble each other, and a
        // window holding several of them is not a sample of independent texts, which is what
        // the tests' nulls assume (the reason online MMD alarms on real, non-i.i.d. streams).
        let hash = sample_hash(e.session_id.as_deref().unwrap_or(&e.event_id));
        let sampled = |t: &str| Sampled {
            event_id: e.event_id.as_ref().into(),
            text: truncate(t, max_chars).into(),
        };
        if let Some(t) = input {
            self.inputs.offer(hash, || sampled(t));
        }
        if let Some(t) = e.output.as_deref().filter(|t| !t.trim().is_empty()) {
            self.outputs.offer(hash, || sampled(t));
        }
    }

    pub fn merge(&mut self, other: WindowSample) {
        self.inputs.merge(other.inputs);
        self.outputs.merge(other.outputs);
        self.scalars.merge(&other.scalars);
        self.events += other.events;
    }

    /// Approximate heap bytes (texts and ids).
    pub fn memory_bytes(&self) -> usize {
        let texts = |b: &BottomK<Sampled>| {
            b.items()
                .map(|(_, s)| 64 + s.text.len() + s.event_id.len())
                .sum::<usize>()
        };
        std::mem::size_of::<Self>() + texts(&self.inputs) + texts(&self.outputs)
    }

    /// Keeps the `k` lowest-hash texts of each field (a bottom-k of a bottom-k is a bottom-k).
    pub fn shrink(&mut self, k: usize) {
        self.inputs.shrink(k);
        self.outputs.shrink(k);
    }
}
