//! One look at an experiment: merge a window's partials into the running totals, compare each
//! treatment with the control on every metric, and decide.
//!
//! Per metric and treatment arm:
//! - the fixed-horizon test (Welch for means, two proportions for rates) and its interval,
//!   reported for reference: peeking at it every window inflates false positives;
//! - the mSPRT always-valid p-value, kept per direction (better, worse) as a running minimum
//!   over the looks, and its confidence sequence; decisions use these;
//! - for guardrails, a second mSPRT against the tolerated degradation: the guardrail is
//!   breached once the data show, with always-valid confidence, that the treatment is worse
//!   than the control by more than `tolerance` (relative to the control's mean).
//!
//! Goal and secondary metrics are corrected for multiple testing (Holm or Benjamini–Hochberg)
//! per treatment arm; guardrails are not (as GrowthBook does: each guards on its own).

use std::collections::BTreeMap;

use super::collect::Tally;
use super::config::{Correction, ExperimentConfig, ExperimentsConfig, MetricSpec, Role};
use super::stats::{
    AlwaysValid, Moments, benjamini_hochberg, holm, msprt_half_width, srm_p_value, two_proportions,
    welch,
};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    KeepRunning,
    Promote,
    Rollback,
    Invalid,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::KeepRunning => "keep_running",
            Decision::Promote => "promote",
            Decision::Rollback => "rollback",
            Decision::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        [
            Decision::KeepRunning,
            Decision::Promote,
            Decision::Rollback,
            Decision::Invalid,
        ]
        .into_iter()
        .find(|d| d.name() == s)
    }
}

/// An experiment's running totals: what survives from one look to the next (and restarts).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub first_window_ms: Option<i64>,
    pub last_window_ms: Option<i64>,
    pub looks: u64,
    /// Exposures per arm.
    pub events: BTreeMap<String, u64>,
    /// `metric/arm` → moments.
    pub moments: BTreeMap<String, Moments>,
    /// `metric/arm` (treatments) → always-valid p that the arm is better / worse / beyond
    /// the guardrail's tolerance.
    pub better: BTreeMap<String, AlwaysValid>,
    pub worse: BTreeMap<String, AlwaysValid>,
    pub breach: BTreeMap<String, AlwaysValid>,
    pub decision: Option<Decision>,
}

fn k(metric: &str, arm: &str) -> String {
    format!("{metric}/{arm}")
}

/// One metric of one arm at one look.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub metric: String,
    pub role: Role,
    pub higher_is_better: bool,
    pub arm: String,
    pub control: bool,
    pub window: Moments,
    pub total: Moments,
    pub events: u64,
    pub diff: Option<f64>,
    pub lift: Option<f64>,
    pub ci: Option<(f64, f64)>,
    pub p_value: Option<f64>,
    pub always_valid_p: Option<f64>,
    pub adjusted_p: Option<f64>,
    pub cs: Option<(f64, f64)>,
    pub tolerance: Option<f64>,
    /// better, worse, inconclusive, breached, within_tolerance, too_few_events, control.
    pub verdict: &'static str,
    pub arm_decision: Option<Decision>,
}

/// The outcome of one look.
#[derive(Debug, Clone, PartialEq)]
pub struct Look {
    pub start_ms: i64,
    pub end_ms: i64,
    pub experiment: String,
    pub srm_p_value: f64,
    pub decision: Decision,
    /// Why, in a sentence.
    pub reason: String,
    pub rows: Vec<Row>,
}

fn pct(x: f64) -> String {
    format!("{:+.1} %", x * 100.0)
}

/// "B: goal resolved significantly better (+12.6 % vs A)".
fn explain(arm: &str, role: &str, r: &Row, what: &str, control: &str, extra: &str) -> String {
    format!(
        "{arm}: {role} {} {what} ({} vs {control}{extra})",
        r.metric,
        r.lift.map_or("n/a".into(), pct)
    )
}

/// Merges `tally` (this window's partials; `None`: none) into `run` and judges the
/// experiment as of the window's end.
pub fn look(
    cfg: &ExperimentsConfig,
    x: &ExperimentConfig,
    run: &mut Running,
    tally: Option<&Tally>,
    start_ms: i64,
    end_ms: i64,
) -> Look {
    let empty = Tally::new(x);
    let tally = tally.unwrap_or(&empty);
    if run.first_window_ms.is_none() {
        run.first_window_ms = Some(start_ms);
    }
    run.last_window_ms = Some(start_ms);
    run.looks += 1;
    for (a, arm) in x.arms.iter().enumerate() {
        *run.events.entry(arm.clone()).or_default() += tally.events[a];
        for (m, spec) in x.metrics.iter().enumerate() {
            run.moments
                .entry(k(&spec.name, arm))
                .or_default()
                .merge(&tally.moments[m][a]);
        }
    }
    let counts: Vec<u64> = x.arms.iter().map(|a| run.events[a]).collect();
    let total: u64 = counts.iter().sum();
    let srm = if total >= cfg.min_events {
        srm_p_value(&counts, &x.split)
    } else {
        1.0
    };
    let invalid = srm < cfg.srm_alpha;
    let control = x.control();

    let mut rows = Vec::new();
    let mut arm_decisions = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for (a, arm) in x.arms.iter().enumerate() {
        let is_control = a == 0;
        let enough = counts[0] >= cfg.min_events && counts[a] >= cfg.min_events;
        let first = rows.len();
        for (m, spec) in x.metrics.iter().enumerate() {
            let total_m = run.moments[&k(&spec.name, arm)];
            let mut row = Row {
                metric: spec.name.clone(),
                role: spec.role,
                higher_is_better: spec.higher_is_better,
                arm: arm.clone(),
                control: is_control,
                window: tally.moments[m][a],
                total: total_m,
                events: counts[a],
                diff: None,
                lift: None,
                ci: None,
                p_value: None,
                always_valid_p: None,
                adjusted_p: None,
                cs: None,
                tolerance: (spec.role == Role::Guardrail).then_some(spec.tolerance),
                verdict: if is_control {
                    "control"
                } else {
                    "too_few_events"
                },
                arm_decision: None,
            };
            if !is_control {
                let c = run.moments[&k(&spec.name, control)];
                compare(
                    cfg,
                    spec,
                    &c,
                    &total_m,
                    enough,
                    run,
                    &k(&spec.name, arm),
                    &mut row,
                );
            }
            rows.push(row);
        }
        if is_control {
            continue;
        }
        // Multiple testing across the goal and secondary metrics of this arm.
        let family: Vec<usize> = (first..rows.len())
            .filter(|&i| rows[i].role != Role::Guardrail && rows[i].always_valid_p.is_some())
            .collect();
        let ps: Vec<f64> = family
            .iter()
            .map(|&i| rows[i].always_valid_p.unwrap_or(1.0))
            .collect();
        let adjusted = match cfg.correction {
            Correction::Holm => holm(&ps),
            Correction::BenjaminiHochberg => benjamini_hochberg(&ps),
            Correction::None => ps.clone(),
        };
        for (&i, adj) in family.iter().zip(adjusted) {
            let r = &mut rows[i];
            r.adjusted_p = Some(adj);
            let key = k(&r.metric, arm);
            let better = run.better.get(&key).map_or(1.0, |v| v.p);
            let worse = run.worse.get(&key).map_or(1.0, |v| v.p);
            r.verdict = if !enough {
                "too_few_events"
            } else if adj <= cfg.alpha {
                if better <= worse { "better" } else { "worse" }
            } else {
                "inconclusive"
            };
        }
        let arm_rows = &rows[first..];
        let breached: Vec<&Row> = arm_rows
            .iter()
            .filter(|r| r.verdict == "breached")
            .collect();
        let goal = |v: &str| {
            arm_rows
                .iter()
                .filter(|r| r.role == Role::Goal && r.verdict == v)
                .collect::<Vec<_>>()
        };
        let (goal_worse, goal_better) = (goal("worse"), goal("better"));
        let d = if !enough {
            Decision::KeepRunning
        } else if !breached.is_empty() {
            reasons.extend(breached.iter().map(|r| {
                let tolerated = r
                    .tolerance
                    .map_or("0 %".into(), |t| format!("{:.0} %", t * 100.0));
                explain(
                    arm,
                    "guardrail",
                    r,
                    "breached",
                    control,
                    &format!(", {tolerated} tolerated"),
                )
            }));
            Decision::Rollback
        } else if !goal_worse.is_empty() {
            reasons.extend(
                goal_worse
                    .iter()
                    .map(|r| explain(arm, "goal", r, "significantly worse", control, "")),
            );
            Decision::Rollback
        } else if !goal_better.is_empty() {
            reasons.extend(goal_better.iter().map(|r| {
                explain(arm, "goal", r, "significantly better", control, "")
                    + ", no guardrail breached"
            }));
            Decision::Promote
        } else {
            Decision::KeepRunning
        };
        for r in &mut rows[first..] {
            r.arm_decision = Some(d);
        }
        arm_decisions.push(d);
    }
    let decision = if invalid {
        reasons.insert(
            0,
            format!(
                "sample ratio mismatch: {} against the expected split (χ² p = {srm:.2e})",
                x.arms
                    .iter()
                    .zip(&counts)
                    .map(|(a, n)| format!("{a} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        Decision::Invalid
    } else if arm_decisions.contains(&Decision::Rollback) {
        Decision::Rollback
    } else if arm_decisions.contains(&Decision::Promote) {
        Decision::Promote
    } else {
        Decision::KeepRunning
    };
    if decision == Decision::KeepRunning {
        let fewest = counts.iter().min().copied().unwrap_or(0);
        reasons.push(if fewest < cfg.min_events {
            format!(
                "collecting: {fewest} events in the smallest arm, {} needed",
                cfg.min_events
            )
        } else {
            let goals: Vec<String> = rows
                .iter()
                .filter(|r| !r.control && r.role == Role::Goal)
                .map(|r| {
                    format!(
                        "{} {} {} (p {})",
                        r.arm,
                        r.metric,
                        r.lift.map_or("n/a".into(), pct),
                        r.adjusted_p.map_or("n/a".into(), |p| format!("{p:.3}"))
                    )
                })
                .collect();
            format!(
                "no goal metric is significantly different yet ({}) and no guardrail is breached",
                goals.join(", ")
            )
        });
    }
    run.decision = Some(decision);
    Look {
        start_ms,
        end_ms,
        experiment: x.name.clone(),
        srm_p_value: srm,
        decision,
        reason: reasons.join("; "),
        rows,
    }
}

/// Fills the comparison columns of a treatment row and takes the sequential looks.
#[allow(clippy::too_many_arguments)]
fn compare(
    cfg: &ExperimentsConfig,
    spec: &MetricSpec,
    c: &Moments,
    t: &Moments,
    enough: bool,
    run: &mut Running,
    key: &str,
    row: &mut Row,
) {
    let fixed = if spec.value.is_proportion() {
        let x = |m: &Moments| (m.mean * m.n as f64).round() as u64;
        two_proportions(x(c), c.n, x(t), t.n, cfg.alpha)
    } else {
        welch(c, t, cfg.alpha)
    };
    if c.n == 0 || t.n == 0 {
        return;
    }
    let diff = t.mean - c.mean;
    row.diff = Some(diff);
    row.lift = (c.mean != 0.0).then(|| diff / c.mean.abs());
    if let Some(f) = fixed {
        row.ci = Some((f.ci_low, f.ci_high));
        row.p_value = Some(f.p_value);
    }
    let v = c.var_of_mean() + t.var_of_mean();
    let sd = ((c.variance() + t.variance()) / 2.0).sqrt();
    let tau2 = (cfg.tau * sd).powi(2);
    if !(v.is_finite() && v > 0.0 && tau2.is_finite() && tau2 > 0.0) {
        return;
    }
    let half = msprt_half_width(v, tau2, cfg.alpha);
    row.cs = Some((diff - half, diff + half));
    // Positive `good`: the treatment is better.
    let good = if spec.higher_is_better { diff } else { -diff };
    if enough {
        // One look per direction: each running minimum is a valid one-sided p-value.
        let side = if good > 0.0 {
            &mut run.better
        } else {
            &mut run.worse
        };
        side.entry(key.to_owned()).or_default().look(diff, v, tau2);
    }
    let better = run.better.get(key).map_or(1.0, |a| a.p);
    let worse = run.worse.get(key).map_or(1.0, |a| a.p);
    row.always_valid_p = Some(better.min(worse));
    if spec.role == Role::Guardrail {
        let allowed = spec.tolerance * c.mean.abs();
        let excess = -good - allowed;
        if enough && excess > 0.0 {
            run.breach
                .entry(key.to_owned())
                .or_default()
                .look(excess, v, tau2);
        }
        let breach = run.breach.get(key).map_or(1.0, |a| a.p);
        row.always_valid_p = Some(breach);
        row.adjusted_p = Some(breach);
        row.verdict = if !enough {
            "too_few_events"
        } else if breach <= cfg.alpha {
            "breached"
        } else {
            "within_tolerance"
        };
    }
}
