//! Notifiers: email (SMTP via lettre, or `.eml` files), a generic JSON webhook signed with
//! HMAC-SHA256, Slack incoming webhooks, PagerDuty Events API v2, Alertmanager's webhook
//! payload (version 4), and the terminal.
//!
//! Each delivery is retried with exponential backoff (1 s, 2 s, 4 s … at most 30 s apart)
//! until it succeeds, fails for a reason retrying cannot fix (an HTTP 4xx other than 408/429,
//! a rejected address), or its deadline passes. Every attempt is reported. Deliveries run as
//! independent tasks, so a slow or failing receiver delays nobody else, and never ingestion.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hmac::{Hmac, Mac};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{Value, json};
use sha2::Sha256;

use super::dispatch::{Notification, Notified, Status};
use super::rule::human;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587); refuses to send without it.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: local relays and test servers only.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EmailTransport {
    Smtp {
        host: String,
        port: u16,
        tls: SmtpTls,
        username: Option<String>,
        password: Option<String>,
        /// For relays with self-signed certificates on a private network.
        accept_invalid_certs: bool,
    },
    /// Writes each message as an `.eml` file into this directory.
    Dir(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReceiverConfig {
    Email {
        transport: EmailTransport,
        from: String,
        to: Vec<String>,
    },
    Webhook {
        url: String,
        secret: Option<String>,
    },
    Slack {
        url: String,
    },
    PagerDuty {
        url: String,
        routing_key: String,
    },
    Alertmanager {
        url: String,
    },
    /// Prints notifications to standard output.
    Log,
}

pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("receiver {receiver}: {message}")]
    Config { receiver: String, message: String },
}

/// One failed attempt: whether trying again may help, and what happened.
#[derive(Debug, Clone)]
pub struct SendError {
    pub retryable: bool,
    pub message: String,
}

impl SendError {
    fn retry(message: impl Into<String>) -> SendError {
        SendError {
            retryable: true,
            message: message.into(),
        }
    }
    fn fatal(message: impl Into<String>) -> SendError {
        SendError {
            retryable: false,
            message: message.into(),
        }
    }
}

/// One delivery attempt, as reported to the alerts table.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: u64,
    pub receiver: String,
    pub group_key: String,
    pub attempt: u32,
    /// Wall clock.
    pub at_ms: i64,
    pub ok: bool,
    pub error: Option<String>,
    /// The delivery is over (success, or given up).
    pub last: bool,
}

impl Attempt {
    /// `ok`, `retrying` or `gave_up`.
    pub fn result(&self) -> &'static str {
        if self.ok {
            "ok"
        } else if self.last {
            "gave_up"
        } else {
            "retrying"
        }
    }
}

enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Dir(AsyncFileTransport<Tokio1Executor>),
}

enum Receiver {
    Email {
        mailer: Box<Mailer>,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
    /// Webhook, Slack, PagerDuty, Alertmanager and the terminal need nothing beyond their
    /// settings.
    Plain(ReceiverConfig),
}

/// Delivery settings shared by every receiver.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Give up a notification after this long.
    pub deadline: Duration,
    /// Per attempt.
    pub timeout: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Shown in payloads as the place to look (Alertmanager's `externalURL`).
    pub external_url: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            deadline: Duration::from_secs(600),
            timeout: Duration::from_secs(10),
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            external_url: String::new(),
        }
    }
}

pub struct Notifier {
    receivers: BTreeMap<String, Receiver>,
    http: reqwest::Client,
    delivery: DeliveryConfig,
}

fn mailbox(receiver: &str, s: &str) -> Result<Mailbox, NotifyError> {
    s.parse().map_err(|e| NotifyError::Config {
        receiver: receiver.to_owned(),
        message: format!("{s:?} is not an email address: {e}"),
    })
}

impl Notifier {
    /// Builds every receiver (addresses and TLS settings are checked here; nothing connects).
    pub fn new(
        configs: &BTreeMap<String, ReceiverConfig>,
        delivery: DeliveryConfig,
    ) -> Result<Notifier, NotifyError> {
        let mut receivers = BTreeMap::new();
        for (name, c) in configs {
            let r = match c {
                ReceiverConfig::Email {
                    transport,
                    from,
                    to,
                } => {
                    let mailer = match transport {
                        EmailTransport::Dir(dir) => {
                            std::fs::create_dir_all(dir).map_err(|e| NotifyError::Config {
                                receiver: name.clone(),
                                message: format!("cannot create {}: {e}", dir.display()),
                            })?;
                            Mailer::Dir(AsyncFileTransport::new(dir))
                        }
                        EmailTransport::Smtp {
                            host,
                            port,
                            tls,
                            username,
                            password,
                            accept_invalid_certs,
                        } => {
                            let params = TlsParameters::builder(host.clone())
                                .dangerous_accept_invalid_certs(*accept_invalid_certs)
                                .build()
                                .map_err(|e| NotifyError::Config {
                                    receiver: name.clone(),
                                    message: format!("TLS settings: {e}"),
                                })?;
                            let mut b =
                                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                                    .port(*port)
                                    .timeout(Some(delivery.timeout))
                                    .tls(match tls {
                                        SmtpTls::StartTls => Tls::Required(params),
                                        SmtpTls::Tls => Tls::Wrapper(params),
                                        SmtpTls::None => Tls::None,
                                    });
                            if let (Some(u), Some(p)) = (username, password) {
                                b = b.credentials(Credentials::new(u.clone(), p.clone()));
                            }
                            Mailer::Smtp(b.build())
                        }
                    };
                    Receiver::Email {
                        mailer: Box::new(mailer),
                        from: mailbox(name, from)?,
                        to: to
                            .iter()
                            .map(|t| mailbox(name, t))
                            .collect::<Result<_, _>>()?,
                    }
                }
                other => Receiver::Plain(other.clone()),
            };
            receivers.insert(name.clone(), r);
        }
        let http = reqwest::Client::builder()
            .timeout(delivery.timeout)
            .user_agent(concat!("telltale/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Config {
                receiver: "http client".into(),
                message: e.to_string(),
            })?;
        Ok(Notifier {
            receivers,
            http,
            delivery,
        })
    }

    /// One attempt.
    pub async fn send_once(&self, n: &Notification) -> Result<(), SendError> {
        let Some(r) = self.receivers.get(&n.receiver) else {
            return Err(SendError::fatal(format!(
                "no receiver named {:?}",
                n.receiver
            )));
        };
        let ext = &self.delivery.external_url;
        match r {
            Receiver::Plain(ReceiverConfig::Log) => {
                println!("{}", terminal_text(n));
                Ok(())
            }
            Receiver::Plain(ReceiverConfig::Email { .. }) => {
                unreachable!("email receivers are built with their mailer")
            }
            Receiver::Email { mailer, from, to } => {
                let mut b = Message::builder()
                    .from(from.clone())
                    .subject(email_subject(n));
                for t in to {
                    b = b.to(t.clone());
                }
                let msg = b
                    .multipart(MultiPart::alternative_plain_html(
                        email_text(n),
                        email_html(n),
                    ))
                    .map_err(|e| SendError::fatal(format!("cannot build the message: {e}")))?;
                match &**mailer {
                    Mailer::Smtp(t) => t.send(msg).await.map(|_| ()).map_err(|e| {
                        // 5xx replies are permanent (a rejected sender or recipient).
                        if e.is_permanent() {
                            SendError::fatal(format!("SMTP: {e}"))
                        } else {
                            SendError::retry(format!("SMTP: {e}"))
                        }
                    }),
                    Mailer::Dir(t) => t
                        .send(msg)
                        .await
                        .map(|_| ())
                        .map_err(|e| SendError::retry(format!("writing .eml: {e}"))),
                }
            }
            Receiver::Plain(ReceiverConfig::Webhook { url, secret }) => {
                let body =
                    serde_json::to_vec(&webhook_payload(n, ext)).expect("JSON values serialize");
                let mut req = self
                    .http
                    .post(url)
                    .header("content-type", "application/json");
                if let Some(s) = secret {
                    let ts = chrono::Utc::now().timestamp().to_string();
                    req = req
                        .header("x-telltale-timestamp", &ts)
                        .header("x-telltale-signature", sign(s, &ts, &body));
                }
                http_result(req.body(body).send().await).await
            }
            Receiver::Plain(ReceiverConfig::Slack { url }) => {
                let body = serde_json::to_vec(&slack_payload(n)).expect("JSON values serialize");
                let req = self
                    .http
                    .post(url)
                    .header("content-type", "application/json");
                http_result(req.body(body).send().await).await
            }
            Receiver::Plain(ReceiverConfig::PagerDuty { url, routing_key }) => {
                // One event per alert: PagerDuty deduplicates and resolves by dedup_key.
                for a in &n.alerts {
                    let body = serde_json::to_vec(&pagerduty_event(a, routing_key, ext))
                        .expect("JSON values serialize");
                    let req = self
                        .http
                        .post(url)
                        .header("content-type", "application/json");
                    http_result(req.body(body).send().await).await?;
                }
                Ok(())
            }
            Receiver::Plain(ReceiverConfig::Alertmanager { url }) => {
                let body = serde_json::to_vec(&alertmanager_payload(n, ext))
                    .expect("JSON values serialize");
                let req = self
                    .http
                    .post(url)
                    .header("content-type", "application/json");
                http_result(req.body(body).send().await).await
            }
        }
    }

    /// Delivers with retries; `report` hears of every attempt. Returns whether it succeeded.
    pub async fn deliver(
        &self,
        n: &Notification,
        report: &(dyn Fn(Attempt) + Send + Sync),
    ) -> bool {
        let d = &self.delivery;
        let started = tokio::time::Instant::now();
        let mut backoff = d.first_backoff;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let res = match tokio::time::timeout(d.timeout, self.send_once(n)).await {
                Ok(r) => r,
                Err(_) => Err(SendError::retry(format!(
                    "no answer within {:?}",
                    d.timeout
                ))),
            };
            let give_up = match &res {
                Ok(()) => false,
                Err(e) => !e.retryable || started.elapsed() + backoff > d.deadline,
            };
            report(Attempt {
                id: n.id,
                receiver: n.receiver.clone(),
                group_key: n.group_key.clone(),
                attempt,
                at_ms: chrono::Utc::now().timestamp_millis(),
                ok: res.is_ok(),
                error: res.as_ref().err().map(|e| e.message.clone()),
                last: res.is_ok() || give_up,
            });
            match res {
                Ok(()) => return true,
                Err(_) if give_up => return false,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(d.max_backoff);
                }
            }
        }
    }
}

async fn http_result(r: Result<reqwest::Response, reqwest::Error>) -> Result<(), SendError> {
    match r {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => {
            let status = resp.status();
            let body: String = resp
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            let msg = format!("HTTP {status}: {body}");
            if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                Err(SendError::retry(msg))
            } else {
                Err(SendError::fatal(msg))
            }
        }
        Err(e) => Err(SendError::retry(format!("HTTP: {e}"))),
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>"): receivers recompute it and
/// reject stale timestamps, so a captured request cannot be replayed later.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut s = String::with_capacity(71);
    s.push_str("sha256=");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// Alertmanager's "zero time" for alerts that have not ended.
const AM_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn common<'a>(
    alerts: &'a [Notified],
    f: impl Fn(&'a Notified) -> &'a BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut it = alerts.iter();
    let Some(first) = it.next() else {
        return BTreeMap::new();
    };
    let mut c = f(first).clone();
    for a in it {
        let m = f(a);
        c.retain(|k, v| m.get(k) == Some(v));
    }
    c
}

/// The body Alertmanager posts to webhook receivers (`version: "4"`).
pub fn alertmanager_payload(n: &Notification, external_url: &str) -> Value {
    json!({
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "status": n.status.as_str(),
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": common(&n.alerts, |a| &a.labels),
        "commonAnnotations": common(&n.alerts, |a| &a.annotations),
        "externalURL": external_url,
        "alerts": n.alerts.iter().map(|a| json!({
            "status": a.status.as_str(),
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.starts_at),
            "endsAt": a.ends_at.map(rfc3339).unwrap_or_else(|| AM_ZERO_TIME.to_owned()),
            "generatorURL": external_url,
            "fingerprint": format!("{:016x}", a.fingerprint),
        })).collect::<Vec<_>>(),
    })
}

/// telltale's own webhook body: the Alertmanager fields plus values, baselines and the
/// rollback hint as data.
pub fn webhook_payload(n: &Notification, external_url: &str) -> Value {
    json!({
        "version": "telltale.alert.v1",
        "receiver": n.receiver,
        "status": n.status.as_str(),
        "group_key": n.group_key,
        "group_labels": n.group_labels,
        "external_url": external_url,
        "alerts": n.alerts.iter().map(|a| json!({
            "status": a.status.as_str(),
            "rule": a.rule,
            "severity": a.severity,
            "fingerprint": format!("{:016x}", a.fingerprint),
            "labels": a.labels,
            "annotations": a.annotations,
            "value": a.value,
            "baseline": a.baseline,
            "threshold": a.threshold,
            "starts_at": rfc3339(a.starts_at),
            "ends_at": a.ends_at.map(rfc3339),
            "rollback_to": a.annotations.get("rollback_to"),
        })).collect::<Vec<_>>(),
    })
}

/// One PagerDuty Events v2 event: trigger while firing, resolve when resolved, both under
/// the alert's fingerprint as `dedup_key`.
pub fn pagerduty_event(a: &Notified, routing_key: &str, external_url: &str) -> Value {
    let dedup_key = format!("telltale-{:016x}", a.fingerprint);
    if a.status == Status::Resolved {
        return json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key});
    }
    let severity = match a.severity.as_str() {
        "critical" => "critical",
        "warning" => "warning",
        _ => "info",
    };
    let mut links = Vec::new();
    if !external_url.is_empty() {
        links.push(json!({"href": external_url, "text": "telltale"}));
    }
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": summary_line(a),
            "source": a.labels.get("app").cloned().unwrap_or_else(|| "telltale".into()),
            "severity": severity,
            "component": a.labels.get("prompt_version"),
            "group": a.labels.get("environment"),
            "class": a.rule,
            "custom_details": {
                "labels": a.labels,
                "annotations": a.annotations,
                "value": a.value,
                "baseline": a.baseline,
                "threshold": a.threshold,
                "starts_at": rfc3339(a.starts_at),
            },
        },
        "links": links,
    })
}

/// A Slack incoming-webhook message with Block Kit blocks (and `text` as the fallback).
pub fn slack_payload(n: &Notification) -> Value {
    let mut blocks = vec![json!({
        "type": "header",
        "text": {"type": "plain_text", "text": truncate(&email_subject(n), 150)},
    })];
    for a in n.alerts.iter().take(20) {
        let mut text = format!(
            "*{}* {} `{}`\n{}",
            if a.status == Status::Firing {
                ":red_circle: FIRING"
            } else {
                ":large_green_circle: RESOLVED"
            },
            a.rule,
            a.severity,
            a.annotations
                .get("summary")
                .cloned()
                .unwrap_or_else(|| summary_line(a)),
        );
        if let Some(rb) = a.annotations.get("rollback") {
            text.push_str(&format!("\n:rewind: {rb}"));
        }
        blocks.push(
            json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(&text, 2900)}}),
        );
        let ctx: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(&ctx.join("  "), 2900)}]}));
    }
    json!({"text": email_subject(n), "blocks": blocks})
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

fn summary_line(a: &Notified) -> String {
    if let Some(s) = a.annotations.get("summary") {
        return s.clone();
    }
    let series: Vec<String> = a
        .labels
        .iter()
        .filter(|(k, _)| *k != "alertname" && *k != "severity")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{}: value {}{} ({})",
        a.rule,
        human(a.value),
        a.baseline
            .map(|b| format!(", baseline {}", human(b)))
            .unwrap_or_default(),
        series.join(", ")
    )
}

/// `[FIRING:2] LatencyP99High (support-bot prod)` — Alertmanager's subject line.
pub fn email_subject(n: &Notification) -> String {
    let firing = n
        .alerts
        .iter()
        .filter(|a| a.status == Status::Firing)
        .count();
    let head = match n.status {
        Status::Firing => format!("[FIRING:{firing}]"),
        Status::Resolved => "[RESOLVED]".to_owned(),
    };
    let labels: Vec<&str> = n.group_labels.values().map(String::as_str).collect();
    format!("{head} {}", labels.join(" "))
}

fn alert_lines(a: &Notified) -> Vec<String> {
    let mut l = vec![format!(
        "{} {} [{}] since {}{}",
        a.status.as_str().to_uppercase(),
        a.rule,
        a.severity,
        rfc3339(a.starts_at),
        a.ends_at
            .map(|e| format!(", resolved at {}", rfc3339(e)))
            .unwrap_or_default()
    )];
    l.push(format!(
        "  value {}, threshold {}{}",
        human(a.value),
        human(a.threshold),
        a.baseline
            .map(|b| format!(", baseline {}", human(b)))
            .unwrap_or_default()
    ));
    for (k, v) in &a.annotations {
        if k != "rollback_to" {
            l.push(format!("  {k}: {v}"));
        }
    }
    let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.push(format!("  labels: {}", labels.join(", ")));
    l
}

pub fn email_text(n: &Notification) -> String {
    let mut s = format!("{}\n\n", email_subject(n));
    for a in &n.alerts {
        for l in alert_lines(a) {
            s.push_str(&l);
            s.push('\n');
        }
        s.push('\n');
    }
    s.push_str("-- \ntelltale (silence with: telltale silence add 'alertname=\"…\"' --for 2h --comment \"…\")\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn email_html(n: &Notification) -> String {
    let mut s = format!(
        "<!doctype html><html><body style=\"font-family:sans-serif\"><h2>{}</h2>",
        esc(&email_subject(n))
    );
    for a in &n.alerts {
        let color = if a.status == Status::Firing {
            "#b00020"
        } else {
            "#1b7f3b"
        };
        s.push_str(&format!(
            "<h3 style=\"color:{color}\">{} {} <small>[{}]</small></h3><table cellpadding=\"4\">",
            a.status.as_str().to_uppercase(),
            esc(&a.rule),
            esc(&a.severity)
        ));
        let mut row = |k: &str, v: &str| {
            s.push_str(&format!(
                "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
                esc(k),
                esc(v)
            ));
        };
        row("value", &human(a.value));
        row("threshold", &human(a.threshold));
        if let Some(b) = a.baseline {
            row("baseline", &human(b));
        }
        row("since", &rfc3339(a.starts_at));
        if let Some(e) = a.ends_at {
            row("resolved at", &rfc3339(e));
        }
        for (k, v) in &a.annotations {
            if k != "rollback_to" {
                row(k, v);
            }
        }
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        row("labels", &labels.join(", "));
        s.push_str("</table>");
    }
    s.push_str("<p style=\"color:#666\">telltale</p></body></html>");
    s
}

/// What the `log` receiver prints.
pub fn terminal_text(n: &Notification) -> String {
    let mut s = format!("alert → {}: {}", n.receiver, email_subject(n));
    for a in &n.alerts {
        s.push_str(&format!("\n  {}", summary_line(a)));
        s.push_str(&format!(" [{}]", a.status.as_str()));
        if let Some(rb) = a.annotations.get("rollback") {
            s.push_str(&format!("\n    hint: {rb}"));
        }
    }
    s
}
