use std::path::Path;
use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use proptest::prelude::*;

use super::series::{Measure, SealedMetrics, SeriesMetrics};
use super::*;
use crate::config::SinkConfig;
use crate::decode::{Decoder, DecoderConfig};
use crate::demo::generator::TrafficGenerator;
use crate::event::SourceRecord;
use crate::ingest::Accumulator;
use crate::sink::{Sink, SinkJob};
use crate::window::SeriesKey;

const MIN: i64 = 60_000;

fn event(ts: i64, latency: f64, tokens: i64, error: bool) -> LlmEvent<'static> {
    LlmEvent {
        event_id: "e".into(),
        timestamp_ms: ts,
        app: Some("app".into()),
        model: Some("gpt-4o".into()),
        latency_ms: Some(latency),
        ttft_ms: Some(latency / 3.0),
        input_tokens: Some(tokens),
        output_tokens: Some(tokens / 2 + 1),
        cost_usd: Some(tokens as f64 * 2.5e-6),
        status: if error { "error" } else { "ok" }.into(),
        error_type: error.then(|| "timeout".into()),
        finish_reason: Some("stop".into()),
        ..Default::default()
    }
}

/// Every recorded (value, count) of each histogram, and the counters: equal iff the states
/// answer every quantile identically.
type Fingerprint = (super::series::Counters, Vec<Vec<(u64, u64)>>);

fn fingerprint(s: &SealedMetrics) -> Fingerprint {
    let hists = Measure::ALL
        .iter()
        .map(|m| {
            s.histogram(*m)
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        })
        .collect();
    (s.counters.clone(), hists)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Splitting a stream anywhere and merging the halves' sealed states gives exactly the
    /// state of the whole stream.
    #[test]
    fn merged_halves_equal_the_whole(
        values in prop::collection::vec((1.0f64..120_000.0, 1i64..50_000, any::<bool>()), 1..400),
        split in any::<prop::sample::Index>(),
    ) {
        let k = split.index(values.len() + 1);
        let (mut whole, mut a, mut b) =
            (SeriesMetrics::default(), SeriesMetrics::default(), SeriesMetrics::default());
        for (i, (lat, tok, err)) in values.iter().enumerate() {
            let e = event(0, *lat, *tok, *err);
            whole.observe(&e, None);
            if i < k { a.observe(&e, None) } else { b.observe(&e, None) }
        }
        let mut merged = a.seal();
        merged.merge(&b.seal());
        prop_assert_eq!(fingerprint(&merged), fingerprint(&whole.seal()));
        // …and both hold the real values, to the histograms' precision.
        let true_max = values.iter().map(|v| v.0.round()).fold(0.0, f64::max);
        let got = whole.histograms()[0].max() as f64;
        prop_assert!((got - true_max).abs() <= 0.01 * true_max + 1.0, "max {} vs {}", got, true_max);
        for (i, m) in Measure::ALL.iter().enumerate() {
            let (hm, hw) = (merged.histogram(*m), &whole.histograms()[i]);
            for q in [0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
                prop_assert_eq!(hm.value_at_quantile(q), hw.value_at_quantile(q));
            }
        }
    }
}

fn batch_rows(b: &RecordBatch, dims: &[Dimension]) -> Vec<(SeriesKey, SealedMetrics)> {
    let (rows, bad) = table::sealed_rows(b, dims);
    assert_eq!(bad, 0);
    rows
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Sixty one-minute windows rolled up equal one window an hour long, series by series.
    #[test]
    fn sixty_minutes_roll_up_to_the_hour_exactly(seed in any::<u64>(), n in 500i64..4000) {
        use rand::{Rng, SeedableRng};
        let stats = Arc::new(Stats::default());
        let mut minute = MetricsStage::new(MetricsConfig::default(), "t", false, stats.clone());
        let mut hourly_cfg = MetricsConfig::default();
        hourly_cfg.window.size_ms = 60 * MIN;
        hourly_cfg.window.rollup_ms = 120 * MIN;
        let mut hour = MetricsStage::new(hourly_cfg, "t", false, stats);
        let h0 = 500_000 * 60 * MIN;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let apps = ["a", "b", "c"];
        for i in 0..n {
            let ts = h0 + i * (60 * MIN) / n;
            let mut e = event(
                ts,
                rng.random_range(50.0..90_000.0),
                rng.random_range(1..40_000),
                rng.random_bool(0.02),
            );
            e.app = Some(apps[rng.random_range(0..3)].into());
            minute.observe(&e, 0);
            hour.observe(&e, 0);
        }
        let out = minute.finish().unwrap();
        let dims = minute.dimensions().to_vec();
        let file = |out: &MetricsOutput, res: &str| {
            out.files
                .iter()
                .filter(|(p, _)| p.to_string_lossy().contains(res))
                .map(|(_, b)| b.clone())
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(file(&out, "-1m-").len(), 60);
        let rolled = file(&out, "-1h-").pop().expect("an hourly row set");
        let direct = file(&hour.finish().unwrap(), "-1h-").pop().unwrap();
        let fp = |b: &RecordBatch| {
            batch_rows(b, &dims)
                .iter()
                .map(|(k, s)| (k.clone(), fingerprint(s)))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(fp(&rolled).len(), 3);
        prop_assert_eq!(fp(&rolled), fp(&direct));
        for col in ["latency_ms_p99", "cost_usd_p50", "output_tokens_max", "events", "errors"] {
            prop_assert_eq!(rolled.column_by_name(col), direct.column_by_name(col), "{}", col);
        }
    }
}

#[test]
fn cost_is_computed_only_when_missing() {
    let prices = cost::PriceTable::from_litellm_json(BUILTIN_PRICES).unwrap();
    let mut e = event(0, 1.0, 1000, false);
    apply_cost(&mut e, Some(&prices));
    assert_eq!(e.cost_source, Some("reported"));
    assert_eq!(e.cost_usd, Some(1000.0 * 2.5e-6));
    e.cost_usd = None;
    e.cost_source = None;
    apply_cost(&mut e, Some(&prices));
    assert_eq!(e.cost_source, Some("computed"));
    // gpt-4o: 1000 × 2.5e-6 + 501 × 1e-5
    assert!((e.cost_usd.unwrap() - (0.0025 + 0.00501)).abs() < 1e-12);
    let mut unknown = event(0, 1.0, 10, false);
    unknown.cost_usd = None;
    unknown.model = Some("in-house-llm".into());
    apply_cost(&mut unknown, Some(&prices));
    assert_eq!(
        (unknown.cost_usd, unknown.cost_source),
        (None, Some("unknown"))
    );
}

// ---- restart in the middle of a window, on a simulated clock ----

const TOPIC: &str = "llm";
const RECORDS: usize = 3000;
const SPAN: i64 = 12 * MIN;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn records() -> Vec<Vec<u8>> {
    TrafficGenerator::new(5, T0, SPAN, RECORDS as u64)
        .take(RECORDS)
        .map(|r| r.payload)
        .collect()
}

/// The wall clock when record `i` arrives: records arrive as they happen.
fn clock(i: usize) -> i64 {
    T0 + (i as i64 + 1) * SPAN / RECORDS as i64
}

struct Process<'a> {
    root: &'a Path,
    sink: Sink,
    acc: Accumulator,
    /// Offset the source resumes from (Kafka's committed offset).
    committed: i64,
}

fn sink_config() -> SinkConfig {
    SinkConfig {
        roll_size: 48 << 10,
        ..SinkConfig::default()
    }
}

fn start(root: &Path, committed: i64) -> Process<'_> {
    let stats = Arc::new(Stats::default());
    let config = MetricsConfig::default();
    let stage = MetricsStage::open(root, config.clone(), "group", None, stats.clone()).unwrap();
    let acc = Accumulator::new(
        Decoder::new(DecoderConfig::default()),
        sink_config(),
        64 << 10,
        false,
        stats,
    )
    .with_prices(load_prices(&config).unwrap())
    .with_metrics(stage);
    Process {
        root,
        sink: Sink::new(root, sink_config()),
        acc,
        committed,
    }
}

impl Process<'_> {
    /// Feeds records `range`; their batches are written and, when `commit`, committed.
    fn feed(&mut self, recs: &[Vec<u8>], range: std::ops::Range<usize>, commit: bool) {
        let mut jobs: Vec<SinkJob> = Vec::new();
        for i in range {
            let rec = SourceRecord {
                topic: TOPIC,
                partition: 0,
                offset: i as i64,
                timestamp_ms: Some(clock(i)),
                key: None,
                payload: Some(&recs[i]),
            };
            self.acc.push(&rec, &mut jobs);
            for job in jobs.drain(..) {
                self.sink.write(&job).unwrap();
                if commit {
                    self.sink.forget(&job);
                    self.committed = job.last_offset + 1;
                }
            }
            if let Some(out) = self.acc.tick_metrics(Some(clock(i))) {
                self.sink.write_metrics(&out).unwrap();
            }
        }
    }

    /// The source goes quiet; the wall clock closes the remaining windows.
    fn idle(&mut self) {
        for later in [SPAN + MIN, SPAN + 4 * MIN, SPAN + 8 * MIN] {
            if let Some(out) = self.acc.tick_metrics(Some(T0 + later)) {
                self.sink.write_metrics(&out).unwrap();
            }
        }
    }
}

type TableRows = Vec<(String, Vec<(SeriesKey, String, Fingerprint)>)>;

/// Every metrics file under `root`: its path and, per row, the series, p99 and state.
fn metrics_tables(root: &Path) -> TableRows {
    let dims = crate::window::default_dimensions();
    let mut files: Vec<_> = glob::glob(&format!("{}/metrics/*/*/*.parquet", root.display()))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(p).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            let mut rows = Vec::new();
            for b in reader {
                let b = b.unwrap();
                let p99 = b
                    .column_by_name("latency_ms_p99")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .clone();
                for (i, (k, s)) in batch_rows(&b, &dims).into_iter().enumerate() {
                    rows.push((k, format!("{:?}", p99.value(i)), fingerprint(&s)));
                }
            }
            (p.strip_prefix(root).unwrap().display().to_string(), rows)
        })
        .collect()
}

/// A process killed in the middle of a window — with batches durable, others written but not
/// committed, and others only in memory — and restarted from the committed offset produces
/// exactly the metrics of a run that never crashed.
#[test]
fn restart_mid_window_neither_loses_nor_double_counts() {
    let recs = records();
    let clean_dir = tempfile::tempdir().unwrap();
    let mut clean = start(clean_dir.path(), 0);
    clean.feed(&recs, 0..RECORDS, true);
    clean.idle();
    let expected = metrics_tables(clean_dir.path());
    let minute_rows: usize = expected
        .iter()
        .filter(|(p, _)| p.contains("-1m-"))
        .map(|(_, r)| r.len())
        .sum();
    assert!(minute_rows > 12, "the run spans many windows and series");
    let events: u64 = expected
        .iter()
        .filter(|(p, _)| p.contains("-1m-"))
        .flat_map(|(_, r)| r.iter().map(|(_, _, f)| f.0.events))
        .sum();
    let valid = RECORDS as u64 - (RECORDS as u64 / 200);
    assert_eq!(
        events, valid,
        "every valid record counted once in the clean run"
    );

    for (durable, written) in [(1200, 1700), (1, 2), (2200, 2999)] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = start(dir.path(), 0);
        p.feed(&recs, 0..durable, true);
        // Written but never committed: their manifests are pending when the process dies.
        p.feed(&recs, durable..written, false);
        let resume = p.committed;
        drop(p); // kill -9: buffers and open windows are gone

        let mut p = start(dir.path(), resume);
        // As on partition assignment: rebuild from committed events, then roll back the rest.
        p.acc
            .rebuild_metrics(dir.path(), TOPIC, 0, clock(written))
            .unwrap();
        p.sink.recover(TOPIC, 0, Some(resume)).unwrap();
        let half = (resume as usize + RECORDS) / 2;
        p.feed(&recs, resume as usize..half, true);
        // A rebalance gives the partition back to the same process: nothing is counted twice.
        if let Some(job) = p.acc.take_partition(TOPIC, 0) {
            p.sink.write(&job).unwrap();
            p.sink.forget(&job);
        }
        p.acc
            .rebuild_metrics(dir.path(), TOPIC, 0, clock(half))
            .unwrap();
        p.feed(&recs, half..RECORDS, true);
        p.idle();
        let got = metrics_tables(dir.path());
        assert_eq!(
            got.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            expected.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            "crash after {durable} durable, {written} written: same files"
        );
        for ((path, a), (_, b)) in got.iter().zip(&expected) {
            assert_eq!(a, b, "crash after {durable}/{written}: {path} differs");
        }
        assert!(p.root.join("_state/metrics/group.json").exists());
    }
}

#[test]
fn serialized_histograms_merge_into_an_empty_one() {
    let mut s = SeriesMetrics::default();
    for v in [900.0, 1500.0, 12_000.0, 30.0] {
        s.observe(&event(0, v, 10, false), None);
    }
    let bytes = s.seal().hists[0].clone();
    let mut acc = super::series::new_histogram_u64();
    acc.add(super::series::deserialize(&bytes).unwrap())
        .unwrap();
    acc.add(super::series::deserialize(&bytes).unwrap())
        .unwrap();
    assert_eq!(acc.len(), 8);
    // Values keep their magnitude (within the 1 % precision).
    let max = acc.value_at_quantile(1.0) as f64;
    assert!((max - 12_000.0).abs() <= 120.0, "max {max}");
    let min = acc.value_at_quantile(0.0) as f64;
    assert!((min - 30.0).abs() <= 1.0, "min {min}");
    assert_eq!(
        acc.value_at_quantile(1.0),
        s.histograms()[0].value_at_quantile(1.0)
    );
    assert_eq!(
        acc.value_at_quantile(0.5),
        s.histograms()[0].value_at_quantile(0.5)
    );
    let qs = [0.5, 0.9, 0.95, 0.99, 0.999];
    let batch: Vec<u64> = acc.value_at_quantiles(qs).collect();
    let one: Vec<u64> = qs.iter().map(|q| acc.value_at_quantile(*q)).collect();
    assert_eq!(
        batch, one,
        "the table's one-pass quantiles match hdr_quantile's"
    );
    let round = super::series::deserialize(&super::series::serialize(&acc)).unwrap();
    assert_eq!(
        round.value_at_quantile(0.5),
        s.histograms()[0].value_at_quantile(0.5),
        "serialized after merging"
    );
}

/// A window every partition has moved past packs its histograms; a straggler unpacks them;
/// the numbers never change.
#[test]
fn settled_windows_pack_small_and_still_take_stragglers() {
    use crate::window::WindowState;
    let (mut a, mut b) = (SeriesMetrics::default(), SeriesMetrics::default());
    for i in 0..500 {
        let e = event(0, 100.0 + i as f64 * 37.0, 10 + i, i % 50 == 0);
        a.observe(&e, None);
        b.observe(&e, None);
    }
    let live = a.memory_bytes();
    a.settle();
    assert!(a.is_packed());
    assert!(
        a.memory_bytes() * 4 < live,
        "packed {} vs live {live} bytes",
        a.memory_bytes()
    );
    assert_eq!(fingerprint(&a.seal()), fingerprint(&b.seal()));
    let straggler = event(0, 99_000.0, 7, false);
    a.observe(&straggler, None);
    b.observe(&straggler, None);
    assert!(!a.is_packed());
    assert_eq!(fingerprint(&a.seal()), fingerprint(&b.seal()));

    // In a stage: only the window still receiving in-order events stays live.
    let mut stage = MetricsStage::new(
        MetricsConfig::default(),
        "t",
        false,
        Arc::new(Stats::default()),
    );
    let t0 = 1_000 * MIN;
    for i in 0..(4 * 60) {
        stage.observe(&event(t0 + i * 1000, 500.0 + i as f64, 100, false), 0);
    }
    stage.tick(None);
    let (mut packed, mut live) = (0, 0);
    stage.windows().for_each_open(|s| {
        if s.is_packed() {
            packed += 1
        } else {
            live += 1
        }
    });
    assert_eq!(
        (packed, live),
        (2, 1),
        "minutes 1 and 2 wait for stragglers packed; minute 3 is live"
    );
}
