//! `telltale demo`: the whole pipeline with nothing installed.
//!
//! Starts an in-process Kafka-protocol broker (librdkafka's mock cluster, which speaks the real
//! wire protocol on a loopback port), produces generated traffic (with some malformed records)
//! to it, runs the real pipeline from `pipelines/demo.toml` against it until every record is
//! durable and committed, then prints a summary and example SQL results.
//!
//! The data directory is replaced on each run, but only if an earlier demo created it (it
//! carries a `.telltale-demo` marker); any other non-empty directory is left alone.

pub mod generator;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;

use crate::config::PipelineConfig;
use crate::ingest::{self, Shutdown};
use crate::query::{self, OutputFormat};
use crate::replay;
use crate::telemetry::{Stats, StatsSnapshot};
pub use generator::{GeneratedRecord, TrafficGenerator};

/// The demo's pipeline file, shipped in `pipelines/demo.toml`.
pub const DEMO_PIPELINE: &str = include_str!("../../pipelines/demo.toml");
const MARKER: &str = ".telltale-demo";
pub const DEMO_TOPIC: &str = "llm-events";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(
        "{0} exists, is not empty and was not made by `telltale demo`; choose another --data-dir"
    )]
    NotADemoDir(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("in-process broker: {0}")]
    Broker(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigLoadError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
    #[error(transparent)]
    Query(#[from] query::QueryError),
    #[error(transparent)]
    Harvest(#[from] crate::harvest::HarvestError),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error("the pipeline did not catch up within {0:?} ({1} of {2} records committed)")]
    Timeout(Duration, u64, u64),
}

pub struct DemoOptions {
    pub data_dir: PathBuf,
    pub records: u64,
    pub partitions: i32,
    pub seed: u64,
    pub timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            data_dir: PathBuf::from("./telltale-data"),
            records: 20_000,
            partitions: 16,
            seed: 7,
            timeout: Duration::from_secs(45),
        }
    }
}

#[derive(Debug)]
pub struct DemoReport {
    pub produced: u64,
    pub malformed: u64,
    pub stats: StatsSnapshot,
    pub elapsed: Duration,
}

fn prepare_dir(dir: &Path) -> Result<(), DemoError> {
    let io = |source| DemoError::Io {
        path: dir.to_owned(),
        source,
    };
    if dir.exists() {
        let empty = std::fs::read_dir(dir).map_err(io)?.next().is_none();
        if !empty {
            if !dir.join(MARKER).exists() {
                return Err(DemoError::NotADemoDir(dir.to_owned()));
            }
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(
        dir.join(MARKER),
        b"made by telltale demo; removed by the next run\n",
    )
    .map_err(io)
}

/// The demo pipeline config pointed at `brokers` and `data_dir`.
pub fn demo_config(brokers: &str, data_dir: &Path) -> Result<PipelineConfig, DemoError> {
    let dir = data_dir.display().to_string();
    let env = |k: &str| match k {
        "TELLTALE_DEMO_BROKERS" => Some(brokers.to_owned()),
        "TELLTALE_DEMO_DATA" => Some(dir.clone()),
        _ => None,
    };
    let mut cfg = PipelineConfig::from_str_with_env(DEMO_PIPELINE, "pipelines/demo.toml", &env)?;
    // The shipped alerts/*.toml, built in: the demo runs from any directory.
    cfg.alerting.rules = crate::alert::RulesFrom::Builtin;
    // The summary reports every window's drift verdict: at the end, wait for the drift stage
    // to judge what it was handed (a busy machine may leave it minutes behind the pipeline).
    cfg.drift.stop_grace = std::time::Duration::from_secs(300);
    Ok(cfg)
}

/// Runs the demo and prints its summary to `out`.
pub async fn run(opts: DemoOptions, out: &mut (dyn Write + Send)) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    prepare_dir(&opts.data_dir)?;
    let cluster = MockCluster::new(1)?;
    cluster.create_topic(DEMO_TOPIC, opts.partitions, 1)?;
    let brokers = cluster.bootstrap_servers();
    let config = demo_config(&brokers, &opts.data_dir)?;
    let w = |out: &mut (dyn Write + Send), s: String| {
        let _ = writeln!(out, "{s}");
    };
    w(
        out,
        format!(
            "telltale demo: in-process Kafka broker at {brokers} (librdkafka mock cluster), topic {DEMO_TOPIC} with {} partitions",
            opts.partitions
        ),
    );

    let stats = Arc::new(Stats::default());
    let shutdown = Shutdown::new();
    let pipeline = {
        let (config, stats, shutdown) = (config.clone(), stats.clone(), shutdown.clone());
        std::thread::spawn(move || ingest::run(&config, stats, shutdown))
    };

    // Produce on a blocking thread while the pipeline consumes.
    let records = opts.records;
    let seed = opts.seed;
    let brokers_p = brokers.clone();
    let produce_started = Instant::now();
    let (produced, malformed) =
        tokio::task::spawn_blocking(move || -> Result<(u64, u64), DemoError> {
            let now = chrono::Utc::now().timestamp_millis();
            // Two hours of traffic, ending now, so the data spans several hour partitions.
            let span = 2 * 3600 * 1000;
            let traffic = TrafficGenerator::new(seed, now - span, span, records);
            let malformed = produce(&brokers_p, DEMO_TOPIC, traffic, records)?;
            Ok((records, malformed))
        })
        .await
        .map_err(|e| DemoError::Io {
            path: "producer".into(),
            source: std::io::Error::other(e),
        })??;
    let produce_elapsed = produce_started.elapsed();
    w(
        out,
        format!(
            "produced   {produced} records ({} valid, {malformed} malformed on purpose) in {:.1} s",
            produced - malformed,
            produce_elapsed.as_secs_f64()
        ),
    );

    // Wait until everything produced is durable and committed.
    let deadline = Instant::now() + opts.timeout;
    while stats.records_committed.load(Ordering::Relaxed) < produced {
        if Instant::now() > deadline || pipeline.is_finished() {
            shutdown.trigger();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = stats.records_committed.load(Ordering::Relaxed);
    shutdown.trigger();
    let snapshot = tokio::task::spawn_blocking(move || pipeline.join())
        .await
        .map_err(|e| DemoError::Io {
            path: "pipeline".into(),
            source: std::io::Error::other(e),
        })?
        .map_err(|_| DemoError::Io {
            path: "pipeline".into(),
            source: std::io::Error::other("pipeline thread panicked"),
        })??;
    drop(cluster);
    if caught_up < produced {
        return Err(DemoError::Timeout(opts.timeout, caught_up, produced));
    }
    let elapsed = started.elapsed();
    w(
        out,
        format!(
            "pipeline   {} records → {} events + {} rejects in {} Parquet files ({:.1} MiB, zstd); offsets committed after each file was durable",
            snapshot.records_in,
            snapshot.events_written,
            snapshot.rejects_written,
            snapshot.files_written,
            snapshot.bytes_written as f64 / (1 << 20) as f64
        ),
    );
    w(
        out,
        format!(
            "metrics    {} rows (per series: 1-minute windows, 1-hour roll-ups merged from them); {} late events; windows still open at exit are rebuilt from events on restart",
            snapshot.metrics_rows_written, snapshot.late_events
        ),
    );
    let emails = std::fs::read_dir(opts.data_dir.join("alert-emails"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
            })
            .count()
        })
        .unwrap_or(0);
    w(
        out,
        format!(
            "alerts     rules from alerts/*.toml on every closed window; {emails} notifications written as .eml to {}",
            opts.data_dir.join("alert-emails").display()
        ),
    );
    w(
        out,
        format!(
            "drift      {} series-windows judged (5-minute windows against each series' trailing reference; {} texts embedded); {} verdicts found drift",
            stats.drift_windows.load(Ordering::Relaxed),
            stats.drift_texts_embedded.load(Ordering::Relaxed),
            stats.drift_detected.load(Ordering::Relaxed),
        ),
    );
    w(
        out,
        format!(
            "quality    {} scores of sampled events (objective scorers from pipelines/demo.toml: JSON Schema, PII, refusals), written with their events; per series and window in the quality table",
            snapshot.scores_written,
        ),
    );
    // Harvest the run's failures into an eval dataset, and export the degraded version's.
    let harvested = crate::harvest::run(&config, chrono::Utc::now().timestamp_millis())?;
    let evals = opts.data_dir.join("evals");
    let version = crate::harvest::dataset::versions(&harvested.dir)
        .last()
        .map_or_else(
            || "v0000".to_owned(),
            |v| crate::harvest::dataset::version_name(*v),
        );
    let dir = harvested.dir.join(&version);
    let examples = crate::harvest::dataset::read_examples(&dir).unwrap_or_default();
    let filter = crate::harvest::export::Filter {
        app: Some("doc-summarizer".into()),
        prompt_version: Some("v3".into()),
        ..Default::default()
    };
    let degraded: Vec<&crate::harvest::dataset::Example> =
        examples.iter().filter(|e| filter.accepts(e)).collect();
    let tests = crate::harvest::export::export(
        &degraded,
        crate::harvest::export::Format::Promptfoo,
        &harvested.dataset,
        &version,
        &config.quality,
        &evals,
    )?;
    w(
        out,
        format!(
            "harvest    {} failing events → {} eval examples in {} ({} folded as exact and {} as near duplicates; PII redacted); doc-summarizer v3's {} as promptfoo tests: {}",
            harvested.candidates,
            harvested.examples,
            dir.display(),
            harvested.folded_exact,
            harvested.folded_near,
            degraded.len(),
            tests.display(),
        ),
    );
    let mut first = degraded.clone();
    first.sort_by(|a, b| b.count.cmp(&a.count).then(a.id.cmp(&b.id)));
    for e in first.iter().take(3) {
        let reasons: Vec<&str> = e.reasons.iter().map(|r| r.name()).collect();
        w(
            out,
            format!(
                "           {} ×{} [{}] {:?} → {:?}",
                e.id,
                e.count,
                reasons.join(","),
                crate::harvest::collect::clip(&e.input, 60),
                crate::harvest::collect::clip(e.output.as_deref().unwrap_or(""), 90),
            ),
        );
    }
    // The experiment's latest look: its scorecard and decision.
    let (name, _) = generator::EXPERIMENT;
    if let Some(batch) = crate::experiment::table::latest(&opts.data_dir, name)? {
        let card = crate::experiment::report::scorecard(&batch);
        let mut lines = card.lines();
        if let Some(first) = lines.next() {
            w(
                out,
                format!("experiment {}", first.trim_start_matches("experiment ")),
            );
        }
        for l in lines {
            w(out, format!("         {l}"));
        }
    }
    w(
        out,
        format!(
            "data       {}  (tables: {})",
            opts.data_dir.display(),
            query::table_names(&opts.data_dir)?.join(", ")
        ),
    );

    let ctx = query::session(&opts.data_dir).await?;
    for (title, sql) in DEMO_QUERIES {
        w(
            out,
            format!(
                "\n{title}\n  telltale sql --data-dir {} \"{}\"",
                opts.data_dir.display(),
                one_line(sql)
            ),
        );
        let batches = query::query(&ctx, sql).await?;
        let mut buf = Vec::new();
        query::write_batches(&mut buf, &batches, OutputFormat::Table, 60)?;
        let _ = out.write_all(&buf);
    }
    w(
        out,
        format!("\ndemo finished in {:.1} s", elapsed.as_secs_f64()),
    );
    Ok(DemoReport {
        produced,
        malformed,
        stats: snapshot,
        elapsed,
    })
}

/// Produces the next `records` records of `traffic` to `topic` (keyed by session) and waits for
/// every acknowledgement. Returns how many of them were malformed on purpose.
pub fn produce(
    brokers: &str,
    topic: &str,
    traffic: TrafficGenerator,
    records: u64,
) -> Result<u64, replay::ReplayError> {
    let producer = replay::producer(brokers, &[])?;
    let mut malformed = 0;
    for rec in traffic.take(records as usize) {
        malformed += u64::from(rec.expected_reject.is_some());
        replay::send(
            &producer,
            topic,
            rec.key.as_deref().map(str::as_bytes),
            &rec.payload,
        )?;
    }
    replay::finish(&producer, records)?;
    Ok(malformed)
}

fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The example queries the demo prints (also in the README).
pub const DEMO_QUERIES: &[(&str, &str)] = &[
    (
        "Traffic per app, environment and prompt version:",
        "SELECT app, environment, prompt_version, model, count(*) AS requests,
                round(100.0 * avg(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END), 2) AS error_pct,
                CAST(approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS BIGINT) AS p50_ms,
                CAST(approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS BIGINT) AS p95_ms,
                sum(input_tokens + coalesce(output_tokens, 0)) AS tokens
         FROM events GROUP BY app, environment, prompt_version, model ORDER BY requests DESC",
    ),
    (
        "Per series, the last 10 closed one-minute windows (metrics table; p50/p99 merged exactly from the windows' HDR histograms):",
        "SELECT app, environment, model, prompt_version, count(*) AS windows, sum(events) AS requests,
                CAST(hdr_quantile(hdr_merge(latency_ms_hist), 0.5) AS BIGINT) AS p50_ms,
                CAST(hdr_quantile(hdr_merge(latency_ms_hist), 0.99) AS BIGINT) AS p99_ms,
                round(100.0 * sum(errors) / sum(events), 2) AS error_pct,
                round(sum(cost_usd_sum), 4) AS cost_usd
         FROM metrics
         WHERE resolution = '1m'
           AND window_start > (SELECT max(window_start) FROM metrics WHERE resolution = '1m') - INTERVAL '10 minutes'
         GROUP BY app, environment, model, prompt_version ORDER BY app, prompt_version",
    ),
    (
        "support-bot in prod, per 20 minutes: v4's latency triples, then recovers, while v3's holds:",
        "SELECT to_char(date_bin(INTERVAL '20 minutes', window_start), '%H:%M') AS period, prompt_version,
                sum(events) AS requests,
                CAST(hdr_quantile(hdr_merge(latency_ms_hist), 0.5) AS BIGINT) AS p50_ms,
                CAST(hdr_quantile(hdr_merge(latency_ms_hist), 0.99) AS BIGINT) AS p99_ms
         FROM metrics
         WHERE resolution = '1m' AND app = 'support-bot' AND environment = 'prod'
         GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "Drift, from the drift table: code-assistant v7's users start asking about infrastructure, support-bot v3 gets a burst of jailbreak attempts (what moved: the texts the reference has least of, or the shares that changed):",
        "SELECT to_char(window_start, '%H:%M') AS window, app, prompt_version AS version, field, method,
                round(coalesce(p_value, statistic), 5) AS p_or_stat,
                substr(coalesce(regexp_replace(explanation, '^\\[\\{\"event_id\":\"[^\"]*\",\"text\":\"([^\"]*)\".*$', '\\1'), ''), 1, 70) AS what_moved
         FROM drift WHERE drifted AND method IN ('mmd', 'js', 'ks')
         ORDER BY window_start, app, field LIMIT 14",
    ),
    (
        "Quality, from the quality table: doc-summarizer v3's answers break (prose instead of JSON, missing bullets, leaked e-mail addresses), then its prompt is fixed; v2 holds:",
        "SELECT to_char(date_bin(INTERVAL '20 minutes', window_start), '%H:%M') AS period, prompt_version AS version,
                sum(CASE WHEN evaluation_name = 'no_pii' THEN scored END) AS scored,
                round(100.0 * sum(CASE WHEN evaluation_name = 'summary_json' THEN passed END)
                      / nullif(sum(CASE WHEN evaluation_name = 'summary_json' THEN scored END), 0), 1) AS valid_json_pct,
                round(100.0 * sum(CASE WHEN evaluation_name = 'no_pii' THEN passed END)
                      / nullif(sum(CASE WHEN evaluation_name = 'no_pii' THEN scored END), 0), 1) AS no_pii_pct
         FROM quality WHERE resolution = '1m' AND app = 'doc-summarizer'
         GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "Failing scores by scorer, from the scores table (one row per sampled event and scorer):",
        "SELECT app, prompt_version AS version, evaluation_name AS scorer, count(*) AS failed,
                substr(min(explanation), 1, 60) AS example
         FROM scores WHERE NOT passed GROUP BY 1, 2, 3 ORDER BY failed DESC LIMIT 8",
    ),
    (
        "Alerts, from the alerts table (every transition; the notifications went to the terminal, above, and to .eml files):",
        "SELECT to_char(window_end, '%H:%M') AS window_end, rule, labels['app'] AS app, labels['prompt_version'] AS version,
                previous_status || ' -> ' || status AS change, round(value, 2) AS value, round(baseline, 2) AS baseline
         FROM alerts WHERE kind = 'transition' AND status IN ('firing', 'resolved') ORDER BY window_end, rule",
    ),
    (
        "The experiment's decision over time, from the experiments table (one look per 5-minute window):",
        "SELECT decision, to_char(min(window_end), '%H:%M') AS first_look, to_char(max(window_end), '%H:%M') AS last_look,
                count(DISTINCT window_end) AS looks
         FROM experiments WHERE experiment = 'summary-style' GROUP BY decision ORDER BY first_look",
    ),
    (
        "Rejected records by reason (every one kept with its topic/partition/offset):",
        "SELECT reason, count(*) AS records, min(topic || '/' || CAST(partition AS VARCHAR) || '@' || CAST(\"offset\" AS VARCHAR)) AS first_seen_at, min(error) AS example
         FROM rejects GROUP BY reason ORDER BY records DESC",
    ),
];
