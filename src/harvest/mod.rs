//! harvest: failing production cases → versioned, deduplicated, redacted eval datasets.
//!
//! A harvest run reads what the pipeline already committed — `scores` (scorer and judge
//! verdicts), `events` (errors, user feedback, including feedback records that arrive later
//! and name an `event_id`), `drift` (the examples its explanations name) and `alerts` (events
//! of a series while an alert fired) — over a lookback window, turns every failing event into a
//! candidate with its reasons, redacts it, folds it into the dataset (exact: the normalized
//! input's hash; near: cosine similarity of the input's embedding against every example's
//! anchor) and writes a new immutable version of the dataset ([`dataset`]) plus one row per
//! harvested event in the `harvest` table. `telltale harvest export` turns a version into
//! promptfoo, OpenAI-evals or Langfuse files ([`export`]).
//!
//! Runs are idempotent: an event already harvested for a reason (the `harvest` rows of the
//! dataset's committed versions) is not harvested again, so overlapping lookbacks, reruns and
//! a run killed half-way (its version directory is renamed into place last; rows of a version
//! that never landed are deleted on the next open) neither lose nor double-count a case.

pub mod collect;
pub mod dataset;
pub mod export;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::drift::EmbedderKind;
use crate::quality::pii::PiiKind;

/// Why a production event became an eval case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An LLM judge said fail.
    JudgeFail,
    /// A score under the threshold configured for its evaluation (`score_below`).
    LowScore,
    /// An objective, command or HTTP scorer said fail.
    ScorerFail,
    /// A user's feedback at or under `negative_feedback_at_most` (on the event, or in a
    /// feedback record naming it).
    NegativeFeedback,
    /// The call failed (`status = "error"`).
    Error,
    /// A guardrail scorer failed: PII in the output, unsafe content.
    Guardrail,
    /// Named as an example by a drifted window's explanation.
    DriftOutlier,
    /// In a series while an alert on it was firing.
    Alert,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::JudgeFail,
        Reason::LowScore,
        Reason::ScorerFail,
        Reason::NegativeFeedback,
        Reason::Error,
        Reason::Guardrail,
        Reason::DriftOutlier,
        Reason::Alert,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::JudgeFail => "judge_fail",
            Reason::LowScore => "low_score",
            Reason::ScorerFail => "scorer_fail",
            Reason::NegativeFeedback => "negative_feedback",
            Reason::Error => "error",
            Reason::Guardrail => "guardrail",
            Reason::DriftOutlier => "drift_outlier",
            Reason::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.name() == s)
    }

    pub fn names() -> String {
        Reason::ALL.map(Reason::name).join(", ")
    }
}

/// `[harvest]` in the pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct HarvestConfig {
    /// Run inside `telltale run` every `interval` (and once at the end of a file run).
    pub enabled: bool,
    pub interval: Duration,
    /// Where datasets live (`<dir>/<dataset>/v0001/…`); default `<data_root>/datasets`.
    pub dir: Option<PathBuf>,
    pub dataset: String,
    /// How far back (by event time) a run looks for failures.
    pub lookback: Duration,
    /// How far back a late feedback record may reach for the event it names.
    pub feedback_lookback: Duration,
    pub reasons: Vec<Reason>,
    /// Feedback at or under this counts as negative (thumbs down = 0).
    pub negative_feedback_at_most: f64,
    /// `evaluation_name` → a score under this is a failure (`low_score`).
    pub score_below: BTreeMap<String, f64>,
    /// Cosine similarity at or above which a case folds into an example; above 1: exact only.
    pub near_duplicate: f32,
    /// Embeds inputs for near-duplicate search. Default `chargram` (lexical: the same prompt
    /// retyped with small edits; fast and deterministic); `fastembed` also folds paraphrases.
    pub embedder: EmbedderKind,
    /// Replace PII in every harvested text with placeholders (`<EMAIL_1>`).
    pub redact: bool,
    pub redact_kinds: Vec<PiiKind>,
    /// Events taken per firing alert (the lowest event-id hashes: deterministic).
    pub alert_events: usize,
    /// Provenance ids kept per example (the count keeps counting past it).
    pub max_event_ids: usize,
    /// Characters kept per harvested text.
    pub max_text_chars: usize,
    /// Also publish new and changed examples to this Kafka topic (the source's brokers).
    pub kafka_topic: Option<String>,
}

impl Default for HarvestConfig {
    fn default() -> Self {
        HarvestConfig {
            enabled: true,
            interval: Duration::from_secs(3600),
            dir: None,
            dataset: "production-failures".to_owned(),
            lookback: Duration::from_secs(24 * 3600),
            feedback_lookback: Duration::from_secs(7 * 24 * 3600),
            reasons: Reason::ALL.to_vec(),
            negative_feedback_at_most: 0.0,
            score_below: BTreeMap::new(),
            near_duplicate: 0.88,
            embedder: EmbedderKind::CharGram { dim: 1024 },
            redact: true,
            redact_kinds: PiiKind::ALL.to_vec(),
            alert_events: 20,
            max_event_ids: 20,
            max_text_chars: 20_000,
            kafka_topic: None,
        }
    }
}

impl HarvestConfig {
    pub fn datasets_dir(&self, data_root: &std::path::Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| data_root.join("datasets"))
    }

    pub fn wants(&self, r: Reason) -> bool {
        self.reasons.contains(&r)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error("{path}: {message}")]
    Dataset { path: String, message: String },
    #[error(transparent)]
    Embed(#[from] crate::drift::embed::EmbedError),
    #[error("kafka: {0}")]
    Kafka(String),
}

pub(crate) fn dataset_err(path: &std::path::Path, message: impl std::fmt::Display) -> HarvestError {
    HarvestError::Dataset {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub dataset: String,
    /// The version written, `None` when nothing new was found.
    pub version: Option<String>,
    pub dir: PathBuf,
    pub candidates: usize,
    pub already_harvested: usize,
    pub new_examples: usize,
    pub folded_exact: usize,
    pub folded_near: usize,
    pub reasons_added: usize,
    pub examples: usize,
    pub by_reason: BTreeMap<String, usize>,
    /// Candidates without an input text (nothing to replay).
    pub skipped_no_input: usize,
    pub published: usize,
}

/// One harvest run over `[now - lookback, now)` of the pipeline's tables.
pub fn run(cfg: &crate::config::PipelineConfig, now_ms: i64) -> Result<RunReport, HarvestError> {
    let hc = &cfg.harvest;
    let embedder = hc.embedder.try_build()?;
    let root = &cfg.data_root;
    let dir = hc.datasets_dir(root);
    let mut ds = dataset::Dataset::open(root, &dir, &hc.dataset)?;
    let to = now_ms + 1;
    let from = to - hc.lookback.as_millis() as i64;
    let collected = collect::collect(root, hc, from, to)?;
    let mut report = ds.absorb(collected, embedder.as_ref(), hc)?;
    if report.version.is_some() {
        ds.commit(root, hc, embedder.id(), (from, to), now_ms, &mut report)?;
    }
    if let Some(topic) = &hc.kafka_topic {
        report.published = dataset::publish(&ds, cfg, topic)?;
    }
    report.examples = ds.examples().len();
    report.dir = ds.dir().to_owned();
    Ok(report)
}

/// `[harvest]`.
pub(crate) fn read_harvest(
    root: &mut crate::config::reader::Obj,
    e: &mut crate::config::reader::Errors,
) -> HarvestConfig {
    let d = HarvestConfig::default();
    let Some(mut t) = root.table(e, "harvest") else {
        return d;
    };
    let mut cfg = d.clone();
    cfg.enabled = t.boolean(e, "enabled").unwrap_or(d.enabled);
    cfg.interval = t.duration(e, "interval", d.interval);
    if cfg.interval.is_zero() {
        e.push(
            &t.path_of("interval"),
            "must be greater than 0 (set enabled = false to stop harvesting)",
        );
    }
    cfg.dir = t.string(e, "dir").map(PathBuf::from);
    cfg.dataset = t.string_or(e, "dataset", &d.dataset);
    if cfg.dataset.is_empty()
        || !cfg
            .dataset
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || cfg.dataset.starts_with('.')
    {
        e.push(
            &t.path_of("dataset"),
            format!(
                "{:?} is not a dataset name (letters, digits, '-', '_', '.'; it names a directory)",
                cfg.dataset
            ),
        );
    }
    cfg.lookback = t.duration(e, "lookback", d.lookback);
    cfg.feedback_lookback = t.duration(e, "feedback_lookback", d.feedback_lookback);
    if let Some(list) = t.string_list(e, "reasons") {
        cfg.reasons.clear();
        for (i, r) in list.iter().enumerate() {
            match Reason::parse(r) {
                Some(r) => cfg.reasons.push(r),
                None => e.push(
                    &format!("{}[{i}]", t.path_of("reasons")),
                    format!(
                        "{r:?} is not a harvest reason (one of: {})",
                        Reason::names()
                    ),
                ),
            }
        }
    }
    cfg.negative_feedback_at_most = t
        .float(e, "negative_feedback_at_most", f64::MIN, f64::MAX)
        .unwrap_or(d.negative_feedback_at_most);
    let path = t.path_of("score_below");
    for (k, v) in t.string_map(e, "score_below") {
        match v.parse::<f64>() {
            Ok(x) if x.is_finite() => {
                cfg.score_below.insert(k, x);
            }
            _ => e.push(
                &format!("{path}.{k}"),
                format!("expected a number, got {v:?}"),
            ),
        }
    }
    cfg.near_duplicate = t
        .float(e, "near_duplicate", 0.0, 2.0)
        .map_or(d.near_duplicate, |x| x as f32);
    match t.string(e, "embedder").as_deref() {
        None => {}
        Some("auto") => cfg.embedder = EmbedderKind::auto(),
        Some("chargram") => cfg.embedder = EmbedderKind::CharGram { dim: 1024 },
        Some("hash") => cfg.embedder = EmbedderKind::Hash { dim: 256 },
        Some("fastembed") => {
            cfg.embedder = crate::config::sentence_embedder(
                e,
                &t.path_of("embedder"),
                "or use \"hash\"",
            )
        }
        Some(other) => e.push(
            &t.path_of("embedder"),
            format!("{other:?} is not an embedder (expected \"chargram\", \"hash\", \"fastembed\" or \"auto\")"),
        ),
    }
    cfg.redact = t.boolean(e, "redact").unwrap_or(d.redact);
    if let Some(list) = t.string_list(e, "redact_kinds") {
        cfg.redact_kinds.clear();
        for (i, k) in list.iter().enumerate() {
            match PiiKind::parse(k) {
                Some(k) => cfg.redact_kinds.push(k),
                None => e.push(
                    &format!("{}[{i}]", t.path_of("redact_kinds")),
                    format!(
                        "{k:?} is not a PII kind (one of: {})",
                        PiiKind::ALL.map(PiiKind::name).join(", ")
                    ),
                ),
            }
        }
    }
    let count = |t: &mut crate::config::reader::Obj, e: &mut _, key, default: usize| {
        t.integer(e, key, 1, 1_000_000)
            .map_or(default, |v| v as usize)
    };
    cfg.alert_events = count(&mut t, e, "alert_events", d.alert_events);
    cfg.max_event_ids = count(&mut t, e, "max_event_ids", d.max_event_ids);
    cfg.max_text_chars = count(&mut t, e, "max_text_chars", d.max_text_chars);
    cfg.kafka_topic = t.string(e, "kafka_topic").filter(|s| !s.is_empty());
    t.finish(e);
    cfg
}

/// `telltale harvest stats`: the latest version's counts, then the harvested events by reason
/// and series (events since `since_ms`), with how many folded into existing examples.
pub fn stats(
    data_root: &std::path::Path,
    hc: &HarvestConfig,
    since_ms: Option<i64>,
) -> Result<String, HarvestError> {
    use arrow::array::{Array, AsArray};
    use std::fmt::Write as _;
    let dir = hc.datasets_dir(data_root).join(&hc.dataset);
    let latest = dataset::versions(&dir).last().copied().unwrap_or(0);
    let mut s = String::new();
    if latest == 0 {
        let _ = writeln!(
            s,
            "dataset {}: no versions yet in {} (run `telltale harvest run --pipeline …`)",
            hc.dataset,
            dir.display()
        );
        return Ok(s);
    }
    let vname = dataset::version_name(latest);
    let vdir = dir.join(&vname);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(vdir.join("manifest.json")).map_err(|e| dataset_err(&vdir, e))?,
    )
    .map_err(|e| dataset_err(&vdir, e))?;
    let c = &m["counts"];
    let _ = writeln!(
        s,
        "dataset {} {vname} ({}): {} examples standing for {} production events; created {}; {}",
        hc.dataset,
        vdir.display(),
        c["examples"],
        c["events"],
        m["created_at"].as_str().unwrap_or("?"),
        m["content_hash"].as_str().unwrap_or("")
    );
    // (reason, app, environment, prompt_version) → [events, new, exact, near, reason-only]
    let mut agg: std::collections::BTreeMap<[String; 4], [u64; 5]> = Default::default();
    let from = since_ms.unwrap_or(i64::MIN);
    for b in collect::batches(data_root, "harvest", from.max(0), i64::MAX, None)? {
        let col = |n: &str| b.column_by_name(n).and_then(|c| c.as_string_opt::<i32>());
        let (Some(ds), Some(ver), Some(reasons), Some(fold)) =
            (col("dataset"), col("version"), col("reasons"), col("fold"))
        else {
            continue;
        };
        let ts = b
            .column_by_name("timestamp")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>());
        let dims = [col("app"), col("environment"), col("prompt_version")];
        for i in 0..b.num_rows() {
            if ds.value(i) != hc.dataset || ver.value(i) > vname.as_str() {
                continue;
            }
            if ts.is_some_and(|t| t.value(i) < from) {
                continue;
            }
            let d = |k: usize| {
                dims[k]
                    .filter(|c| !c.is_null(i))
                    .map_or("-".to_owned(), |c| c.value(i).to_owned())
            };
            let slot = match fold.value(i) {
                "new" => 1,
                "exact" => 2,
                "near" => 3,
                _ => 4,
            };
            for r in reasons.value(i).split(',') {
                let e = agg.entry([r.to_owned(), d(0), d(1), d(2)]).or_default();
                e[0] += 1;
                e[slot] += 1;
            }
        }
    }
    let header = ["reason", "app", "environment", "prompt_version"];
    let nums = [
        "events",
        "new",
        "folded_exact",
        "folded_near",
        "reason_added",
    ];
    let mut rows: Vec<Vec<String>> =
        vec![header.iter().chain(&nums).map(|x| x.to_string()).collect()];
    for (k, v) in &agg {
        rows.push(
            k.iter()
                .cloned()
                .chain(v.iter().map(u64::to_string))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
        .collect();
    let _ = writeln!(
        s,
        "\nharvested events by reason and series{}:",
        since_ms.map_or(String::new(), |_| " (in the --since window)".into())
    );
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(j, (x, w))| {
                if j < 4 {
                    format!("{x:<w$}")
                } else {
                    format!("{x:>w$}")
                }
            })
            .collect();
        let _ = writeln!(s, "  {}", line.join("  ").trim_end());
    }
    let total: [u64; 5] = agg.values().fold([0; 5], |mut a, v| {
        for j in 0..5 {
            a[j] += v[j];
        }
        a
    });
    let _ = writeln!(
        s,
        "\nfolding (counted once per reason): {} of {} harvested events folded into an existing example ({} exact, {} near-duplicate); {} became new examples",
        total[2] + total[3],
        total[0] - total[4],
        total[2],
        total[3],
        total[1]
    );
    Ok(s)
}

/// One line (two when it wrote a version) saying what a run did.
pub fn describe(r: &RunReport) -> String {
    let reasons: Vec<String> = r
        .by_reason
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let mut s = format!(
        "harvest {}: {} failing events found ({}), {} harvested before, {} without input; {} new examples, {} folded as exact and {} as near duplicates, {} gained a reason",
        r.dataset,
        r.candidates,
        if reasons.is_empty() {
            "none".into()
        } else {
            reasons.join(", ")
        },
        r.already_harvested,
        r.skipped_no_input,
        r.new_examples,
        r.folded_exact,
        r.folded_near,
        r.reasons_added,
    );
    match &r.version {
        Some(v) => s.push_str(&format!(
            "\nwrote {} {v}: {} examples in {}",
            r.dataset,
            r.examples,
            r.dir.join(v).display()
        )),
        None => s.push_str(&format!(
            "; no new version ({} examples in {})",
            r.examples,
            r.dir.display()
        )),
    }
    if r.published > 0 {
        s.push_str(&format!("; {} examples published to Kafka", r.published));
    }
    s
}

/// Harvests every `interval` on a thread of its own while a pipeline runs (failures never
/// block ingestion: a failed run is logged and retried at the next interval).
pub struct Periodic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Periodic {
    pub fn start(
        cfg: crate::config::PipelineConfig,
        stats: std::sync::Arc<crate::telemetry::Stats>,
    ) -> Periodic {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("harvest".into())
            .spawn(move || {
                loop {
                    let due = std::time::Instant::now() + cfg.harvest.interval;
                    while std::time::Instant::now() < due {
                        if flag.load(Ordering::SeqCst) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    once(&cfg, &stats);
                }
            })
            .expect("a thread can be spawned");
        Periodic {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One run now, logged and counted.
pub fn once(cfg: &crate::config::PipelineConfig, stats: &crate::telemetry::Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    match run(cfg, chrono::Utc::now().timestamp_millis()) {
        Ok(r) => {
            stats.harvest_runs_ok.fetch_add(1, Relaxed);
            let events = r.new_examples + r.folded_exact + r.folded_near + r.reasons_added;
            stats.harvest_events.fetch_add(events as u64, Relaxed);
            stats.harvest_examples.store(r.examples as u64, Relaxed);
            tracing::info!("{}", describe(&r))
        }
        Err(err) => {
            stats.harvest_runs_failed.fetch_add(1, Relaxed);
            tracing::error!(error = %err, "harvest failed; retrying at the next interval")
        }
    }
}
