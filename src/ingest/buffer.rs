//! Per-partition buffers between decode and the sink: records are decoded straight into Arrow
//! builders, and a partition's buffer becomes a [`SinkJob`] when it is big enough, old enough,
//! or when memory for all buffers runs short.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::SinkConfig;
use crate::decode::Decoder;
use crate::event::{EventBatchBuilder, Provenance, SourceRecord};
use crate::metrics::cost::PriceTable;
use crate::metrics::{MetricsOutput, MetricsStage, apply_cost};
use crate::quality::table::ScoreBatchBuilder;
use crate::quality::{Quality, Scored};
use crate::rejects::RejectBatchBuilder;
use crate::sink::SinkJob;
use crate::telemetry::Stats;

const HOUR_MS: i64 = 3_600_000;

struct PartitionBuffer {
    topic: Arc<str>,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    records: u64,
    bytes: u64,
    opened: Instant,
    events: EventBatchBuilder,
    event_hours: Vec<i64>,
    rejects: RejectBatchBuilder,
    reject_hours: Vec<i64>,
    scores: ScoreBatchBuilder,
    score_hours: Vec<i64>,
    deferred: Vec<crate::quality::deferred::Deferred>,
    /// The partition's watermark lane in the metrics stage.
    lane: usize,
    /// Records below this offset were already counted in metrics (a redelivery after the
    /// partition came back to this process); they are still written to `events`.
    counted_until: i64,
}

/// Decodes records into per-partition buffers and cuts them into sink jobs.
pub struct Accumulator {
    decoder: Decoder,
    config: SinkConfig,
    max_raw_bytes: usize,
    /// Whether buffers are also cut by age. Off for file sources, whose cuts must depend on
    /// the input alone so that a rerun writes the same files.
    roll_by_time: bool,
    /// topic → partition → buffer; keyed by `Arc<str>` so lookups borrow the record's topic.
    buffers: HashMap<Arc<str>, HashMap<i32, PartitionBuffer>>,
    buffered_bytes: u64,
    stats: Arc<Stats>,
    /// Counted here and added to `stats` per batch and per tick, not per record.
    unpublished: Counts,
    prices: Option<PriceTable>,
    metrics: Option<MetricsStage>,
    quality: Option<Arc<Quality>>,
    /// Reused per event: the sampled event's verdicts.
    scored: Vec<Scored>,
}

#[derive(Default)]
struct Counts {
    records: u64,
    bytes: u64,
    events: u64,
    rejected: u64,
}

impl Accumulator {
    pub fn new(
        decoder: Decoder,
        config: SinkConfig,
        max_raw_bytes: usize,
        roll_by_time: bool,
        stats: Arc<Stats>,
    ) -> Self {
        Accumulator {
            decoder,
            config,
            max_raw_bytes,
            roll_by_time,
            buffers: HashMap::new(),
            buffered_bytes: 0,
            stats,
            unpublished: Counts::default(),
            prices: None,
            metrics: None,
            quality: None,
            scored: Vec::new(),
        }
    }

    /// Computes missing costs from `prices` (and marks every event's `cost_source`).
    pub fn with_prices(mut self, prices: PriceTable) -> Self {
        self.prices = Some(prices);
        self
    }

    /// Feeds every decoded event to the metrics stage.
    pub fn with_metrics(mut self, metrics: MetricsStage) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Samples and scores events: scores are written with them, and counted in their
    /// metrics windows (the metrics stage must have the same [`Quality`]).
    pub fn with_quality(mut self, quality: Arc<Quality>) -> Self {
        self.quality = Some(quality);
        self
    }

    /// Closes the metrics windows the watermark has passed (`now_ms`: the wall clock, `None`
    /// for event time only).
    pub fn tick_metrics(&mut self, now_ms: Option<i64>) -> Option<MetricsOutput> {
        self.metrics.as_mut()?.tick(now_ms)
    }

    /// Closes every metrics window (end of a finite input).
    pub fn finish_metrics(&mut self) -> Option<MetricsOutput> {
        self.metrics.as_mut()?.finish()
    }

    /// Rebuilds a newly assigned partition's open metrics windows from its committed events.
    pub fn rebuild_metrics(
        &mut self,
        root: &std::path::Path,
        topic: &str,
        partition: i32,
        now_ms: i64,
    ) -> Result<u64, crate::sink::SinkError> {
        let Some(m) = self.metrics.as_mut() else {
            return Ok(0);
        };
        let n = m.rebuild_partition(root, topic, partition, now_ms)?;
        let counted = m.counted(topic, partition);
        if let Some(buf) = self
            .buffers
            .get_mut(topic)
            .and_then(|p| p.get_mut(&partition))
        {
            buf.counted_until = buf.counted_until.max(counted);
        }
        Ok(n)
    }

    /// Decodes and buffers one record; returns the jobs this record completed.
    pub fn push(&mut self, rec: &SourceRecord<'_>, out: &mut Vec<SinkJob>) {
        let size = rec.payload.map_or(0, <[u8]>::len) as u64;
        self.unpublished.records += 1;
        self.unpublished.bytes += size;

        if !self.buffers.contains_key(rec.topic) {
            self.buffers.insert(Arc::from(rec.topic), HashMap::new());
        }
        let parts = self.buffers.get_mut(rec.topic).expect("inserted above");
        let buf = match parts.entry(rec.partition) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let topic: Arc<str> = Arc::from(rec.topic);
                let (lane, counted_until) = match self.metrics.as_mut() {
                    Some(m) => (
                        m.lane(rec.topic, rec.partition),
                        m.counted(rec.topic, rec.partition),
                    ),
                    None => (0, 0),
                };
                v.insert(PartitionBuffer {
                    topic,
                    partition: rec.partition,
                    first_offset: rec.offset,
                    last_offset: rec.offset,
                    records: 0,
                    bytes: 0,
                    opened: Instant::now(),
                    events: EventBatchBuilder::new(),
                    event_hours: Vec::new(),
                    rejects: RejectBatchBuilder::new(self.max_raw_bytes),
                    reject_hours: Vec::new(),
                    scores: ScoreBatchBuilder::new(),
                    score_hours: Vec::new(),
                    deferred: Vec::new(),
                    lane,
                    counted_until,
                })
            }
        };
        if buf.records == 0 {
            buf.first_offset = rec.offset;
            buf.opened = Instant::now();
        }
        buf.last_offset = rec.offset;
        buf.records += 1;
        buf.bytes += size;
        self.buffered_bytes += size;

        match self.decoder.decode(rec.payload, rec.timestamp_ms) {
            Ok(mut d) => {
                apply_cost(&mut d.event, self.prices.as_ref());
                let sampled = match &self.quality {
                    Some(q) => q.assess(&d.event, &mut self.scored),
                    None => None,
                };
                if let (Some(q), Some(reason)) = (&self.quality, sampled) {
                    let before = buf.scores.len();
                    buf.scores
                        .append(&d.event, reason, &self.scored, q.scorers());
                    let hour = d.event.timestamp_ms.div_euclid(HOUR_MS);
                    buf.score_hours
                        .extend(std::iter::repeat_n(hour, buf.scores.len() - before));
                    buf.deferred.extend(q.deferred(&d.event, reason));
                }
                if let Some(m) = self.metrics.as_mut()
                    && rec.offset >= buf.counted_until
                {
                    m.observe_assessed(&d.event, buf.lane, sampled.map(|_| &self.scored[..]));
                    buf.counted_until = rec.offset + 1;
                }
                let src = Provenance {
                    format: d.format,
                    topic: rec.topic,
                    partition: rec.partition,
                    offset: rec.offset,
                };
                buf.events.append(&d.event, &src);
                buf.event_hours
                    .push(d.event.timestamp_ms.div_euclid(HOUR_MS));
                self.unpublished.events += 1;
            }
            Err(err) => {
                buf.rejects.append(rec, &err);
                buf.reject_hours
                    .push(rec.timestamp_ms.unwrap_or(0).div_euclid(HOUR_MS));
                self.unpublished.rejected += 1;
                tracing::debug!(
                    topic = rec.topic,
                    partition = rec.partition,
                    offset = rec.offset,
                    reason = err.reason.code(),
                    "rejected record"
                );
            }
        }

        if buf.bytes >= self.config.roll_size {
            let k = (buf.topic.clone(), buf.partition);
            out.extend(self.cut(&k));
        }
        while self.buffered_bytes > self.config.max_buffered {
            let Some(k) = self.largest() else { break };
            out.extend(self.cut(&k));
        }
    }

    fn all(&self) -> impl Iterator<Item = &PartitionBuffer> {
        self.buffers.values().flat_map(HashMap::values)
    }

    fn largest(&self) -> Option<(Arc<str>, i32)> {
        self.all()
            .filter(|b| b.records > 0)
            .max_by_key(|b| b.bytes)
            .map(|b| (b.topic.clone(), b.partition))
    }

    /// Adds what was counted since the last call to the shared stats.
    pub fn publish(&mut self) {
        let c = std::mem::take(&mut self.unpublished);
        if c.records > 0 {
            self.stats
                .records_in
                .fetch_add(c.records, Ordering::Relaxed);
            self.stats.bytes_in.fetch_add(c.bytes, Ordering::Relaxed);
            self.stats
                .events_decoded
                .fetch_add(c.events, Ordering::Relaxed);
            self.stats
                .records_rejected
                .fetch_add(c.rejected, Ordering::Relaxed);
        }
    }

    fn cut(&mut self, key: &(Arc<str>, i32)) -> Option<SinkJob> {
        self.publish();
        let buf = self.buffers.get_mut(&key.0)?.get_mut(&key.1)?;
        if buf.records == 0 {
            return None;
        }
        self.buffered_bytes -= buf.bytes;
        let job = SinkJob {
            topic: buf.topic.clone(),
            partition: buf.partition,
            first_offset: buf.first_offset,
            last_offset: buf.last_offset,
            records: buf.records,
            bytes: buf.bytes,
            events: buf.events.finish(),
            event_hours: std::mem::take(&mut buf.event_hours),
            rejects: buf.rejects.finish(),
            reject_hours: std::mem::take(&mut buf.reject_hours),
            scores: buf.scores.finish(),
            score_hours: std::mem::take(&mut buf.score_hours),
            deferred: std::mem::take(&mut buf.deferred),
        };
        buf.records = 0;
        buf.bytes = 0;
        Some(job)
    }

    /// Jobs for buffers whose oldest record has waited `roll_interval`.
    pub fn due(&mut self, now: Instant, out: &mut Vec<SinkJob>) {
        self.publish();
        if !self.roll_by_time {
            return;
        }
        let interval = self.config.roll_interval;
        let due: Vec<_> = self
            .all()
            .filter(|b| b.records > 0 && now.saturating_duration_since(b.opened) >= interval)
            .map(|b| (b.topic.clone(), b.partition))
            .collect();
        for k in due {
            out.extend(self.cut(&k));
        }
    }

    /// The job for one partition's buffer, if it holds anything; the buffer is dropped.
    pub fn take_partition(&mut self, topic: &str, partition: i32) -> Option<SinkJob> {
        let topic = self.buffers.get_key_value(topic)?.0.clone();
        let job = self.cut(&(topic.clone(), partition));
        if let Some(parts) = self.buffers.get_mut(&topic)
            && let Some(buf) = parts.remove(&partition)
            && let Some(m) = self.metrics.as_mut()
        {
            m.set_counted(&topic, partition, buf.counted_until);
        }
        job
    }

    /// Jobs for every non-empty buffer.
    pub fn take_all(&mut self, out: &mut Vec<SinkJob>) {
        self.publish();
        let keys: Vec<_> = self.all().map(|b| (b.topic.clone(), b.partition)).collect();
        for k in keys {
            out.extend(self.cut(&k));
        }
    }
}
