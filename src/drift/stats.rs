//! Two-sample tests on embeddings, each with its own calibrated null distribution.
//!
//! - [`mmd_test`]: the maximum mean discrepancy (Gretton et al., "A Kernel Two-Sample Test",
//!   JMLR 2012), unbiased MMD² with a Gaussian (RBF) kernel whose bandwidth is the median
//!   pairwise distance of the pooled sample (the median heuristic, §8 there), and a
//!   permutation null: the labels "reference" / "current" are shuffled and the statistic
//!   recomputed from the one kernel matrix. Sensitive to any change of distribution.
//! - [`centroid_test`]: the cosine distance between the two samples' mean vectors, against a
//!   bootstrap null drawn from the reference alone (two resamples of the two sizes). Cheap, and blind to changes that keep the mean, e.g. a narrower spread of topics.
//! - [`neighbour_test`], after the nearest-neighbour test of Schilling (JASA 1986) and Henze
//!   (Annals of Statistics 1988): how many of each current text's nearest neighbours (by
//!   cosine, on the embeddings themselves) are current texts, cubed and averaged, against a
//!   permutation null. Local: a few texts alike one another and unlike the reference move it
//!   when they are too few to move MMD or the centroid.
//!
//! Each returns a p-value `(1 + #{null ≥ observed}) / (1 + draws)`, which is valid (never
//! below the true one) for any number of draws; a window drifts when `p ≤ alpha`. With one
//! test per window and series, `alpha` *is* the false-alarm rate per window and series.
//!
//! Draws stop early once [`STOP_AFTER`] of them reached the observed statistic: the p-value
//! is then `STOP_AFTER / draws` (Besag & Clifford, "Sequential Monte Carlo p-values",
//! Biometrika 1991), still valid. A stationary window typically stops after a few dozen draws,
//! so the thousands of draws a small `alpha` needs are spent only on windows that look
//! drifted.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    pub statistic: f64,
    /// The null's (1 − alpha) quantile: the statistic drifts above it.
    pub threshold: f64,
    pub p_value: f64,
    pub drifted: bool,
    /// The statistic standardized by the null draws: (observed − mean) / sd. Comparable
    /// across windows of different sizes and bandwidths (see `drift::stage`).
    pub z: f64,
}

/// Null draws at or above the observed statistic after which drawing stops.
pub const STOP_AFTER: usize = 12;

/// Draws from a null until `draws` or until [`STOP_AFTER`] reach `observed`.
/// Draws no fewer than this before stopping early, so the null's mean and spread (for
/// [`TestResult::z`]) are estimated from enough draws.
pub const MIN_DRAWS: usize = 100;

fn draw_null(observed: f64, draws: usize, mut next: impl FnMut() -> f64) -> Vec<f64> {
    let mut null = Vec::with_capacity(draws.min(1024));
    let mut above = 0;
    for _ in 0..draws {
        let v = next();
        above += usize::from(v >= observed);
        null.push(v);
        if above >= STOP_AFTER && null.len() >= MIN_DRAWS {
            break;
        }
    }
    null
}

fn result(observed: f64, mut null: Vec<f64>, alpha: f64) -> TestResult {
    let above = null.iter().filter(|v| **v >= observed).count();
    let p_value = if above >= STOP_AFTER {
        above as f64 / null.len() as f64
    } else {
        (1 + above) as f64 / (1 + null.len()) as f64
    };
    let z = if null.len() >= 2 {
        let n = null.len() as f64;
        let mean = null.iter().sum::<f64>() / n;
        let sd = (null.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt();
        (observed - mean) / sd.max(1e-12)
    } else {
        0.0
    };
    null.sort_by(f64::total_cmp);
    let threshold = if null.is_empty() {
        f64::INFINITY
    } else {
        let i = (((1.0 - alpha) * null.len() as f64).ceil() as usize).clamp(1, null.len()) - 1;
        null[i]
    };
    TestResult {
        statistic: observed,
        threshold,
        p_value,
        drifted: p_value <= alpha,
        z,
    }
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The pooled sample's RBF kernel matrix (n × n, row-major), bandwidth by the median
/// heuristic.
fn rbf_kernel(pooled: &[&[f32]]) -> Vec<f32> {
    let n = pooled.len();
    let mut d = vec![0f32; n * n];
    let mut off = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let v = sq_dist(pooled[i], pooled[j]);
            d[i * n + j] = v;
            d[j * n + i] = v;
            off.push(v);
        }
    }
    let mid = off.len() / 2;
    let median = if off.is_empty() {
        1.0
    } else {
        *off.select_nth_unstable_by(mid, f32::total_cmp).1
    }
    .max(1e-12);
    for v in &mut d {
        *v = (-*v / median).exp();
    }
    d
}

/// Unbiased MMD² (Gretton et al. 2012, eq. 3) of a split of the pooled
/// sample into `current` (the indices given) and the rest, from the kernel matrix `k`, its
/// row sums and their total: only the current × current block is summed, so a permutation
/// costs c² instead of n².
fn mmd2_split(k: &[f32], n: usize, rows: &[f64], total: f64, current: &[usize]) -> f64 {
    let c = current.len() as f64;
    let r = (n - current.len()) as f64;
    let mut cc = 0f64;
    for &i in current {
        let row = &k[i * n..(i + 1) * n];
        let mut s = 0f32;
        for &j in current {
            s += row[j];
        }
        cc += f64::from(s);
    }
    let cr = current.iter().map(|&i| rows[i]).sum::<f64>() - cc;
    let rr = total - cc - 2.0 * cr;
    // Unbiased: without the diagonal (k(x, x) = 1).
    (cc - c) / (c * (c - 1.0)) + (rr - r) / (r * (r - 1.0)) - 2.0 * cr / (c * r)
}

/// MMD² with an RBF kernel (median heuristic) and a permutation null.
pub fn mmd_test(
    reference: &[Vec<f32>],
    current: &[Vec<f32>],
    permutations: usize,
    alpha: f64,
    seed: u64,
) -> TestResult {
    kernel_tests(reference, current, permutations, alpha, seed).mmd
}

/// [`kernel_tests`]' outcome.
#[derive(Debug, Clone)]
pub struct KernelTests {
    pub mmd: TestResult,
    /// The MMD witness function at each current point: its mean kernel similarity to the
    /// current sample minus that to the reference. The current texts where it is highest are
    /// the ones the reference has least of: what moved.
    pub witness: Vec<f64>,
}

/// [`mmd_test`] and, from the same kernel matrix, the witness function at each current text.
pub fn kernel_tests(
    reference: &[Vec<f32>],
    current: &[Vec<f32>],
    permutations: usize,
    alpha: f64,
    seed: u64,
) -> KernelTests {
    if reference.len() < 2 || current.len() < 2 {
        return KernelTests {
            mmd: result(0.0, Vec::new(), alpha),
            witness: vec![0.0; current.len()],
        };
    }
    let pooled: Vec<&[f32]> = reference.iter().chain(current).map(Vec::as_slice).collect();
    let n = pooled.len();
    let k = rbf_kernel(&pooled);
    let rows: Vec<f64> = k
        .chunks_exact(n)
        .map(|r| r.iter().map(|v| f64::from(*v)).sum())
        .collect();
    let total: f64 = rows.iter().sum();
    let m = reference.len();
    let c = current.len();
    let observed_idx: Vec<usize> = (m..n).collect();
    let observed = mmd2_split(&k, n, &rows, total, &observed_idx);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..n).collect();
    let null = draw_null(observed, permutations, || {
        random_subset(&mut idx, c, &mut rng);
        mmd2_split(&k, n, &rows, total, &idx[..c])
    });
    let mmd = result(observed, null, alpha);
    let witness = (m..n)
        .map(|i| {
            let row = &k[i * n..(i + 1) * n];
            let own = (m..n)
                .filter(|j| *j != i)
                .map(|j| f64::from(row[j]))
                .sum::<f64>()
                / (n - m - 1) as f64;
            let other = row[..m].iter().map(|v| f64::from(*v)).sum::<f64>() / m as f64;
            own - other
        })
        .collect();
    KernelTests { mmd, witness }
}

/// Puts a uniformly random `c`-subset of `idx` first: a partial Fisher–Yates shuffle.
fn random_subset(idx: &mut [usize], c: usize, rng: &mut SmallRng) {
    let n = idx.len();
    for i in 0..c {
        let j = rng.random_range(i..n);
        idx.swap(i, j);
    }
}

/// Neighbours per text in [`neighbour_test`].
pub const NEIGHBOURS: usize = 10;

/// The nearest-neighbour two-sample test, after Schilling ("Multivariate two-sample tests
/// based on nearest neighbors", JASA 1986) and Henze (Annals of Statistics 1988), with a
/// weight that looks for clusters. Each text's [`NEIGHBOURS`] nearest texts in the pooled
/// sample (itself excluded) by cosine similarity, on the embeddings themselves; for each
/// current text, the share `s` of its neighbours that are current texts; the statistic is
/// the mean of `s³` over the current sample, against a permutation null over the same
/// neighbour lists (the lists are fixed, only the labels move, so the null is exact).
///
/// Schilling's statistic is the mean of `s`: every current-current neighbour counts alike,
/// so ten texts of one jailbreak campaign among forty are diluted by the thirty ordinary ones.
/// The cube makes a text whose neighbourhood is mostly current count far more than many
/// texts with one current neighbour each. On the real-traffic evaluation (5 % jailbreaks,
/// static embedder, `examples/drift_eval.rs`) the median calibrated residual over the first
/// three shifted windows went from 3.3σ (mean of `s`, 16 PCA dimensions) to 11σ with `s²` and
/// 19σ with `s³` on the full embeddings, while the stationary windows' 99th percentile rose
/// only from 2.8σ to 4.7σ. Neighbours are found on the full embeddings because the few
/// leading principal directions of a pooled sample do not separate a small cluster from the
/// bulk (`s²`: 6σ in 16 dimensions, 11σ in all 256).
///
/// Cost: the pooled similarity matrix, `n² · dim` multiply-adds by a blocked matrix product
/// (`matrixmultiply`, which picks AVX/FMA at run time), then `c · NEIGHBOURS` lookups per
/// permutation.
pub fn neighbour_test(
    reference: &[Vec<f32>],
    current: &[Vec<f32>],
    permutations: usize,
    alpha: f64,
    seed: u64,
) -> TestResult {
    let (m, c) = (reference.len(), current.len());
    let n = m + c;
    if m < 2 || c < 2 {
        return result(0.0, Vec::new(), alpha);
    }
    let per = NEIGHBOURS.min(n - 1);
    let pooled: Vec<&[f32]> = reference.iter().chain(current).map(Vec::as_slice).collect();
    let neighbours = nearest(&cosine_similarities(&pooled), n, per);
    let mut current_now = vec![false; n];
    let stat = |set: &[usize], current_now: &mut [bool]| {
        set.iter().for_each(|&i| current_now[i] = true);
        let total: f64 = set
            .iter()
            .map(|&i| {
                let same = neighbours[i * per..(i + 1) * per]
                    .iter()
                    .filter(|&&j| current_now[j as usize])
                    .count();
                (same as f64 / per as f64).powi(3)
            })
            .sum();
        set.iter().for_each(|&i| current_now[i] = false);
        total / set.len() as f64
    };
    let observed_idx: Vec<usize> = (m..n).collect();
    let observed = stat(&observed_idx, &mut current_now);
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x006b_6e6e);
    let mut idx: Vec<usize> = (0..n).collect();
    let null = draw_null(observed, permutations, || {
        random_subset(&mut idx, c, &mut rng);
        stat(&idx[..c], &mut current_now)
    });
    result(observed, null, alpha)
}

/// The cosine similarities of the vectors (n × n, row-major): the unit vectors' Gram
/// matrix.
fn cosine_similarities(x: &[&[f32]]) -> Vec<f32> {
    let n = x.len();
    let dim = x.first().map_or(0, |v| v.len());
    let mut unit = Vec::with_capacity(n * dim);
    for v in x {
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
        unit.extend(v.iter().map(|a| a / norm));
    }
    let mut out = vec![0f32; n * n];
    // SAFETY: `unit` is n × dim and `out` n × n, both row-major with the strides given; the
    // second operand is `unit` read as its transpose (dim × n: row stride 1, column stride
    // dim). matrixmultiply reads and writes within those bounds only.
    unsafe {
        matrixmultiply::sgemm(
            n,
            dim,
            n,
            1.0,
            unit.as_ptr(),
            dim as isize,
            1,
            unit.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}

/// Each of the `n` points' `kk` nearest others by similarity `k` (row-major n × n, larger is
/// nearer): `kk` per point, nearest first.
fn nearest(k: &[f32], n: usize, kk: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(n * kk);
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(kk + 1);
    for i in 0..n {
        best.clear();
        for (j, &v) in k[i * n..(i + 1) * n].iter().enumerate() {
            if j == i || (best.len() == kk && v <= best[kk - 1].0) {
                continue;
            }
            // Insertion into the few kept, largest first.
            let at = best.partition_point(|b| b.0 >= v);
            best.insert(at, (v, j as u32));
            best.truncate(kk);
        }
        out.extend(best.iter().map(|b| b.1));
    }
    out
}

fn centroid(x: &[&[f32]]) -> Vec<f64> {
    let mut c = vec![0f64; x.first().map_or(0, |v| v.len())];
    for v in x {
        for (a, b) in c.iter_mut().zip(v.iter()) {
            *a += f64::from(*b);
        }
    }
    c
}

fn cosine_distance(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    1.0 - dot / (na * nb)
}

/// Cosine distance between the centroids of the reference and the current sample, against a
/// bootstrap null from the reference alone: two resamples (with replacement) of the two
/// sizes, their centroids' distance. Each draw costs (r + c) · dim. Do not give it vectors
/// projected by a [`Pca`] fitted with the current sample: the null, drawn from the reference
/// alone, would not see the directions fitted to the current sample's own noise.
pub fn centroid_test(
    reference: &[Vec<f32>],
    current: &[Vec<f32>],
    draws: usize,
    alpha: f64,
    seed: u64,
) -> TestResult {
    let (r, c) = (reference.len(), current.len());
    if r == 0 || c == 0 {
        return result(0.0, Vec::new(), alpha);
    }
    let refs: Vec<&[f32]> = reference.iter().map(Vec::as_slice).collect();
    let cur: Vec<&[f32]> = current.iter().map(Vec::as_slice).collect();
    let observed = cosine_distance(&centroid(&refs), &centroid(&cur));
    let mut rng = SmallRng::seed_from_u64(seed);
    let dim = refs[0].len();
    let (mut a, mut b) = (vec![0f64; dim], vec![0f64; dim]);
    let resample = |out: &mut Vec<f64>, size: usize, rng: &mut SmallRng| {
        out.iter_mut().for_each(|v| *v = 0.0);
        for _ in 0..size {
            for (o, x) in out.iter_mut().zip(refs[rng.random_range(0..r)]) {
                *o += f64::from(*x);
            }
        }
    };
    let null = draw_null(observed, draws, || {
        resample(&mut a, r, &mut rng);
        resample(&mut b, c, &mut rng);
        cosine_distance(&a, &b)
    });
    result(observed, null, alpha)
}

/// The top principal directions of a sample (subspace iteration), for reducing
/// embeddings before [`mmd_test`]: distances in a few hundred noisy dimensions concentrate,
/// which costs the kernel its contrast.
///
/// Fit it on the **pooled** sample (reference and current together), never on the reference
/// alone: directions fitted to the reference's own noise spread the reference more than any
/// fresh sample, and the test then flags stationary traffic (measured: 40 of 40 windows at
/// alpha 0.01 with 60 texts and 16 components). Fitted without the labels, the projection
/// treats both samples alike and the permutation null stays exact.
#[derive(Debug, Clone)]
pub struct Pca {
    mean: Vec<f64>,
    components: Vec<Vec<f64>>,
}

/// Enough for the leading directions of embedding samples; the tests stay valid whatever
/// the projection (it is fitted without the labels), only their power depends on it.
const SUBSPACE_ITERATIONS: usize = 8;

/// Gram–Schmidt on the rows (a row that collapses is left at zero).
fn orthonormalize(w: &mut [Vec<f64>]) {
    for i in 0..w.len() {
        for j in 0..i {
            let d: f64 = w[i].iter().zip(&w[j]).map(|(a, b)| a * b).sum();
            let (head, tail) = w.split_at_mut(i);
            for (o, a) in tail[0].iter_mut().zip(&head[j]) {
                *o -= d * a;
            }
        }
        let norm = w[i].iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-12 {
            w[i].iter_mut().for_each(|a| *a /= norm);
        } else {
            w[i].iter_mut().for_each(|a| *a = 0.0);
        }
    }
}

/// Eigenvalues and eigenvectors (columns) of a small symmetric matrix, by cyclic Jacobi
/// rotations.
fn jacobi_eigen(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _ in 0..50 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-18 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (head, tail) = a.split_at_mut(q);
                for (apk, aqk) in head[p].iter_mut().zip(tail[0].iter_mut()) {
                    let (x, y) = (*apk, *aqk);
                    *apk = c * x - s * y;
                    *aqk = s * x + c * y;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

impl Pca {
    pub fn fit(x: &[Vec<f32>], k: usize, seed: u64) -> Pca {
        let dim = x.first().map_or(0, Vec::len);
        let n = x.len().max(1) as f64;
        let mut mean = vec![0f64; dim];
        for v in x {
            for (m, a) in mean.iter_mut().zip(v) {
                *m += f64::from(*a) / n;
            }
        }
        let centered: Vec<Vec<f64>> = x
            .iter()
            .map(|v| {
                v.iter()
                    .zip(&mean)
                    .map(|(a, m)| f64::from(*a) - m)
                    .collect()
            })
            .collect();
        // Subspace iteration (W ← orthonormalize(Xᵀ X W)) with all k directions at once,
        // then Rayleigh–Ritz: the k × k problem inside the subspace, solved by Jacobi, turns
        // the basis into the principal directions and orders them.
        let k = k.min(dim);
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut w: Vec<Vec<f64>> = (0..k)
            .map(|_| (0..dim).map(|_| rng.random::<f64>() - 0.5).collect())
            .collect();
        orthonormalize(&mut w);
        let scores = |w: &[Vec<f64>]| -> Vec<Vec<f64>> {
            centered
                .iter()
                .map(|row| {
                    w.iter()
                        .map(|c| row.iter().zip(c).map(|(a, b)| a * b).sum())
                        .collect()
                })
                .collect()
        };
        for _ in 0..SUBSPACE_ITERATIONS {
            let y = scores(&w);
            let mut z = vec![vec![0f64; dim]; k];
            for (row, ys) in centered.iter().zip(&y) {
                for (zj, yj) in z.iter_mut().zip(ys) {
                    for (o, a) in zj.iter_mut().zip(row) {
                        *o += yj * a;
                    }
                }
            }
            w = z;
            orthonormalize(&mut w);
        }
        let y = scores(&w);
        let mut b = vec![vec![0f64; k]; k];
        for ys in &y {
            for i in 0..k {
                for j in 0..k {
                    b[i][j] += ys[i] * ys[j];
                }
            }
        }
        let (values, vectors) = jacobi_eigen(b);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|a, b| values[*b].total_cmp(&values[*a]));
        let components = order
            .iter()
            .map(|&e| {
                let mut c = vec![0f64; dim];
                for (i, wi) in w.iter().enumerate() {
                    for (o, a) in c.iter_mut().zip(wi) {
                        *o += vectors[i][e] * a;
                    }
                }
                c
            })
            .collect();
        Pca { mean, components }
    }

    /// The exact principal directions of many rows of few dimensions (a vocabulary of token
    /// vectors): the `dim × dim` covariance and its eigenvectors, the `k` largest first.
    pub fn fit_exact(x: &[Vec<f32>], k: usize) -> Pca {
        let dim = x.first().map_or(0, Vec::len);
        let n = x.len().max(1) as f64;
        let mut mean = vec![0f64; dim];
        for v in x {
            for (m, a) in mean.iter_mut().zip(v) {
                *m += f64::from(*a) / n;
            }
        }
        let mut cov = vec![vec![0f64; dim]; dim];
        let mut c = vec![0f64; dim];
        for v in x {
            for ((o, a), m) in c.iter_mut().zip(v).zip(&mean) {
                *o = f64::from(*a) - m;
            }
            for (i, row) in cov.iter_mut().enumerate() {
                let ci = c[i];
                for (r, cj) in row[i..].iter_mut().zip(&c[i..]) {
                    *r += ci * cj;
                }
            }
        }
        for i in 1..dim {
            let (upper, lower) = cov.split_at_mut(i);
            for (j, row) in upper.iter().enumerate() {
                lower[0][j] = row[i];
            }
        }
        let (values, vectors) = jacobi_eigen(cov);
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|a, b| values[*b].total_cmp(&values[*a]));
        let components = order
            .iter()
            .take(k.min(dim))
            .map(|&e| vectors.iter().map(|row| row[e]).collect())
            .collect();
        Pca { mean, components }
    }

    /// The unit-length directions, largest variance first.
    pub fn components(&self) -> &[Vec<f64>] {
        &self.components
    }

    pub fn project(&self, v: &[f32]) -> Vec<f32> {
        self.components
            .iter()
            .map(|c| {
                v.iter()
                    .zip(&self.mean)
                    .zip(c)
                    .map(|((a, m), w)| (f64::from(*a) - m) * w)
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

/// P(Z > z) for a standard normal Z (Abramowitz & Stegun 7.1.26 for erfc; absolute error
/// below 1.5e-7, relative error a few percent at 1e-5).
pub fn normal_sf(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    if x >= 0.0 {
        erfc / 2.0
    } else {
        1.0 - erfc / 2.0
    }
}

/// The z above which `P(Z > z) ≤ p` (bisection on [`normal_sf`]).
pub fn normal_isf(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0, 40.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if normal_sf(mid) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}
