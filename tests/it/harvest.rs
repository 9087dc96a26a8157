//! Harvest after real pipeline runs: every failing event (by the tables' own account) lands in
//! the dataset once, redacted, folded; late feedback brings back the original texts; the CLI
//! exports files the eval tools' schemas accept.

use std::collections::BTreeSet;
use std::path::Path;

use telltale::demo::TrafficGenerator;
use telltale::harvest::dataset::{Example, read_examples, versions};
use telltale::quality::pii;

use crate::cli::write_jsonl_gz;
use crate::support::*;

const PIPELINE: &str = r#"
[quality]
sample_rate = 1.0

[[quality.scorer]]
name = "summary_json"
type = "json_schema"
when = ['prompt_id="summarize"', 'prompt_version="v3"']
schema = { type = "object", required = ["summary", "bullets"] }

[[quality.scorer]]
name = "no_pii"
type = "pii"

[[quality.scorer]]
name = "no_refusal"
type = "refusal"

[harvest]
dataset = "prod-failures"
"#;

fn import(pipeline: &Path, file: &Path) -> String {
    String::from_utf8_lossy(&run_files(pipeline, file).stderr).into_owned()
}

fn ids(root: &Path, q: &str) -> BTreeSet<String> {
    strings(&sql(root, q)).into_iter().collect()
}

fn latest(dir: &Path) -> (String, Vec<Example>) {
    let v = *versions(dir).last().expect("a version");
    let name = format!("v{v:04}");
    let ex = read_examples(&dir.join(&name)).unwrap();
    (name, ex)
}

#[test]
fn failing_events_become_a_redacted_deduplicated_dataset_and_late_feedback_joins_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let pipeline = tmp.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[telemetry]\nlisten = \"off\"\n{PIPELINE}",
            root.display()
        ),
    )
    .unwrap();
    // Two hours of demo traffic ending now (harvest looks back 24 h from the wall clock).
    let now = chrono::Utc::now().timestamp_millis();
    let records: Vec<_> = TrafficGenerator::new(21, now - 7_200_000, 7_000_000, 4_000)
        .malformed_every(None)
        .take(4_000)
        .collect();
    let first = tmp.path().join("first.jsonl.gz");
    write_jsonl_gz(&first, &records);
    let log = import(&pipeline, &first);
    assert!(log.contains("harvest prod-failures"), "{log}");

    // What failed, by the tables' own account.
    let failing = ids(
        &root,
        "SELECT event_id FROM events WHERE feedback_for IS NULL AND coalesce(input, input_messages) IS NOT NULL \
         AND (status = 'error' OR feedback <= 0 \
              OR event_id IN (SELECT event_id FROM scores WHERE passed = false))",
    );
    assert!(failing.len() > 100, "{}", failing.len());
    // The backfill's drift verdicts name outliers too (the texts of drifted windows the
    // reference has least of): they are harvested as `drift_outlier`.
    let mut failing = failing;
    for e in strings(&sql(
        &root,
        "SELECT explanation FROM drift WHERE drifted AND method = 'mmd' AND field IN ('input', 'output')",
    )) {
        let named: Vec<serde_json::Value> = serde_json::from_str(&e).unwrap();
        failing.extend(
            named
                .iter()
                .map(|x| x["event_id"].as_str().unwrap().to_owned()),
        );
    }
    let harvested = ids(&root, "SELECT event_id FROM harvest");
    assert_eq!(
        harvested, failing,
        "each failing event harvested, nothing else"
    );
    assert_eq!(
        scalar(&root, "SELECT count(*) FROM harvest") as usize,
        failing.len(),
        "once"
    );

    let dir = root.join("datasets/prod-failures");
    let (v1, examples) = latest(&dir);
    assert_eq!(v1, "v0001");
    let total: u64 = examples.iter().map(|e| e.count).sum();
    assert_eq!(total as usize, failing.len(), "counts add up to the events");
    assert!(
        examples.len() * 2 < failing.len(),
        "the demo's repeated prompts fold: {} examples for {} events",
        examples.len(),
        failing.len()
    );
    let reasons: BTreeSet<&str> = examples
        .iter()
        .flat_map(|e| e.reasons.iter().map(|r| r.name()))
        .collect();
    for r in ["error", "scorer_fail", "guardrail", "negative_feedback"] {
        assert!(reasons.contains(r), "{reasons:?}");
    }
    // Exact keys: no two examples share a normalized input.
    let keys: BTreeSet<u64> = examples
        .iter()
        .map(|e| telltale::harvest::dataset::exact_key(&e.input))
        .collect();
    assert_eq!(keys.len(), examples.len());
    for e in &examples {
        for t in [Some(&e.input), e.output.as_ref()].into_iter().flatten() {
            assert!(pii::find(t, &pii::PiiKind::ALL).is_empty(), "{t}");
        }
    }

    // Late feedback: thumbs down on an answer that passed every check, and on one already
    // harvested for a scorer failure.
    let fine = ids(
        &root,
        "SELECT event_id FROM events WHERE status = 'ok' AND feedback IS NULL AND input IS NOT NULL \
         AND event_id NOT IN (SELECT event_id FROM scores WHERE passed = false) ORDER BY event_id LIMIT 1",
    );
    let fine = fine.into_iter().next().unwrap();
    assert!(!harvested.contains(&fine));
    let failed = ids(
        &root,
        "SELECT event_id FROM scores WHERE passed = false AND event_id IN \
         (SELECT event_id FROM events WHERE feedback IS NULL AND status = 'ok') ORDER BY event_id LIMIT 1",
    );
    let failed = failed.into_iter().next().unwrap();
    let late = tmp.path().join("late.jsonl.gz");
    let feedback = |id: &str, target: &str| telltale::demo::GeneratedRecord {
        payload: serde_json::json!({
            "event_id": id, "timestamp": now - 60_000, "feedback": 0, "feedback_for": target,
        })
        .to_string()
        .into_bytes(),
        key: None,
        event_id: Some(id.to_owned()),
        expected_reject: None,
    };
    write_jsonl_gz(&late, &[feedback("fb-1", &fine), feedback("fb-2", &failed)]);
    import(&pipeline, &late);

    let (v2, examples) = latest(&dir);
    assert_eq!(v2, "v0002");
    let original = strings(&sql(
        &root,
        &format!("SELECT input FROM events WHERE event_id = '{fine}'"),
    ))
    .remove(0);
    let holder = |id: &str| {
        examples
            .iter()
            .find(|e| e.provenance.event_ids.iter().any(|x| x == id))
            .unwrap_or_else(|| panic!("{id} is in no example"))
    };
    let ex = holder(&fine);
    assert!(ex.reasons.iter().any(|r| r.name() == "negative_feedback"));
    assert_eq!(ex.updated_in, "v0002");
    // The original input, or the example it folded into has the same one (redacted).
    if ex.provenance.event_id == fine {
        assert_eq!(ex.input, pii::redact(&original, &pii::PiiKind::ALL));
    } else {
        assert_eq!(
            telltale::harvest::dataset::exact_key(&ex.input),
            telltale::harvest::dataset::exact_key(&pii::redact(&original, &pii::PiiKind::ALL))
        );
    }
    let ex = holder(&failed);
    assert!(
        ex.reason_counts
            .keys()
            .any(|r| r.name() == "negative_feedback")
    );
    assert_eq!(
        examples.iter().map(|e| e.count).sum::<u64>() as usize,
        failing.len() + 1,
        "the late one is one more event; a reason added is not"
    );

    // Export through the CLI, in every format; no generated e-mail address survives.
    let out = tmp.path().join("evals");
    for format in ["jsonl", "promptfoo", "openai", "langfuse"] {
        let o = succeed(
            telltale()
                .args(["harvest", "export", "--pipeline"])
                .arg(&pipeline)
                .args(["--format", format, "--since", "24h", "--out"])
                .arg(&out),
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("v0002"));
    }
    for f in std::fs::read_dir(&out).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(!text.contains("@acme-corp.com"));
    }
    let o = succeed(
        telltale()
            .args(["harvest", "export", "--pipeline"])
            .arg(&pipeline)
            .args([
                "--format",
                "promptfoo",
                "--reason",
                "negative_feedback",
                "--app",
                "support-bot",
                "--out",
            ])
            .arg(tmp.path().join("fb")),
    );
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    let file = tmp.path().join("fb/prod-failures-v0002.promptfoo.yaml");
    let tests: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let tests = tests.as_sequence().unwrap();
    assert!(
        said.contains(&format!("wrote {} of", tests.len())),
        "{said}"
    );
    for t in tests {
        assert_eq!(t["metadata"]["app"].as_str(), Some("support-bot"));
        let r = t["metadata"]["reasons"].as_sequence().unwrap();
        assert!(r.iter().any(|x| x.as_str() == Some("negative_feedback")));
    }
    let bad = telltale()
        .args(["harvest", "export", "--pipeline"])
        .arg(&pipeline)
        .args(["--reason", "slow"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("judge_fail"));

    let o = succeed(
        telltale()
            .args(["harvest", "stats", "--pipeline"])
            .arg(&pipeline),
    );
    let stats = String::from_utf8_lossy(&o.stdout);
    assert!(stats.contains("prod-failures v0002"), "{stats}");
    assert!(
        stats.contains("negative_feedback") && stats.contains("folding"),
        "{stats}"
    );

    // Harvesting again finds nothing new.
    let o = succeed(
        telltale()
            .args(["harvest", "run", "--pipeline"])
            .arg(&pipeline),
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("no new version"));
    assert_eq!(versions(&dir), [1, 2]);
}

/// New and changed examples go to a Kafka topic once per version, keyed by example id.
#[test]
fn examples_are_published_to_kafka_once_per_version() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use telltale::drift::embed::CharGramEmbedder;
    use telltale::harvest::collect::Candidate;
    use telltale::harvest::dataset::{Dataset, publish};
    use telltale::harvest::{HarvestConfig, Reason};

    let broker = Broker::start();
    broker.topic("evals", 1);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut cfg = telltale::config::PipelineConfig::kafka(
        &broker.servers,
        "llm",
        "g",
        root,
        Default::default(),
    );
    cfg.harvest = HarvestConfig {
        kafka_topic: Some("evals".into()),
        ..HarvestConfig::default()
    };
    let hc = cfg.harvest.clone();
    let e = CharGramEmbedder::new(1024);
    let cand = |id: &str, input: &str, r: Reason| Candidate {
        event_id: id.into(),
        input: Some(input.into()),
        reasons: [r].into(),
        ..Default::default()
    };
    let run = |cands: Vec<Candidate>, now: i64| -> usize {
        let mut ds = Dataset::open(root, &hc.datasets_dir(root), &hc.dataset).unwrap();
        let mut r = ds.absorb(cands, &e, &hc).unwrap();
        if r.version.is_some() {
            ds.commit(root, &hc, "chargram-1024", (0, now), now, &mut r)
                .unwrap();
        }
        publish(&ds, &cfg, "evals").unwrap()
    };
    assert_eq!(
        run(
            vec![
                cand(
                    "a",
                    "Why was I billed twice this month?",
                    Reason::ScorerFail
                ),
                cand(
                    "b",
                    "Translate the release notes into German",
                    Reason::JudgeFail
                ),
            ],
            1_000
        ),
        2
    );
    // One example changes (a reason added), one is new.
    assert_eq!(
        run(
            vec![
                cand(
                    "a",
                    "Why was I billed twice this month?",
                    Reason::NegativeFeedback
                ),
                cand("c", "Export all invoices from 2025 as CSV", Reason::Error),
            ],
            2_000
        ),
        2
    );
    assert_eq!(run(vec![], 3_000), 0, "nothing left to publish");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.servers)
        .set("group.id", "reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["evals"]).unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got.len() < 4 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(200)) {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(m.key().unwrap(), v["id"].as_str().unwrap().as_bytes());
            got.push((
                v["version"].as_str().unwrap().to_owned(),
                v["input"].as_str().unwrap().to_owned(),
            ));
        }
    }
    got.sort();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(
        got.iter()
            .filter(|(v, _)| v == "v0002")
            .map(|(_, i)| i.as_str())
            .collect::<Vec<_>>(),
        [
            "Export all invoices from 2025 as CSV",
            "Why was I billed twice this month?"
        ]
    );
}
