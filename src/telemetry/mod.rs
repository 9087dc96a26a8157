//! telltale's own observability: logs (tracing) and counters of what the pipeline did.
//!
//! Counters are plain atomics bumped once per batch or per record on paths that already touch
//! the record; `Stats::snapshot` reads them for summaries and (later) the Prometheus endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

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
    pub files_written: u64,
    pub bytes_written: u64,
    pub records_committed: u64,
    pub commit_failures: u64,
    pub sink_errors: u64,
    pub batches_rolled_back: u64,
    pub backpressure_pauses: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            records_in: g(&self.records_in),
            bytes_in: g(&self.bytes_in),
            events_decoded: g(&self.events_decoded),
            records_rejected: g(&self.records_rejected),
            events_written: g(&self.events_written),
            rejects_written: g(&self.rejects_written),
            files_written: g(&self.files_written),
            bytes_written: g(&self.bytes_written),
            records_committed: g(&self.records_committed),
            commit_failures: g(&self.commit_failures),
            sink_errors: g(&self.sink_errors),
            batches_rolled_back: g(&self.batches_rolled_back),
            backpressure_pauses: g(&self.backpressure_pauses),
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
