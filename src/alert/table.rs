//! The `alerts` table: every state transition and every notification attempt, one row each
//! (a notification attempt has one row per alert it carried).

use std::sync::Arc;

use arrow::array::{
    Float64Builder, Int32Builder, MapBuilder, MapFieldNames, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use super::dispatch::Notification;
use super::engine::{Labels, Transition};
use super::notify::Attempt;

pub fn alerts_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("time", ts.clone(), false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("rule", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, true),
        Field::new("labels", crate::event::map_type(DataType::Utf8), true),
        Field::new("status", DataType::Utf8, false),
        Field::new("previous_status", DataType::Utf8, true),
        Field::new("value", DataType::Float64, true),
        Field::new("baseline", DataType::Float64, true),
        Field::new("window_end", ts, true),
        Field::new("receiver", DataType::Utf8, true),
        Field::new("group_key", DataType::Utf8, true),
        Field::new("attempt", DataType::Int32, true),
        Field::new("result", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
    ]))
}

/// One row, before it is columnar.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub time_ms: i64,
    pub kind: &'static str,
    pub rule: String,
    pub fingerprint: u64,
    pub severity: Option<String>,
    pub labels: Labels,
    pub status: String,
    pub previous_status: Option<String>,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub window_end: Option<i64>,
    pub receiver: Option<String>,
    pub group_key: Option<String>,
    pub attempt: Option<i32>,
    pub result: Option<String>,
    pub error: Option<String>,
}

impl AlertRow {
    pub fn transition(t: &Transition, now_ms: i64) -> AlertRow {
        AlertRow {
            time_ms: now_ms,
            kind: "transition",
            rule: t.rule.clone(),
            fingerprint: t.fingerprint,
            severity: Some(t.severity.clone()),
            labels: t.labels.clone(),
            status: t.to.to_owned(),
            previous_status: Some(t.from.to_owned()),
            value: Some(t.value),
            baseline: t.baseline,
            window_end: Some(t.at_ms),
            receiver: None,
            group_key: None,
            attempt: None,
            result: None,
            error: None,
        }
    }

    /// One row per alert the notification carried.
    pub fn attempts(n: &Notification, a: &Attempt) -> Vec<AlertRow> {
        let result = a.result();
        n.alerts
            .iter()
            .map(|x| AlertRow {
                time_ms: a.at_ms,
                kind: "notification",
                rule: x.rule.clone(),
                fingerprint: x.fingerprint,
                severity: Some(x.severity.clone()),
                labels: x.labels.clone(),
                status: x.status.as_str().to_owned(),
                previous_status: None,
                value: Some(x.value),
                baseline: x.baseline,
                window_end: x.ends_at.or(Some(x.starts_at)),
                receiver: Some(n.receiver.clone()),
                group_key: Some(n.group_key.clone()),
                attempt: Some(a.attempt as i32),
                result: Some(result.to_owned()),
                error: a.error.clone(),
            })
            .collect()
    }
}

pub fn to_batch(rows: &[AlertRow]) -> RecordBatch {
    let mut time = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut kind = StringBuilder::new();
    let mut rule = StringBuilder::new();
    let mut fp = StringBuilder::new();
    let mut severity = StringBuilder::new();
    let names = MapFieldNames {
        entry: "entries".into(),
        key: "keys".into(),
        value: "values".into(),
    };
    let mut labels = MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new());
    let mut status = StringBuilder::new();
    let mut prev = StringBuilder::new();
    let mut value = Float64Builder::new();
    let mut baseline = Float64Builder::new();
    let mut wend = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut receiver = StringBuilder::new();
    let mut gkey = StringBuilder::new();
    let mut attempt = Int32Builder::new();
    let mut result = StringBuilder::new();
    let mut error = StringBuilder::new();
    for r in rows {
        time.append_value(r.time_ms);
        kind.append_value(r.kind);
        rule.append_value(&r.rule);
        fp.append_value(format!("{:016x}", r.fingerprint));
        severity.append_option(r.severity.as_deref());
        for (k, v) in &r.labels {
            labels.keys().append_value(k);
            labels.values().append_value(v);
        }
        labels
            .append(true)
            .expect("map keys and values stay aligned");
        status.append_value(&r.status);
        prev.append_option(r.previous_status.as_deref());
        value.append_option(r.value);
        baseline.append_option(r.baseline);
        wend.append_option(r.window_end);
        receiver.append_option(r.receiver.as_deref());
        gkey.append_option(r.group_key.as_deref());
        attempt.append_option(r.attempt);
        result.append_option(r.result.as_deref());
        error.append_option(r.error.as_deref());
    }
    RecordBatch::try_new(
        alerts_schema(),
        vec![
            Arc::new(time.finish()),
            Arc::new(kind.finish()),
            Arc::new(rule.finish()),
            Arc::new(fp.finish()),
            Arc::new(severity.finish()),
            Arc::new(labels.finish()),
            Arc::new(status.finish()),
            Arc::new(prev.finish()),
            Arc::new(value.finish()),
            Arc::new(baseline.finish()),
            Arc::new(wend.finish()),
            Arc::new(receiver.finish()),
            Arc::new(gkey.finish()),
            Arc::new(attempt.finish()),
            Arc::new(result.finish()),
            Arc::new(error.finish()),
        ],
    )
    .expect("columns match the alerts schema")
}
