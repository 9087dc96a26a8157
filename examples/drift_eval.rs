//! Drift detection on real traffic: false alarms on stationary ShareGPT traffic, and
//! detection delay when real topic streams are mixed in.
//!
//! ```text
//! cargo run --release --example drift_eval [-- --runs 40] [--fastembed [--threads 2]]
//! ```
//!
//! Reads `../shared/data` (see its README; exits with a note when absent). Per run, a stretch
//! of ShareGPT prompt/response pairs in their file order (conversations stay together, as in
//! real traffic: not i.i.d.) is cut into drift windows of `--events` events; each run starts
//! at its own seeded offset. The stage's own code judges them ([`telltale::drift::Judge`],
//! default settings: 64 texts per window and field, 1 false alarm per 1,000 windows).
//! - Stationary: `--warmup` windows fill the reference, the next `--windows` are counted.
//! - Shifts: after the warm-up, a share (5 %, 20 %, 50 %) of each window's prompts comes from
//!   a topic stream (math word problems, assistant intents, code, jailbreaks); the delay is
//!   the number of shifted windows until the first input-drift verdict (1 = the first).
//!
//! Prints the false alarms and the delays per verdict: `mmd`, `centroid`, `any` (either),
//! and `any, two windows running` (as the shipped `InputDrift` rule fires, `for = "5m"`).
//! ShareGPT's conversation ids are passed as session ids, so the sampler keeps one text per
//! conversation and window. `DRIFT_EVAL_DUMP=<file>` writes every stationary embedding
//! statistic (run, window, field, method, standardized statistic, status) as TSV, to study
//! their distribution offline.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use telltale::drift::embed::Embedder;
use telltale::drift::sample::WindowSample;
use telltale::drift::stage::{DriftConfig, EmbedderKind, Judge, Judged, SampleWindow};
use telltale::event::LlmEvent;
use telltale::window::SeriesKey;

const WINDOW_MS: i64 = 300_000;

fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

struct Pair {
    prompt: String,
    response: Option<String>,
    conversation: Option<String>,
}

fn pairs(rows: &[serde_json::Value], response: &str) -> Vec<Pair> {
    rows.iter()
        .filter_map(|r| {
            let prompt = r["prompt"].as_str()?.trim();
            (!prompt.is_empty()).then(|| Pair {
                prompt: prompt.to_owned(),
                response: r[response].as_str().map(str::to_owned),
                conversation: r["conv_id"].as_str().map(str::to_owned),
            })
        })
        .collect()
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One drift window of `events` events: ShareGPT pairs from `cursor` on, a `share` of them
/// with a prompt from `topic` instead.
fn window(
    index: i64,
    base: &[Pair],
    cursor: &mut usize,
    topic: &[Pair],
    share: f64,
    events: usize,
    rng: &mut SmallRng,
) -> SampleWindow {
    let mut s = WindowSample::new(arg("--samples", DriftConfig::default().samples_per_window));
    for i in 0..events {
        let b = &base[*cursor % base.len()];
        *cursor += 1;
        let (prompt, response, conversation) = if !topic.is_empty() && rng.random_bool(share) {
            let t = &topic[rng.random_range(0..topic.len())];
            (t.prompt.as_str(), t.response.as_deref(), None)
        } else {
            (
                b.prompt.as_str(),
                b.response.as_deref(),
                b.conversation.as_deref(),
            )
        };
        let e = LlmEvent {
            event_id: format!("w{index}-{i}-{}", rng.random::<u64>()).into(),
            timestamp_ms: index * WINDOW_MS,
            input: Some(prompt.into()),
            session_id: conversation.map(Into::into),
            output: response.map(Into::into),
            finish_reason: Some("stop".into()),
            ..Default::default()
        };
        s.observe(&e, 1000);
    }
    SampleWindow {
        start_ms: index * WINDOW_MS,
        end_ms: (index + 1) * WINDOW_MS,
        series: vec![(SeriesKey::new(&[Some("eval")]), s)],
    }
}

/// The embedder with a cache shared by every run: runs and shift levels draw many of the same
/// texts (the topic streams are small), and a sentence model embeds ≈ 10 long texts/s here.
struct Cached {
    inner: std::sync::Arc<dyn Embedder>,
    seen: std::sync::Mutex<std::collections::HashMap<String, Vec<f32>>>,
}

impl Embedder for Cached {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, telltale::drift::embed::EmbedError> {
        let missing: Vec<&str> = {
            let seen = self.seen.lock().expect("not poisoned");
            let mut m: Vec<&str> = texts
                .iter()
                .copied()
                .filter(|t| !seen.contains_key(*t))
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        let fresh = if missing.is_empty() {
            Vec::new()
        } else {
            self.inner.embed(&missing)?
        };
        let mut seen = self.seen.lock().expect("not poisoned");
        for (t, v) in missing.iter().zip(fresh) {
            seen.insert((*t).to_owned(), v);
        }
        Ok(texts.iter().map(|t| seen[*t].clone()).collect())
    }
}

fn verdict(j: &Judged, field: &str, method: Option<&str>) -> bool {
    j.rows.iter().any(|r| {
        r.field == field
            && r.status == "judged"
            && r.drifted
            && method.is_none_or(|m| r.method == m)
    })
}

const VERDICTS: [(&str, Option<&str>); 3] = [
    ("mmd", Some("mmd")),
    ("centroid", Some("centroid")),
    ("any", None),
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if !root.exists() {
        eprintln!(
            "skipped: {} is absent (see the repository README)",
            root.display()
        );
        return;
    }
    let runs = arg("--runs", 40);
    let events = arg("--events", 200);
    let warmup = arg("--warmup", 14) as i64;
    let windows = arg("--windows", 25) as i64;
    let horizon = 10i64;
    let sharegpt = pairs(
        &read_jsonl(&root.join("conversations/sharegpt_pairs_dev.jsonl.gz")),
        "response",
    );
    let topics: Vec<(&str, Vec<Pair>)> = vec![
        (
            "math",
            pairs(&read_jsonl(&root.join("prompts/mathqa.jsonl.gz")), "answer"),
        ),
        (
            "intents",
            pairs(
                &read_jsonl(&root.join("prompts/snips_intents.jsonl.gz")),
                "-",
            ),
        ),
        (
            "code",
            pairs(&read_jsonl(&root.join("prompts/humaneval.jsonl.gz")), "-"),
        ),
        (
            "jailbreak",
            pairs(
                &read_jsonl(&root.join("prompts/jailbreak_inthewild.jsonl.gz")),
                "-",
            ),
        ),
    ];
    let embedder = if std::env::args().any(|a| a == "--fastembed") {
        let dir = telltale::drift::sentence::models_dir();
        EmbedderKind::Sentence {
            dir,
            threads: arg("--threads", 1),
        }
    } else {
        EmbedderKind::Hash { dim: 256 }
    };
    let cfg = DriftConfig {
        embedder,
        pca_dims: arg("--pca-dims", DriftConfig::default().pca_dims),
        samples_per_window: arg("--samples", DriftConfig::default().samples_per_window),
        ..DriftConfig::default()
    };
    let embedder: std::sync::Arc<dyn Embedder> = std::sync::Arc::new(Cached {
        inner: cfg.embedder.try_build().unwrap_or_else(|e| panic!("{e}")),
        seen: Default::default(),
    });
    println!(
        "drift evaluation: {runs} runs, {events} events per window, {} texts sampled per window and field, embedder {}, false-alarm rate {} per window",
        cfg.samples_per_window,
        embedder.id(),
        cfg.false_alarm_rate
    );
    let started = std::time::Instant::now();

    // Stationary traffic.
    let mut dump = std::env::var("DRIFT_EVAL_DUMP")
        .ok()
        .map(|p| std::fs::File::create(p).expect("the dump file can be created"));
    let mut alarms = [[0u32; 3]; 2];
    let mut scalar_alarms = 0u32;
    let mut persistent = [0u32; 2];
    let mut judged = 0u32;
    for run in 0..runs {
        let mut rng = SmallRng::seed_from_u64(run as u64);
        let mut cursor = rng.random_range(0..sharegpt.len());
        let mut judge = Judge::new(cfg.clone(), embedder.clone(), i64::MIN);
        let mut last = [false; 2];
        for w in 0..warmup + windows {
            let win = window(w, &sharegpt, &mut cursor, &[], 0.0, events, &mut rng);
            for j in judge.add(win) {
                if let Some(d) = &mut dump {
                    // DRIFT_EVAL_DUMP=<file>: every embedding statistic, for offline analysis.
                    use std::io::Write;
                    for r in &j.rows {
                        if r.field == "input" || r.field == "output" {
                            let _ = writeln!(
                                d,
                                "{run}\t{w}\t{}\t{}\t{}\t{}",
                                r.field,
                                r.method,
                                r.statistic.unwrap_or(f64::NAN),
                                r.status
                            );
                        }
                    }
                }
                if w < warmup {
                    continue;
                }
                judged += 1;
                for (f, field) in ["input", "output"].iter().enumerate() {
                    for (v, (_, m)) in VERDICTS.iter().enumerate() {
                        alarms[f][v] += u32::from(verdict(&j, field, *m));
                    }
                    let now = verdict(&j, field, None);
                    persistent[f] += u32::from(now && last[f]);
                    last[f] = now;
                }
                scalar_alarms += u32::from(
                    j.rows
                        .iter()
                        .any(|r| r.drifted && r.field != "input" && r.field != "output"),
                );
            }
        }
    }
    println!("\nStationary ShareGPT traffic: false alarms per 1,000 windows ({judged} windows)");
    println!("| verdict | input | output |\n|---|---|---|");
    for (v, (name, _)) in VERDICTS.iter().enumerate() {
        println!(
            "| {name} | {:.1} | {:.1} |",
            1000.0 * alarms[0][v] as f64 / judged as f64,
            1000.0 * alarms[1][v] as f64 / judged as f64
        );
    }
    println!(
        "| any, two windows running | {:.1} | {:.1} |",
        1000.0 * persistent[0] as f64 / judged as f64,
        1000.0 * persistent[1] as f64 / judged as f64
    );
    println!(
        "| scalars (any of 12, 3σ) | {:.1} | |",
        1000.0 * scalar_alarms as f64 / judged as f64
    );

    // Shifts.
    println!(
        "\nInput drift: mean windows to detection (1 = the first shifted window), share detected within 3 windows; {runs} runs each, not detected within {horizon} counts as {}",
        horizon + 1
    );
    println!(
        "| stream | share | mmd | centroid | any | any, two windows running |\n|---|---|---|---|---|---|"
    );
    for (name, topic) in &topics {
        for share in [0.05, 0.2, 0.5] {
            let mut delays = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for run in 0..runs {
                let mut rng = SmallRng::seed_from_u64(1000 + run as u64);
                let mut cursor = rng.random_range(0..sharegpt.len());
                let mut judge = Judge::new(cfg.clone(), embedder.clone(), i64::MIN);
                let mut first = [None; 4];
                let mut last = false;
                for w in 0..warmup + horizon {
                    let on = w >= warmup;
                    let win = window(
                        w,
                        &sharegpt,
                        &mut cursor,
                        if on { topic } else { &[] },
                        share,
                        events,
                        &mut rng,
                    );
                    for j in judge.add(win) {
                        if !on {
                            continue;
                        }
                        for (v, (_, m)) in VERDICTS.iter().enumerate() {
                            if first[v].is_none() && verdict(&j, "input", *m) {
                                first[v] = Some(w - warmup + 1);
                            }
                        }
                        let now = verdict(&j, "input", None);
                        if first[3].is_none() && now && last {
                            first[3] = Some(w - warmup + 1);
                        }
                        last = now;
                    }
                }
                for (d, f) in delays.iter_mut().zip(first) {
                    d.push(f.unwrap_or(horizon + 1));
                }
            }
            let cell = |d: &[i64]| {
                let mean = d.iter().sum::<i64>() as f64 / d.len() as f64;
                let within = d.iter().filter(|x| **x <= 3).count() as f64 / d.len() as f64;
                format!("{mean:.1} ({:.0} %)", within * 100.0)
            };
            println!(
                "| {name} | {:.0} % | {} | {} | {} | {} |",
                share * 100.0,
                cell(&delays[0]),
                cell(&delays[1]),
                cell(&delays[2]),
                cell(&delays[3])
            );
        }
    }
    println!("\n({:.0} s)", started.elapsed().as_secs_f64());
}
