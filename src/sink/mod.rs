//! Arrow batches → Parquet files under a Hive layout, with a commit protocol that makes
//! at-least-once input exactly-once on disk.
//!
//! In: a [`SinkJob`] — the decoded rows of one source partition over an offset range
//! `first..=last`, for each table. Out: Parquet files (zstd) at
//! `<root>/<table>/date=YYYY-MM-DD/hour=HH/part-<topic>-<partition>-<first>-<last>.parquet`,
//! then a call to the [`Committer`] with `last + 1`.
//!
//! The protocol, per job:
//! 1. write a manifest `<root>/_txn/<topic>/<partition>/<first>-<last>.json` naming every file
//!    the job will produce (fsync file and directory);
//! 2. write each file as `<name>.tmp` beside its final name and fsync it;
//! 3. rename each to its final name and fsync the directories;
//! 4. commit `last + 1` to the source (Kafka), then delete the manifest.
//!
//! A crash anywhere leaves either a committed job (its manifest, if still there, is stale) or
//! an uncommitted one whose files may be partly visible. When a partition is (re)assigned,
//! [`Sink::recover`] compares each manifest with the position the source resumes from: a job
//! at or after it was not committed, so its files are deleted and its records, which Kafka
//! delivers again, are written anew. Readers ignore `*.tmp` (they list `*.parquet` only).
//! Names are deterministic, so a rerun over the same input rewrites the same files.
//!
//! On a write error (disk full, permissions) the writer retries with backoff and commits
//! nothing: the bounded queue fills, the consumer pauses, nothing is lost.

mod parquet_file;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use crossbeam_channel::Receiver;
use tracing::{debug, error, info, warn};

use crate::config::SinkConfig;
use crate::telemetry::Stats;

pub use parquet_file::write_parquet;

/// The tables this stage writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Events,
    Rejects,
    Metrics,
    Alerts,
    Drift,
    Scores,
    Quality,
    Harvest,
    Experiments,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Events => "events",
            Table::Rejects => "rejects",
            Table::Metrics => "metrics",
            Table::Alerts => "alerts",
            Table::Drift => "drift",
            Table::Scores => "scores",
            Table::Quality => "quality",
            Table::Harvest => "harvest",
            Table::Experiments => "experiments",
        }
    }
}

/// The rows of one source partition over `first_offset..=last_offset`.
pub struct SinkJob {
    pub topic: Arc<str>,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    /// Records the job covers (valid + rejected).
    pub records: u64,
    /// Their size as read from the source.
    pub bytes: u64,
    pub events: RecordBatch,
    /// Hour (since the epoch) each event row is filed under.
    pub event_hours: Vec<i64>,
    pub rejects: RecordBatch,
    pub reject_hours: Vec<i64>,
    /// Quality scores of the job's sampled events (zero rows when quality is off).
    pub scores: RecordBatch,
    pub score_hours: Vec<i64>,
    /// Sampled events for the deferred scorers (judge, command, http), handed to their stage
    /// once the job is committed.
    pub deferred: Vec<crate::quality::deferred::Deferred>,
}

/// Messages to the writer thread.
pub enum SinkMsg {
    /// Jobs made durable together and committed with one call.
    Jobs(Vec<SinkJob>),
    /// Answered once every job sent before it is durable and committed.
    Barrier(crossbeam_channel::Sender<()>),
    /// Closed metrics windows: their files, then the stream's close position.
    Metrics(crate::metrics::MetricsOutput),
}

/// Where durable progress is recorded: Kafka's consumer group, or nowhere for files.
pub trait Committer: Send + Sync {
    /// Records, for each (topic, partition), the next offset to read.
    fn commit(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String>;
}

/// For sources whose progress needs no recording (files: a rerun rewrites the same files).
pub struct NoCommit;

impl Committer for NoCommit {
    fn commit(&self, _: &[(&str, i32, i64)]) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot encode Parquet: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot split batch by hour: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a finished job wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

impl Written {
    /// Adds the files and bytes to the pipeline's counters.
    fn count(&self, stats: &Stats) {
        stats
            .files_written
            .fetch_add(self.files.len() as u64, Ordering::Relaxed);
        stats.bytes_written.fetch_add(self.bytes, Ordering::Relaxed);
    }
}

/// Writes jobs under a data root.
#[derive(Clone)]
pub struct Sink {
    root: PathBuf,
    config: SinkConfig,
}

/// `date=YYYY-MM-DD/hour=HH` of an hour since the epoch: the Hive directory of every table.
pub(crate) fn hour_dir(hour: i64) -> String {
    let t = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default();
    t.format("date=%Y-%m-%d/hour=%H").to_string()
}

/// Groups row indices by hour; `None` when every row is in one hour (the common case).
fn split_by_hour(hours: &[i64]) -> Option<BTreeMap<i64, Vec<u32>>> {
    let first = *hours.first()?;
    if hours.iter().all(|h| *h == first) {
        return None;
    }
    let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, h) in hours.iter().enumerate() {
        groups.entry(*h).or_default().push(i as u32);
    }
    Some(groups)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Sink {
    pub fn new(root: impl Into<PathBuf>, config: SinkConfig) -> Sink {
        Sink {
            root: root.into(),
            config,
        }
    }

    fn txn_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root
            .join("_txn")
            .join(topic)
            .join(partition.to_string())
    }

    /// The files a job will produce, each with the rows that go into it.
    fn plan(&self, job: &SinkJob) -> Result<Vec<(PathBuf, Table, RecordBatch)>, SinkError> {
        let name = format!(
            "part-{}-{}-{}-{}.parquet",
            job.topic, job.partition, job.first_offset, job.last_offset
        );
        let mut files = Vec::new();
        for (table, batch, hours) in [
            (Table::Events, &job.events, &job.event_hours),
            (Table::Rejects, &job.rejects, &job.reject_hours),
            (Table::Scores, &job.scores, &job.score_hours),
        ] {
            if batch.num_rows() == 0 {
                continue;
            }
            let dir = self.root.join(table.name());
            match split_by_hour(hours) {
                None => files.push((
                    dir.join(hour_dir(hours[0])).join(&name),
                    table,
                    batch.clone(),
                )),
                Some(groups) => {
                    for (hour, rows) in groups {
                        let part = take_record_batch(batch, &UInt32Array::from(rows))?;
                        files.push((dir.join(hour_dir(hour)).join(&name), table, part));
                    }
                }
            }
        }
        Ok(files)
    }

    /// Steps 1–3 of the protocol: after this returns, the job's files are durable and visible.
    pub fn write(&self, job: &SinkJob) -> Result<Written, SinkError> {
        let files = self.plan(job)?;
        let txn_dir = self.txn_dir(&job.topic, job.partition);
        fs::create_dir_all(&txn_dir).map_err(io_err(&txn_dir))?;
        let manifest = txn_dir.join(format!("{}-{}.json", job.first_offset, job.last_offset));
        let listed: Vec<String> = files
            .iter()
            .map(|(p, _, _)| {
                p.strip_prefix(&self.root)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let body = serde_json::json!({ "first_offset": job.first_offset, "last_offset": job.last_offset, "files": listed });
        write_durably(&manifest, body.to_string().as_bytes())?;

        let mut written = Written::default();
        let mut dirs = BTreeSet::new();
        for (path, table, batch) in &files {
            let dir = path
                .parent()
                .expect("planned files live in a partition directory");
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            let tmp = tmp_name(path);
            written.bytes += write_parquet(&tmp, batch, *table, &self.config)?;
            dirs.insert(dir.to_owned());
        }
        if !self.config.debug_commit_delay.is_zero() {
            std::thread::sleep(self.config.debug_commit_delay);
        }
        for (path, _, _) in &files {
            fs::rename(tmp_name(path), path).map_err(io_err(path))?;
            written.files.push(path.clone());
        }
        for dir in &dirs {
            fsync_dir(dir)?;
        }
        Ok(written)
    }

    /// Makes closed metrics windows durable: each file (tmp, fsync, rename), the directories,
    /// and only then the stream's close position. A window written again after a crash
    /// replaces its file (same name).
    pub fn write_metrics(&self, out: &crate::metrics::MetricsOutput) -> Result<Written, SinkError> {
        let mut written = Written::default();
        let mut dirs = BTreeSet::new();
        let files = out.files.iter().map(|(r, b)| (r, b, Table::Metrics));
        let quality = out
            .quality_files
            .iter()
            .map(|(r, b)| (r, b, Table::Quality));
        for (rel, batch, table) in files.chain(quality) {
            let path = self.root.join(rel);
            written.bytes += write_into_place(&path, batch, table, &self.config)?;
            dirs.insert(path.parent().expect("a file has a directory").to_owned());
            written.files.push(path);
        }
        for dir in &dirs {
            fsync_dir(dir)?;
        }
        if let Some(through) = out.closed_through {
            let state = crate::metrics::state_path(&self.root, &out.stream);
            let dir = state.parent().expect("state files live in a directory");
            fs::create_dir_all(dir).map_err(io_err(dir))?;
            write_durably(&state, crate::metrics::state_body(through).as_bytes())?;
        }
        Ok(written)
    }

    /// Step 4's clean-up: the job is committed, its manifest is no longer needed.
    pub fn forget(&self, job: &SinkJob) {
        let manifest = self
            .txn_dir(&job.topic, job.partition)
            .join(format!("{}-{}.json", job.first_offset, job.last_offset));
        if let Err(err) = fs::remove_file(&manifest) {
            warn!(path = %manifest.display(), error = %err, "failed to remove committed manifest");
        }
    }

    /// Undoes jobs of `topic`/`partition` that were written but not committed, given the offset
    /// the source resumes from (`None`: nothing was ever committed). Returns the number of
    /// uncommitted jobs rolled back.
    pub fn recover(
        &self,
        topic: &str,
        partition: i32,
        resume_from: Option<i64>,
    ) -> Result<usize, SinkError> {
        let dir = self.txn_dir(topic, partition);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(SinkError::Io {
                    path: dir,
                    source: e,
                });
            }
        };
        let mut rolled_back = 0;
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            let Some((first, last)) = manifest_range(&path) else {
                continue;
            };
            let committed = resume_from.is_some_and(|pos| last < pos);
            let straddles = resume_from.is_some_and(|pos| first < pos && pos <= last);
            if committed {
                debug!(path = %path.display(), "removing stale manifest of a committed job");
            } else if straddles {
                // The resume position was moved by hand into the middle of a job: its earlier
                // records will not come again, so keep its files rather than lose them.
                warn!(
                    topic,
                    partition,
                    first,
                    last,
                    resume_from,
                    "resume position inside a written job; keeping its files"
                );
            } else {
                for rel in manifest_files(&path)? {
                    let p = self.root.join(rel);
                    for candidate in [tmp_name(&p), p] {
                        remove_if_exists(&candidate)?;
                    }
                }
                info!(
                    topic,
                    partition,
                    first,
                    last,
                    "rolled back files of an uncommitted batch; its records will be written again"
                );
                rolled_back += 1;
            }
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        fsync_dir(&dir)?;
        Ok(rolled_back)
    }
}

/// The files a manifest lists, relative to the data root (none if it is unreadable JSON: a
/// manifest cut short by a crash lists nothing that was written).
pub(crate) fn manifest_files(path: &Path) -> Result<Vec<String>, SinkError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    Ok(serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("files").cloned())
        .and_then(|f| serde_json::from_value::<Vec<String>>(f).ok())
        .unwrap_or_default())
}

fn manifest_range(path: &Path) -> Option<(i64, i64)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let (a, b) = stem.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Writes one Parquet file under a temporary name (fsynced) and renames it into place,
/// creating its directory; returns its size. The caller fsyncs the directory (once for all
/// the files it wrote there).
pub(crate) fn write_into_place(
    path: &Path,
    batch: &RecordBatch,
    table: Table,
    config: &SinkConfig,
) -> Result<u64, SinkError> {
    let dir = path
        .parent()
        .expect("table files live in a partition directory");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = tmp_name(path);
    let bytes = write_parquet(&tmp, batch, table, config)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(bytes)
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Removes a file; one that is not there is not an error.
pub fn remove_if_exists(path: &Path) -> Result<(), SinkError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// `<root>/_state/<stage>`: where a stage keeps what survives restarts.
pub fn state_dir(root: &Path, stage: &str) -> PathBuf {
    root.join("_state").join(stage)
}

/// Writes a small file atomically: temp name, fsync, rename, fsync the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let tmp = tmp_name(path);
    let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    fsync_dir(path.parent().expect("a file path has a parent"))
}

/// Runs `write` until it succeeds, backing off, for as long as `keep_trying` says so.
fn retry(
    keep_trying: &dyn Fn() -> bool,
    stats: &Stats,
    mut write: impl FnMut() -> Result<Written, SinkError>,
) -> Result<Written, SinkError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match write() {
            Ok(w) => return Ok(w),
            Err(err) => {
                stats.sink_errors.fetch_add(1, Ordering::Relaxed);
                if !keep_trying() {
                    error!(error = %err, "giving up writing at shutdown; the offsets it covers stay uncommitted");
                    return Err(err);
                }
                error!(error = %err, retry_in = ?backoff, "failed to write; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The writer thread: makes each group of jobs durable, then commits all their offsets at
/// once. Runs until the channel closes.
///
/// One commit per group, not per job: a synchronous commit costs a broker round trip, and a
/// consumer with many partitions cuts many small jobs at the same moment (measured: one job per
/// commit throttled 64 partitions to ~3 k events/s; see the end_to_end bench).
/// A failing write is retried with backoff for as long as `keep_trying` says so; nothing in
/// the group is committed before all of it is durable.
/// `after_metrics` gets every metrics output once it is durable (the alert and drift stages),
/// `after_commit` every job once it is committed (its deferred quality work is taken out).
pub fn run_writer(
    rx: Receiver<SinkMsg>,
    sink: Sink,
    committer: Arc<dyn Committer>,
    stats: Arc<Stats>,
    keep_trying: &dyn Fn() -> bool,
    after_metrics: &dyn Fn(crate::metrics::MetricsOutput),
    after_commit: &dyn Fn(&mut SinkJob),
) -> Result<(), SinkError> {
    for msg in rx {
        let mut jobs = match msg {
            SinkMsg::Jobs(jobs) => jobs,
            SinkMsg::Barrier(ack) => {
                let _ = ack.send(());
                continue;
            }
            SinkMsg::Metrics(out) => {
                let written = retry(keep_trying, &stats, || sink.write_metrics(&out))?;
                written.count(&stats);
                stats
                    .metrics_rows_written
                    .fetch_add(out.rows() as u64, Ordering::Relaxed);
                after_metrics(out);
                continue;
            }
        };
        let started = Instant::now();
        let mut files = 0;
        for job in &jobs {
            let written = retry(keep_trying, &stats, || sink.write(job))?;
            files += written.files.len();
            written.count(&stats);
            stats
                .events_written
                .fetch_add(job.events.num_rows() as u64, Ordering::Relaxed);
            stats
                .rejects_written
                .fetch_add(job.rejects.num_rows() as u64, Ordering::Relaxed);
            stats
                .scores_written
                .fetch_add(job.scores.num_rows() as u64, Ordering::Relaxed);
        }
        if !sink.config.debug_commit_delay.is_zero() {
            std::thread::sleep(sink.config.debug_commit_delay);
        }
        let offsets: Vec<(&str, i32, i64)> = jobs
            .iter()
            .map(|j| (&*j.topic, j.partition, j.last_offset + 1))
            .collect();
        match committer.commit(&offsets) {
            Ok(()) => {
                for job in &mut jobs {
                    sink.forget(job);
                    stats
                        .records_committed
                        .fetch_add(job.records, Ordering::Relaxed);
                    after_commit(job);
                }
            }
            Err(err) => {
                // Typically a partition was revoked meanwhile; its next owner rolls these
                // jobs back and writes them again.
                stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                warn!(jobs = jobs.len(), error = %err, "failed to commit offsets");
            }
        }
        debug!(jobs = jobs.len(), files, elapsed = ?started.elapsed(), "batches durable and committed");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
