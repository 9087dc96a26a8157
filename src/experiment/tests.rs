//! The statistics, tested statistically (seeded runs) and against scipy's values.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::stats::*;

fn normal(rng: &mut SmallRng, mean: f64) -> f64 {
    let z: f64 = StandardNormal.sample(rng);
    mean + z
}

/// One experiment peeked at every window: `looks` windows of `per_look` events per arm, the
/// treatment's mean shifted by `effect` (in standard deviations). Returns (the first look at
/// which the sequential test rejects, the first look at which a naive Welch test at alpha
/// rejects, whether 0 left the confidence sequence at some look).
fn peeked_run(
    seed: u64,
    effect: f64,
    looks: usize,
    per_look: usize,
    alpha: f64,
) -> (Option<usize>, Option<usize>, bool) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (mut c, mut t) = (Moments::default(), Moments::default());
    let mut av = AlwaysValid::default();
    let tau2 = 0.1f64.powi(2);
    let (mut seq, mut naive, mut zero_left) = (None, None, false);
    for look in 1..=looks {
        for _ in 0..per_look {
            c.add(normal(&mut rng, 0.0));
            t.add(normal(&mut rng, effect));
        }
        let diff = t.mean - c.mean;
        let v = c.var_of_mean() + t.var_of_mean();
        if av.look(diff, v, tau2) <= alpha && seq.is_none() {
            seq = Some(look);
        }
        if welch(&c, &t, alpha).is_some_and(|w| w.p_value <= alpha) && naive.is_none() {
            naive = Some(look);
        }
        if diff.abs() > msprt_half_width(v, tau2, alpha) {
            zero_left = true;
        }
    }
    (seq, naive, zero_left)
}

#[test]
fn sequential_test_holds_alpha_under_continuous_peeking_and_naive_peeking_does_not() {
    // A/A: 1,000 seeded experiments, each looked at after every one of 20 windows.
    let runs = 1_000;
    let (mut seq, mut naive, mut cs) = (0, 0, 0);
    for seed in 0..runs {
        let (s, n, z) = peeked_run(seed, 0.0, 20, 50, 0.05);
        seq += s.is_some() as usize;
        naive += n.is_some() as usize;
        cs += z as usize;
    }
    eprintln!(
        "A/A, 20 looks, alpha 0.05, {runs} runs: sequential (mSPRT) false positives {seq}, confidence sequence missed 0 in {cs}, naive Welch at every look {naive}"
    );
    // Binomial(1000, 0.05): mean 50, sd 6.9; 65 is beyond the 98th percentile.
    assert!(seq <= 65, "{seq}");
    assert!(cs <= 65, "{cs}");
    // Peeking 20 times at a fixed-horizon test inflates its error several-fold.
    assert!(naive >= 120, "{naive}");
}

#[test]
fn sequential_test_finds_real_effects_and_reports_when() {
    // 300 seeded experiments per effect size (in standard deviations), 20 looks of 50 per arm.
    let mut power = Vec::new();
    for effect in [0.1, 0.3] {
        let (mut found, mut looks) = (0usize, 0usize);
        for seed in 0..300 {
            if let (Some(at), _, _) = peeked_run(10_000 + seed, effect, 20, 50, 0.05) {
                found += 1;
                looks += at;
            }
        }
        let p = found as f64 / 300.0;
        eprintln!(
            "effect {effect} sd: power {p:.2}, mean decision at look {:.1} of 20",
            looks as f64 / found.max(1) as f64
        );
        power.push(p);
    }
    assert!(power[1] >= 0.95, "{power:?}");
    assert!(power[0] >= 0.15 && power[0] < power[1], "{power:?}");
}

#[test]
fn srm_check_flags_a_skewed_split_and_rarely_a_fair_one() {
    // scipy.stats.chisquare([5200, 4800], [5000, 5000]).pvalue = 6.334248366623988e-05
    let p = srm_p_value(&[5_200, 4_800], &[0.5, 0.5]);
    assert!((p - 6.334248366623988e-05).abs() < 1e-9, "{p}");
    assert!(p < 0.001);
    // Fair 50/50 assignment of 10,000 events, 2,000 seeded runs: alarms at p < 0.001 stay rare.
    let mut alarms = 0;
    for seed in 0..2_000 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let a = (0..10_000).filter(|_| rng.random_bool(0.5)).count() as u64;
        if srm_p_value(&[a, 10_000 - a], &[1.0, 1.0]) < 0.001 {
            alarms += 1;
        }
    }
    assert!(alarms <= 8, "{alarms} of 2000 (expected ≈ 2)");
    // A 90/10 split configured as such is not a mismatch.
    assert!(srm_p_value(&[9_010, 990], &[0.9, 0.1]) > 0.1);
}

#[test]
fn welch_and_two_proportions_match_scipy() {
    // python3 -c "from scipy import stats; r = stats.ttest_ind(b, a, equal_var=False); \
    //   print(r.statistic, r.pvalue, r.df, r.confidence_interval(0.95))" with a, b below
    // (scipy 1.17.1).
    let a = [12.1, 9.8, 11.4, 10.9, 13.2, 10.1, 9.5, 12.7];
    let b = [14.3, 12.9, 15.1, 11.8, 13.7, 16.2, 12.4];
    let (mut ma, mut mb) = (Moments::default(), Moments::default());
    a.iter().for_each(|x| ma.add(*x));
    b.iter().for_each(|x| mb.add(*x));
    let w = welch(&ma, &mb, 0.05).unwrap();
    let close = |x: f64, y: f64| (x - y).abs() < 1e-9 * y.abs().max(1.0);
    assert!(close(w.stat, 3.356536494160045), "{w:?}");
    assert!(close(w.p_value, 0.005616420038928937), "{w:?}");
    assert!(close(w.ci_low, 0.9002157509614499), "{w:?}");
    assert!(close(w.ci_high, 4.217641391895698), "{w:?}");
    // Pooled two-proportion z: 120/1000 vs 150/1000 (scipy.stats.norm.sf for the p-value).
    let z = two_proportions(120, 1_000, 150, 1_000, 0.05).unwrap();
    assert!(close(z.stat, 1.963049807622355), "{z:?}");
    assert!(close(z.p_value, 0.04964038686536878), "{z:?}");
    assert!((z.lift - 0.25).abs() < 1e-12);
}

#[test]
fn moments_merge_like_the_whole_stream() {
    let mut rng = SmallRng::seed_from_u64(4);
    let xs: Vec<f64> = (0..1_000).map(|_| normal(&mut rng, 3.0) * 2.0).collect();
    let mut whole = Moments::default();
    xs.iter().for_each(|x| whole.add(*x));
    let mut merged = Moments::default();
    for chunk in xs.chunks(37) {
        let mut m = Moments::default();
        chunk.iter().for_each(|x| m.add(*x));
        merged.merge(&m);
    }
    assert_eq!(merged.n, whole.n);
    assert!((merged.mean - whole.mean).abs() < 1e-12);
    assert!((merged.variance() - whole.variance()).abs() < 1e-9);
}

#[test]
fn holm_and_benjamini_hochberg_adjust_as_published() {
    let p = [0.01, 0.04, 0.03, 0.005];
    let h = holm(&p);
    let want = [0.03, 0.06, 0.06, 0.02];
    assert!(
        h.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{h:?}"
    );
    let bh = benjamini_hochberg(&p);
    let want = [0.02, 0.04, 0.04, 0.02];
    assert!(
        bh.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{bh:?}"
    );
}

// ---- The scorecard: decisions over many seeded experiments, looked at every window ----

use super::collect::Tally;
use super::config::{ArmField, ExperimentConfig, ExperimentsConfig, MetricSpec, MetricValue, Role};
use super::scorecard::{Decision, Running, look};

/// A two-arm experiment: goal `resolved` (a rate), secondary `score` (a mean), guardrail
/// `latency` (lower is better, 10 % tolerated).
fn two_arms() -> ExperimentConfig {
    let metric = |name: &str, value, role, higher_is_better, tolerance| MetricSpec {
        name: name.into(),
        value,
        role,
        higher_is_better,
        tolerance,
    };
    ExperimentConfig {
        name: "x".into(),
        arm: ArmField::Variant,
        arms: vec!["A".into(), "B".into()],
        split: vec![0.5, 0.5],
        filter: Vec::new(),
        start_ms: None,
        metrics: vec![
            metric(
                "resolved",
                MetricValue::Attribute("resolved".into()),
                Role::Goal,
                true,
                0.0,
            ),
            metric(
                "score",
                MetricValue::Score("s".into()),
                Role::Secondary,
                true,
                0.0,
            ),
            metric(
                "latency",
                MetricValue::LatencyMs,
                Role::Guardrail,
                false,
                0.1,
            ),
        ],
    }
}

/// What the treatment does differently.
#[derive(Clone, Copy, Default)]
struct Effect {
    /// Added to the control's 0.6 resolution rate.
    resolved: f64,
    /// Added to the score (standard deviations).
    score: f64,
    /// Relative latency change (0.3 = 30 % slower).
    latency: f64,
    /// The treatment's actual share of traffic (the config says 0.5).
    share: f64,
}

/// One experiment looked at after every one of `looks` windows of `per_window` events.
/// Returns each look's decision.
fn decisions(seed: u64, e: Effect, looks: usize, per_window: usize) -> Vec<Decision> {
    looks_at(seed, e, looks, per_window)
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}

/// Each look's decision, and whether the goal's fixed-horizon test was significant at it.
fn looks_at(seed: u64, e: Effect, looks: usize, per_window: usize) -> Vec<(Decision, bool)> {
    let cfg = ExperimentsConfig::default();
    let x = two_arms();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut run = Running::default();
    let share = if e.share > 0.0 { e.share } else { 0.5 };
    (0..looks)
        .map(|w| {
            let mut t = Tally::new(&x);
            for _ in 0..per_window {
                let arm = usize::from(rng.random_bool(share));
                let treated = arm == 1;
                t.events[arm] += 1;
                let p = 0.6 + if treated { e.resolved } else { 0.0 };
                t.moments[0][arm].add(if rng.random_bool(p) { 1.0 } else { 0.0 });
                t.moments[1][arm].add(normal(&mut rng, if treated { e.score } else { 0.0 }));
                let slow = if treated { 1.0 + e.latency } else { 1.0 };
                // Latency: log-normal around 1 s, heavy-tailed as real latencies are.
                let z: f64 = StandardNormal.sample(&mut rng);
                t.moments[2][arm].add(1000.0 * slow * (0.5 * z).exp());
            }
            let start = w as i64 * 300_000;
            let l = look(&cfg, &x, &mut run, Some(&t), start, start + 300_000);
            let naive = l.rows.iter().any(|r| {
                !r.control && r.metric == "resolved" && r.p_value.is_some_and(|p| p <= 0.05)
            });
            (l.decision, naive)
        })
        .collect()
}

fn first(ds: &[Decision], d: Decision) -> Option<usize> {
    ds.iter().position(|x| *x == d).map(|i| i + 1)
}

#[test]
fn aa_experiments_peeked_every_window_rarely_decide() {
    // 1,000 seeded A/A experiments, 20 looks of ~100 events per arm each.
    let runs = 1_000;
    let (mut promoted, mut rolled_back, mut invalid, mut naive) = (0, 0, 0, 0);
    for seed in 0..runs {
        let ls = looks_at(seed, Effect::default(), 20, 200);
        naive += ls.iter().any(|(_, n)| *n) as usize;
        let ds: Vec<Decision> = ls.into_iter().map(|(d, _)| d).collect();
        promoted += ds.contains(&Decision::Promote) as usize;
        rolled_back += ds.contains(&Decision::Rollback) as usize;
        invalid += ds.contains(&Decision::Invalid) as usize;
    }
    let any = promoted + rolled_back;
    eprintln!(
        "A/A scorecard, {runs} runs × 20 looks: promote {promoted}, rollback {rolled_back}, invalid {invalid}; the goal's fixed-horizon test significant at some look in {naive}"
    );
    // The goal's always-valid test holds alpha = 0.05 over every look, both directions
    // together; guardrails tolerate 10 % and should not fire on identical arms.
    // Binomial(1000, 0.05): 65 is beyond its 98th percentile.
    assert!(any <= 65, "{any} wrong decisions in {runs} A/A runs");
    // Deciding on the fixed-horizon p-value instead, at every look, would have been wrong
    // several times as often: why the decisions use the sequential test.
    assert!(naive >= 150, "{naive}");
    // SRM at p < 0.001, checked at each of 20 looks on fair assignment: at most 0.02 by the
    // union bound (20 runs in 1,000).
    assert!(invalid <= 20, "{invalid}");
}

#[test]
fn real_goal_effects_are_promoted_and_the_time_to_decision_is_reported() {
    let runs = 300u64;
    let mut power = Vec::new();
    for (name, lift) in [("small", 0.03), ("medium", 0.08)] {
        let mut at: Vec<usize> = Vec::new();
        let mut wrong = 0;
        for seed in 0..runs {
            let ds = decisions(
                50_000 + seed,
                Effect {
                    resolved: lift,
                    ..Effect::default()
                },
                20,
                200,
            );
            if let Some(i) = first(&ds, Decision::Promote) {
                at.push(i);
            }
            wrong += ds.contains(&Decision::Rollback) as usize;
        }
        at.sort();
        let p = at.len() as f64 / runs as f64;
        eprintln!(
            "{name} effect (+{lift} on a 0.6 rate): promoted in {p:.2} of {runs} runs; median look {} of 20; rolled back in {wrong}",
            at.get(at.len() / 2).map_or("-".into(), |x| x.to_string())
        );
        assert!(wrong <= 10, "{wrong}");
        power.push(p);
    }
    assert!(power[1] >= 0.8, "{power:?}");
    assert!(power[0] > 0.08 && power[0] < power[1], "{power:?}");
}

#[test]
fn a_guardrail_beyond_its_tolerance_rolls_back_even_when_the_goal_improves() {
    let runs = 300u64;
    let (mut rolled, mut also_better, mut within) = (0, 0, 0);
    let mut at = Vec::new();
    for seed in 0..runs {
        // 30 % slower with 10 % tolerated, and a better goal: the demo's scenario.
        let ds = decisions(
            90_000 + seed,
            Effect {
                resolved: 0.08,
                latency: 0.3,
                ..Effect::default()
            },
            20,
            200,
        );
        if let Some(i) = first(&ds, Decision::Rollback) {
            rolled += 1;
            at.push(i);
        }
        also_better += ds.contains(&Decision::Promote) as usize;
        // 5 % slower: within the tolerance, no breach.
        let ds = decisions(
            95_000 + seed,
            Effect {
                latency: 0.05,
                ..Effect::default()
            },
            20,
            200,
        );
        within += ds.contains(&Decision::Rollback) as usize;
    }
    at.sort();
    eprintln!(
        "latency +30 % (10 % tolerated): rolled back in {rolled} of {runs}, median look {}; promoted first in {also_better}; latency +5 %: rolled back in {within}",
        at[at.len() / 2]
    );
    assert!(rolled as f64 >= 0.95 * runs as f64, "{rolled}");
    // A run may promote on the goal before the guardrail has enough evidence; rare.
    assert!(also_better as f64 <= 0.1 * runs as f64, "{also_better}");
    assert!(within as f64 <= 0.05 * runs as f64, "{within}");
}

#[test]
fn a_skewed_split_makes_the_experiment_invalid() {
    let runs = 200u64;
    let (mut skewed, mut fair) = (0, 0);
    for seed in 0..runs {
        // 55 % of the traffic to B where the config says 50 %.
        let ds = decisions(
            70_000 + seed,
            Effect {
                share: 0.55,
                ..Effect::default()
            },
            20,
            200,
        );
        skewed += (ds.last() == Some(&Decision::Invalid)) as usize;
        let ds = decisions(75_000 + seed, Effect::default(), 20, 200);
        fair += ds.contains(&Decision::Invalid) as usize;
    }
    eprintln!(
        "split 55/45 configured 50/50: invalid at the last look in {skewed} of {runs}; fair split: {fair}"
    );
    assert!(skewed as f64 >= 0.95 * runs as f64, "{skewed}");
    assert!(fair <= 4, "{fair}");
}

#[test]
fn a_look_that_decides_nothing_says_where_the_goal_stands() {
    let cfg = ExperimentsConfig::default();
    let x = two_arms();
    let mut t = Tally::new(&x);
    for arm in 0..2 {
        for i in 0..200 {
            t.events[arm] += 1;
            // A resolves 100 of 200, B 104: +4 %, far from significant.
            let resolved = i < 100 + 4 * arm;
            t.moments[0][arm].add(if resolved { 1.0 } else { 0.0 });
            t.moments[1][arm].add((i % 7) as f64);
            t.moments[2][arm].add(1000.0 + (i % 13) as f64);
        }
    }
    let l = look(&cfg, &x, &mut Running::default(), Some(&t), 0, 300_000);
    assert_eq!(l.decision, Decision::KeepRunning);
    assert!(
        l.reason
            .starts_with("no goal metric is significantly different yet (B resolved +4.0 % (p "),
        "{}",
        l.reason
    );
}
