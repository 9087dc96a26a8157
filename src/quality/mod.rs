//! The quality stage: a deterministic sample of production events is scored, each score
//! becomes a `scores` row, and per series and window the scores become pass rates with
//! confidence intervals in the `quality` table, which alert rules read.
//!
//! In: decoded events (after cost). Out: `scores` rows that travel in the same [`SinkJob`]
//! as their events (one manifest, one commit: exactly-once with the events, and a replay after
//! a crash rewrites the same files), and per-scorer counts in the event's metrics window
//! ([`QualityCounts`], merged into the roll-up like the histograms).
//!
//! ## Sampling
//! An event is sampled when `xxh3(event_id)` mapped to [0, 1) is below the rate of its series
//! (the first `[[quality.sample]]` rule whose matchers accept the event, else `sample_rate`),
//! or always when it is an error or carries negative feedback. The decision depends on the
//! event id alone, so reruns, replays and several instances pick the same events, and a
//! scorer's own lower `sample_rate` selects a subset of the same sample (nested).
//!
//! ## Crash safety
//! Scores are written with the events, so they share the events' exactly-once protocol. The
//! counts live in the metrics window: after a restart the metrics stage rebuilds open windows
//! from `events` and scores those events again (scorers are deterministic), so counts are
//! neither lost nor doubled.
//!
//! [`SinkJob`]: crate::sink::SinkJob

pub mod config;
pub mod custom;
pub mod deferred;
pub mod judge;
pub mod pii;
pub mod scorer;
pub mod table;

use std::sync::Arc;

use crate::alert::rule::Matcher;
use crate::event::LlmEvent;
pub use scorer::{Case, Category, Check, Field, Score};

/// A configured scorer.
#[derive(Debug, Clone)]
pub struct ScorerDef {
    /// `evaluation_name` in the scores table.
    pub name: String,
    pub version: String,
    /// The check's type name as configured (`exact_match`, `pii`…).
    pub kind: &'static str,
    pub check: Check,
    pub field: Field,
    pub category: Category,
    /// Scores only this share of the rate-sampled events (a nested subsample).
    pub sample_rate: Option<f64>,
    /// Scores only events these matchers accept.
    pub when: Vec<Matcher>,
}

impl PartialEq for ScorerDef {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.version == o.version
            && self.kind == o.kind
            && format!("{:?}", self.check) == format!("{:?}", o.check)
            && self.field == o.field
            && self.category == o.category
            && self.sample_rate == o.sample_rate
            && self.when == o.when
    }
}

/// A sampling rule: events its matchers accept are sampled at `rate` (1 = always).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRule {
    pub when: Vec<Matcher>,
    pub rate: f64,
}

/// `[quality]` of a pipeline file (see [`config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct QualityConfig {
    pub sample_rate: f64,
    pub always_errors: bool,
    pub always_negative_feedback: bool,
    /// Events the drift stage names as what moved most in a drifted window are scored too
    /// (by every scorer, after the window is judged).
    pub always_drift_outliers: bool,
    pub rules: Vec<SampleRule>,
    pub scorers: Vec<ScorerDef>,
    /// The judge endpoint of `llm_judge` scorers (`[quality.judge]`).
    pub judge: judge::JudgeConfig,
    /// Judge tokens (prompt + completion) per clock hour; 0 = no limit. When spent, judge
    /// scorers skip events (counted) until the next hour.
    pub budget_tokens_per_hour: u64,
    /// The verdict cache file (default `<data_root>/_state/quality/judge-cache.jsonl`).
    pub judge_cache: Option<std::path::PathBuf>,
    /// Sampled events waiting for deferred scorers, at most; beyond, new ones are dropped and
    /// counted (ingestion never waits for a judge).
    pub deferred_queue: usize,
}

impl Default for QualityConfig {
    fn default() -> Self {
        QualityConfig {
            sample_rate: 0.1,
            always_errors: true,
            always_negative_feedback: true,
            always_drift_outliers: true,
            rules: Vec::new(),
            scorers: Vec::new(),
            judge: judge::JudgeConfig::default(),
            budget_tokens_per_hour: 0,
            judge_cache: None,
            deferred_queue: 10_000,
        }
    }
}

impl QualityConfig {
    /// Whether the stage has anything to do.
    pub fn enabled(&self) -> bool {
        !self.scorers.is_empty()
    }
}

/// Why an event was sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleReason {
    Rate,
    Rule,
    Error,
    NegativeFeedback,
    /// Named by a drift explanation (one of the texts that moved most); scored by the
    /// deferred stage, and kept out of the per-window rates (they would bias them).
    DriftOutlier,
}

impl SampleReason {
    pub fn name(self) -> &'static str {
        match self {
            SampleReason::Rate => "rate",
            SampleReason::Rule => "rule",
            SampleReason::Error => "error",
            SampleReason::NegativeFeedback => "negative_feedback",
            SampleReason::DriftOutlier => "drift_outlier",
        }
    }
}

/// An event's position in [0, 1): its sampling coordinate.
pub fn sample_point(event_id: &str) -> f64 {
    (xxhash_rust::xxh3::xxh3_64(event_id.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}

fn field_of<'e>(e: &'e LlmEvent<'_>, name: &str) -> Option<&'e str> {
    if name == "status" {
        return Some(&e.status);
    }
    if let Some(v) = e.text_fields().into_iter().find(|(n, _)| *n == name) {
        return v.1;
    }
    let key = name.strip_prefix("attributes.")?;
    e.attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| &**v)
}

/// Whether every matcher accepts the event (matchers name event fields, `status`, or
/// `attributes.<key>`).
pub fn event_matches(ms: &[Matcher], e: &LlmEvent<'_>) -> bool {
    ms.iter().all(|m| m.matches(field_of(e, &m.name)))
}

/// One scorer's verdict on one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub scorer: usize,
    pub score: Score,
}

/// The sampler and the scorers, shared by the ingest path and the metrics rebuild.
#[derive(Debug)]
pub struct Quality {
    config: QualityConfig,
}

impl Quality {
    pub fn new(config: QualityConfig) -> Arc<Quality> {
        Arc::new(Quality { config })
    }

    pub fn config(&self) -> &QualityConfig {
        &self.config
    }

    pub fn scorers(&self) -> &[ScorerDef] {
        &self.config.scorers
    }

    /// Whether the event is sampled, and why; with its sampling coordinate.
    pub fn sample(&self, e: &LlmEvent<'_>) -> Option<(SampleReason, f64)> {
        let c = &self.config;
        let u = sample_point(&e.event_id);
        if c.always_errors && (e.status == "error" || e.error_type.is_some()) {
            return Some((SampleReason::Error, u));
        }
        if c.always_negative_feedback && e.feedback.is_some_and(|f| f < 0.0) {
            return Some((SampleReason::NegativeFeedback, u));
        }
        if let Some(rule) = c.rules.iter().find(|r| event_matches(&r.when, e)) {
            return (u < rule.rate).then_some((SampleReason::Rule, u));
        }
        (u < c.sample_rate).then_some((SampleReason::Rate, u))
    }

    /// Samples and scores one event: the verdicts go to `out` (cleared first). Returns why the
    /// event was sampled, `None` when it was not.
    pub fn assess(&self, e: &LlmEvent<'_>, out: &mut Vec<Scored>) -> Option<SampleReason> {
        out.clear();
        let (reason, u) = self.sample(e)?;
        let case = Case::of(e);
        for (i, s) in self.config.scorers.iter().enumerate() {
            let nested = reason != SampleReason::Rate || s.sample_rate.is_none_or(|r| u < r);
            if !nested || !event_matches(&s.when, e) {
                continue;
            }
            if let Some(score) = s.check.score(&case, s.field) {
                out.push(Scored { scorer: i, score });
            }
        }
        Some(reason)
    }
}

/// Per scorer, in one series' window: how many events it scored, how many passed, and the
/// sum of their values. Mergeable (sums).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QualityCounts {
    /// Events sampled (scored by at least the sampler; scorers may not all apply).
    pub sampled: u64,
    /// Indexed by scorer.
    pub scorers: Vec<ScorerCounts>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScorerCounts {
    pub n: u64,
    pub passed: u64,
    pub value_sum: f64,
}

impl QualityCounts {
    pub fn observe(&mut self, scored: &[Scored]) {
        self.sampled += 1;
        for s in scored {
            if self.scorers.len() <= s.scorer {
                self.scorers.resize(s.scorer + 1, ScorerCounts::default());
            }
            let c = &mut self.scorers[s.scorer];
            c.n += 1;
            c.passed += u64::from(s.score.passed);
            c.value_sum += s.score.value;
        }
    }

    pub fn merge(&mut self, other: &QualityCounts) {
        self.sampled += other.sampled;
        if self.scorers.len() < other.scorers.len() {
            self.scorers
                .resize(other.scorers.len(), ScorerCounts::default());
        }
        for (a, b) in self.scorers.iter_mut().zip(&other.scorers) {
            a.n += b.n;
            a.passed += b.passed;
            a.value_sum += b.value_sum;
        }
    }
}

/// Wilson score interval for a binomial proportion at 95 % (z = 1.96): well-behaved for the
/// small counts and extreme rates a sampled minute has, unlike the normal approximation.
pub fn wilson(passed: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n_f = n as f64;
    let p = passed as f64 / n_f;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n_f)) / (1.0 + z2 / n_f);
    let half = z / (1.0 + z2 / n_f) * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    let low = if passed == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let high = if passed == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (low, high)
}

#[cfg(test)]
mod judge_tests;
#[cfg(test)]
mod tests;
