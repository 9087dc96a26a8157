//! Folding, redaction, export formats and crash safety of the dataset, without a pipeline
//! (tests/it/harvest.rs runs one).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::collect::{Candidate, ScoreNote};
use super::dataset::{Dataset, Example, read_examples, versions};
use super::export::{Format, render};
use super::{HarvestConfig, Reason};
use crate::drift::embed::CharGramEmbedder;
use crate::quality::pii;

fn cand(id: &str, t: i64, input: &str, reasons: &[Reason]) -> Candidate {
    Candidate {
        event_id: id.to_owned(),
        timestamp_ms: t,
        app: Some("support-bot".into()),
        environment: Some("prod".into()),
        model: Some("gpt-4o".into()),
        prompt_id: Some("answer".into()),
        prompt_version: Some("v7".into()),
        input: Some(input.to_owned()),
        output: Some(format!("answer to {id}")),
        reasons: reasons.iter().copied().collect(),
        ..Default::default()
    }
}

fn open(root: &Path, hc: &HarvestConfig) -> Dataset {
    Dataset::open(root, &hc.datasets_dir(root), &hc.dataset).unwrap()
}

/// Absorbs and commits one run; returns its report.
fn harvest(root: &Path, hc: &HarvestConfig, cands: Vec<Candidate>, now: i64) -> super::RunReport {
    let e = CharGramEmbedder::new(1024);
    let mut ds = open(root, hc);
    let mut r = ds.absorb(cands, &e, hc).unwrap();
    if r.version.is_some() {
        ds.commit(root, hc, "chargram-1024", (now - 1000, now), now, &mut r)
            .unwrap();
    }
    r.examples = ds.examples().len();
    r
}

fn latest(root: &Path, hc: &HarvestConfig) -> Vec<Example> {
    let dir = hc.datasets_dir(root).join(&hc.dataset);
    let v = *versions(&dir).last().unwrap();
    read_examples(&dir.join(super::dataset::version_name(v))).unwrap()
}

const WORDS: &[&str] = &[
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
    "download",
    "folder",
    "permission",
    "integration",
    "webhook",
    "subscription",
    "plan",
    "trial",
    "discount",
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
    "desktop",
    "browser",
    "cache",
    "error",
    "crash",
    "sync",
    "backup",
    "restore",
    "delete",
    "archive",
    "share",
    "link",
    "comment",
    "mention",
    "label",
    "filter",
    "search",
];
const VERBS: &[&str] = &[
    "change",
    "reset",
    "cancel",
    "update",
    "move",
    "recover",
    "configure",
    "disable",
    "enable",
    "merge",
    "rename",
    "duplicate",
    "transfer",
    "verify",
    "schedule",
    "limit",
];

/// A support-style question; siblings share the frame and differ in two slots.
fn question(rng: &mut SmallRng) -> String {
    let w = |rng: &mut SmallRng| WORDS[rng.random_range(0..WORDS.len())];
    let v = VERBS[rng.random_range(0..VERBS.len())];
    let (a, b, c) = (w(rng), w(rng), w(rng));
    match rng.random_range(0..4) {
        0 => format!("How do I {v} the {a} {b} for my whole team without losing the {c} history?"),
        1 => format!(
            "Why can't I {v} my {a} when the {b} is linked to a {c} that belongs to another workspace?"
        ),
        2 => format!(
            "Is there a way to {v} every {a} in a {b} at once, or do I have to open each {c} separately?"
        ),
        _ => format!(
            "After the last update my {a} stopped working: I try to {v} the {b} and get an error about the {c}."
        ),
    }
}

/// The same question as a user would retype it: a typo, a dropped word, a politeness
/// prefix, different case and punctuation (one or two of them).
fn retyped(s: &str, rng: &mut SmallRng) -> String {
    let mut words: Vec<String> = s.split(' ').map(str::to_owned).collect();
    for _ in 0..rng.random_range(1..=2) {
        match rng.random_range(0..5) {
            0 => {
                let i = rng.random_range(0..words.len());
                let w: Vec<char> = words[i].chars().collect();
                if w.len() >= 4 {
                    let j = rng.random_range(1..w.len() - 2);
                    let mut w = w;
                    w.swap(j, j + 1);
                    words[i] = w.into_iter().collect();
                }
            }
            1 => {
                let i = rng.random_range(0..words.len());
                words.remove(i);
            }
            2 => words.insert(0, "Hi, quick question:".into()),
            3 => words.push("Thanks!".into()),
            _ => {
                for w in &mut words {
                    *w = w.to_lowercase().replace(['?', ',', ':'], "");
                }
            }
        }
    }
    words.join(" ")
}

/// How folding went: `truth[i]` is candidate i's true cluster.
#[derive(Debug, Default)]
struct Folding {
    /// Folded candidates that joined an example of their own cluster.
    right: usize,
    /// Folded into another cluster's example.
    wrong: usize,
    /// Duplicates that became an example of their own.
    missed: usize,
    duplicates: usize,
}

impl Folding {
    fn precision(&self) -> f64 {
        self.right as f64 / (self.right + self.wrong).max(1) as f64
    }
    fn recall(&self) -> f64 {
        self.right as f64 / self.duplicates.max(1) as f64
    }
}

fn score_folding(examples: &[Example], truth: &HashMap<String, usize>) -> Folding {
    let mut f = Folding::default();
    let mut first_of: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, ex) in examples.iter().enumerate() {
        first_of
            .entry(truth[&ex.provenance.event_ids[0]])
            .or_insert(i);
    }
    let clusters: BTreeSet<usize> = truth.values().copied().collect();
    f.duplicates = truth.len() - clusters.len();
    for (i, ex) in examples.iter().enumerate() {
        let own = truth[&ex.provenance.event_ids[0]];
        if first_of[&own] != i {
            f.missed += 1;
        }
        for id in &ex.provenance.event_ids[1..] {
            if truth[id] == own {
                f.right += 1;
            } else {
                f.wrong += 1;
            }
        }
    }
    f
}

/// Folding of `bases` (each failing 1–6 times as retyped copies, in random order) over 20
/// seeded runs; returns the totals and how many clusters ended as one example with the right
/// count.
fn fold_runs(
    hc: &HarvestConfig,
    bases: impl Fn(&mut SmallRng) -> String,
) -> (Folding, usize, usize) {
    let mut total = Folding::default();
    let mut counts_right = 0;
    let mut clusters = 0;
    for seed in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut distinct: Vec<String> = Vec::new();
        while distinct.len() < 60 {
            let q = bases(&mut rng);
            if !distinct.contains(&q) {
                distinct.push(q);
            }
        }
        let mut cands = Vec::new();
        let mut truth = HashMap::new();
        let mut sizes = vec![0u64; distinct.len()];
        for (k, b) in distinct.iter().enumerate() {
            for j in 0..rng.random_range(1..=6) {
                let text = if j == 0 {
                    b.clone()
                } else {
                    retyped(b, &mut rng)
                };
                let id = format!("e{k}-{j}");
                truth.insert(id.clone(), k);
                sizes[k] += 1;
                cands.push(cand(&id, 0, &text, &[Reason::ScorerFail]));
            }
        }
        for i in (1..cands.len()).rev() {
            cands.swap(i, rng.random_range(0..=i));
        }
        harvest(dir.path(), hc, cands, 1_000);
        let examples = latest(dir.path(), hc);
        let f = score_folding(&examples, &truth);
        for ex in &examples {
            let k = truth[&ex.provenance.event_ids[0]];
            if ex.provenance.event_ids.iter().all(|i| truth[i] == k) && ex.count == sizes[k] {
                counts_right += 1;
            }
        }
        clusters += distinct.len();
        total.right += f.right;
        total.wrong += f.wrong;
        total.missed += f.missed;
        total.duplicates += f.duplicates;
    }
    (total, counts_right, clusters)
}

/// A question of 10–20 words from the support vocabulary: distinct questions share words but
/// not their order.
fn varied(rng: &mut SmallRng) -> String {
    const GLUE: &[&str] = &[
        "the", "my", "a", "for", "with", "when", "after", "in", "to", "and",
    ];
    let n = rng.random_range(10..=20);
    let mut w: Vec<&str> = vec!["How", "do", "I"];
    w.push(VERBS[rng.random_range(0..VERBS.len())]);
    for i in 0..n {
        w.push(if i % 2 == 0 {
            GLUE[rng.random_range(0..GLUE.len())]
        } else {
            WORDS[rng.random_range(0..WORDS.len())]
        });
    }
    w.join(" ") + "?"
}

fn hc_folding() -> HarvestConfig {
    HarvestConfig {
        max_event_ids: 1000,
        ..Default::default()
    }
}

#[test]
fn retyped_failures_fold_into_one_example_with_their_count() {
    let hc = hc_folding();
    let (f, counts_right, clusters) = fold_runs(&hc, varied);
    eprintln!(
        "varied questions, near_duplicate {}: folding precision {:.3}, recall {:.3} ({} duplicates, {} folded wrongly, {} missed); {counts_right}/{clusters} failures one example with the right count",
        hc.near_duplicate,
        f.precision(),
        f.recall(),
        f.duplicates,
        f.wrong,
        f.missed
    );
    assert!(f.precision() >= 0.99, "{f:?}");
    assert!(f.recall() >= 0.9, "{f:?}");
    assert!(
        counts_right as f64 >= 0.8 * clusters as f64,
        "{counts_right}/{clusters}"
    );
}

#[test]
fn sibling_questions_of_one_template_mostly_stay_distinct() {
    // The hard case for a lexical detector: 15 questions per frame that differ in three
    // words, retyped. Precision is what matters (a wrong fold loses an eval case).
    let hc = hc_folding();
    let (f, _, _) = fold_runs(&hc, question);
    eprintln!(
        "template siblings, near_duplicate {}: folding precision {:.3}, recall {:.3} ({} folded wrongly, {} missed)",
        hc.near_duplicate,
        f.precision(),
        f.recall(),
        f.wrong,
        f.missed
    );
    assert!(f.precision() >= 0.97, "{f:?}");
    assert!(f.recall() >= 0.85, "{f:?}");
}

/// A failure carrying PII everywhere a harvested text can hold it.
fn leaky(id: &str) -> Candidate {
    let mut c = cand(
        id,
        5_000,
        "My card 4111 1111 1111 1111 was charged twice, mail me at ana.lopez@example.org",
        &[Reason::Guardrail, Reason::ScorerFail],
    );
    c.output = Some("I emailed ana.lopez@example.org; call +1 415 555 0132. Key sk-proj-abcdefghijklmnopqrstuvwx".into());
    c.system = Some("Escalations go to ops@acme-corp.com.".into());
    c.expected = Some("Refund issued to DE89 3704 0044 0532 0130 00.".into());
    c.scores = vec![ScoreNote {
        name: "no_pii".into(),
        scorer_type: "pii".into(),
        category: Some("pii".into()),
        value: Some(0.0),
        label: Some("email".into()),
        passed: Some(false),
        explanation: Some("found ana.lopez@example.org in the output".into()),
    }];
    c
}

const SECRETS: &[&str] = &[
    "4111 1111 1111 1111",
    "ana.lopez@example.org",
    "415 555 0132",
    "sk-proj-abcdefghijklmnopqrstuvwx",
    "ops@acme-corp.com",
    "DE89 3704 0044 0532 0130 00",
];

#[test]
fn no_pii_survives_in_any_format() {
    let dir = tempfile::tempdir().unwrap();
    let hc = HarvestConfig::default();
    let r = harvest(dir.path(), &hc, vec![leaky("e1"), leaky("e2")], 10_000);
    assert_eq!((r.new_examples, r.folded_exact), (1, 1), "{r:?}");
    let examples = latest(dir.path(), &hc);
    let refs: Vec<&Example> = examples.iter().collect();
    let q = crate::quality::QualityConfig::default();
    let ds_dir = hc.datasets_dir(dir.path()).join(&hc.dataset).join("v0001");
    let mut texts = vec![std::fs::read_to_string(ds_dir.join("examples.jsonl")).unwrap()];
    for f in [
        Format::Jsonl,
        Format::Promptfoo,
        Format::OpenAi,
        Format::Langfuse,
    ] {
        texts.push(render(&refs, f, "d", "v0001", &q).unwrap());
    }
    for t in &texts {
        for s in SECRETS {
            assert!(!t.contains(s), "{s} leaked into:\n{t}");
        }
        // JSON escapes nothing in these values, so the detectors see the same text.
        assert!(
            pii::find(t, &pii::PiiKind::ALL).is_empty(),
            "{:?}",
            pii::find(t, &pii::PiiKind::ALL)
        );
        assert!(
            t.contains("<EMAIL_1>"),
            "placeholders keep the text readable:\n{t}"
        );
    }
    // One numbering across the fields of an example: the address in the input and in the
    // output and the explanation is the same placeholder.
    let ex = &examples[0];
    assert!(
        ex.input.contains("<EMAIL_1>") && ex.input.contains("<CREDIT_CARD_1>"),
        "{}",
        ex.input
    );
    assert!(ex.output.as_deref().unwrap().contains("<EMAIL_1>"));
    assert!(
        ex.scores[0]
            .explanation
            .as_deref()
            .unwrap()
            .contains("<EMAIL_1>")
    );
    assert!(ex.system.as_deref().unwrap().contains("<EMAIL_2>"));
    assert!(ex.redacted);

    // With redaction off the texts are kept as they were.
    let dir = tempfile::tempdir().unwrap();
    let plain = HarvestConfig {
        redact: false,
        ..HarvestConfig::default()
    };
    harvest(dir.path(), &plain, vec![leaky("e1")], 10_000);
    assert!(
        latest(dir.path(), &plain)[0]
            .input
            .contains("ana.lopez@example.org")
    );
}

fn examples_for_export() -> Vec<Example> {
    let dir = tempfile::tempdir().unwrap();
    let hc = HarvestConfig::default();
    let mut a = cand(
        "a",
        1_000,
        "Summarize: the Q3 report shows \"growth\"\nand risks",
        &[Reason::ScorerFail],
    );
    a.system = Some("Answer in JSON.".into());
    a.scores = vec![ScoreNote {
        name: "summary_json".into(),
        scorer_type: "json_schema".into(),
        category: Some("format".into()),
        value: Some(0.0),
        label: Some("invalid".into()),
        passed: Some(false),
        explanation: Some("missing property bullets".into()),
    }];
    let mut b = cand(
        "b",
        2_000,
        "What is the capital of Australia?",
        &[Reason::JudgeFail],
    );
    b.expected = Some("Canberra".into());
    b.scores = vec![ScoreNote {
        name: "correct".into(),
        scorer_type: "llm_judge".into(),
        category: Some("correctness".into()),
        value: Some(0.2),
        label: Some("fail".into()),
        passed: Some(false),
        explanation: Some("said Sydney".into()),
    }];
    let mut c = cand(
        "c",
        3_000,
        "yes: no? on: off - [x] {y} # z",
        &[Reason::NegativeFeedback, Reason::Error],
    );
    c.output = None;
    c.error_type = Some("timeout".into());
    harvest(dir.path(), &hc, vec![a, b, c], 10_000);
    latest(dir.path(), &hc)
}

fn scorers() -> crate::quality::QualityConfig {
    let toml = r#"
[quality.judge]
base_url = "http://127.0.0.1:1/v1"
model = "judge"
api_key_env = ""
[[quality.scorer]]
name = "summary_json"
type = "json"
[[quality.scorer]]
name = "correct"
type = "llm_judge"
rubric = "custom"
criteria = "Names the right city."
"#;
    let table: toml::Table = toml::from_str(toml).unwrap();
    let mut root = crate::config::reader::Obj::new("", table);
    let mut e = crate::config::reader::Errors(Vec::new());
    let q = crate::quality::config::read_quality(&mut root, Path::new(""), &mut e);
    assert!(e.0.is_empty(), "{:?}", e.0);
    q
}

const PROMPTFOO_TYPES: &[&str] = &[
    "equals",
    "contains",
    "icontains",
    "contains-all",
    "contains-any",
    "icontains-all",
    "icontains-any",
    "starts-with",
    "regex",
    "is-json",
    "contains-json",
    "javascript",
    "python",
    "llm-rubric",
    "factuality",
    "similar",
    "levenshtein",
    "model-graded-closedqa",
];

#[test]
fn promptfoo_tests_follow_promptfoos_test_case_schema() {
    let examples = examples_for_export();
    let refs: Vec<&Example> = examples.iter().collect();
    let text = render(&refs, Format::Promptfoo, "d", "v0001", &scorers()).unwrap();
    // A real YAML parser reads it back, and every value is what the example held.
    let tests: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let tests = tests.as_sequence().expect("a list of test cases");
    assert_eq!(tests.len(), 3);
    for (t, ex) in tests.iter().zip(&examples) {
        let t = t.as_mapping().expect("a test case is a mapping");
        for k in t.keys() {
            let k = k.as_str().unwrap();
            assert!(
                [
                    "description",
                    "vars",
                    "assert",
                    "metadata",
                    "options",
                    "threshold"
                ]
                .contains(&k),
                "{k} is not a test-case key"
            );
        }
        assert!(t["description"].as_str().is_some());
        let vars = t["vars"].as_mapping().unwrap();
        assert_eq!(vars["input"].as_str(), Some(ex.input.as_str()));
        for v in vars.values() {
            assert!(v.is_string(), "vars are strings: {v:?}");
        }
        let asserts = t["assert"].as_sequence().unwrap();
        assert!(!asserts.is_empty());
        for a in asserts {
            let ty = a["type"].as_str().unwrap();
            let base = ty.strip_prefix("not-").unwrap_or(ty);
            assert!(
                PROMPTFOO_TYPES.contains(&base),
                "unknown assertion type {ty}"
            );
            match base {
                "is-json" => {}
                "contains-all" | "contains-any" | "icontains-all" | "icontains-any" => {
                    assert!(a["value"].is_sequence())
                }
                _ => assert!(a["value"].is_string(), "{a:?}"),
            }
        }
        let meta = t["metadata"].as_mapping().unwrap();
        assert_eq!(meta["telltale_id"].as_str(), Some(ex.id.as_str()));
        assert_eq!(meta["count"].as_u64(), Some(ex.count));
    }
    let types: Vec<Vec<&str>> = tests
        .iter()
        .map(|t| {
            t["assert"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a["type"].as_str().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(
        types[0],
        ["is-json"],
        "the failed JSON scorer becomes is-json"
    );
    assert_eq!(
        types[1],
        ["llm-rubric", "factuality"],
        "judge rubric and the reference answer"
    );
    assert_eq!(
        tests[1]["assert"][0]["value"].as_str(),
        Some("Names the right city.")
    );
    assert_eq!(
        types[2],
        ["llm-rubric"],
        "negative feedback becomes a rubric"
    );
}

#[test]
fn openai_evals_and_langfuse_items_follow_their_schemas() {
    let examples = examples_for_export();
    let refs: Vec<&Example> = examples.iter().collect();
    let q = scorers();
    let text = render(&refs, Format::OpenAi, "d", "v0001", &q).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    for (line, ex) in lines.iter().zip(&examples) {
        // openai/evals samples: {"input": [chat messages], "ideal": string | [string]}.
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        assert!(obj.keys().all(|k| k == "input" || k == "ideal"), "{obj:?}");
        let msgs = v["input"].as_array().unwrap();
        for m in msgs {
            assert!(["system", "user", "assistant"].contains(&m["role"].as_str().unwrap()));
            assert!(m["content"].is_string());
            assert_eq!(m.as_object().unwrap().len(), 2);
        }
        assert_eq!(msgs.last().unwrap()["content"], ex.input.as_str());
        assert_eq!(msgs.last().unwrap()["role"], "user");
        match &ex.expected {
            Some(x) => assert_eq!(v["ideal"], x.as_str()),
            None => assert!(v.get("ideal").is_none()),
        }
    }
    let items: serde_json::Value =
        serde_json::from_str(&render(&refs, Format::Langfuse, "d", "v0001", &q).unwrap()).unwrap();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 3);
    for (it, ex) in items.iter().zip(&examples) {
        // CreateDatasetItemRequest: datasetName required; input, expectedOutput, metadata any
        // JSON; id and status optional (status ACTIVE or ARCHIVED).
        assert_eq!(it["datasetName"], "d");
        assert_eq!(it["id"], ex.id.as_str());
        assert!(["ACTIVE", "ARCHIVED"].contains(&it["status"].as_str().unwrap()));
        assert_eq!(it["input"]["input"], ex.input.as_str());
        assert!(it["metadata"].is_object());
        for k in it.as_object().unwrap().keys() {
            assert!(
                [
                    "datasetName",
                    "id",
                    "input",
                    "expectedOutput",
                    "metadata",
                    "status",
                    "sourceTraceId",
                    "sourceObservationId"
                ]
                .contains(&k.as_str()),
                "{k}"
            );
        }
    }
}

#[test]
fn reruns_harvest_nothing_twice_and_late_reasons_join_their_example() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let hc = HarvestConfig::default();
    let a = cand(
        "a",
        1_000,
        "Why is my invoice total wrong after the plan change?",
        &[Reason::ScorerFail],
    );
    let b = cand(
        "b",
        2_000,
        "Reset the webhook secret for the billing integration",
        &[Reason::Error],
    );
    let r = harvest(root, &hc, vec![a.clone(), b.clone()], 10_000);
    assert_eq!((r.new_examples, r.version.as_deref()), (2, Some("v0001")));

    // The same failures again, and late negative feedback on `a`.
    let mut a2 = a.clone();
    a2.reasons.insert(Reason::NegativeFeedback);
    let r = harvest(root, &hc, vec![a2, b.clone()], 20_000);
    assert_eq!(
        (r.already_harvested, r.reasons_added, r.new_examples),
        (1, 1, 0),
        "{r:?}"
    );
    let ex = latest(root, &hc);
    let ea = ex.iter().find(|e| e.provenance.event_id == "a").unwrap();
    assert_eq!(ea.count, 1, "a reason added is not another occurrence");
    assert_eq!(ea.reasons, [Reason::ScorerFail, Reason::NegativeFeedback]);
    assert_eq!(ea.updated_in, "v0002");
    assert_eq!(ea.added_in, "v0001");

    // Nothing new: no version.
    let r = harvest(root, &hc, vec![a.clone(), b], 30_000);
    assert_eq!(r.version, None);
    let vdir = hc.datasets_dir(root).join(&hc.dataset);
    assert_eq!(versions(&vdir), [1, 2]);
    // v0001 is untouched by later versions.
    let v1 = read_examples(&vdir.join("v0001")).unwrap();
    assert_eq!(
        v1.iter().find(|e| e.id == ea.id).unwrap().reasons,
        [Reason::ScorerFail]
    );
}

#[test]
fn a_run_killed_before_its_version_landed_is_redone_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let hc = HarvestConfig::default();
    let first = vec![cand(
        "a",
        1_000,
        "Cancel my subscription but keep the archive",
        &[Reason::ScorerFail],
    )];
    harvest(root, &hc, first, 10_000);
    let second = vec![
        cand(
            "b",
            2_000,
            "How do I export the dashboard as a PDF report?",
            &[Reason::JudgeFail],
        ),
        cand(
            "c",
            2_500,
            "how do i export the dashboard as a pdf report",
            &[Reason::JudgeFail],
        ),
    ];
    harvest(root, &hc, second.clone(), 20_000);
    let vdir = hc.datasets_dir(root).join(&hc.dataset);
    let manifest = |v: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(vdir.join(v).join("manifest.json")).unwrap()).unwrap()
    };
    let hash = manifest("v0002")["content_hash"].clone();
    // The crash: v0002's rows are in the harvest table, its directory never got renamed.
    std::fs::rename(vdir.join("v0002"), vdir.join(".v0002.tmp")).unwrap();
    let r = harvest(root, &hc, second, 20_000);
    assert_eq!(
        (r.new_examples, r.folded_exact, r.already_harvested),
        (1, 1, 0),
        "{r:?}"
    );
    assert_eq!(manifest("v0002")["content_hash"], hash);
    assert!(!vdir.join(".v0002.tmp").exists());
    // One set of rows per event in the harvest table.
    let mut ids = Vec::new();
    for b in super::collect::batches(root, "harvest", 0, i64::MAX, None).unwrap() {
        use arrow::array::{Array, AsArray};
        let c = b.column_by_name("event_id").unwrap().as_string::<i32>();
        ids.extend((0..c.len()).map(|i| c.value(i).to_owned()));
    }
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
}

#[test]
fn a_clearer_failure_becomes_the_representative() {
    let dir = tempfile::tempdir().unwrap();
    let hc = HarvestConfig::default();
    let note = |name: &str, v: f64| ScoreNote {
        name: name.into(),
        scorer_type: "regex".into(),
        category: None,
        value: Some(v),
        label: None,
        passed: Some(false),
        explanation: None,
    };
    let mut a = cand(
        "a",
        1_000,
        "List every order shipped to the old address last month",
        &[Reason::ScorerFail],
    );
    a.scores = vec![note("x", 0.4)];
    let mut b = cand(
        "b",
        2_000,
        "List every order shipped to the old adress last month please",
        &[Reason::ScorerFail],
    );
    b.scores = vec![note("x", 0.1), note("y", 0.0)];
    let r = harvest(dir.path(), &hc, vec![a, b], 10_000);
    assert_eq!((r.new_examples, r.folded_near), (1, 1), "{r:?}");
    let ex = &latest(dir.path(), &hc)[0];
    assert_eq!(ex.provenance.event_id, "b");
    assert!(ex.input.ends_with("please"));
    assert_eq!(ex.count, 2);
    assert_eq!(ex.provenance.event_ids, ["a", "b"]);
}

#[test]
fn score_rows_map_to_reasons() {
    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, StringArray, TimestampMillisecondArray,
    };
    use std::sync::Arc;
    let s = |v: &[Option<&str>]| Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
    let b = arrow::array::RecordBatch::try_from_iter([
        (
            "event_id",
            s(&[
                Some("judged"),
                Some("leaky"),
                Some("regex"),
                Some("low"),
                Some("fine"),
                Some("late"),
            ]),
        ),
        (
            "timestamp",
            Arc::new(TimestampMillisecondArray::from(vec![
                10, 10, 10, 10, 10, 99,
            ])) as ArrayRef,
        ),
        (
            "evaluation_name",
            s(&[
                Some("correct"),
                Some("no_pii"),
                Some("fmt"),
                Some("relevance"),
                Some("relevance"),
                Some("fmt"),
            ]),
        ),
        (
            "scorer_type",
            s(&[
                Some("llm_judge"),
                Some("pii"),
                Some("regex"),
                Some("llm_judge"),
                Some("llm_judge"),
                Some("regex"),
            ]),
        ),
        (
            "category",
            s(&[
                Some("correctness"),
                Some("pii"),
                Some("format"),
                Some("relevance"),
                Some("relevance"),
                None,
            ]),
        ),
        (
            "score_value",
            Arc::new(Float64Array::from(vec![
                Some(0.2),
                Some(0.0),
                Some(0.0),
                Some(0.4),
                Some(0.9),
                Some(0.0),
            ])) as ArrayRef,
        ),
        (
            "passed",
            Arc::new(BooleanArray::from(vec![
                Some(false),
                Some(false),
                Some(false),
                Some(true),
                Some(true),
                Some(false),
            ])) as ArrayRef,
        ),
    ])
    .unwrap();
    let run = |hc: &HarvestConfig| {
        let (mut reasons, mut notes) = (HashMap::new(), HashMap::new());
        super::collect::score_rows(&b, hc, 0, 50, &mut reasons, &mut notes);
        let mut out: Vec<(String, Vec<Reason>)> = reasons
            .into_iter()
            .map(|(k, v): (String, BTreeSet<Reason>)| (k, v.into_iter().collect()))
            .collect();
        out.sort();
        (out, notes.len())
    };
    let mut hc = HarvestConfig::default();
    hc.score_below.insert("relevance".into(), 0.5);
    let (got, notes) = run(&hc);
    assert_eq!(
        got,
        [
            ("judged".to_owned(), vec![Reason::JudgeFail]),
            ("leaky".to_owned(), vec![Reason::Guardrail]),
            ("low".to_owned(), vec![Reason::LowScore]),
            ("regex".to_owned(), vec![Reason::ScorerFail]),
        ]
    );
    assert_eq!(
        notes, 5,
        "every scored event in the window keeps its scores"
    );
    hc.reasons.retain(|r| *r != Reason::JudgeFail);
    assert!(run(&hc).0.iter().all(|(id, _)| id != "judged"));
}
