//! The command line as a user runs it: file imports, sql, check, demo.

use std::io::Write;

use arrow::array::AsArray;
use std::path::Path;

use crate::support::*;

pub fn write_jsonl_gz(path: &Path, records: &[telltale::demo::GeneratedRecord]) {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    for r in records {
        gz.write_all(&r.payload).unwrap();
        gz.write_all(b"\n").unwrap();
    }
    gz.finish().unwrap();
}

fn file_pipeline(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("files.toml");
    std::fs::write(
        &p,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n[sink]\nroll_size = \"200KiB\"\n[telemetry]\nlisten = \"off\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    p
}

/// Writes `records` as a gzip export and imports it with `telltale run --source file:…`;
/// returns the data root.
fn import(dir: &Path, records: &[telltale::demo::GeneratedRecord]) -> std::path::PathBuf {
    write_jsonl_gz(&dir.join("export.jsonl.gz"), records);
    let pipeline = file_pipeline(dir);
    run_files(&pipeline, &dir.join("export.jsonl.gz"));
    dir.join("data")
}

fn listing(root: &Path) -> Vec<String> {
    let mut f: Vec<String> = files_with_suffix(root, ".parquet")
        .iter()
        .map(|p| p.strip_prefix(root).unwrap().display().to_string())
        .collect();
    f.sort();
    f
}

/// A gzip export goes through the same decode → sink path; a rerun rewrites, not duplicates.
#[test]
fn file_import_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let records = traffic(3, 1200, Some(25));
    write_jsonl_gz(&dir.path().join("export-1.jsonl.gz"), &records[..600]);
    write_jsonl_gz(&dir.path().join("export-2.jsonl.gz"), &records[600..]);
    let pipeline = file_pipeline(dir.path());
    let source = dir.path().join("export-*.jsonl.gz");
    let root = dir.path().join("data");

    let run = || String::from_utf8(run_files(&pipeline, &source).stderr).unwrap();
    let first = run();
    let non_blank = records.iter().filter(|r| !r.payload.is_empty()).count();
    assert!(
        first.contains(&format!("done: {non_blank} records read")),
        "blank lines are skipped, the rest read:\n{first}"
    );
    // Blank lines are skipped by the file source, so no empty_record rejects here.
    assert_exactly_once(&root, &records, true);
    let files = listing(&root);
    assert!(files.len() >= 4, "{files:?}");

    run();
    assert_eq!(listing(&root), files, "the rerun wrote the same files");
    assert_exactly_once(&root, &records, true);
}

#[test]
fn sql_formats_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = import(dir.path(), &traffic(4, 300, None));
    let sql = |args: &[&str], stdin: Option<&str>| {
        let mut c = telltale();
        c.arg("sql").arg("--data-dir").arg(&root).args(args);
        if stdin.is_some() {
            c.stdin(std::process::Stdio::piped());
        }
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(s) = stdin {
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let q = "SELECT app, count(*) AS n FROM events GROUP BY app ORDER BY app";
    let table = sql(&[q], None);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.starts_with("┌"), "{text}");
    assert!(text.contains("│ app            │"), "{text}");
    assert!(text.contains("code-assistant"), "{text}");
    assert!(text.trim_end().ends_with("(3 rows)"), "{text}");

    let json = String::from_utf8(sql(&["--format", "json", q], None).stdout).unwrap();
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total: i64 = rows.iter().map(|r| r["n"].as_i64().unwrap()).sum();
    assert_eq!(total, 300);

    let from_stdin = sql(
        &["--format", "csv"],
        Some("SELECT count(*) AS n FROM events WHERE date = '2026-11-27'"),
    );
    assert_eq!(String::from_utf8(from_stdin.stdout).unwrap(), "n\n300\n");

    let bad = sql(&["SELECT nope FROM events"], None);
    assert!(!bad.status.success());
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(err.starts_with("error: ") && err.contains("nope"), "{err}");
}

/// Without model files (an empty models directory): `models list` says what to run,
/// `models distill` fails with the command that fetches its source model, and a pipeline
/// asking for the static embedder fails `check` at its key.
#[test]
fn models_say_what_is_missing_and_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let out = succeed(
        telltale()
            .env("TELLTALE_MODELS", &models)
            .args(["models", "list"]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("fastembed") && text.contains("missing (bash scripts/models.sh)"),
        "{text}"
    );
    assert!(
        text.contains("missing (bash scripts/models.sh, then telltale models distill)"),
        "{text}"
    );
    let out = telltale()
        .env("TELLTALE_MODELS", &models)
        .args(["models", "distill"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("run `bash scripts/models.sh` first"), "{err}");

    let pipeline = dir.path().join("static.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\nname = \"s\"\ndata_root = \"{}\"\n\n[source]\ntype = \"file\"\npath = \"{}\"\n\n[drift]\nembedder = \"static\"\n",
            dir.path().join("data").display(),
            dir.path().join("in.jsonl").display()
        ),
    )
    .unwrap();
    let out = telltale()
        .env("TELLTALE_MODELS", &models)
        .args(["check", "--pipeline"])
        .arg(&pipeline)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("drift.embedder: no static model in")
            && err.contains("telltale models distill"),
        "{err}"
    );
}

#[test]
fn check_reports_config_errors_and_connectivity() {
    let dir = tempfile::tempdir().unwrap();
    let out = telltale()
        .args([
            "check",
            "--pipeline",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/broken-pipeline.toml"
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("4 errors in pipeline config"), "{err}");
    assert!(
        err.contains("source.group: unknown key (did you mean `group_id`?)"),
        "{err}"
    );

    let broker = Broker::start();
    broker.topic("present", 2);
    let good = pipeline_file(dir.path(), &broker.servers, "present", "g", "");
    let out = succeed(telltale().args(["check", "--pipeline"]).arg(&good));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("ok   topic present: 2 partitions"), "{text}");

    let missing = pipeline_file(dir.path(), &broker.servers, "absent", "h", "");
    let out = telltale()
        .args(["check", "--pipeline"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("FAIL topic absent does not exist")
    );
}

#[test]
fn demo_runs_end_to_end_and_refuses_foreign_directories() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo-data");
    let out = succeed(
        telltale()
            .args(["demo", "--records", "3000", "--data-dir"])
            .arg(&data),
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("produced   3000 records (2985 valid, 15 malformed on purpose)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("3000 records → 2985 events + 15 rejects"),
        "{stdout}"
    );
    assert!(stdout.contains("support-bot"), "{stdout}");
    assert!(stdout.contains("invalid_json"), "{stdout}");
    assert_eq!(scalar(&data, "SELECT count(*) FROM events"), 2985);
    // A second run replaces its own output.
    succeed(
        telltale()
            .args(["demo", "--records", "1000", "--data-dir"])
            .arg(&data),
    );
    assert_eq!(scalar(&data, "SELECT count(*) FROM events"), 995);
    // But never a directory it did not make.
    let foreign = dir.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep").unwrap();
    let refused = telltale()
        .args(["demo", "--data-dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8(refused.stderr)
            .unwrap()
            .contains("was not made by `telltale demo`")
    );
    assert!(foreign.join("precious.txt").exists());
}

/// The demo's slowdown of support-bot v4 fires the shipped latency rule, with the rollback
/// hint, to the terminal and as .eml files; the recovery resolves it. Its topic shift and
/// jailbreak burst fire the drift rules, and nothing else does.
#[test]
fn demo_alerts_on_the_slowdown_and_resolves_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo-data");
    let out = succeed(telltale().args(["demo", "--data-dir"]).arg(&data));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("alert → terminal: [FIRING:1] LatencyRegression support-bot prod"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hint: roll back support-bot/prod to prompt_version v3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("alert → terminal: [RESOLVED] LatencyRegression support-bot prod"),
        "{stdout}"
    );
    let changes = strings(&sql(
        &data,
        "SELECT rule || ' ' || labels['prompt_version'] || ' ' || status FROM alerts
         WHERE kind = 'transition' AND status IN ('firing', 'resolved') ORDER BY window_end",
    ));
    // The latency alert fires and resolves; drift alerts fire for the two series whose
    // traffic the demo changes (code-assistant v7's topic, support-bot v3's jailbreak
    // burst) and for no other.
    let latency: Vec<&String> = changes
        .iter()
        .filter(|c| c.starts_with("Latency"))
        .collect();
    assert_eq!(
        latency,
        [
            "LatencyRegression v4 firing",
            "LatencyRegression v4 resolved"
        ],
        "{changes:?}"
    );
    assert!(
        changes.contains(&"InputDrift v7 firing".to_owned()),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .any(|c| c == "InputDrift v3 firing" || c == "OutputDrift v3 firing"),
        "{changes:?}"
    );
    // The jailbreak burst ends and its drift alert resolves; v7's topic shift lasts.
    assert!(
        changes
            .iter()
            .any(|c| c == "InputDrift v3 resolved" || c == "OutputDrift v3 resolved"),
        "{changes:?}"
    );
    assert!(
        changes
            .iter()
            .filter(|c| c.contains("Drift"))
            .all(|c| c.contains(" v7 ") || c.contains(" v3 ")),
        "{changes:?}"
    );
    // In the drift table: v7's inputs drift within three windows of the shift (and not
    // before it), and other series' embeddings hardly ever (7 series × 24 windows; the
    // verdict wants 4σ three windows running, which exchangeable traffic all but never does).
    let (t0, t1) = (
        scalar(&data, "SELECT CAST(min(timestamp) AS BIGINT) FROM events"),
        scalar(&data, "SELECT CAST(max(timestamp) AS BIGINT) FROM events"),
    );
    let shift = t0 + ((t1 - t0) as f64 * telltale::demo::generator::SHIFT_FROM) as i64;
    let first = scalar(
        &data,
        "SELECT CAST(min(window_start) AS BIGINT) FROM drift
         WHERE app = 'code-assistant' AND prompt_version = 'v7' AND field = 'input' AND drifted",
    );
    let window = 300_000;
    assert!(
        first + window > shift && first <= shift + 3 * window,
        "first drifted window starts {} s after the shift",
        (first - shift) / 1000
    );
    let false_alarms = scalar(
        &data,
        "SELECT count(*) FROM drift WHERE drifted AND field IN ('input', 'output')
         AND NOT ((app = 'code-assistant' AND prompt_version = 'v7')
               OR (app = 'support-bot' AND prompt_version = 'v3'))",
    );
    assert!(false_alarms <= 2, "{false_alarms} false drift verdicts");
    // Quality: doc-summarizer v3's broken answers fire the PII and format rules, which resolve
    // once its prompt is fixed; the jailbreak's refusals fire the refusal rule; no other
    // series has a quality alert.
    let quality: Vec<&String> = changes
        .iter()
        .filter(|c| {
            ["PiiInOutputs", "OutputFormatBroken", "RefusalsHigh"]
                .iter()
                .any(|r| c.starts_with(r))
        })
        .collect();
    for want in [
        "PiiInOutputs v3 firing",
        "PiiInOutputs v3 resolved",
        "OutputFormatBroken v3 firing",
        "OutputFormatBroken v3 resolved",
        "RefusalsHigh v3 firing",
    ] {
        assert!(quality.iter().any(|c| *c == want), "{want}: {changes:?}");
    }
    assert!(quality.iter().all(|c| c.contains(" v3 ")), "{changes:?}");
    let quality_alerts = strings(&sql(
        &data,
        "SELECT DISTINCT rule || ' ' || labels['app'] FROM alerts
         WHERE kind = 'transition' AND status = 'firing' AND rule IN ('PiiInOutputs', 'OutputFormatBroken', 'RefusalsHigh')
         ORDER BY 1",
    ));
    assert_eq!(
        quality_alerts,
        [
            "OutputFormatBroken doc-summarizer",
            "PiiInOutputs doc-summarizer",
            "RefusalsHigh support-bot"
        ]
    );
    // The experiment: "detailed" resolves more but is 30 % slower; the latency guardrail
    // (10 % tolerated) is breached, the decision is rollback, the guardrail alert fires for
    // that arm only, and the goal is significantly better at the last look.
    assert!(
        stdout.contains("experiment summary-style (control concise)")
            && stdout.contains(": ROLLBACK")
            && stdout.contains("detailed: guardrail latency breached"),
        "{stdout}"
    );
    let experiment_alerts = strings(&sql(
        &data,
        "SELECT DISTINCT rule || ' ' || labels['experiment'] || ' ' || labels['arm'] FROM alerts
         WHERE kind = 'transition' AND status = 'firing' AND rule LIKE 'Experiment%'",
    ));
    assert_eq!(
        experiment_alerts,
        ["ExperimentGuardrailBreached summary-style detailed"]
    );
    let last = strings(&sql(
        &data,
        "SELECT metric || ' ' || verdict FROM experiments
         WHERE arm = 'detailed' AND window_end = (SELECT max(window_end) FROM experiments) ORDER BY metric",
    ));
    assert_eq!(
        last,
        [
            "cost within_tolerance",
            "errors within_tolerance",
            "feedback inconclusive",
            "latency breached",
            "resolved better"
        ]
    );
    // Every failing JSON score lies inside the span the generator breaks answers in.
    let (q0, q1) = telltale::demo::generator::QUALITY_SPAN;
    let failing = strings(&sql(
        &data,
        "SELECT CAST(min(CAST(timestamp AS BIGINT)) AS VARCHAR) || ' ' || CAST(max(CAST(timestamp AS BIGINT)) AS VARCHAR) || ' ' || CAST(count(*) AS VARCHAR)
         FROM scores WHERE evaluation_name = 'summary_json' AND NOT passed",
    ));
    let parts: Vec<i64> = failing[0].split(' ').map(|x| x.parse().unwrap()).collect();
    let at = |p: f64| t0 + ((t1 - t0) as f64 * p) as i64;
    assert!(parts[0] >= at(q0) && parts[1] < at(q1), "{failing:?}");
    assert!(parts[2] > 50, "{failing:?}");
    let emails = files_with_suffix(&data.join("alert-emails"), ".eml");
    assert!(emails.len() >= 4, "{} emails", emails.len());
    let bodies: Vec<String> = emails
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("Subject: [FIRING:1] LatencyRegression support-bot prod"))
    );
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("Subject: [RESOLVED] LatencyRegression support-bot prod"))
    );
    let sent = scalar(
        &data,
        "SELECT count(*) FROM alerts WHERE kind = 'notification' AND result = 'ok'",
    );
    assert_eq!(
        sent,
        2 * emails.len() as i64,
        "each notification went to the terminal and to email"
    );

    // The demo harvests its failures; doc-summarizer v3's broken JSON is among them, as
    // promptfoo tests, with the PII its broken answers leaked redacted.
    assert!(stdout.contains("eval examples in"), "{stdout}");
    let tests =
        std::fs::read_to_string(data.join("evals/production-failures-v0001.promptfoo.yaml"))
            .unwrap();
    let tests: serde_yaml::Value = serde_yaml::from_str(&tests).unwrap();
    let tests = tests.as_sequence().unwrap();
    assert!(tests.len() >= 5, "{}", tests.len());
    assert!(tests.iter().all(|t| {
        t["metadata"]["prompt_versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v.as_str() == Some("v3"))
    }));
    assert!(tests.iter().any(|t| {
        t["assert"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a["type"].as_str() == Some("is-json"))
    }));
    let text =
        std::fs::read_to_string(data.join("datasets/production-failures/v0001/examples.jsonl"))
            .unwrap();
    assert!(!text.contains("@acme-corp.com") && text.contains("<EMAIL_1>"));
    let reasons: std::collections::BTreeSet<String> = text
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for r in [
        "scorer_fail",
        "guardrail",
        "error",
        "negative_feedback",
        "alert",
        "drift_outlier",
    ] {
        assert!(reasons.contains(r), "{r} not in {reasons:?}");
    }
}

/// `telltale replay` sends every non-blank line, keyed by the chosen field, and the pipeline
/// reads them back unchanged.
#[test]
fn replay_sends_every_line_with_its_key() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let dir = tempfile::tempdir().unwrap();
    let records = traffic(5, 400, Some(50));
    let file = dir.path().join("r.jsonl.gz");
    write_jsonl_gz(&file, &records);
    let broker = Broker::start();
    broker.topic("replayed", 2);
    let out = succeed(
        telltale()
            .args([
                "replay",
                "--quiet",
                "--topic",
                "replayed",
                "--key-field",
                "event_id",
                "--brokers",
                &broker.servers,
            ])
            .arg(&file),
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    let non_blank: Vec<&telltale::demo::GeneratedRecord> =
        records.iter().filter(|r| !r.payload.is_empty()).collect();
    assert!(
        stderr.contains(&format!("sent {} records", non_blank.len())),
        "{stderr}"
    );

    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.servers)
        .set("group.id", "reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    c.subscribe(&["replayed"]).unwrap();
    let mut got = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got.len() < non_blank.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(std::time::Duration::from_millis(100)) {
            got.insert(
                m.payload().unwrap_or_default().to_vec(),
                m.key().map(<[u8]>::to_vec),
            );
        }
    }
    assert_eq!(got.len(), non_blank.len(), "every line arrived once");
    let mut keyed = 0;
    for r in non_blank {
        let key = got
            .get(&r.payload)
            .unwrap_or_else(|| panic!("missing {}", String::from_utf8_lossy(&r.payload)));
        // The key is the record's top-level `event_id` when it has one (OpenAI-shaped and
        // unparsable records have none).
        let expected = serde_json::from_slice::<serde_json::Value>(&r.payload)
            .ok()
            .and_then(|v| v.get("event_id")?.as_str().map(|s| s.as_bytes().to_vec()));
        keyed += usize::from(expected.is_some());
        assert_eq!(key, &expected);
    }
    assert!(keyed > 200, "most records are keyed: {keyed}");
}

/// The metrics table answers "p99 latency of a prompt version over a time range" exactly: the
/// merged histograms equal the histogram of the raw events, and so lie within the histograms'
/// 1 % of the raw quantile. Every event is counted once per resolution.
#[test]
fn metrics_histograms_merge_to_the_raw_quantile() {
    let dir = tempfile::tempdir().unwrap();
    let records = traffic(31, 8000, None);
    let root = import(dir.path(), &records);
    let valid = records.len() as i64;
    for res in ["1m", "1h"] {
        assert_eq!(
            scalar(
                &root,
                &format!(
                    "SELECT CAST(sum(events) AS BIGINT) FROM metrics WHERE resolution = '{res}'"
                )
            ),
            valid,
            "{res} rows count every event once"
        );
    }

    let (from, to) = ("2026-11-27T04:30:00Z", "2026-11-27T06:00:00Z");
    let out = succeed(
        telltale()
            .args(["sql", "--format", "csv", "--data-dir"])
            .arg(&root)
            .arg(format!(
                "SELECT prompt_version, hdr_quantile(hdr_merge(latency_ms_hist), 0.99) AS p99, \
                 CAST(sum(events) AS BIGINT) AS n FROM metrics \
                 WHERE resolution = '1m' AND window_start >= '{from}' AND window_start < '{to}' \
                 GROUP BY prompt_version ORDER BY prompt_version"
            )),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<(String, f64, usize)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_owned(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert!(rows.len() >= 5, "{text}");
    for (version, p99, n) in rows {
        let raw = sql(
            &root,
            &format!(
                "SELECT latency_ms FROM events WHERE prompt_version = '{version}' \
                 AND timestamp >= '{from}' AND timestamp < '{to}' AND latency_ms IS NOT NULL"
            ),
        );
        let mut values: Vec<f64> = raw
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_primitive::<arrow::datatypes::Float64Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(values.len(), n, "{version}: events in range");
        let mut h = telltale::metrics::series::new_histogram_u64();
        for v in &values {
            h.record(v.round() as u64).unwrap();
        }
        assert_eq!(
            p99,
            h.value_at_quantile(0.99) as f64,
            "{version}: merged = histogram of raw events"
        );
        values.sort_by(f64::total_cmp);
        let rank = ((0.99 * values.len() as f64).ceil() as usize).max(1) - 1;
        let exact = values[rank];
        assert!(
            (p99 - exact).abs() <= 0.01 * exact + 1.0,
            "{version}: p99 {p99} vs raw {exact}"
        );
    }
}

/// `telltale baseline` on a data root without events: each mistake gets its own message,
/// and nothing is pinned.
#[test]
fn baseline_commands_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let fails = |args: &[&str]| {
        let out = telltale()
            .arg("baseline")
            .args(args)
            .arg("--data-dir")
            .arg(&root)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let err = fails(&["pin"]);
    assert!(
        err.contains("say what to pin: --from and --to, --last"),
        "{err}"
    );
    let err = fails(&[
        "pin",
        "--from",
        "2026-11-20",
        "--to",
        "2026-11-21T00:00:00Z",
    ]);
    assert!(
        err.contains("--from \"2026-11-20\" is not an RFC 3339 time"),
        "{err}"
    );
    let err = fails(&["pin", "--last", "24h", "--where", "team=search"]);
    assert!(
        err.contains("--where team=search: team is not a dimension of this pipeline (dimensions: app, environment, model, prompt_version)"),
        "{err}"
    );
    let err = fails(&["pin", "--prompt-version", "v3"]);
    assert!(
        err.contains("no events for prompt_version v3 in")
            && err.contains("(0 events in that time range)"),
        "{err}"
    );
    let out = succeed(
        telltale()
            .args(["baseline", "show", "--data-dir"])
            .arg(&root),
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("no drift baseline is pinned")
    );
}
