//! The pipeline against a real Kafka-protocol broker, with telltale as a child process.

use std::time::{Duration, Instant};

use arrow::array::AsArray;
use rand::{Rng, SeedableRng};

use crate::support::*;

/// Valid and malformed records in, each exactly once in Parquet out; SIGTERM exits 0 with
/// everything committed; `telltale sql` reads the result.
#[test]
fn consumes_topic_into_events_and_rejects() {
    let broker = Broker::start();
    broker.topic("llm", 3);
    let records = traffic(1, 1500, Some(50));
    broker.produce("llm", &records);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "llm",
        "basic",
        "roll_size = \"256KiB\"\nroll_interval = \"300ms\"",
    );
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&pipeline, &log);
    broker.wait_caught_up("basic", "llm", 3, Duration::from_secs(60));
    let status = terminate(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{stderr}");
    assert!(stderr.contains("done: 1500 records read"), "{stderr}");

    let root = dir.path().join("data");
    assert_exactly_once(&root, &records, false);
    assert!(files_with_suffix(&root, ".tmp").is_empty());

    // The same answer through the CLI, as a user would ask it.
    let out = succeed(
        telltale()
            .args(["sql", "--format", "csv", "--data-dir"])
            .arg(&root)
            .arg("SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM events"),
    );
    let valid = records.iter().filter(|r| r.event_id.is_some()).count();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("n,ids\n{valid},{valid}\n")
    );

    // Rejects keep their Kafka coordinates and their raw bytes, whole.
    let batches = sql(
        &root,
        "SELECT raw, raw_size, \"offset\" FROM rejects WHERE topic = 'llm' AND NOT raw_truncated",
    );
    let mut kept = 0;
    for b in &batches {
        let (raw, size) = (
            b.column(0).as_binary::<i32>(),
            b.column(1).as_primitive::<arrow::datatypes::Int64Type>(),
        );
        for i in 0..b.num_rows() {
            assert_eq!(raw.value(i).len() as i64, size.value(i));
            kept += 1;
        }
    }
    let produced_bad: Vec<&[u8]> = records
        .iter()
        .filter(|r| r.expected_reject.is_some())
        .map(|r| r.payload.as_slice())
        .collect();
    assert_eq!(kept, produced_bad.len());
}

/// kill -9 mid-batch (between writing files and committing offsets), restart each time: nothing lost, nothing duplicated, lag zero.
#[test]
fn kill_dash_nine_loses_and_duplicates_nothing() {
    let broker = Broker::start();
    let partitions = 4;
    broker.topic("crash", partitions);
    let dir = tempfile::tempdir().unwrap();
    // Small, frequent batches: many commit windows for the kills to land in.
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "crash",
        "crash",
        "roll_size = \"48KiB\"\nroll_interval = \"150ms\"\ndebug_commit_delay = \"60ms\"",
    );
    let log = dir.path().join("run.log");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    let mut all = Vec::new();
    let rounds = 5;
    for round in 0..rounds {
        let chunk = traffic(100 + round, 800, Some(40));
        broker.produce("crash", &chunk);
        all.extend(chunk);
        let root = dir.path().join("data");
        let manifests_before = files_with_suffix(&root.join("_txn"), ".json");
        let assigned_before = assignments(&log);
        let mut child = spawn_run(&pipeline, &log);
        // Wait for this process to get its partitions (the group first waits out the killed
        // member's session), then for a batch of its own to be in flight: a new manifest
        // means files are being written and not yet committed. The failpoint holds that
        // window open for at least 2 × 60 ms; kill somewhere inside it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while assignments(&log) == assigned_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        while Instant::now() < deadline
            && files_with_suffix(&root.join("_txn"), ".json")
                .iter()
                .all(|m| manifests_before.contains(m))
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..80)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let last = traffic(999, 800, Some(40));
    broker.produce("crash", &last);
    all.extend(last);
    let mut child = spawn_run(&pipeline, &log);
    broker.wait_caught_up("crash", "crash", partitions, Duration::from_secs(120));
    let status = terminate(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{stderr}");

    // The kills must have landed between writing and committing, or this test proves little.
    let rollbacks = stderr
        .matches("rolled back files of an uncommitted batch")
        .count();
    assert!(
        rollbacks >= 1,
        "no kill interrupted a batch between write and commit; log:\n{stderr}"
    );
    eprintln!("{rounds} kills, {rollbacks} uncommitted batches rolled back on restart");

    let root = dir.path().join("data");
    assert_exactly_once(&root, &all, false);
    assert!(
        files_with_suffix(&root, ".tmp").is_empty(),
        "temporary files of rolled-back batches are removed"
    );
    let lag = broker.lag("crash", "crash", partitions);
    assert!(
        lag.iter().all(|(c, h)| c == h),
        "consumer lag is zero: {lag:?}"
    );
}

/// Two processes share the partitions; one leaves; the survivor takes over; exactly once.
#[test]
fn rebalance_between_two_processes_is_exactly_once() {
    let broker = Broker::start();
    let partitions = 6;
    broker.topic("shared", partitions);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "shared",
        "pair",
        "roll_size = \"64KiB\"\nroll_interval = \"200ms\"",
    );
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut all = traffic(7, 1200, Some(60));
    broker.produce("shared", &all);
    let mut a = spawn_run(&pipeline, &log_a);
    let mut b = spawn_run(&pipeline, &log_b);
    // Wait until both members hold partitions at the same time.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let la = std::fs::read_to_string(&log_a).unwrap_or_default();
        let lb = std::fs::read_to_string(&log_b).unwrap_or_default();
        if last_assignment(&la).is_some_and(|n| n > 0 && n < partitions)
            && last_assignment(&lb).is_some_and(|n| n > 0 && n < partitions)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two members never shared the partitions:\nA:\n{la}\nB:\n{lb}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let more = traffic(8, 1200, Some(60));
    broker.produce("shared", &more);
    all.extend(more);
    // A leaves the group cleanly while traffic flows; B takes over its partitions.
    let status = terminate(&mut a);
    assert!(status.success(), "A exit {status}");
    let last = traffic(9, 1200, Some(60));
    broker.produce("shared", &last);
    all.extend(last);
    broker.wait_caught_up("pair", "shared", partitions, Duration::from_secs(120));
    let lb = std::fs::read_to_string(&log_b).unwrap();
    assert_eq!(
        last_assignment(&lb),
        Some(partitions),
        "B ends up with every partition:\n{lb}"
    );
    let status = terminate(&mut b);
    assert!(status.success(), "B exit {status}");
    assert_exactly_once(&dir.path().join("data"), &all, false);
}

fn assignments(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("partitions assigned")
        .count()
}

/// The partition count of the last "partitions assigned" line in a log.
fn last_assignment(log: &str) -> Option<i32> {
    log.lines()
        .filter(|l| l.contains("partitions assigned"))
        .filter_map(|l| {
            l.split("partitions=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next_back()
}

/// A backlog and a slow writer: the consumer pauses its partitions instead of buffering
/// without bound, and the result is still exactly once.
#[test]
fn backpressure_pauses_consumer_and_loses_nothing() {
    let broker = Broker::start();
    let partitions = 8;
    broker.topic("backlog", partitions);
    let records = traffic(21, 8_000, None);
    broker.produce("backlog", &records);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "backlog",
        "slow",
        "roll_size = \"256KiB\"\nroll_interval = \"200ms\"\nmax_buffered = \"1MiB\"\nqueue_depth = 1\ndebug_commit_delay = \"20ms\"",
    );
    let log = dir.path().join("run.log");
    let mut child = spawn_run_logging(&pipeline, &log, "info,telltale=debug");
    broker.wait_caught_up("slow", "backlog", partitions, Duration::from_secs(120));
    let status = terminate(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{stderr}");
    let pauses = stderr
        .matches("writer queue full; partitions paused")
        .count();
    assert!(pauses > 0, "the consumer never paused:\n{stderr}");
    eprintln!("paused {pauses} times");
    assert_exactly_once(&dir.path().join("data"), &records, false);
}

/// `/metrics`, `/healthz` and `/readyz` of a running pipeline, read with a real exposition
/// format parser: progress counters, per-partition lag, rows of the metrics table, and the
/// per-series gauges of the last closed window.
#[test]
fn prometheus_endpoint_reports_progress_lag_and_series() {
    let broker = Broker::start();
    broker.topic("prom", 2);
    let records = traffic(77, 3000, Some(100));
    broker.produce("prom", &records);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pipeline = dir.path().join("prom.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[pipeline]
data_root = "{root}"
[source]
type = "kafka"
brokers = "{brokers}"
topics = ["prom"]
group_id = "prom"
[source.properties]
"session.timeout.ms" = "3000"
"heartbeat.interval.ms" = "300"
"statistics.interval.ms" = "500"
[sink]
roll_interval = "200ms"
[metrics]
allowed_lateness = "30s"
[telemetry]
listen = "127.0.0.1:{port}"
"#,
            root = dir.path().join("data").display(),
            brokers = broker.servers
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&pipeline, &log);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut health = None;
    while health.is_none() && Instant::now() < deadline {
        health = http_get(port, "/healthz");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(health.map(|h| h.0), Some(200), "/healthz answers");
    while http_get(port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "/readyz never became ready; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    broker.wait_caught_up("prom", "prom", 2, Duration::from_secs(60));

    let value = |s: &prometheus_parse::Sample| match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    };
    // Lag comes from librdkafka's statistics every 500 ms; wait for both partitions at 0.
    let mut scrape;
    loop {
        let (status, body) = http_get(port, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200);
        scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("valid exposition format");
        let lag: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "telltale_consumer_lag")
            .map(value)
            .collect();
        if lag.len() == 2 && lag.iter().all(|v| *v == 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "lag never reached 0 on both partitions: {lag:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let get = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(value)
            .collect::<Vec<f64>>()
    };
    assert_eq!(
        get("telltale_records_total", Some(("outcome", "read"))),
        vec![3000.0]
    );
    assert_eq!(
        get("telltale_records_total", Some(("outcome", "rejected"))),
        vec![30.0]
    );
    assert_eq!(get("telltale_ready", None), vec![1.0]);
    // Three hours of event time went by: windows closed and were written.
    let rows = get("telltale_sink_rows_total", Some(("table", "metrics")));
    assert!(rows[0] > 100.0, "metrics rows written: {rows:?}");
    let rps = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "telltale_series_requests_per_second")
        .collect::<Vec<_>>();
    assert!(
        !rps.is_empty() && rps.len() <= 50,
        "bounded per-series gauges: {}",
        rps.len()
    );
    assert!(
        rps.iter()
            .all(|s| s.labels.get("app").is_some() && s.labels.get("prompt_version").is_some())
    );
    assert!(!get("telltale_series_latency_ms", Some(("quantile", "0.99"))).is_empty());

    let status = terminate(&mut child);
    assert!(status.success(), "exit {status}");
}
