//! Throughput of the backbone, in events/s (criterion's `thrpt`).
//!
//! `cargo bench --bench pipeline` (add `-- decode`, `-- metrics` or `-- end_to_end` to run one
//! group).
//!
//! - `decode`: ~1.5 KB generated events through each step, against a baseline measured in the
//!   same run: parsing the same bytes into a `serde_json::Value`, the cheapest way to read them
//!   at all. Ratios against it show what decoding, Arrow and Parquet (zstd 1) add.
//! - `end_to_end`: an in-process Kafka-protocol broker (librdkafka's mock cluster) holding
//!   100 k events on 64 partitions → consumer group → decode → Arrow → Parquet files fsynced and
//!   renamed → offsets committed. One iteration consumes the whole topic with a fresh group.
//!   Two roll intervals: 500 ms cuts ~650-row files (every Parquet column chunk pays for its own
//!   zstd contexts, so small files cost more per event); 3 s writes one file per partition.
//!   Throughput is timed from the first record (the group join, ~3 s, is reported apart); with
//!   the 3 s roll the wall time includes waiting for the roll, so read its per-CPU figure.
//!   The bench also prints events per CPU-second of telltale's own threads (ingest + writer,
//!   from /proc) and of the whole process (librdkafka's threads and the broker included).
//!   The 500 ms roll runs without and with the metrics stage, for its cost, at two densities
//!   of event time: 100 k events over an hour (60 windows close per run, as when a sparse
//!   backlog is caught up) and over one second (`live_density_*`: a live stream of 100 k
//!   events/s, where a window closes once per 6 M events).
//! - `metrics`: the metrics stage alone: one histogram update at 10 000 live series; one event
//!   into its series' window (series lookup, five histograms, counters) at 1 and at 10 000
//!   live series — the event hot in cache, as a
//!   just-decoded one is; each of 100 k generated events' numbers in turn — and closing a
//!   window of 10 000 series (rows, serialized histograms, the hourly roll-up). Prints the
//!   memory per live series.
//! - `drift`: the drift building blocks (see `fn drift`): embedding texts/s, PCA, and one
//!   window's MMD and centroid tests.
//! - `quality`: the demo's objective scorers per event (JSON Schema, PII, refusal), every event
//!   sampled, against the sampling decision alone.
//! - `harvest`: folding 1 000 failing events into a dataset of 5 000 examples (exact, retyped
//!   and new inputs), against opening the dataset alone.
//! - `experiments`: evaluating two hours of demo traffic (100 k events) from the committed
//!   tables, 24 looks of the demo's experiment, against reading the tables alone; and one look.
//! - `alert`: judging one closed window of 10 000 series (the metrics stage's real rows) with
//!   1 000 rules that all apply to every series, so 10 M rule × series judgements per window,
//!   counted as elements: 980 quiet thresholds over six columns, 10 busy ones (≈ 1 % of the
//!   series over them: ≈ 1 000 alerts pending and firing) and 10 `change` rules against the
//!   trailing hour. The baseline in the same run is one busy rule (10 k judgements).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rdkafka::mocking::MockCluster;
use telltale::config::{PipelineConfig, SinkConfig, SourceConfig};
use telltale::decode::{Decoder, DecoderConfig};
use telltale::demo::TrafficGenerator;
use telltale::event::{EventBatchBuilder, LlmEvent, Provenance};
use telltale::ingest::{self, Shutdown};
use telltale::metrics::{MetricsConfig, MetricsStage};
use telltale::sink::{Table, write_parquet};
use telltale::telemetry::Stats;

const T0: i64 = 1_795_752_000_000;

fn payloads(n: usize) -> Vec<Vec<u8>> {
    TrafficGenerator::new(11, T0, 3_600_000, n as u64)
        .malformed_every(None)
        .take(n)
        .map(|r| r.payload)
        .collect()
}

/// CPU seconds used so far by this process's live threads named `telltale-*` (ingest,
/// writer), per thread name.
fn telltale_threads_cpu_seconds() -> Vec<(String, f64)> {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out: Vec<(String, f64)> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("telltale-") {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| {
            rest.get(n - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let secs = (field(14) + field(15)) / ticks;
        let name = comm.trim().to_owned();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += secs,
            None => out.push((name, secs)),
        }
    }
    out
}

fn cpu_seconds() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn decode(c: &mut Criterion) {
    let n = 20_000;
    let input = payloads(n);
    let mean = input.iter().map(Vec::len).sum::<usize>() / n;
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    let decoder = Decoder::new(DecoderConfig::default());
    let src = Provenance {
        format: "",
        topic: "bench",
        partition: 0,
        offset: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let sink = SinkConfig::default();
    let label = format!("{mean}B");
    {
        let mut builder = EventBatchBuilder::new();
        for p in &input {
            builder.append(&decoder.decode(Some(p), None).unwrap().event, &src);
        }
        let bytes = write_parquet(
            &dir.path().join("size.parquet"),
            &builder.finish(),
            Table::Events,
            &sink,
        )
        .unwrap();
        let raw: usize = input.iter().map(Vec::len).sum();
        eprintln!(
            "decode: {n} events, {raw} bytes of JSON → {bytes} bytes of Parquet ({:.1}x)",
            raw as f64 / bytes as f64
        );
    }

    g.bench_function(BenchmarkId::new("baseline_serde_json_value", &label), |b| {
        b.iter(|| {
            for p in &input {
                let v: serde_json::Value = serde_json::from_slice(p).unwrap();
                std::hint::black_box(v);
            }
        })
    });
    g.bench_function(BenchmarkId::new("decode", &label), |b| {
        b.iter(|| {
            for p in &input {
                std::hint::black_box(decoder.decode(Some(p), None).unwrap());
            }
        })
    });
    g.bench_function(BenchmarkId::new("decode_arrow", &label), |b| {
        let mut builder = EventBatchBuilder::new();
        b.iter(|| {
            for p in &input {
                let d = decoder.decode(Some(p), None).unwrap();
                builder.append(&d.event, &src);
            }
            std::hint::black_box(builder.finish())
        })
    });
    g.bench_function(
        BenchmarkId::new("decode_arrow_parquet_zstd1", &label),
        |b| {
            let mut builder = EventBatchBuilder::new();
            let path = dir.path().join("bench.parquet");
            b.iter(|| {
                for p in &input {
                    let d = decoder.decode(Some(p), None).unwrap();
                    builder.append(&d.event, &src);
                }
                let batch = builder.finish();
                write_parquet(&path, &batch, Table::Events, &sink).unwrap()
            })
        },
    );
    g.finish();
}

/// The numbers of `n` decoded generated events (latency, TTFT, tokens, cost), with their
/// costs computed, and one event to carry them.
/// The first `n` records of `traffic`, decoded (malformed ones left out).
fn decoded(traffic: TrafficGenerator, n: usize) -> Vec<LlmEvent<'static>> {
    let decoder = Decoder::new(DecoderConfig::default());
    traffic
        .take(n)
        .filter_map(|r| {
            Some(
                decoder
                    .decode(Some(&r.payload), None)
                    .ok()?
                    .event
                    .into_owned(),
            )
        })
        .collect()
}

fn measures(n: usize) -> (LlmEvent<'static>, Vec<LlmEvent<'static>>) {
    let decoder = Decoder::new(DecoderConfig::default());
    let prices = telltale::metrics::load_prices(&MetricsConfig::default()).unwrap();
    let all: Vec<LlmEvent<'static>> = payloads(n)
        .iter()
        .map(|p| {
            let mut e = decoder.decode(Some(p), None).unwrap().event.into_owned();
            telltale::metrics::apply_cost(&mut e, Some(&prices));
            // The stage reads no text; keep the events small, as a decoded one is hot.
            (e.input, e.output, e.system, e.input_messages) = (None, None, None, None);
            e.timestamp_ms = T0;
            e
        })
        .collect();
    (all[0].clone(), all)
}

fn metrics(c: &mut Criterion) {
    let n = 100_000;
    let (template, numbers) = measures(n);
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(20);
    let stats = Arc::new(Stats::default());
    // Series names in one buffer, as the decoder hands out slices of the record it read.
    let names: String = (0..10_000).map(|i| format!("app-{i:05}")).collect();
    let name = |i: usize| &names[i * 9..i * 9 + 9];
    // One event, hot in cache as a freshly decoded one is, carrying each record's numbers and
    // series in turn.
    let feed = |stage: &mut MetricsStage, series: usize| {
        use std::borrow::Cow::Borrowed;
        let mut e = LlmEvent {
            timestamp_ms: T0,
            environment: template.environment.as_deref().map(Borrowed),
            model: template.model.as_deref().map(Borrowed),
            prompt_version: template.prompt_version.as_deref().map(Borrowed),
            ..Default::default()
        };
        for (i, x) in numbers.iter().enumerate() {
            e.app = Some(Borrowed(name(i % series)));
            (e.latency_ms, e.ttft_ms) = (x.latency_ms, x.ttft_ms);
            (e.input_tokens, e.output_tokens, e.cost_usd) =
                (x.input_tokens, x.output_tokens, x.cost_usd);
            e.status = Borrowed(&x.status);
            e.error_type = x.error_type.as_deref().map(Borrowed);
            e.finish_reason = x.finish_reason.as_deref().map(Borrowed);
            e.cost_source = x.cost_source;
            stage.observe(&e, 0);
        }
    };
    for series in [1, 10_000] {
        let mut stage = MetricsStage::new(MetricsConfig::default(), "bench", false, stats.clone());
        feed(&mut stage, series);
        if series > 1 {
            let live = stage.windows().live_series();
            eprintln!(
                "metrics: {live} live series hold {:.1} KiB each in their open window (histograms and counters, {} events each)",
                stage.memory_bytes() as f64 / live as f64 / 1024.0,
                n / series
            );
        }
        g.bench_function(
            BenchmarkId::new("observe", format!("{series}_series")),
            |b| b.iter(|| feed(&mut stage, series)),
        );
    }
    // The histogram update alone: each event's latency into its series' histogram, 10 000
    // live series in turn (each histogram cold in cache, as in a busy pipeline).
    let latencies: Vec<u64> = numbers
        .iter()
        .map(|x| x.latency_ms.map_or(1, |v| v.max(1.0) as u64))
        .collect();
    let mut hists: Vec<_> = (0..10_000)
        .map(|_| telltale::metrics::series::new_histogram())
        .collect();
    let record = |hists: &mut [hdrhistogram::Histogram<u32>]| {
        for (i, v) in latencies.iter().enumerate() {
            let h = &mut hists[i % 10_000];
            if h.record(*v).is_err() {
                h.saturating_record(*v);
            }
        }
    };
    record(&mut hists);
    g.bench_function("histogram_record/10000_series", |b| {
        b.iter(|| record(&mut hists))
    });
    g.throughput(Throughput::Elements(10_000));
    g.sample_size(10);
    g.bench_function("close_window/10000_series", |b| {
        b.iter_batched(
            || {
                let mut stage =
                    MetricsStage::new(MetricsConfig::default(), "bench", false, stats.clone());
                feed(&mut stage, 10_000);
                stage
            },
            |mut stage| std::hint::black_box(stage.finish()),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

const HOUR: i64 = 3_600_000;

fn end_to_end(c: &mut Criterion) {
    let half = Duration::from_millis(500);
    // The 100 k events span an hour of event time: 60 windows close during a run, as when a
    // sparse backlog is caught up.
    end_to_end_with(
        c,
        "kafka_to_parquet_zstd1_roll_500ms_no_metrics",
        half,
        false,
        HOUR,
    );
    end_to_end_with(c, "kafka_to_parquet_zstd1_roll_500ms", half, true, HOUR);
    // …or one second of event time, as in a live stream of 100 k events/s, where a window
    // closes once per 6 M events.
    end_to_end_with(c, "live_density_roll_500ms_no_metrics", half, false, 1_000);
    end_to_end_with(c, "live_density_roll_500ms", half, true, 1_000);
    // The metrics stage's cost, measured as pairs run back to back (order alternating), so
    // the VM's drift between variants does not pass for the stage's cost.
    end_to_end_paired(c, "metrics_stage_paired_roll_500ms", half, HOUR);
    end_to_end_paired(c, "metrics_stage_paired_live_density", half, 1_000);
    // One file per partition: closer to production, where files hold a minute or 64 MiB.
    end_to_end_with(
        c,
        "kafka_to_parquet_zstd1_roll_3s",
        Duration::from_secs(3),
        true,
        HOUR,
    );
}

fn end_to_end_with(
    c: &mut Criterion,
    name: &str,
    roll_interval: Duration,
    metrics: bool,
    span_ms: i64,
) {
    let n: u64 = 100_000;
    let (_cluster, servers) = bench_topic(n, span_ms);

    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    let mut run = 0;
    let files = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (mut cpu_total, mut own_cpu_total, mut events_total) = (0.0, 0.0, 0u64);
    let mut join_total = Duration::ZERO;
    let mut per_thread: Vec<(String, f64)> = Vec::new();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let r = one_run(
                    &servers,
                    &format!("bench-{name}-{run}"),
                    n,
                    roll_interval,
                    metrics,
                );
                total += r.wall;
                join_total += r.join;
                cpu_total += r.process_cpu;
                own_cpu_total += r.own_cpu;
                for (name, secs) in r.per_thread {
                    match per_thread.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, s)) => *s += secs,
                        None => per_thread.push((name, secs)),
                    }
                }
                events_total += n;
                files.store(r.files, Ordering::Relaxed);
            }
            total
        })
    });
    g.finish();
    eprintln!(
        "end_to_end/{name}: {} Parquet files per run; group join took {:?} on average (excluded from thrpt)",
        files.load(Ordering::Relaxed),
        join_total / run.max(1)
    );
    eprintln!(
        "end_to_end/{name}: {:.0} events per CPU-second of telltale's own threads (ingest + writer); \
         {:.0} per CPU-second of the whole process (with librdkafka and the in-process broker)",
        events_total as f64 / own_cpu_total,
        events_total as f64 / cpu_total
    );
    let split: Vec<String> = per_thread
        .iter()
        .map(|(n, s)| format!("{n} {:.2} µs", s * 1e6 / events_total as f64))
        .collect();
    eprintln!(
        "end_to_end/{name}: CPU per event by thread: {}",
        split.join(", ")
    );
}

/// An in-process broker holding topic `bench` (64 partitions) with `n` generated events over
/// `span_ms` of event time; keep the cluster alive while its servers are used.
fn bench_topic(
    n: u64,
    span_ms: i64,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("bench", 64, 1).unwrap();
    let servers = cluster.bootstrap_servers();
    let traffic = TrafficGenerator::new(5, T0, span_ms, n).malformed_every(None);
    telltale::demo::produce(&servers, "bench", traffic, n).unwrap();
    (cluster, servers)
}

/// What one pipeline run over the bench topic measured.
struct RunMeasure {
    /// From the first record to the last committed (the group join excluded).
    wall: Duration,
    join: Duration,
    /// CPU seconds of telltale's own threads, of the whole process, and per thread name.
    own_cpu: f64,
    process_cpu: f64,
    per_thread: Vec<(String, f64)>,
    files: u64,
}

/// One pipeline run over the topic with a fresh group and data root; drift and harvest off
/// (they sample on the same path and have their own benches).
fn one_run(
    servers: &str,
    group: &str,
    n: u64,
    roll_interval: Duration,
    metrics: bool,
) -> RunMeasure {
    let dir = tempfile::tempdir().unwrap();
    let sink = SinkConfig {
        roll_size: 16 << 20,
        roll_interval,
        ..SinkConfig::default()
    };
    let mut config = PipelineConfig::kafka(servers, "bench", group, dir.path(), sink);
    config.metrics.enabled = metrics;
    config.drift.enabled = false;
    config.harvest.enabled = false;
    if let SourceConfig::Kafka(k) = &mut config.source {
        k.properties.insert("fetch.wait.max.ms".into(), "10".into());
    }
    let stats = Arc::new(Stats::default());
    let shutdown = Shutdown::new();
    let (s2, sh2) = (stats.clone(), shutdown.clone());
    let cpu0 = cpu_seconds();
    let joined = Instant::now();
    let h = std::thread::Builder::new()
        .name("telltale-ingest".into())
        .spawn(move || ingest::run(&config, s2, sh2))
        .unwrap();
    // The consumer group join (a fixed ~3 s: the broker's initial rebalance delay, as in
    // Apache Kafka) is not part of throughput: time from the first record.
    while stats.records_in.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Counters are published every 100 ms: start the clock that much earlier, so the figure
    // can only understate throughput.
    let start = Instant::now() - Duration::from_millis(100);
    while stats.records_committed.load(Ordering::Relaxed) < n {
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = start.elapsed();
    let process_cpu = cpu_seconds() - cpu0;
    let per_thread = telltale_threads_cpu_seconds();
    let own_cpu = per_thread.iter().map(|(_, s)| s).sum();
    shutdown.trigger();
    let snap = h.join().unwrap().unwrap();
    RunMeasure {
        wall,
        join: start - joined,
        own_cpu,
        process_cpu,
        per_thread,
        files: snap.files_written,
    }
}

/// Without and with the metrics stage, as pairs of runs back to back (the order alternating
/// from pair to pair), over the same topic. Criterion times the runs with the stage; the
/// bench prints the median of the pairs' ratios, wall and CPU, which is the stage's cost.
fn end_to_end_paired(c: &mut Criterion, name: &str, roll_interval: Duration, span_ms: i64) {
    let n: u64 = 100_000;
    let (_cluster, servers) = bench_topic(n, span_ms);
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(60));
    let mut run = 0u64;
    // (wall ratio with/without, CPU ratio with/without) per pair.
    let mut pairs: Vec<(f64, f64)> = Vec::new();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let go = |metrics: bool| {
                    let r = one_run(
                        &servers,
                        &format!("{name}-{run}-{metrics}"),
                        n,
                        roll_interval,
                        metrics,
                    );
                    (r.wall, r.own_cpu)
                };
                let (without, with) = if run.is_multiple_of(2) {
                    let w = go(false);
                    (w, go(true))
                } else {
                    let m = go(true);
                    (go(false), m)
                };
                pairs.push((
                    with.0.as_secs_f64() / without.0.as_secs_f64(),
                    with.1 / without.1,
                ));
                total += with.0;
            }
            total
        })
    });
    g.finish();
    if pairs.is_empty() {
        return; // filtered out
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let wall: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let cpu: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    eprintln!(
        "end_to_end/{name}: {} pairs; with/without the metrics stage, median ratio: wall time {:.3}, CPU of telltale's threads {:.3} (wall ratios {:?})",
        pairs.len(),
        median(wall.clone()),
        median(cpu),
        wall.iter()
            .map(|r| (r * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
}

fn alert(c: &mut Criterion) {
    use telltale::alert::{Engine, Frame, rule};
    let stats = Arc::new(Stats::default());
    let (template, numbers) = measures(100_000);
    // A real window of 10 000 series, as the metrics stage writes it.
    let mut stage = MetricsStage::new(MetricsConfig::default(), "bench", false, stats);
    for (i, x) in numbers.iter().enumerate() {
        use std::borrow::Cow::{Borrowed, Owned};
        let e = LlmEvent {
            timestamp_ms: T0,
            app: Some(Owned(format!("app-{:05}", i % 10_000))),
            environment: template.environment.as_deref().map(Borrowed),
            model: template.model.as_deref().map(Borrowed),
            prompt_version: template.prompt_version.as_deref().map(Borrowed),
            latency_ms: x.latency_ms,
            ttft_ms: x.ttft_ms,
            input_tokens: x.input_tokens,
            output_tokens: x.output_tokens,
            cost_usd: x.cost_usd,
            status: Borrowed(&x.status),
            error_type: x.error_type.as_deref().map(Borrowed),
            ..Default::default()
        };
        stage.observe(&e, 0);
    }
    let out = stage.finish().expect("a window closes");
    let batch = out
        .files
        .iter()
        .map(|(_, b)| b.clone())
        .max_by_key(|b| b.num_rows())
        .expect("rows");
    let ctx = telltale::alert::rule_context(&MetricsConfig::default());
    let metrics = [
        "latency_ms_p99",
        "latency_ms_p50",
        "error_rate",
        "ttft_ms_p90",
        "cost_usd_sum",
        "output_tokens_p50",
    ];
    // Each metric's values across the series, sorted: thresholds are set from them.
    let sorted = |m: &str| {
        use arrow::array::AsArray;
        let c = batch.column_by_name(m).expect("metrics column");
        let mut v: Vec<f64> = match c.data_type() {
            arrow::datatypes::DataType::Float64 => c
                .as_primitive::<arrow::datatypes::Float64Type>()
                .iter()
                .flatten()
                .collect(),
            _ => c
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .flatten()
                .map(|x| x as f64)
                .collect(),
        };
        v.sort_by(f64::total_cmp);
        v
    };
    let mut text = String::new();
    for i in 0..1000 {
        let m = metrics[i % metrics.len()];
        let v = sorted(m);
        let rule = if i % 100 == 99 {
            // 10 rules against the trailing hour.
            "change = { ratio_above = 2, trailing = \"1h\" }".to_owned()
        } else if i % 100 == 0 {
            // 10 busy rules: about 1 % of the series over the threshold.
            format!("threshold = {{ above = {} }}", v[v.len() * 99 / 100])
        } else {
            // The rest are quiet, as most rules are most of the time.
            format!(
                "threshold = {{ above = {} }}",
                v[v.len() - 1] * 1.5 + i as f64
            )
        };
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nmetric = \"{m}\"\nmin_samples = 5\nfor = \"3m\"\n{rule}\n"
        ));
    }
    let set = rule::parse_rules(&text, "bench.toml", &ctx).expect("bench rules parse");
    let one = rule::parse_rules(
        &text
            .split("[[rule]]")
            .nth(1)
            .map(|r| format!("[[rule]]{r}"))
            .unwrap(),
        "one.toml",
        &ctx,
    )
    .expect("one rule parses");
    let mut g = c.benchmark_group("alert");
    g.sample_size(10);
    for (name, rules) in [("1_rule", one.rules), ("1000_rules", set.rules)] {
        let n = rules.len() as u64 * batch.num_rows() as u64;
        g.throughput(Throughput::Elements(n));
        let mut engine = Engine::new(rules, ctx.dimensions.clone(), HOUR);
        let mut end = T0;
        g.bench_function(
            BenchmarkId::new(
                "judge_window",
                format!("{name}_x_{}_series", batch.num_rows()),
            ),
            |b| {
                b.iter(|| {
                    end += 60_000;
                    let f = Frame {
                        source: "metrics".into(),
                        resolution_ms: 60_000,
                        start_ms: end - 60_000,
                        end_ms: end,
                        batch: batch.clone(),
                    };
                    std::hint::black_box(engine.evaluate(&f))
                })
            },
        );
    }
    g.finish();
}

/// One window of one series whose median latency is `p50`, ending at `end_ms`.
fn latency_frame(app: &str, end_ms: i64, p50: f64) -> telltale::alert::Frame {
    use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let s = |v: &str| Arc::new(StringArray::from(vec![v.to_owned()])) as arrow::array::ArrayRef;
    let schema = Schema::new(vec![
        Field::new("app", DataType::Utf8, true),
        Field::new("environment", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
        Field::new("prompt_version", DataType::Utf8, true),
        Field::new("events", DataType::Int64, false),
        Field::new("latency_ms_p50", DataType::Float64, true),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            s(app),
            s("prod"),
            s("gpt-4o-mini"),
            s("v4"),
            Arc::new(Int64Array::from(vec![100])),
            Arc::new(Float64Array::from(vec![p50])),
        ],
    )
    .expect("valid frame");
    telltale::alert::Frame {
        source: "metrics".into(),
        resolution_ms: 60_000,
        start_ms: end_ms - 60_000,
        end_ms,
        batch,
    }
}

/// `alert/window_to_notifier`: from handing the alert stage a closed window that crosses a
/// threshold to a real HTTP receiver (axum on 127.0.0.1) answering the webhook: evaluation,
/// grouping (group_wait 0), the notifier thread and the HTTP round trip. One iteration is
/// one alert on a new series; the time is per notification.
fn alert_latency(c: &mut Criterion) {
    use telltale::alert::{AlertStage, AlertingConfig, ReceiverConfig, RulesFrom};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h2 = hits.clone();
    let app = axum::Router::new().fallback(axum::routing::post(move || {
        let h = h2.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    }));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    rt.spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).expect("rules dir");
    std::fs::write(
        rules.join("slow.toml"),
        "[[rule]]\nname = \"Slow\"\nmetric = \"latency_ms_p50\"\nthreshold = { above = 1000 }\n",
    )
    .expect("rule file");
    let mut cfg = AlertingConfig {
        enabled: true,
        rules: RulesFrom::Dir(rules),
        ..AlertingConfig::default()
    };
    cfg.receivers.insert(
        "hook".into(),
        ReceiverConfig::Webhook {
            url: format!("http://127.0.0.1:{port}/hook"),
            secret: Some("s".into()),
        },
    );
    cfg.default_route.receivers = vec!["hook".into()];
    cfg.default_route.group_wait_ms = 0;
    let ctx = telltale::alert::rule_context(&MetricsConfig::default());
    let stage = AlertStage::start(&cfg, &ctx, dir.path(), "bench", Default::default())
        .expect("stage starts");
    let tx = stage.sender();
    let mut g = c.benchmark_group("alert");
    g.sample_size(20);
    let mut n = 0u64;
    g.bench_function("window_to_notifier", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let before = hits.load(Ordering::SeqCst);
                let f = latency_frame(&format!("app-{n}"), T0 + n as i64 * 60_000, 5000.0);
                let t = Instant::now();
                tx.send(vec![f]);
                while hits.load(Ordering::SeqCst) == before {
                    std::thread::yield_now();
                }
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
    drop(stage);
}

/// `drift`: the building blocks' costs. `hash_embed`: texts/s of the hashed bag-of-words
/// embedder on generated prompts (256 dimensions); `static_embed`, `sentence_embed_1_thread`:
/// the same for the model embedders when their files are installed. `kernel_tests` (MMD) /
/// `centroid_test` / `neighbour_test`: one window's tests, 64 current texts against a
/// 256-text reference (the defaults before) and 200 against 1,024 (the defaults now), reduced
/// to 16 PCA dimensions for the kernel, on all 256 dimensions for the centroid and the
/// neighbours, with 999 permutations / bootstraps (enough resolution for a false-alarm rate
/// of 1 in 1,000).
fn drift(c: &mut Criterion) {
    use telltale::drift::embed::{Embedder, HashEmbedder};
    use telltale::drift::stats::{Pca, centroid_test, kernel_tests, neighbour_test};
    let texts: Vec<String> = TrafficGenerator::new(3, T0, HOUR, 2_000)
        .take(2_000)
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
            v.get("input")
                .or_else(|| v.pointer("/request/messages/0/content"))
                .and_then(|x| x.as_str())
                .map(str::to_owned)
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let e = HashEmbedder::default();
    let mut g = c.benchmark_group("drift");
    g.sample_size(10);
    g.throughput(Throughput::Elements(refs.len() as u64));
    g.bench_function("hash_embed", |b| b.iter(|| e.embed(&refs).expect("embeds")));
    // The model embedders, when installed (scripts/models.sh, telltale models distill): the
    // static model on all 2,000 prompts, the sentence model (one thread) on 200 of them.
    let models = telltale::drift::sentence::models_dir();
    if let Ok(s) = telltale::drift::static_model::StaticEmbedder::load(&models) {
        g.bench_function("static_embed", |b| {
            b.iter(|| s.embed(&refs).expect("embeds"))
        });
    }
    if let Ok(s) = telltale::drift::sentence::SentenceEmbedder::load(&models, 1) {
        g.throughput(Throughput::Elements(200));
        g.bench_function("sentence_embed_1_thread", |b| {
            b.iter(|| s.embed(&refs[..200]).expect("embeds"))
        });
    }
    let v = e.embed(&refs).expect("embeds");
    let pooled: Vec<Vec<f32>> = v[..320].to_vec();
    let pca = Pca::fit(&pooled, 16, 1);
    let p: Vec<Vec<f32>> = pooled.iter().map(|x| pca.project(x)).collect();
    let (reference, current) = p.split_at(256);
    g.throughput(Throughput::Elements(1));
    g.bench_function("pca_fit_320x256_to_16", |b| {
        b.iter(|| Pca::fit(&pooled, 16, 1))
    });
    g.bench_function("kernel_tests_64_vs_256_999_permutations", |b| {
        b.iter(|| kernel_tests(reference, current, 999, 0.001, 7))
    });
    g.bench_function("centroid_test_64_vs_256_999_bootstraps", |b| {
        b.iter(|| centroid_test(reference, current, 999, 0.001, 7))
    });
    // The default sizes: 200 current texts against a 1,024-text reference.
    let pooled: Vec<Vec<f32>> = v[..1224].to_vec();
    let pca = Pca::fit(&pooled, 16, 1);
    let p: Vec<Vec<f32>> = pooled.iter().map(|x| pca.project(x)).collect();
    let (reference, current) = p.split_at(1024);
    g.bench_function("kernel_tests_200_vs_1024_999_permutations", |b| {
        b.iter(|| kernel_tests(reference, current, 999, 0.001, 7))
    });
    let (reference, current) = pooled.split_at(1024);
    g.bench_function("centroid_test_200_vs_1024_999_bootstraps", |b| {
        b.iter(|| centroid_test(reference, current, 999, 0.001, 7))
    });
    g.bench_function("neighbour_test_200_vs_1024_999_permutations", |b| {
        b.iter(|| neighbour_test(reference, current, 999, 0.001, 7))
    });

    // The hot path: the metrics stage with and without drift sampling, on events with texts
    // (100 series). The ratio is what sampling adds to every event.
    let events: Vec<LlmEvent<'static>> =
        decoded(TrafficGenerator::new(4, T0, HOUR, 20_000), 20_000)
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.app = Some(format!("app-{}", i % 100).into());
                e
            })
            .collect();
    let stats = Arc::new(Stats::default());
    g.throughput(Throughput::Elements(events.len() as u64));
    for sampling in [false, true] {
        let mut stage = MetricsStage::new(MetricsConfig::default(), "bench", false, stats.clone());
        if sampling {
            stage = stage.with_sampling(&telltale::drift::DriftConfig::default());
        }
        let name = if sampling {
            "metrics_observe_with_sampling_100_series"
        } else {
            "baseline_metrics_observe_100_series"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                for e in &events {
                    stage.observe(e, 0);
                }
            })
        });
    }

    // One drift window of 100 series (the default 200 texts per field each), judged against
    // references already calibrated (13 windows): embedding, PCA, both tests, scalars,
    // explanations. At 5-minute windows, the CPU share is this time / 300 s.
    use telltale::drift::sample::WindowSample;
    use telltale::drift::{DriftConfig, Judge, SampleWindow};
    let cfg = DriftConfig::default();
    let window = |w: i64| -> SampleWindow {
        let mut series: Vec<(telltale::window::SeriesKey, WindowSample)> = Vec::new();
        for s in 0..100 {
            let mut sample = WindowSample::new(cfg.samples_per_window);
            for (i, e) in events
                .iter()
                .enumerate()
                .skip((w as usize * 7 + s) % 50)
                .step_by(97)
                .take(cfg.samples_per_window)
            {
                let mut e = e.clone();
                e.event_id = format!("{w}-{s}-{i}").into();
                sample.observe(&e, 1000);
            }
            series.push((
                telltale::window::SeriesKey::new(&[Some(&format!("s{s}"))]),
                sample,
            ));
        }
        SampleWindow {
            start_ms: w * 300_000,
            end_ms: (w + 1) * 300_000,
            series,
        }
    };
    let mut judge = Judge::new(cfg.clone(), cfg.embedder.build(), i64::MIN);
    for w in 0..14 {
        judge.add(window(w));
    }
    let next = window(14);
    g.throughput(Throughput::Elements(100));
    g.bench_function("judge_window_100_series", |b| {
        b.iter_batched(
            || (judge_clone(&judge, &cfg), next.clone()),
            |(mut j, w)| j.add(w),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// The quality stage's scorers (`pipelines/demo.toml`: JSON Schema on doc-summarizer v3, PII
/// and refusal on every output) on 20 k generated events (≈ 1 KB outputs), every event
/// sampled; against the sampling decision alone (an xxh3 of the event id) in the same run.
fn quality(c: &mut Criterion) {
    use telltale::quality::{Quality, QualityConfig};
    let events = decoded(
        TrafficGenerator::new(9, T0, HOUR, 20_000).malformed_every(None),
        20_000,
    );
    let demo = telltale::config::PipelineConfig::from_str_with_env(
        include_str!("../pipelines/demo.toml"),
        "pipelines/demo.toml",
        &|_| None,
    )
    .expect("the demo pipeline parses")
    .quality;
    let only = |name: &str| {
        Quality::new(QualityConfig {
            scorers: demo
                .scorers
                .iter()
                .filter(|s| s.name == name)
                .cloned()
                .collect(),
            ..demo.clone()
        })
    };
    let mut g = c.benchmark_group("quality");
    g.throughput(Throughput::Elements(events.len() as u64));
    let all = Quality::new(demo.clone());
    g.bench_function("baseline_sample_decision", |b| {
        b.iter(|| events.iter().filter(|e| all.sample(e).is_some()).count())
    });
    let mut out = Vec::new();
    for (name, q) in [
        ("score_demo_scorers", all.clone()),
        ("score_pii_only", only("no_pii")),
        ("score_refusal_only", only("no_refusal")),
        ("score_json_schema_only", only("summary_json")),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0;
                for e in &events {
                    q.assess(e, &mut out);
                    n += out.len();
                }
                n
            })
        });
    }
    let bytes: usize = events
        .iter()
        .filter_map(|e| e.output.as_deref())
        .map(str::len)
        .sum();
    eprintln!(
        "quality bench: {} events, mean output {} bytes",
        events.len(),
        bytes / events.len()
    );
}

/// A support-style question from a seeded generator (distinct ones differ in several words).
fn question(rng: &mut rand::rngs::SmallRng) -> String {
    use rand::Rng;
    const W: &[&str] = &[
        "account",
        "billing",
        "invoice",
        "refund",
        "password",
        "export",
        "report",
        "dashboard",
        "team",
        "project",
        "calendar",
        "meeting",
        "upload",
        "folder",
        "permission",
        "webhook",
        "subscription",
        "plan",
        "trial",
        "order",
        "shipping",
        "address",
        "payment",
        "card",
        "receipt",
        "language",
        "timezone",
        "notification",
        "email",
        "mobile",
        "browser",
        "sync",
        "backup",
        "restore",
        "archive",
        "share",
        "link",
        "comment",
        "label",
        "filter",
        "search",
    ];
    const G: &[&str] = &[
        "the", "my", "a", "for", "with", "when", "after", "in", "to", "and",
    ];
    let n = rng.random_range(10..=20);
    let mut s = String::from("How do I");
    for i in 0..n {
        s.push(' ');
        s.push_str(if i % 2 == 0 {
            G[rng.random_range(0..G.len())]
        } else {
            W[rng.random_range(0..W.len())]
        });
    }
    s.push('?');
    s
}

/// Harvest: opening a dataset of 5 000 examples and folding 1 000 failing events into it.
/// Baseline in the same run: opening it alone. `exact`: every event repeats an example's input
/// (the normalized-input hash settles it); `retyped`: each has a typo (embedding, then a cosine
/// against every example); `new`: none is in the dataset (the same scan, then a new example).
fn harvest(c: &mut Criterion) {
    use rand::{Rng, SeedableRng};
    use telltale::harvest::collect::Candidate;
    use telltale::harvest::dataset::Dataset;
    use telltale::harvest::{HarvestConfig, Reason};
    let hc = HarvestConfig::default();
    let e = hc.embedder.build();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut bases = std::collections::BTreeSet::new();
    while bases.len() < 6_000 {
        bases.insert(question(&mut rng));
    }
    let bases: Vec<String> = bases.into_iter().collect();
    let cand = |i: usize, input: String| Candidate {
        event_id: format!("e{i}"),
        timestamp_ms: i as i64,
        input: Some(input),
        output: Some("a failing answer".into()),
        prompt_version: Some("v1".into()),
        reasons: [Reason::ScorerFail].into(),
        ..Default::default()
    };
    let started = Instant::now();
    {
        let exact_only = HarvestConfig {
            near_duplicate: 2.0,
            ..hc.clone()
        };
        let mut ds = Dataset::open(root, root, "bench").expect("opens");
        let cands = bases[..5_000]
            .iter()
            .enumerate()
            .map(|(i, b)| cand(i, b.clone()))
            .collect();
        let mut r = ds.absorb(cands, e.as_ref(), &exact_only).expect("absorbs");
        ds.commit(root, &exact_only, e.id(), (0, 1), 1, &mut r)
            .expect("commits");
    }
    eprintln!(
        "harvest bench: built a 5 000-example dataset in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let typo = |s: &str, rng: &mut rand::rngs::SmallRng| {
        let mut c: Vec<char> = s.chars().collect();
        let j = rng.random_range(9..c.len() - 3);
        c.swap(j, j + 1);
        c.into_iter().collect::<String>()
    };
    let sets: Vec<(&str, Vec<Candidate>)> = vec![
        (
            "exact",
            (0..1_000)
                .map(|i| cand(10_000 + i, bases[i * 5].to_uppercase()))
                .collect(),
        ),
        (
            "retyped",
            (0..1_000)
                .map(|i| cand(10_000 + i, typo(&bases[i * 5], &mut rng)))
                .collect(),
        ),
        (
            "new",
            (0..1_000)
                .map(|i| cand(10_000 + i, bases[5_000 + i].clone()))
                .collect(),
        ),
    ];
    let mut g = c.benchmark_group("harvest");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("baseline_open_5000", |b| {
        b.iter(|| {
            Dataset::open(root, root, "bench")
                .expect("opens")
                .examples()
                .len()
        })
    });
    for (name, cands) in &sets {
        g.bench_function(format!("open_and_fold_1000_{name}_into_5000"), |b| {
            b.iter(|| {
                let mut ds = Dataset::open(root, root, "bench").expect("opens");
                ds.absorb(cands.clone(), e.as_ref(), &hc)
                    .expect("absorbs")
                    .new_examples
            })
        });
    }
}

/// Experiments: evaluating two hours of demo traffic (100 k events, ≈ 12 k of them in the
/// demo's A/B experiment, with the demo's scores) from the committed tables: 24 looks of five
/// metrics, each window's `experiments` file written. Baseline in the same run: the same
/// evaluator with an experiment that selects no event (reading the tables alone). And one
/// look (merging a window into the running totals, every test, the decision).
fn experiments(c: &mut Criterion) {
    use telltale::experiment::Evaluator;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let input = dir.path().join("traffic.jsonl");
    let n = 100_000u64;
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).expect("creates"));
        for r in TrafficGenerator::new(5, T0, 2 * HOUR, n)
            .malformed_every(None)
            .take(n as usize)
        {
            f.write_all(&r.payload).expect("writes");
            f.write_all(b"\n").expect("writes");
        }
    }
    let demo = telltale::config::PipelineConfig::from_str_with_env(
        include_str!("../pipelines/demo.toml"),
        "pipelines/demo.toml",
        &|_| None,
    )
    .expect("the demo pipeline parses");
    let experiments = demo.experiments.clone();
    let mut cfg = demo.with_file_source(&input.display().to_string());
    cfg.data_root = dir.path().join("data");
    cfg.alerting.enabled = false;
    cfg.harvest.enabled = false;
    cfg.drift.enabled = false;
    cfg.experiments.experiments.clear();
    let started = Instant::now();
    telltale::ingest::run(
        &cfg,
        Arc::new(telltale::telemetry::Stats::default()),
        telltale::ingest::Shutdown::new(),
    )
    .expect("the backfill runs");
    eprintln!(
        "experiments bench: wrote {n} events and their scores in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut none = experiments.clone();
    none.experiments[0].filter = vec![("app".into(), "nobody".into())];
    let evaluate = |x: &telltale::experiment::ExperimentsConfig| {
        let mut ev = Evaluator::open(
            x.clone(),
            &cfg.data_root,
            "bench",
            false,
            cfg.sink.clone(),
            None,
            Arc::new(telltale::telemetry::Stats::default()),
        )
        .expect("opens");
        ev.advance(T0 + 3 * HOUR).expect("evaluates").len()
    };
    assert_eq!(evaluate(&none), 0);
    let looks = evaluate(&experiments);
    assert!(looks >= 24, "{looks}");
    let mut g = c.benchmark_group("experiments");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));
    g.bench_function("baseline_read_tables_selecting_none", |b| {
        b.iter(|| evaluate(&none))
    });
    g.bench_function("evaluate_2h_24_looks_5_metrics", |b| {
        b.iter(|| evaluate(&experiments))
    });
    // One look: a window of 100 events per arm into totals of 2 000 per arm.
    let x = &experiments.experiments[0];
    let mut tally = telltale::experiment::collect::Tally::new(x);
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(1);
    for arm in 0..2 {
        for _ in 0..100 {
            tally.events[arm] += 1;
            for m in 0..x.metrics.len() {
                tally.moments[m][arm].add(rand::Rng::random::<f64>(&mut rng));
            }
        }
    }
    let mut warm = telltale::experiment::scorecard::Running::default();
    for w in 0..20 {
        telltale::experiment::scorecard::look(&experiments, x, &mut warm, Some(&tally), w, w + 1);
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_look_5_metrics", |b| {
        b.iter_batched(
            || warm.clone(),
            |mut run| {
                telltale::experiment::scorecard::look(
                    &experiments,
                    x,
                    &mut run,
                    Some(&tally),
                    20,
                    21,
                )
                .decision
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A judge with the same references (cloning the stage's state for each iteration).
fn judge_clone(
    j: &telltale::drift::Judge,
    cfg: &telltale::drift::DriftConfig,
) -> telltale::drift::Judge {
    j.clone_with(cfg.embedder.build())
}

criterion_group!(
    benches,
    decode,
    metrics,
    end_to_end,
    alert,
    alert_latency,
    drift,
    quality,
    harvest,
    experiments
);
criterion_main!(benches);
