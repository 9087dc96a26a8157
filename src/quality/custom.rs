//! Custom scorers: an external command or an HTTP endpoint speaking one small JSON protocol.
//!
//! Request (one JSON object): `{"scorer": …, "event_id": …, "input": …, "output": …,
//! "expected": …, "context": …}` (absent texts are `null`).
//! Answer (one JSON object): `{"score": <0..1>, "passed": <bool, optional>, "label": <optional>,
//! "explanation": <optional>}`; without `passed`, a score of 0.5 or more passes.
//!
//! A command is started once and kept: each request is one line on its stdin, each answer one
//! line on its stdout (JSON Lines), so a scorer that loads a model pays for it once. A request
//! that takes longer than the timeout, or a process that exits, gets the process killed and
//! started again for the next request. An HTTP scorer gets the request as a POST body.
//! `examples/scorer.py` is a complete command scorer.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use super::scorer::{Case, Score};

#[derive(Debug, thiserror::Error)]
pub enum CustomError {
    #[error("cannot start {command:?}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("no answer within {0:?} (the process was restarted)")]
    Timeout(Duration),
    #[error("the scorer process exited (it is restarted for the next request)")]
    Exited,
    #[error("HTTP: {0}")]
    Http(String),
    #[error("unreadable answer {0:?}: expected {{\"score\": 0..1, …}}")]
    Answer(String),
}

/// The request for one case.
pub fn request(scorer: &str, event_id: &str, case: &Case<'_>) -> Value {
    json!({
        "scorer": scorer,
        "event_id": event_id,
        "input": case.input,
        "output": case.output,
        "expected": case.expected,
        "context": case.context,
    })
}

/// Reads an answer.
pub fn parse_answer(text: &str) -> Result<Score, CustomError> {
    let bad = || CustomError::Answer(text.chars().take(200).collect());
    let v: Value = serde_json::from_str(text.trim()).map_err(|_| bad())?;
    let score = v
        .get("score")
        .and_then(Value::as_f64)
        .filter(|s| (0.0..=1.0).contains(s))
        .ok_or_else(bad)?;
    let passed = v
        .get("passed")
        .and_then(Value::as_bool)
        .unwrap_or(score >= 0.5);
    Ok(Score {
        value: score,
        passed,
        explanation: v
            .get("explanation")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// A long-lived scorer process.
pub struct CommandScorer {
    argv: Vec<String>,
    timeout: Duration,
    running: Mutex<Option<Running>>,
}

impl CommandScorer {
    pub fn new(argv: Vec<String>, timeout: Duration) -> CommandScorer {
        CommandScorer {
            argv,
            timeout,
            running: Mutex::new(None),
        }
    }

    fn start(&self) -> Result<Running, CustomError> {
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| CustomError::Spawn {
                command: self.argv.join(" "),
                source,
            })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("scorer-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| CustomError::Spawn {
                command: self.argv.join(" "),
                source,
            })?;
        Ok(Running {
            child,
            stdin,
            lines,
        })
    }

    /// Scores one case (blocking: call it from a blocking thread).
    pub fn score(&self, request: &Value) -> Result<Score, CustomError> {
        let mut guard = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.start()?);
        }
        let r = guard.as_mut().expect("started above");
        // Drop answers a previous, timed-out request left behind.
        while r.lines.try_recv().is_ok() {}
        let sent = writeln!(r.stdin, "{request}").and_then(|_| r.stdin.flush());
        let answer = match sent {
            Err(_) => Err(CustomError::Exited),
            Ok(()) => match r.lines.recv_timeout(self.timeout) {
                Ok(line) => return parse_answer(&line),
                Err(mpsc::RecvTimeoutError::Timeout) => Err(CustomError::Timeout(self.timeout)),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(CustomError::Exited),
            },
        };
        if let Some(mut dead) = guard.take() {
            let _ = dead.child.kill();
            let _ = dead.child.wait();
        }
        answer
    }

    /// The running process's id (for tests).
    pub fn pid(&self) -> Option<u32> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| r.child.id())
    }
}

impl Drop for CommandScorer {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.get_mut().ok().and_then(Option::take) {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// Posts the request to `url`; the answer is the response body.
pub async fn score_http(
    client: &reqwest::Client,
    url: &str,
    request: &Value,
) -> Result<Score, CustomError> {
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(request.to_string())
        .send()
        .await
        .map_err(|e| CustomError::Http(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|e| CustomError::Http(e.to_string()))?;
    if !status.is_success() {
        return Err(CustomError::Http(format!(
            "{status}: {}",
            body.chars().take(200).collect::<String>()
        )));
    }
    parse_answer(&body)
}
