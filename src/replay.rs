//! `telltale replay`: JSON Lines files (plain or gzip, a glob, or stdin) → a Kafka topic,
//! with an optional rate limit and a progress bar. Lines are sent as they are (blank lines
//! skipped); the producer is idempotent, so broker retries do not duplicate records.

use std::io::BufRead;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::ingest::IngestError;
use crate::ingest::file::{expand, open_lines};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Input(#[from] IngestError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "{failed} of {sent} records were not acknowledged by the broker (first error: {first_error})"
    )]
    Undelivered {
        sent: u64,
        failed: u64,
        first_error: String,
    },
}

/// Counts delivery failures reported by librdkafka's delivery callbacks.
#[derive(Default)]
pub struct DeliveryCounter {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((err, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// An idempotent producer with delivery accounting.
pub fn producer(
    brokers: &str,
    properties: &[(String, String)],
) -> Result<BaseProducer<DeliveryCounter>, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("client.id", "telltale-replay");
    for (k, v) in properties {
        c.set(k, v);
    }
    c.create_with_context(DeliveryCounter::default())
}

/// Sends one record, waiting for queue space when librdkafka's local queue is full.
pub fn send(
    producer: &BaseProducer<DeliveryCounter>,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
) -> Result<(), KafkaError> {
    let mut record = BaseRecord::to(topic).payload(payload);
    if let Some(k) = key {
        record = record.key(k);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for every queued record and reports any that the broker did not acknowledge.
pub fn finish(producer: &BaseProducer<DeliveryCounter>, sent: u64) -> Result<(), ReplayError> {
    producer.flush(Duration::from_secs(120))?;
    let ctx = producer.context();
    let failed = ctx.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first_error = ctx
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        return Err(ReplayError::Undelivered {
            sent,
            failed,
            first_error,
        });
    }
    Ok(())
}

pub struct ReplayOptions {
    pub input: String,
    pub topic: String,
    pub brokers: String,
    /// Records per second; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// A top-level JSON field whose value becomes the record key.
    pub key_field: Option<String>,
    pub properties: Vec<(String, String)>,
    pub progress: bool,
}

#[derive(Debug)]
pub struct ReplayReport {
    pub records: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

fn key_of(line: &[u8], field: &str) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    match v.get(field)? {
        serde_json::Value::String(s) => Some(s.clone().into_bytes()),
        serde_json::Value::Null => None,
        other => Some(other.to_string().into_bytes()),
    }
}

pub fn replay(opts: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    let files = expand(&opts.input)?;
    let producer = producer(&opts.brokers, &opts.properties)?;
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} {human_pos} records ({per_sec}) {msg}",
            )
            .expect("the template is valid"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        Some(b)
    } else {
        None
    };
    let started = Instant::now();
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut line = Vec::new();
    for path in &files {
        if let Some(b) = &bar {
            b.set_message(path.display().to_string());
        }
        let mut reader = open_lines(path)?;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|source| IngestError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let key = opts.key_field.as_deref().and_then(|f| key_of(&line, f));
            send(&producer, &opts.topic, key.as_deref(), &line)?;
            records += 1;
            bytes += line.len() as u64;
            if records.is_multiple_of(1024) {
                producer.poll(Duration::ZERO);
                if let Some(b) = &bar {
                    b.set_position(records);
                }
            }
            if let Some(rate) = opts.rate {
                let due = Duration::from_secs_f64(records as f64 / rate);
                let elapsed = started.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                    producer.poll(Duration::ZERO);
                    if let Some(b) = &bar {
                        b.set_position(records);
                    }
                }
            }
        }
    }
    finish(&producer, records)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(ReplayReport {
        records,
        bytes,
        elapsed: started.elapsed(),
    })
}
