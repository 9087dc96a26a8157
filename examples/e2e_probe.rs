//! Diagnoses end-to-end throughput: in-process broker → pipeline, printing progress every 250 ms.
//! `cargo run --release --example e2e_probe -- [records] [partitions] [event-time span ms]`
//! (`TELLTALE_PROBE_METRICS=0` runs without the metrics stage)
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use telltale::config::{PipelineConfig, SinkConfig};
use telltale::demo::TrafficGenerator;
use telltale::ingest::{self, Shutdown};
use telltale::telemetry::Stats;

fn main() {
    telltale::telemetry::init_logging("warn");
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let partitions: i32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let span: i64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(3_600_000);
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("probe", partitions, 1).unwrap();
    let servers = cluster.bootstrap_servers();
    let t = Instant::now();
    let traffic = TrafficGenerator::new(5, 1_795_752_000_000, span, n).malformed_every(None);
    telltale::demo::produce(&servers, "probe", traffic, n).unwrap();
    println!("produced {n} in {:?}", t.elapsed());
    let dir = tempfile::tempdir().unwrap();
    let sink = SinkConfig {
        roll_size: 16 << 20,
        roll_interval: Duration::from_millis(500),
        ..SinkConfig::default()
    };
    let mut config = PipelineConfig::kafka(&servers, "probe", "probe", dir.path(), sink);
    // TELLTALE_PROBE_METRICS=0: the backbone alone.
    config.metrics.enabled = std::env::var("TELLTALE_PROBE_METRICS").as_deref() != Ok("0");
    // The metrics stage alone (drift samples on the same path; it has its own bench).
    config.drift.enabled = false;
    config.harvest.enabled = false;
    let stats = Arc::new(Stats::default());
    let shutdown = Shutdown::new();
    let (s2, sh2) = (stats.clone(), shutdown.clone());
    let start = Instant::now();
    let h = std::thread::Builder::new()
        .name("telltale-ingest".into())
        .spawn(move || ingest::run(&config, s2, sh2))
        .unwrap();
    while stats.records_committed.load(Ordering::Relaxed) < n {
        std::thread::sleep(Duration::from_millis(250));
        let s = stats.snapshot();
        println!(
            "{:>6.2}s in={} committed={} files={} pauses={}",
            start.elapsed().as_secs_f64(),
            s.records_in,
            s.records_committed,
            s.files_written,
            s.backpressure_pauses
        );
    }
    println!("{n} events in {:?}", start.elapsed());
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?");
    println!("peak RSS of the whole process (broker holding the backlog included): {hwm}");
    shutdown.trigger();
    h.join().unwrap().unwrap();
    for table in ["events", "rejects", "metrics"] {
        let files = glob::glob(&format!("{}/{table}/*/*/*.parquet", dir.path().display()))
            .unwrap()
            .count();
        println!("{table}: {files} files");
    }
}
