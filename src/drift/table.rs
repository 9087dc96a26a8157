//! The `drift` table (one row per series, window, field and method) and the per-window frame
//! the alert stage judges (one row per series, one numeric column per verdict).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use super::scalar::{CATEGORICAL, NUMERIC};
use crate::window::SeriesKey;

/// One verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftRow {
    pub series: SeriesKey,
    /// `input`, `output` (embeddings) or a scalar feature (`output_chars`, `refusal`…).
    pub field: &'static str,
    /// `mmd`, `centroid`, `knn`, `ks`, `wasserstein`, `js`, `psi`.
    pub method: &'static str,
    pub statistic: Option<f64>,
    pub threshold: Option<f64>,
    pub p_value: Option<f64>,
    pub drifted: bool,
    /// `judged`, or why not: `few_samples`, `few_reference`.
    pub status: &'static str,
    pub current_n: u64,
    pub reference_n: u64,
    pub reference: String,
    /// JSON: the current examples farthest from the reference, or the bins that moved.
    pub explanation: String,
    pub embedder: Option<String>,
}

/// The text fields that are embedded, in the order the stage keeps them.
pub const FIELDS: [&str; 2] = ["input", "output"];
/// The embedding tests of each field, in the order the stage keeps their statistics.
pub const EMBEDDING_METHODS: [&str; 3] = ["mmd", "centroid", "knn"];

/// The numeric columns a `source = "drift"` alert rule can read.
pub fn frame_metrics() -> Vec<String> {
    let mut m = vec![
        "events".to_owned(),
        "drifted".to_owned(),
        "scalar_drifted".to_owned(),
    ];
    for f in FIELDS {
        m.push(format!("{f}_drifted"));
        for method in EMBEDDING_METHODS {
            m.push(format!("{f}_{method}_p_value"));
        }
    }
    for f in NUMERIC.iter().chain(&CATEGORICAL) {
        m.push(format!("{f}_drifted"));
    }
    m
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub fn drift_schema(dims: &[String]) -> SchemaRef {
    let mut fields = vec![
        Field::new("window_start", ts_type(), false),
        Field::new("window_end", ts_type(), false),
        Field::new("stream", DataType::Utf8, false),
    ];
    fields.extend(dims.iter().map(|d| Field::new(d, DataType::Utf8, true)));
    fields.extend([
        Field::new("field", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("statistic", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, true),
        Field::new("p_value", DataType::Float64, true),
        Field::new("drifted", DataType::Boolean, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("current_n", DataType::Int64, false),
        Field::new("reference_n", DataType::Int64, false),
        Field::new("reference", DataType::Utf8, false),
        Field::new("explanation", DataType::Utf8, true),
        Field::new("embedder", DataType::Utf8, true),
        // The series' events in the window (what `source = "drift"` rules' min_samples
        // counts); absent from files written before it was added.
        Field::new("events", DataType::Int64, true),
    ]);
    Arc::new(Schema::new(fields))
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

/// The drift table's rows of one window.
pub fn drift_batch(
    dims: &[String],
    stream: &str,
    start_ms: i64,
    end_ms: i64,
    series: &[(SeriesKey, u64)],
    rows: &[DriftRow],
) -> RecordBatch {
    let n = rows.len();
    let events_of: std::collections::HashMap<&SeriesKey, u64> =
        series.iter().map(|(k, n)| (k, *n)).collect();
    let mut events = Int64Builder::new();
    let mut start = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut end = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut streams = StringBuilder::new();
    let mut dim_cols: Vec<StringBuilder> = dims.iter().map(|_| StringBuilder::new()).collect();
    let (mut field, mut method, mut status, mut reference, mut explanation, mut embedder) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut stat, mut thr, mut p) = (
        Float64Builder::new(),
        Float64Builder::new(),
        Float64Builder::new(),
    );
    let mut drifted = BooleanBuilder::new();
    let (mut cur, mut refn) = (Int64Builder::new(), Int64Builder::new());
    for r in rows {
        start.append_value(start_ms);
        end.append_value(end_ms);
        streams.append_value(stream);
        for (b, v) in dim_cols.iter_mut().zip(r.series.values()) {
            b.append_option(v.as_deref());
        }
        field.append_value(r.field);
        method.append_value(r.method);
        stat.append_option(finite(r.statistic));
        thr.append_option(finite(r.threshold));
        p.append_option(finite(r.p_value));
        drifted.append_value(r.drifted);
        status.append_value(r.status);
        cur.append_value(r.current_n as i64);
        refn.append_value(r.reference_n as i64);
        reference.append_value(&r.reference);
        explanation.append_option((!r.explanation.is_empty()).then_some(&r.explanation));
        embedder.append_option(r.embedder.as_deref());
        events.append_option(events_of.get(&r.series).map(|n| *n as i64));
    }
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(streams.finish()),
    ];
    cols.extend(
        dim_cols
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef),
    );
    cols.extend([
        Arc::new(field.finish()) as ArrayRef,
        Arc::new(method.finish()),
        Arc::new(stat.finish()),
        Arc::new(thr.finish()),
        Arc::new(p.finish()),
        Arc::new(drifted.finish()),
        Arc::new(status.finish()),
        Arc::new(cur.finish()),
        Arc::new(refn.finish()),
        Arc::new(reference.finish()),
        Arc::new(explanation.finish()),
        Arc::new(embedder.finish()),
        Arc::new(events.finish()),
    ]);
    RecordBatch::try_new(drift_schema(dims), cols).expect("columns match the drift schema")
}

/// A drift file read back as the frame the stage sent when it judged the window (for the
/// alert stage's catch-up after a restart); `None` when the file has no rows.
pub fn frame_from_table(batch: &RecordBatch) -> Option<RecordBatch> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
    if batch.num_rows() == 0 {
        return None;
    }
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let (a, b) = (
        names.iter().position(|n| *n == "stream")?,
        names.iter().position(|n| *n == "field")?,
    );
    let dims: Vec<String> = names[a + 1..b].iter().map(|s| s.to_string()).collect();
    let ts = |n: &str| {
        batch
            .column_by_name(n)?
            .as_primitive_opt::<TimestampMillisecondType>()
            .map(|c| c.value(0))
    };
    let (start_ms, end_ms) = (ts("window_start")?, ts("window_end")?);
    let s = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_string_opt::<i32>())
    };
    let (field, method, status) = (s("field")?, s("method")?, s("status")?);
    let drifted = batch.column_by_name("drifted")?.as_boolean_opt()?;
    let p = batch
        .column_by_name("p_value")
        .and_then(|c| c.as_primitive_opt::<Float64Type>());
    let i64s = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
    };
    let (events, current) = (i64s("events"), i64s("current_n"));
    let dim_cols: Vec<_> = dims.iter().map(|d| s(d)).collect();
    // The names frame_batch knows, as the stage's own &'static strs.
    let known = |v: &str, list: &[&'static str]| list.iter().copied().find(|x| *x == v);
    let fields: Vec<&'static str> = FIELDS
        .iter()
        .chain(&NUMERIC)
        .chain(&CATEGORICAL)
        .copied()
        .collect();
    let mut series: Vec<(SeriesKey, u64)> = Vec::new();
    let mut index: std::collections::HashMap<SeriesKey, usize> = Default::default();
    let mut rows = Vec::new();
    for i in 0..batch.num_rows() {
        let values: Vec<Option<&str>> = dim_cols
            .iter()
            .map(|c| c.filter(|c| !c.is_null(i)).map(|c| c.value(i)))
            .collect();
        let key = SeriesKey::new(&values);
        let n = events
            .filter(|c| !c.is_null(i))
            .or(current)
            .map_or(0, |c| c.value(i).max(0) as u64);
        let at = *index.entry(key.clone()).or_insert_with(|| {
            series.push((key.clone(), 0));
            series.len() - 1
        });
        series[at].1 = series[at].1.max(n);
        let Some(f) = known(field.value(i), &fields) else {
            continue;
        };
        rows.push(DriftRow {
            series: key,
            field: f,
            method: known(method.value(i), &EMBEDDING_METHODS).unwrap_or("scalar"),
            statistic: None,
            threshold: None,
            p_value: p.filter(|c| !c.is_null(i)).map(|c| c.value(i)),
            drifted: drifted.value(i),
            status: if status.value(i) == "judged" {
                "judged"
            } else {
                "not_judged"
            },
            current_n: 0,
            reference_n: 0,
            reference: String::new(),
            explanation: String::new(),
            embedder: None,
        });
    }
    Some(frame_batch(&dims, start_ms, end_ms, &series, &rows))
}

/// The alert frame of one window: one row per series with its event count and, per verdict,
/// a number (1/0 for drifted flags, the p-value for embedding tests; null when not judged).
pub fn frame_batch(
    dims: &[String],
    start_ms: i64,
    end_ms: i64,
    series: &[(SeriesKey, u64)],
    rows: &[DriftRow],
) -> RecordBatch {
    let metrics = frame_metrics();
    let mut values: Vec<Vec<Option<f64>>> = vec![vec![None; series.len()]; metrics.len()];
    let col = |name: &str| metrics.iter().position(|m| m == name);
    let index: std::collections::HashMap<&SeriesKey, usize> = series
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k, i))
        .collect();
    for (i, (_, events)) in series.iter().enumerate() {
        values[0][i] = Some(*events as f64);
    }
    let bump = |values: &mut Vec<Vec<Option<f64>>>, name: &str, i: usize, v: f64| {
        if let Some(c) = col(name) {
            let slot = &mut values[c][i];
            *slot = Some(slot.unwrap_or(0.0).max(v));
        }
    };
    for r in rows {
        let Some(&i) = index.get(&r.series) else {
            continue;
        };
        if r.status != "judged" {
            continue;
        }
        let flag = f64::from(u8::from(r.drifted));
        bump(&mut values, &format!("{}_drifted", r.field), i, flag);
        if FIELDS.contains(&r.field) {
            bump(&mut values, "drifted", i, flag);
            if let (Some(c), Some(p)) =
                (col(&format!("{}_{}_p_value", r.field, r.method)), r.p_value)
            {
                values[c][i] = Some(p);
            }
        } else {
            let c = col("scalar_drifted").expect("listed");
            values[c][i] = Some(values[c][i].unwrap_or(0.0) + flag);
        }
    }
    let mut fields = vec![
        Field::new("window_start", ts_type(), false),
        Field::new("window_end", ts_type(), false),
    ];
    fields.extend(dims.iter().map(|d| Field::new(d, DataType::Utf8, true)));
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondBuilder::new()
                .with_timezone("UTC")
                .tap_fill(series.len(), start_ms),
        ),
        Arc::new(
            TimestampMillisecondBuilder::new()
                .with_timezone("UTC")
                .tap_fill(series.len(), end_ms),
        ),
    ];
    for (d, _) in dims.iter().enumerate() {
        let mut b = StringBuilder::new();
        for (k, _) in series {
            b.append_option(k.values()[d].as_deref());
        }
        cols.push(Arc::new(b.finish()));
    }
    fields.push(Field::new("events", DataType::Int64, false));
    let mut ev = Int64Builder::new();
    for (_, n) in series {
        ev.append_value(*n as i64);
    }
    cols.push(Arc::new(ev.finish()));
    for (m, v) in metrics.iter().zip(&values).skip(1) {
        fields.push(Field::new(m, DataType::Float64, true));
        cols.push(Arc::new(arrow::array::Float64Array::from(v.clone())));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).expect("frame columns match")
}

trait Fill {
    fn tap_fill(self, n: usize, v: i64) -> arrow::array::TimestampMillisecondArray;
}

impl Fill for TimestampMillisecondBuilder {
    fn tap_fill(mut self, n: usize, v: i64) -> arrow::array::TimestampMillisecondArray {
        for _ in 0..n {
            self.append_value(v);
        }
        self.finish()
    }
}

/// Where a window's drift rows go.
pub fn drift_file(stream: &str, start_ms: i64) -> PathBuf {
    PathBuf::from("drift")
        .join(crate::sink::hour_dir(start_ms.div_euclid(3_600_000)))
        .join(format!("drift-{stream}-{start_ms}.parquet"))
}
