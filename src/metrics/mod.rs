//! The metrics stage: per series, per event-time window, HDR histograms of latency, TTFT,
//! tokens and cost, with counts, error rates and sums → the `metrics` table and `/metrics`.
//!
//! In: decoded events (after cost is filled in, [`cost`]). Out: [`MetricsOutput`]s — one
//! Parquet file per closed window and resolution — that the sink's writer makes durable; and
//! the latest window's headline numbers per series in [`Stats`] for Prometheus.
//!
//! ## Windows and roll-ups
//! Fine windows (default 1 min) are [`Windows`] of [`SeriesMetrics`]; when one closes, each
//! series is written as a row and **sealed** (histograms serialized) into the coarse roll-up
//! (default 1 h), which is merged from the sealed minutes, never from events.
//!
//! ## Crash safety: rebuild from `events`, checkpoint only the close position
//! Open windows are not checkpointed. What is persisted is `closed_through` — the end of the
//! last window written to `metrics` — in `<root>/_state/metrics/<stream>.json`, after that
//! window's file is durable. On start (and whenever a partition is assigned) the open windows
//! are rebuilt from the `events` table: every committed event of the partition with a time at
//! or after `closed_through` (the Parquet files of jobs whose manifest is still pending are
//! skipped; Kafka delivers those records again). The open hour is rebuilt by merging the
//! stream's 1-minute rows written since the hour began. Records that Kafka delivers again
//! after a crash fall either into an open window (the rebuild did not see them: they were not
//! durable) or into a closed one (late: they were counted before the window closed), so no
//! event is counted twice or lost. A window written but not yet recorded in the state file is
//! written again after a restart, under the same file name, replacing the first.
//!
//! Within one process the stage remembers, per partition, the offset it has counted up to, so
//! a partition that is revoked and assigned back is not counted twice. Several instances in
//! one consumer group each aggregate their own partitions; a window open while a partition
//! moves between instances is counted by both (the scale-out design merges partials instead,
//! see DESIGN.md "Scale").
//!
//! File sources (backfills) keep no state: every run recomputes the windows of its input from
//! scratch, in input order, closes them all at the end, and writes the same file names, so a
//! rerun replaces its own rows.

pub mod cost;
pub(crate) mod rebuild;
pub mod series;
pub mod table;
pub mod udf;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::RecordBatch;
use tracing::{info, warn};

use crate::event::LlmEvent;
use crate::quality::table::{QualityBatchBuilder, quality_file};
use crate::quality::{Quality, QualityCounts, Scored};
use crate::sink::SinkError;
use crate::telemetry::{SeriesGauge, Stats};
use crate::window::{Closed, Dimension, Rollup, SeriesKey, Slot, WindowConfig, Windows};
use cost::Price;
pub use rebuild::state_body;
use series::{CostSource, SealedMetrics, SeriesMetrics};
use table::MetricsBatchBuilder;

/// The metrics stage's settings (`[metrics]` in a pipeline file).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub window: WindowConfig,
    /// A litellm-format price table.
    pub prices: Option<PathBuf>,
    /// Per-model prices that replace or extend the table's.
    pub price_overrides: BTreeMap<String, Price>,
    /// Series exported as Prometheus gauges (the busiest ones), bounding label cardinality.
    pub exported_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            window: WindowConfig::default(),
            prices: None,
            price_overrides: BTreeMap::new(),
            exported_series: 50,
        }
    }
}

/// `60000` → `1m`, `3600000` → `1h`, `90000` → `90s`.
pub fn resolution_name(ms: i64) -> String {
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Closed windows, ready to be written.
pub struct MetricsOutput {
    pub stream: String,
    /// Paths relative to the data root, each with its rows.
    pub files: Vec<(PathBuf, RecordBatch)>,
    /// Recorded in the stream's state file once the files are durable (`None`: no state).
    pub closed_through: Option<i64>,
    /// The closed minutes' samples for the drift stage (empty when it does not run).
    pub samples: Vec<crate::drift::SampleWindow>,
    /// `quality` table files (paths relative to the data root), written with `files`.
    pub quality_files: Vec<(PathBuf, RecordBatch)>,
}

impl MetricsOutput {
    pub fn rows(&self) -> usize {
        self.files.iter().map(|(_, b)| b.num_rows()).sum()
    }
}

/// Where a stream's close position is recorded.
pub fn state_path(root: &Path, stream: &str) -> PathBuf {
    crate::sink::state_dir(root, "metrics").join(format!("{stream}.json"))
}

/// A name safe in file names: `[A-Za-z0-9_.]`, others become `_`.
pub fn stream_name(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The relative path of one window's file.
pub fn window_file(stream: &str, resolution: &str, start_ms: i64) -> PathBuf {
    PathBuf::from("metrics")
        .join(crate::sink::hour_dir(start_ms.div_euclid(3_600_000)))
        .join(format!("metrics-{stream}-{resolution}-{start_ms}.parquet"))
}

pub struct MetricsStage {
    config: MetricsConfig,
    windows: Windows<SeriesMetrics>,
    rollup: Rollup<SealedMetrics>,
    fine: String,
    coarse: String,
    stream: String,
    persist: bool,
    /// Per partition: its watermark lane and the next offset not yet counted.
    partitions: HashMap<(String, i32), (usize, i64)>,
    stats: Arc<Stats>,
    published_late: u64,
    published_overflow: u64,
    /// Drift sampling: texts kept per series, window and field, and their length cap.
    sampling: Option<(usize, usize)>,
    /// Quality scoring (the ingest path scores; the rebuild scores again).
    quality: Option<Arc<Quality>>,
    quality_rollup: Rollup<QualityCounts>,
    scored: Vec<Scored>,
}

impl MetricsStage {
    /// A stage with no history (file sources, tests, benches). `persist`: whether outputs
    /// carry the close position to record.
    pub fn new(config: MetricsConfig, stream: &str, persist: bool, stats: Arc<Stats>) -> Self {
        Self::with_closed_through(config, stream, persist, i64::MIN, stats)
    }

    fn with_closed_through(
        config: MetricsConfig,
        stream: &str,
        persist: bool,
        closed_through: i64,
        stats: Arc<Stats>,
    ) -> Self {
        let w = config.window.clone();
        MetricsStage {
            fine: resolution_name(w.size_ms),
            coarse: resolution_name(w.rollup_ms),
            windows: Windows::new(w.clone(), closed_through),
            rollup: Rollup::new(w.rollup_ms),
            config,
            stream: stream_name(stream),
            persist,
            partitions: HashMap::new(),
            stats,
            published_late: 0,
            published_overflow: 0,
            sampling: None,
            quality: None,
            quality_rollup: Rollup::new(w.rollup_ms),
            scored: Vec::new(),
        }
    }

    /// A stage that continues a stream: reads its close position and restores the open
    /// roll-up from the stream's fine rows. Open fine windows are rebuilt per partition
    /// ([`MetricsStage::rebuild_partition`]).
    /// With `quality`, the stage also counts scores (as [`MetricsStage::with_quality`]) and
    /// restores the open roll-up of the `quality` table too.
    pub fn open(
        root: &Path,
        config: MetricsConfig,
        stream: &str,
        quality: Option<Arc<Quality>>,
        stats: Arc<Stats>,
    ) -> Result<Self, SinkError> {
        let stream = stream_name(stream);
        let closed_through = rebuild::read_state(&state_path(root, &stream))?;
        let mut stage = Self::with_closed_through(
            config,
            &stream,
            true,
            closed_through.unwrap_or(i64::MIN),
            stats,
        );
        stage.quality = quality;
        if let Some(through) = closed_through {
            let restored = rebuild::restore_rollup(&mut stage, root, through)?;
            info!(stream = %stage.stream, closed_through = %fmt_ms(through), restored_windows = restored, "metrics state restored");
        }
        Ok(stage)
    }

    /// Also samples texts and scalar features per series and window for the drift stage.
    pub fn with_sampling(mut self, drift: &crate::drift::DriftConfig) -> Self {
        self.sampling = Some((drift.samples_per_window, drift.max_text_chars));
        self
    }

    /// Also counts quality scores per series and window (the `quality` table); for a stage
    /// without history (a stage that continues a stream gets it from [`MetricsStage::open`]).
    pub fn with_quality(mut self, quality: Arc<Quality>) -> Self {
        self.quality = Some(quality);
        self
    }

    pub fn quality(&self) -> Option<&Arc<Quality>> {
        self.quality.as_ref()
    }

    /// Whether texts are sampled (the rebuild then reads them back from `events`).
    pub fn samples(&self) -> bool {
        self.sampling.is_some()
    }

    pub fn dimensions(&self) -> &[Dimension] {
        &self.config.window.dimensions
    }

    pub fn windows(&self) -> &Windows<SeriesMetrics> {
        &self.windows
    }

    /// Counts an event in its window (or as late). `lane`: its partition's
    /// [`MetricsStage::lane`]. With quality on, the event is sampled and scored here.
    pub fn observe(&mut self, e: &LlmEvent<'_>, lane: usize) {
        let mut scored = std::mem::take(&mut self.scored);
        let sampled = self.quality.as_ref().and_then(|q| q.assess(e, &mut scored));
        self.observe_assessed(e, lane, sampled.map(|_| &scored[..]));
        self.scored = scored;
    }

    /// [`MetricsStage::observe`] for an event the caller has already sampled and scored
    /// (`scored`: `None` when it was not sampled).
    pub fn observe_assessed(&mut self, e: &LlmEvent<'_>, lane: usize, scored: Option<&[Scored]>) {
        if let Slot::Open(s) = self.windows.slot(e, lane) {
            if let Some(scored) = scored {
                s.quality.get_or_insert_default().observe(scored);
            }
            s.observe(e, e.cost_source.and_then(CostSource::parse));
            if let Some((k, max_chars)) = self.sampling {
                s.sample
                    .get_or_insert_with(|| Box::new(crate::drift::sample::WindowSample::new(k)))
                    .observe(e, max_chars);
            }
        }
    }

    fn partition(&mut self, topic: &str, partition: i32) -> &mut (usize, i64) {
        let n = self.partitions.len();
        self.partitions
            .entry((topic.to_owned(), partition))
            .or_insert((n, 0))
    }

    /// The partition's watermark lane (a dense index).
    pub fn lane(&mut self, topic: &str, partition: i32) -> usize {
        self.partition(topic, partition).0
    }

    /// The next offset of a partition not yet counted (0 when none was).
    pub fn counted(&self, topic: &str, partition: i32) -> i64 {
        self.partitions
            .get(&(topic.to_owned(), partition))
            .map_or(0, |p| p.1)
    }

    pub fn set_counted(&mut self, topic: &str, partition: i32, next: i64) {
        let p = self.partition(topic, partition);
        p.1 = p.1.max(next);
    }

    /// Rebuilds a partition's share of the open windows from its committed `events` files.
    /// Returns the number of events counted.
    pub fn rebuild_partition(
        &mut self,
        root: &Path,
        topic: &str,
        partition: i32,
        now_ms: i64,
    ) -> Result<u64, SinkError> {
        rebuild::rebuild_partition(self, root, topic, partition, now_ms)
    }

    /// Moves time forward (`now_ms`: the wall clock, `None` for event time only); returns
    /// what closed.
    pub fn tick(&mut self, now_ms: Option<i64>) -> Option<MetricsOutput> {
        let closed = self.windows.advance(now_ms);
        self.emit(closed, now_ms, false)
    }

    /// Closes every window, the roll-up included (end of a finite input).
    pub fn finish(&mut self) -> Option<MetricsOutput> {
        let closed = self.windows.close_all();
        self.emit(closed, None, true)
    }

    fn emit(
        &mut self,
        closed: Vec<Closed<SeriesMetrics>>,
        now_ms: Option<i64>,
        all: bool,
    ) -> Option<MetricsOutput> {
        self.publish_counts();
        let mut files = Vec::new();
        let dims = self.config.window.dimensions.clone();
        let mut latest: Option<(i64, Vec<SeriesGauge>)> = None;
        let mut samples = Vec::new();
        let mut quality_files = Vec::new();
        for mut w in closed {
            w.series.sort_by(|a, b| a.0.cmp(&b.0));
            let mut b = MetricsBatchBuilder::new(&dims);
            let mut sealed = Vec::with_capacity(w.series.len());
            let mut gauges = Vec::with_capacity(w.series.len());
            for (key, s) in &mut w.series {
                let seal = s.seal();
                let counters = s.counters.clone();
                let h = s.histograms();
                let hists = [&h[0], &h[1], &h[2], &h[3], &h[4]];
                b.append(
                    &self.fine,
                    w.start_ms,
                    w.end_ms,
                    &self.stream,
                    key,
                    &counters,
                    &hists,
                    &seal.hists,
                );
                gauges.push(gauge(&dims, key, &counters, &h[0], w.end_ms - w.start_ms));
                sealed.push((key.clone(), seal));
            }
            files.push((
                window_file(&self.stream, &self.fine, w.start_ms),
                b.finish(),
            ));
            if let Some(now) = now_ms {
                self.stats
                    .window_close_delay_ms
                    .store((now - w.end_ms).max(0) as u64, Ordering::Relaxed);
            }
            latest = Some((w.end_ms, gauges));
            if self.sampling.is_some() {
                samples.push(crate::drift::SampleWindow {
                    start_ms: w.start_ms,
                    end_ms: w.end_ms,
                    series: w
                        .series
                        .iter_mut()
                        .filter_map(|(k, s)| Some((k.clone(), *s.sample.take()?)))
                        .collect(),
                });
            }
            if let Some(done) = self.rollup.add(w.start_ms, sealed, |a, b| a.merge(&b)) {
                files.push(self.coarse_file(&dims, done));
            }
            if let Some(q) = self.quality.clone() {
                let counts: Vec<(SeriesKey, QualityCounts)> = w
                    .series
                    .iter_mut()
                    .map(|(k, s)| (k.clone(), s.quality.take().map(|b| *b).unwrap_or_default()))
                    .collect();
                let mut b = QualityBatchBuilder::new(&dims);
                for (key, c) in &counts {
                    b.append(
                        &self.fine,
                        w.start_ms,
                        w.end_ms,
                        &self.stream,
                        key,
                        c,
                        q.scorers(),
                    );
                }
                quality_files.push((
                    quality_file(&self.stream, &self.fine, w.start_ms),
                    b.finish(),
                ));
                if let Some(done) = self
                    .quality_rollup
                    .add(w.start_ms, counts, |a, b| a.merge(&b))
                {
                    quality_files.push(self.coarse_quality_file(&dims, &q, done));
                }
            }
        }
        let through = if all {
            i64::MAX
        } else {
            self.windows.closed_through()
        };
        if let Some(done) = self.rollup.close_before(through) {
            files.push(self.coarse_file(&dims, done));
        }
        if let Some(q) = self.quality.clone()
            && let Some(done) = self.quality_rollup.close_before(through)
        {
            quality_files.push(self.coarse_quality_file(&dims, &q, done));
        }
        self.stats
            .live_series
            .store(self.windows.live_series() as u64, Ordering::Relaxed);
        if let Some((end, mut gauges)) = latest {
            gauges.sort_by(|a, b| b.requests_per_second.total_cmp(&a.requests_per_second));
            gauges.truncate(self.config.exported_series);
            let mut g = self.stats.series.lock().unwrap_or_else(|p| p.into_inner());
            g.window_end_ms = end;
            g.series = gauges;
        }
        if files.is_empty() {
            return None;
        }
        Some(MetricsOutput {
            stream: self.stream.clone(),
            files,
            closed_through: self.persist.then(|| self.windows.closed_through()),
            samples,
            quality_files,
        })
    }

    fn coarse_quality_file(
        &self,
        dims: &[Dimension],
        q: &Quality,
        done: Closed<QualityCounts>,
    ) -> (PathBuf, RecordBatch) {
        let mut b = QualityBatchBuilder::new(dims);
        for (key, c) in &done.series {
            b.append(
                &self.coarse,
                done.start_ms,
                done.end_ms,
                &self.stream,
                key,
                c,
                q.scorers(),
            );
        }
        (
            quality_file(&self.stream, &self.coarse, done.start_ms),
            b.finish(),
        )
    }

    fn coarse_file(
        &self,
        dims: &[Dimension],
        done: Closed<SealedMetrics>,
    ) -> (PathBuf, RecordBatch) {
        let mut b = MetricsBatchBuilder::new(dims);
        for (key, s) in &done.series {
            b.append_sealed(
                &self.coarse,
                done.start_ms,
                done.end_ms,
                &self.stream,
                key,
                s,
            );
        }
        (
            window_file(&self.stream, &self.coarse, done.start_ms),
            b.finish(),
        )
    }

    fn publish_counts(&mut self) {
        let late = self.windows.late_events();
        let over = self.windows.overflowed_events();
        self.stats
            .late_events
            .fetch_add(late - self.published_late, Ordering::Relaxed);
        self.stats
            .series_overflowed
            .fetch_add(over - self.published_overflow, Ordering::Relaxed);
        self.published_late = late;
        self.published_overflow = over;
    }

    /// Bytes held by open windows (histograms and counters), for the memory figures.
    pub fn memory_bytes(&self) -> usize {
        let mut n = 0;
        self.windows.for_each_open(|s| n += s.memory_bytes());
        n
    }
}

fn gauge(
    dims: &[Dimension],
    key: &crate::window::SeriesKey,
    c: &series::Counters,
    lat: &hdrhistogram::Histogram<u32>,
    window_ms: i64,
) -> SeriesGauge {
    let q = |p: f64| (!lat.is_empty()).then(|| lat.value_at_quantile(p) as f64);
    let minutes = window_ms as f64 / 60_000.0;
    SeriesGauge {
        labels: dims
            .iter()
            .zip(key.values())
            .map(|(d, v)| (d.column(), v.as_deref().unwrap_or("").to_owned()))
            .collect(),
        requests_per_second: c.events as f64 / (window_ms as f64 / 1000.0),
        error_ratio: c.error_rate(),
        latency_p95_ms: q(0.95),
        latency_p99_ms: q(0.99),
        cost_usd_per_minute: c.cost_nano_usd as f64 / series::NANO_USD / minutes,
    }
}

/// An epoch-milliseconds time as RFC 3339 (the number itself when out of range).
pub fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| ms.to_string())
}

/// Fills in `cost_usd` from the price table when the event has none, and sets `cost_source`.
pub fn apply_cost(e: &mut LlmEvent<'_>, prices: Option<&cost::PriceTable>) {
    if e.cost_usd.is_some() {
        e.cost_source = Some(CostSource::Reported.as_str());
        return;
    }
    if e.input_tokens.is_none() && e.output_tokens.is_none() {
        return;
    }
    match prices.and_then(|p| p.cost(e)) {
        Some(c) => {
            e.cost_usd = Some(c);
            e.cost_source = Some(CostSource::Computed.as_str());
        }
        None => e.cost_source = Some(CostSource::Unknown.as_str()),
    }
}

/// The price table built into the binary (`pipelines/prices.json`): a few common models, in
/// litellm's format. Point `cost.price_table` at litellm's own file for full coverage.
pub const BUILTIN_PRICES: &str = include_str!("../../pipelines/prices.json");

/// Loads the configured price table (the built-in one when none is configured) and applies
/// the overrides.
pub fn load_prices(config: &MetricsConfig) -> Result<cost::PriceTable, cost::PriceError> {
    let mut table = match &config.prices {
        Some(p) => cost::PriceTable::load(p)?,
        None => cost::PriceTable::from_litellm_json(BUILTIN_PRICES).map_err(|message| {
            cost::PriceError::Format {
                path: "built-in price table".into(),
                message,
            }
        })?,
    };
    for (model, price) in &config.price_overrides {
        table.overlay(model, price);
    }
    if table.is_empty() {
        warn!("the price table has no token prices; cost is computed for no model");
    }
    Ok(table)
}

#[cfg(test)]
mod tests;
