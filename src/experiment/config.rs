//! Experiment definitions: `[experiments]` (settings shared by all) and one `[[experiment]]`
//! per experiment in a pipeline file.
//!
//! ```toml
//! [[experiment]]
//! name = "summary-style"
//! arm = "variant"                      # the event field that carries the arm (or "prompt_version")
//! arms = ["concise", "detailed"]       # the control first (or name it: control = "concise")
//! split = { concise = 50, detailed = 50 }   # expected traffic shares (default: equal)
//! where = { app = "doc-summarizer", environment = "prod" }
//!
//! [[experiment.metric]]
//! name = "resolved"
//! value = "attribute:resolved"         # see `MetricValue`
//! role = "goal"                        # goal, secondary or guardrail
//! better = "higher"
//!
//! [[experiment.metric]]
//! name = "latency"
//! value = "latency_ms"
//! role = "guardrail"
//! better = "lower"
//! tolerance = 0.10                     # 10 % worse than the control is tolerated
//! ```

use std::time::Duration;

use crate::config::reader::{Errors, Obj};

/// Where an event's arm is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmField {
    Variant,
    PromptVersion,
}

impl ArmField {
    pub fn name(self) -> &'static str {
        match self {
            ArmField::Variant => "variant",
            ArmField::PromptVersion => "prompt_version",
        }
    }
}

/// A per-event value an experiment compares across arms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    LatencyMs,
    TtftMs,
    InputTokens,
    OutputTokens,
    TotalTokens,
    CostUsd,
    /// 1 for an event with status "error", else 0 (a proportion).
    Error,
    /// The numeric value of a scorer's score (`scores.score_value`), by evaluation name.
    Score(String),
    /// 1 when a scorer passed, 0 when it failed (a proportion).
    Pass(String),
    /// User feedback: on the event, or in a later event that names it (`feedback_for`).
    Feedback,
    /// `attributes.<key>`: true/yes → 1, false/no → 0, or a number.
    Attribute(String),
}

impl MetricValue {
    pub fn parse(s: &str) -> Result<MetricValue, String> {
        let named = |prefix: &str| {
            s.strip_prefix(prefix)
                .filter(|rest| !rest.is_empty())
                .map(str::to_owned)
        };
        Ok(match s {
            "latency_ms" => MetricValue::LatencyMs,
            "ttft_ms" => MetricValue::TtftMs,
            "input_tokens" => MetricValue::InputTokens,
            "output_tokens" => MetricValue::OutputTokens,
            "total_tokens" => MetricValue::TotalTokens,
            "cost_usd" => MetricValue::CostUsd,
            "error" => MetricValue::Error,
            "feedback" => MetricValue::Feedback,
            _ => {
                if let Some(n) = named("score:") {
                    MetricValue::Score(n)
                } else if let Some(n) = named("pass:") {
                    MetricValue::Pass(n)
                } else if let Some(n) = named("attribute:") {
                    MetricValue::Attribute(n)
                } else {
                    return Err(format!(
                        "{s:?} is not a metric value (one of latency_ms, ttft_ms, input_tokens, output_tokens, total_tokens, cost_usd, error, feedback, score:<scorer>, pass:<scorer>, attribute:<key>)"
                    ));
                }
            }
        })
    }

    /// Whether the value is 0/1, compared as a proportion (two-proportion test) rather than
    /// a mean (Welch).
    pub fn is_proportion(&self) -> bool {
        matches!(
            self,
            MetricValue::Error | MetricValue::Pass(_) | MetricValue::Attribute(_)
        )
    }

    /// Whether the value comes from the `scores` table.
    pub fn scorer(&self) -> Option<&str> {
        match self {
            MetricValue::Score(n) | MetricValue::Pass(n) => Some(n),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Goal,
    Secondary,
    Guardrail,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Goal => "goal",
            Role::Secondary => "secondary",
            Role::Guardrail => "guardrail",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: String,
    pub value: MetricValue,
    pub role: Role,
    /// Whether higher values are better.
    pub higher_is_better: bool,
    /// Guardrails: the degradation tolerated, relative to the control's mean (0.1 = 10 %
    /// worse); 0 for the others.
    pub tolerance: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    Holm,
    BenjaminiHochberg,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentConfig {
    pub name: String,
    pub arm: ArmField,
    /// Every arm, the control first.
    pub arms: Vec<String>,
    /// Expected traffic shares, in `arms` order, summing to 1.
    pub split: Vec<f64>,
    /// Event fields that must equal these values (`app`, `environment`, …).
    pub filter: Vec<(String, String)>,
    /// Events before this time (epoch ms) are not part of the experiment.
    pub start_ms: Option<i64>,
    pub metrics: Vec<MetricSpec>,
}

impl ExperimentConfig {
    pub fn control(&self) -> &str {
        &self.arms[0]
    }
}

/// `[experiments]` plus the `[[experiment]]` entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentsConfig {
    /// How often each experiment is looked at (one row set and decision per window).
    pub window: Duration,
    /// How long after a window ends its scores (the judge's, written later) and feedback are
    /// waited for before the window is evaluated.
    pub settle: Duration,
    /// How far back late feedback may name an event.
    pub feedback_lookback: Duration,
    /// How far back a new experiment (without `start`) is first evaluated.
    pub initial_lookback: Duration,
    /// Significance level of every test.
    pub alpha: f64,
    /// Sample-ratio mismatch alarm level (χ² p-value).
    pub srm_alpha: f64,
    pub correction: Correction,
    /// mSPRT mixing standard deviation, in standard deviations of the metric (the effect
    /// size the test is most sensitive to).
    pub tau: f64,
    /// Events per arm before anything is decided.
    pub min_events: u64,
    pub experiments: Vec<ExperimentConfig>,
}

impl Default for ExperimentsConfig {
    fn default() -> Self {
        ExperimentsConfig {
            window: Duration::from_secs(300),
            settle: Duration::from_secs(300),
            feedback_lookback: Duration::from_secs(24 * 3600),
            initial_lookback: Duration::from_secs(24 * 3600),
            alpha: 0.05,
            srm_alpha: 0.001,
            correction: Correction::Holm,
            tau: 0.1,
            min_events: 100,
            experiments: Vec::new(),
        }
    }
}

impl ExperimentsConfig {
    pub fn enabled(&self) -> bool {
        !self.experiments.is_empty()
    }

    pub fn window_ms(&self) -> i64 {
        self.window.as_millis() as i64
    }

    pub fn find(&self, name: &str) -> Option<&ExperimentConfig> {
        self.experiments.iter().find(|x| x.name == name)
    }
}

/// Fields an experiment may filter on.
pub const FILTER_FIELDS: &[&str] = &[
    "app",
    "environment",
    "operation",
    "provider",
    "model",
    "prompt_id",
    "prompt_version",
    "variant",
    "experiment",
];

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(crate) fn read_experiments(root: &mut Obj, e: &mut Errors) -> ExperimentsConfig {
    let d = ExperimentsConfig::default();
    let mut cfg = d.clone();
    if let Some(mut t) = root.table(e, "experiments") {
        cfg.window = t.duration(e, "window", d.window);
        if cfg.window < Duration::from_secs(1) {
            e.push(&t.path_of("window"), "must be at least 1s");
        }
        cfg.settle = t.duration(e, "settle", d.settle);
        cfg.feedback_lookback = t.duration(e, "feedback_lookback", d.feedback_lookback);
        cfg.initial_lookback = t.duration(e, "initial_lookback", d.initial_lookback);
        cfg.alpha = t.float(e, "alpha", 1e-6, 0.5).unwrap_or(d.alpha);
        cfg.srm_alpha = t.float(e, "srm_alpha", 1e-12, 0.5).unwrap_or(d.srm_alpha);
        cfg.tau = t.float(e, "tau", 1e-4, 10.0).unwrap_or(d.tau);
        cfg.min_events = t
            .integer(e, "min_events", 2, i64::MAX)
            .map_or(d.min_events, |v| v as u64);
        if let Some(c) = t.string(e, "correction") {
            cfg.correction = match c.as_str() {
                "holm" => Correction::Holm,
                "benjamini-hochberg" | "bh" => Correction::BenjaminiHochberg,
                "none" => Correction::None,
                other => {
                    e.push(
                        &t.path_of("correction"),
                        format!("{other:?} is not a correction (expected holm, benjamini-hochberg or none)"),
                    );
                    d.correction
                }
            };
        }
        t.finish(e);
    }
    for mut x in root.tables(e, "experiment") {
        if let Some(c) = read_one(&mut x, e) {
            if cfg.experiments.iter().any(|o| o.name == c.name) {
                e.push(&x.path_of("name"), format!("{:?} is defined twice", c.name));
            }
            cfg.experiments.push(c);
        }
        x.finish(e);
    }
    cfg
}

fn read_one(x: &mut Obj, e: &mut Errors) -> Option<ExperimentConfig> {
    let name = x.required_string(e, "name", "e.g. \"summary-style\"");
    if let Some(n) = &name
        && !valid_name(n)
    {
        e.push(
            &x.path_of("name"),
            format!("{n:?} is not an experiment name (letters, digits, '-', '_', '.')"),
        );
    }
    let arm = match x.string_or(e, "arm", "variant").as_str() {
        "variant" => ArmField::Variant,
        "prompt_version" => ArmField::PromptVersion,
        other => {
            e.push(
                &x.path_of("arm"),
                format!("{other:?} is not an arm field (expected variant or prompt_version)"),
            );
            ArmField::Variant
        }
    };
    let mut arms = x.string_list(e, "arms").unwrap_or_default();
    if arms.len() < 2 {
        e.push(
            &x.path_of("arms"),
            "is required: at least two arms, the control first (e.g. [\"A\", \"B\"])",
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for a in &arms {
        if !seen.insert(a) {
            e.push(&x.path_of("arms"), format!("{a:?} is listed twice"));
        }
    }
    if let Some(c) = x.string(e, "control") {
        match arms.iter().position(|a| *a == c) {
            Some(i) => {
                let c = arms.remove(i);
                arms.insert(0, c);
            }
            None => e.push(
                &x.path_of("control"),
                format!("{c:?} is not one of the arms {arms:?}"),
            ),
        }
    }
    let split_path = x.path_of("split");
    let shares = x.string_map(e, "split");
    let split = if shares.is_empty() {
        vec![1.0 / arms.len().max(1) as f64; arms.len()]
    } else {
        let mut v = Vec::new();
        for a in &arms {
            match shares.get(a).map(|s| s.parse::<f64>()) {
                Some(Ok(s)) if s.is_finite() && s > 0.0 => v.push(s),
                Some(_) => {
                    e.push(
                        &format!("{split_path}.{a}"),
                        "must be a positive number (a share or a percentage)",
                    );
                    v.push(1.0);
                }
                None => {
                    e.push(&split_path, format!("has no share for the arm {a:?}"));
                    v.push(1.0);
                }
            }
        }
        for k in shares.keys() {
            if !arms.contains(k) {
                e.push(
                    &format!("{split_path}.{k}"),
                    format!("{k:?} is not one of the arms {arms:?}"),
                );
            }
        }
        let sum: f64 = v.iter().sum();
        v.iter().map(|s| s / sum).collect()
    };
    let where_path = x.path_of("where");
    let filter: Vec<(String, String)> = x.string_map(e, "where").into_iter().collect();
    for (k, _) in &filter {
        if !FILTER_FIELDS.contains(&k.as_str()) {
            e.push(
                &format!("{where_path}.{k}"),
                format!(
                    "{k:?} is not a field an experiment can select on (one of: {})",
                    FILTER_FIELDS.join(", ")
                ),
            );
        }
    }
    let start_ms =
        x.string(e, "start")
            .and_then(|s| match chrono::DateTime::parse_from_rfc3339(&s) {
                Ok(t) => Some(t.timestamp_millis()),
                Err(err) => {
                    e.push(
                        &x.path_of("start"),
                        format!(
                            "{s:?} is not an RFC 3339 time (e.g. \"2026-11-27T09:00:00Z\"): {err}"
                        ),
                    );
                    None
                }
            });
    let mut metrics = Vec::new();
    let tables = x.tables(e, "metric");
    let given = tables.len();
    for mut m in tables {
        if let Some(spec) = read_metric(&mut m, e) {
            if metrics.iter().any(|o: &MetricSpec| o.name == spec.name) {
                e.push(
                    &m.path_of("name"),
                    format!("{:?} is defined twice", spec.name),
                );
            }
            metrics.push(spec);
        }
        m.finish(e);
    }
    if given == 0 {
        e.push(
            &x.path_of("metric"),
            "is required: at least one [[experiment.metric]] with role = \"goal\"",
        );
    } else if metrics.len() == given && !metrics.iter().any(|m| m.role == Role::Goal) {
        e.push(
            &x.path_of("metric"),
            "has no goal metric (role = \"goal\"): nothing could be promoted",
        );
    }
    Some(ExperimentConfig {
        name: name?,
        arm,
        arms,
        split,
        filter,
        start_ms,
        metrics,
    })
}

fn read_metric(m: &mut Obj, e: &mut Errors) -> Option<MetricSpec> {
    let name = m.required_string(e, "name", "e.g. \"resolved\"");
    if let Some(n) = &name
        && !valid_name(n)
    {
        e.push(
            &m.path_of("name"),
            format!("{n:?} is not a metric name (letters, digits, '-', '_', '.')"),
        );
    }
    let value = m.required_string(
        e,
        "value",
        "e.g. \"latency_ms\", \"pass:summary_json\", \"attribute:resolved\"",
    );
    let value = value.and_then(|v| match MetricValue::parse(&v) {
        Ok(v) => Some(v),
        Err(msg) => {
            e.push(&m.path_of("value"), msg);
            None
        }
    });
    let role = match m.string_or(e, "role", "goal").as_str() {
        "goal" => Role::Goal,
        "secondary" => Role::Secondary,
        "guardrail" => Role::Guardrail,
        other => {
            e.push(
                &m.path_of("role"),
                format!("{other:?} is not a role (expected goal, secondary or guardrail)"),
            );
            Role::Goal
        }
    };
    let default_better = match &value {
        Some(
            MetricValue::LatencyMs
            | MetricValue::TtftMs
            | MetricValue::CostUsd
            | MetricValue::Error
            | MetricValue::InputTokens
            | MetricValue::OutputTokens
            | MetricValue::TotalTokens,
        ) => "lower",
        _ => "higher",
    };
    let higher_is_better = match m.string_or(e, "better", default_better).as_str() {
        "higher" => true,
        "lower" => false,
        other => {
            e.push(
                &m.path_of("better"),
                format!("{other:?} is not a direction (expected higher or lower)"),
            );
            true
        }
    };
    let tolerance = if m.has("tolerance") {
        let t = m.float(e, "tolerance", 0.0, 100.0).unwrap_or(0.0);
        if role != Role::Guardrail {
            e.push(
                &m.path_of("tolerance"),
                "applies to guardrails only (role = \"guardrail\")",
            );
        }
        t
    } else {
        0.0
    };
    Some(MetricSpec {
        name: name?,
        value: value?,
        role,
        higher_is_better,
        tolerance,
    })
}
