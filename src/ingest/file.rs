//! The file source, for backfills and exports: JSON Lines, plain or gzip (detected from the
//! magic bytes), from a path, a glob, or `-` (standard input).
//!
//! Each file is one "partition" of a topic named after it (`file-<stem>-<hash of its path>`),
//! and a record's offset is its line index (0-based; blank lines are skipped but counted).
//! Buffers are cut by size only, never by time, so the same file always yields the same
//! batches and file names: rerunning an import rewrites its Parquet files instead of adding
//! duplicates. A rejected line's record time is the file's modification time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::bounded;
use flate2::read::MultiGzDecoder;
use tracing::{info, warn};
use xxhash_rust::xxh3::xxh3_64;

use super::{Accumulator, IngestError, Shutdown, SourceRecord};
use crate::config::PipelineConfig;
use crate::decode::Decoder;
use crate::metrics::{MetricsStage, load_prices};
use crate::sink::{NoCommit, Sink, SinkMsg, run_writer};
use crate::telemetry::Stats;

/// Expands a path or glob into the files to read, sorted.
pub fn expand(pattern: &str) -> Result<Vec<PathBuf>, IngestError> {
    if pattern == "-" {
        return Ok(vec![PathBuf::from("-")]);
    }
    let paths = glob::glob(pattern).map_err(|e| IngestError::Pattern {
        pattern: pattern.to_owned(),
        message: e.to_string(),
    })?;
    let mut files = Vec::new();
    for p in paths {
        let p = p.map_err(|e| IngestError::Io {
            path: e.path().display().to_string(),
            source: e.into(),
        })?;
        if p.is_file() {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(IngestError::NoFiles(pattern.to_owned()));
    }
    files.sort();
    Ok(files)
}

/// The stable source name of a file: its stem plus a hash of its absolute path.
pub fn source_name(path: &Path) -> String {
    if path == Path::new("-") {
        return "stdin".to_owned();
    }
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let stem: String = path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("input")
        .split('.')
        .next()
        .unwrap_or("input")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!(
        "file-{stem}-{:08x}",
        xxh3_64(abs.as_os_str().as_encoded_bytes()) as u32
    )
}

/// Opens a file (or stdin), decompressing gzip when the content starts with its magic bytes.
pub fn open_lines(path: &Path) -> Result<Box<dyn BufRead + Send>, IngestError> {
    let io = |source| IngestError::Io {
        path: path.display().to_string(),
        source,
    };
    let raw: Box<dyn Read + Send> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(path).map_err(io)?)
    };
    let mut reader = BufReader::with_capacity(1 << 20, raw);
    let gz = reader.fill_buf().map_err(io)?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            MultiGzDecoder::new(reader),
        ))
    } else {
        Box::new(reader)
    })
}

pub fn run(
    config: &PipelineConfig,
    pattern: &str,
    stats: Arc<Stats>,
    shutdown: Shutdown,
) -> Result<(), IngestError> {
    let files = expand(pattern)?;
    // One stream per input set: a rerun of the same files recomputes and replaces its own
    // metrics and quality rows; other backfills and the live pipeline keep theirs.
    let names: Vec<String> = files.iter().map(|p| source_name(p)).collect();
    let stream = format!(
        "backfill-{:08x}",
        xxh3_64(names.join("\n").as_bytes()) as u32
    );
    let (tx, rx) = bounded(config.sink.queue_depth);
    let sink = Sink::new(&config.data_root, config.sink.clone());
    let recovery = sink.clone();
    let writer_stats = stats.clone();
    let quality = config
        .quality
        .enabled()
        .then(|| crate::quality::Quality::new(config.quality.clone()));
    // Alert rules judge the backfill's windows on event time. What they find lands in the
    // `alerts` table (what would have fired, and when); nothing is notified, and the stream's
    // alerts stay out of `telltale alerts` and `telltale gate`, which are about now.
    let alerts = if config.alerting.enabled && config.metrics.enabled {
        let mut a = config.alerting.clone();
        a.clock = crate::alert::Clock::Event;
        a.receivers.clear();
        a.routes.clear();
        a.default_route.receivers.clear();
        let ctx = crate::alert::pipeline_rule_context(config);
        Some(crate::alert::AlertStage::start(
            &a,
            &ctx,
            &config.data_root,
            &stream,
            stats.clone(),
        )?)
    } else {
        None
    };
    let frames = alerts.as_ref().map(crate::alert::AlertStage::sender);
    let experiment_frames = frames.clone();
    // Drift judges the backfill's windows in event time against the backfill's own past
    // (a rerun starts afresh, as its metrics do); the last, partial window is judged at the end.
    let drift_on = config.metrics.enabled && config.drift.enabled;
    let drift = if drift_on {
        crate::drift::stage::forget(&config.data_root, &stream)?;
        Some(crate::drift::DriftStage::start(
            config.drift.clone(),
            &config.metrics.window.dimensions,
            &config.data_root,
            &stream,
            config.sink.clone(),
            frames.clone(),
            stats.clone(),
        )?)
    } else {
        None
    };
    let samples = drift.as_ref().map(crate::drift::DriftStage::sender);
    // Deferred scorers (judge, command, http): a backfill waits for them at the end.
    let deferred = match &quality {
        Some(q) if q.has_deferred() => Some(
            crate::quality::deferred::DeferredStage::start(
                q.clone(),
                &config.data_root,
                &stream,
                config.metrics.window.clone(),
                frames.clone(),
                true,
                false,
                config.sink.clone(),
                Some(load_prices(&config.metrics)?),
                stats.clone(),
            )
            .map_err(IngestError::Quality)?,
        ),
        _ => None,
    };
    let deferred_tx = deferred.as_ref().map(|d| d.sender());
    let writer = thread::Builder::new()
        .name("telltale-writer".into())
        .spawn(move || {
            run_writer(
                rx,
                sink,
                Arc::new(NoCommit),
                writer_stats,
                &|| true,
                &|mut out| {
                    if let Some(f) = &frames {
                        f.send_metrics(&out);
                    }
                    if let Some(d) = &samples {
                        d.send(std::mem::take(&mut out.samples));
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

    let mut acc = Accumulator::new(
        Decoder::new(config.decode.clone()),
        config.sink.clone(),
        config.rejects.max_raw_bytes,
        false,
        stats.clone(),
    )
    .with_prices(load_prices(&config.metrics)?);
    if let Some(q) = &quality {
        acc = acc.with_quality(q.clone());
    }
    if config.metrics.enabled {
        info!(stream = %stream, "metrics for this input are written as stream {stream}");
        let mut m = MetricsStage::new(config.metrics.clone(), &stream, false, stats.clone());
        if let Some(q) = quality {
            m = m.with_quality(q);
        }
        if drift_on {
            m = m.with_sampling(&config.drift);
        }
        acc = acc.with_metrics(m);
    }
    stats
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut jobs = Vec::new();
    let mut result = Ok(());
    'files: for path in &files {
        let topic = source_name(path);
        // A previous run that died mid-file may have left batches that were never finished.
        let rolled = recovery.recover(&topic, 0, None)?;
        stats
            .batches_rolled_back
            .fetch_add(rolled as u64, std::sync::atomic::Ordering::Relaxed);
        let mtime = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64);
        info!(file = %path.display(), source = %topic, "reading");
        let mut reader = match open_lines(path) {
            Ok(r) => r,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let mut line = Vec::with_capacity(8192);
        let mut index: i64 = -1;
        loop {
            if shutdown.is_triggered() {
                break 'files;
            }
            line.clear();
            let n = match reader.read_until(b'\n', &mut line) {
                Ok(n) => n,
                Err(source) => {
                    result = Err(IngestError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                    break 'files;
                }
            };
            if n == 0 {
                break;
            }
            index += 1;
            let mut end = line.len();
            while end > 0 && matches!(line[end - 1], b'\n' | b'\r') {
                end -= 1;
            }
            let payload = &line[..end];
            if payload.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let rec = SourceRecord {
                topic: &topic,
                partition: 0,
                offset: index,
                timestamp_ms: mtime,
                key: None,
                payload: Some(payload),
            };
            acc.push(&rec, &mut jobs);
            for job in jobs.drain(..) {
                if tx.send(SinkMsg::Jobs(vec![job])).is_err() {
                    result = Err(IngestError::WriterGone);
                    break 'files;
                }
            }
            // Event time only: how fast a backfill reads says nothing about its windows.
            if index % 4096 == 0
                && let Some(out) = acc.tick_metrics(None)
                && tx.send(SinkMsg::Metrics(out)).is_err()
            {
                result = Err(IngestError::WriterGone);
                break 'files;
            }
        }
        if let Some(job) = acc.take_partition(&topic, 0)
            && tx.send(SinkMsg::Jobs(vec![job])).is_err()
        {
            result = Err(IngestError::WriterGone);
            break;
        }
    }
    if result.is_ok()
        && !shutdown.is_triggered()
        && let Some(out) = acc.finish_metrics()
        && tx.send(SinkMsg::Metrics(out)).is_err()
    {
        result = Err(IngestError::WriterGone);
    }
    if shutdown.is_triggered() {
        // Interrupted mid-file: the partial batch is dropped rather than written under a name
        // a rerun would not reproduce. Batches already written are rewritten by the rerun.
        info!(
            "interrupted; rerun the same command to finish (completed batches are rewritten, not duplicated)"
        );
    }
    drop(tx);
    let writer_result = writer.join().map_err(|_| IngestError::WriterGone)?;
    if let Some(d) = drift {
        if result.is_ok() && !shutdown.is_triggered() {
            info!("judging the last drift windows");
            d.finish();
        } else {
            d.stop();
        }
    }
    if let Some(d) = deferred {
        // A backfill's deferred scores are part of its result: wait for them (what a crash
        // leaves undone is scored by the next run over the same files).
        info!("waiting for the deferred scorers to finish");
        d.stop(Duration::from_secs(24 * 3600));
    }
    // Experiments: every window, once everything (deferred scores included) is written.
    if config.experiments.enabled() && result.is_ok() && !shutdown.is_triggered() {
        match crate::experiment::stage::once(config, &stream, experiment_frames, stats.clone()) {
            Ok(looks) => info!(looks = looks.len(), "experiments evaluated"),
            Err(e) => warn!(error = %e, "experiments: evaluation failed"),
        }
    }
    if let Some(a) = alerts {
        a.stop();
    }
    result?;
    writer_result?;
    Ok(())
}
