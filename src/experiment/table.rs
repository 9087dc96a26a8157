//! The `experiments` table — one row per window, experiment, metric and arm, with the
//! window's partial moments (mergeable: any engine can re-aggregate them), the running
//! estimate, the fixed-horizon and always-valid tests and the decision — and the per-window
//! frame the alert stage judges (one row per treatment arm).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit};

use super::config::ExperimentConfig;
use super::scorecard::Look;

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

pub fn experiments_schema() -> SchemaRef {
    let f64c = |n: &str| Field::new(n, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("window_end", ts_type(), false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("experiment", DataType::Utf8, false),
        Field::new("app", DataType::Utf8, true),
        Field::new("environment", DataType::Utf8, true),
        Field::new("metric", DataType::Utf8, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("better", DataType::Utf8, false),
        Field::new("arm", DataType::Utf8, false),
        Field::new("control", DataType::Utf8, false),
        Field::new("is_control", DataType::Boolean, false),
        Field::new("window_n", DataType::Int64, false),
        f64c("window_mean"),
        f64c("window_m2"),
        Field::new("n", DataType::Int64, false),
        f64c("estimate"),
        f64c("std_dev"),
        Field::new("events", DataType::Int64, false),
        f64c("diff"),
        f64c("lift"),
        f64c("ci_low"),
        f64c("ci_high"),
        f64c("p_value"),
        f64c("always_valid_p"),
        f64c("adjusted_p"),
        f64c("cs_low"),
        f64c("cs_high"),
        f64c("tolerance"),
        Field::new("verdict", DataType::Utf8, false),
        Field::new("arm_decision", DataType::Utf8, true),
        Field::new("decision", DataType::Utf8, false),
        Field::new("srm_p_value", DataType::Float64, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

/// The rows of the looks at one window.
pub fn experiments_batch(stream: &str, looks: &[(&ExperimentConfig, Look)]) -> RecordBatch {
    use super::scorecard::Row;
    use arrow::array::{
        BooleanArray, Float64Array, Int64Array, StringArray, TimestampMillisecondArray,
    };
    // One entry per row, in the schema's column order below.
    let rows: Vec<(&ExperimentConfig, &Look, &Row)> = looks
        .iter()
        .flat_map(|(x, l)| l.rows.iter().map(move |r| (*x, l, r)))
        .collect();
    let strs = |f: &dyn Fn(&ExperimentConfig, &Look, &Row) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from_iter(
            rows.iter().map(|(x, l, r)| f(x, l, r)),
        ))
    };
    let ints = |f: &dyn Fn(&Row) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|(_, _, r)| f(r) as i64),
        ))
    };
    // Non-finite values (a variance of one observation, a lift over a zero control) are null.
    let floats = |f: &dyn Fn(&Look, &Row) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(
            rows.iter()
                .map(|(_, l, r)| f(l, r).filter(|v| v.is_finite())),
        ))
    };
    let times = |f: &dyn Fn(&Look) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|(_, l, _)| f(l)))
                .with_timezone("UTC"),
        )
    };
    let filter = |x: &ExperimentConfig, name: &str| {
        x.filter
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let window = |r: &Row, v: f64| (r.window.n > 0).then_some(v);
    let cols: Vec<ArrayRef> = vec![
        times(&|l| l.start_ms),
        times(&|l| l.end_ms),
        strs(&|_, _, _| Some(stream.to_owned())),
        strs(&|_, l, _| Some(l.experiment.clone())),
        strs(&|x, _, _| filter(x, "app")),
        strs(&|x, _, _| filter(x, "environment")),
        strs(&|_, _, r| Some(r.metric.clone())),
        strs(&|_, _, r| Some(r.role.name().to_owned())),
        strs(&|_, _, r| {
            Some(
                if r.higher_is_better {
                    "higher"
                } else {
                    "lower"
                }
                .to_owned(),
            )
        }),
        strs(&|_, _, r| Some(r.arm.clone())),
        strs(&|x, _, _| Some(x.control().to_owned())),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|(_, _, r)| Some(r.control)),
        )),
        ints(&|r| r.window.n),
        floats(&|_, r| window(r, r.window.mean)),
        floats(&|_, r| window(r, r.window.m2)),
        ints(&|r| r.total.n),
        floats(&|_, r| (r.total.n > 0).then_some(r.total.mean)),
        floats(&|_, r| Some(r.total.variance().sqrt())),
        ints(&|r| r.events),
        floats(&|_, r| r.diff),
        floats(&|_, r| r.lift),
        floats(&|_, r| r.ci.map(|c| c.0)),
        floats(&|_, r| r.ci.map(|c| c.1)),
        floats(&|_, r| r.p_value),
        floats(&|_, r| r.always_valid_p),
        floats(&|_, r| r.adjusted_p),
        floats(&|_, r| r.cs.map(|c| c.0)),
        floats(&|_, r| r.cs.map(|c| c.1)),
        floats(&|_, r| r.tolerance),
        strs(&|_, _, r| Some(r.verdict.to_owned())),
        strs(&|_, _, r| r.arm_decision.map(|d| d.name().to_owned())),
        strs(&|_, l, _| Some(l.decision.name().to_owned())),
        floats(&|l, _| Some(l.srm_p_value)),
        strs(&|_, l, _| Some(l.reason.clone())),
    ];
    RecordBatch::try_new(experiments_schema(), cols).expect("columns match the experiments schema")
}

/// The relative path of one window's file.
pub fn experiments_file(stream: &str, start_ms: i64) -> PathBuf {
    PathBuf::from("experiments")
        .join(crate::sink::hour_dir(start_ms.div_euclid(3_600_000)))
        .join(format!("experiments-{stream}-{start_ms}.parquet"))
}

/// The numeric columns a `source = "experiments"` alert rule can read.
pub const FRAME_METRICS: &[&str] = &[
    "events",
    "guardrail_breached",
    "goal_worse",
    "invalid",
    "rollback",
    "promote",
    "srm_p_value",
];

/// The label columns of an experiments frame, besides `app` and `environment`.
pub const FRAME_LABELS: &[&str] = &["experiment", "arm", "control"];

/// One window's rows as the alert stage's frame: one row per experiment and treatment arm,
/// each verdict as 0 or 1. `None` when there are no rows.
pub fn frame_batch(batch: &RecordBatch) -> Option<RecordBatch> {
    if batch.num_rows() == 0 {
        return None;
    }
    let s = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_string_opt::<i32>())
    };
    let (exp, arm, control, verdict, arm_dec, dec, role) = (
        s("experiment")?,
        s("arm")?,
        s("control")?,
        s("verdict")?,
        s("arm_decision")?,
        s("decision")?,
        s("role")?,
    );
    let (app, env) = (s("app")?, s("environment")?);
    let is_control = batch.column_by_name("is_control")?.as_boolean_opt()?;
    let events = batch
        .column_by_name("events")?
        .as_primitive_opt::<Int64Type>()?;
    let srm = batch
        .column_by_name("srm_p_value")?
        .as_primitive_opt::<Float64Type>()?;
    let ts = |n: &str| batch.column_by_name(n).cloned();
    let (ws, we) = (ts("window_start")?, ts("window_end")?);
    // (first row, [breached, goal_worse]) per experiment and arm, in row order.
    let mut keys: Vec<(usize, [bool; 2])> = Vec::new();
    let mut at: std::collections::HashMap<(&str, &str), usize> = Default::default();
    for i in 0..batch.num_rows() {
        if is_control.value(i) {
            continue;
        }
        let j = *at.entry((exp.value(i), arm.value(i))).or_insert_with(|| {
            keys.push((i, [false; 2]));
            keys.len() - 1
        });
        keys[j].1[0] |= verdict.value(i) == "breached";
        keys[j].1[1] |= role.value(i) == "goal" && verdict.value(i) == "worse";
    }
    if keys.is_empty() {
        return None;
    }
    let rows: Vec<usize> = keys.iter().map(|(i, _)| *i).collect();
    let idx = arrow::array::UInt32Array::from(rows.iter().map(|i| *i as u32).collect::<Vec<_>>());
    let pick = |c: &ArrayRef| arrow::compute::take(c.as_ref(), &idx, None).ok();
    let strs = |c: &arrow::array::StringArray| -> ArrayRef {
        Arc::new(arrow::array::StringArray::from_iter(
            rows.iter().map(|&i| (!c.is_null(i)).then(|| c.value(i))),
        ))
    };
    let flag = |v: Vec<bool>| -> ArrayRef {
        Arc::new(arrow::array::Float64Array::from_iter_values(
            v.into_iter().map(|b| if b { 1.0 } else { 0.0 }),
        ))
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("window_end", ts_type(), false),
        Field::new("app", DataType::Utf8, true),
        Field::new("environment", DataType::Utf8, true),
        Field::new("experiment", DataType::Utf8, true),
        Field::new("arm", DataType::Utf8, true),
        Field::new("control", DataType::Utf8, true),
        Field::new("events", DataType::Int64, false),
        Field::new("guardrail_breached", DataType::Float64, false),
        Field::new("goal_worse", DataType::Float64, false),
        Field::new("invalid", DataType::Float64, false),
        Field::new("rollback", DataType::Float64, false),
        Field::new("promote", DataType::Float64, false),
        Field::new("srm_p_value", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        pick(&ws)?,
        pick(&we)?,
        strs(app),
        strs(env),
        strs(exp),
        strs(arm),
        strs(control),
        Arc::new(arrow::array::Int64Array::from_iter_values(
            rows.iter().map(|&i| events.value(i)),
        )),
        flag(keys.iter().map(|(_, f)| f[0]).collect()),
        flag(keys.iter().map(|(_, f)| f[1]).collect()),
        flag(rows.iter().map(|&i| dec.value(i) == "invalid").collect()),
        flag(
            rows.iter()
                .map(|&i| !arm_dec.is_null(i) && arm_dec.value(i) == "rollback")
                .collect(),
        ),
        flag(
            rows.iter()
                .map(|&i| !arm_dec.is_null(i) && arm_dec.value(i) == "promote")
                .collect(),
        ),
        Arc::new(arrow::array::Float64Array::from_iter_values(
            rows.iter().map(|&i| srm.value(i)),
        )),
    ];
    RecordBatch::try_new(schema, cols).ok()
}

/// The newest window of `experiment` in the table under `root` (any stream): its rows.
/// Hours are read newest first, so this reads little however long the table is.
pub fn latest(
    root: &Path,
    experiment: &str,
) -> Result<Option<RecordBatch>, crate::sink::SinkError> {
    let mut hours = crate::metrics::rebuild::table_hours(root, "experiments")?;
    hours.sort_by_key(|h| std::cmp::Reverse(h.0));
    for (t, _) in hours {
        let mut best: Option<(i64, RecordBatch)> = None;
        for f in crate::metrics::rebuild::table_files(root, "experiments", t, t + 1)? {
            for b in crate::metrics::rebuild::read_parquet(&f, None)? {
                let mask = arrow::compute::kernels::cmp::eq(
                    b.column_by_name("experiment").expect("experiments schema"),
                    &arrow::array::StringArray::new_scalar(experiment),
                )
                .map_err(|e| crate::sink::SinkError::Io {
                    path: f.clone(),
                    source: std::io::Error::other(e),
                })?;
                let rows = arrow::compute::filter_record_batch(&b, &mask).map_err(|e| {
                    crate::sink::SinkError::Io {
                        path: f.clone(),
                        source: std::io::Error::other(e),
                    }
                })?;
                if rows.num_rows() == 0 {
                    continue;
                }
                let end = rows
                    .column_by_name("window_end")
                    .and_then(|c| {
                        c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>()
                    })
                    .map_or(i64::MIN, |c| c.value(0));
                if best.as_ref().is_none_or(|(e, _)| end > *e) {
                    best = Some((end, rows));
                }
            }
        }
        if let Some((_, b)) = best {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// The experiments with rows in the newest 24 hours of the table.
pub fn names(root: &Path) -> Result<std::collections::BTreeSet<String>, crate::sink::SinkError> {
    let mut hours = crate::metrics::rebuild::table_hours(root, "experiments")?;
    hours.sort_by_key(|h| std::cmp::Reverse(h.0));
    let mut out = std::collections::BTreeSet::new();
    for (t, _) in hours.into_iter().take(24) {
        for f in crate::metrics::rebuild::table_files(root, "experiments", t, t + 1)? {
            for b in crate::metrics::rebuild::read_parquet(&f, Some(&["experiment"]))? {
                if let Some(c) = b.column(0).as_string_opt::<i32>() {
                    out.extend(c.iter().flatten().map(str::to_owned));
                }
            }
        }
    }
    Ok(out)
}
