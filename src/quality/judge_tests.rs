//! The judge client against a local OpenAI-compatible server (an axum app answering the real
//! chat-completions shapes, including 429s with Retry-After, 5xx, slow and malformed
//! responses), and the custom scorers against a real process and a real HTTP endpoint.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::custom::{self, CommandScorer, CustomError};
use super::judge::*;
use super::scorer::Case;

/// What the fake server does for the n-th request (0-based); afterwards it answers normally.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Step {
    Ok,
    TooMany,
    ServerError,
    Slow,
    Garbled,
    BadRequest,
    Prose,
    Fenced,
    Fallback,
}

struct Server {
    script: Vec<Step>,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    delay: Duration,
    auth: std::sync::Mutex<Vec<String>>,
}

async fn completions(State(s): State<Arc<Server>>, headers: HeaderMap, body: String) -> Response {
    let n = s.hits.fetch_add(1, Ordering::SeqCst);
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    if let Some(a) = headers.get("authorization") {
        s.auth.lock().unwrap().push(a.to_str().unwrap().to_owned());
    }
    tokio::time::sleep(s.delay).await;
    let step = s.script.get(n).copied().unwrap_or(Step::Ok);
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let user = req["messages"][1]["content"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    // The verdict the "model" gives: answers that say "wrong" fail.
    let bad = user.contains("wrong");
    let verdict = json!({"score": if bad { 0.1 } else { 0.9 }, "label": if bad { "fail" } else { "pass" }, "explanation": "checked"});
    let content = match step {
        Step::Prose => format!("Sure! Here is my grading: {verdict} Hope this helps."),
        Step::Fenced => format!("```json\n{verdict}\n```"),
        Step::Fallback => "Score: 4/5 — mostly right.".to_owned(),
        _ => verdict.to_string(),
    };
    let ok = json!({
        "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": req["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
    });
    let resp = match step {
        Step::TooMany => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
        )
            .into_response(),
        Step::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response(),
        Step::Slow => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            (StatusCode::OK, ok.to_string()).into_response()
        }
        Step::Garbled => (StatusCode::OK, "{\"choices\": [{\"message\": ").into_response(),
        Step::BadRequest => (
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "Unknown model", "type": "invalid_request_error"}}).to_string(),
        )
            .into_response(),
        _ => (StatusCode::OK, [("content-type", "application/json")], ok.to_string()).into_response(),
    };
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

/// Starts the server on a runtime thread; returns its state and base URL.
fn serve(script: Vec<Step>, delay: Duration) -> (Arc<Server>, String, tokio::runtime::Runtime) {
    let state = Arc::new(Server {
        script,
        hits: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        delay,
        auth: Default::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .route(
            "/score",
            axum::routing::post(|body: String| async move {
                let v: Value = serde_json::from_str(&body).unwrap();
                let long = v["output"].as_str().unwrap_or("").len() > 10;
                json!({"score": if long { 1.0 } else { 0.0 }, "explanation": "length"}).to_string()
            }),
        )
        .with_state(state.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    (state, url, rt)
}

fn config(url: &str) -> JudgeConfig {
    JudgeConfig {
        base_url: url.to_owned(),
        model: "judge-model".into(),
        api_key_env: None,
        timeout: Duration::from_millis(1500),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..JudgeConfig::default()
    }
}

fn rubric(kind: RubricKind) -> Rubric {
    Rubric {
        kind,
        criteria: None,
        version: "1".into(),
    }
}

fn case<'a>(input: &'a str, output: &'a str) -> Case<'a> {
    Case {
        input: Some(input),
        output: Some(output),
        ..Case::default()
    }
}

#[test]
fn judge_retries_transient_failures_and_parses_every_shape() {
    use Step::*;
    let script = vec![
        TooMany,
        ServerError,
        Slow,
        Garbled,
        Ok,
        Prose,
        Fenced,
        Fallback,
    ];
    let (server, url, rt) = serve(script, Duration::ZERO);
    let client = JudgeClient::new(config(&url), None).unwrap();
    let r = rubric(RubricKind::Correctness);
    rt.block_on(async {
        // Four failures in a row (429 with Retry-After, 500, a timeout, a garbled body), then
        // an answer: five attempts, four retries.
        let started = std::time::Instant::now();
        let (v, cached) = client.judge(&r, &case("2+2?", "4")).await.unwrap();
        assert!(!cached);
        assert!(v.passed && (v.score - 0.9).abs() < 1e-9, "{v:?}");
        assert_eq!((v.input_tokens, v.output_tokens), (120, 30));
        assert_eq!(client.counters.retries.load(Ordering::Relaxed), 4);
        // Retry-After: 1 was honoured, the slow answer was cut at the timeout.
        assert!(
            started.elapsed() >= Duration::from_millis(2400),
            "{:?}",
            started.elapsed()
        );
        // Answer shapes: JSON in prose, fenced JSON, "Score: 4/5", plain JSON.
        let (v, _) = client
            .judge(&r, &case("q1", "that is wrong"))
            .await
            .unwrap();
        assert!(!v.passed && !v.fallback, "{v:?}");
        let (v, _) = client.judge(&r, &case("q2", "fine")).await.unwrap();
        assert!(v.passed && !v.fallback, "{v:?}");
        let (v, _) = client.judge(&r, &case("q3", "fine")).await.unwrap();
        assert!(v.fallback && (v.score - 0.8).abs() < 1e-9, "{v:?}");
        let (v, _) = client.judge(&r, &case("q4", "wrong again")).await.unwrap();
        assert!(
            !v.passed && !v.fallback && v.explanation.as_deref() == Some("checked"),
            "{v:?}"
        );
    });
    assert_eq!(server.hits.load(Ordering::SeqCst), 9);
}

#[test]
fn judge_gives_up_on_client_errors_and_after_max_attempts() {
    let (server, url, rt) = serve(vec![Step::BadRequest], Duration::ZERO);
    let client = JudgeClient::new(config(&url), None).unwrap();
    let r = rubric(RubricKind::Relevance);
    rt.block_on(async {
        match client.judge(&r, &case("q", "a")).await {
            Err(JudgeError::Rejected { status: 400, body }) => {
                assert!(body.contains("Unknown model"))
            }
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        1,
        "a 400 is not retried"
    );

    let (server, url, rt) = serve(vec![Step::ServerError; 10], Duration::ZERO);
    let client = JudgeClient::new(
        JudgeConfig {
            max_attempts: 3,
            ..config(&url)
        },
        None,
    )
    .unwrap();
    rt.block_on(async {
        match client.judge(&r, &case("q", "a")).await {
            Err(JudgeError::GaveUp { attempts: 3, last }) => assert!(last.contains("500")),
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
}

#[test]
fn judge_cache_pays_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("judge-cache.jsonl");
    let (server, url, rt) = serve(vec![], Duration::ZERO);
    let r = rubric(RubricKind::Faithfulness);
    let c = Case {
        context: Some("The office opens at 9."),
        ..case("When does it open?", "At 9.")
    };
    {
        let client =
            JudgeClient::new(config(&url), Some(JudgeCache::open(&path).unwrap())).unwrap();
        rt.block_on(async {
            let (_, cached) = client.judge(&r, &c).await.unwrap();
            assert!(!cached);
            let (_, cached) = client.judge(&r, &c).await.unwrap();
            assert!(cached);
        });
    }
    // A torn line (a crash mid-append) does not stop the cache from loading.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"key\": \"abc\", \"verd")
        .unwrap();
    let client = JudgeClient::new(config(&url), Some(JudgeCache::open(&path).unwrap())).unwrap();
    rt.block_on(async {
        let (v, cached) = client.judge(&r, &c).await.unwrap();
        assert!(cached && v.passed);
        // Another model, rubric version or context is another case.
        let other = Rubric {
            version: "2".into(),
            ..r.clone()
        };
        assert!(!client.judge(&other, &c).await.unwrap().1);
        let c2 = Case {
            context: Some("The office opens at 10."),
            ..c
        };
        assert!(!client.judge(&r, &c2).await.unwrap().1);
    });
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
}

#[test]
fn judge_respects_its_concurrency_limit_and_sends_the_key() {
    let (server, url, rt) = serve(vec![], Duration::from_millis(100));
    // SAFETY: the variable is unique to this test.
    unsafe { std::env::set_var("TELLTALE_TEST_JUDGE_KEY", "sk-test-123") };
    let client = Arc::new(
        JudgeClient::new(
            JudgeConfig {
                concurrency: 2,
                api_key_env: Some("TELLTALE_TEST_JUDGE_KEY".into()),
                ..config(&url)
            },
            None,
        )
        .unwrap(),
    );
    let r = rubric(RubricKind::Safety);
    rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (client, r) = (client.clone(), r.clone());
                tokio::spawn(async move {
                    let input = format!("question {i}");
                    client.judge(&r, &case(&input, "fine")).await.unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(server.hits.load(Ordering::SeqCst), 8);
    assert_eq!(server.max_in_flight.load(Ordering::SeqCst), 2);
    assert!(
        server
            .auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a == "Bearer sk-test-123")
    );
    // A missing key variable is a clear error, not a request without credentials.
    let err = JudgeClient::new(
        JudgeConfig {
            api_key_env: Some("TELLTALE_TEST_NO_SUCH_KEY".into()),
            ..config(&url)
        },
        None,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("TELLTALE_TEST_NO_SUCH_KEY"));
}

#[test]
fn verdict_parser_handles_scales_and_refuses_nonsense() {
    assert_eq!(parse_verdict(r#"{"score": 0.25}"#).unwrap().0, 0.25);
    // A 1–5 scale mapped to 0–1; a string number accepted.
    assert_eq!(
        parse_verdict(r#"{"score": "5", "label": "pass"}"#)
            .unwrap()
            .0,
        1.0
    );
    assert_eq!(parse_verdict("score = 7/10").unwrap().0, 0.7);
    assert_eq!(parse_verdict("Verdict: PASS").unwrap().0, 1.0);
    assert!(parse_verdict("I cannot decide.").is_none());
    assert!(parse_verdict(r#"{"score": -3}"#).is_none());
}

#[test]
fn rubrics_put_the_case_in_the_prompt() {
    let c = Case {
        expected: Some("Paris"),
        context: Some("France's capital is Paris."),
        ..case("Capital of France?", "Lyon")
    };
    let text = |k| {
        rubric(k)
            .messages(&c)
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(text(RubricKind::Correctness).contains("Reference answer:\nParis"));
    assert!(text(RubricKind::Faithfulness).contains("Context:\nFrance's capital is Paris."));
    for k in RubricKind::ALL {
        let t = text(k);
        assert!(
            t.contains("Capital of France?") && t.contains("Lyon") && t.contains("\"score\""),
            "{k:?}"
        );
    }
    let r = rubric(RubricKind::Correctness);
    assert_ne!(r.cache_key("m1", &c), r.cache_key("m2", &c));
    assert_eq!(r.cache_key("m1", &c), r.cache_key("m1", &c));
}

fn scorer_script() -> Vec<String> {
    vec![
        "python3".into(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/scorer.py").into(),
    ]
}

#[test]
fn command_scorer_reuses_its_process_and_survives_timeouts_and_exits() {
    let s = CommandScorer::new(scorer_script(), Duration::from_millis(1500));
    let req = |out: &str| custom::request("relevance", "e1", &case("how do refunds work", out));
    let a = s.score(&req("refunds take five days")).unwrap();
    assert_eq!(a.value, 0.5);
    assert!(a.passed);
    let pid = s.pid().unwrap();
    let b = s.score(&req("nothing")).unwrap();
    assert!(!b.passed);
    assert_eq!(s.pid(), Some(pid), "one process for many requests");
    // Too slow: killed, and a new process answers the next request.
    match s.score(&req("#sleep 5")) {
        Err(CustomError::Timeout(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(s.score(&req("refunds work")).unwrap().value, 1.0);
    assert_ne!(s.pid(), Some(pid));
    // The process exits: an error for that request, a fresh process afterwards.
    assert!(matches!(s.score(&req("#exit")), Err(CustomError::Exited)));
    assert!(s.score(&req("refunds")).is_ok());
    // A command that does not exist says so.
    let missing = CommandScorer::new(vec!["/nonexistent/scorer".into()], Duration::from_secs(1));
    assert!(matches!(
        missing.score(&req("x")),
        Err(CustomError::Spawn { .. })
    ));
}

#[test]
fn http_scorer_posts_the_protocol() {
    let (_server, url, rt) = serve(vec![], Duration::ZERO);
    let score_url = url.replace("/v1", "/score");
    let client = reqwest::Client::new();
    rt.block_on(async {
        let long = custom::score_http(
            &client,
            &score_url,
            &custom::request("len", "e", &case("q", "a long answer")),
        )
        .await
        .unwrap();
        assert!(long.passed && long.explanation.as_deref() == Some("length"));
        let short = custom::score_http(
            &client,
            &score_url,
            &custom::request("len", "e", &case("q", "short")),
        )
        .await
        .unwrap();
        assert!(!short.passed);
        let missing = custom::score_http(
            &client,
            &url.replace("/v1", "/nope"),
            &custom::request("len", "e", &case("q", "a")),
        )
        .await;
        assert!(matches!(missing, Err(CustomError::Http(m)) if m.contains("404")));
    });
    assert!(custom::parse_answer(r#"{"score": 2}"#).is_err());
    assert!(custom::parse_answer("not json").is_err());
    assert!(
        !custom::parse_answer(r#"{"score": 0.9, "passed": false}"#)
            .unwrap()
            .passed
    );
}
