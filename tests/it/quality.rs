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

/// The sampler of [`QUALITY_TOML`], as the pipeline builds it.
fn sampler() -> std::sync::Arc<Quality> {
    let cfg = telltale::config::PipelineConfig::from_str_with_env(
        &format!(
            "[pipeline]\ndata_root = \"x\"\n[source]\ntype = \"file\"\npath = \"x\"\n{QUALITY_TOML}"
        ),
        "test.toml",
        &|_| None,
    )
    .unwrap();
    assert!(cfg.quality.enabled());
    Quality::new(cfg.quality)
}

/// Event ids the sampler picks, from the `events` table (status, error, feedback matter).
pub fn expected_sampled(root: &Path) -> HashSet<String> {
    let q = sampler();
    let mut out = HashSet::new();
    for b in sql(
        root,
        "SELECT event_id, status, error_type, feedback FROM events",
    ) {
        let (ids, status, err) = (utf8(&b, 0), utf8(&b, 1), utf8(&b, 2));
        let fb = b.column(3).as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            let e = LlmEvent {
                event_id: ids.value(i).into(),
                status: status.value(i).into(),
                error_type: (!err.is_null(i)).then(|| err.value(i).into()),
                feedback: (!fb.is_null(i)).then(|| fb.value(i)),
                ..Default::default()
            };
            if q.sample(&e).is_some() {
                out.insert(ids.value(i).to_owned());
            }
        }
    }
    out
}

/// Every sampled event has its scores once (no scorer twice for an event), and no unsampled
/// event has any.
pub fn assert_scores_exactly_once(root: &Path) {
    let dup = scalar(
        root,
        "SELECT count(*) FROM (SELECT event_id, evaluation_name FROM scores GROUP BY 1, 2 HAVING count(*) > 1)",
    );
    assert_eq!(dup, 0, "an (event, scorer) pair scored twice");
    let scored: HashSet<String> = strings(&sql(root, "SELECT DISTINCT event_id FROM scores"))
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
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[sink]\nroll_size = \"200KiB\"\n[telemetry]\nlisten = \"off\"\n{QUALITY_TOML}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    succeed(
        telltale()
            .args(["run", "--pipeline"])
            .arg(&pipeline)
            .arg("--source")
            .arg(format!("file:{}/export.jsonl.gz", dir.path().display())),
    );
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

    // Windows: per series and scorer, the 1-minute rows and the 1-hour roll-up both count
    // every score once, with the same passes.
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
