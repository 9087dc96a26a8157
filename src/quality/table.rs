//! The `scores` table (one row per event and scorer, named after OpenTelemetry's
//! `gen_ai.evaluation.result` event) and the `quality` table (one row per series, window and
//! scorer: pass rate with its 95 % Wilson interval, mean score, the counts behind them).

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit};

use super::{QualityCounts, SampleReason, Scored, ScorerCounts, ScorerDef, wilson};
use crate::event::LlmEvent;
use crate::metrics::table::{WindowKeys, row_series_keys, window_key_fields};
use crate::window::{Dimension, SeriesKey};

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The event fields every score row repeats, for filtering without a join.
const SCORE_DIMS: [&str; 7] = [
    "app",
    "environment",
    "model",
    "prompt_id",
    "prompt_version",
    "variant",
    "experiment",
];

static SCORE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut f = vec![
        // OpenTelemetry's `gen_ai.response.id`: the scored event.
        Field::new("event_id", DataType::Utf8, false),
        Field::new("timestamp", ts_type(), false),
    ];
    for d in SCORE_DIMS {
        f.push(Field::new(d, DataType::Utf8, true));
    }
    f.extend([
        Field::new("evaluation_name", DataType::Utf8, false),
        Field::new("score_value", DataType::Float64, false),
        Field::new("score_label", DataType::Utf8, false),
        Field::new("passed", DataType::Boolean, false),
        Field::new("explanation", DataType::Utf8, true),
        Field::new("scorer_type", DataType::Utf8, false),
        Field::new("scorer_version", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("sample_reason", DataType::Utf8, false),
        Field::new("judge_model", DataType::Utf8, true),
        Field::new("judge_cost_usd", DataType::Float64, true),
        Field::new("latency_ms", DataType::Float64, true),
        Field::new("judge_input_tokens", DataType::Int64, true),
        Field::new("judge_output_tokens", DataType::Int64, true),
    ]);
    Arc::new(Schema::new(f))
});

pub fn score_schema() -> SchemaRef {
    SCORE_SCHEMA.clone()
}

/// Builds `scores` rows.
pub struct ScoreBatchBuilder {
    event_id: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    dims: [StringBuilder; 7],
    name: StringBuilder,
    value: Float64Builder,
    label: StringBuilder,
    passed: BooleanBuilder,
    explanation: StringBuilder,
    kind: StringBuilder,
    version: StringBuilder,
    category: StringBuilder,
    reason: StringBuilder,
    judge_model: StringBuilder,
    judge_cost: Float64Builder,
    latency: Float64Builder,
    /// Judge prompt and completion tokens.
    tokens: [Int64Builder; 2],
    len: usize,
}

/// What a model-based score cost.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct JudgeUsage {
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl Default for ScoreBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ScoreBatchBuilder {
    pub fn new() -> Self {
        ScoreBatchBuilder {
            event_id: StringBuilder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            dims: std::array::from_fn(|_| StringBuilder::new()),
            name: StringBuilder::new(),
            value: Float64Builder::new(),
            label: StringBuilder::new(),
            passed: BooleanBuilder::new(),
            explanation: StringBuilder::new(),
            kind: StringBuilder::new(),
            version: StringBuilder::new(),
            category: StringBuilder::new(),
            reason: StringBuilder::new(),
            judge_model: StringBuilder::new(),
            judge_cost: Float64Builder::new(),
            latency: Float64Builder::new(),
            tokens: std::array::from_fn(|_| Int64Builder::new()),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One row per verdict of an event.
    pub fn append(
        &mut self,
        e: &LlmEvent<'_>,
        reason: SampleReason,
        scored: &[Scored],
        scorers: &[ScorerDef],
    ) {
        for s in scored {
            self.push(e, reason, &scorers[s.scorer], &s.score, None, None);
        }
    }

    /// One row of a deferred scorer, with what its model call cost.
    pub fn append_deferred(
        &mut self,
        e: &LlmEvent<'_>,
        reason: SampleReason,
        def: &ScorerDef,
        score: &super::Score,
        judge_model: Option<&str>,
        judge: Option<JudgeUsage>,
    ) {
        self.push(e, reason, def, score, judge_model, judge);
    }

    fn push(
        &mut self,
        e: &LlmEvent<'_>,
        reason: SampleReason,
        def: &ScorerDef,
        score: &super::Score,
        judge_model: Option<&str>,
        judge: Option<JudgeUsage>,
    ) {
        let dims = [
            &e.app,
            &e.environment,
            &e.model,
            &e.prompt_id,
            &e.prompt_version,
            &e.variant,
            &e.experiment,
        ];
        self.event_id.append_value(&e.event_id);
        self.timestamp.append_value(e.timestamp_ms);
        for (b, v) in self.dims.iter_mut().zip(dims) {
            b.append_option(v.as_deref());
        }
        self.name.append_value(&def.name);
        self.value.append_value(score.value);
        self.label.append_value(score.label());
        self.passed.append_value(score.passed);
        self.explanation.append_option(score.explanation.as_deref());
        self.kind.append_value(def.kind);
        self.version.append_value(&def.version);
        self.category.append_value(def.category.name());
        self.reason.append_value(reason.name());
        self.judge_model.append_option(judge_model);
        self.judge_cost.append_option(judge.map(|j| j.cost_usd));
        self.latency.append_option(judge.map(|j| j.latency_ms));
        self.tokens[0].append_option(judge.map(|j| j.input_tokens as i64));
        self.tokens[1].append_option(judge.map(|j| j.output_tokens as i64));
        self.len += 1;
    }

    /// Takes the rows and leaves the builder empty.
    pub fn finish(&mut self) -> RecordBatch {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.timestamp.finish()),
        ];
        for d in &mut self.dims {
            cols.push(Arc::new(d.finish()));
        }
        cols.extend::<[ArrayRef; 14]>([
            Arc::new(self.name.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.label.finish()),
            Arc::new(self.passed.finish()),
            Arc::new(self.explanation.finish()),
            Arc::new(self.kind.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.category.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.judge_model.finish()),
            Arc::new(self.judge_cost.finish()),
            Arc::new(self.latency.finish()),
            Arc::new(self.tokens[0].finish()),
            Arc::new(self.tokens[1].finish()),
        ]);
        self.len = 0;
        RecordBatch::try_new(score_schema(), cols).expect("columns match the scores schema")
    }
}

/// The `quality` table's schema for a set of series dimensions.
pub fn quality_schema(dims: &[Dimension]) -> SchemaRef {
    let mut f = window_key_fields(dims);
    f.extend([
        Field::new("evaluation_name", DataType::Utf8, false),
        Field::new("scorer_version", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("sampled", DataType::Int64, false),
        Field::new("scored", DataType::Int64, false),
        Field::new("passed", DataType::Int64, false),
        Field::new("failed", DataType::Int64, false),
        Field::new("pass_rate", DataType::Float64, true),
        Field::new("pass_rate_low", DataType::Float64, true),
        Field::new("pass_rate_high", DataType::Float64, true),
        Field::new("mean_score", DataType::Float64, true),
        Field::new("score_sum", DataType::Float64, false),
    ]);
    Arc::new(Schema::new(f))
}

/// The relative path of one window's `quality` file of the deferred scorers.
pub fn deferred_quality_file(stream: &str, resolution: &str, start_ms: i64) -> PathBuf {
    quality_file(&format!("{stream}-deferred"), resolution, start_ms)
}

/// The relative path of one window's `quality` file.
pub fn quality_file(stream: &str, resolution: &str, start_ms: i64) -> PathBuf {
    PathBuf::from("quality")
        .join(crate::sink::hour_dir(start_ms.div_euclid(3_600_000)))
        .join(format!("quality-{stream}-{resolution}-{start_ms}.parquet"))
}

/// Builds `quality` rows.
pub struct QualityBatchBuilder {
    /// Rows of the deferred scorers only (the deferred stage's windows), else of the inline
    /// ones only.
    deferred: bool,
    schema: SchemaRef,
    keys: WindowKeys,
    name: StringBuilder,
    version: StringBuilder,
    category: StringBuilder,
    ints: [Int64Builder; 4],
    floats: [Float64Builder; 5],
    len: usize,
}

impl QualityBatchBuilder {
    /// Rows of the deferred scorers (judge, command, http).
    pub fn deferred(dims: &[Dimension]) -> Self {
        QualityBatchBuilder {
            deferred: true,
            ..Self::new(dims)
        }
    }

    pub fn new(dims: &[Dimension]) -> Self {
        QualityBatchBuilder {
            deferred: false,
            schema: quality_schema(dims),
            keys: WindowKeys::new(dims),
            name: StringBuilder::new(),
            version: StringBuilder::new(),
            category: StringBuilder::new(),
            ints: std::array::from_fn(|_| Int64Builder::new()),
            floats: std::array::from_fn(|_| Float64Builder::new()),
            len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One row per configured scorer for a series' window (scorers that scored nothing
    /// included: a rate with no data is null, not missing).
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        resolution: &str,
        start_ms: i64,
        end_ms: i64,
        stream: &str,
        key: &SeriesKey,
        counts: &QualityCounts,
        scorers: &[ScorerDef],
    ) {
        // The other stage's windows hold the other scorers.
        let rows = scorers
            .iter()
            .filter(|d| d.check.is_deferred() == self.deferred)
            .count();
        self.keys
            .append_n(resolution, start_ms, end_ms, stream, key, rows);
        for (i, def) in scorers.iter().enumerate() {
            if def.check.is_deferred() != self.deferred {
                continue;
            }
            let c = counts.scorers.get(i).copied().unwrap_or_default();
            self.name.append_value(&def.name);
            self.version.append_value(&def.version);
            self.category.append_value(def.category.name());
            let ints = [counts.sampled, c.n, c.passed, c.n - c.passed];
            for (b, v) in self.ints.iter_mut().zip(ints) {
                b.append_value(v as i64);
            }
            let (low, high) = wilson(c.passed, c.n);
            let some = c.n > 0;
            let rate = c.passed as f64 / c.n as f64;
            let mean = c.value_sum / c.n as f64;
            let floats = [
                some.then_some(rate),
                some.then_some(low),
                some.then_some(high),
                some.then_some(mean),
                Some(c.value_sum),
            ];
            for (b, v) in self.floats.iter_mut().zip(floats) {
                b.append_option(v);
            }
            self.len += 1;
        }
    }

    pub fn finish(&mut self) -> RecordBatch {
        let mut cols = self.keys.finish();
        cols.push(Arc::new(self.name.finish()));
        cols.push(Arc::new(self.version.finish()));
        cols.push(Arc::new(self.category.finish()));
        for b in &mut self.ints {
            cols.push(Arc::new(b.finish()));
        }
        for b in &mut self.floats {
            cols.push(Arc::new(b.finish()));
        }
        self.len = 0;
        RecordBatch::try_new(self.schema.clone(), cols).expect("columns match the quality schema")
    }
}

/// Reads `quality` rows back into per-series counts (the roll-up restore after a restart).
/// Scorers are matched by name; rows of scorers no longer configured are dropped.
pub fn quality_rows(
    batch: &RecordBatch,
    dims: &[Dimension],
    scorers: &[ScorerDef],
) -> Vec<(SeriesKey, QualityCounts)> {
    let keys = row_series_keys(batch, dims);
    let int = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
    };
    let (Some(sampled), Some(scored), Some(passed)) =
        (int("sampled"), int("scored"), int("passed"))
    else {
        return Vec::new();
    };
    let Some(sum) = batch
        .column_by_name("score_sum")
        .and_then(|c| c.as_primitive_opt::<Float64Type>())
    else {
        return Vec::new();
    };
    let Some(names) = batch
        .column_by_name("evaluation_name")
        .and_then(|c| c.as_string_opt::<i32>())
    else {
        return Vec::new();
    };
    let mut out: Vec<(SeriesKey, QualityCounts)> = Vec::new();
    for (row, key) in keys.into_iter().enumerate() {
        let Some(i) = scorers.iter().position(|s| s.name == names.value(row)) else {
            continue;
        };
        // Rows of one series are adjacent (one per scorer, written together).
        if out.last().is_none_or(|(k, _)| *k != key) {
            out.push((
                key,
                QualityCounts {
                    sampled: sampled.value(row).max(0) as u64,
                    scorers: vec![ScorerCounts::default(); scorers.len()],
                },
            ));
        }
        let c = &mut out.last_mut().expect("pushed above").1.scorers[i];
        c.n = scored.value(row).max(0) as u64;
        c.passed = passed.value(row).max(0) as u64;
        c.value_sum = sum.value(row);
    }
    out
}

/// The suffixes of the numeric columns a `source = "quality"` alert rule can read: per
/// scorer `<name>_<suffix>`, per category `<category>_<suffix>` of [`CATEGORY_METRICS`].
pub const SCORER_METRICS: [&str; 4] =
    ["pass_rate", "pass_rate_low", "pass_rate_high", "mean_score"];
/// Per category: the failure rate (refusals, PII, hallucinations, unsafe answers…) with its
/// interval, over all scorers of the category.
pub const CATEGORY_METRICS: [&str; 3] = ["fail_rate", "fail_rate_low", "fail_rate_high"];

/// The metric names a quality rule can use with these scorers.
pub fn frame_metrics(scorers: &[ScorerDef]) -> Vec<String> {
    let mut m = vec!["events".to_owned()];
    for s in scorers {
        m.extend(SCORER_METRICS.iter().map(|x| format!("{}_{x}", s.name)));
    }
    let mut cats: Vec<&str> = scorers.iter().map(|s| s.category.name()).collect();
    cats.sort_unstable();
    cats.dedup();
    for c in cats {
        m.extend(CATEGORY_METRICS.iter().map(|x| format!("{c}_{x}")));
    }
    m
}

/// The alert frame of one `quality` file (one window): one row per series, `events` = the
/// events sampled, and per metric its value plus `<metric>__n`, the scores behind it (the
/// count alert rules' `min_samples` checks). `None` when the file has no rows.
pub fn frame_batch(batch: &RecordBatch) -> Option<RecordBatch> {
    if batch.num_rows() == 0 {
        return None;
    }
    let s = |name: &str| batch.column_by_name(name)?.as_string_opt::<i32>();
    let i = |name: &str| batch.column_by_name(name)?.as_primitive_opt::<Int64Type>();
    let (series, names, cats) = (s("series")?, s("evaluation_name")?, s("category")?);
    let (sampled, scored, passed) = (i("sampled")?, i("scored")?, i("passed")?);
    let sum = batch
        .column_by_name("score_sum")?
        .as_primitive_opt::<Float64Type>()?;
    // Series in row order (a series' rows are adjacent); per series, metric → (value, n).
    let mut rows: Vec<usize> = Vec::new();
    let mut values: Vec<std::collections::BTreeMap<String, (f64, i64)>> = Vec::new();
    let mut metrics: Vec<String> = vec![];
    let mut cat_counts: Vec<std::collections::BTreeMap<&str, (u64, u64)>> = Vec::new();
    for row in 0..batch.num_rows() {
        if rows
            .last()
            .is_none_or(|&r| series.value(r) != series.value(row))
        {
            rows.push(row);
            values.push(Default::default());
            cat_counts.push(Default::default());
        }
        let (n, p) = (
            scored.value(row).max(0) as u64,
            passed.value(row).max(0) as u64,
        );
        let v = values.last_mut().expect("pushed above");
        let name = names.value(row);
        if n > 0 {
            let (low, high) = wilson(p, n);
            let per = [p as f64 / n as f64, low, high, sum.value(row) / n as f64];
            for (suffix, x) in SCORER_METRICS.iter().zip(per) {
                v.insert(format!("{name}_{suffix}"), (x, n as i64));
            }
        }
        for suffix in SCORER_METRICS {
            metrics.push(format!("{name}_{suffix}"));
        }
        let c = cat_counts
            .last_mut()
            .expect("pushed above")
            .entry(cats.value(row))
            .or_default();
        c.0 += n;
        c.1 += n - p;
        for suffix in CATEGORY_METRICS {
            metrics.push(format!("{}_{suffix}", cats.value(row)));
        }
    }
    for (v, cats) in values.iter_mut().zip(&cat_counts) {
        for (cat, &(n, failed)) in cats {
            if n == 0 {
                continue;
            }
            let (low, high) = wilson(failed, n);
            for (suffix, x) in CATEGORY_METRICS
                .iter()
                .zip([failed as f64 / n as f64, low, high])
            {
                v.insert(format!("{cat}_{suffix}"), (x, n as i64));
            }
        }
    }
    metrics.sort();
    metrics.dedup();
    let start = batch.column_by_name("window_start")?.clone();
    let end = batch.column_by_name("window_end")?.clone();
    let idx = arrow::array::UInt32Array::from_iter_values(rows.iter().map(|&r| r as u32));
    let take = |c: &ArrayRef| arrow::compute::take(c, &idx, None).ok();
    let mut fields = vec![
        Field::new("window_start", ts_type(), false),
        Field::new("window_end", ts_type(), false),
    ];
    let mut cols: Vec<ArrayRef> = vec![take(&start)?, take(&end)?];
    // The series dimensions: the columns between `series` and `evaluation_name`.
    let schema = batch.schema();
    let first = schema.index_of("series").ok()? + 1;
    let last = schema.index_of("evaluation_name").ok()?;
    for (f, c) in schema.fields()[first..last]
        .iter()
        .zip(&batch.columns()[first..last])
    {
        fields.push(Field::new(f.name(), DataType::Utf8, true));
        cols.push(take(c)?);
    }
    fields.push(Field::new("events", DataType::Int64, false));
    cols.push(Arc::new(arrow::array::Int64Array::from_iter_values(
        rows.iter().map(|&r| sampled.value(r)),
    )));
    for m in &metrics {
        fields.push(Field::new(m, DataType::Float64, true));
        cols.push(Arc::new(arrow::array::Float64Array::from_iter(
            values.iter().map(|v| v.get(m).map(|x| x.0)),
        )));
        fields.push(Field::new(format!("{m}__n"), DataType::Int64, false));
        cols.push(Arc::new(arrow::array::Int64Array::from_iter_values(
            values.iter().map(|v| v.get(m).map_or(0, |x| x.1)),
        )));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).ok()
}
