//! Drift detection on real traffic: false alarms on stationary ShareGPT traffic, and
//! detection delay when real topic streams are mixed in.
//!
//! ```text
//! cargo run --release --example drift_eval [-- --runs 40] [--static | --fastembed [--threads 2]] [--cache <file>]
//! ```
//!
//! Reads `../shared/data` (see its README; exits with a note when absent). Per run, a stretch
//! of ShareGPT prompt/response pairs in their file order (conversations stay together, as in
//! real traffic: not i.i.d.) is cut into drift windows of `--events` events; each run starts
//! at its own seeded offset. The stage's own code judges them ([`telltale::drift::Judge`],
//! default settings: 200 texts per window and field against a reference of 1,024, drift when
//! a test's calibrated residual stays above 4σ for 3 windows; `--persistence`,
//! `--persistence-sigma`, `--instant-sigma` change them; `--no-shifts` stops after the
//! stationary part, `--shifts-only` skips it, `--stream <name>` and `--share <x>` run one
//! stream or share). `--events` sets the traffic: events
//! per 5-minute window (default 200; the sampler keeps one text per conversation).
//! - Stationary: `--warmup` windows (default 24) fill the reference and calibrate the tests
//!   (12 judged windows; windows with fewer than 20 conversations are not judged), the next
//!   `--windows` are counted.
//! - Shifts: after the warm-up, a share (5 %, 20 %, 50 %) of each window's prompts comes from
//!   a topic stream (math word problems, assistant intents, code, jailbreaks); the delay is
//!   the number of shifted windows until the first input-drift verdict (1 = the first).
//!
//! Prints the false alarms and the delays per verdict: `mmd`, `centroid`, `knn`, `any` (any of them, as
//! the shipped `InputDrift` rule fires), and per series (input or output).
//! ShareGPT's conversation ids are passed as session ids, so the sampler keeps one text per
//! conversation and window (`--no-sessions` passes none, as from traffic without them;
//! `--split-conversations` passes the dataset's conversation parts as sessions).
//! `DRIFT_EVAL_DUMP=<file>` writes every embedding statistic
//! (stationary and shifted) as TSV, to study their distribution offline. With `--fastembed`
//! (or with `--cache <file>` for any embedder), every text's vector is computed up front and
//! kept in a file.

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
/// Texts are sampled (and embedded) up to this many characters.
const MAX_CHARS: usize = 1000;

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
                conversation: r["conv_id"].as_str().map(|id| conversation(id).to_owned()),
            })
        })
        .collect()
}

/// The conversation a ShareGPT `conv_id` belongs to. The dataset cuts long conversations
/// into parts numbered `<id>_0`, `<id>_1`, …; real traffic would carry one session id for
/// all of them, so the part number is dropped (with it, one conversation's turns would count
/// as several sessions and fill a window's sample with near-repeats of one exchange).
/// `--split-conversations` keeps it: session ids that cut conversations, as from an app
/// that starts a new session mid-conversation.
fn conversation(conv_id: &str) -> &str {
    if flag("--split-conversations") {
        return conv_id;
    }
    match conv_id.rsplit_once('_') {
        Some((base, part)) if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => conv_id,
    }
}

/// Whether `--name` is on the command line.
fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// The value after `--name` on the command line, or `default`.
fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
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
    let sessions = !flag("--no-sessions");
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
            // `--no-sessions`: traffic that carries no session id, where every event is its
            // own conversation to the sampler and one conversation's turns can fill a window.
            session_id: conversation.filter(|_| sessions).map(Into::into),
            output: response.map(Into::into),
            finish_reason: Some("stop".into()),
            ..Default::default()
        };
        s.observe(&e, MAX_CHARS);
    }
    SampleWindow {
        start_ms: index * WINDOW_MS,
        end_ms: (index + 1) * WINDOW_MS,
        series: vec![(SeriesKey::new(&[Some("eval")]), s)],
    }
}

/// The embedder with a cache shared by every run: runs and shift levels draw many of the same
/// texts (the topic streams are small), and a sentence model embeds tens of long texts/s here.
/// With `--fastembed` the cache is also a file (`--cache <file>`, default
/// `~/.cache/telltale/drift_eval-<embedder>.bin`: per text its xxh3 and its vector), filled
/// up front for every text the data set has, in batches of similar length, with progress; a
/// second evaluation then embeds nothing.
struct Cached {
    inner: std::sync::Arc<dyn Embedder>,
    seen: std::sync::Mutex<std::collections::HashMap<u64, Vec<f32>>>,
}

fn key(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// The distinct texts of `texts` the cache has no vector for.
fn missing<'a>(seen: &std::collections::HashMap<u64, Vec<f32>>, texts: &[&'a str]) -> Vec<&'a str> {
    let mut m: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|t| !seen.contains_key(&key(t)))
        .collect();
    m.sort_unstable();
    m.dedup();
    m
}

impl Cached {
    fn new(inner: std::sync::Arc<dyn Embedder>) -> Cached {
        Cached {
            inner,
            seen: Default::default(),
        }
    }

    /// Loads `path`, then embeds and appends every text of `texts` it lacks.
    fn fill(&self, path: &Path, texts: &[&str]) {
        use std::io::{Read, Write};
        let dim = self.inner.dim();
        let record = 8 + 4 * dim;
        let mut seen = self.seen.lock().expect("not poisoned");
        if let Ok(mut f) = std::fs::File::open(path) {
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes)
                .expect("the cache file is readable");
            // A record cut short by an interrupted run is dropped.
            for r in bytes.chunks_exact(record) {
                let k = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
                let v = r[8..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                seen.insert(k, v);
            }
            let whole = bytes.len() / record * record;
            if whole != bytes.len() {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .expect("opens");
                f.set_len(whole as u64).expect("truncates");
            }
        }
        let mut missing = missing(&seen, texts);
        missing.sort_by_key(|t| t.len());
        println!(
            "embedding cache {}: {} vectors, {} texts to embed",
            path.display(),
            seen.len(),
            missing.len()
        );
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the cache directory can be created");
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("the cache file can be written");
        let started = std::time::Instant::now();
        let mut done = 0;
        for chunk in missing.chunks(512) {
            let vectors = self.inner.embed(chunk).unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::with_capacity(chunk.len() * record);
            for (t, v) in chunk.iter().zip(vectors) {
                buf.extend_from_slice(&key(t).to_le_bytes());
                for x in &v {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
                seen.insert(key(t), v);
            }
            out.write_all(&buf).expect("the cache file can be written");
            done += chunk.len();
            let rate = done as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "  {done}/{} texts embedded, {rate:.0} texts/s, {} chars max, ≈ {:.0} min left",
                missing.len(),
                chunk.last().map_or(0, |t| t.len()),
                (missing.len() - done) as f64 / rate / 60.0
            );
        }
    }
}

impl Embedder for Cached {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn dim(&self) -> usize {
        self.inner.dim()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, telltale::drift::embed::EmbedError> {
        let missing = missing(&self.seen.lock().expect("not poisoned"), texts);
        let fresh = if missing.is_empty() {
            Vec::new()
        } else {
            self.inner.embed(&missing)?
        };
        let mut seen = self.seen.lock().expect("not poisoned");
        for (t, v) in missing.iter().zip(fresh) {
            seen.insert(key(t), v);
        }
        Ok(texts.iter().map(|t| seen[&key(t)].clone()).collect())
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

/// `DRIFT_EVAL_DUMP=<file>`: every embedding statistic (phase, run, window, field, method,
/// standardized statistic, status) as TSV, for offline analysis. Every run numbers its
/// windows from the first one counted (the first stationary window counted, or the first
/// shifted one), warm-up windows negative, so a dump says itself where its warm-up ends.
fn dump_rows(dump: &mut Option<std::fs::File>, phase: &str, run: usize, w: i64, j: &Judged) {
    use std::io::Write;
    let Some(d) = dump else { return };
    for r in &j.rows {
        if r.field == "input" || r.field == "output" {
            let _ = writeln!(
                d,
                "{phase}\t{run}\t{w}\t{}\t{}\t{}\t{}",
                r.field,
                r.method,
                r.statistic.unwrap_or(f64::NAN),
                r.status
            );
        }
    }
}

const VERDICTS: [(&str, Option<&str>); 4] = [
    ("mmd", Some("mmd")),
    ("centroid", Some("centroid")),
    ("knn", Some("knn")),
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
    let warmup = arg("--warmup", 24) as i64;
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
    let embedder = if flag("--fastembed") {
        let dir = telltale::drift::sentence::models_dir();
        EmbedderKind::Sentence {
            dir,
            threads: arg("--threads", 1),
        }
    } else if flag("--static") {
        EmbedderKind::Static {
            dir: telltale::drift::sentence::models_dir(),
        }
    } else {
        EmbedderKind::Hash { dim: 256 }
    };
    let d = DriftConfig::default();
    let cfg = DriftConfig {
        embedder,
        persistence: arg("--persistence", d.persistence),
        persistence_sigma: arg("--persistence-sigma", d.persistence_sigma),
        instant_sigma: arg("--instant-sigma", d.instant_sigma),
        pca_dims: arg("--pca-dims", d.pca_dims),
        samples_per_window: arg("--samples", d.samples_per_window),
        reference_size: arg("--reference-size", d.reference_size),
        budget_texts_per_s: arg("--budget", d.budget_texts_per_s),
        ..DriftConfig::default()
    };
    let cached = Cached::new(cfg.embedder.try_build().unwrap_or_else(|e| panic!("{e}")));
    if matches!(cfg.embedder, EmbedderKind::Sentence { .. }) || flag("--cache") {
        let path = std::env::args()
            .position(|a| a == "--cache")
            .and_then(|i| std::env::args().nth(i + 1))
            .map_or_else(
                || {
                    let id = cached.id().replace(['/', ' '], "_");
                    telltale::drift::sentence::models_dir()
                        .join("..")
                        .join(format!("drift_eval-{id}.bin"))
                },
                PathBuf::from,
            );
        let texts: Vec<&str> = std::iter::once(&sharegpt)
            .chain(topics.iter().map(|(_, t)| t))
            .flat_map(|pairs| {
                pairs
                    .iter()
                    .flat_map(|p| std::iter::once(p.prompt.as_str()).chain(p.response.as_deref()))
                    .map(|t| telltale::drift::sample::truncate(t, MAX_CHARS))
            })
            .collect();
        cached.fill(&path, &texts);
    }
    let embedder: std::sync::Arc<dyn Embedder> = std::sync::Arc::new(cached);
    let instant = if cfg.instant_sigma.is_finite() {
        format!(", or above {}σ at once", cfg.instant_sigma)
    } else {
        String::new()
    };
    println!(
        "drift evaluation: {runs} runs, {events} events per window, {} texts sampled per window and field, embedder {}; drifted: above {}σ in {} windows running{instant}",
        cfg.samples_per_window,
        embedder.id(),
        cfg.persistence_sigma,
        cfg.persistence,
    );
    let used = (warmup + windows).max(warmup + horizon) as usize * events;
    if used > sharegpt.len() {
        println!(
            "note: a run reads {used} events of {} ShareGPT pairs: it wraps around, and texts of its reference come back as current texts",
            sharegpt.len()
        );
    }
    let started = std::time::Instant::now();

    // Stationary traffic.
    let mut dump = std::env::var("DRIFT_EVAL_DUMP")
        .ok()
        .map(|p| std::fs::File::create(p).expect("the dump file can be created"));
    let mut alarms = [[0u32; VERDICTS.len()]; 2];
    let mut scalar_alarms = 0u32;
    let mut either_field = 0u32;
    let mut judged = 0u32;
    let stationary_runs = if flag("--shifts-only") { 0 } else { runs };
    for run in 0..stationary_runs {
        let mut rng = SmallRng::seed_from_u64(run as u64);
        let mut cursor = rng.random_range(0..sharegpt.len());
        let mut judge = Judge::new(cfg.clone(), embedder.clone(), i64::MIN);
        for w in 0..warmup + windows {
            let win = window(w, &sharegpt, &mut cursor, &[], 0.0, events, &mut rng);
            for j in judge.add(win) {
                dump_rows(&mut dump, "stationary", run, w - warmup, &j);
                if w < warmup {
                    continue;
                }
                judged += 1;
                for (f, field) in ["input", "output"].iter().enumerate() {
                    for (v, (_, m)) in VERDICTS.iter().enumerate() {
                        alarms[f][v] += u32::from(verdict(&j, field, *m));
                    }
                }
                either_field +=
                    u32::from(verdict(&j, "input", None) || verdict(&j, "output", None));
                scalar_alarms += u32::from(
                    j.rows
                        .iter()
                        .any(|r| r.drifted && r.field != "input" && r.field != "output"),
                );
            }
        }
    }
    if judged > 0 {
        println!(
            "\nStationary ShareGPT traffic: false alarms per 1,000 windows ({judged} windows)"
        );
        println!("| verdict | input | output |\n|---|---|---|");
        for (v, (name, _)) in VERDICTS.iter().enumerate() {
            println!(
                "| {name} | {:.1} | {:.1} |",
                1000.0 * alarms[0][v] as f64 / judged as f64,
                1000.0 * alarms[1][v] as f64 / judged as f64
            );
        }
        println!(
            "| any, input or output (per series) | {:.1} | |",
            1000.0 * either_field as f64 / judged as f64
        );
        println!(
            "| scalars (any of 12, 3σ) | {:.1} | |",
            1000.0 * scalar_alarms as f64 / judged as f64
        );
    }

    // Shifts.
    if flag("--no-shifts") {
        println!("\n({:.0} s)", started.elapsed().as_secs_f64());
        return;
    }
    println!(
        "\nInput drift: mean windows to detection (1 = the first shifted window), share detected within 3 windows; {runs} runs each, not detected within {horizon} counts as {}",
        horizon + 1
    );
    println!("| stream | share | mmd | centroid | knn | any |\n|---|---|---|---|---|---|");
    // Shifted runs whose input series was not yet judged (still calibrating) when the
    // shift began: they cannot find it at once, and a longer --warmup is needed.
    let mut unready = 0u32;
    let only_stream: String = arg("--stream", String::new());
    let only_share: f64 = arg("--share", 0.0);
    for (name, topic) in &topics {
        if !only_stream.is_empty() && *name != only_stream {
            continue;
        }
        for share in [0.05, 0.2, 0.5] {
            if only_share > 0.0 && share != only_share {
                continue;
            }
            let mut delays = [const { Vec::new() }; VERDICTS.len()];
            for run in 0..runs {
                let mut rng = SmallRng::seed_from_u64(1000 + run as u64);
                let mut cursor = rng.random_range(0..sharegpt.len());
                let mut judge = Judge::new(cfg.clone(), embedder.clone(), i64::MIN);
                let mut first = [None; VERDICTS.len()];
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
                        dump_rows(&mut dump, &format!("{name}@{share}"), run, w - warmup, &j);
                        if !on {
                            continue;
                        }
                        if w == warmup {
                            unready += u32::from(!j.rows.iter().any(|r| {
                                r.field == "input" && r.method == "mmd" && r.status == "judged"
                            }));
                        }
                        for (v, (_, m)) in VERDICTS.iter().enumerate() {
                            if first[v].is_none() && verdict(&j, "input", *m) {
                                first[v] = Some(w - warmup + 1);
                            }
                        }
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
            let cells: Vec<String> = delays.iter().map(|d| cell(d)).collect();
            println!(
                "| {name} | {:.0} % | {} |",
                share * 100.0,
                cells.join(" | ")
            );
        }
    }
    if unready > 0 {
        println!(
            "\nnote: in {unready} shifted runs the input series was not judged in the first shifted window (still calibrating, or too few texts); a longer --warmup gives them a fair start"
        );
    }
    println!("\n({:.0} s)", started.elapsed().as_secs_f64());
}
