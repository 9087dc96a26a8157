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
    // 90 minutes of traffic, the topic shift of the demo included; the first 50 minutes first.
    let all: Vec<_> = TrafficGenerator::new(5, T_START, 90 * 60_000, 9_000)
        .malformed_every(None)
        .take(9_000)
        .collect();
    broker.produce("drift", &all[..5_000]);
    let mut child = spawn_run(&pipeline, &log);
    broker.wait_caught_up("drift", "drift", partitions, Duration::from_secs(120));
    let state = root.join("_state/drift/drift.json");
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
    let (drift_closed, metrics_closed) = (
        closed(&state),
        closed(&root.join("_state/metrics/drift.json")),
    );
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
    crate::quality::wait_deferred(&root, "drift", 9_000);
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
    let metrics_through = closed(&root.join("_state/metrics/drift.json"));
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
