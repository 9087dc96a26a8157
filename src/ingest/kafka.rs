//! The Kafka source: one member of a consumer group.
//!
//! Offsets are never committed by librdkafka (`enable.auto.commit=false`): the writer thread
//! commits `last + 1` of a batch only after its Parquet files are renamed into place.
//!
//! Rebalances (eager or cooperative): before partitions are revoked, their buffers are cut
//! into jobs and the revoke callback waits until the writer has made every queued job durable
//! and committed, so the next owner starts exactly where this one stopped. When a partition is
//! assigned, the first record's offset is the resume position; batches written at or after it
//! but never committed (a crash between rename and commit) are rolled back before anything
//! new is buffered for that partition ([`Sink::recover`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError, bounded};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::{Accumulator, IngestError, Shutdown, SourceRecord};
use crate::alert::AlertStage;
use crate::config::{KafkaSourceConfig, PipelineConfig};
use crate::decode::Decoder;
use crate::drift::DriftStage;
use crate::metrics::{MetricsStage, load_prices, stream_name};
use crate::sink::{Committer, Sink, SinkJob, SinkMsg, run_writer};
use crate::telemetry::Stats;

/// How long a revoke waits for queued batches to become durable before giving the partitions
/// up anyway (their next owner then rolls back what was not committed).
const REVOKE_FLUSH_TIMEOUT: Duration = Duration::from_secs(120);

struct Core {
    acc: Accumulator,
    tx: Option<Sender<SinkMsg>>,
    /// Jobs cut since the last tick; they leave together, as one commit group, at the tick or
    /// as soon as they hold `group_bytes`, so that memory stays bounded between ticks.
    pending: Vec<SinkJob>,
    pending_bytes: u64,
    group_bytes: u64,
    /// Groups (and closed metrics windows) waiting for room in the writer queue, in order.
    outbox: VecDeque<SinkMsg>,
    paused: bool,
    /// Partitions assigned since the last record seen from them: recovery pending.
    unrecovered: HashSet<(String, i32)>,
}

impl Core {
    /// Moves the jobs cut since the last tick into the outbox as one group.
    fn seal(&mut self) {
        self.pending_bytes = 0;
        if !self.pending.is_empty() {
            let group = std::mem::take(&mut self.pending);
            self.outbox.push_back(SinkMsg::Jobs(group));
        }
    }

    /// Queues the metrics windows the watermark has passed.
    fn tick_metrics(&mut self) {
        let now = chrono::Utc::now().timestamp_millis();
        if let Some(out) = self.acc.tick_metrics(Some(now)) {
            self.outbox.push_back(SinkMsg::Metrics(out));
        }
    }

    /// Sends queued groups without blocking; false when the writer is gone.
    fn drain(&mut self) -> bool {
        let Some(tx) = &self.tx else { return false };
        while let Some(msg) = self.outbox.pop_front() {
            match tx.try_send(msg) {
                Ok(()) => {}
                Err(TrySendError::Full(msg)) => {
                    self.outbox.push_front(msg);
                    break;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends everything cut so far (blocking) and waits until the writer has made it durable
    /// and committed.
    fn flush_and_wait(&mut self, timeout: Duration) -> bool {
        self.seal();
        let Some(tx) = &self.tx else { return false };
        for msg in self.outbox.drain(..) {
            if tx.send(msg).is_err() {
                return false;
            }
        }
        let (ack_tx, ack_rx) = bounded(1);
        if tx.send(SinkMsg::Barrier(ack_tx)).is_err() {
            return false;
        }
        ack_rx.recv_timeout(timeout).is_ok()
    }
}

struct Ctx {
    core: Mutex<Core>,
    sink: Sink,
    root: std::path::PathBuf,
    stats: Arc<Stats>,
}

impl Ctx {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock already aborts the pipeline; the data is still valid.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => warn!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, "kafka client error: {reason}");
    }

    /// librdkafka's periodic statistics: the consumer lag per partition, for `/metrics`.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = self.stats.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.clear();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: the internal unassigned partition, or a lag librdkafka does not know yet.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.insert((topic.clone(), *partition), p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut core = self.core();
        let started = Instant::now();
        for elem in tpl.elements() {
            if let Some(job) = core.acc.take_partition(elem.topic(), elem.partition()) {
                core.pending.push(job);
            }
        }
        if core.tx.is_none() {
            return;
        }
        if core.flush_and_wait(REVOKE_FLUSH_TIMEOUT) {
            info!(partitions = tpl.count(), elapsed = ?started.elapsed(), "partitions revoked after their batches were committed");
        } else {
            error!(
                partitions = tpl.count(),
                "partitions revoked before their batches were durable; the next owner will redo them"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut core = self.core();
                core.paused = false;
                let now = chrono::Utc::now().timestamp_millis();
                for elem in tpl.elements() {
                    core.unrecovered
                        .insert((elem.topic().to_owned(), elem.partition()));
                    // Open metrics windows hold this partition's committed events too: count
                    // them again from `events` (once per process; see crate::metrics).
                    if let Err(err) =
                        core.acc
                            .rebuild_metrics(&self.root, elem.topic(), elem.partition(), now)
                    {
                        error!(topic = elem.topic(), partition = elem.partition(), error = %err, "cannot rebuild open metrics windows from events; they will undercount");
                    }
                }
                self.stats.ready.store(true, Ordering::Relaxed);
                info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => warn!(error = %err, "rebalance error"),
        }
    }
}

struct KafkaCommitter(Arc<BaseConsumer<Ctx>>);

impl Committer for KafkaCommitter {
    fn commit(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| e.to_string())?;
        }
        self.0
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| e.to_string())
    }
}

/// The librdkafka configuration telltale uses, with the user's pass-through properties.
pub fn client_config(k: &KafkaSourceConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.start_from)
        .set("enable.partition.eof", "false")
        // Bounds memory under a large backlog: librdkafka prefetches at most this much…
        .set("queued.max.messages.kbytes", "16384")
        // …and, once that is reached, retries the fetch after 10 ms instead of the default
        // 1 s (measured: the default stalled a 64-partition backlog at ~12 k events/s).
        .set("fetch.queue.backoff.ms", "10")
        // Consumer lag per partition for /metrics comes from the statistics callback.
        .set("statistics.interval.ms", "5000")
        .set("client.id", "telltale");
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

pub fn run(
    config: &PipelineConfig,
    k: &KafkaSourceConfig,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) -> Result<(), IngestError> {
    let kerr = |context: &str| {
        let context = context.to_owned();
        move |source| IngestError::Kafka { context, source }
    };
    let (tx, rx) = bounded(config.sink.queue_depth);
    let sink = Sink::new(&config.data_root, config.sink.clone());
    let mut acc = Accumulator::new(
        Decoder::new(config.decode.clone()),
        config.sink.clone(),
        config.rejects.max_raw_bytes,
        true,
        stats.clone(),
    )
    .with_prices(load_prices(&config.metrics)?);
    let drift_on = config.metrics.enabled && config.drift.enabled;
    let quality = config
        .quality
        .enabled()
        .then(|| crate::quality::Quality::new(config.quality.clone()));
    if let Some(q) = &quality {
        acc = acc.with_quality(q.clone());
    }
    if config.metrics.enabled {
        let mut m = MetricsStage::open(
            &config.data_root,
            config.metrics.clone(),
            &k.group_id,
            quality.clone(),
            stats.clone(),
        )?;
        if drift_on {
            m = m.with_sampling(&config.drift);
        }
        acc = acc.with_metrics(m);
    }
    let ctx = Ctx {
        core: Mutex::new(Core {
            acc,
            tx: Some(tx),
            outbox: VecDeque::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            group_bytes: config.sink.roll_size,
            paused: false,
            unrecovered: HashSet::new(),
        }),
        sink: sink.clone(),
        root: config.data_root.clone(),
        stats: stats.clone(),
    };
    let consumer: Arc<BaseConsumer<Ctx>> = Arc::new(
        client_config(k)
            .create_with_context(ctx)
            .map_err(kerr("cannot create consumer"))?,
    );
    let topics: Vec<&str> = k.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(kerr("cannot subscribe"))?;
    info!(brokers = %k.brokers, topics = ?k.topics, group = %k.group_id, root = %config.data_root.display(), "consuming");

    // Alerts judge the windows the writer makes durable.
    let alerts = if config.alerting.enabled && config.metrics.enabled {
        let ctx = crate::alert::pipeline_rule_context(config);
        Some(AlertStage::start(
            &config.alerting,
            &ctx,
            &config.data_root,
            &stream_name(&k.group_id),
            stats.clone(),
        )?)
    } else {
        None
    };
    let frames = alerts.as_ref().map(AlertStage::sender);
    // Drift judges the minutes' samples once their metrics are durable.
    let drift = if drift_on {
        Some(DriftStage::start(
            config.drift.clone(),
            &config.metrics.window.dimensions,
            &config.data_root,
            &stream_name(&k.group_id),
            config.sink.clone(),
            frames.clone(),
            stats.clone(),
        )?)
    } else {
        None
    };
    let samples = drift.as_ref().map(DriftStage::sender);
    // Experiments evaluate the windows the metrics stage closed, once they have settled.
    let experiments = if config.experiments.enabled() && config.metrics.enabled {
        Some(crate::experiment::ExperimentStage::start(
            config.experiments.clone(),
            &config.data_root,
            &stream_name(&k.group_id),
            config.sink.clone(),
            frames.clone(),
            stats.clone(),
        )?)
    } else {
        None
    };
    let closed = experiments
        .as_ref()
        .map(crate::experiment::ExperimentStage::sender);
    // Deferred scorers (judge, command, http) score committed jobs' samples off this path;
    // the same stage scores the events drift names as outliers.
    let outliers = drift_on && config.quality.always_drift_outliers;
    let deferred = match &quality {
        Some(q) if q.has_deferred() || outliers => Some(
            crate::quality::deferred::DeferredStage::start(
                q.clone(),
                &config.data_root,
                &stream_name(&k.group_id),
                config.metrics.window.clone(),
                frames.clone(),
                false,
                outliers,
                config.sink.clone(),
                Some(load_prices(&config.metrics)?),
                stats.clone(),
            )
            .map_err(IngestError::Quality)?,
        ),
        _ => None,
    };
    // Jobs go to the stage only when it has scorers to run on them.
    let deferred_tx = deferred
        .as_ref()
        .filter(|_| quality.as_ref().is_some_and(|q| q.has_deferred()))
        .map(|d| d.sender());

    let committer = Arc::new(KafkaCommitter(consumer.clone()));
    let writer_stats = stats.clone();
    let writer_shutdown = shutdown.clone();
    let writer = thread::Builder::new()
        .name("telltale-writer".into())
        .spawn(move || {
            run_writer(
                rx,
                sink,
                committer,
                writer_stats,
                &|| !writer_shutdown.is_triggered(),
                &|mut out| {
                    if let Some(f) = &frames {
                        f.send_metrics(&out);
                    }
                    if let Some(d) = &samples {
                        d.send(std::mem::take(&mut out.samples));
                    }
                    if let (Some(x), Some(t)) = (&closed, out.closed_through) {
                        x.closed_through(t);
                    }
                },
                &|job| {
                    if let Some(d) = &deferred_tx {
                        d.submit(crate::quality::deferred::DeferredJob::of(job));
                    }
                },
            )
        })
        .map_err(|e| IngestError::Io {
            path: "writer thread".into(),
            source: e,
        })?;

    let result = consume(&consumer, &shutdown);

    // Shutdown: cut every buffer, make it durable and committed, then stop the writer.
    let flushed = {
        let mut core = consumer.context().core();
        let core = &mut *core;
        core.acc.take_all(&mut core.pending);
        core.seal();
        // Windows the watermark has passed are written; open ones are rebuilt on restart.
        core.tick_metrics();
        let ok = core.tx.is_some() && core.flush_and_wait(Duration::from_secs(600));
        core.tx = None;
        ok
    };
    let writer_result = writer.join().unwrap_or(Err(crate::sink::SinkError::Io {
        path: "writer thread".into(),
        source: std::io::Error::other("writer thread panicked"),
    }));
    // The writer is done: the last windows reached the drift and alert stages; drift judges
    // what it can, then alerts deliver and stop.
    if let Some(d) = drift {
        d.stop();
    }
    if let Some(d) = deferred {
        d.stop(Duration::from_secs(10));
    }
    if let Some(x) = experiments {
        x.stop();
    }
    if let Some(a) = alerts {
        a.stop();
    }
    result?;
    writer_result?;
    if !flushed {
        return Err(IngestError::WriterGone);
    }
    info!(
        committed = stats.records_committed.load(Ordering::Relaxed),
        "stopped after committing everything consumed"
    );
    // Dropping the last handle closes the consumer and leaves the group.
    drop(consumer);
    Ok(())
}

fn consume(consumer: &BaseConsumer<Ctx>, shutdown: &Shutdown) -> Result<(), IngestError> {
    let ctx = consumer.context();
    let mut last_error: Option<(String, Instant)> = None;
    let mut next_roll_check = Instant::now();
    while !shutdown.is_triggered() {
        {
            let mut core = ctx.core();
            if !core.drain() {
                return Err(IngestError::WriterGone);
            }
            let backlog = !core.outbox.is_empty();
            if backlog != core.paused {
                let assignment = consumer.assignment().map_err(|source| IngestError::Kafka {
                    context: "assignment".into(),
                    source,
                })?;
                let r = if backlog {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                };
                match r {
                    Ok(()) => {
                        core.paused = backlog;
                        if backlog {
                            ctx.stats
                                .backpressure_pauses
                                .fetch_add(1, Ordering::Relaxed);
                            debug!("writer queue full; partitions paused");
                        }
                    }
                    Err(err) => warn!(error = %err, "failed to pause/resume partitions"),
                }
            }
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => {
                let mut core = ctx.core();
                let topic = m.topic();
                let partition = m.partition();
                if !core.unrecovered.is_empty()
                    && core.unrecovered.remove(&(topic.to_owned(), partition))
                {
                    let rolled = ctx.sink.recover(topic, partition, Some(m.offset()))?;
                    ctx.stats
                        .batches_rolled_back
                        .fetch_add(rolled as u64, Ordering::Relaxed);
                }
                let rec = SourceRecord {
                    topic,
                    partition,
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key(),
                    payload: m.payload(),
                };
                let core = &mut *core;
                let before = core.pending.len();
                core.acc.push(&rec, &mut core.pending);
                if core.pending.len() > before {
                    core.pending_bytes +=
                        core.pending[before..].iter().map(|j| j.bytes).sum::<u64>();
                    if core.pending_bytes >= core.group_bytes {
                        core.seal();
                    }
                }
            }
            Some(Err(err)) => {
                // Transient broker errors repeat on every poll; log each distinct one every 10 s.
                let text = err.to_string();
                let quiet = last_error
                    .as_ref()
                    .is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(10));
                if !quiet {
                    warn!(error = %text, "kafka consumer error");
                    last_error = Some((text, Instant::now()));
                }
            }
        }
        let now = Instant::now();
        if now >= next_roll_check {
            let mut core = ctx.core();
            let core = &mut *core;
            core.acc.due(now, &mut core.pending);
            core.seal();
            core.tick_metrics();
            next_roll_check = now + Duration::from_millis(100);
        }
    }
    Ok(())
}
