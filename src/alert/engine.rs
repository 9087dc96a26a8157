//! Rule evaluation over closed windows and the alert lifecycle (inactive → pending → firing →
//! resolved). Pure: windows and times come in as arguments, transitions come out; notification
//! is the [`super::dispatch`] module's business and I/O the driver's.
//!
//! Rules are judged once per closed window of their resolution, in **event time**: `for:` and
//! `keep_firing_for:` count window ends, so a backfill, a replay and the live stream reach the
//! same decisions. A window with fewer than `min_samples` events (or no row at all) is not
//! judged: a pending alert falls back to inactive (`for:` needs consecutive evidence), a firing
//! one keeps firing until its series has been silent for [`STALE_WINDOWS`] windows, then
//! resolves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimestampMillisecondType};
use serde::{Deserialize, Serialize};

use super::rule::{ChangeKind, Condition, Rule, Scope, Severity, Var, human, matches_all};

/// The labels of an `experiments` frame's rows.
pub fn experiment_dimensions() -> Vec<String> {
    ["app", "environment"]
        .iter()
        .chain(crate::experiment::table::FRAME_LABELS)
        .map(|s| s.to_string())
        .collect()
}

/// Windows without a judgement after which a firing alert resolves ("no data").
pub const STALE_WINDOWS: i64 = 10;

pub type Labels = BTreeMap<String, String>;

/// One closed window of a per-window table (today: `metrics`), all series of it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub source: String,
    pub resolution_ms: i64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub batch: RecordBatch,
}

impl Frame {
    /// A `metrics` file's rows (one window of one resolution); `None` when empty.
    pub fn from_metrics(batch: &RecordBatch) -> Option<Frame> {
        if batch.num_rows() == 0 {
            return None;
        }
        let ts = |name: &str| {
            batch
                .column_by_name(name)?
                .as_primitive_opt::<TimestampMillisecondType>()
                .map(|a| a.value(0))
        };
        let (start_ms, end_ms) = (ts("window_start")?, ts("window_end")?);
        Some(Frame {
            source: "metrics".into(),
            resolution_ms: end_ms - start_ms,
            start_ms,
            end_ms,
            batch: batch.clone(),
        })
    }

    /// A `quality` file's rows pivoted to one row per series (see
    /// [`crate::quality::table::frame_batch`]); `None` when empty.
    pub fn from_quality(batch: &RecordBatch) -> Option<Frame> {
        let mut f = Frame::from_metrics(&crate::quality::table::frame_batch(batch)?)?;
        f.source = "quality".into();
        Some(f)
    }

    /// A `drift` file's rows as the frame the drift stage sent when it judged the window (see
    /// [`crate::drift::table::frame_from_table`]); `None` when empty.
    pub fn from_drift(batch: &RecordBatch) -> Option<Frame> {
        let mut f = Frame::from_metrics(&crate::drift::table::frame_from_table(batch)?)?;
        f.source = "drift".into();
        Some(f)
    }

    /// An `experiments` file's rows as one row per experiment and treatment arm (see
    /// [`crate::experiment::table::frame_batch`]); `None` when empty.
    pub fn from_experiments(batch: &RecordBatch) -> Option<Frame> {
        let mut f = Frame::from_metrics(&crate::experiment::table::frame_batch(batch)?)?;
        f.source = "experiments".into();
        Some(f)
    }

    /// The table a frame comes from: its source up to a `:` (the quality stage's deferred
    /// scores are `quality:deferred`, judged by `source = "quality"` rules but tracked apart,
    /// since they close later than the inline scores' windows).
    pub fn table(&self) -> &str {
        self.source.split(':').next().unwrap_or(&self.source)
    }

    fn key(&self) -> String {
        format!("{}/{}", self.source, self.resolution_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Firing,
}

/// An alert that is pending or firing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    #[serde(with = "hex_u64")]
    pub fingerprint: u64,
    pub severity: String,
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    pub state: State,
    /// Window end of the first violating window of this episode.
    pub active_at: i64,
    pub fired_at: Option<i64>,
    pub last_violation: i64,
    /// Window end of the last judged window (violating or clear).
    pub last_judged: i64,
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: f64,
}

/// A change of an alert's state, at a window end.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub at_ms: i64,
    pub rule: String,
    pub fingerprint: u64,
    pub severity: String,
    pub labels: Labels,
    pub from: &'static str,
    pub to: &'static str,
    pub value: f64,
    pub baseline: Option<f64>,
}

/// Alertmanager-style fingerprint: a hash of the sorted label pairs.
pub fn fingerprint(labels: &Labels) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update(&[0xff]);
        h.update(v.as_bytes());
        h.update(&[0xfe]);
    }
    h.digest()
}

pub mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
    }
}

/// Trailing sums in buckets: (Σ a, Σ b) per bucket of `bucket_ms`, the last `slots.len()`
/// buckets kept in a circular buffer of f32 pairs (8 bytes a bucket: a rule over 10,000
/// series with 60 buckets holds ≈ 5 MiB). f32 sums keep 7 significant digits, plenty for
/// ratios against a threshold.
#[derive(Debug, Clone)]
pub(super) struct Ring {
    bucket_ms: i64,
    /// Bucket index of the newest slot; `None` before the first window.
    head: Option<i64>,
    slots: Box<[(f32, f32)]>,
}

impl Ring {
    pub(super) fn new(span_ms: i64, resolution_ms: i64, max_buckets: i64) -> Ring {
        let bucket_ms = (span_ms / max_buckets).max(resolution_ms).max(1);
        let len = (span_ms / bucket_ms) as usize + 1;
        Ring {
            bucket_ms,
            head: None,
            slots: vec![(0.0, 0.0); len].into_boxed_slice(),
        }
    }

    fn slot(&mut self, idx: i64) -> &mut (f32, f32) {
        let n = self.slots.len() as i64;
        &mut self.slots[idx.rem_euclid(n) as usize]
    }

    pub(super) fn add(&mut self, start_ms: i64, a: f64, b: f64) {
        let idx = start_ms.div_euclid(self.bucket_ms);
        let n = self.slots.len() as i64;
        match self.head {
            Some(h) if idx > h => {
                // Newer: clear the buckets skipped over (at most all of them).
                for i in (h + 1).max(idx - n + 1)..=idx {
                    *self.slot(i) = (0.0, 0.0);
                }
                self.head = Some(idx);
            }
            // An older window (out of order), no longer kept.
            Some(h) if idx <= h - n => return,
            Some(_) => {}
            None => self.head = Some(idx),
        }
        let s = self.slot(idx);
        s.0 += a as f32;
        s.1 += b as f32;
    }

    /// Sums over the windows that start in [from_ms, to_ms).
    pub(super) fn sum(&self, from_ms: i64, to_ms: i64) -> (f64, f64) {
        let Some(h) = self.head else {
            return (0.0, 0.0);
        };
        let n = self.slots.len() as i64;
        let lo = from_ms.div_euclid(self.bucket_ms).max(h - n + 1);
        let hi = (to_ms - 1).div_euclid(self.bucket_ms).min(h);
        (lo..=hi).fold((0.0, 0.0), |acc, i| {
            let s = self.slots[i.rem_euclid(n) as usize];
            (acc.0 + f64::from(s.0), acc.1 + f64::from(s.1))
        })
    }
}

/// Exponentially weighted mean and variance (West 1979 / Finch 2009 incremental form).
#[derive(Debug, Clone, Default)]
struct Ewm {
    n: u32,
    mean: f64,
    var: f64,
}

impl Ewm {
    /// Adds `v`. Once `warm`, deviations are clipped at 3 standard deviations (a Huber-style
    /// robust update): an unclipped outlier inflates the variance by α·d², which after a
    /// level shift of 10σ shrinks the z-score below any sane threshold within three windows,
    /// before `for:` could ever elapse. Clipped, a lasting shift keeps a high z for hours and
    /// is absorbed gradually.
    fn update(&mut self, v: f64, alpha: f64, warm: bool) {
        if self.n == 0 {
            self.mean = v;
            self.var = 0.0;
        } else {
            let mut d = v - self.mean;
            if warm {
                let lim = 3.0 * self.sd();
                d = d.clamp(-lim, lim);
            }
            self.mean += alpha * d;
            self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        }
        self.n = self.n.saturating_add(1);
    }

    /// The z-score of `v`. The standard deviation is floored at 1 % of the mean so that a
    /// perfectly flat history does not turn the first wobble into an infinite z.
    fn z(&self, v: f64) -> f64 {
        (v - self.mean) / self.sd()
    }

    fn sd(&self) -> f64 {
        self.var.sqrt().max(self.mean.abs() * 0.01).max(1e-12)
    }
}

/// Adds the rows of prompt version `version` (of series `rule` selects) to a
/// `baseline = { prompt_version }` accumulator: per series without its version, Σ value ×
/// events and Σ events.
fn add_versus(
    acc: &mut HashMap<String, (f64, f64)>,
    rule: &Rule,
    series: &SeriesIndex,
    sids: &[u32],
    metric: &Column<'_>,
    events: Option<&arrow::array::Int64Array>,
    version: &str,
) {
    for (row, &sid) in sids.iter().enumerate() {
        let labels = &series.labels[sid as usize];
        if labels.get("prompt_version").map(String::as_str) != Some(version)
            || !matches_all(&rule.select, |k| labels.get(k).map(String::as_str))
        {
            continue;
        }
        let n = events.map_or(0, |c| c.value(row)) as f64;
        if let Some(v) = metric.get(row).filter(|v| v.is_finite() && n > 0.0) {
            let a = acc.entry(versus_key(labels)).or_insert((0.0, 0.0));
            a.0 += v * n;
            a.1 += n;
        }
    }
}

/// A series' labels without its prompt version: the same series on another version.
fn versus_key(labels: &Labels) -> String {
    let mut k = String::new();
    for (name, v) in labels.iter().filter(|(n, _)| *n != "prompt_version") {
        k.push_str(name);
        k.push('=');
        k.push_str(v);
        k.push('\u{1f}');
    }
    k
}

#[derive(Debug, Clone)]
enum History {
    None,
    Ring(Ring),
    Ewm(Ewm),
    /// A pinned baseline: (Σ value × events, Σ events) over the pinned period.
    Pinned(f64, f64),
}

enum Judgement {
    /// Too few events: no decision.
    Unjudged,
    Clear(f64, Option<f64>),
    Violating(f64, Option<f64>),
}

struct RuleRt {
    rule: Rule,
    /// Per series id: 0 not yet known, 1 selected, 2 not selected.
    selected: Vec<u8>,
    history: Vec<History>,
    active: HashMap<u32, Alert>,
    /// `baseline = { prompt_version }`: per series without its version, (Σ value × events,
    /// Σ events) of the baseline version's windows, and the window start from which live
    /// windows add to it (the hourly roll-ups read at start cover what is before).
    versus: HashMap<String, (f64, f64)>,
    versus_from: i64,
}

/// The series seen so far, by the values of their dimension columns.
#[derive(Default)]
struct SeriesIndex {
    ids: HashMap<u128, u32>,
    labels: Vec<Arc<Labels>>,
    /// `app\u{1f}environment` and `prompt_version`, for series that have all three.
    version_key: Vec<Option<(String, String)>>,
}

/// Per app and environment, what each prompt version did: for the rollback hint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VersionSeen {
    pub first_seen: i64,
    pub last_seen: i64,
    /// Window end of the last window in which a critical alert fired for this version.
    pub bad_until: Option<i64>,
}

/// Everything the engine must not forget across a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineState {
    /// Per `source/resolution`, the end of the last window judged.
    pub evaluated_through: BTreeMap<String, i64>,
    pub alerts: Vec<Alert>,
    /// `app\u{1f}environment` → prompt_version → what it did.
    pub versions: BTreeMap<String, BTreeMap<String, VersionSeen>>,
}

/// What came out of judging one window.
#[derive(Debug, Default)]
pub struct Evaluation {
    pub transitions: Vec<Transition>,
    /// Alerts firing after this window (every one, with current values).
    pub firing: Vec<Alert>,
    /// Fingerprints (with the window end) of alerts that resolved in this window.
    pub resolved: Vec<(Alert, i64)>,
}

pub struct Engine {
    rules: Vec<RuleRt>,
    dimensions: Vec<String>,
    series: SeriesIndex,
    evaluated_through: BTreeMap<String, i64>,
    versions: BTreeMap<String, BTreeMap<String, VersionSeen>>,
    known_good_after_ms: i64,
}

const KEEP_VERSIONS: usize = 32;

impl Engine {
    pub fn new(rules: Vec<Rule>, dimensions: Vec<String>, known_good_after_ms: i64) -> Engine {
        Engine {
            rules: rules
                .into_iter()
                .map(|rule| RuleRt {
                    rule,
                    selected: Vec::new(),
                    history: Vec::new(),
                    active: HashMap::new(),
                    versus: HashMap::new(),
                    versus_from: i64::MIN,
                })
                .collect(),
            dimensions,
            series: SeriesIndex::default(),
            evaluated_through: BTreeMap::new(),
            versions: BTreeMap::new(),
            known_good_after_ms,
        }
    }

    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|r| &r.rule)
    }

    /// Restores alerts and version history; alerts of rules that no longer exist are dropped
    /// (returned, so the driver can say so).
    pub fn restore(&mut self, state: EngineState) -> Vec<Alert> {
        self.evaluated_through = state.evaluated_through;
        self.versions = state.versions;
        let mut dropped = Vec::new();
        for a in state.alerts {
            let Some(ri) = self.rules.iter().position(|r| r.rule.name == a.rule) else {
                dropped.push(a);
                continue;
            };
            let values: Vec<Option<&str>> = self
                .dimensions
                .iter()
                .map(|d| a.labels.get(d).map(String::as_str))
                .collect();
            let sid = self.series.intern(&self.dimensions, &values);
            self.rules[ri].active.insert(sid, a);
        }
        dropped
    }

    pub fn state(&self) -> EngineState {
        let mut alerts: Vec<Alert> = self
            .rules
            .iter()
            .flat_map(|r| r.active.values().cloned())
            .collect();
        alerts.sort_by_key(|a| a.fingerprint);
        EngineState {
            evaluated_through: self.evaluated_through.clone(),
            alerts,
            versions: self.versions.clone(),
        }
    }

    /// Every pending and firing alert.
    pub fn alerts(&self) -> impl Iterator<Item = &Alert> {
        self.rules.iter().flat_map(|r| r.active.values())
    }

    /// Whether `frame` was already judged (before a restart): feed it to [`Engine::warm`].
    pub fn already_judged(&self, frame: &Frame) -> bool {
        self.evaluated_through
            .get(&frame.key())
            .is_some_and(|t| frame.end_ms <= *t)
    }

    /// Feeds a window judged before a restart into the rules' histories only.
    pub fn warm(&mut self, frame: &Frame) {
        self.run(frame, false);
    }

    /// Feeds a window into the histories and counts it as judged without judging it (the
    /// first start over an existing table: old windows are history, not news).
    pub fn warm_as_judged(&mut self, frame: &Frame) {
        self.run(frame, false);
        let t = self
            .evaluated_through
            .entry(frame.key())
            .or_insert(i64::MIN);
        *t = (*t).max(frame.end_ms);
    }

    /// Sets the pinned baselines (`change = { baseline = { from, to } }`) from the windows of
    /// their period: per series, the request-weighted mean of the rule's metric.
    pub fn pin(&mut self, frames: &[Frame]) {
        for f in frames {
            let batch = &f.batch;
            let sids = self.series.intern_rows(&self.dimensions, batch);
            let events = int_column(batch, "events");
            for rt in &mut self.rules {
                let Condition::Change {
                    pinned: Some((from, to)),
                    ..
                } = rt.rule.condition
                else {
                    continue;
                };
                if rt.rule.source != f.table()
                    || rt.rule.resolution_ms != f.resolution_ms
                    || f.start_ms < from
                    || f.start_ms >= to
                {
                    continue;
                }
                let Some(metric) = numeric_column(batch, &rt.rule.metric) else {
                    continue;
                };
                if rt.history.len() < self.series.labels.len() {
                    rt.history.resize(self.series.labels.len(), History::None);
                }
                for (row, &sid) in sids.iter().enumerate() {
                    let labels = &self.series.labels[sid as usize];
                    if !matches_all(&rt.rule.select, |k| labels.get(k).map(String::as_str)) {
                        continue;
                    }
                    let n = events.map_or(0, |c| c.value(row)) as f64;
                    let Some(v) = metric.get(row).filter(|v| v.is_finite()) else {
                        continue;
                    };
                    let h = &mut rt.history[sid as usize];
                    match h {
                        History::Pinned(ws, w) => {
                            *ws += v * n;
                            *w += n;
                        }
                        _ => *h = History::Pinned(v * n, n),
                    }
                }
            }
        }
    }

    /// How far back the `baseline = { prompt_version }` rules read the hourly roll-ups when
    /// the stage starts (the longest `within`; 0: no such rule).
    pub fn versus_within_ms(&self) -> i64 {
        self.rules
            .iter()
            .filter_map(|r| match &r.rule.condition {
                Condition::Change {
                    versus: Some((_, within)),
                    ..
                } => Some(*within),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Seeds the `baseline = { prompt_version }` rules with the hourly roll-ups of their
    /// version (`rollup_ms` windows of the rule's table that start at or after `since`); live
    /// windows add from the end of the last one on.
    pub fn pin_versus(&mut self, frames: &[Frame], rollup_ms: i64, now_ms: i64) {
        for f in frames.iter().filter(|f| f.resolution_ms == rollup_ms) {
            let sids = self.series.intern_rows(&self.dimensions, &f.batch);
            let events = int_column(&f.batch, "events");
            for rt in &mut self.rules {
                let Condition::Change {
                    versus: Some((x, within)),
                    ..
                } = &rt.rule.condition
                else {
                    continue;
                };
                if rt.rule.source != f.table() || f.start_ms < now_ms - within {
                    continue;
                }
                let Some(m) = numeric_column(&f.batch, &rt.rule.metric) else {
                    continue;
                };
                add_versus(&mut rt.versus, &rt.rule, &self.series, &sids, &m, events, x);
                rt.versus_from = rt.versus_from.max(f.end_ms);
            }
        }
    }

    /// The pinned periods the rules need: (from, to) in epoch ms.
    pub fn pinned_periods(&self) -> Vec<(i64, i64)> {
        self.rules
            .iter()
            .filter_map(|r| match r.rule.condition {
                Condition::Change { pinned, .. } => pinned,
                _ => None,
            })
            .collect()
    }

    /// How far back the rules look: the longest trailing period or burn-rate long window,
    /// or four z-score half-lives; at most a day.
    pub fn history_ms(&self) -> i64 {
        self.rules
            .iter()
            .map(|r| match r.rule.condition {
                Condition::Threshold { .. } => 0,
                Condition::Change {
                    pinned: Some(_), ..
                } => 0,
                // The hour the roll-ups do not cover yet.
                Condition::Change {
                    versus: Some(_), ..
                } => 3_600_000,
                Condition::Change { trailing_ms, .. } => trailing_ms,
                Condition::BurnRate { long_ms, .. } => long_ms,
                Condition::ZScore { half_life_ms, .. } => half_life_ms.saturating_mul(4),
            })
            .max()
            .unwrap_or(0)
            .min(24 * 3_600_000)
    }

    /// Judges a closed window.
    pub fn evaluate(&mut self, frame: &Frame) -> Evaluation {
        if self.already_judged(frame) {
            return Evaluation::default();
        }
        let ev = self.run(frame, true);
        self.evaluated_through.insert(frame.key(), frame.end_ms);
        ev
    }

    /// The most recent prompt version of `app`/`environment` that ran for the known-good
    /// period with no critical alert firing for it.
    pub fn known_good(&self, app: &str, environment: &str) -> Option<&str> {
        known_good(
            &self.versions,
            self.known_good_after_ms,
            app,
            environment,
            None,
        )
    }

    fn run(&mut self, frame: &Frame, judge: bool) -> Evaluation {
        let batch = &frame.batch;
        // Experiment frames are labelled by experiment and arm, not by series dimensions.
        let sids = if frame.table() == "experiments" {
            let dims = experiment_dimensions();
            self.series.intern_rows(&dims, batch)
        } else {
            self.series.intern_rows(&self.dimensions, batch)
        };
        let events = int_column(batch, "events");
        let errors = int_column(batch, "errors");
        if judge {
            self.see_versions(frame, &sids);
        }
        let mut ev = Evaluation::default();
        let end = frame.end_ms;
        let versions = &self.versions;
        let kg_after = self.known_good_after_ms;
        for rt in &mut self.rules {
            let rule = &rt.rule;
            if rule.source != frame.table() || rule.resolution_ms != frame.resolution_ms {
                continue;
            }
            let metric = numeric_column(batch, &rule.metric);
            // A metric may carry its own sample count (`<metric>__n`: the scores behind a
            // quality rate); `min_samples` checks that, else the window's events.
            let events = int_column(batch, &format!("{}__n", rule.metric)).or(events);
            let slow = match rule.condition {
                Condition::BurnRate {
                    slow_above_ms: Some(t),
                    ..
                } => Some((
                    t,
                    batch
                        .column_by_name("latency_ms_hist")
                        .and_then(|c| c.as_binary_opt::<i32>().cloned()),
                )),
                _ => None,
            };
            let series_count = self.series.labels.len();
            if rt.selected.len() < series_count {
                rt.selected.resize(series_count, 0);
            }
            let threshold = match rule.condition {
                Condition::Threshold { cmp, value } => Some((cmp, value)),
                _ => None,
            };
            if threshold.is_none() && rt.history.len() < series_count {
                rt.history.resize(series_count, History::None);
            }
            // `baseline = { prompt_version }`: this window's rows of that version join its
            // baseline before the other versions are judged against it.
            let versus = match &rule.condition {
                Condition::Change {
                    versus: Some((x, _)),
                    ..
                } => Some(x.as_str()),
                _ => None,
            };
            if let (Some(x), Some(m)) = (versus, metric.as_ref())
                && frame.start_ms >= rt.versus_from
            {
                add_versus(&mut rt.versus, rule, &self.series, &sids, m, events, x);
            }
            let min = rule.min_samples as i64;
            let has_active = !rt.active.is_empty();
            let mut judged_now: Vec<(u32, Judgement)> = Vec::new();
            for (row, &sid) in sids.iter().enumerate() {
                let s = sid as usize;
                if rt.selected[s] == 0 {
                    let labels = &self.series.labels[s];
                    let ok = matches_all(&rule.select, |k| labels.get(k).map(String::as_str));
                    rt.selected[s] = if ok { 1 } else { 2 };
                }
                if rt.selected[s] != 1 {
                    continue;
                }
                let n = events.map_or(0, |c| c.value(row));
                // The hot path: a stateless threshold, judged without building anything
                // unless it is violated or the series has an alert.
                let j = if let Some((cmp, t)) = threshold {
                    match metric.as_ref().and_then(|m| m.get(row)) {
                        Some(v) if n >= min && v.is_finite() => {
                            if cmp.holds(v, t) {
                                Judgement::Violating(v, None)
                            } else {
                                Judgement::Clear(v, None)
                            }
                        }
                        _ => Judgement::Unjudged,
                    }
                } else if let Condition::BurnRate { .. } = rule.condition {
                    let bad = match &slow {
                        Some((t, Some(hist))) => slow_count(hist.value(row), *t),
                        Some((_, None)) => 0.0,
                        None => errors.map_or(0, |c| c.value(row)) as f64,
                    };
                    judge_burn(rule, &mut rt.history[s], frame, bad, n as f64)
                } else {
                    let v = metric.as_ref().and_then(|m| m.get(row));
                    if let Some(x) = versus {
                        let labels = &self.series.labels[s];
                        // The baseline version is not judged against itself.
                        rt.history[s] = match labels.get("prompt_version").map(String::as_str) {
                            Some(pv) if pv != x => rt
                                .versus
                                .get(&versus_key(labels))
                                .map_or(History::None, |(ws, w)| History::Pinned(*ws, *w)),
                            _ => History::None,
                        };
                    }
                    judge_value(rule, &mut rt.history[s], frame, v, n as f64)
                };
                if !judge {
                    continue;
                }
                match j {
                    Judgement::Violating(..) => judged_now.push((sid, j)),
                    _ if has_active && rt.active.contains_key(&sid) => judged_now.push((sid, j)),
                    _ => {}
                }
            }
            if !judge {
                continue;
            }
            // Alerts whose series had no row in this window are unjudged too.
            if has_active {
                let mut seen: std::collections::HashSet<u32> =
                    judged_now.iter().map(|(s, _)| *s).collect();
                for sid in rt.active.keys() {
                    if seen.insert(*sid) {
                        judged_now.push((*sid, Judgement::Unjudged));
                    }
                }
            }
            for (sid, j) in judged_now {
                step(
                    rt,
                    &self.series.labels[sid as usize],
                    sid,
                    j,
                    end,
                    &mut ev,
                    &|a: &str, e: &str, x: Option<&str>| {
                        known_good(versions, kg_after, a, e, x).map(str::to_owned)
                    },
                );
            }
            ev.firing.extend(
                rt.active
                    .values()
                    .filter(|a| a.state == State::Firing)
                    .cloned(),
            );
        }
        if judge {
            self.mark_bad_versions(&ev.firing, end);
        }
        ev
    }

    fn see_versions(&mut self, frame: &Frame, sids: &[u32]) {
        for &sid in sids {
            let Some((key, v)) = &self.series.version_key[sid as usize] else {
                continue;
            };
            let per = match self.versions.get_mut(key.as_str()) {
                Some(p) => p,
                None => self.versions.entry(key.clone()).or_default(),
            };
            match per.get_mut(v.as_str()) {
                Some(seen) => {
                    seen.first_seen = seen.first_seen.min(frame.start_ms);
                    seen.last_seen = seen.last_seen.max(frame.end_ms);
                }
                None => {
                    per.insert(
                        v.clone(),
                        VersionSeen {
                            first_seen: frame.start_ms,
                            last_seen: frame.end_ms,
                            bad_until: None,
                        },
                    );
                    if per.len() > KEEP_VERSIONS {
                        let oldest = per
                            .iter()
                            .min_by_key(|(_, s)| s.last_seen)
                            .map(|(k, _)| k.clone());
                        if let Some(k) = oldest {
                            per.remove(&k);
                        }
                    }
                }
            }
        }
    }

    fn mark_bad_versions(&mut self, firing: &[Alert], end: i64) {
        for a in firing {
            if a.severity != Severity::Critical.as_str() {
                continue;
            }
            let (Some(app), Some(env), Some(v)) = (
                a.labels.get("app"),
                a.labels.get("environment"),
                a.labels.get("prompt_version"),
            ) else {
                continue;
            };
            if let Some(seen) = self
                .versions
                .get_mut(&format!("{app}\u{1f}{env}"))
                .and_then(|p| p.get_mut(v))
            {
                seen.bad_until = Some(seen.bad_until.map_or(end, |b| b.max(end)));
            }
        }
    }
}

/// The most recent prompt version (by first appearance) of `app`/`environment` that ran for
/// `after_ms` since it was last involved in a critical alert (or since it appeared), other
/// than `except`.
pub fn known_good<'a>(
    versions: &'a BTreeMap<String, BTreeMap<String, VersionSeen>>,
    after_ms: i64,
    app: &str,
    environment: &str,
    except: Option<&str>,
) -> Option<&'a str> {
    versions
        .get(&format!("{app}\u{1f}{environment}"))?
        .iter()
        .filter(|(v, _)| Some(v.as_str()) != except)
        .filter(|(_, s)| {
            s.last_seen - s.bad_until.unwrap_or(i64::MIN).max(s.first_seen) >= after_ms
        })
        .max_by_key(|(_, s)| s.first_seen)
        .map(|(v, _)| v.as_str())
}

impl SeriesIndex {
    /// The series id of every row of a frame, by its dimension columns.
    fn intern_rows(&mut self, dims: &[String], batch: &RecordBatch) -> Vec<u32> {
        let cols: Vec<Option<&arrow::array::StringArray>> = dims
            .iter()
            .map(|d| {
                batch
                    .column_by_name(d)
                    .and_then(|c| c.as_string_opt::<i32>())
            })
            .collect();
        let mut values: Vec<Option<&str>> = vec![None; cols.len()];
        (0..batch.num_rows())
            .map(|i| {
                for (v, c) in values.iter_mut().zip(&cols) {
                    *v = c.and_then(|c| (!c.is_null(i)).then(|| c.value(i)));
                }
                self.intern(dims, &values)
            })
            .collect()
    }

    fn intern(&mut self, dims: &[String], values: &[Option<&str>]) -> u32 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        // The label names too: frames of different tables carry different labels.
        for d in dims {
            h.update(d.as_bytes());
            h.update(&[0xfd]);
        }
        for v in values {
            match v {
                Some(s) => {
                    h.update(&[1]);
                    h.update(s.as_bytes());
                    h.update(&[0xff]);
                }
                None => h.update(&[0]),
            }
        }
        let key = h.digest128();
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = self.labels.len() as u32;
        let labels: Labels = dims
            .iter()
            .zip(values)
            .filter_map(|(d, v)| v.map(|v| (d.clone(), v.to_owned())))
            .collect();
        let vk = match (
            labels.get("app"),
            labels.get("environment"),
            labels.get("prompt_version"),
        ) {
            (Some(a), Some(e), Some(v)) => Some((format!("{a}\u{1f}{e}"), v.clone())),
            _ => None,
        };
        self.version_key.push(vk);
        self.labels.push(Arc::new(labels));
        self.ids.insert(key, id);
        id
    }
}

fn int_column<'a>(b: &'a RecordBatch, name: &str) -> Option<&'a arrow::array::Int64Array> {
    b.column_by_name(name)?.as_primitive_opt::<Int64Type>()
}

/// A numeric column of a frame.
enum Column<'a> {
    F64(&'a arrow::array::Float64Array),
    I64(&'a arrow::array::Int64Array),
}

impl Column<'_> {
    #[inline]
    fn get(&self, i: usize) -> Option<f64> {
        match self {
            Column::F64(a) => (!a.is_null(i)).then(|| a.value(i)),
            Column::I64(a) => (!a.is_null(i)).then(|| a.value(i) as f64),
        }
    }
}

fn numeric_column<'a>(b: &'a RecordBatch, name: &str) -> Option<Column<'a>> {
    let c = b.column_by_name(name)?;
    match c.data_type() {
        DataType::Float64 => Some(Column::F64(c.as_primitive::<Float64Type>())),
        DataType::Int64 => Some(Column::I64(c.as_primitive::<Int64Type>())),
        _ => None,
    }
}

/// Requests slower than `threshold_ms` in a serialized latency histogram.
fn slow_count(bytes: &[u8], threshold_ms: f64) -> f64 {
    match crate::metrics::series::deserialize(bytes) {
        Ok(h) => {
            let t = threshold_ms.max(0.0) as u64;
            let at_or_below = h
                .iter_recorded()
                .filter(|v| v.value_iterated_to() <= t)
                .map(|v| v.count_at_value())
                .sum::<u64>();
            (h.len() - at_or_below) as f64
        }
        Err(_) => 0.0,
    }
}

fn judge_value(
    rule: &Rule,
    hist: &mut History,
    frame: &Frame,
    v: Option<f64>,
    n: f64,
) -> Judgement {
    let Some(v) = v.filter(|v| v.is_finite()) else {
        return Judgement::Unjudged;
    };
    let enough = n >= rule.min_samples as f64;
    match &rule.condition {
        Condition::Threshold { cmp, value } => {
            if !enough {
                Judgement::Unjudged
            } else if cmp.holds(v, *value) {
                Judgement::Violating(v, None)
            } else {
                Judgement::Clear(v, None)
            }
        }
        Condition::Change {
            kind,
            cmp,
            value,
            trailing_ms,
            pinned,
            versus,
        } => {
            let fixed = pinned.is_some() || versus.is_some();
            let (ws, w) = match (fixed, &mut *hist) {
                (true, History::Pinned(ws, w)) => (*ws, *w),
                // A series the pinned period did not see has no baseline.
                (true, _) => return Judgement::Unjudged,
                (false, hist) => {
                    if matches!(hist, History::None) {
                        *hist = History::Ring(Ring::new(*trailing_ms, rule.resolution_ms, 60));
                    }
                    let History::Ring(ring) = hist else {
                        return Judgement::Unjudged;
                    };
                    let sums = ring.sum(frame.start_ms - trailing_ms, frame.start_ms);
                    if n > 0.0 {
                        ring.add(frame.start_ms, v * n, n);
                    }
                    sums
                }
            };
            if !enough || w < rule.min_samples.max(1) as f64 {
                return Judgement::Unjudged;
            }
            let base = ws / w;
            let stat = match kind {
                ChangeKind::Ratio if base > 0.0 => v / base,
                ChangeKind::Ratio => return Judgement::Unjudged,
                ChangeKind::Difference => v - base,
            };
            if cmp.holds(stat, *value) {
                Judgement::Violating(v, Some(base))
            } else {
                Judgement::Clear(v, Some(base))
            }
        }
        Condition::ZScore {
            cmp,
            value,
            half_life_ms,
            min_history,
        } => {
            if matches!(hist, History::None) {
                *hist = History::Ewm(Ewm::default());
            }
            let History::Ewm(ewm) = hist else {
                return Judgement::Unjudged;
            };
            if !enough {
                return Judgement::Unjudged;
            }
            let before = ewm.clone();
            let alpha = 1.0 - 0.5f64.powf(rule.resolution_ms as f64 / *half_life_ms as f64);
            ewm.update(v, alpha, before.n >= *min_history);
            if before.n < *min_history {
                return Judgement::Unjudged;
            }
            let z = before.z(v);
            if cmp.holds(z, *value) {
                Judgement::Violating(v, Some(before.mean))
            } else {
                Judgement::Clear(v, Some(before.mean))
            }
        }
        Condition::BurnRate { .. } => Judgement::Unjudged,
    }
}

fn judge_burn(rule: &Rule, hist: &mut History, frame: &Frame, bad: f64, n: f64) -> Judgement {
    let Condition::BurnRate {
        objective,
        long_ms,
        short_ms,
        factor,
        ..
    } = rule.condition
    else {
        return Judgement::Unjudged;
    };
    if matches!(hist, History::None) {
        *hist = History::Ring(Ring::new(long_ms, rule.resolution_ms, 120));
    }
    let History::Ring(ring) = hist else {
        return Judgement::Unjudged;
    };
    ring.add(frame.start_ms, bad, n);
    let budget = 1.0 - objective;
    let (lb, ln) = ring.sum(frame.end_ms - long_ms, frame.end_ms);
    let (sb, sn) = ring.sum(frame.end_ms - short_ms, frame.end_ms);
    if sn < rule.min_samples as f64 || ln <= 0.0 || sn <= 0.0 {
        return Judgement::Unjudged;
    }
    let (long, short) = ((lb / ln) / budget, (sb / sn) / budget);
    if long > factor && short > factor {
        Judgement::Violating(long, Some(short))
    } else {
        Judgement::Clear(long, Some(short))
    }
}

fn threshold_of(c: &Condition) -> f64 {
    match c {
        Condition::Threshold { value, .. }
        | Condition::Change { value, .. }
        | Condition::ZScore { value, .. } => *value,
        Condition::BurnRate { factor, .. } => *factor,
    }
}

/// (app, environment, a version to leave out) → the last known-good version.
type KnownGood<'a> = dyn Fn(&str, &str, Option<&str>) -> Option<String> + 'a;

/// Moves one (rule, series) through the lifecycle.
fn step(
    rt: &mut RuleRt,
    series: &Labels,
    sid: u32,
    j: Judgement,
    end: i64,
    ev: &mut Evaluation,
    known_good: &KnownGood,
) {
    let RuleRt { rule, active, .. } = rt;
    let transition = |a: &Alert, from: &'static str, to: &'static str| Transition {
        at_ms: end,
        rule: a.rule.clone(),
        fingerprint: a.fingerprint,
        severity: a.severity.clone(),
        labels: a.labels.clone(),
        from,
        to,
        value: a.value,
        baseline: a.baseline,
    };
    match j {
        Judgement::Violating(value, baseline) => {
            let new = !active.contains_key(&sid);
            let a = active.entry(sid).or_insert_with(|| {
                let mut labels = series.clone();
                labels.extend(rule.labels.clone());
                labels.insert("alertname".into(), rule.name.clone());
                labels.insert("severity".into(), rule.severity.as_str().into());
                Alert {
                    rule: rule.name.clone(),
                    fingerprint: fingerprint(&labels),
                    severity: rule.severity.as_str().into(),
                    labels,
                    annotations: BTreeMap::new(),
                    state: State::Pending,
                    active_at: end,
                    fired_at: None,
                    last_violation: end,
                    last_judged: end,
                    value,
                    baseline,
                    threshold: threshold_of(&rule.condition),
                }
            });
            a.value = value;
            a.baseline = baseline;
            a.last_violation = end;
            a.last_judged = end;
            if new {
                ev.transitions.push(transition(a, "inactive", "pending"));
            }
            if a.state == State::Pending && end - a.active_at >= rule.for_ms {
                a.state = State::Firing;
                a.fired_at = Some(end);
                ev.transitions.push(transition(a, "pending", "firing"));
            }
            annotate(a, rule, end, known_good);
        }
        Judgement::Clear(value, baseline) => {
            let Some(a) = active.get_mut(&sid) else {
                return;
            };
            a.value = value;
            a.baseline = baseline;
            a.last_judged = end;
            // Annotations show the numbers of the window that cleared it, too.
            annotate(a, rule, end, known_good);
            match a.state {
                State::Pending => {
                    let a = active.remove(&sid).expect("present");
                    ev.transitions.push(transition(&a, "pending", "inactive"));
                }
                State::Firing if end - a.last_violation >= rule.keep_firing_for_ms => {
                    let a = active.remove(&sid).expect("present");
                    ev.transitions.push(transition(&a, "firing", "resolved"));
                    ev.resolved.push((a, end));
                }
                State::Firing => {}
            }
        }
        Judgement::Unjudged => {
            let Some(a) = active.get(&sid) else {
                return;
            };
            match a.state {
                State::Pending => {
                    let a = active.remove(&sid).expect("present");
                    ev.transitions.push(transition(&a, "pending", "inactive"));
                }
                State::Firing if end - a.last_judged >= STALE_WINDOWS * rule.resolution_ms => {
                    let a = active.remove(&sid).expect("present");
                    ev.transitions.push(transition(&a, "firing", "resolved"));
                    ev.resolved.push((a, end));
                }
                State::Firing => {}
            }
        }
    }
}

struct AlertScope<'a> {
    alert: &'a Alert,
    rule: &'a Rule,
    window_end: i64,
    rollback_to: Option<String>,
}

impl Scope for AlertScope<'_> {
    fn var(&self, v: &Var) -> String {
        let a = self.alert;
        match v {
            Var::Series(d) | Var::Label(d) => a.labels.get(d).cloned().unwrap_or_default(),
            Var::Value => human(a.value),
            Var::Baseline => a.baseline.map(human).unwrap_or_else(|| "n/a".into()),
            Var::Threshold => human(a.threshold),
            Var::Rule => self.rule.name.clone(),
            Var::Severity => a.severity.clone(),
            Var::Window => crate::metrics::fmt_ms(self.window_end),
            Var::RollbackTo => self.rollback_to.clone().unwrap_or_default(),
        }
    }
}

/// Renders the rule's annotations and adds the rollback hint.
fn annotate(a: &mut Alert, rule: &Rule, end: i64, known_good: &KnownGood) {
    let rollback_to = match (
        a.labels.get("app"),
        a.labels.get("environment"),
        a.labels.get("prompt_version"),
    ) {
        // A version with a critical alert firing is not a rollback target, even before the
        // window's end marks it so.
        (Some(app), Some(env), Some(v)) => {
            let own_bad = a.severity == Severity::Critical.as_str() && a.state == State::Firing;
            known_good(app, env, own_bad.then_some(v.as_str())).filter(|g| g != v)
        }
        _ => None,
    };
    let scope = AlertScope {
        alert: a,
        rule,
        window_end: end,
        rollback_to: rollback_to.clone(),
    };
    let mut out: BTreeMap<String, String> = rule
        .annotations
        .iter()
        .map(|(k, t)| (k.clone(), t.render(&scope)))
        .collect();
    if let Some(g) = rollback_to {
        let app = a.labels.get("app").cloned().unwrap_or_default();
        let env = a.labels.get("environment").cloned().unwrap_or_default();
        out.insert(
            "rollback".into(),
            format!("roll back {app}/{env} to prompt_version {g} (the last known-good version)"),
        );
        out.insert("rollback_to".into(), g);
    }
    a.annotations = out;
}
