//! Committed tables → per-window, per-arm partials ([`Tally`]): the experiment's events from
//! `events`, scorer results from `scores`, and feedback that arrives later and names an event
//! (`feedback_for`), joined to that event's arm.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, TimestampMillisecondType};
use xxhash_rust::xxh3::xxh3_64;

use super::config::{ArmField, ExperimentConfig, ExperimentsConfig, MetricValue};
use super::stats::Moments;
use crate::event::LlmEvent;
use crate::metrics::rebuild::{events_between, read_parquet_between, table_files};
use crate::sink::SinkError;

/// One window of one experiment: exposures per arm and each metric's moments per arm.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub events: Vec<u64>,
    /// `[metric][arm]`, in the experiment's metric and arm order.
    pub moments: Vec<Vec<Moments>>,
}

impl Tally {
    pub fn new(x: &ExperimentConfig) -> Tally {
        Tally {
            events: vec![0; x.arms.len()],
            moments: vec![vec![Moments::default(); x.arms.len()]; x.metrics.len()],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.iter().all(|n| *n == 0) && self.moments.iter().flatten().all(|m| m.n == 0)
    }
}

/// Windows (by start) → one tally per experiment (in config order).
pub type Tallies = BTreeMap<i64, Vec<Tally>>;

/// Which arm each recent experiment event was in, so that scores and late feedback find it,
/// and so that an event delivered twice is counted once. Bounded by age and size.
pub struct ArmIndex {
    arms: HashMap<u64, u16>,
    order: VecDeque<(i64, u64)>,
    /// Events from here on have been indexed (`None`: nothing yet).
    covered_from: Option<i64>,
    max_entries: usize,
}

impl Default for ArmIndex {
    fn default() -> Self {
        ArmIndex::with_capacity(4_000_000)
    }
}

fn key(id_hash: u64, experiment: usize) -> u64 {
    id_hash ^ (experiment as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl ArmIndex {
    /// At most `max_entries` remembered (≈ 40 bytes each); the oldest go first.
    pub fn with_capacity(max_entries: usize) -> ArmIndex {
        ArmIndex {
            arms: HashMap::new(),
            order: VecDeque::new(),
            covered_from: None,
            max_entries,
        }
    }

    fn get(&self, id_hash: u64, experiment: usize) -> Option<usize> {
        self.arms
            .get(&key(id_hash, experiment))
            .map(|a| *a as usize)
    }

    /// Records an event's arm; false when it was already there (a duplicate delivery).
    fn insert(&mut self, id_hash: u64, experiment: usize, arm: usize, ts: i64) -> bool {
        let k = key(id_hash, experiment);
        if self.arms.contains_key(&k) {
            return false;
        }
        self.arms.insert(k, arm as u16);
        self.order.push_back((ts, k));
        while self.order.len() > self.max_entries {
            if let Some((_, old)) = self.order.pop_front() {
                self.arms.remove(&old);
            }
        }
        true
    }

    /// Forgets events older than `before_ms` (they can no longer be named by feedback).
    fn forget_before(&mut self, before_ms: i64) {
        while self.order.front().is_some_and(|(t, _)| *t < before_ms) {
            if let Some((_, k)) = self.order.pop_front() {
                self.arms.remove(&k);
            }
        }
    }
}

/// The arm of `e` in `x`, when `e` belongs to the experiment.
pub fn arm_of(x: &ExperimentConfig, e: &LlmEvent<'_>) -> Option<usize> {
    if x.start_ms.is_some_and(|s| e.timestamp_ms < s) {
        return None;
    }
    for (field, want) in &x.filter {
        if field_value(e, field) != Some(want.as_str()) {
            return None;
        }
    }
    let arm = match x.arm {
        ArmField::Variant => {
            if e.experiment.as_deref().is_some_and(|n| n != x.name) {
                return None;
            }
            e.variant.as_deref()?
        }
        ArmField::PromptVersion => e.prompt_version.as_deref()?,
    };
    x.arms.iter().position(|a| a == arm)
}

fn field_value<'e>(e: &'e LlmEvent<'_>, field: &str) -> Option<&'e str> {
    match field {
        "app" => e.app.as_deref(),
        "environment" => e.environment.as_deref(),
        "operation" => e.operation.as_deref(),
        "provider" => e.provider.as_deref(),
        "model" => e.model.as_deref(),
        "prompt_id" => e.prompt_id.as_deref(),
        "prompt_version" => e.prompt_version.as_deref(),
        "variant" => e.variant.as_deref(),
        "experiment" => e.experiment.as_deref(),
        _ => None,
    }
}

/// An attribute's value as a number: true/yes → 1, false/no → 0, else parsed.
pub fn attribute_number(v: &str) -> Option<f64> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" => Some(1.0),
        "false" | "no" => Some(0.0),
        s => s.parse::<f64>().ok().filter(|x| x.is_finite()),
    }
}

/// The value of a metric read from the event itself (`None`: not on this event, or read
/// from `scores`).
pub fn event_value(v: &MetricValue, e: &LlmEvent<'_>) -> Option<f64> {
    let tokens = |t: Option<i64>| t.map(|t| t as f64);
    match v {
        MetricValue::LatencyMs => e.latency_ms,
        MetricValue::TtftMs => e.ttft_ms,
        MetricValue::InputTokens => tokens(e.input_tokens),
        MetricValue::OutputTokens => tokens(e.output_tokens),
        MetricValue::TotalTokens => match (e.input_tokens, e.output_tokens) {
            (None, None) => None,
            (a, b) => Some((a.unwrap_or(0) + b.unwrap_or(0)) as f64),
        },
        MetricValue::CostUsd => e.cost_usd,
        MetricValue::Error => Some(if e.status == "error" { 1.0 } else { 0.0 }),
        MetricValue::Feedback => e.feedback,
        MetricValue::Attribute(k) => e
            .attributes
            .iter()
            .find(|(key, _)| key == k)
            .and_then(|(_, v)| attribute_number(v)),
        MetricValue::Score(_) | MetricValue::Pass(_) => None,
    }
    .filter(|x| x.is_finite())
}

/// The `events` columns a scan reads: ids, time, the values, and the fields experiments
/// select on.
fn event_columns() -> Vec<&'static str> {
    let mut c = vec![
        "event_id",
        "source_offset",
        "timestamp",
        "status",
        "feedback",
        "feedback_for",
        "latency_ms",
        "ttft_ms",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "attributes",
    ];
    c.extend(super::config::FILTER_FIELDS);
    c
}

fn window_of(ts: i64, w: i64) -> i64 {
    ts.div_euclid(w) * w
}

fn slot<'t>(out: &'t mut Tallies, cfg: &ExperimentsConfig, ts: i64, i: usize) -> &'t mut Tally {
    let v = out
        .entry(window_of(ts, cfg.window_ms()))
        .or_insert_with(|| cfg.experiments.iter().map(Tally::new).collect());
    &mut v[i]
}

/// What a scan met that it could not count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanNotes {
    pub events: u64,
    pub duplicates: u64,
    /// Feedback naming an event no experiment holds (or one older than `feedback_lookback`).
    pub feedback_unmatched: u64,
}

/// The partials of every window in `from_ms..to_ms` (window-aligned), from the committed
/// tables. `index` carries arms across calls: pass the same one for consecutive ranges.
pub fn scan(
    root: &Path,
    cfg: &ExperimentsConfig,
    from_ms: i64,
    to_ms: i64,
    index: &mut ArmIndex,
) -> Result<(Tallies, ScanNotes), SinkError> {
    let mut out = Tallies::new();
    let mut notes = ScanNotes::default();
    if index.covered_from.is_none() {
        index.covered_from = Some(from_ms);
    }
    index.forget_before(from_ms - cfg.feedback_lookback.as_millis() as i64);
    let mut late: Vec<(u64, f64, i64)> = Vec::new();
    let wants_feedback: Vec<Option<usize>> = cfg
        .experiments
        .iter()
        .map(|x| {
            x.metrics
                .iter()
                .position(|m| m.value == MetricValue::Feedback)
        })
        .collect();
    let columns = event_columns();
    events_between(root, from_ms, to_ms, &columns, |e| {
        if let Some(target) = &e.feedback_for {
            if let Some(f) = e.feedback.filter(|f| f.is_finite()) {
                late.push((xxh3_64(target.as_bytes()), f, e.timestamp_ms));
            }
            return;
        }
        let h = xxh3_64(e.event_id.as_bytes());
        for (i, x) in cfg.experiments.iter().enumerate() {
            let Some(arm) = arm_of(x, e) else { continue };
            if !index.insert(h, i, arm, e.timestamp_ms) {
                notes.duplicates += 1;
                continue;
            }
            notes.events += 1;
            let t = slot(&mut out, cfg, e.timestamp_ms, i);
            t.events[arm] += 1;
            for (m, spec) in x.metrics.iter().enumerate() {
                if let Some(v) = event_value(&spec.value, e) {
                    t.moments[m][arm].add(v);
                }
            }
        }
    })?;

    // Scorer results, joined to the arms by event id (each event and scorer once).
    let scorers: HashSet<&str> = cfg
        .experiments
        .iter()
        .flat_map(|x| x.metrics.iter().filter_map(|m| m.value.scorer()))
        .collect();
    if !scorers.is_empty() {
        let mut seen: HashSet<u64> = HashSet::new();
        let cols = [
            "event_id",
            "timestamp",
            "evaluation_name",
            "score_value",
            "passed",
        ];
        for f in table_files(root, "scores", from_ms, to_ms)? {
            for b in read_parquet_between(&f, Some(&cols), Some((from_ms, to_ms)))? {
                let (Some(id), Some(ts), Some(name)) = (
                    b.column_by_name("event_id")
                        .and_then(|c| c.as_string_opt::<i32>()),
                    b.column_by_name("timestamp")
                        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>()),
                    b.column_by_name("evaluation_name")
                        .and_then(|c| c.as_string_opt::<i32>()),
                ) else {
                    continue;
                };
                let value = b
                    .column_by_name("score_value")
                    .and_then(|c| c.as_primitive_opt::<Float64Type>());
                let passed = b.column_by_name("passed").and_then(|c| c.as_boolean_opt());
                for r in 0..b.num_rows() {
                    if id.is_null(r) || name.is_null(r) || !(from_ms..to_ms).contains(&ts.value(r))
                    {
                        continue;
                    }
                    let n = name.value(r);
                    if !scorers.contains(n) {
                        continue;
                    }
                    let h = xxh3_64(id.value(r).as_bytes());
                    if !seen.insert(h ^ xxh3_64(n.as_bytes()).rotate_left(17)) {
                        continue;
                    }
                    for (i, x) in cfg.experiments.iter().enumerate() {
                        let Some(arm) = index.get(h, i) else { continue };
                        for (m, spec) in x.metrics.iter().enumerate() {
                            let v = match &spec.value {
                                MetricValue::Score(s) if s == n => {
                                    value.filter(|v| !v.is_null(r)).map(|v| v.value(r))
                                }
                                MetricValue::Pass(s) if s == n => passed
                                    .filter(|p| !p.is_null(r))
                                    .map(|p| if p.value(r) { 1.0 } else { 0.0 }),
                                _ => None,
                            };
                            if let Some(v) = v.filter(|v| v.is_finite()) {
                                slot(&mut out, cfg, ts.value(r), i).moments[m][arm].add(v);
                            }
                        }
                    }
                }
            }
        }
    }

    // Late feedback: counted in the window it arrived in, for the arm of the event it names.
    if wants_feedback.iter().any(Option::is_some) && !late.is_empty() {
        let lookback = cfg.feedback_lookback.as_millis() as i64;
        let missing = |index: &ArmIndex| {
            late.iter().any(|(h, _, _)| {
                wants_feedback
                    .iter()
                    .enumerate()
                    .any(|(i, w)| w.is_some() && index.get(*h, i).is_none())
            })
        };
        let covered = index.covered_from.unwrap_or(from_ms);
        if missing(index) && from_ms - lookback < covered {
            // The arms of events from before this process started: read them once.
            let back_from = from_ms - lookback;
            events_between(root, back_from, covered, &columns, |e| {
                if e.feedback_for.is_some() {
                    return;
                }
                let h = xxh3_64(e.event_id.as_bytes());
                for (i, x) in cfg.experiments.iter().enumerate() {
                    if let Some(arm) = arm_of(x, e) {
                        index.insert(h, i, arm, e.timestamp_ms);
                    }
                }
            })?;
            index.covered_from = Some(back_from);
        }
        for (h, f, ts) in late {
            let mut matched = false;
            for (i, m) in wants_feedback.iter().enumerate() {
                let (Some(m), Some(arm)) = (m, index.get(h, i)) else {
                    continue;
                };
                matched = true;
                slot(&mut out, cfg, ts, i).moments[*m][arm].add(f);
            }
            if !matched {
                notes.feedback_unmatched += 1;
            }
        }
    }
    Ok((out, notes))
}
