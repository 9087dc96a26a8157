//! The statistics of an experiment's scorecard: per-arm moments that merge across windows,
//! fixed-horizon tests (Welch's t, two proportions), a sequential test that stays valid when
//! every window is looked at (mSPRT), the sample-ratio-mismatch check, and multiple-testing
//! corrections.
//!
//! References:
//! - B. L. Welch (1947), "The generalization of Student's problem when several different
//!   population variances are involved", Biometrika 34.
//! - R. Johari, L. Pekelis, D. Walsh (2017/2022), "Always valid inference: continuous monitoring
//!   of A/B tests", Operations Research 70(3) — the mixture SPRT with a normal mixing
//!   distribution, its always-valid p-value and confidence sequence.
//! - S. Holm (1979), "A simple sequentially rejective multiple test procedure"; Y. Benjamini,
//!   Y. Hochberg (1995), "Controlling the false discovery rate".
//! - Sample ratio mismatch: a χ² goodness-of-fit test of the arms' counts against the configured
//!   split (R. Kohavi et al., "Trustworthy Online Controlled Experiments", ch. 21).

use statrs::distribution::{ChiSquared, ContinuousCDF, Normal, StudentsT};

/// Count, mean and sum of squared deviations of a metric in one arm (Welford), mergeable
/// across windows (Chan et al.'s parallel update).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Moments {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    pub fn merge(&mut self, o: &Moments) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *o;
            return;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        self.m2 += o.m2 + d * d * (self.n as f64 * o.n as f64) / n as f64;
        self.mean += d * o.n as f64 / n as f64;
        self.n = n;
    }

    /// Sample variance (n − 1).
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            f64::NAN
        } else {
            self.m2 / (self.n - 1) as f64
        }
    }

    /// Variance of the mean.
    pub fn var_of_mean(&self) -> f64 {
        self.variance() / self.n as f64
    }
}

/// Treatment against control on one metric.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Comparison {
    pub control: f64,
    pub treatment: f64,
    /// treatment − control.
    pub diff: f64,
    /// diff / control (NaN when the control is 0).
    pub lift: f64,
    /// Standard error of `diff`.
    pub se: f64,
    /// The test statistic (t or z).
    pub stat: f64,
    pub p_value: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

fn comparison(c: f64, t: f64, se: f64, stat: f64, p: f64, half: f64) -> Comparison {
    let diff = t - c;
    Comparison {
        control: c,
        treatment: t,
        diff,
        lift: if c != 0.0 { diff / c } else { f64::NAN },
        se,
        stat,
        p_value: p,
        ci_low: diff - half,
        ci_high: diff + half,
    }
}

/// Welch's two-sided t-test and its (1 − alpha) interval for the difference of means;
/// `None` with fewer than two observations in an arm or no variance at all.
pub fn welch(control: &Moments, treatment: &Moments, alpha: f64) -> Option<Comparison> {
    if control.n < 2 || treatment.n < 2 {
        return None;
    }
    let (va, vb) = (control.var_of_mean(), treatment.var_of_mean());
    let se2 = va + vb;
    if se2 <= 0.0 || !se2.is_finite() {
        return None;
    }
    // Welch–Satterthwaite degrees of freedom.
    let df = se2 * se2 / (va * va / (control.n - 1) as f64 + vb * vb / (treatment.n - 1) as f64);
    let se = se2.sqrt();
    let t = (treatment.mean - control.mean) / se;
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p = 2.0 * (1.0 - dist.cdf(t.abs()));
    let half = dist.inverse_cdf(1.0 - alpha / 2.0) * se;
    Some(comparison(control.mean, treatment.mean, se, t, p, half))
}

/// Two-proportion z-test (pooled standard error under the null) with a Wald interval for the
/// difference (unpooled); `None` when an arm is empty or both rates are 0 or 1.
pub fn two_proportions(
    x_control: u64,
    n_control: u64,
    x_treatment: u64,
    n_treatment: u64,
    alpha: f64,
) -> Option<Comparison> {
    if n_control == 0 || n_treatment == 0 {
        return None;
    }
    let (na, nb) = (n_control as f64, n_treatment as f64);
    let (pa, pb) = (x_control as f64 / na, x_treatment as f64 / nb);
    let pooled = (x_control + x_treatment) as f64 / (na + nb);
    let se0 = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    if se0 <= 0.0 {
        return None;
    }
    let z = (pb - pa) / se0;
    let normal = Normal::standard();
    let p = 2.0 * (1.0 - normal.cdf(z.abs()));
    let se = (pa * (1.0 - pa) / na + pb * (1.0 - pb) / nb).sqrt();
    let half = normal.inverse_cdf(1.0 - alpha / 2.0) * se;
    Some(comparison(pa, pb, se, z, p, half))
}

/// The mixture sequential probability ratio test (Johari et al.) for a difference of means
/// with estimate `diff` and variance `v` (= se²), against H0: difference 0, mixing over
/// N(0, tau²) alternatives. Its p-value, kept as a running minimum across looks
/// ([`AlwaysValid`]), is valid however often and whenever one looks.
pub fn msprt_likelihood_ratio(diff: f64, v: f64, tau2: f64) -> f64 {
    // (NaN fails every comparison: it lands here too.)
    if !positive(v) || !positive(tau2) || !diff.is_finite() {
        return 1.0;
    }
    ((v / (v + tau2)).ln() / 2.0 + tau2 * diff * diff / (2.0 * v * (v + tau2))).exp()
}

/// Half-width of the mSPRT confidence sequence at level 1 − alpha around `diff`.
pub fn msprt_half_width(v: f64, tau2: f64, alpha: f64) -> f64 {
    if !positive(v) || !positive(tau2) {
        return f64::INFINITY;
    }
    ((v * (v + tau2) / tau2) * (2.0 * (1.0 / alpha).ln() + ((v + tau2) / v).ln())).sqrt()
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// An always-valid p-value: the running minimum of 1 / Λ over the looks taken so far.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlwaysValid {
    pub p: f64,
}

impl Default for AlwaysValid {
    fn default() -> Self {
        AlwaysValid { p: 1.0 }
    }
}

impl AlwaysValid {
    /// One look at the data so far (cumulative estimate and its variance).
    pub fn look(&mut self, diff: f64, v: f64, tau2: f64) -> f64 {
        let lr = msprt_likelihood_ratio(diff, v, tau2);
        if lr.is_finite() && lr > 0.0 {
            self.p = self.p.min(1.0 / lr).min(1.0);
        } else if lr == f64::INFINITY {
            self.p = 0.0;
        }
        self.p
    }
}

/// Sample-ratio mismatch: χ² goodness of fit of the arms' counts against the expected shares
/// (normalized); the p-value (1 when there is nothing to test).
pub fn srm_p_value(counts: &[u64], expected_shares: &[f64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let share_sum: f64 = expected_shares.iter().sum();
    if counts.len() < 2 || counts.len() != expected_shares.len() || total == 0 || share_sum <= 0.0 {
        return 1.0;
    }
    let mut chi2 = 0.0;
    for (&c, &s) in counts.iter().zip(expected_shares) {
        let e = total as f64 * s / share_sum;
        if e > 0.0 {
            chi2 += (c as f64 - e).powi(2) / e;
        }
    }
    match ChiSquared::new((counts.len() - 1) as f64) {
        Ok(d) => 1.0 - d.cdf(chi2),
        Err(_) => 1.0,
    }
}

/// Holm's step-down adjusted p-values (family-wise error), in the input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Benjamini–Hochberg adjusted p-values (false discovery rate), in the input order.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 1.0;
    for (k, &i) in order.iter().enumerate() {
        let rank = m - k; // 1-based rank in ascending order
        running = running.min((p[i] * m as f64 / rank as f64).min(1.0));
        out[i] = running;
    }
    out
}
