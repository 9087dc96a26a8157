//! Failure signals → candidates: which committed events failed, why, with their texts.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, TimestampMillisecondType};
use xxhash_rust::xxh3::xxh3_64;

use super::{HarvestConfig, HarvestError, Reason};
use crate::event::LlmEvent;
use crate::metrics::rebuild::{events_between, read_parquet, table_files};
use crate::window::{DIMENSION_FIELDS, Dimension};

const HOUR_MS: i64 = 3_600_000;

/// A score row of a candidate, as the `scores` table has it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreNote {
    pub name: String,
    pub scorer_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// One failing production event, not yet redacted or deduplicated.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    pub event_id: String,
    pub timestamp_ms: i64,
    pub app: Option<String>,
    pub environment: Option<String>,
    pub model: Option<String>,
    pub prompt_id: Option<String>,
    pub prompt_version: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    pub system: Option<String>,
    pub expected: Option<String>,
    pub error_type: Option<String>,
    pub feedback: Option<f64>,
    pub reasons: BTreeSet<Reason>,
    pub scores: Vec<ScoreNote>,
    /// Rules of the alerts it was harvested under.
    pub alerts: BTreeSet<String>,
}

impl Candidate {
    fn of(e: &LlmEvent<'_>, max_chars: usize) -> Candidate {
        let s = |v: &Option<std::borrow::Cow<'_, str>>| v.as_deref().map(str::to_owned);
        let t = |v: &Option<std::borrow::Cow<'_, str>>| v.as_deref().map(|x| clip(x, max_chars));
        Candidate {
            event_id: e.event_id.to_string(),
            timestamp_ms: e.timestamp_ms,
            app: s(&e.app),
            environment: s(&e.environment),
            model: s(&e.model),
            prompt_id: s(&e.prompt_id),
            prompt_version: s(&e.prompt_version),
            input: t(&e.input).or_else(|| t(&e.input_messages)),
            output: t(&e.output),
            system: t(&e.system),
            expected: t(&e.expected),
            error_type: s(&e.error_type),
            feedback: e.feedback,
            ..Default::default()
        }
    }

    /// The lowest score value, for ranking representatives (lower: a clearer failure).
    pub fn min_score(&self) -> Option<f64> {
        self.scores
            .iter()
            .filter_map(|s| s.value)
            .min_by(|a, b| a.total_cmp(b))
    }
}

/// At most `max` characters of `s`, cut at a character boundary.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// What failed in `[from_ms, to_ms)`, in event-time order (then by id: deterministic).
pub fn collect(
    root: &Path,
    hc: &HarvestConfig,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<Candidate>, HarvestError> {
    // Reasons per event id, from the tables other than `events`.
    let mut reasons: HashMap<String, BTreeSet<Reason>> = HashMap::new();
    let mut notes: HashMap<String, Vec<ScoreNote>> = HashMap::new();
    for b in batches(root, "scores", from_ms, to_ms, None)? {
        score_rows(&b, hc, from_ms, to_ms, &mut reasons, &mut notes);
    }
    if hc.wants(Reason::DriftOutlier) {
        for b in batches(root, "drift", from_ms, to_ms, None)? {
            let mut ids = Vec::new();
            crate::quality::deferred::outlier_ids(&b, &mut ids, &mut 0);
            for id in ids {
                reasons.entry(id).or_default().insert(Reason::DriftOutlier);
            }
        }
    }
    let alerts = if hc.wants(Reason::Alert) {
        firing_intervals(root, from_ms, to_ms)?
    } else {
        Vec::new()
    };

    // Pass 1, cheap columns: errors, feedback (also late, naming another event), alerts.
    let mut cols: Vec<&str> = vec![
        "event_id",
        "timestamp",
        "status",
        "feedback",
        "feedback_for",
        "source_offset",
    ];
    cols.extend(DIMENSION_FIELDS);
    let mut late: HashSet<String> = HashSet::new();
    // Per alert: the `alert_events` lowest event-id hashes.
    let mut picked: Vec<Vec<(u64, String)>> = vec![Vec::new(); alerts.len()];
    events_between(root, from_ms, to_ms, &cols, |e| {
        let negative = e
            .feedback
            .is_some_and(|f| f <= hc.negative_feedback_at_most)
            && hc.wants(Reason::NegativeFeedback);
        match &e.feedback_for {
            Some(target) if negative => {
                reasons
                    .entry(target.to_string())
                    .or_default()
                    .insert(Reason::NegativeFeedback);
                late.insert(target.to_string());
            }
            Some(_) => {}
            None => {
                if negative {
                    add(&mut reasons, e, Reason::NegativeFeedback);
                }
                if e.status == "error" && hc.wants(Reason::Error) {
                    add(&mut reasons, e, Reason::Error);
                }
                for (i, a) in alerts.iter().enumerate() {
                    if a.covers(e) {
                        keep_lowest(
                            &mut picked[i],
                            xxh3_64(e.event_id.as_bytes()),
                            &e.event_id,
                            hc.alert_events,
                        );
                    }
                }
            }
        }
    })?;
    let mut under_alert: HashMap<String, BTreeSet<String>> = HashMap::new();
    for (a, ids) in alerts.iter().zip(picked) {
        for (_, id) in ids {
            reasons.entry(id.clone()).or_default().insert(Reason::Alert);
            under_alert.entry(id).or_default().insert(a.rule.clone());
        }
    }

    // Pass 2, with the texts, of the events that failed; late feedback may name events from
    // before the lookback.
    let mut text_cols = cols.clone();
    text_cols.extend([
        "input",
        "input_messages",
        "output",
        "system",
        "expected",
        "error_type",
    ]);
    let mut found: HashMap<String, Candidate> = HashMap::new();
    let mut take = |e: &LlmEvent<'_>, found: &mut HashMap<String, Candidate>| {
        if e.feedback_for.is_some() || found.contains_key(&*e.event_id) {
            return;
        }
        if let Some(r) = reasons.get(&*e.event_id) {
            let mut c = Candidate::of(e, hc.max_text_chars);
            c.reasons = r.clone();
            c.scores = notes.remove(&*e.event_id).unwrap_or_default();
            c.alerts = under_alert.remove(&*e.event_id).unwrap_or_default();
            found.insert(c.event_id.clone(), c);
        }
    };
    events_between(root, from_ms, to_ms, &text_cols, |e| take(e, &mut found))?;
    // Late feedback naming an event the lookback does not hold: look further back for it.
    if late.iter().any(|id| !found.contains_key(id)) {
        let back = hc.feedback_lookback.as_millis() as i64;
        events_between(root, from_ms - back, from_ms, &text_cols, |e| {
            take(e, &mut found)
        })?;
    }
    let mut out: Vec<Candidate> = found.into_values().collect();
    out.sort_by(|a, b| (a.timestamp_ms, &a.event_id).cmp(&(b.timestamp_ms, &b.event_id)));
    Ok(out)
}

fn add(reasons: &mut HashMap<String, BTreeSet<Reason>>, e: &LlmEvent<'_>, r: Reason) {
    reasons.entry(e.event_id.to_string()).or_default().insert(r);
}

fn keep_lowest(v: &mut Vec<(u64, String)>, h: u64, id: &str, k: usize) {
    if v.len() >= k && v.last().is_none_or(|(top, _)| h >= *top) {
        return;
    }
    if v.iter().any(|(x, i)| *x == h && i == id) {
        return;
    }
    let at = v.partition_point(|(x, _)| *x < h);
    v.insert(at, (h, id.to_owned()));
    v.truncate(k);
}

/// Every batch of `table`'s files in hours overlapping `[from_ms, to_ms)`.
pub(crate) fn batches(
    root: &Path,
    table: &str,
    from_ms: i64,
    to_ms: i64,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, HarvestError> {
    let mut out = Vec::new();
    for f in table_files(root, table, from_ms, to_ms)? {
        out.extend(read_parquet(&f, columns)?);
    }
    Ok(out)
}

fn str_col<'b>(b: &'b RecordBatch, name: &str) -> Option<&'b arrow::array::StringArray> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
}

fn ts_col<'b>(
    b: &'b RecordBatch,
    name: &str,
) -> Option<&'b arrow::array::PrimitiveArray<TimestampMillisecondType>> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
}

fn opt_str(c: Option<&arrow::array::StringArray>, i: usize) -> Option<String> {
    c.and_then(|c| (!c.is_null(i)).then(|| c.value(i).to_owned()))
}

pub(super) fn score_rows(
    b: &RecordBatch,
    hc: &HarvestConfig,
    from_ms: i64,
    to_ms: i64,
    reasons: &mut HashMap<String, BTreeSet<Reason>>,
    notes: &mut HashMap<String, Vec<ScoreNote>>,
) {
    let (Some(id), Some(ts), Some(name)) = (
        str_col(b, "event_id"),
        ts_col(b, "timestamp"),
        str_col(b, "evaluation_name"),
    ) else {
        return;
    };
    let value = b
        .column_by_name("score_value")
        .and_then(|c| c.as_primitive_opt::<Float64Type>());
    let passed = b.column_by_name("passed").and_then(|c| c.as_boolean_opt());
    let (label, expl, kind, cat) = (
        str_col(b, "score_label"),
        str_col(b, "explanation"),
        str_col(b, "scorer_type"),
        str_col(b, "category"),
    );
    for i in 0..b.num_rows() {
        if !(from_ms..to_ms).contains(&ts.value(i)) || id.is_null(i) {
            continue;
        }
        let note = ScoreNote {
            name: name.value(i).to_owned(),
            scorer_type: opt_str(kind, i).unwrap_or_default(),
            category: opt_str(cat, i),
            value: value.and_then(|v| (!v.is_null(i)).then(|| v.value(i))),
            label: opt_str(label, i),
            passed: passed.and_then(|p| (!p.is_null(i)).then(|| p.value(i))),
            explanation: opt_str(expl, i),
        };
        let mut r = Vec::new();
        if note.passed == Some(false) {
            r.push(
                match (note.category.as_deref(), note.scorer_type.as_str()) {
                    (Some("pii" | "unsafe"), _) => Reason::Guardrail,
                    (_, "llm_judge") => Reason::JudgeFail,
                    _ => Reason::ScorerFail,
                },
            );
        }
        if let (Some(t), Some(v)) = (hc.score_below.get(&note.name), note.value)
            && v < *t
        {
            r.push(Reason::LowScore);
        }
        let eid = id.value(i).to_owned();
        for x in r.into_iter().filter(|x| hc.wants(*x)) {
            reasons.entry(eid.clone()).or_default().insert(x);
        }
        let v = notes.entry(eid).or_default();
        if !v.iter().any(|n| n.name == note.name) {
            v.push(note);
        }
    }
}

/// One alert's firing time on one series.
#[derive(Debug, Clone)]
struct Firing {
    rule: String,
    /// Dimension labels the series' events must carry.
    series: Vec<(Dimension, String)>,
    /// An experiment alert's `arm`: the events of that arm only (its `variant` or
    /// `prompt_version`, whichever the experiment splits by).
    arm: Option<String>,
    from_ms: i64,
    to_ms: i64,
}

impl Firing {
    fn covers(&self, e: &LlmEvent<'_>) -> bool {
        (self.from_ms..self.to_ms).contains(&e.timestamp_ms)
            && self
                .series
                .iter()
                .all(|(d, v)| d.value(e).is_some_and(|x| x == v.as_str()))
            && self.arm.as_deref().is_none_or(|a| {
                e.variant.as_deref() == Some(a) || e.prompt_version.as_deref() == Some(a)
            })
    }
}

/// How far before the alert turned pending its series' events count as "under" it (the
/// windows that raised it).
const ALERT_LEAD_MS: i64 = 5 * 60_000;

/// Pending/firing → resolved intervals of alerts, from the `alerts` table's transitions.
fn firing_intervals(root: &Path, from_ms: i64, to_ms: i64) -> Result<Vec<Firing>, HarvestError> {
    // Transitions before the lookback can open an interval that reaches into it.
    type Row = (
        String,
        i64,
        String,
        String,
        Vec<(Dimension, String)>,
        Option<String>,
    );
    let mut rows: Vec<Row> = Vec::new();
    for b in batches(root, "alerts", from_ms - 7 * 24 * HOUR_MS, to_ms, None)? {
        // Event time: the end of the window judged (a backfill's alerts are judged long
        // after their windows; `time` is when).
        let window_end = ts_col(&b, "window_end");
        let (Some(kind), Some(time), Some(rule), Some(fp), Some(status)) = (
            str_col(&b, "kind"),
            ts_col(&b, "time"),
            str_col(&b, "rule"),
            str_col(&b, "fingerprint"),
            str_col(&b, "status"),
        ) else {
            continue;
        };
        let labels = b.column_by_name("labels").and_then(|c| c.as_map_opt());
        for i in 0..b.num_rows() {
            if kind.value(i) != "transition" {
                continue;
            }
            let mut series = Vec::new();
            let mut arm = None;
            if let Some(m) = labels
                && !m.is_null(i)
            {
                let entry = m.value(i);
                if let (Some(k), Some(v)) = (
                    entry.column(0).as_string_opt::<i32>(),
                    entry.column(1).as_string_opt::<i32>(),
                ) {
                    for j in 0..k.len() {
                        if k.value(j) == "arm" && !v.is_null(j) {
                            arm = Some(v.value(j).to_owned());
                        }
                        if !DIMENSION_FIELDS.contains(&k.value(j)) || v.is_null(j) {
                            continue;
                        }
                        if let Ok(d) = Dimension::parse(k.value(j)) {
                            series.push((d, v.value(j).to_owned()));
                        }
                    }
                }
            }
            rows.push((
                fp.value(i).to_owned(),
                match window_end {
                    Some(w) if !w.is_null(i) => w.value(i),
                    _ => time.value(i),
                },
                status.value(i).to_owned(),
                rule.value(i).to_owned(),
                series,
                arm,
            ));
        }
    }
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut out = Vec::new();
    let mut open: Option<Firing> = None;
    let mut fired = false;
    let mut last_fp = String::new();
    let close = |f: Option<Firing>, fired: bool, out: &mut Vec<Firing>| {
        if let Some(f) = f
            && fired
            && f.to_ms > from_ms
            && f.from_ms < to_ms
        {
            out.push(f);
        }
    };
    for (fp, t, status, rule, series, arm) in rows {
        if fp != last_fp {
            close(open.take(), fired, &mut out);
            fired = false;
            last_fp = fp;
        }
        match status.as_str() {
            "pending" | "firing" => {
                if open.is_none() {
                    open = Some(Firing {
                        rule,
                        series,
                        arm,
                        from_ms: t - ALERT_LEAD_MS,
                        to_ms,
                    });
                }
                fired |= status == "firing";
            }
            _ => {
                if let Some(mut f) = open.take() {
                    f.to_ms = t;
                    close(Some(f), fired, &mut out);
                }
                fired = false;
            }
        }
    }
    close(open, fired, &mut out);
    Ok(out)
}
