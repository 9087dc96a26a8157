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

use crate::decode::{DecoderConfig, Format};
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
    pub fn load(path: &Path) -> Result<PipelineConfig, ConfigLoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Io {
            file: file.clone(),
            source,
        })?;
        Self::from_str_with_env(&text, &file, &|k| std::env::var(k).ok())
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
        let cfg = Self::read(Obj::new("", table), &mut e);
        if e.0.is_empty() {
            Ok(cfg.expect("a config is built whenever no error was recorded"))
        } else {
            Err(ConfigLoadError::Invalid {
                file: file.to_owned(),
                errors: e.0,
            })
        }
    }

    fn read(mut root: Obj, e: &mut Errors) -> Option<PipelineConfig> {
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
