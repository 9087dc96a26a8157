//! Experiments after real pipeline runs: the `experiments` table's per-window partials add up
//! to what SQL computes over `events` and `scores` independently (late feedback joined to the
//! arm of the event it names, duplicates once); the decision, the scorecard, the gate and the
//! alert agree; and an evaluator that stops and resumes takes the same looks as one that
//! does not.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::Float64Type;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use telltale::config::PipelineConfig;
use telltale::experiment::Evaluator;

use crate::support::*;

const PIPELINE: &str = r#"
[quality]
sample_rate = 1.0

[[quality.scorer]]
name = "no_refusal"
type = "refusal"

[harvest]
reasons = ["alert"]
lookback = "30d"

[alerting]
enabled = true
rules = "@ALERTS@"
clock = "event"

[experiments]
window = "10m"

[[experiment]]
name = "checkout-copy"
arms = ["A", "B"]
where = { app = "shop" }

[[experiment.metric]]
name = "converted"
value = "attribute:converted"
role = "goal"

[[experiment.metric]]
name = "answered"
value = "pass:no_refusal"
role = "secondary"

[[experiment.metric]]
name = "feedback"
value = "feedback"
role = "secondary"

[[experiment.metric]]
name = "latency"
value = "latency_ms"
role = "guardrail"
tolerance = 0.1
"#;

/// 2 h of a `shop` experiment from 2026-11-25 10:00 UTC: B converts better (0.30 vs 0.22),
/// refuses less, gets better late feedback, and is 35 % slower. Plus other apps' traffic (not
/// in the experiment), 150 events delivered twice, and feedback events ten minutes later
/// naming a fifth of the experiment's events.
fn traffic(path: &Path) -> usize {
    let mut rng = SmallRng::seed_from_u64(8);
    let t0 = 1_795_600_800_000i64;
    let mut lines = Vec::new();
    let mut experiment = Vec::new();
    for i in 0..6_000 {
        let ts = t0 + i * 1_200;
        let shop = rng.random_bool(0.8);
        let arm = if rng.random_bool(0.5) { "B" } else { "A" };
        let b = arm == "B";
        let id = format!("e{i:05}");
        let refuse = rng.random_bool(if b { 0.03 } else { 0.08 });
        let output = if refuse {
            "I'm sorry, but I can't help with that request."
        } else {
            "Your order ships tomorrow; the tracking link is in your inbox."
        };
        let slow = if b && shop { 1.35 } else { 1.0 };
        let latency = (900.0 * slow * (0.4 * rng.random::<f64>() + 0.8) * 10.0).round() / 10.0;
        let converted = rng.random_bool(if b { 0.30 } else { 0.22 });
        let e = json!({
            "event_id": id, "timestamp": ts, "app": if shop { "shop" } else { "blog" },
            "environment": "prod", "model": "gpt-4o-mini", "prompt_version": "v1",
            "experiment": "checkout-copy", "variant": arm,
            "input": "Where is my order?", "output": output, "latency_ms": latency,
            "input_tokens": 20, "output_tokens": 14,
            "attributes": { "converted": converted },
        });
        if shop {
            experiment.push((id.clone(), b, ts));
        }
        lines.push(e.to_string());
        if shop && i % 40 == 0 {
            lines.push(e.to_string());
        }
    }
    for (id, b, ts) in &experiment {
        if rng.random_bool(0.2) {
            let good = rng.random_bool(if *b { 0.8 } else { 0.5 });
            lines.push(
                json!({
                    "event_id": format!("fb-{id}"), "timestamp": ts + 600_000, "app": "shop",
                    "feedback_for": id, "feedback": if good { 1.0 } else { 0.0 },
                })
                .to_string(),
            );
        }
    }
    let mut f = std::fs::File::create(path).unwrap();
    for l in &lines {
        writeln!(f, "{l}").unwrap();
    }
    experiment.len()
}

fn floats(root: &Path, q: &str) -> Vec<Vec<f64>> {
    let mut rows = Vec::new();
    for b in sql(root, q) {
        let cols: Vec<_> = b
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Float64).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            rows.push(
                cols.iter()
                    .map(|c| c.as_primitive::<Float64Type>().value(r))
                    .collect(),
            );
        }
    }
    rows
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, usize) {
    let root = dir.join("data");
    let pipeline = dir.join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[telemetry]\nlisten = \"off\"\n{PIPELINE}",
            root.display()
        )
        .replace("@ALERTS@", concat!(env!("CARGO_MANIFEST_DIR"), "/alerts")),
    )
    .unwrap();
    let input = dir.join("traffic.jsonl");
    let n = traffic(&input);
    run_files(&pipeline, &input);
    (root, pipeline, n)
}

#[test]
fn a_backfilled_experiment_adds_up_decides_gates_and_alerts() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, _, n) = setup(tmp.path());

    // Exposures: the window partials add up to the distinct experiment events per arm.
    let from_table = counts(&sql(
        &root,
        "SELECT arm, sum(window_n) FROM experiments WHERE metric = 'latency' GROUP BY arm",
    ));
    let from_events = counts(&sql(
        &root,
        "SELECT variant, count(DISTINCT event_id) FROM events \
         WHERE app = 'shop' AND feedback_for IS NULL GROUP BY variant",
    ));
    assert_eq!(from_table, from_events);
    assert_eq!(from_table.values().sum::<i64>() as usize, n);

    // Each metric's merged partials equal the same statistic computed by SQL from the raw
    // tables: mean latency and conversion per arm over distinct events…
    let merged = |metric: &str| {
        floats(
            &root,
            &format!(
                "SELECT sum(window_n), sum(window_n * window_mean) / sum(window_n) FROM experiments \
                 WHERE metric = '{metric}' AND window_n > 0 GROUP BY arm ORDER BY arm"
            ),
        )
    };
    let distinct = "(SELECT DISTINCT event_id, variant, latency_ms, attributes['converted'] AS converted \
                    FROM events WHERE app = 'shop' AND feedback_for IS NULL)";
    let raw_latency = floats(
        &root,
        &format!(
            "SELECT count(*), avg(latency_ms) FROM {distinct} GROUP BY variant ORDER BY variant"
        ),
    );
    let raw_converted = floats(
        &root,
        &format!(
            "SELECT count(*), avg(CASE WHEN converted = 'true' THEN 1.0 ELSE 0.0 END) FROM {distinct} \
             GROUP BY variant ORDER BY variant"
        ),
    );
    // …scorer results joined by event id…
    let raw_answered = floats(
        &root,
        "SELECT count(*), avg(CASE WHEN s.passed THEN 1.0 ELSE 0.0 END) FROM \
         (SELECT DISTINCT event_id, passed FROM scores WHERE evaluation_name = 'no_refusal') s \
         JOIN (SELECT DISTINCT event_id, variant FROM events WHERE app = 'shop' AND feedback_for IS NULL) e \
         ON s.event_id = e.event_id GROUP BY e.variant ORDER BY e.variant",
    );
    // …and feedback that arrived ten minutes later, joined to the arm of the event it names.
    let raw_feedback = floats(
        &root,
        "SELECT count(*), avg(f.feedback) FROM events f \
         JOIN (SELECT DISTINCT event_id, variant FROM events WHERE app = 'shop' AND feedback_for IS NULL) e \
         ON f.feedback_for = e.event_id GROUP BY e.variant ORDER BY e.variant",
    );
    for (metric, raw) in [
        ("latency", raw_latency),
        ("converted", raw_converted),
        ("answered", raw_answered),
        ("feedback", raw_feedback),
    ] {
        let got = merged(metric);
        assert_eq!(got.len(), 2, "{metric}: {got:?}");
        for (g, r) in got.iter().zip(&raw) {
            assert_eq!(g[0], r[0], "{metric}: n {got:?} vs {raw:?}");
            assert!(close(g[1], r[1]), "{metric}: mean {got:?} vs {raw:?}");
        }
    }
    assert!(
        merged("feedback")[0][0] > 400.0,
        "late feedback is counted: {:?}",
        merged("feedback")
    );

    // The last look: B is better on its goal, but 35 % slower with 10 % tolerated.
    let last =
        "(SELECT * FROM experiments WHERE window_end = (SELECT max(window_end) FROM experiments))";
    let decision = strings(&sql(
        &root,
        &format!("SELECT DISTINCT decision FROM {last}"),
    ));
    assert_eq!(decision, ["rollback"]);
    let verdicts = counts(&sql(
        &root,
        &format!(
            "SELECT metric || ':' || verdict, count(*) FROM {last} WHERE arm = 'B' GROUP BY 1"
        ),
    ));
    assert_eq!(verdicts.get("latency:breached"), Some(&1), "{verdicts:?}");
    assert_eq!(verdicts.get("converted:better"), Some(&1), "{verdicts:?}");

    // The scorecard and the gate say the same.
    let out = succeed(
        telltale()
            .args(["experiment", "status", "checkout-copy", "--data-dir"])
            .arg(&root),
    );
    let card = String::from_utf8(out.stdout).unwrap();
    assert!(card.contains("ROLLBACK"), "{card}");
    assert!(card.contains("B: guardrail latency breached"), "{card}");
    assert!(
        card.contains("breached") && card.contains("better"),
        "{card}"
    );
    let gate = telltale()
        .args(["gate", "--experiment", "checkout-copy", "--data-dir"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(gate.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&gate.stdout)
            .starts_with("blocked: experiment checkout-copy says rollback")
    );
    let unknown = telltale()
        .args(["gate", "--experiment", "nope", "--data-dir"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no look at experiment \"nope\""),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let list = succeed(
        telltale()
            .args(["experiment", "list", "--data-dir"])
            .arg(&root),
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("checkout-copy"));

    // The backfill's alert stage judged the looks: the guardrail alert fired for B.
    let fired = strings(&sql(
        &root,
        "SELECT labels['arm'] FROM alerts WHERE rule = 'ExperimentGuardrailBreached' AND status = 'firing'",
    ));
    assert!(
        fired.iter().all(|a| a == "B") && !fired.is_empty(),
        "{fired:?}"
    );
    // Harvest takes the events under that alert from the breaching arm only.
    let harvested = strings(&sql(
        &root,
        "SELECT DISTINCT e.variant FROM harvest h JOIN events e ON h.event_id = e.event_id \
         WHERE h.reasons LIKE '%alert%' AND e.app = 'shop'",
    ));
    assert_eq!(harvested, ["B"]);
}

#[test]
fn an_evaluator_that_stops_and_resumes_takes_the_same_looks() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, pipeline, _) = setup(tmp.path());
    let config = PipelineConfig::load(&pipeline).unwrap();
    let open = |stream: &str| {
        Evaluator::open(
            config.experiments.clone(),
            &root,
            stream,
            true,
            config.sink.clone(),
            None,
            Arc::new(telltale::telemetry::Stats::default()),
        )
        .unwrap()
    };
    let (t0, end) = (1_795_600_800_000i64, 1_795_600_800_000i64 + 3 * 3_600_000);
    let mut once = open("once");
    // Without `start`, a fresh evaluator looks back 24 h from its first position.
    let all = once.advance(end).unwrap();
    assert!(all.len() >= 12, "{}", all.len());
    // Stopped after 55 minutes of windows, reopened from its state file, continued.
    let mut first = open("twice");
    let a = first.advance(t0 + 55 * 60_000).unwrap();
    drop(first);
    let mut second = open("twice");
    let b = second.advance(end).unwrap();
    assert!(!a.is_empty() && !b.is_empty());
    let resumed: Vec<_> = a.into_iter().chain(b).collect();
    assert_eq!(resumed, all);
    // Asking again evaluates nothing twice.
    assert!(second.advance(end).unwrap().is_empty());
}

/// The demo's experiment (doc-summarizer v2 in prod, concise vs detailed), for pipelines fed
/// with the demo's generated traffic.
pub const DEMO_EXPERIMENT: &str = r#"
[experiments]
settle = "0s"

[[experiment]]
name = "summary-style"
arms = ["concise", "detailed"]
where = { app = "doc-summarizer", environment = "prod" }

[[experiment.metric]]
name = "resolved"
value = "attribute:resolved"

[[experiment.metric]]
name = "latency"
value = "latency_ms"
role = "guardrail"
tolerance = 0.1
"#;

/// Each window of the demo's experiment written once; the last look's running totals equal the
/// sum of the windows' partials and the distinct events of the evaluated windows.
pub fn assert_looks_exactly_once(root: &Path, stream: &str) {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(format!("_state/experiments/{stream}.json"))).unwrap(),
    )
    .unwrap();
    let through = state["evaluated_through_ms"].as_i64().unwrap();
    let twice = scalar(
        root,
        "SELECT count(*) FROM (SELECT window_start, experiment, metric, arm FROM experiments \
         GROUP BY 1, 2, 3, 4 HAVING count(*) > 1)",
    );
    assert_eq!(twice, 0);
    let windows = counts(&sql(
        root,
        "SELECT arm, sum(window_n) FROM experiments WHERE metric = 'latency' GROUP BY arm",
    ));
    let running = counts(&sql(
        root,
        "SELECT arm, n FROM experiments WHERE metric = 'latency' \
         AND window_end = (SELECT max(window_end) FROM experiments)",
    ));
    let events = counts(&sql(
        root,
        &format!(
            "SELECT variant, count(DISTINCT event_id) FROM events \
             WHERE app = 'doc-summarizer' AND environment = 'prod' AND variant IS NOT NULL AND latency_ms IS NOT NULL \
             AND CAST(timestamp AS BIGINT) < {through} GROUP BY variant"
        ),
    ));
    assert!(windows.values().all(|n| *n > 100), "{windows:?}");
    assert_eq!(windows, running);
    assert_eq!(windows, events);
}
