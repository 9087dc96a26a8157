//! Notifiers against real servers: an SMTP server (mailin-embedded) and an HTTP receiver
//! (axum), both on 127.0.0.1 in this process; the alert stage's restart behaviour; the
//! `silence` and `gate` commands.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use telltale::alert::dispatch::{Notification, Notified, Route, Status};
use telltale::alert::notify::{DeliveryConfig, EmailTransport, Notifier, ReceiverConfig, SmtpTls};
use telltale::alert::{AlertStage, AlertingConfig, Clock, Frame, RuleContext, RulesFrom};

use crate::support::{free_port, succeed, telltale};

/// What the HTTP receiver saw: (path, headers, body).
type Seen = Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>;

/// An HTTP receiver on 127.0.0.1 that records every POST and answers with `status(n)` for
/// the n-th request (0-based).
struct HttpReceiver {
    port: u16,
    seen: Seen,
    _rt: tokio::runtime::Runtime,
}

impl HttpReceiver {
    fn start(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> HttpReceiver {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Seen = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(status);
        let (s2, c2) = (seen.clone(), count.clone());
        let app = axum::Router::new().fallback(axum::routing::post(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let (seen, count, status) = (s2.clone(), c2.clone(), status.clone());
                async move {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    seen.lock()
                        .unwrap()
                        .push((uri.path().to_owned(), headers, body));
                    StatusCode::from_u16(status(n)).unwrap()
                }
            },
        ));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(async move { axum::serve(listener, app).await });
        HttpReceiver {
            port,
            seen,
            _rt: rt,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn bodies(&self, path: &str) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, _, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }
}

fn notified(status: Status) -> Notified {
    let labels: BTreeMap<String, String> = [
        ("alertname", "LatencyRegression"),
        ("app", "support-bot"),
        ("environment", "prod"),
        ("prompt_version", "v4"),
        ("severity", "critical"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let annotations: BTreeMap<String, String> = [
        (
            "summary",
            "support-bot v4: median latency 2400 ms against 800 ms over the last hour",
        ),
        (
            "rollback",
            "roll back support-bot/prod to prompt_version v3 (the last known-good version)",
        ),
        ("rollback_to", "v3"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Notified {
        fingerprint: 0x1234_5678_9abc_def0,
        rule: "LatencyRegression".into(),
        severity: "critical".into(),
        labels,
        annotations,
        status,
        starts_at: 1_764_000_000_000,
        ends_at: (status == Status::Resolved).then_some(1_764_000_600_000),
        value: 2400.0,
        baseline: Some(800.0),
        threshold: 1.5,
    }
}

fn notification(receiver: &str, status: Status) -> Notification {
    Notification {
        id: 1,
        receiver: receiver.into(),
        group_key: "{}/default:{alertname=\"LatencyRegression\"}".into(),
        group_labels: [("alertname".to_owned(), "LatencyRegression".to_owned())].into(),
        status,
        alerts: vec![notified(status)],
        at: 0,
    }
}

fn quick() -> DeliveryConfig {
    DeliveryConfig {
        deadline: Duration::from_secs(3),
        timeout: Duration::from_secs(2),
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        external_url: "http://grafana.example/d/llm".into(),
    }
}

fn deliver(notifier: &Notifier, n: &Notification) -> (bool, Vec<telltale::alert::notify::Attempt>) {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a2 = attempts.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(notifier.deliver(n, &move |a| a2.lock().unwrap().push(a)));
    let attempts = attempts.lock().unwrap().clone();
    (ok, attempts)
}

/// (envelope sender, envelope recipients, the message as received).
type Received = (String, Vec<String>, String);

#[derive(Clone, Default)]
struct Mailbox {
    messages: Arc<Mutex<Vec<Received>>>,
    current: Vec<u8>,
    from: String,
    to: Vec<String>,
}

impl mailin_embedded::Handler for Mailbox {
    fn data_start(
        &mut self,
        _domain: &str,
        from: &str,
        _is8bit: bool,
        to: &[String],
    ) -> mailin_embedded::Response {
        self.from = from.to_owned();
        self.to = to.to_vec();
        self.current.clear();
        mailin_embedded::response::OK
    }
    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.extend_from_slice(buf);
        Ok(())
    }
    fn auth_plain(
        &mut self,
        _authorization_id: &str,
        authentication_id: &str,
        password: &str,
    ) -> mailin_embedded::Response {
        if (authentication_id, password) == ("telltale", "s3cret") {
            mailin_embedded::response::AUTH_OK
        } else {
            mailin_embedded::response::INVALID_CREDENTIALS
        }
    }
    fn data_end(&mut self) -> mailin_embedded::Response {
        let body = String::from_utf8_lossy(&self.current).into_owned();
        self.messages
            .lock()
            .unwrap()
            .push((self.from.clone(), self.to.clone(), body));
        mailin_embedded::response::OK
    }
}

/// A real SMTP server on 127.0.0.1, offering STARTTLS with a fresh self-signed certificate
/// when `tls_dir` is given.
fn smtp_server_with(tls_dir: Option<&std::path::Path>) -> (u16, Mailbox) {
    let mailbox = Mailbox::default();
    let port = free_port();
    let mut server = mailin_embedded::Server::new(mailbox.clone());
    server
        .with_name("smtp.test")
        .with_addr(("127.0.0.1", port))
        .unwrap();
    if let Some(dir) = tls_dir {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        server
            .with_ssl(mailin_embedded::SslConfig::SelfSigned {
                cert_path: c.display().to_string(),
                key_path: k.display().to_string(),
            })
            .unwrap()
            .with_auth(mailin_embedded::AuthMechanism::Plain);
    }
    std::thread::spawn(move || {
        let _ = server.serve();
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (port, mailbox)
}

fn smtp_server() -> (u16, Mailbox) {
    smtp_server_with(None)
}

fn email_receiver(port: u16, tls: SmtpTls) -> BTreeMap<String, ReceiverConfig> {
    email_receiver_with(port, tls, false, None)
}

fn email_receiver_with(
    port: u16,
    tls: SmtpTls,
    accept_invalid_certs: bool,
    credentials: Option<(&str, &str)>,
) -> BTreeMap<String, ReceiverConfig> {
    [(
        "oncall".to_owned(),
        ReceiverConfig::Email {
            transport: EmailTransport::Smtp {
                host: "127.0.0.1".into(),
                port,
                tls,
                username: credentials.map(|c| c.0.to_owned()),
                password: credentials.map(|c| c.1.to_owned()),
                accept_invalid_certs,
            },
            from: "telltale@example.com".into(),
            to: vec!["oncall@example.com".into(), "sre@example.com".into()],
        },
    )]
    .into()
}

/// The message is decoded quoted-printable before asserting on it.
fn unfold(body: &str) -> String {
    body.replace("=\r\n", "")
        .replace("=3D", "=")
        .replace("=E2=86=92", "→")
}

#[test]
fn email_reaches_a_real_smtp_server_with_text_and_html_bodies() {
    let (port, mailbox) = smtp_server();
    let notifier = Notifier::new(&email_receiver(port, SmtpTls::None), quick()).unwrap();
    let (ok, attempts) = deliver(&notifier, &notification("oncall", Status::Firing));
    assert!(ok, "{attempts:?}");
    assert_eq!(attempts.len(), 1);
    let messages = mailbox.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 1);
    let (from, to, raw) = &messages[0];
    assert_eq!(from, "telltale@example.com");
    assert_eq!(
        to,
        &vec![
            "oncall@example.com".to_owned(),
            "sre@example.com".to_owned()
        ]
    );
    let body = unfold(raw);
    assert!(
        body.contains("Subject: [FIRING:1] LatencyRegression"),
        "{body}"
    );
    assert!(body.contains("From: telltale@example.com"), "{body}");
    assert!(
        body.contains("To: oncall@example.com, sre@example.com"),
        "{body}"
    );
    assert!(body.contains("multipart/alternative"), "{body}");
    assert!(body.contains("Content-Type: text/plain"), "{body}");
    assert!(body.contains("Content-Type: text/html"), "{body}");
    assert!(
        body.contains("FIRING LatencyRegression [critical]"),
        "{body}"
    );
    assert!(
        body.contains("roll back support-bot/prod to prompt_version v3"),
        "{body}"
    );
    assert!(
        body.contains("<h3 style=\"color:#b00020\">FIRING LatencyRegression"),
        "{body}"
    );
}

#[test]
fn email_goes_over_starttls_with_credentials_and_is_refused_with_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mailbox) = smtp_server_with(Some(dir.path()));
    // The relay's certificate is self-signed: refused unless the receiver says otherwise.
    let strict = Notifier::new(&email_receiver(port, SmtpTls::StartTls), quick()).unwrap();
    let (ok, attempts) = deliver(&strict, &notification("oncall", Status::Firing));
    assert!(!ok);
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap_or("")
            .to_lowercase()
            .contains("certificate"),
        "{attempts:?}"
    );
    assert!(mailbox.messages.lock().unwrap().is_empty());
    // Wrong credentials: a permanent SMTP error, not retried.
    let wrong = email_receiver_with(port, SmtpTls::StartTls, true, Some(("telltale", "guess")));
    let (ok, attempts) = deliver(
        &Notifier::new(&wrong, quick()).unwrap(),
        &notification("oncall", Status::Firing),
    );
    assert!(!ok);
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(
        attempts[0].error.as_deref().unwrap_or("").contains("535"),
        "{attempts:?}"
    );
    // Trusted on purpose, with the right credentials (sent only inside TLS).
    let lenient = email_receiver_with(port, SmtpTls::StartTls, true, Some(("telltale", "s3cret")));
    let lenient = Notifier::new(&lenient, quick()).unwrap();
    let (ok, attempts) = deliver(&lenient, &notification("oncall", Status::Resolved));
    assert!(ok, "{attempts:?}");
    let messages = mailbox.messages.lock().unwrap().clone();
    assert_eq!(messages.len(), 1);
    assert!(unfold(&messages[0].2).contains("Subject: [RESOLVED] LatencyRegression"));
}

#[test]
fn email_is_not_sent_in_clear_when_starttls_is_required() {
    let (port, mailbox) = smtp_server();
    let notifier = Notifier::new(&email_receiver(port, SmtpTls::StartTls), quick()).unwrap();
    let (ok, attempts) = deliver(&notifier, &notification("oncall", Status::Firing));
    assert!(!ok);
    assert!(attempts.last().unwrap().last);
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap_or("")
            .to_lowercase()
            .contains("tls"),
        "{attempts:?}"
    );
    assert!(mailbox.messages.lock().unwrap().is_empty());
}

#[test]
fn webhooks_carry_slack_pagerduty_alertmanager_and_signed_generic_payloads() {
    let http = HttpReceiver::start(|_| 200);
    let receivers: BTreeMap<String, ReceiverConfig> = [
        (
            "hook".to_owned(),
            ReceiverConfig::Webhook {
                url: http.url("/generic"),
                secret: Some("s3cret".into()),
            },
        ),
        (
            "slack".to_owned(),
            ReceiverConfig::Slack {
                url: http.url("/slack"),
            },
        ),
        (
            "pd".to_owned(),
            ReceiverConfig::PagerDuty {
                url: http.url("/pd"),
                routing_key: "R0UT1NG".into(),
            },
        ),
        (
            "am".to_owned(),
            ReceiverConfig::Alertmanager {
                url: http.url("/am"),
            },
        ),
    ]
    .into();
    let notifier = Notifier::new(&receivers, quick()).unwrap();
    for r in ["hook", "slack", "pd", "am"] {
        assert!(
            deliver(&notifier, &notification(r, Status::Firing)).0,
            "{r}"
        );
    }
    assert!(deliver(&notifier, &notification("pd", Status::Resolved)).0);

    // Generic: telltale's body, signed over "<timestamp>.<body>".
    let (_, headers, body) = http
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _, _)| p == "/generic")
        .cloned()
        .unwrap();
    let ts = headers["x-telltale-timestamp"].to_str().unwrap();
    let sig = headers["x-telltale-signature"].to_str().unwrap();
    let hex = sig.strip_prefix("sha256=").expect("sha256= prefix");
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&body);
    mac.verify_slice(&bytes).expect("the signature verifies");
    let g: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(g["version"], "telltale.alert.v1");
    assert_eq!(g["alerts"][0]["rollback_to"], "v3");
    assert_eq!(g["alerts"][0]["baseline"], 800.0);

    // Slack: Block Kit with a header and the summary.
    let s = &http.bodies("/slack")[0];
    assert_eq!(s["blocks"][0]["type"], "header");
    assert!(
        s["blocks"][1]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("median latency 2400 ms")
    );
    assert!(
        s["blocks"][1]["text"]["text"]
            .as_str()
            .unwrap()
            .contains(":rewind: roll back")
    );
    assert!(s["text"].as_str().unwrap().starts_with("[FIRING:1]"));

    // PagerDuty Events v2: trigger then resolve under one dedup_key.
    let pd = http.bodies("/pd");
    assert_eq!(pd.len(), 2);
    assert_eq!(pd[0]["routing_key"], "R0UT1NG");
    assert_eq!(pd[0]["event_action"], "trigger");
    assert_eq!(pd[0]["payload"]["severity"], "critical");
    assert_eq!(pd[0]["payload"]["source"], "support-bot");
    assert_eq!(pd[1]["event_action"], "resolve");
    assert_eq!(pd[0]["dedup_key"], pd[1]["dedup_key"]);

    // Alertmanager webhook payload, version 4.
    let am = &http.bodies("/am")[0];
    assert_eq!(am["version"], "4");
    assert_eq!(am["status"], "firing");
    assert_eq!(am["receiver"], "am");
    assert_eq!(am["groupLabels"]["alertname"], "LatencyRegression");
    assert_eq!(am["commonLabels"]["app"], "support-bot");
    assert_eq!(am["externalURL"], "http://grafana.example/d/llm");
    let a = &am["alerts"][0];
    assert_eq!(a["status"], "firing");
    assert_eq!(a["startsAt"], "2025-11-24T16:00:00.000Z");
    assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(a["fingerprint"], "123456789abcdef0");
    assert_eq!(a["annotations"]["rollback_to"], "v3");
}

#[test]
fn a_failing_receiver_is_retried_until_it_answers_and_a_4xx_is_not_retried() {
    // 503 three times, then 200: delivered once, four attempts recorded.
    let flaky = HttpReceiver::start(|n| if n < 3 { 503 } else { 200 });
    let receivers = [(
        "hook".to_owned(),
        ReceiverConfig::Webhook {
            url: flaky.url("/h"),
            secret: None,
        },
    )]
    .into();
    let notifier = Notifier::new(&receivers, quick()).unwrap();
    let (ok, attempts) = deliver(&notifier, &notification("hook", Status::Firing));
    assert!(ok);
    let results: Vec<(u32, bool, bool)> =
        attempts.iter().map(|a| (a.attempt, a.ok, a.last)).collect();
    assert_eq!(
        results,
        vec![
            (1, false, false),
            (2, false, false),
            (3, false, false),
            (4, true, true)
        ]
    );
    assert!(attempts[0].error.as_deref().unwrap().contains("503"));
    assert_eq!(flaky.seen.lock().unwrap().len(), 4);

    // A 400 means the payload or the URL is wrong: one attempt, then give up.
    let broken = HttpReceiver::start(|_| 400);
    let receivers = [(
        "hook".to_owned(),
        ReceiverConfig::Webhook {
            url: broken.url("/h"),
            secret: None,
        },
    )]
    .into();
    let notifier = Notifier::new(&receivers, quick()).unwrap();
    let (ok, attempts) = deliver(&notifier, &notification("hook", Status::Firing));
    assert!(!ok);
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].last);

    // Nothing listening at all: retried until the deadline, then given up.
    let receivers = [(
        "hook".to_owned(),
        ReceiverConfig::Webhook {
            url: format!("http://127.0.0.1:{}/h", free_port()),
            secret: None,
        },
    )]
    .into();
    let notifier = Notifier::new(&receivers, quick()).unwrap();
    let (ok, attempts) = deliver(&notifier, &notification("hook", Status::Firing));
    assert!(!ok);
    assert!(attempts.len() > 3, "{attempts:?}");
}

fn stage_config(url: String, clock: Clock) -> AlertingConfig {
    let mut cfg = AlertingConfig {
        enabled: true,
        rules: RulesFrom::Builtin,
        clock,
        ..AlertingConfig::default()
    };
    cfg.receivers
        .insert("hook".into(), ReceiverConfig::Webhook { url, secret: None });
    cfg.default_route = Route {
        receivers: vec!["hook".into()],
        group_wait_ms: 0,
        group_interval_ms: 60_000,
        ..cfg.default_route
    };
    cfg
}

fn rule_ctx() -> RuleContext {
    telltale::alert::rule_context(&telltale::metrics::MetricsConfig::default())
}

/// Minutes since the epoch where the test windows start: around 2025-11-24 by default.
const BASE_MIN: i64 = 29_400_000;

/// A metrics window (1 min) of one series with the given error count out of 100.
fn errors_frame(end_min: i64, errors: i64) -> Frame {
    errors_frame_at(BASE_MIN, end_min, errors)
}

fn errors_frame_at(base_min: i64, end_min: i64, errors: i64) -> Frame {
    let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()));
    let schema = Schema::new(vec![
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
        Field::new("app", DataType::Utf8, true),
        Field::new("environment", DataType::Utf8, true),
        Field::new("model", DataType::Utf8, true),
        Field::new("prompt_version", DataType::Utf8, true),
        Field::new("events", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("error_rate", DataType::Float64, false),
    ]);
    let (start_ms, end_ms) = (
        (base_min + end_min - 1) * 60_000,
        (base_min + end_min) * 60_000,
    );
    let t = |v: i64| {
        Arc::new(arrow::array::TimestampMillisecondArray::from(vec![v]).with_timezone("UTC")) as _
    };
    let s = |v: &str| Arc::new(StringArray::from(vec![v])) as _;
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            t(start_ms),
            t(end_ms),
            s("support-bot"),
            s("prod"),
            s("gpt-4o-mini"),
            s("v4"),
            Arc::new(Int64Array::from(vec![100])),
            Arc::new(Int64Array::from(vec![errors])),
            Arc::new(Float64Array::from(vec![errors as f64 / 100.0])),
        ],
    )
    .unwrap();
    Frame {
        source: "metrics".into(),
        resolution_ms: 60_000,
        start_ms,
        end_ms,
        batch,
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}");
}

/// The stage on its own threads: an error burst fires, the notification is delivered; after a
/// restart the still-firing alert is not sent again; when errors stop it resolves, once.
#[test]
fn alert_stage_survives_a_restart_without_resending() {
    let http = HttpReceiver::start(|_| 200);
    let dir = tempfile::tempdir().unwrap();
    let cfg = stage_config(http.url("/hook"), Clock::Event);
    // 50 % errors also trips ErrorRateHigh (its own group); count the burn rule's messages.
    let sent = |http: &HttpReceiver, status: &str| {
        http.bodies("/hook")
            .iter()
            .filter(|b| {
                b["status"] == status
                    && b["alerts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| a["rule"] == "ErrorBudgetBurnFast")
            })
            .count()
    };
    let fired = |http: &HttpReceiver| sent(http, "firing");

    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    let tx = stage.sender();
    // 60 quiet minutes, then 50 % errors: the fast burn (14.4× of a 1 % budget) fires once
    // the last hour's error share passes 14.4 %, after 18 minutes.
    tx.send((1..=60).map(|m| errors_frame(m, 0)).collect());
    tx.send((61..=80).map(|m| errors_frame(m, 50)).collect());
    wait_for("the firing notification", || fired(&http) == 1);
    stage.stop();
    let state = std::fs::read_to_string(telltale::alert::state_file(dir.path(), "g")).unwrap();
    assert!(state.contains("\"ErrorBudgetBurnFast\""), "{state}");

    // Restart: the alert is still firing and was delivered; nothing is sent again.
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    let tx = stage.sender();
    tx.send((81..=82).map(|m| errors_frame(m, 50)).collect());
    // Windows judged before the restart are not judged again.
    tx.send(vec![errors_frame(70, 50)]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fired(&http), 1, "no re-send after the restart");
    // Errors stop: after the short window clears, one resolved notification.
    tx.send((83..=95).map(|m| errors_frame(m, 0)).collect());
    wait_for("the resolved notification", || sent(&http, "resolved") == 1);
    stage.stop();
    assert_eq!(sent(&http, "resolved"), 1);
    assert_eq!(fired(&http), 1);
    // Every transition and attempt is in the alerts table.
    let rows = crate::support::strings(&crate::support::sql(
        dir.path(),
        "SELECT kind || ':' || status || ':' || coalesce(result, '') FROM alerts ORDER BY time, kind",
    ));
    for want in [
        "transition:firing:",
        "transition:resolved:",
        "notification:firing:ok",
        "notification:resolved:ok",
    ] {
        assert!(rows.iter().any(|r| r == want), "{want} missing in {rows:?}");
    }
}

#[test]
fn silence_commands_add_list_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let out = succeed(telltale().args([
        "silence",
        "add",
        "alertname=\"LatencyRegression\"",
        "app=~\"support-.*\"",
        "--for",
        "2h",
        "--comment",
        "provider incident",
        "--author",
        "ana",
        "--data-dir",
        root,
    ]));
    let said = String::from_utf8(out.stdout).unwrap();
    let id = said.split_whitespace().nth(1).unwrap().to_owned();
    let list =
        String::from_utf8(succeed(telltale().args(["silence", "list", "--data-dir", root])).stdout)
            .unwrap();
    assert!(
        list.contains(&id) && list.contains("active") && list.contains("by ana"),
        "{list}"
    );
    assert!(
        list.contains("alertname=\"LatencyRegression\" app=~\"support-.*\""),
        "{list}"
    );
    succeed(telltale().args(["silence", "expire", &id, "--data-dir", root]));
    let list =
        String::from_utf8(succeed(telltale().args(["silence", "list", "--data-dir", root])).stdout)
            .unwrap();
    assert_eq!(list.trim(), "no silences");
    let all = String::from_utf8(
        succeed(telltale().args(["silence", "list", "--all", "--data-dir", root])).stdout,
    )
    .unwrap();
    assert!(all.contains("expired"), "{all}");
    let bad = telltale()
        .args([
            "silence",
            "add",
            "app",
            "--comment",
            "x",
            "--data-dir",
            root,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8(bad.stderr)
            .unwrap()
            .contains("is not a matcher")
    );
}

/// `telltale gate --app support-bot --env prod --prompt-version <version> --data-dir <root>`.
fn gate_support_bot_prod(root: &std::path::Path, version: &str) -> std::process::Output {
    telltale()
        .args([
            "gate",
            "--app",
            "support-bot",
            "--env",
            "prod",
            "--prompt-version",
            version,
        ])
        .arg("--data-dir")
        .arg(root)
        .output()
        .unwrap()
}

#[test]
fn gate_fails_while_a_critical_alert_fires_for_the_version() {
    let http = HttpReceiver::start(|_| 200);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let mut cfg = stage_config(http.url("/hook"), Clock::Event);
    cfg.known_good_after_ms = 30 * 60_000;
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    let tx = stage.sender();
    tx.send((1..=60).map(|m| errors_frame(m, 0)).collect());
    tx.send((61..=80).map(|m| errors_frame(m, 50)).collect());
    stage.stop();
    let gate = |v: &str| gate_support_bot_prod(std::path::Path::new(root), v);
    let out = gate("v4");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("blocked: 2 critical alert(s) fire for support-bot/prod prompt_version v4"),
        "{text}"
    );
    assert!(
        text.contains("ErrorBudgetBurnFast") && text.contains("ErrorRateHigh"),
        "{text}"
    );
    let ok = gate("v5");
    assert_eq!(ok.status.code(), Some(0));
    assert!(
        String::from_utf8(ok.stdout)
            .unwrap()
            .starts_with("ok: no critical alert fires")
    );
}

/// Windows made durable in `metrics` but never judged (the process died in between) are
/// judged at the next start, with the rules' history rebuilt from the table: the fast burn
/// fires when the last hour's error share passes 14.4 %, not at the first bad window.
#[test]
fn alert_stage_judges_durable_windows_it_missed_with_history_from_the_table() {
    let http = HttpReceiver::start(|_| 200);
    let dir = tempfile::tempdir().unwrap();
    let cfg = stage_config(http.url("/hook"), Clock::Event);
    let base = chrono::Utc::now().timestamp_millis() / 60_000 - 90;
    // Judged before the "crash": 60 quiet minutes.
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    stage
        .sender()
        .send((1..=60).map(|m| errors_frame_at(base, m, 0)).collect());
    stage.stop();
    // The metrics table holds minutes 1..80; 61..80 have 50 % errors and were never judged.
    for m in 1..=80 {
        let f = errors_frame_at(base, m, if m > 60 { 50 } else { 0 });
        let rel = telltale::metrics::window_file("g", "1m", f.start_ms);
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        telltale::sink::write_parquet(
            &path,
            &f.batch,
            telltale::sink::Table::Metrics,
            &telltale::config::SinkConfig::default(),
        )
        .unwrap();
    }
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    wait_for("the caught-up firing notification", || {
        http.bodies("/hook").iter().any(|b| b["status"] == "firing")
    });
    stage.stop();
    let fired_at = crate::support::strings(&crate::support::sql(
        dir.path(),
        "SELECT CAST(CAST(window_end AS BIGINT) AS VARCHAR) FROM alerts
         WHERE kind = 'transition' AND status = 'firing' AND rule = 'ErrorBudgetBurnFast'",
    ));
    // 60 × 14.4 % / 50 % = 17.3 bad minutes: the 18th (minute 78) crosses.
    assert_eq!(fired_at, [((base + 78) * 60_000).to_string()]);
}

/// A drift window of one series, as the drift stage writes it to the `drift` table.
fn drift_file_at(root: &std::path::Path, start_ms: i64, drifted: bool) {
    use telltale::drift::table::{DriftRow, drift_batch, drift_file};
    let window = telltale::drift::DriftConfig::default().window_ms;
    let dims: Vec<String> = ["app", "environment", "model", "prompt_version"]
        .map(String::from)
        .to_vec();
    let key = telltale::window::SeriesKey::new(&[
        Some("code-assistant"),
        Some("prod"),
        Some("gpt-4o"),
        Some("v7"),
    ]);
    let row = DriftRow {
        series: key.clone(),
        field: "input",
        method: "mmd",
        statistic: Some(0.3),
        threshold: Some(0.1),
        p_value: Some(if drifted { 0.0001 } else { 0.4 }),
        drifted,
        status: "judged",
        current_n: 64,
        reference_n: 256,
        reference: "trailing 24h".into(),
        explanation: String::new(),
        embedder: Some("hash-256".into()),
    };
    let batch = drift_batch(
        &dims,
        "g",
        start_ms,
        start_ms + window,
        &[(key, 500)],
        &[row],
    );
    let path = root.join(drift_file("g", start_ms));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    telltale::sink::write_parquet(
        &path,
        &batch,
        telltale::sink::Table::Drift,
        &telltale::config::SinkConfig::default(),
    )
    .unwrap();
}

/// Drift verdicts made durable but never judged by the alert rules (a crash in between) are
/// judged at the next start: InputDrift fires on the first drifted window (the verdict has
/// already waited for the shift to persist).
#[test]
fn alert_stage_catches_up_on_drift_windows_it_missed() {
    let http = HttpReceiver::start(|_| 200);
    let dir = tempfile::tempdir().unwrap();
    let cfg = stage_config(http.url("/hook"), Clock::Event);
    let window = telltale::drift::DriftConfig::default().window_ms;
    let base = (chrono::Utc::now().timestamp_millis() - 3_600_000) / window * window;
    // Judged before the "crash": three quiet windows.
    for k in 0..3 {
        drift_file_at(dir.path(), base + k * window, false);
    }
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    let quiet: Vec<Frame> =
        telltale::alert::metrics_frames(dir.path(), "g", base, base + 3 * window);
    assert_eq!(quiet.len(), 3);
    assert!(
        quiet
            .iter()
            .all(|f| f.source == "drift" && f.resolution_ms == window)
    );
    stage.sender().send(quiet);
    stage.stop();
    assert!(http.bodies("/hook").is_empty());
    // Then three drifted windows reach the table, and the process dies before judging them.
    for k in 3..6 {
        drift_file_at(dir.path(), base + k * window, true);
    }
    let stage = AlertStage::start(&cfg, &rule_ctx(), dir.path(), "g", Default::default()).unwrap();
    wait_for("the caught-up drift alert", || {
        http.bodies("/hook").iter().any(|b| {
            b["status"] == "firing"
                && b["alerts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["rule"] == "InputDrift")
        })
    });
    stage.stop();
    let fired_at = crate::support::strings(&crate::support::sql(
        dir.path(),
        "SELECT CAST(CAST(window_end AS BIGINT) AS VARCHAR) FROM alerts
         WHERE kind = 'transition' AND status = 'firing' AND rule = 'InputDrift'",
    ));
    // Firing at the first drifted window's end, once.
    assert_eq!(fired_at, [(base + 4 * window).to_string()]);
}

/// A file backfill judges the alert rules on its own windows: the demo traffic's latency
/// regression fires and resolves in the alerts table, nothing is notified, the stream's
/// alerts stay out of `telltale gate`, and a rerun adds no transition.
#[test]
fn backfills_judge_the_rules_without_notifying() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let mails = dir.path().join("mails");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"[pipeline]
data_root = "{root}"
[source]
type = "file"
path = "unused"
[telemetry]
listen = "off"
[harvest]
enabled = false
[alerting]
rules = "{rules}"
notify = ["email"]
group_wait = "0s"
[alerting.receivers.email]
type = "email"
dir = "{mails}"
from = "telltale@localhost"
to = ["oncall@localhost"]
"#,
            root = root.display(),
            rules = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts"),
            mails = mails.display(),
        ),
    )
    .unwrap();
    // Two hours of the demo's traffic but its last ≈ 2.5 minutes: the input ends mid drift
    // window.
    let records: Vec<_> =
        telltale::demo::TrafficGenerator::new(7, crate::support::T_START, 7_200_000, 20_000)
            .malformed_every(None)
            .take(19_600)
            .collect();
    let file = dir.path().join("export.jsonl.gz");
    crate::cli::write_jsonl_gz(&file, &records);
    let import = || crate::support::run_files(&pipeline, &file);
    import();
    let latency = || {
        crate::support::strings(&crate::support::sql(
            &root,
            "SELECT rule || ' ' || labels['prompt_version'] || ' ' || status FROM alerts
             WHERE kind = 'transition' AND rule = 'LatencyRegression' AND status IN ('firing', 'resolved')
             ORDER BY window_end",
        ))
    };
    assert_eq!(
        latency(),
        [
            "LatencyRegression v4 firing",
            "LatencyRegression v4 resolved"
        ]
    );
    assert_eq!(
        crate::support::scalar(
            &root,
            "SELECT count(*) FROM alerts WHERE kind = 'notification'"
        ),
        0
    );
    assert!(!mails.exists() || std::fs::read_dir(&mails).unwrap().next().is_none());
    // Still firing at the end of the backfill or not, history does not gate a deployment.
    let transitions = crate::support::scalar(&root, "SELECT count(*) FROM alerts");
    let gate = gate_support_bot_prod(&root, "v4");
    assert_eq!(
        gate.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&gate.stdout)
    );
    // Drift rode along in event time: the demo's topic shift on code-assistant v7 fired
    // InputDrift, and every drift window of every series with traffic was judged, the last
    // (partial) one included.
    let drift_fired = crate::support::strings(&crate::support::sql(
        &root,
        "SELECT DISTINCT rule || ' ' || labels['app'] || ' ' || labels['prompt_version'] FROM alerts
         WHERE kind = 'transition' AND status = 'firing' AND rule LIKE '%Drift' ORDER BY 1",
    ));
    assert!(
        drift_fired.contains(&"InputDrift code-assistant v7".to_owned()),
        "{drift_fired:?}"
    );
    let series = "app || '/' || environment || '/' || model || '/' || prompt_version";
    let windows = |table: &str, start: &str| {
        crate::support::strings(&crate::support::sql(
            &root,
            &format!(
                "SELECT DISTINCT {series} || '@' || CAST(CAST({start} AS BIGINT) / 300000 * 300000 AS VARCHAR) AS k
                 FROM {table} ORDER BY k"
            ),
        ))
    };
    let judged = windows("drift", "window_start");
    assert!(judged.len() > 40, "{} series-windows", judged.len());
    let expected = windows("events", "timestamp");
    let missing: Vec<&String> = expected.iter().filter(|k| !judged.contains(k)).collect();
    assert!(missing.is_empty(), "not judged: {missing:?}");
    assert_eq!(judged.len(), expected.len());
    let drift_rows = || {
        crate::support::strings(&crate::support::sql(
            &root,
            &format!(
                "SELECT {series} || ' ' || CAST(CAST(window_start AS BIGINT) AS VARCHAR) || ' ' || field || ' ' || method
                 || ' ' || status || ' ' || CAST(drifted AS VARCHAR) || ' ' || coalesce(CAST(statistic AS VARCHAR), '-')
                 FROM drift ORDER BY 1"
            ),
        ))
    };
    let first = drift_rows();
    import();
    assert_eq!(
        crate::support::scalar(&root, "SELECT count(*) FROM alerts"),
        transitions,
        "a rerun judges nothing twice"
    );
    // The rerun judged the backfill's drift windows afresh, to the same verdicts, and
    // replaced them.
    assert_eq!(drift_rows(), first);
}
