//! The `experiments` table — one row per window, experiment, metric and arm, with the
//! window's partial moments (mergeable: any engine can re-aggregate them), the running
//! estimate, the fixed-horizon and always-valid tests and the decision — and the per-window
//! frame the alert stage judges (one row per treatment arm).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder,
};
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
    let n: usize = looks.iter().map(|(_, l)| l.rows.len()).sum();
    let mut start = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut end = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut s: Vec<StringBuilder> = (0..7).map(|_| StringBuilder::new()).collect();
    let mut is_control = BooleanBuilder::with_capacity(n);
    let mut ints: Vec<Int64Builder> = (0..3).map(|_| Int64Builder::with_capacity(n)).collect();
    let mut f: Vec<Float64Builder> = (0..14).map(|_| Float64Builder::with_capacity(n)).collect();
    let mut tail: Vec<StringBuilder> = (0..4).map(|_| StringBuilder::new()).collect();
    let mut srm = Float64Builder::with_capacity(n);
    let opt = |v: Option<f64>| v.filter(|x| x.is_finite());
    for (x, look) in looks {
        let field = |name: &str| {
            x.filter
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        for r in &look.rows {
            start.append_value(look.start_ms);
            end.append_value(look.end_ms);
            s[0].append_value(stream);
            s[1].append_value(&look.experiment);
            s[2].append_option(field("app"));
            s[3].append_option(field("environment"));
            s[4].append_value(&r.metric);
            s[5].append_value(r.role.name());
            s[6].append_value(if r.higher_is_better {
                "higher"
            } else {
                "lower"
            });
            is_control.append_value(r.control);
            ints[0].append_value(r.window.n as i64);
            ints[1].append_value(r.total.n as i64);
            ints[2].append_value(r.events as i64);
            let sd = r.total.variance().sqrt();
            let values = [
                opt((r.window.n > 0).then_some(r.window.mean)),
                opt((r.window.n > 0).then_some(r.window.m2)),
                opt((r.total.n > 0).then_some(r.total.mean)),
                opt(Some(sd)),
                opt(r.diff),
                opt(r.lift),
                opt(r.ci.map(|c| c.0)),
                opt(r.ci.map(|c| c.1)),
                opt(r.p_value),
                opt(r.always_valid_p),
                opt(r.adjusted_p),
                opt(r.cs.map(|c| c.0)),
                opt(r.cs.map(|c| c.1)),
                r.tolerance,
            ];
            for (b, v) in f.iter_mut().zip(values) {
                b.append_option(v);
            }
            tail[0].append_value(&r.arm);
            tail[1].append_value(x.control());
            tail[2].append_value(r.verdict);
            tail[3].append_option(r.arm_decision.map(|d| d.name()));
            srm.append_value(look.srm_p_value);
        }
    }
    let mut dec = StringBuilder::new();
    let mut reason = StringBuilder::new();
    for (_, look) in looks {
        for _ in &look.rows {
            dec.append_value(look.decision.name());
            reason.append_value(&look.reason);
        }
    }
    let mut f = f.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut take = |k: usize| -> Vec<ArrayRef> { (0..k).filter_map(|_| f.next()).collect() };
    let (window_stats, estimate, rest) = (take(2), take(2), take(10));
    let mut s = s.into_iter().map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut ints = ints
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut tail = tail
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef);
    let mut cols: Vec<ArrayRef> = vec![Arc::new(start.finish()), Arc::new(end.finish())];
    cols.extend(s.by_ref().take(6)); // stream … role
    cols.push(s.next().expect("better"));
    cols.push(tail.next().expect("arm"));
    cols.push(tail.next().expect("control"));
    cols.push(Arc::new(is_control.finish()));
    cols.push(ints.next().expect("window_n"));
    cols.extend(window_stats);
    cols.push(ints.next().expect("n"));
    cols.extend(estimate);
    cols.push(ints.next().expect("events"));
    cols.extend(rest);
    cols.push(tail.next().expect("verdict"));
    cols.push(tail.next().expect("arm_decision"));
    cols.push(Arc::new(dec.finish()));
    cols.push(Arc::new(srm.finish()));
    cols.push(Arc::new(reason.finish()));
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
