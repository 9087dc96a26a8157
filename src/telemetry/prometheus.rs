//! [`Stats`] in the Prometheus text exposition format (version 0.0.4).
//!
//! Written by hand rather than through a client library: every value already lives in
//! [`Stats`] (atomics bumped on the hot path), so rendering is a read-only walk at scrape time
//! with nothing to register; the format's rules that matter — `# HELP`/`# TYPE` once per
//! family, label-value escaping, `_total` counters — are covered by a test that parses the
//! output with a real exposition-format parser.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::Stats;

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, l: &[(&str, &str)], v: f64) {
        let _ = writeln!(self.0, "{name}{} {}", labels(l), num(v));
    }
    fn single(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

fn render_alerts(o: &mut Out, stats: &Stats) {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    o.family("telltale_alerts", "gauge", "Alerts pending and firing now.");
    o.sample(
        "telltale_alerts",
        &[("state", "pending")],
        g(&stats.alerts_pending),
    );
    o.sample(
        "telltale_alerts",
        &[("state", "firing")],
        g(&stats.alerts_firing),
    );
    o.family(
        "telltale_alert_transitions_total",
        "counter",
        "Alerts that started firing, and that resolved.",
    );
    o.sample(
        "telltale_alert_transitions_total",
        &[("to", "firing")],
        g(&stats.alerts_fired),
    );
    o.sample(
        "telltale_alert_transitions_total",
        &[("to", "resolved")],
        g(&stats.alerts_resolved),
    );
    o.family(
        "telltale_alert_notifications_total",
        "counter",
        "Notification delivery attempts per receiver and result (ok, retrying, gave_up).",
    );
    let n = stats
        .notifications
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    for ((receiver, result), v) in n {
        o.sample(
            "telltale_alert_notifications_total",
            &[("receiver", &receiver), ("result", result)],
            v as f64,
        );
    }
    o.single(
        "telltale_alert_evaluation_seconds",
        "gauge",
        "Time to judge the last closed window against every rule.",
        g(&stats.alert_evaluation_us) / 1e6,
    );
    o.single(
        "telltale_drift_windows_total",
        "counter",
        "Series-windows the drift stage judged.",
        g(&stats.drift_windows),
    );
    o.single(
        "telltale_drift_detected_total",
        "counter",
        "Drift verdicts (series, window, field, method) that found drift.",
        g(&stats.drift_detected),
    );
    o.single(
        "telltale_drift_texts_embedded_total",
        "counter",
        "Texts the drift stage embedded (its budget is in texts per second of traffic).",
        g(&stats.drift_texts_embedded),
    );
    o.single(
        "telltale_drift_judge_seconds",
        "gauge",
        "Time to embed and test the last drift window, all series.",
        g(&stats.drift_judge_us) / 1e6,
    );
    o.single(
        "telltale_alert_notification_delay_seconds",
        "gauge",
        "From a window reaching the alert stage to the delivery of the notification it caused (the last one).",
        g(&stats.alert_notification_delay_ms) / 1e3,
    );
}

/// Renders every telltale metric.
pub fn render(stats: &Stats) -> String {
    let mut o = Out(String::with_capacity(8192));
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    render_alerts(&mut o, stats);

    o.family(
        "telltale_build_info",
        "gauge",
        "telltale's version (always 1).",
    );
    o.sample(
        "telltale_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    o.family(
        "telltale_records_total",
        "counter",
        "Records per stage and outcome: read from the source; decoded into events or rejected; committed after their data was durable.",
    );
    for (stage, outcome, v) in [
        ("source", "read", g(&stats.records_in)),
        ("decode", "event", g(&stats.events_decoded)),
        ("decode", "rejected", g(&stats.records_rejected)),
        ("commit", "committed", g(&stats.records_committed)),
    ] {
        o.sample(
            "telltale_records_total",
            &[("stage", stage), ("outcome", outcome)],
            v,
        );
    }
    o.family(
        "telltale_quality_deferred_total",
        "counter",
        "Deferred quality scorings (LLM judge, command, http) by outcome: scored, failed (after retries), budget_skipped (hourly token budget spent), dropped (queue full).",
    );
    for (outcome, v) in [
        ("scored", g(&stats.quality_deferred_scored)),
        ("failed", g(&stats.quality_deferred_failed)),
        ("budget_skipped", g(&stats.quality_budget_skipped)),
        ("dropped", g(&stats.quality_deferred_dropped)),
    ] {
        o.sample(
            "telltale_quality_deferred_total",
            &[("outcome", outcome)],
            v,
        );
    }
    o.family(
        "telltale_quality_judge_tokens_total",
        "counter",
        "Tokens (prompt + completion) spent on LLM-judge calls; cached verdicts cost none.",
    );
    o.sample(
        "telltale_quality_judge_tokens_total",
        &[],
        g(&stats.quality_judge_tokens),
    );
    o.family(
        "telltale_harvest_runs_total",
        "counter",
        "Harvest runs (failing events → eval dataset versions) by outcome.",
    );
    for (outcome, v) in [
        ("ok", g(&stats.harvest_runs_ok)),
        ("failed", g(&stats.harvest_runs_failed)),
    ] {
        o.sample("telltale_harvest_runs_total", &[("outcome", outcome)], v);
    }
    o.family(
        "telltale_harvest_events_total",
        "counter",
        "Failing production events harvested into the eval dataset (new examples and folded duplicates).",
    );
    o.sample(
        "telltale_harvest_events_total",
        &[],
        g(&stats.harvest_events),
    );
    o.family(
        "telltale_harvest_examples",
        "gauge",
        "Examples in the eval dataset's latest version.",
    );
    o.sample("telltale_harvest_examples", &[], g(&stats.harvest_examples));
    o.family(
        "telltale_experiment_looks_total",
        "counter",
        "Experiment looks taken: one per experiment and evaluated window.",
    );
    o.sample(
        "telltale_experiment_looks_total",
        &[],
        g(&stats.experiment_looks),
    );
    o.family(
        "telltale_experiment_decision",
        "gauge",
        "1 for each experiment's latest decision (keep_running, promote, rollback, invalid).",
    );
    if let Ok(d) = stats.experiment_decisions.lock() {
        for (name, decision) in d.iter() {
            for option in ["keep_running", "promote", "rollback", "invalid"] {
                o.sample(
                    "telltale_experiment_decision",
                    &[("experiment", name), ("decision", option)],
                    if option == *decision { 1.0 } else { 0.0 },
                );
            }
        }
    }
    o.family(
        "telltale_sink_rows_total",
        "counter",
        "Rows made durable in Parquet, per table.",
    );
    for (table, v) in [
        ("events", g(&stats.events_written)),
        ("rejects", g(&stats.rejects_written)),
        ("scores", g(&stats.scores_written)),
        ("metrics", g(&stats.metrics_rows_written)),
    ] {
        o.sample("telltale_sink_rows_total", &[("table", table)], v);
    }
    let singles: [(&str, &str, &str, f64); 12] = [
        (
            "telltale_sink_files_total",
            "counter",
            "Parquet files written.",
            g(&stats.files_written),
        ),
        (
            "telltale_sink_bytes_total",
            "counter",
            "Bytes of Parquet written.",
            g(&stats.bytes_written),
        ),
        (
            "telltale_sink_errors_total",
            "counter",
            "Failed Parquet writes (each is retried).",
            g(&stats.sink_errors),
        ),
        (
            "telltale_commit_failures_total",
            "counter",
            "Offset commits that failed (the batches are redone by the partition's next owner).",
            g(&stats.commit_failures),
        ),
        (
            "telltale_batches_rolled_back_total",
            "counter",
            "Written but uncommitted batches rolled back at partition assignment.",
            g(&stats.batches_rolled_back),
        ),
        (
            "telltale_backpressure_pauses_total",
            "counter",
            "Times the consumer paused because the Parquet writer fell behind.",
            g(&stats.backpressure_pauses),
        ),
        (
            "telltale_late_events_total",
            "counter",
            "Events whose metrics window had already closed (written to events, not to metrics).",
            g(&stats.late_events),
        ),
        (
            "telltale_series_overflowed_total",
            "counter",
            "Events folded into the __other__ series because the live-series cap was reached.",
            g(&stats.series_overflowed),
        ),
        (
            "telltale_live_series",
            "gauge",
            "Series with state in an open window.",
            g(&stats.live_series),
        ),
        (
            "telltale_window_close_delay_seconds",
            "gauge",
            "Wall-clock time from the end of the last closed window to its closing.",
            g(&stats.window_close_delay_ms) / 1000.0,
        ),
        (
            "telltale_source_bytes_total",
            "counter",
            "Bytes of record payload read from the source.",
            g(&stats.bytes_in),
        ),
        (
            "telltale_ready",
            "gauge",
            "1 once the source is consuming (Kafka: partitions assigned).",
            if stats.ready.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        ),
    ];
    for (name, kind, help, v) in singles {
        o.single(name, kind, help, v);
    }

    {
        let lag = stats.lag.lock().unwrap_or_else(|p| p.into_inner());
        o.family(
            "telltale_consumer_lag",
            "gauge",
            "Messages between the partition's high watermark and the consumer's position.",
        );
        for ((topic, partition), v) in lag.iter() {
            let p = partition.to_string();
            o.sample(
                "telltale_consumer_lag",
                &[("topic", topic), ("partition", &p)],
                *v as f64,
            );
        }
    }

    let series = stats.series.lock().unwrap_or_else(|p| p.into_inner());
    o.single(
        "telltale_series_window_end_timestamp_seconds",
        "gauge",
        "End of the window the telltale_series_* gauges describe.",
        series.window_end_ms as f64 / 1000.0,
    );
    type Getter = fn(&super::SeriesGauge) -> Option<f64>;
    let families: [(&str, &str, Getter); 3] = [
        (
            "telltale_series_requests_per_second",
            "Requests per second in the last closed window, per series (busiest series only).",
            |s| Some(s.requests_per_second),
        ),
        (
            "telltale_series_error_ratio",
            "Share of requests that failed in the last closed window.",
            |s| Some(s.error_ratio),
        ),
        (
            "telltale_series_cost_usd_per_minute",
            "Cost per minute in the last closed window.",
            |s| Some(s.cost_usd_per_minute),
        ),
    ];
    for (name, help, get) in families {
        o.family(name, "gauge", help);
        for s in &series.series {
            if let Some(v) = get(s) {
                let l: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                o.sample(name, &l, v);
            }
        }
    }
    o.family(
        "telltale_series_latency_ms",
        "gauge",
        "Latency quantiles in the last closed window, per series.",
    );
    for s in &series.series {
        for (q, v) in [("0.95", s.latency_p95_ms), ("0.99", s.latency_p99_ms)] {
            if let Some(v) = v {
                let mut l: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                l.push(("quantile", q));
                o.sample("telltale_series_latency_ms", &l, v);
            }
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{SeriesGauge, SeriesGauges};

    #[test]
    fn output_parses_as_exposition_format() {
        let stats = Stats::default();
        stats.records_in.store(1234, Ordering::Relaxed);
        stats.late_events.store(3, Ordering::Relaxed);
        stats
            .notifications
            .lock()
            .unwrap()
            .insert(("pager".into(), "ok"), 2);
        stats
            .lag
            .lock()
            .unwrap()
            .insert(("llm-events".into(), 2), 17);
        *stats.series.lock().unwrap() = SeriesGauges {
            window_end_ms: 1_700_000_060_000,
            series: vec![SeriesGauge {
                labels: vec![
                    ("app".into(), "chat \"bot\"\\x".into()),
                    ("model".into(), "gpt-4o\nmini".into()),
                ],
                requests_per_second: 2.5,
                error_ratio: 0.1,
                latency_p95_ms: Some(900.0),
                latency_p99_ms: None,
                cost_usd_per_minute: 0.02,
            }],
        };
        let text = render(&stats);
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        let find = |name: &str| {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .collect::<Vec<_>>()
        };
        let value = |s: &prometheus_parse::Sample| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        };
        let read = find("telltale_records_total");
        let read = read
            .iter()
            .find(|s| s.labels.get("outcome") == Some("read"))
            .unwrap();
        assert_eq!(value(read), 1234.0);
        assert!(matches!(read.value, prometheus_parse::Value::Counter(_)));
        let lag = &find("telltale_consumer_lag")[0];
        assert_eq!(lag.labels.get("partition"), Some("2"));
        assert_eq!(value(lag), 17.0);
        let rps = &find("telltale_series_requests_per_second")[0];
        // The parser keeps escapes as written; a quote left unescaped would have broken the line.
        assert_eq!(rps.labels.get("app"), Some(r#"chat \"bot\"\\x"#));
        assert_eq!(rps.labels.get("model"), Some(r"gpt-4o\nmini"));
        assert_eq!(value(rps), 2.5);
        let lat = find("telltale_series_latency_ms");
        assert_eq!(lat.len(), 1, "a missing quantile is not exported");
        assert_eq!(value(lat[0]), 900.0);
        assert_eq!(value(find("telltale_late_events_total")[0]), 3.0);
        let sent = find("telltale_alert_notifications_total");
        assert_eq!(sent[0].labels.get("receiver"), Some("pager"));
        assert_eq!(sent[0].labels.get("result"), Some("ok"));
        assert_eq!(value(sent[0]), 2.0);
        // Every family is announced once.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let mut names: Vec<_> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(types, names.len());
    }
}
