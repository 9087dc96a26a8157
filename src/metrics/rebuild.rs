//! Restoring the metrics stage after a restart: the close position from the state file, the
//! open roll-up from `metrics`, the open windows from `events` (see the module docs above).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tracing::{info, warn};

use super::{MetricsStage, fmt_ms, table, window_file};
use crate::event::LlmEvent;
use crate::metrics::series::CostSource;
use crate::sink::{SinkError, io_err, manifest_files};
use crate::window::{DIMENSION_FIELDS, Dimension};

const HOUR_MS: i64 = 3_600_000;

pub fn read_state(path: &Path) -> Result<Option<i64>, SinkError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| SinkError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(format!("corrupt metrics state: {e}")),
    })?;
    Ok(v.get("closed_through_ms").and_then(|v| v.as_i64()))
}

pub fn state_body(closed_through: i64) -> String {
    serde_json::json!({
        "closed_through_ms": closed_through,
        "closed_through": fmt_ms(closed_through),
    })
    .to_string()
}

/// A Parquet file's rows; `columns`: only these top-level columns (`None`: all).
pub(crate) fn read_parquet(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, SinkError> {
    read_parquet_between(path, columns, None)
}

/// The row groups of a file whose `timestamp` statistics overlap `from..to` (all of them when
/// the file has no such column or statistics).
fn overlapping_row_groups(
    meta: &parquet::file::metadata::ParquetMetaData,
    from_ms: i64,
    to_ms: i64,
) -> Vec<usize> {
    use parquet::file::statistics::Statistics;
    let col = meta
        .file_metadata()
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == "timestamp");
    (0..meta.num_row_groups())
        .filter(|&i| {
            let Some(col) = col else { return true };
            match meta.row_group(i).column(col).statistics() {
                Some(Statistics::Int64(s)) => match (s.min_opt(), s.max_opt()) {
                    (Some(lo), Some(hi)) => *hi >= from_ms && *lo < to_ms,
                    _ => true,
                },
                _ => true,
            }
        })
        .collect()
}

/// [`read_parquet`], reading only the row groups whose `timestamp` statistics overlap
/// `range` (event files are written one row group per batch, so a file of other times is
/// skipped after its footer).
pub(crate) fn read_parquet_between(
    path: &Path,
    columns: Option<&[&str]>,
    range: Option<(i64, i64)>,
) -> Result<Vec<RecordBatch>, SinkError> {
    let pq = |source| SinkError::Parquet {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err(path))?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
    if let Some((from, to)) = range {
        let keep = overlapping_row_groups(builder.metadata(), from, to);
        if keep.is_empty() {
            return Ok(Vec::new());
        }
        if keep.len() < builder.metadata().num_row_groups() {
            builder = builder.with_row_groups(keep);
        }
    }
    if let Some(columns) = columns {
        let schema = builder.parquet_schema();
        let indices: Vec<usize> = schema
            .columns()
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let root = c.path().parts().first().map(String::as_str).unwrap_or("");
                columns.contains(&root)
            })
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::leaves(schema, indices);
        builder = builder.with_projection(mask);
    }
    let reader = builder.build().map_err(pq)?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pq(parquet::errors::ParquetError::ArrowError(e.to_string())))
}

/// Merges the stream's fine rows of the open roll-up window into the roll-up.
pub fn restore_rollup(
    stage: &mut MetricsStage,
    root: &Path,
    closed_through: i64,
) -> Result<usize, SinkError> {
    let size = stage.config.window.size_ms;
    let hour = stage.rollup.window_start(closed_through.saturating_sub(1));
    let mut restored = 0;
    let mut start = hour;
    let dims = stage.config.window.dimensions.clone();
    while start + size <= closed_through {
        let path = root.join(window_file(&stage.stream, &stage.fine, start));
        if path.exists() {
            for batch in read_parquet(&path, None)? {
                let (rows, bad) = table::sealed_rows(&batch, &dims);
                if bad > 0 {
                    warn!(path = %path.display(), rows = bad, "metrics rows with unreadable histograms skipped");
                }
                // Adding windows of one roll-up never completes it.
                let _ = stage.rollup.add(start, rows, |a, b| a.merge(&b));
            }
            restored += 1;
        }
        if let Some(q) = stage.quality.clone() {
            let path = root.join(crate::quality::table::quality_file(
                &stage.stream,
                &stage.fine,
                start,
            ));
            if path.exists() {
                for batch in read_parquet(&path, None)? {
                    let rows = crate::quality::table::quality_rows(&batch, &dims, q.scorers());
                    let _ = stage.quality_rollup.add(start, rows, |a, b| a.merge(&b));
                }
            }
        }
        start += size;
    }
    Ok(restored)
}

/// Files listed by pending manifests of a partition: not known to be committed.
fn pending_files(root: &Path, topic: &str, partition: i32) -> Result<HashSet<PathBuf>, SinkError> {
    let dir = root.join("_txn").join(topic).join(partition.to_string());
    let mut out = HashSet::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_err(&dir))?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        out.extend(manifest_files(&path)?.into_iter().map(|f| root.join(f)));
    }
    Ok(out)
}

/// `date=2026-11-27/hour=07` → the epoch ms of that hour.
fn hour_of(date: &str, hour: &str) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(date.strip_prefix("date=")?, "%Y-%m-%d").ok()?;
    let h: u32 = hour.strip_prefix("hour=")?.parse().ok()?;
    Some(d.and_hms_opt(h, 0, 0)?.and_utc().timestamp_millis())
}

/// A Hive-partitioned table's hour directories with the epoch ms of their hour.
pub(crate) fn table_hours(root: &Path, table: &str) -> Result<Vec<(i64, PathBuf)>, SinkError> {
    let events = root.join(table);
    let mut out = Vec::new();
    let Ok(dates) = fs::read_dir(&events) else {
        return Ok(out);
    };
    for date in dates {
        let date = date.map_err(io_err(&events))?.path();
        let Ok(hours) = fs::read_dir(&date) else {
            continue;
        };
        for hour in hours {
            let hour = hour.map_err(io_err(&date))?.path();
            let (Some(d), Some(h)) = (
                date.file_name().and_then(|s| s.to_str()),
                hour.file_name().and_then(|s| s.to_str()),
            ) else {
                continue;
            };
            if let Some(t) = hour_of(d, h) {
                out.push((t, hour));
            }
        }
    }
    Ok(out)
}

/// The partition's committed `events` files of jobs past offset `after`, grouped by job
/// (`(first, last)` offsets; a job's events may span several hour directories), in offset
/// order. Files of jobs whose manifest is still pending are left out (Kafka delivers them
/// again).
pub(crate) fn committed_jobs(
    root: &Path,
    topic: &str,
    partition: i32,
    after: i64,
) -> Result<std::collections::BTreeMap<(i64, i64), Vec<PathBuf>>, SinkError> {
    let pending = pending_files(root, topic, partition)?;
    let mut jobs: std::collections::BTreeMap<(i64, i64), Vec<PathBuf>> = Default::default();
    // Every hour directory (a lower bound that rounds to an hour without overflowing).
    for f in partition_files(root, topic, partition, i64::MIN / 2)? {
        if pending.contains(&f) {
            continue;
        }
        let range = f
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| {
                s.rsplitn(3, '-')
                    .collect::<Vec<_>>()
                    .get(..2)
                    .map(|v| v.to_vec())
            })
            .and_then(|v| Some((v[1].parse::<i64>().ok()?, v[0].parse::<i64>().ok()?)));
        if let Some((first, last)) = range
            && first > after
        {
            jobs.entry((first, last)).or_default().push(f);
        }
    }
    Ok(jobs)
}

/// The partition's events files in hour directories at or after `from_ms`'s hour.
fn partition_files(
    root: &Path,
    topic: &str,
    partition: i32,
    from_ms: i64,
) -> Result<Vec<PathBuf>, SinkError> {
    let prefix = format!("part-{topic}-{partition}-");
    let from_hour = from_ms.div_euclid(HOUR_MS) * HOUR_MS;
    let mut out = Vec::new();
    for (t, hour) in table_hours(root, "events")? {
        if t < from_hour {
            continue;
        }
        for f in fs::read_dir(&hour).map_err(io_err(&hour))? {
            let f = f.map_err(io_err(&hour))?.path();
            let Some(name) = f.file_name().and_then(|s| s.to_str()) else {
                continue;
            };
            // `part-<topic>-<partition>-<first>-<last>.parquet`: after the prefix come
            // exactly two numbers, which tells `t-1-…` from topic `t-1`'s partitions.
            let Some(rest) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".parquet"))
            else {
                continue;
            };
            let mut nums = rest.split('-');
            let ok = nums.next().is_some_and(|a| a.parse::<i64>().is_ok())
                && nums.next().is_some_and(|b| b.parse::<i64>().is_ok())
                && nums.next().is_none();
            if ok {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn rebuild_partition(
    stage: &mut MetricsStage,
    root: &Path,
    topic: &str,
    partition: i32,
    now_ms: i64,
) -> Result<u64, SinkError> {
    let started = std::time::Instant::now();
    let closed = stage.windows.closed_through();
    // Without a close position (first run, or a root written before metrics existed), only
    // the last roll-up period is worth rebuilding.
    let horizon = if closed == i64::MIN {
        now_ms - stage.config.window.rollup_ms
    } else {
        closed
    };
    let pending = pending_files(root, topic, partition)?;
    let files = partition_files(root, topic, partition, horizon)?;
    let dims = stage.config.window.dimensions.clone();
    let columns = event_columns(&dims, stage.samples(), stage.quality().is_some());
    let from_offset = stage.counted(topic, partition);
    let mut next = from_offset;
    let mut counted = 0u64;
    let mut skipped_files = 0;
    let lane = stage.lane(topic, partition);
    stage.windows.register_lane(lane, now_ms);
    for path in &files {
        if pending.contains(path) {
            skipped_files += 1;
            continue;
        }
        for batch in read_parquet(path, Some(&columns))? {
            counted += observe_batch(stage, &batch, horizon, from_offset, &mut next, lane);
        }
    }
    stage.set_counted(topic, partition, next);
    if counted > 0 || skipped_files > 0 {
        info!(topic, partition, events = counted, files = files.len() - skipped_files, skipped_pending = skipped_files, since = %fmt_ms(horizon), elapsed = ?started.elapsed(), "rebuilt open metrics windows from events");
    }
    Ok(counted)
}

fn observe_batch(
    stage: &mut MetricsStage,
    batch: &RecordBatch,
    horizon: i64,
    from_offset: i64,
    next: &mut i64,
    lane: usize,
) -> u64 {
    let mut n = 0;
    for_each_event(batch, |offset, e| {
        if offset < from_offset {
            return;
        }
        *next = (*next).max(offset + 1);
        if e.timestamp_ms < horizon {
            return;
        }
        stage.observe(e, lane);
        n += 1;
    });
    n
}

/// Every row of an `events` batch as an event (the columns read: see [`rebuild_partition`]),
/// with its source offset.
pub(crate) fn for_each_event(batch: &RecordBatch, mut visit: impl FnMut(i64, &LlmEvent<'_>)) {
    let str_col = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
    };
    let f64_col = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Float64Type>())
    };
    let i64_col = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
    };
    let Some(ts) = batch
        .column_by_name("timestamp")
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
    else {
        return;
    };
    let Some(offsets) = i64_col("source_offset") else {
        return;
    };
    let fields: Vec<_> = DIMENSION_FIELDS.iter().map(|f| str_col(f)).collect();
    let field = |i: usize, row: usize| -> Option<Cow<'_, str>> {
        let c = fields[i]?;
        (!c.is_null(row)).then(|| Cow::Borrowed(c.value(row)))
    };
    let idx = |name: &str| {
        DIMENSION_FIELDS
            .iter()
            .position(|f| *f == name)
            .expect("known field")
    };
    let f = |c: Option<&arrow::array::Float64Array>, row: usize| {
        c.and_then(|c| (!c.is_null(row)).then(|| c.value(row)))
    };
    let i = |c: Option<&arrow::array::Int64Array>, row: usize| {
        c.and_then(|c| (!c.is_null(row)).then(|| c.value(row)))
    };
    let (lat, ttft, cost) = (
        f64_col("latency_ms"),
        f64_col("ttft_ms"),
        f64_col("cost_usd"),
    );
    let toks = [
        i64_col("input_tokens"),
        i64_col("output_tokens"),
        i64_col("cache_read_tokens"),
        i64_col("cache_write_tokens"),
        i64_col("reasoning_tokens"),
    ];
    let cost_source = str_col("cost_source");
    let (event_id, input, output, session) = (
        str_col("event_id"),
        str_col("input"),
        str_col("output"),
        str_col("session_id"),
    );
    let (expected, system, feedback) =
        (str_col("expected"), str_col("system"), f64_col("feedback"));
    let feedback_for = str_col("feedback_for");
    fn text(c: Option<&arrow::array::StringArray>, row: usize) -> Option<Cow<'_, str>> {
        let c = c?;
        (!c.is_null(row)).then(|| Cow::Borrowed(c.value(row)))
    }
    let attrs = batch
        .column_by_name("attributes")
        .and_then(|c| c.as_map_opt());
    for row in 0..batch.num_rows() {
        let mut attributes = Vec::new();
        if let Some(m) = attrs
            && !m.is_null(row)
        {
            let entries = m.value(row);
            let k = entries.column(0).as_string::<i32>();
            let v = entries.column(1).as_string::<i32>();
            for j in 0..entries.len() {
                if !v.is_null(j) {
                    attributes.push((
                        Cow::Owned(k.value(j).to_owned()),
                        Cow::Owned(v.value(j).to_owned()),
                    ));
                }
            }
        }
        let e = LlmEvent {
            timestamp_ms: ts.value(row),
            app: field(idx("app"), row),
            environment: field(idx("environment"), row),
            operation: field(idx("operation"), row),
            provider: field(idx("provider"), row),
            model: field(idx("model"), row),
            response_model: field(idx("response_model"), row),
            prompt_id: field(idx("prompt_id"), row),
            prompt_version: field(idx("prompt_version"), row),
            variant: field(idx("variant"), row),
            experiment: field(idx("experiment"), row),
            status: field(idx("status"), row).unwrap_or(Cow::Borrowed("ok")),
            finish_reason: field(idx("finish_reason"), row),
            error_type: field(idx("error_type"), row),
            latency_ms: f(lat, row),
            ttft_ms: f(ttft, row),
            input_tokens: i(toks[0], row),
            output_tokens: i(toks[1], row),
            cache_read_tokens: i(toks[2], row),
            cache_write_tokens: i(toks[3], row),
            reasoning_tokens: i(toks[4], row),
            cost_usd: f(cost, row),
            cost_source: cost_source
                .and_then(|c| (!c.is_null(row)).then(|| c.value(row)))
                .and_then(CostSource::parse)
                .map(CostSource::as_str),
            attributes,
            event_id: text(event_id, row).unwrap_or_default(),
            input: text(input, row),
            output: text(output, row),
            session_id: text(session, row),
            expected: text(expected, row),
            system: text(system, row),
            feedback: f(feedback, row),
            feedback_for: text(feedback_for, row),
            ..Default::default()
        };
        visit(offsets.value(row), &e);
    }
}

/// The `events` columns [`for_each_event`] reads for series of `dims`; with the texts when
/// `texts` (drift sampling), and what scorers read when `quality`.
pub(crate) fn event_columns(dims: &[Dimension], texts: bool, quality: bool) -> Vec<&'static str> {
    let mut columns: Vec<&str> = vec![
        "timestamp",
        "latency_ms",
        "ttft_ms",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "cost_usd",
        "cost_source",
        "finish_reason",
        "error_type",
        "status",
        "source_offset",
    ];
    columns.extend(DIMENSION_FIELDS);
    if dims.iter().any(|d| matches!(d, Dimension::Attribute(_))) {
        columns.push("attributes");
    }
    if texts {
        // The sampler keys on the session when there is one (one text per conversation).
        columns.extend(["event_id", "input", "output", "session_id"]);
    }
    if quality {
        for c in [
            "event_id",
            "input",
            "output",
            "expected",
            "system",
            "feedback",
            "attributes",
        ] {
            if !columns.contains(&c) {
                columns.push(c);
            }
        }
    }
    columns
}

/// The Parquet files of `table` in the hour partitions that overlap `from_ms..to_ms`, sorted.
pub(crate) fn table_files(
    root: &Path,
    table: &str,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<PathBuf>, SinkError> {
    let mut files = Vec::new();
    for (t, hour) in table_hours(root, table)? {
        if t + HOUR_MS <= from_ms || t >= to_ms {
            continue;
        }
        for f in fs::read_dir(&hour).map_err(io_err(&hour))? {
            let f = f.map_err(io_err(&hour))?.path();
            if f.extension().is_some_and(|x| x == "parquet") {
                files.push(f);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every event of every partition with a time in `from_ms..to_ms`, read from the `events`
/// files of those hours (all of them: a file whose manifest is still pending holds records
/// that were counted before a crash and come back as late). Returns the number visited.
pub(crate) fn events_between(
    root: &Path,
    from_ms: i64,
    to_ms: i64,
    columns: &[&str],
    mut visit: impl FnMut(&LlmEvent<'_>),
) -> Result<u64, SinkError> {
    let files = table_files(root, "events", from_ms, to_ms)?;
    let mut n = 0;
    for path in &files {
        for batch in read_parquet_between(path, Some(columns), Some((from_ms, to_ms)))? {
            for_each_event(&batch, |_, e| {
                if (from_ms..to_ms).contains(&e.timestamp_ms) {
                    visit(e);
                    n += 1;
                }
            });
        }
    }
    Ok(n)
}
