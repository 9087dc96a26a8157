//! Test fixtures: a real Kafka-protocol broker on 127.0.0.1 (librdkafka's mock cluster, hosted
//! by the test process so it outlives the telltale processes the tests kill), telltale as a
//! child process, and DataFusion over what it wrote.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use telltale::demo::{GeneratedRecord, TrafficGenerator};

pub const T_START: i64 = 1_795_752_000_000; // 2026-11-27T04:00:00Z

pub struct Broker {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub servers: String,
}

impl Broker {
    pub fn start() -> Broker {
        let cluster = MockCluster::new(1).expect("mock cluster starts");
        let servers = cluster.bootstrap_servers();
        Broker { cluster, servers }
    }

    pub fn topic(&self, name: &str, partitions: i32) {
        self.cluster
            .create_topic(name, partitions, 1)
            .expect("topic created");
    }

    /// Produces records and waits for every acknowledgement.
    pub fn produce(&self, topic: &str, records: &[GeneratedRecord]) {
        let p = telltale::replay::producer(&self.servers, &[]).expect("producer");
        for r in records {
            telltale::replay::send(&p, topic, r.key.as_deref().map(str::as_bytes), &r.payload)
                .expect("send");
        }
        telltale::replay::finish(&p, records.len() as u64).expect("all records acknowledged");
    }

    /// (committed offset, high watermark) per partition for `group`.
    pub fn lag(&self, group: &str, topic: &str, partitions: i32) -> Vec<(i64, i64)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", group)
            .create()
            .expect("lag consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed offsets");
        (0..partitions)
            .map(|p| {
                let (_, high) = c
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .expect("watermarks");
                let off = match committed.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                (off, high)
            })
            .collect()
    }

    /// Waits until `group` has committed everything in `topic`.
    pub fn wait_caught_up(&self, group: &str, topic: &str, partitions: i32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let lag = self.lag(group, topic, partitions);
            if lag.iter().all(|(c, h)| c == h) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {group} did not catch up within {timeout:?}: {lag:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `n` records from the generator, one malformed every `malformed_every`.
pub fn traffic(seed: u64, n: u64, malformed_every: Option<u64>) -> Vec<GeneratedRecord> {
    TrafficGenerator::new(seed, T_START, 3 * 3_600_000, n)
        .malformed_every(malformed_every)
        .take(n as usize)
        .collect()
}

pub fn pipeline_file(
    dir: &Path,
    brokers: &str,
    topic: &str,
    group: &str,
    extra_sink: &str,
) -> PathBuf {
    let root = dir.join("data");
    let text = format!(
        r#"
[pipeline]
name = "test"
data_root = "{root}"

[source]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"

[source.properties]
"session.timeout.ms" = "3000"
"heartbeat.interval.ms" = "300"
"fetch.wait.max.ms" = "50"

[telemetry]
listen = "off"

[sink]
{extra_sink}
"#,
        root = root.display()
    );
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn telltale() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_telltale"));
    c.env("RUST_LOG", "info").stdin(Stdio::null());
    c
}

/// Runs a command to completion and asserts it succeeded, showing its output if not.
pub fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("telltale starts");
    assert!(
        out.status.success(),
        "{:?} failed ({}):\n{}\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `telltale run --pipeline <pipeline> --source file:<files>` (a path or a glob), which must
/// succeed.
pub fn run_files(pipeline: &Path, files: &Path) -> Output {
    succeed(
        telltale()
            .args(["run", "--pipeline"])
            .arg(pipeline)
            .arg("--source")
            .arg(format!("file:{}", files.display())),
    )
}

/// Starts `telltale run`, appending its logs (at `RUST_LOG=info`) to `log`.
pub fn spawn_run(pipeline: &Path, log: &Path) -> Child {
    spawn_run_logging(pipeline, log, "info")
}

/// Starts `telltale run` with the given `RUST_LOG` filter, appending its logs to `log`.
pub fn spawn_run_logging(pipeline: &Path, log: &Path, rust_log: &str) -> Child {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    telltale()
        .env("RUST_LOG", rust_log)
        .args(["run", "--pipeline"])
        .arg(pipeline)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("telltale starts")
}

pub fn terminate(child: &mut Child) -> ExitStatus {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "telltale did not stop within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sql(root: &Path, q: &str) -> Vec<RecordBatch> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(telltale::query::run_sql(root, q))
        .unwrap_or_else(|e| panic!("{q}: {e}"))
}

/// The first column of a query result as strings.
pub fn strings(batches: &[RecordBatch]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let s = col.as_string::<i32>();
        for i in 0..s.len() {
            out.push(s.value(i).to_owned());
        }
    }
    out
}

/// Counts of a `key, count` query.
pub fn counts(batches: &[RecordBatch]) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for b in batches {
        let k = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let v = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::Int64).unwrap();
        let (k, v) = (
            k.as_string::<i32>(),
            v.as_primitive::<arrow::datatypes::Int64Type>(),
        );
        for i in 0..b.num_rows() {
            out.insert(k.value(i).to_owned(), v.value(i));
        }
    }
    out
}

pub fn scalar(root: &Path, q: &str) -> i64 {
    let b = sql(root, q);
    let col = arrow::compute::cast(b[0].column(0), &arrow::datatypes::DataType::Int64).unwrap();
    col.as_primitive::<arrow::datatypes::Int64Type>().value(0)
}

/// Files under `dir` whose name ends with `suffix`.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

/// Asserts that the tables hold each expected event id once and each expected reject once.
pub fn assert_exactly_once(root: &Path, records: &[GeneratedRecord], skip_empty: bool) {
    let mut expected_ids: Vec<String> = records.iter().filter_map(|r| r.event_id.clone()).collect();
    expected_ids.sort();
    let mut ids = strings(&sql(root, "SELECT event_id FROM events"));
    ids.sort();
    let dupes: Vec<_> = ids
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0].clone())
        .collect();
    assert!(
        dupes.is_empty(),
        "{} duplicated event ids, e.g. {:?}",
        dupes.len(),
        &dupes[..dupes.len().min(5)]
    );
    assert_eq!(
        ids.len(),
        expected_ids.len(),
        "events rows vs valid records produced"
    );
    assert_eq!(ids, expected_ids, "the same event ids");

    let mut expected_rejects: HashMap<String, i64> = HashMap::new();
    for r in records {
        if let Some(reason) = r.expected_reject
            && !(skip_empty && reason == "empty_record")
        {
            *expected_rejects.entry(reason.to_owned()).or_default() += 1;
        }
    }
    let got = counts(&sql(
        root,
        "SELECT reason, count(*) FROM rejects GROUP BY reason",
    ));
    assert_eq!(got, expected_rejects, "rejects by reason");
    let dup_rejects = scalar(
        root,
        "SELECT count(*) FROM (SELECT topic, partition, \"offset\" FROM rejects GROUP BY 1, 2, 3 HAVING count(*) > 1)",
    );
    assert_eq!(dup_rejects, 0, "each rejected record appears once");
}

/// A port that was free a moment ago, for a server the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` over HTTP/1.1; (status code, body), or `None` when nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}
