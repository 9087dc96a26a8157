//! The quality stage in a real pipeline run: sampled events are scored once, the scores
//! travel with their events, and the `quality` table's windows add up to the scores.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use arrow::array::{Array, AsArray};
use telltale::event::LlmEvent;
use telltale::quality::Quality;

use crate::cli::write_jsonl_gz;
use crate::support::*;

pub const QUALITY_TOML: &str = r#"
[quality]
sample_rate = 0.3

[[quality.scorer]]
# A custom scorer process (deferred: scored after the events are committed).
name = "words_answered"
type = "command"
command = ["python3", "CARGO_MANIFEST_DIR/examples/scorer.py"]
sample_rate = 0.05

[[quality.scorer]]
name = "summary_json"
type = "json_schema"
when = ['prompt_id="summarize"', 'prompt_version="v3"']
schema = { type = "object", required = ["summary", "bullets"], properties = { summary = { type = "string" }, bullets = { type = "array", items = { type = "string" }, minItems = 1 } } }

[[quality.scorer]]
name = "no_pii"
type = "pii"

[[quality.scorer]]
name = "no_refusal"
type = "refusal"
"#;

/// Column `i` of a query result as plain UTF-8 (DataFusion may hand out string views).
fn utf8(b: &arrow::array::RecordBatch, i: usize) -> arrow::array::StringArray {
    arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)
        .unwrap()
        .as_string::<i32>()
        .clone()
}

/// `telltale run --pipeline <pipeline> --source file:<dir>/export.jsonl.gz`, which must
/// succeed.
fn import(pipeline: &Path, dir: &Path) -> std::process::Output {
    run_files(pipeline, &dir.join("export.jsonl.gz"))
}

/// Imports `records` with a file pipeline whose tables after `[telemetry]` are `extra`;
/// returns the temporary directory (the data root is its `data`) and the run's output.
fn backfill(
    records: &[telltale::demo::GeneratedRecord],
    extra: &str,
) -> (tempfile::TempDir, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl_gz(&dir.path().join("export.jsonl.gz"), records);
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[telemetry]\nlisten = \"off\"\n{extra}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = import(&pipeline, dir.path());
    (dir, out)
}

/// [`QUALITY_TOML`] with its paths filled in.
pub fn quality_toml() -> String {
    QUALITY_TOML.replace("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))
}

/// The sampler of [`QUALITY_TOML`], as the pipeline builds it.
fn sampler() -> std::sync::Arc<Quality> {
    let cfg = telltale::config::PipelineConfig::from_str_with_env(
        &format!(
            "[pipeline]\ndata_root = \"x\"\n[source]\ntype = \"file\"\npath = \"x\"\n{}",
            quality_toml()
        ),
        "test.toml",
        &|_| None,
    )
    .unwrap();
    assert!(cfg.quality.enabled());
    Quality::new(cfg.quality)
}

/// The ids of the `events` rows (`filter`: a SQL condition) that `pick` keeps, each seen as
/// an event with what the sampler reads: id, status, error type, feedback, and whether it has
/// an output.
fn events_where(
    root: &Path,
    filter: &str,
    pick: impl Fn(&LlmEvent<'_>) -> bool,
) -> HashSet<String> {
    let mut out = HashSet::new();
    for b in sql(
        root,
        &format!(
            "SELECT event_id, status, error_type, feedback, output IS NOT NULL FROM events WHERE {filter}"
        ),
    ) {
        let (ids, status, err) = (utf8(&b, 0), utf8(&b, 1), utf8(&b, 2));
        let fb = b.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        let has_output = b.column(4).as_boolean();
        for i in 0..b.num_rows() {
            let e = LlmEvent {
                event_id: ids.value(i).into(),
                status: status.value(i).into(),
                error_type: (!err.is_null(i)).then(|| err.value(i).into()),
                feedback: (!fb.is_null(i)).then(|| fb.value(i)),
                output: has_output.value(i).then(|| "x".into()),
                ..Default::default()
            };
            if pick(&e) {
                out.insert(ids.value(i).to_owned());
            }
        }
    }
    out
}

/// Event ids the sampler picks, from the `events` table (status, error, feedback matter).
pub fn expected_sampled(root: &Path) -> HashSet<String> {
    let q = sampler();
    events_where(root, "true", |e| q.sample(e).is_some())
}

/// Every sampled event has its scores once (no scorer twice for an event), and no unsampled
/// event has any.
pub fn assert_scores_exactly_once(root: &Path) {
    assert_deferred_exactly_once(root);
    let dup = scalar(
        root,
        "SELECT count(*) FROM (SELECT event_id, evaluation_name FROM scores GROUP BY 1, 2 HAVING count(*) > 1)",
    );
    assert_eq!(dup, 0, "an (event, scorer) pair scored twice");
    let scored: HashSet<String> = strings(&sql(
        root,
        "SELECT DISTINCT event_id FROM scores WHERE scorer_type <> 'command' AND sample_reason <> 'drift_outlier'",
    ))
    .into_iter()
    .collect();
    let expected = expected_sampled(root);
    // no_pii and no_refusal apply to every event with an output: errors have none.
    let with_output: HashSet<String> = strings(&sql(
        root,
        "SELECT event_id FROM events WHERE output IS NOT NULL",
    ))
    .into_iter()
    .collect();
    let want: HashSet<String> = expected.intersection(&with_output).cloned().collect();
    assert_eq!(
        scored.len(),
        want.len(),
        "scored events vs sampled events with an output"
    );
    assert_eq!(scored, want);
}

/// The command scorer ran once on each event the sampler and its nested rate pick, after the
/// events were committed.
pub fn assert_deferred_exactly_once(root: &Path) {
    let q = sampler();
    let want = events_where(root, "output IS NOT NULL", |e| {
        q.sample(e)
            .is_some_and(|(reason, _)| q.deferred(e, reason).is_some())
    });
    let got = strings(&sql(
        root,
        "SELECT event_id FROM scores WHERE evaluation_name = 'words_answered' AND sample_reason <> 'drift_outlier'",
    ));
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), unique.len(), "a deferred score written twice");
    assert!(
        want.len() > 20,
        "{} events for the command scorer",
        want.len()
    );
    assert_eq!(unique, want);
}

/// Waits (at most a minute) until the deferred stage of `stream` has scored every one of
/// `records` offsets (its recorded positions), so that a clean stop leaves nothing queued.
pub fn wait_deferred(root: &Path, stream: &str, records: i64) {
    use std::time::{Duration, Instant};
    let state = root.join(format!("_state/quality/{stream}.json"));
    let through = || -> i64 {
        let v: serde_json::Value = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        v["scored_through"].as_object().map_or(0, |m| {
            m.values()
                .filter_map(serde_json::Value::as_i64)
                .map(|x| x + 1)
                .sum()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while through() < records && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(through(), records, "deferred scoring did not catch up");
}

/// A file import with quality on: scores match an independent check of the outputs, and the
/// `quality` table's 1-minute and 1-hour rows add up to the scores.
#[test]
fn scores_match_outputs_and_windows_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let records = traffic(77, 6000, Some(50));
    write_jsonl_gz(&dir.path().join("export.jsonl.gz"), &records);
    let pipeline = dir.path().join("files.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[sink]\nroll_size = \"200KiB\"\n[telemetry]\nlisten = \"off\"\n{}",
            dir.path().join("data").display(),
            quality_toml()
        ),
    )
    .unwrap();
    import(&pipeline, dir.path());
    let root = dir.path().join("data");
    assert_scores_exactly_once(&root);

    // summary_json, checked here with serde_json alone: an object whose `summary` is a string
    // and `bullets` a non-empty array of strings (JSON in a code fence never occurs here).
    let rows = sql(
        &root,
        "SELECT e.output, s.passed FROM scores s JOIN events e ON s.event_id = e.event_id
         WHERE s.evaluation_name = 'summary_json'",
    );
    let (mut n, mut failed) = (0, 0);
    for b in &rows {
        let out = utf8(b, 0);
        let passed = b.column(1).as_boolean();
        for i in 0..b.num_rows() {
            let v: Option<serde_json::Value> = serde_json::from_str(out.value(i)).ok();
            let ok = v.as_ref().is_some_and(|v| {
                v["summary"].is_string()
                    && v["bullets"].as_array().is_some_and(|a| {
                        !a.is_empty() && a.iter().all(serde_json::Value::is_string)
                    })
            });
            assert_eq!(ok, passed.value(i), "{}", out.value(i));
            n += 1;
            failed += usize::from(!ok);
        }
    }
    assert!(n > 100 && failed > 10, "{n} scored, {failed} failed");
    // Only doc-summarizer v3 is scored by summary_json (its `when`).
    assert_eq!(
        strings(&sql(
            &root,
            "SELECT DISTINCT app || ' ' || prompt_version FROM scores WHERE evaluation_name = 'summary_json'"
        )),
        ["doc-summarizer v3"]
    );

    // Windows: per series and scorer — inline and deferred (the command scorer) alike — the
    // 1-minute rows and the 1-hour roll-up both count every score once, with the same passes.
    let by = |q: &str| -> HashMap<String, (i64, i64)> {
        let mut m = HashMap::new();
        for b in sql(&root, q) {
            let k = utf8(&b, 0);
            let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            let p = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                m.insert(k.value(i).to_owned(), (n.value(i), p.value(i)));
            }
        }
        m
    };
    let key = "app || '/' || environment || '/' || model || '/' || prompt_version || '/' || evaluation_name";
    let from_scores = by(&format!(
        "SELECT {key}, count(*), CAST(sum(CASE WHEN passed THEN 1 ELSE 0 END) AS BIGINT) FROM scores GROUP BY 1"
    ));
    for res in ["1m", "1h"] {
        let from_windows = by(&format!(
            "SELECT {key}, CAST(sum(scored) AS BIGINT), CAST(sum(passed) AS BIGINT) FROM quality
             WHERE resolution = '{res}' GROUP BY 1 HAVING sum(scored) > 0"
        ));
        assert_eq!(from_windows, from_scores, "{res}");
    }
    // The rates the rows carry are the counts' rates, inside their intervals.
    let bad = scalar(
        &root,
        "SELECT count(*) FROM quality WHERE scored > 0 AND (
             abs(pass_rate - CAST(passed AS DOUBLE) / scored) > 1e-12
             OR pass_rate < pass_rate_low OR pass_rate > pass_rate_high)",
    );
    assert_eq!(bad, 0);
}

/// kill -9 while the deferred scorer is busy (a slow process): after the restart the
/// committed events it had not scored are read back from `events` and scored, and every
/// sampled event has its deferred score exactly once.
#[test]
fn deferred_scores_survive_kill_dash_nine() {
    use std::time::{Duration, Instant};
    let broker = Broker::start();
    broker.topic("judged", 2);
    let dir = tempfile::tempdir().unwrap();
    let slow = quality_toml().replace(
        "examples/scorer.py\"]",
        "examples/scorer.py\", \"--delay\", \"0.05\"]",
    );
    assert!(slow.contains("--delay"));
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "judged",
        "judged",
        &format!("roll_interval = \"200ms\"\n{slow}"),
    );
    let log = dir.path().join("run.log");
    let root = dir.path().join("data");
    let records = traffic(21, 6000, None);
    broker.produce("judged", &records);
    let mut child = spawn_run(&pipeline, &log);
    // Kill once some deferred scores are durable, with more still queued.
    let deadline = Instant::now() + Duration::from_secs(60);
    while files_with_suffix(&root.join("scores"), ".parquet")
        .iter()
        .all(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("deferred-")
        })
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut child = spawn_run(&pipeline, &log);
    broker.wait_caught_up("judged", "judged", 2, Duration::from_secs(120));
    // The deferred stage finishes its queue before a clean stop; give it time to drain.
    let want = scalar(
        &root,
        "SELECT count(*) FROM events WHERE output IS NOT NULL",
    );
    assert!(want > 1000);
    wait_deferred(&root, "judged", 6000);
    let status = terminate(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{stderr}");
    assert!(
        stderr.contains("read back from events for deferred scoring"),
        "the kill left no committed events unscored; log:\n{stderr}"
    );
    assert_deferred_exactly_once(&root);
    // The deferred scores' closed windows, checkpointed with the offsets, count each score
    // once across the kill.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("_state/quality/judged.json")).unwrap(),
    )
    .unwrap();
    let closed = state["closed_through"].as_i64().unwrap();
    let in_windows = scalar(
        &root,
        &format!(
            "SELECT CAST(sum(scored) AS BIGINT) FROM quality WHERE resolution = '1m' AND evaluation_name = 'words_answered' AND CAST(window_end AS BIGINT) <= {closed}"
        ),
    );
    let scored = scalar(
        &root,
        &format!(
            "SELECT count(*) FROM scores WHERE evaluation_name = 'words_answered' AND sample_reason <> 'drift_outlier' AND CAST(timestamp AS BIGINT) < {closed}"
        ),
    );
    assert!(scored > 20, "{scored}");
    assert_eq!(in_windows, scored);
}

/// A local OpenAI-compatible chat-completions server for the judge: it fails answers that
/// contain "delay" (a stand-in for a rubric) and counts requests.
fn judge_server() -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    String,
    tokio::runtime::Runtime,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: String| {
            let h = h.clone();
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst);
                let req: serde_json::Value = serde_json::from_str(&body).unwrap();
                let user = req["messages"][1]["content"].as_str().unwrap_or("").to_owned();
                if n % 7 == 3 {
                    // Now and then a rate limit: the client retries after Retry-After.
                    return (
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "0")],
                        "{\"error\": {\"message\": \"slow down\"}}".to_owned(),
                    );
                }
                let bad = user.contains("delay");
                let verdict = serde_json::json!({"score": if bad { 0.2 } else { 0.9 }, "label": if bad { "fail" } else { "pass" }, "explanation": "graded"});
                let resp = serde_json::json!({
                    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": req["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": verdict.to_string()}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 200, "completion_tokens": 20, "total_tokens": 220},
                });
                (axum::http::StatusCode::OK, [("content-type", "application/json")], resp.to_string())
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await });
    (hits, url, rt)
}

/// An LLM judge in a backfill: sampled answers are judged once, with the judge model, cost
/// and latency on each row; a rerun replaces the rows and pays for nothing (the cache).
#[test]
fn judge_scores_a_backfill_and_a_rerun_pays_nothing() {
    use std::sync::atomic::Ordering;
    let (hits, url, _rt) = judge_server();
    let dir = tempfile::tempdir().unwrap();
    let records = traffic(5, 3000, None);
    write_jsonl_gz(&dir.path().join("export.jsonl.gz"), &records);
    let pipeline = dir.path().join("judge.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"[pipeline]
data_root = "{}"
[source]
type = "file"
path = "unused"
[telemetry]
listen = "off"
[quality]
sample_rate = 0.05
[quality.judge]
base_url = "{url}"
model = "gpt-4o-mini"
api_key_env = ""
concurrency = 3
[[quality.scorer]]
name = "support_correct"
type = "llm_judge"
rubric = "correctness"
when = ['app="support-bot"']
"#,
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let run = || import(&pipeline, dir.path());
    let first = run();
    let root = dir.path().join("data");
    let rows = scalar(
        &root,
        "SELECT count(*) FROM scores WHERE evaluation_name = 'support_correct'",
    );
    let distinct = scalar(
        &root,
        "SELECT count(DISTINCT event_id) FROM scores WHERE evaluation_name = 'support_correct'",
    );
    let sampled = scalar(
        &root,
        "SELECT count(*) FROM events WHERE app = 'support-bot' AND output IS NOT NULL",
    );
    assert!(rows > 30, "{rows} judged of {sampled} support answers");
    assert_eq!(rows, distinct);
    // Every row says which model judged it, what it cost (gpt-4o-mini: 200 prompt and 20
    // completion tokens at the built-in price) and how long it took.
    let bad = scalar(
        &root,
        "SELECT count(*) FROM scores WHERE evaluation_name = 'support_correct'
         AND (judge_model <> 'gpt-4o-mini' OR latency_ms IS NULL OR abs(judge_cost_usd - (200 * 0.15 + 20 * 0.6) / 1e6) > 1e-12
              OR category <> 'correctness' OR scorer_type <> 'llm_judge'
              OR judge_input_tokens <> 200 OR judge_output_tokens <> 20)",
    );
    assert_eq!(bad, 0);
    let calls = hits.load(Ordering::SeqCst);
    assert!(
        calls as i64 > rows,
        "429s were retried: {calls} calls for {rows} verdicts"
    );
    // The judge's scores per window: the 1-minute and 1-hour rows of the deferred scorers
    // count every verdict once.
    // `pass`: which run's tables are checked, so a failure says whether the rerun caused it,
    // with that run's warnings (a judge call that failed, a late event).
    let check_windows = |pass: &str, out: &std::process::Output| {
        let warnings: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("WARN"))
            .map(str::to_owned)
            .collect();
        for res in ["1m", "1h"] {
            let (n, p) = (
                scalar(
                    &root,
                    &format!(
                        "SELECT CAST(sum(scored) AS BIGINT) FROM quality WHERE resolution = '{res}' AND evaluation_name = 'support_correct'"
                    ),
                ),
                scalar(
                    &root,
                    &format!(
                        "SELECT CAST(sum(passed) AS BIGINT) FROM quality WHERE resolution = '{res}' AND evaluation_name = 'support_correct'"
                    ),
                ),
            );
            assert_eq!(
                n, rows,
                "{res} after the {pass} run: verdicts counted vs score rows; warnings: {warnings:#?}"
            );
            assert_eq!(
                p,
                scalar(
                    &root,
                    "SELECT count(*) FROM scores WHERE evaluation_name = 'support_correct' AND passed"
                ),
                "{res} after the {pass} run: passes counted vs passing score rows; warnings: {warnings:#?}"
            );
        }
    };
    check_windows("first", &first);
    // The rerun rewrites the same rows from the cache: no request, no duplicate.
    let second = run();
    check_windows("second", &second);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        calls,
        "the rerun called the judge"
    );
    assert_eq!(
        scalar(
            &root,
            "SELECT count(*) FROM scores WHERE evaluation_name = 'support_correct'"
        ),
        rows
    );
}

/// The judge's hourly token budget: once spent, judge scorers skip events until the next hour
/// (the rest of the pipeline carries on).
#[test]
fn judge_budget_caps_the_tokens_spent() {
    use std::sync::atomic::Ordering;
    let (hits, url, _rt) = judge_server();
    let (dir, _) = backfill(
        &traffic(6, 3000, None),
        &format!(
            "[quality]\nsample_rate = 0.2\n[quality.judge]\nbase_url = \"{url}\"\nmodel = \"gpt-4o-mini\"\napi_key_env = \"\"\nconcurrency = 1\nbudget_tokens_per_hour = 1000\n[[quality.scorer]]\nname = \"relevant\"\ntype = \"llm_judge\"\nrubric = \"relevance\"\n"
        ),
    );
    let root = dir.path().join("data");
    let judged = scalar(
        &root,
        "SELECT count(*) FROM scores WHERE evaluation_name = 'relevant'",
    );
    let events = scalar(&root, "SELECT count(*) FROM events");
    // 220 tokens a verdict: never more than 1,000 spent. Calls reserve what the last one
    // cost (500 before any is known), so the budget is never overshot, at the price of
    // skipping a little early.
    assert!(
        judged >= 1 && judged * 220 <= 1000,
        "{judged} verdicts (of ≈ {} sampled)",
        events / 5
    );
    assert!(hits.load(Ordering::SeqCst) as i64 <= 2 * judged);
    assert_eq!(events, 3000);
}

/// A deferred scorer slower than the traffic never holds ingestion up: past
/// `deferred_queue`, sampled events are dropped and counted, and the run reports it.
#[test]
fn a_slow_scorer_drops_and_counts_instead_of_blocking() {
    let (dir, out) = backfill(
        &traffic(8, 4000, None),
        &format!(
            "[sink]\nroll_size = \"100KiB\"\n[quality]\nsample_rate = 0.1\ndeferred_queue = 20\n[[quality.scorer]]\nname = \"slow\"\ntype = \"command\"\ncommand = [\"python3\", \"{}/examples/scorer.py\", \"--delay\", \"0.2\"]\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("quality:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let num = |after: &str| -> u64 {
        let i = line.find(after).unwrap_or_else(|| panic!("{line}"));
        line[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (scored, dropped) = (num(" scored"), num(" dropped"));
    let root = dir.path().join("data");
    assert_eq!(scalar(&root, "SELECT count(*) FROM events"), 4000);
    assert!(dropped > 0 && scored > 0, "{line}");
    assert_eq!(
        scalar(
            &root,
            "SELECT count(*) FROM scores WHERE evaluation_name = 'slow'"
        ),
        scored as i64
    );
    // Everything sampled was either scored or dropped.
    let sampled = scalar(
        &root,
        "SELECT count(*) FROM events WHERE output IS NOT NULL",
    );
    assert!(
        scored + dropped > 0 && (scored + dropped) as i64 <= sampled,
        "{line}"
    );
}
