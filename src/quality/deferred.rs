//! The deferred stage: scorers that call a model or another process (`llm_judge`, `command`,
//! `http`) run here, off the ingest path, on the sampled events of jobs that are already
//! durable and committed.
//!
//! In: per committed [`SinkJob`](crate::sink::SinkJob), the [`Deferred`] items the ingest
//! path sampled. Out: `scores` rows in `scores/date=…/hour=…/deferred-<topic>-<partition>-
//! <first>-<last>.parquet`, one file per job and hour, named after the job like its events.
//!
//! Ingestion never waits: at most `quality.deferred_queue` items wait here; beyond, a job's
//! items are dropped and counted (`telltale_quality_deferred_total{outcome="dropped"}`).
//!
//! ## Crash safety
//! Jobs are processed in the order they were committed. After a job's files are durable the
//! stage records, per partition, the last offset it has scored (`_state/quality/
//! <stream>.json`). On start, every committed `events` file of a recorded partition past that
//! offset is read back, sampled again (the sampler depends on the event alone) and scored
//! before new work: a job scored before a crash but not recorded is scored again and its file
//! replaced (same name), so no score is lost or duplicated, and the judge cache means the
//! model is not paid twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use tracing::{info, warn};

use super::custom::{self, CommandScorer};
use super::judge::{JudgeCache, JudgeClient};
use super::scorer::{Case, Check, Score};
use super::table::{JudgeUsage, ScoreBatchBuilder};
use super::{Quality, QualityCounts, SampleReason, ScorerDef};
use crate::config::SinkConfig;
use crate::event::LlmEvent;
use crate::sink::{
    SinkError, Table, fsync_dir, hour_dir, state_dir, write_durably, write_into_place,
};
use crate::telemetry::Stats;

/// One sampled event waiting for its deferred scorers (owned: it outlives the ingest batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Deferred {
    pub event: LlmEvent<'static>,
    pub reason: SampleReason,
    /// Indices of the scorers to run.
    pub scorers: Vec<usize>,
}

impl Quality {
    /// The deferred work for a sampled event, if any of its deferred scorers applies.
    pub fn deferred(&self, e: &LlmEvent<'_>, reason: SampleReason) -> Option<Deferred> {
        let u = super::sample_point(&e.event_id);
        let scorers: Vec<usize> = self
            .config
            .scorers
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.check.is_deferred()
                    && (reason != SampleReason::Rate || s.sample_rate.is_none_or(|r| u < r))
                    && super::event_matches(&s.when, e)
                    && e.output.is_some()
            })
            .map(|(i, _)| i)
            .collect();
        if scorers.is_empty() {
            return None;
        }
        // Only what scorers and score rows read.
        let event = LlmEvent {
            event_id: e.event_id.to_string().into(),
            timestamp_ms: e.timestamp_ms,
            app: e.app.as_ref().map(|v| v.to_string().into()),
            environment: e.environment.as_ref().map(|v| v.to_string().into()),
            model: e.model.as_ref().map(|v| v.to_string().into()),
            prompt_id: e.prompt_id.as_ref().map(|v| v.to_string().into()),
            prompt_version: e.prompt_version.as_ref().map(|v| v.to_string().into()),
            variant: e.variant.as_ref().map(|v| v.to_string().into()),
            experiment: e.experiment.as_ref().map(|v| v.to_string().into()),
            input: e.input.as_ref().map(|v| v.to_string().into()),
            output: e.output.as_ref().map(|v| v.to_string().into()),
            expected: e.expected.as_ref().map(|v| v.to_string().into()),
            // The context for faithfulness, and any attribute a series dimension names.
            attributes: e
                .attributes
                .iter()
                .map(|(k, v)| (k.to_string().into(), v.to_string().into()))
                .collect(),
            status: e.status.to_string().into(),
            ..Default::default()
        };
        Some(Deferred {
            event,
            reason,
            scorers,
        })
    }

    /// Whether any scorer is deferred (the stage then runs).
    pub fn has_deferred(&self) -> bool {
        self.config.scorers.iter().any(|s| s.check.is_deferred())
    }
}

/// A committed job's deferred items.
pub struct DeferredJob {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    /// The newest event time of the job (all its events, sampled or not): moves the stage's
    /// watermark.
    pub max_event_ms: Option<i64>,
    pub items: Vec<Deferred>,
}

impl DeferredJob {
    /// Takes a committed job's deferred items.
    pub fn of(job: &mut crate::sink::SinkJob) -> DeferredJob {
        use arrow::array::AsArray;
        let max_event_ms = job
            .events
            .column_by_name("timestamp")
            .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>())
            .and_then(arrow::compute::max);
        DeferredJob {
            topic: job.topic.to_string(),
            partition: job.partition,
            first_offset: job.first_offset,
            last_offset: job.last_offset,
            max_event_ms,
            items: std::mem::take(&mut job.deferred),
        }
    }
}

/// The file a job's deferred scores of one hour go to (relative to the data root).
pub fn deferred_file(topic: &str, partition: i32, first: i64, last: i64, hour: i64) -> PathBuf {
    PathBuf::from("scores").join(hour_dir(hour)).join(format!(
        "deferred-{topic}-{partition}-{first}-{last}.parquet"
    ))
}

fn state_path(root: &Path, stream: &str) -> PathBuf {
    state_dir(root, "quality").join(format!("{stream}.json"))
}

/// Counts per series (its dimension values) in one window.
type SeriesCounts = BTreeMap<Vec<Option<String>>, QualityCounts>;

/// What the stage checkpoints after every job, atomically: the offsets scored, and the
/// windows those scores went into — open ones with their counts — so a job scored again
/// after a crash adds its counts to the windows as they were before it, once.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct State {
    /// Per partition (`topic/partition`), the last offset whose deferred scores are durable.
    scored_through: BTreeMap<String, i64>,
    /// Per partition, the newest event time of its scored jobs.
    #[serde(default)]
    lanes: BTreeMap<String, i64>,
    /// Every window ending at or before this is written.
    #[serde(default = "min_ms")]
    closed_through: i64,
    #[serde(default, with = "windows_as_list")]
    windows: BTreeMap<i64, SeriesCounts>,
    #[serde(default, with = "windows_as_list")]
    rollup: BTreeMap<i64, SeriesCounts>,
    /// Start of the last drift window whose outliers are scored.
    #[serde(default = "min_ms")]
    outliers_through: i64,
}

fn min_ms() -> i64 {
    i64::MIN
}

/// JSON maps need string keys: windows are written as `[[start, [[series, counts], …]], …]`.
mod windows_as_list {
    use super::{QualityCounts, SeriesCounts};
    use std::collections::BTreeMap;
    type List = Vec<(i64, Vec<(Vec<Option<String>>, QualityCounts)>)>;
    pub fn serialize<S: serde::Serializer>(
        w: &BTreeMap<i64, SeriesCounts>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let list: List = w
            .iter()
            .map(|(k, v)| (*k, v.iter().map(|(a, b)| (a.clone(), b.clone())).collect()))
            .collect();
        serde::Serialize::serialize(&list, s)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<i64, SeriesCounts>, D::Error> {
        let list: List = serde::Deserialize::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect())
    }
}

fn read_state(path: &Path) -> State {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<State>(&t).ok())
        .unwrap_or(State {
            closed_through: i64::MIN,
            outliers_through: i64::MIN,
            ..State::default()
        })
}

/// Partitions the stage has been handed jobs of, each with the offset before its first job:
/// written by the sender (the writer thread) the first time it sees a partition, so that
/// jobs queued but not yet scored when the process dies are found again even for a partition
/// the stage had not yet recorded anything for.
type Registry = Arc<std::sync::Mutex<(PathBuf, BTreeMap<String, i64>)>>;

fn registry_path(root: &Path, stream: &str) -> PathBuf {
    state_dir(root, "quality").join(format!("{stream}.partitions.json"))
}

/// Sends committed jobs to the stage; cheap to clone.
#[derive(Clone)]
pub struct DeferredSender {
    tx: Sender<DeferredJob>,
    queued: Arc<AtomicUsize>,
    cap: usize,
    stats: Arc<Stats>,
    registry: Option<Registry>,
}

impl DeferredSender {
    /// Hands over a committed job's items; drops them (counted) when the queue is full.
    pub fn submit(&self, mut job: DeferredJob) {
        if let Some(r) = &self.registry {
            let mut g = r.lock().unwrap_or_else(|p| p.into_inner());
            let key = format!("{}/{}", job.topic, job.partition);
            if let std::collections::btree_map::Entry::Vacant(v) = g.1.entry(key) {
                v.insert(job.first_offset - 1);
                let body = serde_json::to_string(&g.1).expect("offsets serialize");
                let written =
                    g.0.parent()
                        .map_or(Ok(()), |d| {
                            std::fs::create_dir_all(d).map_err(crate::sink::io_err(d))
                        })
                        .and_then(|_| write_durably(&g.0, body.as_bytes()));
                if let Err(e) = written {
                    warn!(error = %e, "cannot record a new partition for deferred scoring");
                }
            }
        }
        let n = job.items.len();
        if self.queued.load(Ordering::Relaxed) + n > self.cap {
            self.stats
                .quality_deferred_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            job.items.clear();
        }
        self.queued.fetch_add(job.items.len(), Ordering::Relaxed);
        // The job still goes, empty: the stage records its offsets as scored.
        let _ = self.tx.send(job);
    }
}

pub struct DeferredStage {
    sender: Option<DeferredSender>,
    thread: Option<JoinHandle<()>>,
    stop_now: Arc<AtomicBool>,
}

/// What the stage's thread needs.
struct Worker {
    quality: Arc<Quality>,
    root: PathBuf,
    state_path: PathBuf,
    st: State,
    stream: String,
    window: crate::window::WindowConfig,
    frames: Option<crate::alert::FrameSender>,
    /// Close every window when the input ends (file sources).
    finish: bool,
    /// Score drift outliers (the drift table's explanations) as they are judged.
    outliers: bool,
    /// Wall clock of each partition's last job: partitions quiet for longer than the
    /// lateness stop holding the watermark back.
    lane_seen: std::collections::HashMap<String, Instant>,
    sink: SinkConfig,
    stats: Arc<Stats>,
    judge: Option<JudgeClient>,
    commands: Vec<Option<CommandScorer>>,
    http: reqwest::Client,
    prices: Option<crate::metrics::cost::PriceTable>,
    queued: Arc<AtomicUsize>,
    /// The clock hour the budget counts, and the judge tokens spent (and reserved) in it.
    budget_hour: u64,
    spent: AtomicU64,
    /// Tokens of the last verdict bought: what a new call reserves from the budget.
    last_tokens: AtomicU64,
}

impl DeferredStage {
    /// Starts the stage: opens the judge client and cache, reads what was scored before, and
    /// queues the committed jobs scored after that for scoring again. Windows follow
    /// `window` (the metrics windows); closed ones go to `frames` (alert rules); `finish`
    /// closes every window when the input ends (file sources).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        quality: Arc<Quality>,
        root: &Path,
        stream: &str,
        window: crate::window::WindowConfig,
        frames: Option<crate::alert::FrameSender>,
        finish: bool,
        outliers: bool,
        sink: SinkConfig,
        prices: Option<crate::metrics::cost::PriceTable>,
        stats: Arc<Stats>,
    ) -> Result<DeferredStage, String> {
        let cfg = quality.config();
        let needs_judge = cfg
            .scorers
            .iter()
            .any(|s| matches!(s.check, Check::Judge(_)));
        let judge = if needs_judge {
            let path = cfg
                .judge_cache
                .clone()
                .unwrap_or_else(|| state_dir(root, "quality").join("judge-cache.jsonl"));
            let cache = JudgeCache::open(&path)
                .map_err(|e| format!("judge cache {}: {e}", path.display()))?;
            info!(path = %path.display(), verdicts = cache.len(), model = %cfg.judge.model, "judge cache opened");
            Some(JudgeClient::new(cfg.judge.clone(), Some(cache)).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let commands = cfg
            .scorers
            .iter()
            .map(|s| match &s.check {
                Check::Command { argv, timeout } => {
                    Some(CommandScorer::new(argv.clone(), *timeout))
                }
                _ => None,
            })
            .collect();
        let state = state_path(root, stream);
        // A file source recomputes everything on every run (as its metrics do); a stream
        // continues from its checkpoint.
        let mut st = if finish {
            State {
                closed_through: i64::MIN,
                outliers_through: i64::MIN,
                ..State::default()
            }
        } else {
            read_state(&state)
        };
        let (tx, rx) = unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        // Streams only: a file source rescores its whole input on every run.
        let registry = (!finish).then(|| {
            let path = registry_path(root, stream);
            let known: BTreeMap<String, i64> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            Arc::new(std::sync::Mutex::new((path, known)))
        });
        // Where each partition's scoring resumes: its recorded offset, else the offset before
        // the first job it was handed.
        let mut resume = st.scored_through.clone();
        if let Some(r) = &registry {
            for (k, v) in &r.lock().unwrap_or_else(|p| p.into_inner()).1 {
                resume.entry(k.clone()).or_insert(*v);
            }
        }
        let sender = DeferredSender {
            tx,
            queued: queued.clone(),
            cap: cfg.deferred_queue,
            stats: stats.clone(),
            registry,
        };
        let recovered = recover(&quality, root, &resume, &sender)
            .map_err(|e| format!("reading back events to score: {e}"))?;
        if recovered > 0 {
            info!(
                events = recovered,
                "sampled events committed after the last scored offset read back from events for deferred scoring"
            );
        }
        // Every known partition holds the watermark (for up to the lateness, in wall time)
        // until its jobs arrive: recovered jobs of one partition must not close the windows
        // another partition's recovered jobs still fill.
        let mut lane_seen = std::collections::HashMap::new();
        for k in resume.keys() {
            st.lanes.entry(k.clone()).or_insert(i64::MIN);
            lane_seen.insert(k.clone(), Instant::now());
        }
        let stop_now = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            quality,
            root: root.to_owned(),
            state_path: state,
            st,
            stream: stream.to_owned(),
            window,
            frames,
            finish,
            outliers,
            lane_seen,
            sink,
            stats,
            judge,
            commands,
            http: reqwest::Client::new(),
            prices,
            queued,
            budget_hour: 0,
            spent: AtomicU64::new(0),
            last_tokens: AtomicU64::new(500),
        };
        let stop = stop_now.clone();
        let thread = std::thread::Builder::new()
            .name("quality-deferred".into())
            .spawn(move || worker.run(rx, &stop))
            .map_err(|e| e.to_string())?;
        Ok(DeferredStage {
            sender: Some(sender),
            thread: Some(thread),
            stop_now,
        })
    }

    pub fn sender(&self) -> DeferredSender {
        self.sender.clone().expect("taken only by stop")
    }

    /// Lets the stage finish what is queued, for at most `grace`; what is left is scored
    /// after the next start (its offsets were not recorded).
    pub fn stop(mut self, grace: Duration) {
        self.sender.take();
        let deadline = Instant::now() + grace;
        if let Some(t) = self.thread.take() {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !t.is_finished() {
                warn!(grace = ?grace, "deferred scorers still busy at shutdown; the rest is scored after the next start");
                self.stop_now.store(true, Ordering::SeqCst);
            }
            let _ = t.join();
        }
    }
}

/// Queues the committed jobs of recorded partitions past their scored offset.
fn recover(
    quality: &Quality,
    root: &Path,
    scored_through: &BTreeMap<String, i64>,
    sender: &DeferredSender,
) -> Result<usize, SinkError> {
    let mut n = 0;
    for (key, &through) in scored_through {
        let Some((topic, partition)) = key.rsplit_once('/') else {
            continue;
        };
        let Ok(partition) = partition.parse::<i32>() else {
            continue;
        };
        let jobs = crate::metrics::rebuild::committed_jobs(root, topic, partition, through)?;
        for ((first, last), files) in jobs {
            let mut items = Vec::new();
            let mut max_ts: Option<i64> = None;
            for f in &files {
                for batch in crate::metrics::rebuild::read_parquet(f, None)? {
                    crate::metrics::rebuild::for_each_event(&batch, |_, e| {
                        max_ts = Some(max_ts.map_or(e.timestamp_ms, |m| m.max(e.timestamp_ms)));
                        if let Some((reason, _)) = quality.sample(e)
                            && let Some(d) = quality.deferred(e, reason)
                        {
                            items.push(d);
                        }
                    });
                }
            }
            n += items.len();
            sender.submit(DeferredJob {
                topic: topic.to_owned(),
                partition,
                first_offset: first,
                last_offset: last,
                max_event_ms: max_ts,
                items,
            });
        }
    }
    Ok(n)
}

impl Worker {
    fn run(&mut self, rx: Receiver<DeferredJob>, stop: &AtomicBool) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "cannot start the deferred scorers' runtime; deferred scores are off");
                return;
            }
        };
        let mut next_outliers = Instant::now();
        loop {
            if self.outliers && Instant::now() >= next_outliers {
                if let Err(e) = rt.block_on(self.score_outliers()) {
                    warn!(error = %e, "cannot score drift outliers; retrying");
                }
                next_outliers = Instant::now() + Duration::from_secs(1);
            }
            let job = match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(job) => job,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            // A partition seen for the first time is recorded before its first job is scored,
            // so that a crash during that job is recovered from its start.
            let key = format!("{}/{}", job.topic, job.partition);
            if let std::collections::btree_map::Entry::Vacant(v) = self.st.scored_through.entry(key)
            {
                v.insert(job.first_offset - 1);
                if let Err(e) = save_state(&self.state_path, &self.st) {
                    warn!(error = %e, "cannot record the deferred stage's position");
                }
            }
            let n = job.items.len();
            let rows = rt.block_on(self.score(&job));
            // Written until it works: a job is recorded only after its scores are durable.
            let mut delay = Duration::from_millis(100);
            while let Err(e) = self.write(&job, &rows) {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                warn!(error = %e, topic = %job.topic, partition = job.partition, "cannot write deferred scores; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            self.queued.fetch_sub(n, Ordering::Relaxed);
        }
        // A graceful stop comes after the drift stage's: its last windows are in the table.
        if self.outliers
            && !stop.load(Ordering::SeqCst)
            && let Err(e) = rt.block_on(self.score_outliers())
        {
            warn!(error = %e, "cannot score the last drift outliers; they are scored after the next start");
        }
        if self.finish && !stop.load(Ordering::SeqCst) {
            let mut next = self.st.clone();
            let files = self.close(&mut next, true);
            match self.commit(next, files) {
                Ok(()) => {}
                Err(e) => warn!(error = %e, "cannot write the deferred scores' last windows"),
            }
        }
    }

    /// Scores the events the drift table names as what moved most in drifted windows judged
    /// since the last pass (each window once: its start is checkpointed), unless the sampler
    /// picked them already. Their scores go to
    /// `scores/…/outliers-<stream>-<window start>.parquet` and stay out of the rates.
    async fn score_outliers(&mut self) -> Result<(), SinkError> {
        self.roll_budget_hour();
        let windows = drift_windows(&self.root, &self.stream, self.st.outliers_through)?;
        for (start, path) in windows {
            let mut ids: Vec<String> = Vec::new();
            let mut end = start;
            for b in crate::metrics::rebuild::read_parquet(&path, None)? {
                outlier_ids(&b, &mut ids, &mut end);
            }
            ids.sort();
            ids.dedup();
            let events = if ids.is_empty() {
                Vec::new()
            } else {
                find_events(&self.root, start, end.max(start + 1), &ids)?
            };
            let mut b = BTreeMap::<i64, ScoreBatchBuilder>::new();
            for e in &events {
                if self.quality.sample(e).is_some() {
                    continue; // scored already, as a sampled event
                }
                let case = Case::of(e);
                let hour = e.timestamp_ms.div_euclid(3_600_000);
                for (i, def) in self.quality.scorers().iter().enumerate() {
                    if !super::event_matches(&def.when, e) {
                        continue;
                    }
                    let scored = if def.check.is_deferred() {
                        if e.output.is_none() {
                            continue;
                        }
                        let r = self.score_one(def, i, &e.event_id, &case).await;
                        match r {
                            Ok((score, usage)) => Some((score, usage)),
                            Err(_) => None,
                        }
                    } else {
                        def.check.score(&case, def.field).map(|s| (s, None))
                    };
                    if let Some((score, usage)) = scored {
                        let judge_model = matches!(def.check, Check::Judge(_))
                            .then(|| self.quality.config().judge.model.as_str());
                        b.entry(hour).or_default().append_deferred(
                            e,
                            SampleReason::DriftOutlier,
                            def,
                            &score,
                            judge_model,
                            usage,
                        );
                    }
                }
            }
            let mut dirs = std::collections::BTreeSet::new();
            for (hour, mut batch) in b {
                let path = self
                    .root
                    .join("scores")
                    .join(hour_dir(hour))
                    .join(format!("outliers-{}-{start}.parquet", self.stream));
                write_into_place(&path, &batch.finish(), Table::Scores, &self.sink)?;
                dirs.insert(path.parent().expect("in a directory").to_owned());
            }
            for d in &dirs {
                fsync_dir(d)?;
            }
            let mut next = self.st.clone();
            next.outliers_through = start;
            save_state(&self.state_path, &next)?;
            self.st = next;
            if !events.is_empty() {
                info!(window = %crate::metrics::fmt_ms(start), events = events.len(), "drift outliers scored");
            }
        }
        Ok(())
    }

    /// Adds a job's scores to the windows of `next`.
    fn count(&mut self, next: &mut State, job: &DeferredJob, rows: &[Row]) {
        let size = self.window.size_ms;
        let key = format!("{}/{}", job.topic, job.partition);
        if let Some(t) = job.max_event_ms {
            let lane = next.lanes.entry(key.clone()).or_insert(i64::MIN);
            *lane = (*lane).max(t);
        }
        self.lane_seen.insert(key, Instant::now());
        let mut late = 0u64;
        let mut per_item: BTreeMap<usize, Vec<super::Scored>> = BTreeMap::new();
        for (i, s, score, _) in rows {
            per_item.entry(*i).or_default().push(super::Scored {
                scorer: *s,
                score: score.clone(),
            });
        }
        for (i, item) in job.items.iter().enumerate() {
            let e = &item.event;
            let start = e.timestamp_ms - e.timestamp_ms.rem_euclid(size);
            if start.saturating_add(size) <= next.closed_through {
                late += 1;
                continue;
            }
            let series: Vec<Option<String>> = self
                .window
                .dimensions
                .iter()
                .map(|d| d.value(e).map(str::to_owned))
                .collect();
            next.windows
                .entry(start)
                .or_default()
                .entry(series)
                .or_default()
                .observe(per_item.get(&i).map_or(&[][..], Vec::as_slice));
        }
        if late > 0 {
            self.stats.late_events.fetch_add(late, Ordering::Relaxed);
        }
    }

    /// Closes the windows of `next` its watermark has passed (all when `all`): their rows
    /// and the roll-ups they complete, as files to write.
    fn close(&self, next: &mut State, all: bool) -> Vec<(PathBuf, arrow::array::RecordBatch)> {
        let (size, lateness, roll) = (
            self.window.size_ms,
            self.window.lateness_ms,
            self.window.rollup_ms,
        );
        let watermark = if all {
            i64::MAX
        } else {
            // Partitions heard from within the lateness hold the watermark; quiet ones don't.
            let active: Vec<i64> = next
                .lanes
                .iter()
                .filter(|(k, _)| {
                    self.lane_seen
                        .get(*k)
                        .is_some_and(|t| t.elapsed() < Duration::from_millis(lateness as u64))
                })
                .map(|(_, v)| *v)
                .collect();
            let newest = active
                .iter()
                .min()
                .copied()
                .or_else(|| next.lanes.values().max().copied())
                .unwrap_or(i64::MIN);
            newest.saturating_sub(lateness)
        };
        let dims = &self.window.dimensions;
        let scorers = self.quality.scorers();
        let fine = crate::metrics::resolution_name(size);
        let coarse = crate::metrics::resolution_name(roll);
        let rows = |res: &str, start: i64, end: i64, series: &SeriesCounts| {
            let mut b = super::table::QualityBatchBuilder::deferred(dims);
            for (values, c) in series {
                let v: Vec<Option<&str>> = values.iter().map(Option::as_deref).collect();
                let key = crate::window::SeriesKey::new(&v);
                b.append(res, start, end, &self.stream, &key, c, scorers);
            }
            b.finish()
        };
        let mut files = Vec::new();
        let closing: Vec<i64> = next
            .windows
            .keys()
            .copied()
            .take_while(|s| all || s.saturating_add(size) <= watermark)
            .collect();
        for start in closing {
            let series = next.windows.remove(&start).expect("listed");
            files.push((
                super::table::deferred_quality_file(&self.stream, &fine, start),
                rows(&fine, start, start + size, &series),
            ));
            next.closed_through = next.closed_through.max(start + size);
            let hour = start - start.rem_euclid(roll);
            let acc = next.rollup.entry(hour).or_default();
            for (k, c) in series {
                acc.entry(k).or_default().merge(&c);
            }
        }
        let done: Vec<i64> = next
            .rollup
            .keys()
            .copied()
            .filter(|h| all || h.saturating_add(roll) <= next.closed_through)
            .collect();
        for hour in done {
            let series = next.rollup.remove(&hour).expect("listed");
            files.push((
                super::table::deferred_quality_file(&self.stream, &coarse, hour),
                rows(&coarse, hour, hour + roll, &series),
            ));
        }
        files
    }

    /// Writes closed windows' files, then the state that says they are written; then hands
    /// the windows to the alert rules.
    fn commit(
        &mut self,
        next: State,
        files: Vec<(PathBuf, arrow::array::RecordBatch)>,
    ) -> Result<(), SinkError> {
        let mut dirs = std::collections::BTreeSet::new();
        for (rel, batch) in &files {
            let path = self.root.join(rel);
            write_into_place(&path, batch, Table::Quality, &self.sink)?;
            dirs.insert(path.parent().expect("in a directory").to_owned());
        }
        for d in &dirs {
            fsync_dir(d)?;
        }
        save_state(&self.state_path, &next)?;
        self.st = next;
        if let Some(f) = &self.frames {
            let frames = files
                .iter()
                .filter_map(|(_, b)| crate::alert::Frame::from_quality(b))
                .map(|mut f| {
                    f.source = "quality:deferred".into();
                    f
                })
                .collect();
            f.send(frames);
        }
        Ok(())
    }

    /// Every deferred scorer on every item of the job, concurrently (the judge client bounds
    /// its own concurrency and rate).
    async fn score(&mut self, job: &DeferredJob) -> Vec<Row> {
        let mut calls = Vec::new();
        self.roll_budget_hour();
        for (i, item) in job.items.iter().enumerate() {
            for &s in &item.scorers {
                calls.push((i, s));
            }
        }
        // When the budget runs short, events sampled for a reason (errors, negative feedback,
        // rules) are judged before those the base rate picked.
        calls.sort_by_key(|&(i, _)| job.items[i].reason == SampleReason::Rate);
        let this = &*self;
        let futures = calls.into_iter().map(|(i, s)| {
            let item = &job.items[i];
            let def = &this.quality.scorers()[s];
            async move {
                let started = Instant::now();
                let e = &item.event;
                let case = Case::of(e);
                let r = this.score_one(def, s, &e.event_id, &case).await;
                (i, s, r, started.elapsed())
            }
        });
        let results = futures::future::join_all(futures).await;
        let mut rows = Vec::new();
        for (i, s, r, took) in results {
            match r {
                Ok((score, usage)) => {
                    self.stats
                        .quality_deferred_scored
                        .fetch_add(1, Ordering::Relaxed);
                    let usage = usage.map(|u| JudgeUsage {
                        latency_ms: took.as_secs_f64() * 1000.0,
                        ..u
                    });
                    rows.push((i, s, score, usage));
                }
                Err(Skip::Budget) => {
                    self.stats
                        .quality_budget_skipped
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(Skip::Failed(msg)) => {
                    self.stats
                        .quality_deferred_failed
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(scorer = %self.quality.scorers()[s].name, event_id = %job.items[i].event.event_id, error = %msg, "deferred scorer failed; the event has no score from it");
                }
            }
        }
        rows
    }

    /// Starts the budget afresh when the clock hour has changed.
    fn roll_budget_hour(&mut self) {
        let hour = (chrono::Utc::now().timestamp() / 3600) as u64;
        if self.budget_hour != hour {
            self.budget_hour = hour;
            self.spent.store(0, Ordering::Relaxed);
        }
    }

    /// One scorer on one case: its score and, for a judge, what the call cost.
    async fn score_one(
        &self,
        def: &ScorerDef,
        index: usize,
        event_id: &str,
        case: &Case<'_>,
    ) -> Result<(Score, Option<JudgeUsage>), Skip> {
        let budget = self.quality.config().budget_tokens_per_hour;
        let spent = &self.spent;
        match &def.check {
            Check::Judge(rubric) => {
                let client = self
                    .judge
                    .as_ref()
                    .expect("opened when a judge scorer exists");
                // Calls run concurrently: each reserves what the last verdict cost before it
                // starts, and settles the difference when it knows.
                let estimate = self.last_tokens.load(Ordering::Relaxed).max(1);
                if budget > 0 {
                    let before = spent.fetch_add(estimate, Ordering::Relaxed);
                    if before + estimate > budget {
                        spent.fetch_sub(estimate, Ordering::Relaxed);
                        return Err(Skip::Budget);
                    }
                }
                let result = client.judge(rubric, case).await;
                let used = match &result {
                    Ok((v, false)) => v.input_tokens + v.output_tokens,
                    _ => 0,
                };
                if budget > 0 {
                    spent.fetch_add(used, Ordering::Relaxed);
                    spent.fetch_sub(estimate, Ordering::Relaxed);
                }
                let (v, cached) = result.map_err(|e| Skip::Failed(e.to_string()))?;
                if !cached {
                    self.last_tokens.store(used, Ordering::Relaxed);
                    self.stats
                        .quality_judge_tokens
                        .fetch_add(used, Ordering::Relaxed);
                }
                // What the verdict cost when it was bought (a cached verdict's row, written
                // again by a replay, keeps the same cost; unknown model prices give 0).
                let cost = self
                    .prices
                    .as_ref()
                    .and_then(|p| p.get(client.model()))
                    .and_then(|p| {
                        p.cost(&crate::metrics::cost::Usage {
                            input: v.input_tokens,
                            output: v.output_tokens,
                            ..Default::default()
                        })
                    })
                    .unwrap_or(0.0);
                Ok((
                    v.to_score(),
                    Some(JudgeUsage {
                        cost_usd: cost,
                        latency_ms: 0.0,
                        input_tokens: v.input_tokens,
                        output_tokens: v.output_tokens,
                    }),
                ))
            }
            Check::Command { .. } => {
                let request = custom::request(&def.name, event_id, case);
                let cmd = self.commands[index]
                    .as_ref()
                    .expect("built for every command scorer");
                // The process protocol is blocking; the stage has its own thread.
                cmd.score(&request)
                    .map(|s| (s, None))
                    .map_err(|e| Skip::Failed(e.to_string()))
            }
            Check::Http { url, timeout } => {
                let request = custom::request(&def.name, event_id, case);
                tokio::time::timeout(*timeout, custom::score_http(&self.http, url, &request))
                    .await
                    .map_err(|_| Skip::Failed(format!("no answer within {timeout:?}")))?
                    .map(|s| (s, None))
                    .map_err(|e| Skip::Failed(e.to_string()))
            }
            _ => Err(Skip::Failed("not a deferred scorer".into())),
        }
    }

    fn write(&mut self, job: &DeferredJob, rows: &[Row]) -> Result<(), SinkError> {
        let scorers = self.quality.scorers();
        let mut by_hour: BTreeMap<i64, ScoreBatchBuilder> = BTreeMap::new();
        for (i, s, score, cost) in rows {
            let item = &job.items[*i];
            let def = &scorers[*s];
            let judge_model = matches!(def.check, Check::Judge(_))
                .then(|| self.quality.config().judge.model.as_str());
            by_hour
                .entry(item.event.timestamp_ms.div_euclid(3_600_000))
                .or_default()
                .append_deferred(&item.event, item.reason, def, score, judge_model, *cost);
        }
        let mut dirs = std::collections::BTreeSet::new();
        for (hour, mut b) in by_hour {
            let rel = deferred_file(
                &job.topic,
                job.partition,
                job.first_offset,
                job.last_offset,
                hour,
            );
            let path = self.root.join(rel);
            write_into_place(&path, &b.finish(), Table::Scores, &self.sink)?;
            dirs.insert(path.parent().expect("in a directory").to_owned());
        }
        for d in &dirs {
            fsync_dir(d)?;
        }
        // The job's counts and the windows they close, checkpointed with its offsets.
        let mut next = self.st.clone();
        self.count(&mut next, job, rows);
        let key = format!("{}/{}", job.topic, job.partition);
        let e = next.scored_through.entry(key).or_insert(i64::MIN);
        *e = (*e).max(job.last_offset);
        let files = self.close(&mut next, false);
        self.commit(next, files)
    }
}

fn save_state(path: &Path, st: &State) -> Result<(), SinkError> {
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(crate::sink::io_err(dir))?;
    let body = serde_json::to_string(st).expect("the state serializes");
    write_durably(path, body.as_bytes())
}

/// The stream's drift files of windows starting after `after`, oldest first.
fn drift_windows(root: &Path, stream: &str, after: i64) -> Result<Vec<(i64, PathBuf)>, SinkError> {
    let prefix = format!("drift-{stream}-");
    let mut out = Vec::new();
    // Hours before the last scored window's are not listed.
    let from_hour = after.div_euclid(3_600_000).saturating_mul(3_600_000);
    for (t, hour) in crate::metrics::rebuild::table_hours(root, "drift")? {
        if after != i64::MIN && t < from_hour {
            continue;
        }
        let Ok(files) = std::fs::read_dir(&hour) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let start = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".parquet"))
                .and_then(|r| r.parse::<i64>().ok());
            if let Some(start) = start.filter(|s| *s > after) {
                out.push((start, f.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Event ids in the explanations of a drift file's drifted embedding verdicts (MMD witness
/// texts), and the window end.
pub(crate) fn outlier_ids(b: &arrow::array::RecordBatch, ids: &mut Vec<String>, end: &mut i64) {
    use arrow::array::{Array, AsArray};
    let s = |n: &str| {
        b.column_by_name(n)
            .and_then(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).ok())
    };
    let (Some(field), Some(method), Some(expl)) = (s("field"), s("method"), s("explanation"))
    else {
        return;
    };
    let (field, method, expl) = (
        field.as_string::<i32>(),
        method.as_string::<i32>(),
        expl.as_string::<i32>(),
    );
    let Some(drifted) = b.column_by_name("drifted").and_then(|c| c.as_boolean_opt()) else {
        return;
    };
    if let Some(e) = b
        .column_by_name("window_end")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::TimestampMillisecondType>())
        .and_then(arrow::compute::max)
    {
        *end = (*end).max(e);
    }
    for i in 0..b.num_rows() {
        if drifted.is_null(i) || !drifted.value(i) || expl.is_null(i) {
            continue;
        }
        if !matches!(field.value(i), "input" | "output") || method.value(i) != "mmd" {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(expl.value(i))
            && let Some(items) = v.as_array()
        {
            ids.extend(
                items
                    .iter()
                    .filter_map(|x| x.get("event_id")?.as_str().map(str::to_owned)),
            );
        }
    }
}

/// The events with these ids among the `events` files of the hours `from..to` spans.
fn find_events(
    root: &Path,
    from: i64,
    to: i64,
    ids: &[String],
) -> Result<Vec<LlmEvent<'static>>, SinkError> {
    let mut out: Vec<LlmEvent<'static>> = Vec::new();
    for hour in from.div_euclid(3_600_000)..=(to - 1).div_euclid(3_600_000) {
        let dir = root.join("events").join(hour_dir(hour));
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|x| x != "parquet") {
                continue;
            }
            for b in crate::metrics::rebuild::read_parquet(&path, None)? {
                crate::metrics::rebuild::for_each_event(&b, |_, e| {
                    if ids
                        .binary_search_by(|x| x.as_str().cmp(&e.event_id))
                        .is_ok()
                        && !out.iter().any(|o| o.event_id == e.event_id)
                    {
                        out.push(e.clone().into_owned());
                    }
                });
            }
        }
    }
    Ok(out)
}

/// A score ready to write: (item index in its job, scorer index, score, for a judge its
/// (cost in USD, latency in ms)).
type Row = (usize, usize, Score, Option<JudgeUsage>);

enum Skip {
    Budget,
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut st = State {
            closed_through: 120_000,
            ..State::default()
        };
        st.scored_through.insert("t/0".into(), 41);
        st.lanes.insert("t/0".into(), 99_000);
        let mut c = QualityCounts::default();
        c.observe(&[super::super::Scored {
            scorer: 1,
            score: Score {
                value: 0.5,
                passed: true,
                explanation: None,
            },
        }]);
        st.windows
            .entry(180_000)
            .or_default()
            .insert(vec![Some("app".into()), None], c.clone());
        st.rollup.entry(0).or_default().insert(vec![None, None], c);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        save_state(&path, &st).unwrap();
        let back = read_state(&path);
        assert_eq!(back.scored_through, st.scored_through);
        assert_eq!(back.lanes, st.lanes);
        assert_eq!(back.closed_through, 120_000);
        assert_eq!(back.windows, st.windows);
        assert_eq!(back.rollup, st.rollup);
    }
}
