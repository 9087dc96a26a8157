//! Pipeline files (TOML) → validated, typed [`PipelineConfig`].
//!
//! Loading is pure: it reads the file and the environment (for `${VAR}` interpolation) and
//! nothing else. Every problem is reported at once, each with its path and a hint; unknown keys
//! are errors. Connectivity (broker reachable, data root writable) is checked separately by
//! `telltale check`.

pub mod reader;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::alert::dispatch::Route;
use crate::alert::notify::{EmailTransport, PAGERDUTY_EVENTS_URL, ReceiverConfig, SmtpTls};
use crate::alert::{AlertingConfig, Clock, RulesFrom};
use crate::decode::{DecoderConfig, Format};
use crate::drift::{DriftConfig, EmbedderKind};
use crate::metrics::MetricsConfig;
use crate::metrics::cost::{Price, Rates};
use crate::window::Dimension;
use reader::{Errors, Obj};

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// All problems found in one pipeline file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: String, message: String },
    #[error("{}", render(.file, .errors))]
    Invalid {
        file: String,
        errors: Vec<ConfigError>,
    },
}

fn render(file: &str, errors: &[ConfigError]) -> String {
    let mut s = format!(
        "{file}: {} error{} in pipeline config",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for e in errors {
        s.push_str(&format!("\n  {file}: {}: {}", e.path, e.message));
    }
    s
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub name: String,
    pub data_root: PathBuf,
    pub source: SourceConfig,
    pub decode: DecoderConfig,
    pub rejects: RejectsConfig,
    pub sink: SinkConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    pub alerting: AlertingConfig,
    pub drift: DriftConfig,
    pub quality: crate::quality::QualityConfig,
    pub harvest: crate::harvest::HarvestConfig,
    pub experiments: crate::experiment::ExperimentsConfig,
}

/// telltale's own HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `None`: no endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Kafka(KafkaSourceConfig),
    File(FileSourceConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSourceConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    /// `auto.offset.reset` for partitions the group has no committed offset for.
    pub start_from: String,
    /// librdkafka properties passed through as given (SASL, SSL, timeouts…).
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileSourceConfig {
    /// A path, a glob, or `-` for standard input.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RejectsConfig {
    /// Raw bytes of a rejected record kept in `rejects.raw`; longer records are truncated.
    pub max_raw_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// A partition's buffer is written out when its encoded input reaches this size…
    pub roll_size: u64,
    /// …or when its oldest record has waited this long.
    pub roll_interval: Duration,
    /// All partitions' buffers together; the largest is written out when exceeded.
    pub max_buffered: u64,
    /// Batches waiting for the writer; when full, the consumer pauses.
    pub queue_depth: usize,
    pub zstd_level: i32,
    pub row_group_rows: usize,
    /// Crash-test aid: a pause before renaming a batch's files and another before committing
    /// them, widening the windows a `kill -9` can land in. Zero (off) in production.
    pub debug_commit_delay: Duration,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            roll_size: 64 << 20,
            roll_interval: Duration::from_secs(60),
            max_buffered: 256 << 20,
            queue_depth: 2,
            zstd_level: 1,
            row_group_rows: 128 * 1024,
            debug_commit_delay: Duration::ZERO,
        }
    }
}

/// librdkafka properties telltale sets itself: overriding them would break delivery guarantees.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "telltale commits offsets itself, after the data is durable",
    ),
    (
        "enable.auto.offset.store",
        "telltale commits offsets itself, after the data is durable",
    ),
    ("group.id", "use source.group_id"),
    ("bootstrap.servers", "use source.brokers"),
    ("auto.offset.reset", "use source.start_from"),
];

impl PipelineConfig {
    /// Loads and validates a pipeline file, interpolating `${VAR}` from the process environment.
    /// A relative `cost.price_table` is resolved against the pipeline file's directory.
    pub fn load(path: &Path) -> Result<PipelineConfig, ConfigLoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Io {
            file: file.clone(),
            source,
        })?;
        let mut cfg = Self::from_str_with_env(&text, &file, &|k| std::env::var(k).ok())?;
        if let Some(p) = &cfg.metrics.prices
            && p.is_relative()
        {
            let dir = path.parent().unwrap_or(Path::new("."));
            cfg.metrics.prices = Some(dir.join(p));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if let RulesFrom::Dir(d) = &cfg.alerting.rules
            && d.is_relative()
        {
            cfg.alerting.rules = RulesFrom::Dir(dir.join(d));
        }
        for r in cfg.alerting.receivers.values_mut() {
            if let ReceiverConfig::Email {
                transport: EmailTransport::Dir(d),
                ..
            } = r
                && d.is_relative()
            {
                *d = dir.join(&*d);
            }
        }
        Ok(cfg)
    }

    pub fn from_str_with_env(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PipelineConfig, ConfigLoadError> {
        let mut root: toml::Value = toml::from_str::<toml::Table>(text)
            .map(toml::Value::Table)
            .map_err(|e| ConfigLoadError::Syntax {
                file: file.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?;
        let mut e = Errors::default();
        reader::interpolate(&mut root, "", env, &mut e);
        let toml::Value::Table(table) = root else {
            unreachable!("parsed as a table above")
        };
        // Relative file paths inside the pipeline (JSON Schemas) are relative to its file.
        let base = Path::new(file).parent().unwrap_or(Path::new(""));
        let cfg = Self::read(Obj::new("", table), base, &mut e);
        if e.0.is_empty() {
            Ok(cfg.expect("a config is built whenever no error was recorded"))
        } else {
            Err(ConfigLoadError::Invalid {
                file: file.to_owned(),
                errors: e.0,
            })
        }
    }

    fn read(mut root: Obj, base: &Path, e: &mut Errors) -> Option<PipelineConfig> {
        let mut pipeline = root
            .table(e, "pipeline")
            .unwrap_or_else(|| Obj::new("pipeline", Default::default()));
        let name = pipeline.string_or(e, "name", "default");
        let data_root = PathBuf::from(pipeline.string_or(e, "data_root", "./telltale-data"));
        pipeline.finish(e);

        let source = match root.table(e, "source") {
            Some(s) => read_source(s, e),
            None => {
                e.push(
                    "source",
                    "is required (a [source] table with type = \"kafka\" or \"file\")",
                );
                None
            }
        };

        let mut decode = root
            .table(e, "decode")
            .unwrap_or_else(|| Obj::new("decode", Default::default()));
        let defaults = DecoderConfig::default();
        let format = match decode.string(e, "format") {
            None => defaults.format,
            Some(f) => Format::parse(&f).unwrap_or_else(|| {
                e.push(
                    &decode.path_of("format"),
                    format!("unknown format {f:?} (expected one of: {})", Format::NAMES),
                );
                defaults.format
            }),
        };
        let max_record_bytes =
            decode.size(e, "max_record_bytes", defaults.max_record_bytes as u64) as usize;
        let max_field_bytes =
            decode.size(e, "max_field_bytes", defaults.max_field_bytes as u64) as usize;
        decode.finish(e);

        let mut rejects = root
            .table(e, "rejects")
            .unwrap_or_else(|| Obj::new("rejects", Default::default()));
        let max_raw_bytes = rejects.size(e, "max_raw_bytes", 64 << 10) as usize;
        rejects.finish(e);

        let mut sink = root
            .table(e, "sink")
            .unwrap_or_else(|| Obj::new("sink", Default::default()));
        let d = SinkConfig::default();
        let sink_cfg = SinkConfig {
            roll_size: sink.size(e, "roll_size", d.roll_size),
            roll_interval: sink.duration(e, "roll_interval", d.roll_interval),
            max_buffered: sink.size(e, "max_buffered", d.max_buffered),
            queue_depth: sink
                .integer(e, "queue_depth", 1, 1024)
                .map_or(d.queue_depth, |v| v as usize),
            zstd_level: sink
                .integer(e, "zstd_level", 1, 22)
                .map_or(d.zstd_level, |v| v as i32),
            row_group_rows: sink
                .integer(e, "row_group_rows", 1024, 16 << 20)
                .map_or(d.row_group_rows, |v| v as usize),
            debug_commit_delay: sink.duration(e, "debug_commit_delay", d.debug_commit_delay),
        };
        if sink_cfg.roll_size == 0 {
            e.push("sink.roll_size", "must be greater than 0");
        }
        if sink_cfg.roll_interval.is_zero() {
            e.push("sink.roll_interval", "must be greater than 0");
        }
        sink.finish(e);
        let metrics = read_metrics(&mut root, e);
        let telemetry = read_telemetry(&mut root, e);
        let alerting = read_alerting(&mut root, e);
        let drift = read_drift(&mut root, e, &metrics);
        let quality = crate::quality::config::read_quality(&mut root, base, e);
        let harvest = crate::harvest::read_harvest(&mut root, e);
        let experiments = crate::experiment::config::read_experiments(&mut root, e);
        for (i, x) in experiments.experiments.iter().enumerate() {
            for (j, m) in x.metrics.iter().enumerate() {
                if let Some(s) = m.value.scorer()
                    && !quality.scorers.iter().any(|d| d.name == s)
                {
                    e.push(
                        &format!("experiment[{i}].metric[{j}].value"),
                        format!("{s:?} is not a configured scorer (add a [[quality.scorer]] named {s:?})"),
                    );
                }
            }
        }
        root.finish(e);

        Some(PipelineConfig {
            name,
            data_root,
            source: source?,
            decode: DecoderConfig {
                format,
                max_record_bytes,
                max_field_bytes,
            },
            rejects: RejectsConfig { max_raw_bytes },
            sink: sink_cfg,
            metrics,
            telemetry,
            alerting,
            drift,
            quality,
            harvest,
            experiments,
        })
    }

    /// A Kafka pipeline with default decode, rejects and sink settings, for programs that
    /// build their config in code (benches, embedding telltale).
    pub fn kafka(
        brokers: &str,
        topic: &str,
        group_id: &str,
        data_root: impl Into<PathBuf>,
        sink: SinkConfig,
    ) -> PipelineConfig {
        PipelineConfig {
            name: group_id.to_owned(),
            data_root: data_root.into(),
            source: SourceConfig::Kafka(KafkaSourceConfig {
                brokers: brokers.to_owned(),
                topics: vec![topic.to_owned()],
                group_id: group_id.to_owned(),
                start_from: "earliest".to_owned(),
                properties: BTreeMap::new(),
            }),
            decode: DecoderConfig::default(),
            rejects: RejectsConfig {
                max_raw_bytes: 64 << 10,
            },
            sink,
            metrics: MetricsConfig::default(),
            telemetry: TelemetryConfig { listen: None },
            alerting: AlertingConfig::default(),
            drift: DriftConfig::default(),
            quality: crate::quality::QualityConfig::default(),
            harvest: crate::harvest::HarvestConfig::default(),
            experiments: crate::experiment::ExperimentsConfig::default(),
        }
    }

    /// Replaces the source with a file source (`telltale run --source file:…`).
    pub fn with_file_source(mut self, path: &str) -> PipelineConfig {
        self.source = SourceConfig::File(FileSourceConfig {
            path: path.to_owned(),
        });
        self
    }
}

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The sentence-model embedder, with an error at `path` when its files are not installed
/// (`alternative`: what else the key can say).
pub(crate) fn sentence_embedder(e: &mut Errors, path: &str, alternative: &str) -> EmbedderKind {
    let dir = crate::drift::sentence::models_dir();
    if !crate::drift::sentence::available(&dir) {
        e.push(
            path,
            format!(
                "the fastembed model files are not in {} (run `bash scripts/models.sh`, {alternative})",
                dir.display()
            ),
        );
    }
    EmbedderKind::Sentence { dir, threads: 1 }
}

/// The static (model2vec) embedder, with an error at `path` when it is not installed.
pub(crate) fn static_embedder(e: &mut Errors, path: &str) -> EmbedderKind {
    let dir = crate::drift::sentence::models_dir();
    if !crate::drift::static_model::available(&dir) {
        e.push(
            path,
            format!(
                "no static model in {} (run `bash scripts/models.sh`, then `telltale models distill`; or use \"auto\" to fall back to \"hash\")",
                crate::drift::static_model::static_dir(&dir).display()
            ),
        );
    }
    EmbedderKind::Static { dir }
}

fn read_drift(root: &mut Obj, e: &mut Errors, metrics: &MetricsConfig) -> DriftConfig {
    let d = DriftConfig::default();
    let mut cfg = d.clone();
    let Some(mut t) = root.table(e, "drift") else {
        return cfg;
    };
    let dur = |v: i64| std::time::Duration::from_millis(v as u64);
    cfg.enabled = t.boolean(e, "enabled").unwrap_or(d.enabled);
    cfg.window_ms = ms(t.duration(e, "window", dur(d.window_ms)));
    if cfg.window_ms % metrics.window.size_ms != 0 || cfg.window_ms < metrics.window.size_ms {
        e.push(
            &t.path_of("window"),
            format!(
                "must be a multiple of metrics.window ({})",
                crate::metrics::resolution_name(metrics.window.size_ms)
            ),
        );
    }
    let usize_of = |t: &mut Obj, e: &mut Errors, key, min, max, dflt: usize| {
        t.integer(e, key, min, max).map_or(dflt, |v| v as usize)
    };
    cfg.samples_per_window = usize_of(
        &mut t,
        e,
        "samples_per_window",
        2,
        4096,
        d.samples_per_window,
    );
    cfg.max_text_chars = usize_of(&mut t, e, "max_text_chars", 16, 100_000, d.max_text_chars);
    match t.string_or(e, "embedder", "auto").as_str() {
        "auto" => cfg.embedder = EmbedderKind::auto(),
        "hash" => cfg.embedder = EmbedderKind::Hash { dim: 256 },
        "fastembed" => {
            cfg.embedder = sentence_embedder(
                e,
                &t.path_of("embedder"),
                "or use \"auto\" to fall back to \"hash\"",
            )
        }
        "static" => cfg.embedder = static_embedder(e, &t.path_of("embedder")),
        other => e.push(
            &t.path_of("embedder"),
            format!("{other:?} is not an embedder (expected \"auto\", \"fastembed\", \"static\" or \"hash\")"),
        ),
    }
    cfg.budget_texts_per_s = t
        .float(e, "budget_texts_per_s", 0.01, 1e9)
        .unwrap_or(cfg.embedder.default_budget());
    cfg.test_budget = t
        .float(e, "test_budget", 0.001, 1.0)
        .unwrap_or(d.test_budget);
    cfg.reference_ms = ms(t.duration(e, "reference", dur(d.reference_ms)));
    if cfg.reference_ms < cfg.window_ms {
        e.push(&t.path_of("reference"), "must be at least one drift window");
    }
    cfg.reference_size = usize_of(&mut t, e, "reference_size", 10, 100_000, d.reference_size);
    cfg.min_samples = usize_of(&mut t, e, "min_samples", 2, 100_000, d.min_samples);
    cfg.min_reference = usize_of(&mut t, e, "min_reference", 2, 100_000, d.min_reference);
    cfg.false_alarm_rate = t
        .float(e, "false_alarm_rate", 1e-6, 0.5)
        .unwrap_or(d.false_alarm_rate);
    cfg.pca_dims = usize_of(&mut t, e, "pca_dims", 2, 256, d.pca_dims);
    cfg.null_draws = usize_of(&mut t, e, "null_draws", 20, 100_000, d.null_draws);
    cfg.calibration_windows = usize_of(
        &mut t,
        e,
        "calibration_windows",
        3,
        10_000,
        d.calibration_windows,
    );
    cfg.persistence = usize_of(&mut t, e, "persistence", 1, 12, d.persistence);
    cfg.persistence_sigma = t
        .float(e, "persistence_sigma", 0.5, 1000.0)
        .unwrap_or(d.persistence_sigma);
    cfg.instant_sigma = t
        .float(e, "instant_sigma", 0.5, 1e9)
        .unwrap_or(d.instant_sigma);
    cfg.sigma = t.float(e, "sigma", 0.5, 20.0).unwrap_or(d.sigma);
    cfg.scalar_min_events = t
        .integer(e, "scalar_min_events", 1, i64::MAX)
        .map_or(d.scalar_min_events, |v| v as u64);
    if cfg.min_reference > cfg.reference_size {
        e.push(
            &t.path_of("min_reference"),
            format!("cannot exceed reference_size ({})", cfg.reference_size),
        );
    }
    t.finish(e);
    cfg
}

fn read_metrics(root: &mut Obj, e: &mut Errors) -> MetricsConfig {
    let d = MetricsConfig::default();
    let mut cfg = d.clone();
    if let Some(mut m) = root.table(e, "metrics") {
        cfg.enabled = m.boolean(e, "enabled").unwrap_or(d.enabled);
        if let Some(dims) = m.string_list(e, "dimensions") {
            let path = m.path_of("dimensions");
            let mut parsed = Vec::new();
            for (i, name) in dims.iter().enumerate() {
                match Dimension::parse(name) {
                    Ok(dim) if parsed.contains(&dim) => {
                        e.push(&format!("{path}[{i}]"), format!("{name:?} is listed twice"))
                    }
                    Ok(dim) => parsed.push(dim),
                    Err(msg) => e.push(&format!("{path}[{i}]"), msg),
                }
            }
            if dims.is_empty() {
                e.push(&path, "needs at least one dimension");
            }
            cfg.window.dimensions = parsed;
        }
        let w = &d.window;
        let dur = |v: i64| std::time::Duration::from_millis(v as u64);
        cfg.window.size_ms = ms(m.duration(e, "window", dur(w.size_ms)));
        cfg.window.rollup_ms = ms(m.duration(e, "rollup", dur(w.rollup_ms)));
        cfg.window.lateness_ms = ms(m.duration(e, "allowed_lateness", dur(w.lateness_ms)));
        cfg.window.max_series = m
            .integer(e, "max_series", 1, 10_000_000)
            .map_or(w.max_series, |v| v as usize);
        cfg.exported_series = m
            .integer(e, "exported_series", 0, 10_000)
            .map_or(d.exported_series, |v| v as usize);
        if cfg.window.size_ms < 1000 {
            e.push(&m.path_of("window"), "must be at least 1s");
        } else if cfg.window.rollup_ms % cfg.window.size_ms != 0
            || cfg.window.rollup_ms <= cfg.window.size_ms
        {
            e.push(
                &m.path_of("rollup"),
                "must be a multiple of metrics.window, and longer",
            );
        }
        m.finish(e);
    }
    if let Some(mut c) = root.table(e, "cost") {
        cfg.prices = c.string(e, "price_table").map(PathBuf::from);
        if let Some(mut models) = c.table(e, "models") {
            for (name, mut t) in models.named_tables(e) {
                let base = read_rates(&mut t, e);
                let mut tiers = Vec::new();
                for mut tier in t.tables(e, "tiers") {
                    let above = tier.integer(e, "above_input_tokens", 0, i64::MAX);
                    if above.is_none() && !tier.has("above_input_tokens") {
                        e.push(&tier.path_of("above_input_tokens"), "is required in a tier");
                    }
                    let rates = read_rates(&mut tier, e);
                    tier.finish(e);
                    if let Some(a) = above {
                        tiers.push((a as u64, rates));
                    }
                }
                t.finish(e);
                tiers.sort_by_key(|(a, _)| *a);
                cfg.price_overrides.insert(name, Price { base, tiers });
            }
            models.finish(e);
        }
        c.finish(e);
    }
    cfg
}

/// Rates given per million tokens in the file, kept per token.
fn read_rates(t: &mut Obj, e: &mut Errors) -> Rates {
    let mut per = |key: &'static str| t.non_negative(e, key).map(|v| v / 1e6);
    Rates {
        input: per("input_per_mtok"),
        output: per("output_per_mtok"),
        cache_read: per("cache_read_per_mtok"),
        cache_write: per("cache_write_per_mtok"),
        reasoning: per("reasoning_per_mtok"),
    }
}

fn read_telemetry(root: &mut Obj, e: &mut Errors) -> TelemetryConfig {
    let mut cfg = TelemetryConfig::default();
    if let Some(mut t) = root.table(e, "telemetry") {
        if let Some(listen) = t.string(e, "listen") {
            cfg.listen = match listen.trim() {
                "" | "off" => None,
                addr => match addr.parse::<std::net::SocketAddr>() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        e.push(
                            &t.path_of("listen"),
                            format!("{addr:?} is not an address (expected e.g. \"127.0.0.1:9464\", or \"off\")"),
                        );
                        None
                    }
                },
            };
        }
        t.finish(e);
    }
    cfg
}

fn read_route(r: &mut Obj, e: &mut Errors, base: &Route) -> Route {
    let dur = |v: i64| Duration::from_millis(v as u64);
    let matchers = r.string_list(e, "matchers").unwrap_or_default();
    Route {
        matchers: crate::alert::rule::parse_matchers(&matchers, &r.path_of("matchers"), e),
        receivers: r
            .string_list(e, "notify")
            .unwrap_or_else(|| base.receivers.clone()),
        group_by: r
            .string_list(e, "group_by")
            .unwrap_or_else(|| base.group_by.clone()),
        group_wait_ms: ms(r.duration(e, "group_wait", dur(base.group_wait_ms))),
        group_interval_ms: ms(r.duration(e, "group_interval", dur(base.group_interval_ms))),
        repeat_interval_ms: ms(r.duration(e, "repeat_interval", dur(base.repeat_interval_ms))),
        continue_matching: false,
    }
}

const RECEIVER_TYPES: &str = "email, webhook, slack, pagerduty, alertmanager, log";

fn read_receiver(t: &mut Obj, e: &mut Errors) -> Option<ReceiverConfig> {
    let kind = t.required_string(e, "type", RECEIVER_TYPES);
    let url = |t: &mut Obj, e: &mut Errors| {
        let u = t.required_string(e, "url", "e.g. \"https://hooks.example.com/telltale\"");
        if let Some(u) = &u
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            e.push(&t.path_of("url"), format!("{u:?} is not an http(s) URL"));
        }
        u
    };
    let r = match kind.as_deref()? {
        "email" => {
            let from = t.required_string(e, "from", "e.g. \"telltale@example.com\"");
            let to = t.string_list(e, "to").unwrap_or_default();
            if to.is_empty() {
                e.push(&t.path_of("to"), "needs at least one address");
            }
            let smtp = t.string(e, "smtp");
            let dir = t.string(e, "dir");
            let tls = match t.string_or(e, "tls", "starttls").as_str() {
                "starttls" => SmtpTls::StartTls,
                "tls" => SmtpTls::Tls,
                "none" => SmtpTls::None,
                other => {
                    e.push(
                        &t.path_of("tls"),
                        format!("{other:?} is not one of starttls, tls, none"),
                    );
                    SmtpTls::StartTls
                }
            };
            let username = t.string(e, "username").filter(|s| !s.is_empty());
            let password = t.string(e, "password").filter(|s| !s.is_empty());
            let accept_invalid_certs = t.boolean(e, "accept_invalid_certs").unwrap_or(false);
            let transport = match (smtp, dir) {
                (Some(_), Some(_)) | (None, None) => {
                    e.push(
                        &t.path_of("smtp"),
                        "set exactly one of `smtp` (\"host:port\") or `dir` (a directory for .eml files)",
                    );
                    None
                }
                (None, Some(d)) => Some(EmailTransport::Dir(PathBuf::from(d))),
                (Some(hp), None) => {
                    let default_port = if tls == SmtpTls::Tls { 465 } else { 587 };
                    let (host, port) = match hp.rsplit_once(':') {
                        Some((h, p)) => (h.to_owned(), p.parse::<u16>().ok()),
                        None => (hp.clone(), Some(default_port)),
                    };
                    if port.is_none() || host.is_empty() {
                        e.push(
                            &t.path_of("smtp"),
                            format!("{hp:?} is not host:port (e.g. \"smtp.example.com:587\")"),
                        );
                    }
                    if username.is_some() != password.is_some() {
                        e.push(&t.path_of("password"), "username and password go together (use \"${SMTP_PASSWORD}\" to keep it out of the file)");
                    }
                    Some(EmailTransport::Smtp {
                        host,
                        port: port.unwrap_or(default_port),
                        tls,
                        username,
                        password,
                        accept_invalid_certs,
                    })
                }
            };
            ReceiverConfig::Email {
                transport: transport?,
                from: from?,
                to,
            }
        }
        "webhook" => ReceiverConfig::Webhook {
            url: url(t, e)?,
            secret: t.string(e, "secret").filter(|s| !s.is_empty()),
        },
        "slack" => ReceiverConfig::Slack { url: url(t, e)? },
        "pagerduty" => {
            let key = t.required_string(
                e,
                "routing_key",
                "the integration key, e.g. \"${PAGERDUTY_ROUTING_KEY}\"",
            );
            let u = t.string_or(e, "url", PAGERDUTY_EVENTS_URL);
            ReceiverConfig::PagerDuty {
                url: u,
                routing_key: key?,
            }
        }
        "alertmanager" => ReceiverConfig::Alertmanager { url: url(t, e)? },
        "log" => ReceiverConfig::Log,
        other => {
            e.push(
                &t.path_of("type"),
                format!("{other:?} is not a receiver type (expected one of {RECEIVER_TYPES})"),
            );
            t.discard(&[
                "url",
                "secret",
                "smtp",
                "dir",
                "tls",
                "from",
                "to",
                "username",
                "password",
                "routing_key",
                "accept_invalid_certs",
            ]);
            return None;
        }
    };
    Some(r)
}

fn read_alerting(root: &mut Obj, e: &mut Errors) -> AlertingConfig {
    let mut cfg = AlertingConfig::default();
    let Some(mut a) = root.table(e, "alerting") else {
        return cfg;
    };
    cfg.enabled = a.boolean(e, "enabled").unwrap_or(true);
    if let Some(r) = a.string(e, "rules") {
        cfg.rules = RulesFrom::Dir(PathBuf::from(r));
    }
    cfg.clock = match a.string_or(e, "clock", "wall").as_str() {
        "wall" => Clock::Wall,
        "event" => Clock::Event,
        other => {
            e.push(
                &a.path_of("clock"),
                format!("{other:?} is not a clock (expected \"wall\" or \"event\")"),
            );
            Clock::Wall
        }
    };
    let base = cfg.default_route.clone();
    cfg.default_route = read_route(&mut a, e, &base);
    cfg.default_route.matchers.clear();
    cfg.send_resolved = a.boolean(e, "send_resolved").unwrap_or(true);
    cfg.known_good_after_ms = ms(a.duration(
        e,
        "known_good_after",
        Duration::from_millis(cfg.known_good_after_ms as u64),
    ));
    cfg.deadline = a.duration(e, "notify_deadline", cfg.deadline);
    cfg.external_url = a.string_or(e, "external_url", "");
    for mut r in a.tables(e, "routes") {
        let mut route = read_route(&mut r, e, &cfg.default_route);
        route.continue_matching = r.boolean(e, "continue").unwrap_or(false);
        if route.matchers.is_empty() {
            e.push(&r.path_of("matchers"), "a route needs matchers (e.g. ['severity=\"critical\"']); unmatched alerts go to alerting.notify");
        }
        r.finish(e);
        cfg.routes.push(route);
    }
    if let Some(mut recv) = a.table(e, "receivers") {
        for (name, mut t) in recv.named_tables(e) {
            if let Some(r) = read_receiver(&mut t, e) {
                cfg.receivers.insert(name, r);
            }
            t.finish(e);
        }
        recv.finish(e);
    }
    let mut check = |path: String, names: &[String]| {
        for n in names {
            if !cfg.receivers.contains_key(n) {
                let known: Vec<&str> = cfg.receivers.keys().map(String::as_str).collect();
                e.push(
                    &path,
                    format!(
                        "no receiver named {n:?} (defined: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
    };
    check(a.path_of("notify"), &cfg.default_route.receivers);
    for (i, r) in cfg.routes.iter().enumerate() {
        check(format!("{}[{i}].notify", a.path_of("routes")), &r.receivers);
    }
    a.finish(e);
    cfg
}

const KAFKA_KEYS: &[&str] = &["brokers", "topics", "group_id", "start_from", "properties"];
const FILE_KEYS: &[&str] = &["path"];

fn read_source(mut s: Obj, e: &mut Errors) -> Option<SourceConfig> {
    let kind = s.string(e, "type");
    let src = match kind.as_deref() {
        Some("kafka") => {
            let brokers = s.required_string(e, "brokers", "e.g. \"kafka-1:9092,kafka-2:9092\"");
            let topics = s.string_list(e, "topics");
            if topics.as_ref().is_none_or(|t| t.is_empty()) {
                e.push(
                    &s.path_of("topics"),
                    "at least one topic is required (e.g. topics = [\"llm-events\"])",
                );
            }
            let group_id = s.string_or(e, "group_id", "telltale");
            let start_from = s.string_or(e, "start_from", "earliest");
            if !["earliest", "latest"].contains(&start_from.as_str()) {
                e.push(
                    &s.path_of("start_from"),
                    format!("{start_from:?} is not one of: earliest, latest"),
                );
            }
            let properties = s.string_map(e, "properties");
            for (key, why) in RESERVED_PROPERTIES {
                if properties.contains_key(*key) {
                    e.push(
                        &format!("{}.{key}", s.path_of("properties")),
                        format!("cannot be set here: {why}"),
                    );
                }
            }
            Some(SourceConfig::Kafka(KafkaSourceConfig {
                brokers: brokers.unwrap_or_default(),
                topics: topics.unwrap_or_default(),
                group_id,
                start_from,
                properties,
            }))
        }
        Some("file") => {
            let path = s.required_string(
                e,
                "path",
                "a path, a glob such as \"logs/*.jsonl.gz\", or \"-\" for stdin",
            );
            Some(SourceConfig::File(FileSourceConfig {
                path: path.unwrap_or_default(),
            }))
        }
        Some(other) => {
            e.push(
                &s.path_of("type"),
                format!("unknown source type {other:?} (expected \"kafka\" or \"file\")"),
            );
            // Without a known type the other keys cannot be checked; one error is enough.
            s.discard(KAFKA_KEYS);
            s.discard(FILE_KEYS);
            None
        }
        None => {
            e.push(&s.path_of("type"), "is required (\"kafka\" or \"file\")");
            // Without a known type the other keys cannot be checked; one error is enough.
            s.discard(KAFKA_KEYS);
            s.discard(FILE_KEYS);
            None
        }
    };
    s.finish(e);
    src
}

#[cfg(test)]
mod tests;
