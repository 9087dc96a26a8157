use super::*;
use crate::decode::{DecodeError, RejectReason};
use crate::event::SourceRecord;
use crate::event::{EventBatchBuilder, LlmEvent, Provenance};
use crate::rejects::RejectBatchBuilder;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_795_752_000_000; // 2026-11-27T04:00:00Z

fn job(first: i64, timestamps: &[i64], rejects: usize) -> SinkJob {
    let mut b = EventBatchBuilder::new();
    let mut hours = Vec::new();
    for (i, ts) in timestamps.iter().enumerate() {
        let e = LlmEvent {
            event_id: format!("e{}", first + i as i64).into(),
            timestamp_ms: *ts,
            status: "ok".into(),
            ..Default::default()
        };
        b.append(
            &e,
            &Provenance {
                format: "telltale",
                topic: "t",
                partition: 0,
                offset: first + i as i64,
            },
        );
        hours.push(ts.div_euclid(HOUR));
    }
    let mut r = RejectBatchBuilder::new(16);
    let err = DecodeError {
        reason: RejectReason::InvalidJson,
        message: "bad".into(),
        format: "unknown",
    };
    for i in 0..rejects {
        let off = first + timestamps.len() as i64 + i as i64;
        r.append(
            &SourceRecord {
                topic: "t",
                partition: 0,
                offset: off,
                timestamp_ms: Some(T0),
                key: None,
                payload: Some(b"{oops"),
            },
            &err,
        );
    }
    let n = timestamps.len() + rejects;
    SinkJob {
        topic: "t".into(),
        partition: 0,
        first_offset: first,
        last_offset: first + n as i64 - 1,
        records: n as u64,
        bytes: 100 * n as u64,
        events: b.finish(),
        event_hours: hours,
        scores: crate::quality::table::ScoreBatchBuilder::new().finish(),
        score_hours: Vec::new(),
        deferred: Vec::new(),
        rejects: r.finish(),
        reject_hours: vec![T0.div_euclid(HOUR); rejects],
    }
}

fn parquet_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn rows_in(path: &Path) -> usize {
    let f = fs::File::open(path).unwrap();
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    r.map(|b| b.unwrap().num_rows()).sum()
}

#[test]
fn writes_hive_partitioned_files_named_by_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), SinkConfig::default());
    let j = job(100, &[T0 + 5, T0 + HOUR + 5, T0 + 10], 2);
    let w = sink.write(&j).unwrap();
    assert_eq!(w.files.len(), 3);
    assert_eq!(
        parquet_files(dir.path()),
        [
            "_txn/t/0/100-104.json",
            "events/date=2026-11-27/hour=04/part-t-0-100-104.parquet",
            "events/date=2026-11-27/hour=05/part-t-0-100-104.parquet",
            "rejects/date=2026-11-27/hour=04/part-t-0-100-104.parquet",
        ]
    );
    assert_eq!(
        rows_in(
            &dir.path()
                .join("events/date=2026-11-27/hour=04/part-t-0-100-104.parquet")
        ),
        2
    );
    assert_eq!(
        rows_in(
            &dir.path()
                .join("events/date=2026-11-27/hour=05/part-t-0-100-104.parquet")
        ),
        1
    );
    assert_eq!(
        rows_in(
            &dir.path()
                .join("rejects/date=2026-11-27/hour=04/part-t-0-100-104.parquet")
        ),
        2
    );
    sink.forget(&j);
    assert!(!dir.path().join("_txn/t/0/100-104.json").exists());
}

#[test]
fn rewriting_the_same_job_replaces_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), SinkConfig::default());
    let j = job(0, &[T0, T0 + 1], 0);
    sink.write(&j).unwrap();
    sink.write(&j).unwrap();
    let files = parquet_files(dir.path());
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".parquet")).count(),
        1,
        "{files:?}"
    );
}

#[test]
fn recover_rolls_back_uncommitted_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), SinkConfig::default());
    let committed = job(0, &[T0, T0 + 1], 0); // offsets 0..=1
    let uncommitted = job(2, &[T0 + 2], 1); // offsets 2..=3
    sink.write(&committed).unwrap();
    sink.write(&uncommitted).unwrap();
    // A crash left a half-written temp file of the uncommitted job too.
    let tmp = dir
        .path()
        .join("events/date=2026-11-27/hour=04/part-t-0-2-3.parquet.tmp");
    fs::write(&tmp, b"partial").unwrap();

    // The group resumes at offset 2: the first job was committed, the second was not.
    assert_eq!(sink.recover("t", 0, Some(2)).unwrap(), 1);
    assert_eq!(
        parquet_files(dir.path()),
        ["events/date=2026-11-27/hour=04/part-t-0-0-1.parquet"]
    );
    // Nothing left to do on a second call.
    assert_eq!(sink.recover("t", 0, Some(2)).unwrap(), 0);
}

#[test]
fn recover_without_any_commit_rolls_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), SinkConfig::default());
    sink.write(&job(0, &[T0], 0)).unwrap();
    assert_eq!(sink.recover("t", 0, None).unwrap(), 1);
    assert!(parquet_files(dir.path()).is_empty());
    assert_eq!(
        sink.recover("other", 3, None).unwrap(),
        0,
        "no manifests at all is fine"
    );
}

#[test]
fn recover_keeps_files_when_resume_point_is_inside_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), SinkConfig::default());
    sink.write(&job(0, &[T0, T0, T0], 0)).unwrap(); // offsets 0..=2
    assert_eq!(sink.recover("t", 0, Some(1)).unwrap(), 0);
    assert_eq!(parquet_files(dir.path()).len(), 1);
}

#[test]
fn writer_retries_until_the_directory_is_writable_then_commits() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;
    struct Recorder(Mutex<Vec<(String, i32, i64)>>);
    impl Committer for Recorder {
        fn commit(&self, offsets: &[(&str, i32, i64)]) -> Result<(), String> {
            let mut log = self.0.lock().unwrap();
            log.extend(offsets.iter().map(|(t, p, o)| (t.to_string(), *p, *o)));
            Ok(())
        }
    }
    // Tests may run as root, which ignores permissions: a file where the root should be fails for anyone.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::write(&root, b"a file where the data root should be").unwrap();
    let sink = Sink::new(&root, SinkConfig::default());
    let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
    let stats = Arc::new(Stats::default());
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (rec2, stats2) = (recorder.clone(), stats.clone());
    let handle =
        std::thread::spawn(move || run_writer(rx, sink, rec2, stats2, &|| true, &|_| {}, &|_| {}));
    tx.send(SinkMsg::Jobs(vec![job(0, &[T0], 0)])).unwrap();
    // Let it fail at least once, then repair the root.
    while stats.sink_errors.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        recorder.0.lock().unwrap().is_empty(),
        "nothing is committed before it is durable"
    );
    fs::remove_file(&root).unwrap();
    fs::create_dir(&root).unwrap();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
    tx.send(SinkMsg::Barrier(ack_tx)).unwrap();
    ack_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    drop(tx);
    handle.join().unwrap().unwrap();
    assert_eq!(*recorder.0.lock().unwrap(), [("t".to_owned(), 0, 1)]);
    assert_eq!(stats.events_written.load(Ordering::Relaxed), 1);
}

#[test]
fn reads_skip_row_groups_outside_the_time_range_by_their_statistics() {
    // 3 row groups of 1,024 events: minutes 0, 10 and 20 of an hour.
    let mut b = EventBatchBuilder::new();
    for g in 0..3i64 {
        for i in 0..1_024i64 {
            let e = LlmEvent {
                event_id: format!("e{g}-{i}").into(),
                timestamp_ms: T0 + g * 600_000 + i,
                status: "ok".into(),
                ..Default::default()
            };
            let p = Provenance {
                format: "telltale",
                topic: "t",
                partition: 0,
                offset: g * 1_024 + i,
            };
            b.append(&e, &p);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.parquet");
    let config = SinkConfig {
        row_group_rows: 1_024,
        ..SinkConfig::default()
    };
    write_parquet(&path, &b.finish(), Table::Events, &config).unwrap();
    let rows = |range: Option<(i64, i64)>| -> usize {
        crate::metrics::rebuild::read_parquet_between(&path, Some(&["timestamp"]), range)
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum()
    };
    assert_eq!(rows(None), 3_072);
    // Minutes 9–11 overlap the second group only; minutes 25–30 none; a range touching the
    // first group's last event and the third's first keeps all three.
    assert_eq!(rows(Some((T0 + 540_000, T0 + 660_000))), 1_024);
    assert_eq!(rows(Some((T0 + 1_500_000, T0 + 1_800_000))), 0);
    assert_eq!(rows(Some((T0 + 1_023, T0 + 1_200_001))), 3_072);
}
