//! telltale's own observability: logs (tracing) and counters of what the pipeline did.
//!
//! Counters are plain atomics bumped once per batch or per record on paths that already touch
//! the record; `Stats::snapshot` reads them for summaries, [`prometheus`] renders them for
//! `/metrics`, served by [`server`].

pub mod prometheus;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters shared by the stages of one pipeline.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records read from the source (valid or not).
    pub records_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Records decoded into events / rejected, counted when decoded.
    pub events_decoded: AtomicU64,
    pub records_rejected: AtomicU64,
    /// Rows that reached Parquet, counted when durable.
    pub events_written: AtomicU64,
    pub rejects_written: AtomicU64,
    /// `scores` rows (quality) made durable with their events.
    pub scores_written: AtomicU64,
    /// Deferred scorers (judge, command, http): scores written, calls that failed after
    /// retries, judge calls skipped by the hourly token budget, sampled events dropped because
    /// the queue was full, judge tokens spent (cache hits cost none).
    pub quality_deferred_scored: AtomicU64,
    pub quality_deferred_failed: AtomicU64,
    pub quality_budget_skipped: AtomicU64,
    pub quality_deferred_dropped: AtomicU64,
    pub quality_judge_tokens: AtomicU64,
    /// Harvest runs by outcome, events harvested, examples in the dataset's latest version.
    pub harvest_runs_ok: AtomicU64,
    pub harvest_runs_failed: AtomicU64,
    pub harvest_events: AtomicU64,
    pub harvest_examples: AtomicU64,
    pub files_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Records whose offsets were committed after their data was durable.
    pub records_committed: AtomicU64,
    pub commit_failures: AtomicU64,
    pub sink_errors: AtomicU64,
    /// Uncommitted batches rolled back at partition assignment.
    pub batches_rolled_back: AtomicU64,
    /// Times the consumer paused because the writer queue was full.
    pub backpressure_pauses: AtomicU64,
    /// Events whose metrics window had already closed.
    pub late_events: AtomicU64,
    /// Events folded into the `__other__` series by the live-series cap.
    pub series_overflowed: AtomicU64,
    /// Series with state in an open window (gauge).
    pub live_series: AtomicU64,
    /// Wall-clock time between the end of the last closed window and its closing (gauge).
    pub window_close_delay_ms: AtomicU64,
    /// `metrics` rows made durable.
    pub metrics_rows_written: AtomicU64,
    /// Set once the source is consuming (Kafka: partitions assigned; files: reading).
    pub ready: AtomicBool,
    /// Consumer lag per (topic, partition), from librdkafka's statistics.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Headline numbers of the busiest series in the last closed window.
    pub series: Mutex<SeriesGauges>,
    /// Alerts pending and firing now (gauges).
    pub alerts_pending: AtomicU64,
    pub alerts_firing: AtomicU64,
    /// Alert transitions into firing and into resolved.
    pub alerts_fired: AtomicU64,
    pub alerts_resolved: AtomicU64,
    /// Delivery attempts per (receiver, result: ok / retrying / gave_up). Receivers are the
    /// configured ones, so the label set is bounded.
    pub notifications: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Time to judge the last closed window against every rule (gauge, microseconds).
    pub alert_evaluation_us: AtomicU64,
    /// From a window reaching the alert stage to its notification's delivery (gauge, ms).
    pub alert_notification_delay_ms: AtomicU64,
    /// Series-windows the drift stage judged, and verdicts that found drift.
    pub drift_windows: AtomicU64,
    pub drift_detected: AtomicU64,
    /// Texts embedded by the drift stage.
    pub drift_texts_embedded: AtomicU64,
    /// Time to judge the last drift window, every series (gauge, microseconds).
    pub drift_judge_us: AtomicU64,
    /// Experiment looks taken (one per experiment and evaluated window).
    pub experiment_looks: AtomicU64,
    /// Each configured experiment's latest decision (bounded by the config).
    pub experiment_decisions: Mutex<BTreeMap<String, &'static str>>,
}

/// The last closed window's numbers for the exported series.
#[derive(Debug, Clone, Default)]
pub struct SeriesGauges {
    pub window_end_ms: i64,
    pub series: Vec<SeriesGauge>,
}

/// One series' numbers in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesGauge {
    /// (dimension column, value), in the configured order.
    pub labels: Vec<(String, String)>,
    pub requests_per_second: f64,
    pub error_ratio: f64,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub cost_usd_per_minute: f64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub records_in: u64,
    pub bytes_in: u64,
    pub events_decoded: u64,
    pub records_rejected: u64,
    pub events_written: u64,
    pub rejects_written: u64,
    pub scores_written: u64,
    pub quality_deferred_scored: u64,
    pub quality_deferred_failed: u64,
    pub quality_budget_skipped: u64,
    pub quality_deferred_dropped: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    pub records_committed: u64,
    pub commit_failures: u64,
    pub sink_errors: u64,
    pub batches_rolled_back: u64,
    pub backpressure_pauses: u64,
    pub late_events: u64,
    pub series_overflowed: u64,
    pub metrics_rows_written: u64,
}

impl Stats {
    /// Records an experiment's latest decision (for `/metrics`).
    pub fn note_experiment(&self, experiment: &str, decision: &'static str) {
        if let Ok(mut d) = self.experiment_decisions.lock() {
            d.insert(experiment.to_owned(), decision);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            records_in: g(&self.records_in),
            bytes_in: g(&self.bytes_in),
            events_decoded: g(&self.events_decoded),
            records_rejected: g(&self.records_rejected),
            events_written: g(&self.events_written),
            rejects_written: g(&self.rejects_written),
            scores_written: g(&self.scores_written),
            quality_deferred_scored: g(&self.quality_deferred_scored),
            quality_deferred_failed: g(&self.quality_deferred_failed),
            quality_budget_skipped: g(&self.quality_budget_skipped),
            quality_deferred_dropped: g(&self.quality_deferred_dropped),
            files_written: g(&self.files_written),
            bytes_written: g(&self.bytes_written),
            records_committed: g(&self.records_committed),
            commit_failures: g(&self.commit_failures),
            sink_errors: g(&self.sink_errors),
            batches_rolled_back: g(&self.batches_rolled_back),
            backpressure_pauses: g(&self.backpressure_pauses),
            late_events: g(&self.late_events),
            series_overflowed: g(&self.series_overflowed),
            metrics_rows_written: g(&self.metrics_rows_written),
        }
    }
}

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), logs go to stderr.
pub fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
