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
