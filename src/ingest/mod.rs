//! Sources → decode → per-partition buffers → the sink's writer thread.
//!
//! In: records from a Kafka consumer group ([`kafka`]) or from JSONL files ([`file`]).
//! Out: [`SinkJob`](crate::sink::SinkJob)s on a bounded queue to one writer thread, which makes
//! them durable and only then commits their offsets.
//!
//! Delivery: at-least-once from the source, exactly-once into Parquet (see [`crate::sink`] for
//! the commit protocol). Backpressure: when the writer queue is full the consumer pauses its
//! partitions and keeps polling (so the group session and rebalances are served); it resumes
//! when the queue drains. Bad records never stop ingestion: they become `rejects` rows.
//!
//! Threads: the source runs on the calling (blocking) thread, the writer on its own; neither
//! touches the async runtime.

pub mod buffer;
pub mod file;
pub mod kafka;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{PipelineConfig, SourceConfig};
use crate::sink::SinkError;
use crate::telemetry::{Stats, StatsSnapshot};

pub use crate::event::SourceRecord;
pub use buffer::Accumulator;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no input files match {0:?}")]
    NoFiles(String),
    #[error("invalid file pattern {pattern:?}: {message}")]
    Pattern { pattern: String, message: String },
    #[error("writing Parquet failed: {0}")]
    Sink(#[from] SinkError),
    #[error("the Parquet writer stopped unexpectedly")]
    WriterGone,
    #[error(transparent)]
    Prices(#[from] crate::metrics::cost::PriceError),
    #[error(transparent)]
    Alert(#[from] crate::alert::AlertError),
    #[error("quality: {0}")]
    Quality(String),
}

/// Asks a running pipeline to stop: buffers are flushed, offsets committed, then it returns.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs the pipeline until the source ends (files) or `shutdown` is triggered (Kafka).
/// Blocking: call it from a dedicated thread or `spawn_blocking`.
pub fn run(
    config: &PipelineConfig,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) -> Result<StatsSnapshot, IngestError> {
    match &config.source {
        SourceConfig::Kafka(k) => {
            let harvest = config
                .harvest
                .enabled
                .then(|| crate::harvest::Periodic::start(config.clone(), stats.clone()));
            let done = kafka::run(config, k, stats.clone(), shutdown);
            if let Some(h) = harvest {
                h.stop();
            }
            done?
        }
        SourceConfig::File(f) => {
            file::run(config, &f.path, stats.clone(), shutdown)?;
            // A backfill's failures are harvested once everything it wrote is committed.
            if config.harvest.enabled {
                crate::harvest::once(config, &stats);
            }
        }
    }
    Ok(stats.snapshot())
}
