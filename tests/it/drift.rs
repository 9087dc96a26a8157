//! The drift stage inside a running pipeline: kill -9 and restart neither lose nor repeat a
//! drift window.

use std::time::{Duration, Instant};

use telltale::demo::TrafficGenerator;

use crate::support::*;

const WINDOW: i64 = 300_000;

/// A pipeline killed (-9) while a drift window is half closed judges that window after the
/// restart, from the minutes it reads back from `events`, and every other window once.
#[test]
fn drift_windows_survive_kill_dash_nine_exactly_once() {
    let broker = Broker::start();
    let partitions = 2;
    broker.topic("drift", partitions);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline_file(
        dir.path(),
        &broker.servers,
        "drift",
        "drift",
        &format!(
            "roll_interval = \"200ms\"\n{}\n{}",
            crate::quality::quality_toml(),
            crate::experiments::DEMO_EXPERIMENT
        ),
    );
    let log = dir.path().join("run.log");
    let root = dir.path().join("data");
    // Two hours of traffic, the topic shift of the demo included; the first 50 minutes first.
    // The shift begins at 66 minutes, after the series' hour of calibration, so that several
    // windows are flagged before the end (with 90 minutes it began while calibrating and only
    // the last closed window could be flagged, its outliers racing the stop).
    let all: Vec<_> = TrafficGenerator::new(5, T_START, 120 * 60_000, 12_000)
        .malformed_every(None)
        .take(12_000)
        .collect();
    broker.produce("drift", &all[..5_000]);
    let mut child = spawn_run(&pipeline, &log);
    broker.wait_caught_up("drift", "drift", partitions, Duration::from_secs(120));
    let state = root.join("_state/drift/drift.json");
    let metrics_state = root.join("_state/metrics/drift.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !state.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let closed = |path: &std::path::Path| -> i64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["closed_through_ms"].as_i64().unwrap()
    };
    let (drift_closed, metrics_closed) = (closed(&state), closed(&metrics_state));
    assert!(
        metrics_closed > drift_closed,
        "the kill left minutes closed by metrics and not yet judged by drift ({metrics_closed} vs {drift_closed})"
    );

    broker.produce("drift", &all[5_000..]);
    let mut child = spawn_run(&pipeline, &log);

    broker.wait_caught_up("drift", "drift", partitions, Duration::from_secs(120));
    // Let the last minutes reach the drift stage, and the deferred scorer its jobs, before
    // stopping.
    std::thread::sleep(Duration::from_secs(2));
    crate::quality::wait_deferred(&root, "drift", 12_000);
    // The drift stage judges a replayed hour's windows at its test budget, well behind the
    // metrics stage: wait until it has judged every window metrics closed, so that the
    // flagged windows and their outliers are in before the stop.
    let judged_all = || closed(&state) >= closed(&metrics_state) / WINDOW * WINDOW;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !judged_all() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        judged_all(),
        "the drift stage did not catch up with metrics in 3 minutes"
    );
    let status = terminate(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status}; log:\n{stderr}");
    assert!(
        stderr.contains("drift minutes closed before the restart read back from events"),
        "{stderr}"
    );

    // Every drift window of every series with closed metrics minutes was judged, once.
    let through = closed(&state);
    let series = "app || '/' || environment || '/' || model || '/' || prompt_version";
    let expected = strings(&sql(
        &root,
        &format!(
            "SELECT DISTINCT {series} || '@' || CAST(CAST(window_start AS BIGINT) / {WINDOW} * {WINDOW} AS VARCHAR) AS k
             FROM metrics WHERE resolution = '1m'
               AND CAST(window_start AS BIGINT) / {WINDOW} * {WINDOW} + {WINDOW} <= {through}
             ORDER BY k"
        ),
    ));
    let judged = strings(&sql(
        &root,
        &format!(
            "SELECT DISTINCT {series} || '@' || CAST(CAST(window_start AS BIGINT) AS VARCHAR) AS k
             FROM drift ORDER BY k"
        ),
    ));
    assert!(expected.len() > 40, "{} series-windows", expected.len());
    assert_eq!(judged, expected);
    let repeated = scalar(
        &root,
        "SELECT count(*) FROM (SELECT app, environment, model, prompt_version, window_start, field, method
         FROM drift GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING count(*) > 1)",
    );
    assert_eq!(repeated, 0);
    // The reference survived: the first window after the restart was tested, not refilled.
    let untested_after_restart = scalar(
        &root,
        &format!(
            "SELECT count(*) FROM drift WHERE app = 'support-bot' AND environment = 'prod'
             AND prompt_version = 'v3' AND field = 'input' AND method = 'mmd'
             AND CAST(window_start AS BIGINT) = {drift_closed} AND status = 'few_reference'"
        ),
    );
    assert_eq!(untested_after_restart, 0);

    // Quality rode along: every sampled event scored once across the kill, and each closed
    // minute's quality counts equal its scores — the minutes open at the kill were rebuilt
    // from `events` and scored again, not lost and not counted twice. (A minute with late
    // events, counted in `events` but not in its closed window, is left out.)
    crate::quality::assert_scores_exactly_once(&root);
    // The demo's experiment rode along too: each of its windows evaluated once across the
    // kill, and the running totals of its last look equal the sum of the windows' partials
    // and the events themselves (a lost or doubled window after the kill would show).
    crate::experiments::assert_looks_exactly_once(&root, "drift");
    // Drift outliers: the events the drift table names (MMD witnesses of drifted windows) are
    // scored too, once, unless the sampler had picked them already.
    let outliers = strings(&sql(
        &root,
        "SELECT DISTINCT event_id FROM scores WHERE sample_reason = 'drift_outlier'",
    ));
    assert!(!outliers.is_empty(), "no drift outlier was scored");
    let named = strings(&sql(
        &root,
        "SELECT explanation FROM drift WHERE drifted AND method = 'mmd' AND field IN ('input', 'output')",
    ))
    .join("\n");
    for id in &outliers {
        assert!(
            named.contains(id.as_str()),
            "{id} is not named by a drift explanation"
        );
    }
    let twice = scalar(
        &root,
        "SELECT count(*) FROM (SELECT event_id, evaluation_name FROM scores GROUP BY 1, 2 HAVING count(*) > 1)",
    );
    assert_eq!(twice, 0);
    let metrics_through = closed(&metrics_state);
    let key = "app || '/' || environment || '/' || model || '/' || prompt_version || '@' || CAST(CAST(window_start AS BIGINT) AS VARCHAR)";
    let minute = "CAST(CAST(timestamp AS BIGINT) / 60000 * 60000 AS VARCHAR)";
    let ekey = format!(
        "app || '/' || environment || '/' || model || '/' || prompt_version || '@' || {minute}"
    );
    let mismatched = strings(&sql(
        &root,
        &format!(
            "WITH m AS (SELECT {key} AS k, events FROM metrics WHERE resolution = '1m' AND CAST(window_end AS BIGINT) <= {metrics_through}),
                  e AS (SELECT {ekey} AS k, count(*) AS n FROM events GROUP BY 1),
                  q AS (SELECT {key} AS k, max(sampled) AS sampled, sum(scored) AS scored FROM quality WHERE resolution = '1m' AND evaluation_name <> 'words_answered' GROUP BY 1),
                  s AS (SELECT {ekey} AS k, count(DISTINCT event_id) AS sampled, count(*) AS scored FROM scores WHERE scorer_type NOT IN ('llm_judge', 'command', 'http') AND sample_reason <> 'drift_outlier' GROUP BY 1)
             SELECT m.k || ' ' || CAST(coalesce(q.scored, 0) AS VARCHAR) || ' vs ' || CAST(coalesce(s.scored, 0) AS VARCHAR)
             FROM m JOIN e ON m.k = e.k LEFT JOIN q ON m.k = q.k LEFT JOIN s ON m.k = s.k
             WHERE m.events = e.n AND coalesce(q.scored, 0) <> coalesce(s.scored, 0)"
        ),
    ));
    assert!(mismatched.is_empty(), "{mismatched:?}");
    let checked = scalar(
        &root,
        &format!(
            "SELECT count(*) FROM quality WHERE resolution = '1m' AND scored > 0 AND CAST(window_end AS BIGINT) <= {metrics_through}"
        ),
    );
    assert!(checked > 100, "{checked} quality rows");
}

/// `telltale baseline pin` from the first 90 minutes of the demo's traffic, then an import
/// of all three hours: code-assistant's series are judged against the pin, which does not
/// adapt to v7's lasting topic shift (every shifted window flagged, once it has persisted),
/// while unshifted v8 is not flagged; the other apps keep their trailing reference. Unpinned,
/// the same import judges v7 against its trailing reference (1 h), which takes the shift in
/// and soon stops flagging it. (At the earlier sizes, 64 texts against 256: the demo's shift
/// is plain at either, and the test runs in a third of the time.)
#[test]
fn a_pinned_baseline_keeps_flagging_a_lasting_shift() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_root = \"{}\"\n[source]\ntype = \"file\"\npath = \"unused\"\n\
             [telemetry]\nlisten = \"off\"\n[harvest]\nenabled = false\n[drift]\nembedder = \"hash\"\nreference = \"1h\"\n\
             samples_per_window = 64\nreference_size = 256\n",
            root.display()
        ),
    )
    .unwrap();
    let span = 3 * 3_600_000;
    let records: Vec<_> = TrafficGenerator::new(11, T_START, span, 30_000)
        .malformed_every(None)
        .take(30_000)
        .collect();
    let pinned_until = T_START + 90 * 60_000;
    let shift = T_START + (telltale::demo::generator::SHIFT_FROM * span as f64) as i64;
    assert!(shift > pinned_until);
    let (first, all) = (
        dir.path().join("first.jsonl.gz"),
        dir.path().join("all.jsonl.gz"),
    );
    // Records come in time order; those in the canonical shape carry an RFC 3339 timestamp.
    let time = |r: &telltale::demo::GeneratedRecord| {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).ok()?;
        let t = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str()?).ok()?;
        Some(t.timestamp_millis())
    };
    let cut = records
        .iter()
        .position(|r| time(r).is_some_and(|t| t >= pinned_until))
        .unwrap();
    let early = &records[..cut];
    crate::cli::write_jsonl_gz(&first, early);
    crate::cli::write_jsonl_gz(&all, &records);
    run_files(&pipeline, &first);

    let baseline = |args: &[&str]| {
        let out = succeed(
            telltale()
                .arg("baseline")
                .args(args)
                .arg("--pipeline")
                .arg(&pipeline),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ms = |t: i64| telltale::metrics::fmt_ms(t);
    let pinned = baseline(&[
        "pin",
        "--from",
        &ms(T_START),
        "--to",
        &ms(pinned_until),
        "--where",
        "app=code-assistant",
        "--quiet",
    ]);
    assert!(pinned.starts_with("pinned 2 series"), "{pinned}");
    let shown = baseline(&["show"]);
    for v in ["v7", "v8"] {
        assert!(
            shown.contains(&format!("app=code-assistant,environment=prod,model=claude-3-5-sonnet-20241022,prompt_version={v}")),
            "{shown}"
        );
    }
    assert!(shown.contains("18 windows"), "{shown}");

    // The whole three hours, as another backfill: a new process reads the stored pin.
    run_files(&pipeline, &all);
    let per_window = |version: &str| {
        strings(&sql(
            &root,
            &format!(
                "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR) || ' ' || CAST(bool_or(drifted) AS VARCHAR) || ' ' || min(reference) || ' (' || min(status) || ', ' || CAST(min(current_n) AS VARCHAR) || ' texts)'
                 FROM drift WHERE stream LIKE 'backfill-%' AND app = 'code-assistant' AND prompt_version = '{version}'
                   AND field = 'input' AND status = 'judged' AND CAST(window_start AS BIGINT) >= {pinned_until}
                 GROUP BY window_start ORDER BY window_start"
            ),
        ))
    };
    let flagged = |rows: &[String], from: i64| {
        let after: Vec<&String> = rows
            .iter()
            .filter(|r| r.split(' ').next().unwrap().parse::<i64>().unwrap() >= from)
            .collect();
        (
            after.iter().filter(|r| r.contains(" true ")).count(),
            after.len(),
        )
    };
    let v7 = per_window("v7");
    assert!(v7.iter().all(|r| r.contains(" pinned ")), "{v7:#?}");
    // From the third whole shifted window on, every window is flagged.
    let settled = (shift / WINDOW + 3) * WINDOW;
    let (hit, of) = flagged(&v7, settled);
    assert!(
        of >= 10 && hit == of,
        "v7 flagged in {hit} of {of} shifted windows:\n{v7:#?}"
    );
    let v8 = per_window("v8");
    let (false_alarms, windows) = flagged(&v8, pinned_until);
    assert!(windows >= 15 && false_alarms == 0, "v8 flagged:\n{v8:#?}");
    let others = scalar(
        &root,
        "SELECT count(*) FROM drift WHERE stream LIKE 'backfill-%' AND app <> 'code-assistant' AND reference NOT LIKE 'trailing %'",
    );
    assert_eq!(
        others, 0,
        "only the pinned series are judged against the pin"
    );

    // Unpinned, a rerun judges v7 against its trailing reference again.
    let unpinned = baseline(&["unpin", "--where", "app=code-assistant"]);
    assert!(unpinned.starts_with("unpinned 2 series"), "{unpinned}");
    assert!(baseline(&["show"]).starts_with("no drift baseline is pinned"));
    run_files(&pipeline, &all);
    let trailing = per_window("v7");
    assert!(
        trailing.iter().all(|r| r.contains(" trailing ")),
        "{trailing:#?}"
    );
    let (trailing_hit, _) = flagged(&trailing, settled);
    // The trailing reference (1 h here) takes the shift in and stops flagging it (measured:
    // 3 of 14 windows).
    assert!(
        trailing_hit < of / 2,
        "trailing flagged {trailing_hit} of {of}:\n{trailing:#?}"
    );

    // A version pin: all of v8's traffic is the baseline of every code-assistant version.
    let pinned = baseline(&[
        "pin",
        "--prompt-version",
        "v8",
        "--where",
        "app=code-assistant",
        "--quiet",
    ]);
    assert!(
        pinned.contains("pinned 1 series") && pinned.contains("prompt_version=*"),
        "{pinned}"
    );
    assert!(baseline(&["show"]).contains("prompt_version v8 · 36 windows"));
    run_files(&pipeline, &all);
    let v7 = per_window("v7");
    assert!(
        v7.iter()
            .all(|r| r.contains(" pinned prompt_version v8: 36 windows")),
        "{v7:#?}"
    );
    let (hit, of) = flagged(&v7, settled);
    assert!(
        of >= 10 && hit == of,
        "v7 flagged in {hit} of {of}:\n{v7:#?}"
    );
}
