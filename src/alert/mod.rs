//! The alert stage: rules over closed windows → alerts → notifications.
//!
//! In: every closed window the metrics stage made durable ([`Frame`]s, handed over by the
//! sink's writer after the window's file is written). Out: notifications to receivers
//! (email, webhooks, Slack, PagerDuty, Alertmanager-format, the terminal), the `alerts` table
//! (every transition and delivery attempt), and the state file
//! `<root>/_state/alerts/<stream>.json`.
//!
//! ```text
//!  closed windows ─► engine (rules, for:, keep_firing_for:) ─► dispatcher (routes, groups,
//!  (metrics files)     pending → firing → resolved              silences, inhibition, dedup)
//!                                                                     │ notifications
//!                                                 notifier tasks ◄────┘ retries, deadline
//!                                                 (own thread + runtime)  └─► attempts ─► alerts table
//! ```
//!
//! ## Time
//! Rules run on event time (window ends), so `for: 5m` means five minutes of traffic, not of
//! processing, and a backfill decides as the live stream would. Grouping timers
//! (`group_wait`, `group_interval`, `repeat_interval`) run on the wall clock, as in
//! Alertmanager — or on event time with `clock = "event"` (replays and the demo, where two
//! hours of traffic pass in seconds).
//!
//! ## State and delivery
//! After every window and every finished delivery, the engine's alerts, the groups'
//! notification log and the per-version history are written to the state file (atomically).
//! A restart resumes them: it neither forgets a firing alert nor re-sends a notification that
//! was delivered; a notification that was being delivered at the crash is sent again
//! (at-least-once, as Alertmanager). Windows the engine had judged are not judged twice.
//! Silences live in `<root>/_state/alerts/silences.json`, written by `telltale silence` and
//! re-read by running pipelines when it changes.
//!
//! The stage never blocks ingestion: frames go through a bounded queue that is drained
//! promptly, evaluation is in-memory, and deliveries run on their own thread.

pub mod dispatch;
pub mod engine;
pub mod notify;
pub mod rule;
pub mod table;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use dispatch::{Dispatcher, Group, Notification, Route, Silence, Status};
pub use engine::{Alert, Engine, EngineState, Frame};
pub use notify::{DeliveryConfig, Notifier, ReceiverConfig};
pub use rule::{RuleContext, RuleError, RuleSet};
use table::AlertRow;

/// The rule files shipped in `alerts/`, built in so that `telltale demo` needs no files.
pub const BUILTIN_RULES: &[(&str, &str)] = &[
    (
        "alerts/latency.toml",
        include_str!("../../alerts/latency.toml"),
    ),
    (
        "alerts/errors.toml",
        include_str!("../../alerts/errors.toml"),
    ),
    ("alerts/cost.toml", include_str!("../../alerts/cost.toml")),
    ("alerts/drift.toml", include_str!("../../alerts/drift.toml")),
    (
        "alerts/experiments.toml",
        include_str!("../../alerts/experiments.toml"),
    ),
    (
        "alerts/quality.toml",
        include_str!("../../alerts/quality.toml"),
    ),
];

#[derive(Debug, Clone, PartialEq)]
pub enum RulesFrom {
    Dir(PathBuf),
    Builtin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Wall,
    Event,
}

/// `[alerting]` in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertingConfig {
    pub enabled: bool,
    pub rules: RulesFrom,
    pub clock: Clock,
    pub routes: Vec<Route>,
    pub default_route: Route,
    pub receivers: BTreeMap<String, ReceiverConfig>,
    pub send_resolved: bool,
    /// A prompt version is known-good after running this long with no critical alert.
    pub known_good_after_ms: i64,
    pub deadline: Duration,
    pub external_url: String,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            enabled: false,
            rules: RulesFrom::Dir(PathBuf::from("alerts")),
            clock: Clock::Wall,
            routes: Vec::new(),
            default_route: Route {
                matchers: Vec::new(),
                receivers: Vec::new(),
                group_by: vec!["alertname".into(), "app".into(), "environment".into()],
                group_wait_ms: 30_000,
                group_interval_ms: 300_000,
                repeat_interval_ms: 4 * 3_600_000,
                continue_matching: false,
            },
            receivers: BTreeMap::new(),
            send_resolved: true,
            known_good_after_ms: 3_600_000,
            deadline: Duration::from_secs(600),
            external_url: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
    #[error("{path}: {message}")]
    State { path: String, message: String },
    #[error("cannot start the alert stage: {0}")]
    Thread(std::io::Error),
}

/// What rules may refer to, from the metrics stage's settings.
pub fn rule_context(m: &crate::metrics::MetricsConfig) -> RuleContext {
    RuleContext {
        dimensions: m.window.dimensions.iter().map(|d| d.column()).collect(),
        window_ms: m.window.size_ms,
        rollup_ms: m.window.rollup_ms,
        drift_window_ms: crate::drift::DriftConfig::default().window_ms,
        quality_metrics: Vec::new(),
        experiments_window_ms: crate::experiment::ExperimentsConfig::default().window_ms(),
    }
}

/// The rule context of a whole pipeline: its series, windows, drift window and scorers.
pub fn pipeline_rule_context(config: &crate::config::PipelineConfig) -> RuleContext {
    let mut ctx = rule_context(&config.metrics);
    ctx.drift_window_ms = config.drift.window_ms;
    ctx.quality_metrics = crate::quality::table::frame_metrics(&config.quality.scorers);
    ctx.experiments_window_ms = config.experiments.window_ms();
    ctx
}

/// Loads the configured rules.
pub fn load_rules(cfg: &AlertingConfig, ctx: &RuleContext) -> Result<RuleSet, RuleError> {
    match &cfg.rules {
        RulesFrom::Dir(d) => rule::load_dir(d, ctx),
        RulesFrom::Builtin => {
            let mut set = RuleSet::default();
            let mut problems = Vec::new();
            for (file, src) in BUILTIN_RULES {
                match rule::parse_rules(src, file, ctx) {
                    Ok(s) => {
                        set.rules.extend(s.rules);
                        set.inhibits.extend(s.inhibits);
                    }
                    Err(p) => problems.extend(p),
                }
            }
            if problems.is_empty() {
                Ok(set)
            } else {
                Err(RuleError::Invalid(problems))
            }
        }
    }
}

pub fn state_dir(root: &Path) -> PathBuf {
    crate::sink::state_dir(root, "alerts")
}

pub fn state_file(root: &Path, stream: &str) -> PathBuf {
    state_dir(root).join(format!("{stream}.json"))
}

/// Every live stream's state file under `root`, sorted (none when there is no state yet).
/// File backfills (`backfill-…` streams) judge history: their alerts are not current, so
/// `telltale alerts` and `telltale gate` leave them out.
pub fn state_files(root: &Path) -> Result<Vec<PathBuf>, AlertError> {
    let dir = state_dir(root);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(state_err(&dir, e)),
    };
    let silences = silences_file(root);
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && *p != silences)
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("backfill-"))
        })
        .collect();
    files.sort();
    Ok(files)
}

pub fn silences_file(root: &Path) -> PathBuf {
    state_dir(root).join("silences.json")
}

/// The per-window outputs (metrics, quality, drift, experiments) of `stream` that start in
/// [from_ms, to_ms), oldest first (unreadable files are skipped with a warning).
pub fn metrics_frames(root: &Path, stream: &str, from_ms: i64, to_ms: i64) -> Vec<Frame> {
    let mut out = table_frames(root, "metrics", stream, from_ms, to_ms, Frame::from_metrics);
    out.extend(table_frames(
        root,
        "quality",
        stream,
        from_ms,
        to_ms,
        Frame::from_quality,
    ));
    out.extend(table_frames(
        root,
        "drift",
        stream,
        from_ms,
        to_ms,
        Frame::from_drift,
    ));
    out.extend(table_frames(
        root,
        "experiments",
        stream,
        from_ms,
        to_ms,
        Frame::from_experiments,
    ));
    out.sort_by_key(|f| (f.end_ms, f.resolution_ms));
    out
}

/// The frames of one per-window table's files of `stream` that start in `from_ms..to_ms`.
fn table_frames(
    root: &Path,
    table: &str,
    stream: &str,
    from_ms: i64,
    to_ms: i64,
    to_frame: fn(&arrow::array::RecordBatch) -> Option<Frame>,
) -> Vec<Frame> {
    table_frames_named(
        root,
        &format!("{table}-{stream}-"),
        table,
        from_ms,
        to_ms,
        to_frame,
    )
}

/// The hourly roll-ups (`<table>-<stream>-<rollup>-<start>`) of `metrics` and `quality`.
pub fn rollup_frames(
    root: &Path,
    stream: &str,
    rollup: &str,
    from_ms: i64,
    to_ms: i64,
) -> Vec<Frame> {
    let mut out = table_frames_named(
        root,
        &format!("metrics-{stream}-{rollup}-"),
        "metrics",
        from_ms,
        to_ms,
        Frame::from_metrics,
    );
    out.extend(table_frames_named(
        root,
        &format!("quality-{stream}-{rollup}-"),
        "quality",
        from_ms,
        to_ms,
        Frame::from_quality,
    ));
    out.sort_by_key(|f| f.end_ms);
    out
}

fn table_frames_named(
    root: &Path,
    prefix: &str,
    table: &str,
    from_ms: i64,
    to_ms: i64,
    to_frame: fn(&arrow::array::RecordBatch) -> Option<Frame>,
) -> Vec<Frame> {
    const HOUR: i64 = 3_600_000;
    let mut out = Vec::new();
    for hour in from_ms.div_euclid(HOUR)..=to_ms.div_euclid(HOUR) {
        let dir = root.join(table).join(crate::sink::hour_dir(hour));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // `<table>-<stream>-<resolution>-<start>` (`drift-<stream>-<start>` for drift).
            let start = name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(".parquet"))
                .and_then(|r| r.rsplit('-').next())
                .and_then(|s| s.parse::<i64>().ok());
            let Some(start) = start.filter(|s| (from_ms..to_ms).contains(s)) else {
                continue;
            };
            let batch = crate::metrics::rebuild::read_parquet(&e.path(), None).and_then(|b| {
                let schema = b.first().map(|x| x.schema());
                match schema {
                    Some(schema) => arrow::compute::concat_batches(&schema, &b)
                        .map(Some)
                        .map_err(|err| crate::sink::SinkError::Io {
                            path: e.path(),
                            source: std::io::Error::other(err),
                        }),
                    None => Ok(None),
                }
            });
            match batch {
                Ok(b) => out.extend(b.as_ref().and_then(to_frame).map(|mut f| {
                    if name.contains("-deferred-") {
                        f.source = format!("{}:deferred", f.source);
                    }
                    f
                })),
                Err(err) => {
                    warn!(path = %e.path().display(), error = %err, start, "skipping an unreadable {table} file")
                }
            }
        }
    }
    out
}

/// The state file's body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub version: u32,
    pub engine: EngineState,
    pub groups: Vec<Group>,
}

fn state_err(path: &Path, message: impl std::fmt::Display) -> AlertError {
    AlertError::State {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

pub fn read_state(path: &Path) -> Result<Persisted, AlertError> {
    read_json(path, "alert state")
}

/// A JSON state file; its default when it does not exist yet.
fn read_json<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    what: &str,
) -> Result<T, AlertError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            state_err(
                path,
                format!("unreadable {what} ({e}); move it away to start afresh"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(state_err(path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), AlertError> {
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
    let body = serde_json::to_vec_pretty(v).expect("state serializes");
    crate::sink::write_durably(path, &body).map_err(|e| state_err(path, e))
}

pub fn read_silences(root: &Path) -> Result<Vec<Silence>, AlertError> {
    read_json(&silences_file(root), "silences file")
}

pub fn write_silences(root: &Path, silences: &[Silence]) -> Result<(), AlertError> {
    write_json(&silences_file(root), &silences)
}

/// Firing critical alerts for one deployment, from every stream's state under `root`: what
/// `telltale gate` refuses on.
pub fn gate(
    root: &Path,
    known_good_after_ms: i64,
    app: &str,
    environment: &str,
    prompt_version: &str,
) -> Result<GateReport, AlertError> {
    let mut report = GateReport::default();
    for f in state_files(root)? {
        let st = read_state(&f)?;
        report.streams += 1;
        for a in &st.engine.alerts {
            let l = |k: &str| a.labels.get(k).map(String::as_str);
            if a.state == engine::State::Firing
                && a.severity == "critical"
                && l("app") == Some(app)
                && l("environment") == Some(environment)
                && l("prompt_version") == Some(prompt_version)
            {
                report.blocking.push(a.clone());
            }
        }
        if report.known_good.is_none() {
            report.known_good = engine::known_good(
                &st.engine.versions,
                known_good_after_ms,
                app,
                environment,
                None,
            )
            .map(str::to_owned);
        }
        for (k, per) in &st.engine.versions {
            if k == &format!("{app}\u{1f}{environment}") {
                report
                    .versions
                    .extend(per.iter().map(|(v, s)| (v.clone(), s.clone())));
            }
        }
    }
    Ok(report)
}

#[derive(Debug, Default)]
pub struct GateReport {
    pub streams: usize,
    pub blocking: Vec<Alert>,
    pub known_good: Option<String>,
    pub versions: BTreeMap<String, engine::VersionSeen>,
}

/// What the pipeline hands the stage.
pub enum Input {
    Frames(Vec<Frame>),
    /// Finish: deliver what is due, wait for deliveries, write state and table, exit.
    Stop,
}

/// A running alert stage.
pub struct AlertStage {
    tx: Option<Sender<Input>>,
    thread: Option<JoinHandle<()>>,
}

/// Sends closed windows to a running stage; cheap to clone.
#[derive(Clone)]
pub struct FrameSender(Sender<Input>);

impl FrameSender {
    /// Hands over closed windows (of any per-window table).
    pub fn send(&self, frames: Vec<Frame>) {
        if !frames.is_empty()
            && self
                .0
                .send_timeout(Input::Frames(frames), Duration::from_secs(5))
                .is_err()
        {
            // Not lost for good: the windows are durable, and the next start judges them.
            warn!(
                "the alert stage did not take closed windows within 5 s; they are judged at the next start"
            );
        }
    }

    /// Hands over the windows of a durable metrics output. Blocks only if the stage is 64
    /// outputs behind (it evaluates in memory, so that means it is stuck or gone).
    pub fn send_metrics(&self, out: &crate::metrics::MetricsOutput) {
        let quality = out
            .quality_files
            .iter()
            .filter_map(|(_, b)| Frame::from_quality(b));
        self.send(
            out.files
                .iter()
                .filter_map(|(_, b)| Frame::from_metrics(b))
                .chain(quality)
                .collect(),
        );
    }
}

impl AlertStage {
    /// Loads rules, state and silences, builds the receivers, and starts the stage's threads.
    pub fn start(
        cfg: &AlertingConfig,
        ctx: &RuleContext,
        root: &Path,
        stream: &str,
        stats: Arc<crate::telemetry::Stats>,
    ) -> Result<AlertStage, AlertError> {
        let rules = load_rules(cfg, ctx)?;
        let delivery = DeliveryConfig {
            deadline: cfg.deadline,
            external_url: cfg.external_url.clone(),
            ..DeliveryConfig::default()
        };
        let notifier = Arc::new(Notifier::new(&cfg.receivers, delivery)?);
        let state_path = state_file(root, stream);
        let persisted = read_state(&state_path)?;
        let mut engine = Engine::new(rules.rules, ctx.dimensions.clone(), cfg.known_good_after_ms);
        // Event time resumes where the judged windows ended.
        let event_now = persisted
            .engine
            .evaluated_through
            .values()
            .copied()
            .max()
            .unwrap_or(i64::MIN);
        for a in engine.restore(persisted.engine) {
            warn!(rule = %a.rule, "dropping an alert whose rule no longer exists");
        }
        // Rebuild the rules' histories from the metrics table, and judge the windows that were
        // made durable but never judged (a crash between the two).
        let had_state = state_path.exists();
        let now = wall_ms();
        // `baseline = { prompt_version }` rules: that version's hourly roll-ups, before the
        // recent windows below add to them.
        let within = engine.versus_within_ms();
        if within > 0 {
            let rollup = crate::metrics::resolution_name(ctx.rollup_ms);
            let frames = rollup_frames(root, stream, &rollup, now - within, now);
            info!(
                windows = frames.len(),
                "prompt-version baselines read from the hourly roll-ups"
            );
            engine.pin_versus(&frames, ctx.rollup_ms, now);
        }
        let span = engine.history_ms();
        let mut catch_up = Vec::new();
        let mut warmed = 0;
        if span > 0 || had_state {
            for f in metrics_frames(root, stream, now - span.max(3_600_000), now + 600_000) {
                if engine.already_judged(&f) {
                    engine.warm(&f);
                    warmed += 1;
                } else if had_state {
                    catch_up.push(f);
                } else {
                    engine.warm_as_judged(&f);
                    warmed += 1;
                }
            }
        }
        for (from, to) in engine.pinned_periods() {
            let frames = metrics_frames(root, stream, from, to);
            info!(from = %crate::metrics::fmt_ms(from), to = %crate::metrics::fmt_ms(to), windows = frames.len(), "pinned alert baseline read from the metrics table");
            engine.pin(&frames);
        }
        if warmed + catch_up.len() > 0 {
            info!(
                warmed,
                catch_up = catch_up.len(),
                "alert rules' history rebuilt from the metrics table"
            );
        }
        let mut dispatcher = Dispatcher::new(
            cfg.routes.clone(),
            cfg.default_route.clone(),
            rules.inhibits,
            cfg.send_resolved,
        );
        dispatcher.restore(persisted.groups);
        info!(
            rules = engine.rules().count(),
            receivers = cfg.receivers.len(),
            "alerting on"
        );
        let (tx, rx) = bounded(64);
        let driver = Driver {
            engine,
            dispatcher,
            clock: cfg.clock,
            event_now,
            root: root.to_owned(),
            stream: stream.to_owned(),
            state_path,
            silences_seen: None,
            rows: Vec::new(),
            rows_since: Instant::now(),
            in_flight: HashMap::new(),
            file_seq: 0,
            stats,
            frames_at: None,
        };
        let thread = std::thread::Builder::new()
            .name("telltale-alerts".into())
            .spawn(move || driver.run(rx, notifier))
            .map_err(AlertError::Thread)?;
        let stage = AlertStage {
            tx: Some(tx),
            thread: Some(thread),
        };
        stage.sender().send(catch_up);
        Ok(stage)
    }

    pub fn sender(&self) -> FrameSender {
        FrameSender(self.tx.clone().expect("the stage is running"))
    }

    /// Evaluates what was sent, delivers what is due (waiting for deliveries up to their
    /// deadline), writes the state and the table, and stops.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for AlertStage {
    fn drop(&mut self) {
        // Senders may live on elsewhere (a `FrameSender`): ask, rather than wait for the
        // channel to close.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Input::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Driver {
    engine: Engine,
    dispatcher: Dispatcher,
    clock: Clock,
    event_now: i64,
    root: PathBuf,
    stream: String,
    state_path: PathBuf,
    silences_seen: Option<SystemTime>,
    rows: Vec<AlertRow>,
    rows_since: Instant,
    /// Each notification being delivered, with when the window that caused it arrived.
    in_flight: HashMap<u64, (Notification, Instant)>,
    file_seq: u64,
    stats: Arc<crate::telemetry::Stats>,
    /// While windows are being judged: when they arrived.
    frames_at: Option<Instant>,
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Rows are written at most this often (and at stop).
const TABLE_EVERY: Duration = Duration::from_secs(30);

/// How long a stopping stage waits for deliveries in progress.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Driver {
    fn now(&self) -> i64 {
        match self.clock {
            Clock::Wall => wall_ms(),
            Clock::Event => self.event_now,
        }
    }

    fn run(mut self, rx: Receiver<Input>, notifier: Arc<Notifier>) {
        let (attempt_tx, attempt_rx) = unbounded::<notify::Attempt>();
        let (job_tx, job_rx) = tokio::sync::mpsc::unbounded_channel::<Notification>();
        let notify_thread = std::thread::Builder::new()
            .name("telltale-notify".into())
            .spawn(move || deliver_loop(job_rx, notifier, attempt_tx));
        let notify_thread = match notify_thread {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot start the notifier thread; alerts will not be delivered");
                return;
            }
        };
        self.reload_silences();
        let mut rx = rx;
        let mut stopping: Option<Instant> = None;
        loop {
            if let Some(since) = stopping {
                if self.in_flight.is_empty() {
                    break;
                }
                if since.elapsed() > STOP_GRACE {
                    warn!(
                        in_flight = self.in_flight.len(),
                        "stopping with notifications still being delivered; they are sent again after a restart"
                    );
                    break;
                }
            }
            let wait = self
                .dispatcher
                .next_due()
                .map(|t| Duration::from_millis(t.saturating_sub(self.now()).clamp(0, 250) as u64))
                .unwrap_or(Duration::from_millis(250));
            crossbeam_channel::select! {
                recv(rx) -> msg => match msg {
                    Ok(Input::Frames(frames)) => self.frames(&frames, &job_tx),
                    Ok(Input::Stop) | Err(_) => {
                        stopping = Some(Instant::now());
                        rx = crossbeam_channel::never();
                    }
                },
                recv(attempt_rx) -> a => if let Ok(a) = a { self.attempt(a) },
                default(wait) => {}
            }
            self.reload_silences();
            // Also while stopping: a resolution waits for the firing notice before it.
            self.flush(&job_tx);
            if self.rows_since.elapsed() >= TABLE_EVERY {
                self.write_rows();
            }
        }
        drop(job_tx);
        if self.in_flight.is_empty() {
            let _ = notify_thread.join();
        }
        self.persist();
        self.write_rows();
    }

    /// Judges each window and, after each, cuts what is due: with the event clock a burst of
    /// windows (a backlog caught up) still notifies as the windows' times say.
    fn frames(
        &mut self,
        frames: &[Frame],
        job_tx: &tokio::sync::mpsc::UnboundedSender<Notification>,
    ) {
        let now_wall = wall_ms();
        self.frames_at = Some(Instant::now());
        for f in frames {
            if self.engine.already_judged(f) {
                self.engine.warm(f);
                continue;
            }
            let started = Instant::now();
            let ev = self.engine.evaluate(f);
            self.stats
                .alert_evaluation_us
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.event_now = self.event_now.max(f.end_ms);
            let now = self.now();
            for t in &ev.transitions {
                match t.to {
                    "firing" => self.stats.alerts_fired.fetch_add(1, Ordering::Relaxed),
                    "resolved" => self.stats.alerts_resolved.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                info!(rule = %t.rule, from = t.from, to = t.to, value = t.value, window_end = %crate::metrics::fmt_ms(t.at_ms), "alert");
                self.rows.push(AlertRow::transition(t, now_wall));
            }
            self.dispatcher.firing(&ev.firing, now);
            self.dispatcher.resolved(&ev.resolved, now);
            self.flush(job_tx);
        }
        self.frames_at = None;
        let (mut pending, mut firing) = (0, 0);
        for a in self.engine.alerts() {
            match a.state {
                engine::State::Pending => pending += 1,
                engine::State::Firing => firing += 1,
            }
        }
        self.stats.alerts_pending.store(pending, Ordering::Relaxed);
        self.stats.alerts_firing.store(firing, Ordering::Relaxed);
        self.persist();
    }

    fn flush(&mut self, job_tx: &tokio::sync::mpsc::UnboundedSender<Notification>) {
        let now = self.now();
        let cut = self.dispatcher.flush(now);
        let since = self.frames_at.unwrap_or_else(Instant::now);
        for n in cut {
            self.in_flight.insert(n.id, (n.clone(), since));
            if job_tx.send(n).is_err() {
                warn!("the notifier thread is gone; notification dropped");
            }
        }
    }

    fn attempt(&mut self, a: notify::Attempt) {
        let result = a.result();
        if let Ok(mut m) = self.stats.notifications.lock() {
            *m.entry((a.receiver.clone(), result)).or_default() += 1;
        }
        if let Some((n, since)) = self.in_flight.get(&a.id) {
            if a.ok {
                self.stats
                    .alert_notification_delay_ms
                    .store(since.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            self.rows.extend(AlertRow::attempts(n, &a));
            if !a.ok {
                warn!(receiver = %a.receiver, attempt = a.attempt, error = a.error.as_deref().unwrap_or(""), gave_up = a.last, "notification failed");
            }
        }
        if a.last {
            self.in_flight.remove(&a.id);
            self.dispatcher
                .delivered(&a.receiver, &a.group_key, a.id, a.ok);
            self.persist();
        }
    }

    fn reload_silences(&mut self) {
        let path = silences_file(&self.root);
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if mtime == self.silences_seen {
            return;
        }
        self.silences_seen = mtime;
        match read_silences(&self.root) {
            Ok(s) => self.dispatcher.set_silences(&s),
            Err(e) => warn!(error = %e, "cannot read silences; keeping the previous ones"),
        }
    }

    fn persist(&mut self) {
        let p = Persisted {
            version: 1,
            engine: self.engine.state(),
            groups: self.dispatcher.groups().cloned().collect(),
        };
        if let Err(e) = write_json(&self.state_path, &p) {
            warn!(error = %e, "cannot write the alert state");
        }
    }

    fn write_rows(&mut self) {
        self.rows_since = Instant::now();
        if self.rows.is_empty() {
            return;
        }
        let first = self.rows[0].time_ms;
        self.file_seq += 1;
        let rel = PathBuf::from("alerts")
            .join(crate::sink::hour_dir(first.div_euclid(3_600_000)))
            .join(format!(
                "alerts-{}-{first}-{}-{}.parquet",
                self.stream,
                std::process::id(),
                self.file_seq
            ));
        let path = self.root.join(rel);
        let batch = table::to_batch(&self.rows);
        match write_table_file(&path, &batch) {
            Ok(()) => self.rows.clear(),
            Err(e) => {
                warn!(error = %e, path = %path.display(), "cannot write alert rows; keeping them for the next try")
            }
        }
    }
}

fn write_table_file(
    path: &Path,
    batch: &arrow::array::RecordBatch,
) -> Result<(), crate::sink::SinkError> {
    let config = crate::config::SinkConfig::default();
    crate::sink::write_into_place(path, batch, crate::sink::Table::Alerts, &config)?;
    crate::sink::fsync_dir(path.parent().expect("a file has a directory"))
}

/// The notifier thread: one task per notification, on a small runtime of its own.
fn deliver_loop(
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<Notification>,
    notifier: Arc<Notifier>,
    attempts: Sender<notify::Attempt>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "cannot build the notifier runtime");
            return;
        }
    };
    rt.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(n) = jobs.recv().await {
            let notifier = notifier.clone();
            let attempts = attempts.clone();
            tasks.spawn(async move {
                let report = move |a: notify::Attempt| {
                    let _ = attempts.send(a);
                };
                notifier.deliver(&n, &report).await;
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    });
}

#[cfg(test)]
mod tests;
