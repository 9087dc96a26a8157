//! Scalar and categorical drift: lengths, token counts, finish reasons, refusals, scripts.
//!
//! Every event of a series counts (no sampling: a histogram costs the same for 10 events or
//! 10 million). Numbers are binned on a log scale, four bins per doubling (≈ 19 % wide), so a
//! window's histogram is a few hundred bytes and windows merge by adding counts.
//!
//! Statistics, current window against the reference (the union of the reference windows):
//! - categorical: Jensen–Shannon distance (base 2, in [0, 1]) and the population stability
//!   index (PSI, with 0.5-count smoothing so an unseen category is finite);
//! - numeric: Kolmogorov–Smirnov D and the Wasserstein-1 distance, both on the binned values
//!   (W₁ is in doublings: 1.0 means "typically twice as long").
//!
//! Thresholds come from the reference's own window-to-window variation, as NannyML does:
//! each reference window is compared with the rest of the reference (leave one out), and a
//! statistic drifts above mean + `sigma` · standard deviation of those (default 3σ).

use std::collections::BTreeMap;

use crate::event::LlmEvent;

/// Bins per doubling of a numeric value.
const PER_OCTAVE: f64 = 4.0;
/// Bins: 0 holds zero, the last everything from 2^((BINS-2)/4) up (≈ 1.7 M).
const BINS: usize = 84;

/// The numeric features, in table order.
pub const NUMERIC: [&str; 3] = ["input_chars", "output_chars", "output_tokens"];
/// The categorical features, in table order.
pub const CATEGORICAL: [&str; 3] = ["finish_reason", "refusal", "input_script"];

/// A log-binned histogram of a non-negative number.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Binned(Vec<u64>);

impl Binned {
    pub fn bin(v: f64) -> usize {
        if v.is_nan() || v < 1.0 {
            return 0;
        }
        ((v.log2() * PER_OCTAVE) as usize + 1).min(BINS - 1)
    }

    /// The lower edge of a bin, for explanations.
    pub fn lower_edge(bin: usize) -> f64 {
        if bin == 0 {
            0.0
        } else {
            ((bin - 1) as f64 / PER_OCTAVE).exp2()
        }
    }

    pub fn add(&mut self, v: f64) {
        if self.0.is_empty() {
            self.0 = vec![0; BINS];
        }
        self.0[Self::bin(v)] += 1;
    }

    pub fn merge(&mut self, o: &Binned) {
        if o.0.is_empty() {
            return;
        }
        if self.0.is_empty() {
            self.0 = vec![0; BINS];
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a += b;
        }
    }

    fn subtract(&mut self, o: &Binned) {
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a -= b;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn counts(&self) -> Vec<f64> {
        if self.0.is_empty() {
            vec![0.0; BINS]
        } else {
            self.0.iter().map(|c| *c as f64).collect()
        }
    }

    pub fn counts_raw(&self) -> &[u64] {
        &self.0
    }

    pub fn from_counts(counts: Vec<u64>) -> Binned {
        if counts.len() == BINS {
            Binned(counts)
        } else {
            Binned::default()
        }
    }
}

/// Counts per category.
pub type Categories = BTreeMap<Box<str>, u64>;

/// A window's scalar features for one series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scalars {
    pub numeric: [Binned; 3],
    pub categorical: [Categories; 3],
}

/// Whether an answer reads as a refusal (a cheap English phrase match; the quality stage
/// has the proper detector). Only the first 200 characters are looked at.
pub fn is_refusal(output: &str) -> bool {
    // ASCII-lowercased head on the stack: this runs for every event.
    let mut head = [0u8; 200];
    let n = output.len().min(head.len());
    for (h, b) in head.iter_mut().zip(output.as_bytes()) {
        *h = b.to_ascii_lowercase();
    }
    let head = &head[..n];
    const PHRASES_ASCII: [&[u8]; 12] = [
        b"i'm sorry, but",
        "i\u{2019}m sorry, but".as_bytes(),
        b"i am sorry, but",
        b"i can't help",
        "i can\u{2019}t help".as_bytes(),
        b"i cannot help",
        b"i can't assist",
        b"i cannot assist",
        b"i can't provide",
        b"i cannot provide",
        b"i won't",
        b"as an ai",
    ];
    // Every phrase starts with `i` or `a`: look only there.
    (0..n).any(|i| {
        matches!(head[i], b'i' | b'a') && PHRASES_ASCII.iter().any(|p| head[i..].starts_with(p))
    })
}

/// The slower reference form of [`is_refusal`] (tests compare the two).
#[cfg(test)]
pub fn is_refusal_reference(output: &str) -> bool {
    const PHRASES: [&str; 10] = [
        "i'm sorry, but",
        "i am sorry, but",
        "i can't help",
        "i cannot help",
        "i can't assist",
        "i cannot assist",
        "i can't provide",
        "i cannot provide",
        "i won't",
        "as an ai",
    ];
    let head: String = output
        .chars()
        .take(200)
        .collect::<String>()
        .to_lowercase()
        .replace('’', "'");
    PHRASES.iter().any(|p| head.contains(p))
}

/// The dominant script of a text, by letters (Latin, Cyrillic, Greek, Arabic, Hebrew,
/// Devanagari, Han, Kana, Hangul, Thai, other); "none" without letters.
pub fn script(text: &str) -> &'static str {
    // ASCII letters are Latin: the common case needs no char decoding.
    let head = &text.as_bytes()[..text.len().min(200)];
    if head.is_ascii() {
        return if head.iter().any(u8::is_ascii_alphabetic) {
            "latin"
        } else {
            "none"
        };
    }
    let mut counts = [0u32; 11];
    const NAMES: [&str; 11] = [
        "latin",
        "cyrillic",
        "greek",
        "arabic",
        "hebrew",
        "devanagari",
        "han",
        "kana",
        "hangul",
        "thai",
        "other",
    ];
    for c in text.chars().take(200).filter(|c| c.is_alphabetic()) {
        let i = match c as u32 {
            0x0000..=0x024F | 0x1E00..=0x1EFF => 0,
            0x0400..=0x052F => 1,
            0x0370..=0x03FF => 2,
            0x0600..=0x06FF | 0x0750..=0x077F => 3,
            0x0590..=0x05FF => 4,
            0x0900..=0x097F => 5,
            0x4E00..=0x9FFF | 0x3400..=0x4DBF => 6,
            0x3040..=0x30FF => 7,
            0xAC00..=0xD7AF | 0x1100..=0x11FF => 8,
            0x0E00..=0x0E7F => 9,
            _ => 10,
        };
        counts[i] += 1;
    }
    match counts.iter().enumerate().max_by_key(|(_, n)| **n) {
        Some((i, n)) if *n > 0 => NAMES[i],
        _ => "none",
    }
}

/// Adds one to a category, allocating its name only the first time.
fn count(c: &mut Categories, key: &str) {
    match c.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            c.insert(key.into(), 1);
        }
    }
}

/// Characters in a UTF-8 string: bytes that do not continue a character.
fn char_count(s: &str) -> usize {
    s.bytes().filter(|b| (b & 0xC0) != 0x80).count()
}

impl Scalars {
    pub fn observe(&mut self, e: &LlmEvent<'_>, input: Option<&str>) {
        if let Some(t) = input {
            self.numeric[0].add(char_count(t) as f64);
            count(&mut self.categorical[2], script(t));
        }
        if let Some(o) = e.output.as_deref() {
            self.numeric[1].add(char_count(o) as f64);
            let r = if is_refusal(o) { "refusal" } else { "answer" };
            count(&mut self.categorical[1], r);
        }
        if let Some(t) = e.output_tokens {
            self.numeric[2].add(t.max(0) as f64);
        }
        if let Some(f) = e.finish_reason.as_deref() {
            count(&mut self.categorical[0], f);
        }
    }

    pub fn merge(&mut self, o: &Scalars) {
        for (a, b) in self.numeric.iter_mut().zip(&o.numeric) {
            a.merge(b);
        }
        for (a, b) in self.categorical.iter_mut().zip(&o.categorical) {
            for (k, n) in b {
                *a.entry(k.clone()).or_default() += n;
            }
        }
    }
}

fn normalized(c: &[f64]) -> Vec<f64> {
    let t: f64 = c.iter().sum();
    if t == 0.0 {
        return vec![0.0; c.len()];
    }
    c.iter().map(|v| v / t).collect()
}

/// Jensen–Shannon distance (base 2) between two count vectors.
pub fn js_distance(p: &[f64], q: &[f64]) -> f64 {
    let (p, q) = (normalized(p), normalized(q));
    let kl = |a: &[f64], m: &[f64]| -> f64 {
        a.iter()
            .zip(m)
            .filter(|(x, _)| **x > 0.0)
            .map(|(x, y)| x * (x / y).log2())
            .sum()
    };
    let m: Vec<f64> = p.iter().zip(&q).map(|(a, b)| (a + b) / 2.0).collect();
    (0.5 * kl(&p, &m) + 0.5 * kl(&q, &m)).max(0.0).sqrt()
}

/// Population stability index of `current` against `reference` (0.5-count smoothing).
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    let k = reference.len() as f64;
    let (tr, tc) = (
        reference.iter().sum::<f64>() + 0.5 * k,
        current.iter().sum::<f64>() + 0.5 * k,
    );
    reference
        .iter()
        .zip(current)
        .map(|(r, c)| {
            let (r, c) = ((r + 0.5) / tr, (c + 0.5) / tc);
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// Kolmogorov–Smirnov D on binned values.
pub fn ks(reference: &[f64], current: &[f64]) -> f64 {
    let (r, c) = (normalized(reference), normalized(current));
    let (mut fr, mut fc, mut d) = (0.0, 0.0, 0f64);
    for (a, b) in r.iter().zip(&c) {
        fr += a;
        fc += b;
        d = d.max((fr - fc).abs());
    }
    d
}

/// Wasserstein-1 distance on binned values, in doublings.
pub fn wasserstein(reference: &[f64], current: &[f64]) -> f64 {
    let (r, c) = (normalized(reference), normalized(current));
    let (mut fr, mut fc, mut w) = (0.0, 0.0, 0.0);
    for (a, b) in r.iter().zip(&c) {
        fr += a;
        fc += b;
        w += (fr - fc).abs();
    }
    w / PER_OCTAVE
}

/// Reference windows needed before a scalar is judged: a standard deviation from fewer
/// is too rough for a 3σ threshold (measured on the demo: with 3, one stationary series in
/// three crossed it within two hours).
pub const MIN_WINDOWS: usize = 12;

/// One scalar statistic's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarResult {
    pub field: &'static str,
    pub method: &'static str,
    pub statistic: f64,
    /// mean + sigma · sd of the reference windows' own statistics (NaN: too few).
    pub threshold: f64,
    pub drifted: bool,
    pub current_n: u64,
    pub reference_n: u64,
    /// The bins or categories whose share moved most, e.g. `refusal 2% → 31%`.
    pub explanation: String,
}

/// What a statistic compares: two count vectors over the same bins.
type Stat = fn(&[f64], &[f64]) -> f64;

/// Each method with the smallest change it reports whatever the reference's own variation
/// (a reference that never varies would otherwise flag one stray event).
const NUMERIC_METHODS: [(&str, Stat, f64); 2] =
    [("ks", ks, 0.1), ("wasserstein", wasserstein, 0.1)];
const CATEGORICAL_METHODS: [(&str, Stat, f64); 2] = [("js", js_distance, 0.1), ("psi", psi, 0.1)];

fn category_vectors(sets: &[&Categories]) -> (Vec<Box<str>>, Vec<Vec<f64>>) {
    let mut keys: Vec<Box<str>> = sets.iter().flat_map(|s| s.keys().cloned()).collect();
    keys.sort();
    keys.dedup();
    let vecs = sets
        .iter()
        .map(|s| {
            keys.iter()
                .map(|k| s.get(k).copied().unwrap_or(0) as f64)
                .collect()
        })
        .collect();
    (keys, vecs)
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

fn top_moves(labels: &[String], r: &[f64], c: &[f64], n: usize) -> String {
    let (r, c) = (normalized(r), normalized(c));
    let mut moves: Vec<(usize, f64)> = r
        .iter()
        .zip(&c)
        .enumerate()
        .map(|(i, (a, b))| (i, b - a))
        .collect();
    moves.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    moves
        .iter()
        .take(n)
        .filter(|(_, d)| d.abs() >= 0.005)
        .map(|(i, _)| {
            format!(
                "{} {:.0}% → {:.0}%",
                labels[*i],
                r[*i] * 100.0,
                c[*i] * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn bin_label(bin: usize) -> String {
    if bin == 0 {
        "0".into()
    } else {
        let (lo, hi) = (Binned::lower_edge(bin), Binned::lower_edge(bin + 1));
        format!("{:.0}–{:.0}", lo.ceil(), hi.ceil() - 1.0)
    }
}

/// Compares `current` with the reference windows. Fields with fewer than `min_events` in
/// the current window, or fewer than [`MIN_WINDOWS`] usable reference windows, get no threshold.
pub fn scalar_drift(
    current: &Scalars,
    reference: &[&Scalars],
    sigma: f64,
    min_events: u64,
) -> Vec<ScalarResult> {
    let mut total = Scalars::default();
    for r in reference {
        total.merge(r);
    }
    let mut out = Vec::new();
    for (f, name) in NUMERIC.iter().enumerate() {
        let cur = current.numeric[f].counts();
        let refc = total.numeric[f].counts();
        let loo: Vec<(Vec<f64>, Vec<f64>)> = reference
            .iter()
            .filter(|w| w.numeric[f].total() >= min_events)
            .map(|w| {
                let mut rest = total.numeric[f].clone();
                rest.subtract(&w.numeric[f]);
                (rest.counts(), w.numeric[f].counts())
            })
            .collect();
        let labels: Vec<String> = (0..BINS).map(bin_label).collect();
        for (method, stat, floor) in NUMERIC_METHODS {
            out.push(judge(
                name,
                method,
                (stat, floor),
                &refc,
                &cur,
                &loo,
                sigma,
                min_events,
                &labels,
            ));
        }
    }
    for (f, name) in CATEGORICAL.iter().enumerate() {
        let mut sets: Vec<&Categories> = vec![&current.categorical[f], &total.categorical[f]];
        sets.extend(reference.iter().map(|w| &w.categorical[f]));
        let (keys, vecs) = category_vectors(&sets);
        let labels: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let loo: Vec<(Vec<f64>, Vec<f64>)> = vecs[2..]
            .iter()
            .filter(|w| w.iter().sum::<f64>() >= min_events as f64)
            .map(|w| {
                let rest = vecs[1].iter().zip(w).map(|(a, b)| a - b).collect();
                (rest, w.clone())
            })
            .collect();
        for (method, stat, floor) in CATEGORICAL_METHODS {
            out.push(judge(
                name,
                method,
                (stat, floor),
                &vecs[1],
                &vecs[0],
                &loo,
                sigma,
                min_events,
                &labels,
            ));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn judge(
    field: &'static str,
    method: &'static str,
    (stat, floor): (Stat, f64),
    reference: &[f64],
    current: &[f64],
    loo: &[(Vec<f64>, Vec<f64>)],
    sigma: f64,
    min_events: u64,
    labels: &[String],
) -> ScalarResult {
    let current_n = current.iter().sum::<f64>() as u64;
    let reference_n = reference.iter().sum::<f64>() as u64;
    let statistic = if current_n > 0 && reference_n > 0 {
        stat(reference, current)
    } else {
        f64::NAN
    };
    let threshold = if loo.len() >= MIN_WINDOWS && current_n >= min_events {
        let own: Vec<f64> = loo.iter().map(|(r, w)| stat(r, w)).collect();
        let (m, sd) = mean_sd(&own);
        (m + sigma * sd).max(floor)
    } else {
        f64::NAN
    };
    let drifted = statistic > threshold;
    ScalarResult {
        field,
        method,
        statistic,
        threshold,
        drifted,
        current_n,
        reference_n,
        explanation: if current_n > 0 && reference_n > 0 {
            top_moves(labels, reference, current, 3)
        } else {
            String::new()
        },
    }
}
