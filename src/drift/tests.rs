use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::embed::{Embedder, HashEmbedder, cosine};
use super::sample::{BottomK, sample_hash};
use super::stats::{Pca, centroid_test, mmd_test};

const SUPPORT: &[&str] = &[
    "where", "is", "my", "order", "refund", "delivery", "package", "tracking", "return", "account",
    "password", "invoice", "shipping", "cancel", "store", "payment", "card",
];
const CODE: &[&str] = &[
    "rust", "function", "borrow", "checker", "compile", "error", "vector", "thread", "mutex",
    "kafka", "consumer", "lifetime", "trait", "test", "iterator", "closure", "panic",
];

fn sentence(rng: &mut SmallRng, words: &[&str]) -> String {
    let n = rng.random_range(6..14);
    (0..n)
        .map(|_| words[rng.random_range(0..words.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn hash_embedder_is_deterministic_unit_length_and_separates_topics() {
    let e = HashEmbedder::default();
    let mut rng = SmallRng::seed_from_u64(1);
    let support: Vec<String> = (0..50).map(|_| sentence(&mut rng, SUPPORT)).collect();
    let code: Vec<String> = (0..50).map(|_| sentence(&mut rng, CODE)).collect();
    let s: Vec<&str> = support.iter().map(String::as_str).collect();
    let c: Vec<&str> = code.iter().map(String::as_str).collect();
    let (vs, vc) = (e.embed(&s).unwrap(), e.embed(&c).unwrap());
    assert_eq!(vs, e.embed(&s).unwrap(), "deterministic");
    assert_eq!(e.dim(), 256);
    assert_eq!(e.id(), "hash-256");
    for v in vs.iter().chain(&vc) {
        let n: f32 = v.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
    }
    let mean = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        let mut sum = 0.0;
        let mut k = 0;
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                if !std::ptr::eq(a, b) || i != j {
                    sum += cosine(x, y);
                    k += 1;
                }
            }
        }
        sum / k as f32
    };
    let within = mean(&vs, &vs);
    let across = mean(&vs, &vc);
    assert!(within > across + 0.1, "within {within}, across {across}");
    assert_eq!(
        e.embed(&[""]).unwrap()[0],
        vec![0.0; 256],
        "empty text: zero vector"
    );
}

#[test]
fn bottom_k_is_deterministic_mergeable_and_keeps_redeliveries_once() {
    let ids: Vec<String> = (0..2000).map(|i| format!("evt-{i}")).collect();
    let sample = |ids: &[String]| {
        let mut b = BottomK::new(100);
        for id in ids {
            b.offer(sample_hash(id), || id.clone());
        }
        b
    };
    let all = sample(&ids);
    assert_eq!(all.len(), 100);
    // The 100 lowest hashes.
    let mut hashes: Vec<u64> = ids.iter().map(|i| sample_hash(i)).collect();
    hashes.sort_unstable();
    let kept: Vec<u64> = all.items().map(|(h, _)| *h).collect();
    assert_eq!(kept, hashes[..100]);
    // Any split, merged, gives the same sample.
    let mut rng = SmallRng::seed_from_u64(9);
    for _ in 0..20 {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for id in &ids {
            if rng.random_bool(0.5) {
                a.push(id.clone())
            } else {
                b.push(id.clone())
            }
        }
        let mut m = sample(&a);
        m.merge(sample(&b));
        assert_eq!(m.into_items(), all.clone().into_items());
    }
    // Redelivered events count once.
    let twice: Vec<String> = ids.iter().chain(&ids).cloned().collect();
    assert_eq!(sample(&twice).into_items(), all.into_items());
}

#[test]
fn bottom_k_sample_is_uniform_over_the_input() {
    // Event i carries the value i: the sample mean estimates the population mean without bias,
    // over many disjoint populations.
    let mut worst: f64 = 0.0;
    let mut means = Vec::new();
    for run in 0..50 {
        let mut b = BottomK::new(400);
        for i in 0..10_000u32 {
            let id = format!("run{run}-evt{i}");
            b.offer(sample_hash(&id), || i);
        }
        let m = b.items().map(|(_, v)| f64::from(*v)).sum::<f64>() / 400.0;
        worst = worst.max((m - 4999.5).abs());
        means.push(m);
    }
    let grand = means.iter().sum::<f64>() / means.len() as f64;
    // One sample's mean has sd ≈ 2887 / √400 ≈ 144; the mean of 50 samples ≈ 20.
    assert!((grand - 4999.5).abs() < 80.0, "grand mean {grand}");
    assert!(worst < 600.0, "worst sample mean off by {worst}");
}

fn gaussian(rng: &mut SmallRng, n: usize, dim: usize, shift: &[f32]) -> Vec<Vec<f32>> {
    let normal = Normal::new(0.0f32, 1.0).expect("valid");
    (0..n)
        .map(|_| {
            (0..dim)
                .map(|d| normal.sample(rng) + shift.get(d).copied().unwrap_or(0.0))
                .collect()
        })
        .collect()
}

/// (reference, current, seed) → drifted.
type TwoSample = dyn Fn(&[Vec<f32>], &[Vec<f32>], u64) -> bool;

/// Rejections out of `runs` two-sample tests; `shift` moves the current sample's mean.
fn rejections(runs: u64, shift: &[f32], test: &TwoSample) -> u32 {
    let mut rejected = 0;
    for seed in 0..runs {
        let mut rng = SmallRng::seed_from_u64(seed);
        // A common offset so the centroid test has a direction to compare.
        let base = [3.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let moved: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, b)| b + shift.get(i).copied().unwrap_or(0.0))
            .collect();
        let r = gaussian(&mut rng, 40, 8, &base);
        let c = gaussian(&mut rng, 40, 8, &moved);
        rejected += u32::from(test(&r, &c, seed));
    }
    rejected
}

#[test]
fn mmd_test_holds_its_false_alarm_rate_and_detects_a_shift() {
    let mmd = |r: &[Vec<f32>], c: &[Vec<f32>], seed: u64| mmd_test(r, c, 99, 0.05, seed).drifted;
    // 300 stationary runs at alpha = 0.05: 15 expected (sd 3.8).
    let fa = rejections(300, &[], &mmd);
    assert!(
        (4..=27).contains(&fa),
        "{fa} false alarms in 300 runs at alpha 0.05"
    );
    let det = rejections(100, &[0.0, 1.0, 1.0], &mmd);
    assert!(det >= 90, "detected {det} of 100 shifts");
}

#[test]
fn centroid_test_holds_its_false_alarm_rate_and_detects_a_rotation() {
    let cen =
        |r: &[Vec<f32>], c: &[Vec<f32>], seed: u64| centroid_test(r, c, 199, 0.05, seed).drifted;
    let fa = rejections(300, &[], &cen);
    assert!(
        (4..=27).contains(&fa),
        "{fa} false alarms in 300 runs at alpha 0.05"
    );
    // The mean turns away from the reference's direction.
    let det = rejections(100, &[0.0, 1.5, 1.5], &cen);
    assert!(det >= 90, "detected {det} of 100 shifts");
}

#[test]
fn mmd_on_hashed_text_flags_a_20_percent_topic_mix_and_not_the_same_topic() {
    let e = HashEmbedder::default();
    let embed = |texts: Vec<String>| {
        let t: Vec<&str> = texts.iter().map(String::as_str).collect();
        e.embed(&t).unwrap()
    };
    let (mut same, mut mixed) = (0, 0);
    for seed in 0..20 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let reference = embed((0..60).map(|_| sentence(&mut rng, SUPPORT)).collect());
        let stationary = embed((0..60).map(|_| sentence(&mut rng, SUPPORT)).collect());
        let shifted = embed(
            (0..60)
                .map(|i| sentence(&mut rng, if i % 5 == 0 { CODE } else { SUPPORT }))
                .collect(),
        );
        // Fitted on the pooled sample (see `Pca`).
        let pooled = |x: &[Vec<f32>]| reference.iter().chain(x).cloned().collect::<Vec<_>>();
        let (pca_s, pca_m) = (
            Pca::fit(&pooled(&stationary), 16, seed),
            Pca::fit(&pooled(&shifted), 16, seed),
        );
        let p = |pca: &Pca, x: &[Vec<f32>]| x.iter().map(|v| pca.project(v)).collect::<Vec<_>>();
        let (r, c) = (p(&pca_s, &reference), p(&pca_s, &stationary));
        same += u32::from(mmd_test(&r, &c, 99, 0.01, seed).drifted);
        let (r, c) = (p(&pca_m, &reference), p(&pca_m, &shifted));
        mixed += u32::from(mmd_test(&r, &c, 99, 0.01, seed).drifted);
    }
    // At alpha 0.01, 0.2 of 20 stationary windows are expected to be flagged.
    assert!(
        same <= 2,
        "{same} of 20 stationary windows flagged at alpha 0.01"
    );
    // One window of 60 texts catches a 20 % mix about 9 times in 10 (measured: 35 of 40), so
    // three windows in a row all miss it with probability ≈ 0.2 %.
    assert!(
        mixed >= 15,
        "{mixed} of 20 windows with 20 % code prompts flagged"
    );
}

#[test]
fn pca_finds_the_direction_of_largest_variance() {
    let mut rng = SmallRng::seed_from_u64(4);
    let normal = Normal::new(0.0f32, 1.0).unwrap();
    let x: Vec<Vec<f32>> = (0..500)
        .map(|_| {
            let t = normal.sample(&mut rng) * 5.0;
            vec![
                t * 0.6,
                t * 0.8,
                normal.sample(&mut rng),
                normal.sample(&mut rng),
            ]
        })
        .collect();
    let pca = Pca::fit(&x, 2, 1);
    let c = pca.components();
    let along = (c[0][0] * 0.6 + c[0][1] * 0.8).abs();
    assert!(along > 0.99, "first component {:?}", c[0]);
    let dot: f64 = c[0].iter().zip(&c[1]).map(|(a, b)| a * b).sum();
    assert!(dot.abs() < 1e-6, "components are orthogonal: {dot}");
}
