//! The canonical record, [`LlmEvent`], and its columnar form.
//!
//! Every decoder produces an `LlmEvent`; every stage after decode reads the Arrow
//! [`RecordBatch`] that [`EventBatchBuilder`] makes of them. Field names follow the
//! OpenTelemetry GenAI semantic conventions where one exists (see `schemas/llm_event.v1.schema.json`
//! and the README for the mapping).
//!
//! Text fields are `Cow<'a, str>` so that a decoder can hand out slices of the Kafka payload
//! without copying: serde borrows a JSON string when it has no escapes. An owned event is
//! `LlmEvent<'static>`.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, Int64Builder, MapBuilder, MapFieldNames, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Version of the event schema written into Parquet metadata and `schemas/`.
pub const EVENT_SCHEMA_VERSION: &str = "1";

/// One LLM call (or a feedback record about one), in telltale's canonical shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmEvent<'a> {
    pub event_id: Cow<'a, str>,
    /// Event time (request start), milliseconds since the Unix epoch, UTC.
    pub timestamp_ms: i64,
    pub app: Option<Cow<'a, str>>,
    pub environment: Option<Cow<'a, str>>,
    pub operation: Option<Cow<'a, str>>,
    pub provider: Option<Cow<'a, str>>,
    pub model: Option<Cow<'a, str>>,
    pub response_model: Option<Cow<'a, str>>,
    pub prompt_id: Option<Cow<'a, str>>,
    pub prompt_version: Option<Cow<'a, str>>,
    pub variant: Option<Cow<'a, str>>,
    pub experiment: Option<Cow<'a, str>>,
    /// The user's text: the prompt, or the last user message of a chat.
    pub input: Option<Cow<'a, str>>,
    /// The whole message list as JSON, when the request was a chat.
    pub input_messages: Option<Cow<'a, str>>,
    pub output: Option<Cow<'a, str>>,
    pub system: Option<Cow<'a, str>>,
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cache_read_tokens: Option<i64>,
    pub cache_write_tokens: Option<i64>,
    pub reasoning_tokens: Option<i64>,
    pub cost_usd: Option<f64>,
    /// Where `cost_usd` came from: `reported` (the record), `computed` (the price table),
    /// `unknown` (tokens but no price); set by the pipeline, not read from records.
    pub cost_source: Option<&'static str>,
    pub finish_reason: Option<Cow<'a, str>>,
    pub error_type: Option<Cow<'a, str>>,
    /// `ok` or `error`.
    pub status: Cow<'a, str>,
    pub session_id: Option<Cow<'a, str>>,
    pub user_id: Option<Cow<'a, str>>,
    /// User feedback as a number (thumbs up = 1, thumbs down = 0, or the app's own score).
    pub feedback: Option<f64>,
    /// Set on a feedback record: the `event_id` the feedback is about.
    pub feedback_for: Option<Cow<'a, str>>,
    pub expected: Option<Cow<'a, str>>,
    pub attributes: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl LlmEvent<'_> {
    /// Detaches the event from the buffer it was decoded from.
    pub fn into_owned(self) -> LlmEvent<'static> {
        fn o(c: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(c.into_owned())
        }
        fn oo(c: Option<Cow<'_, str>>) -> Option<Cow<'static, str>> {
            c.map(o)
        }
        LlmEvent {
            event_id: o(self.event_id),
            timestamp_ms: self.timestamp_ms,
            app: oo(self.app),
            environment: oo(self.environment),
            operation: oo(self.operation),
            provider: oo(self.provider),
            model: oo(self.model),
            response_model: oo(self.response_model),
            prompt_id: oo(self.prompt_id),
            prompt_version: oo(self.prompt_version),
            variant: oo(self.variant),
            experiment: oo(self.experiment),
            input: oo(self.input),
            input_messages: oo(self.input_messages),
            output: oo(self.output),
            system: oo(self.system),
            latency_ms: self.latency_ms,
            ttft_ms: self.ttft_ms,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_write_tokens: self.cache_write_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cost_usd: self.cost_usd,
            cost_source: self.cost_source,
            finish_reason: oo(self.finish_reason),
            error_type: oo(self.error_type),
            status: o(self.status),
            session_id: oo(self.session_id),
            user_id: oo(self.user_id),
            feedback: self.feedback,
            feedback_for: oo(self.feedback_for),
            expected: oo(self.expected),
            attributes: self
                .attributes
                .into_iter()
                .map(|(k, v)| (o(k), o(v)))
                .collect(),
        }
    }

    /// The text fields with their names, for size checks and tests.
    pub fn text_fields(&self) -> [(&'static str, Option<&str>); 19] {
        [
            ("event_id", Some(&self.event_id)),
            ("app", self.app.as_deref()),
            ("environment", self.environment.as_deref()),
            ("operation", self.operation.as_deref()),
            ("provider", self.provider.as_deref()),
            ("model", self.model.as_deref()),
            ("response_model", self.response_model.as_deref()),
            ("prompt_id", self.prompt_id.as_deref()),
            ("prompt_version", self.prompt_version.as_deref()),
            ("variant", self.variant.as_deref()),
            ("experiment", self.experiment.as_deref()),
            ("input", self.input.as_deref()),
            ("input_messages", self.input_messages.as_deref()),
            ("output", self.output.as_deref()),
            ("system", self.system.as_deref()),
            ("finish_reason", self.finish_reason.as_deref()),
            ("error_type", self.error_type.as_deref()),
            ("session_id", self.session_id.as_deref()),
            ("expected", self.expected.as_deref()),
        ]
    }
}

/// One record from a source, borrowed from the source's buffer: a Kafka message, or a line of
/// a file (topic = the file's source name, offset = line index).
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Broker (or file) timestamp in epoch milliseconds.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

/// Where a record came from: Kafka coordinates, or a file source's name and line index.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    pub format: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

/// A string-keyed map column: the layout `MapBuilder` produces with the field names
/// `entries`/`keys`/`values`, so built batches match the schema.
pub fn map_type(values: DataType) -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(
                vec![
                    Field::new("keys", DataType::Utf8, false),
                    Field::new("values", values, true),
                ]
                .into(),
            ),
            false,
        )),
        false,
    )
}

fn attributes_type() -> DataType {
    map_type(DataType::Utf8)
}

static EVENT_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let f64f = |n: &str| Field::new(n, DataType::Float64, true);
    let i64f = |n: &str| Field::new(n, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("timestamp", ts, false),
        utf8("app"),
        utf8("environment"),
        utf8("operation"),
        utf8("provider"),
        utf8("model"),
        utf8("response_model"),
        utf8("prompt_id"),
        utf8("prompt_version"),
        utf8("variant"),
        utf8("experiment"),
        utf8("input"),
        utf8("input_messages"),
        utf8("output"),
        utf8("system"),
        f64f("latency_ms"),
        f64f("ttft_ms"),
        i64f("input_tokens"),
        i64f("output_tokens"),
        i64f("cache_read_tokens"),
        i64f("cache_write_tokens"),
        i64f("reasoning_tokens"),
        f64f("cost_usd"),
        utf8("cost_source"),
        utf8("finish_reason"),
        utf8("error_type"),
        Field::new("status", DataType::Utf8, false),
        utf8("session_id"),
        utf8("user_id"),
        f64f("feedback"),
        utf8("feedback_for"),
        utf8("expected"),
        Field::new("attributes", attributes_type(), true),
        Field::new("source_format", DataType::Utf8, false),
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
    ]))
});

/// The Arrow schema of the `events` table (without the Hive partition columns `date`, `hour`).
pub fn event_schema() -> SchemaRef {
    EVENT_SCHEMA.clone()
}

/// Columns holding long, mostly unique text: dictionary encoding only costs time on them.
pub const EVENT_TEXT_COLUMNS: &[&str] = &[
    "event_id",
    "input",
    "input_messages",
    "output",
    "system",
    "expected",
    "session_id",
];

/// Columns with few distinct values: dictionary + RLE already shrinks them to a few bytes per
/// page, so compressing them saves next to nothing, while the Parquet writer pays for two zstd
/// contexts per compressed column chunk (that cost dominates small files).
pub const EVENT_LOW_CARDINALITY_COLUMNS: &[&str] = &[
    "app",
    "environment",
    "operation",
    "provider",
    "model",
    "response_model",
    "prompt_id",
    "prompt_version",
    "variant",
    "experiment",
    "finish_reason",
    "error_type",
    "status",
    "cost_source",
    "source_format",
    "source_topic",
    "source_partition",
];

/// Accumulates events into Arrow column builders.
pub struct EventBatchBuilder {
    event_id: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    dims: [StringBuilder; 10],
    texts: [StringBuilder; 4],
    latency_ms: Float64Builder,
    ttft_ms: Float64Builder,
    tokens: [Int64Builder; 5],
    cost_usd: Float64Builder,
    cost_source: StringBuilder,
    finish_reason: StringBuilder,
    error_type: StringBuilder,
    status: StringBuilder,
    session_id: StringBuilder,
    user_id: StringBuilder,
    feedback: Float64Builder,
    feedback_for: StringBuilder,
    expected: StringBuilder,
    attributes: MapBuilder<StringBuilder, StringBuilder>,
    source_format: StringBuilder,
    source_topic: StringBuilder,
    source_partition: Int32Builder,
    source_offset: Int64Builder,
    len: usize,
}

impl Default for EventBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBatchBuilder {
    pub fn new() -> Self {
        let names = MapFieldNames {
            entry: "entries".into(),
            key: "keys".into(),
            value: "values".into(),
        };
        Self {
            event_id: StringBuilder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            dims: std::array::from_fn(|_| StringBuilder::new()),
            texts: std::array::from_fn(|_| StringBuilder::new()),
            latency_ms: Float64Builder::new(),
            ttft_ms: Float64Builder::new(),
            tokens: std::array::from_fn(|_| Int64Builder::new()),
            cost_usd: Float64Builder::new(),
            cost_source: StringBuilder::new(),
            finish_reason: StringBuilder::new(),
            error_type: StringBuilder::new(),
            status: StringBuilder::new(),
            session_id: StringBuilder::new(),
            user_id: StringBuilder::new(),
            feedback: Float64Builder::new(),
            feedback_for: StringBuilder::new(),
            expected: StringBuilder::new(),
            attributes: MapBuilder::new(Some(names), StringBuilder::new(), StringBuilder::new()),
            source_format: StringBuilder::new(),
            source_topic: StringBuilder::new(),
            source_partition: Int32Builder::new(),
            source_offset: Int64Builder::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn append(&mut self, e: &LlmEvent<'_>, src: &Provenance<'_>) {
        self.event_id.append_value(&e.event_id);
        self.timestamp.append_value(e.timestamp_ms);
        let dims = [
            &e.app,
            &e.environment,
            &e.operation,
            &e.provider,
            &e.model,
            &e.response_model,
            &e.prompt_id,
            &e.prompt_version,
            &e.variant,
            &e.experiment,
        ];
        for (b, v) in self.dims.iter_mut().zip(dims) {
            b.append_option(v.as_deref());
        }
        let texts = [&e.input, &e.input_messages, &e.output, &e.system];
        for (b, v) in self.texts.iter_mut().zip(texts) {
            b.append_option(v.as_deref());
        }
        self.latency_ms.append_option(e.latency_ms);
        self.ttft_ms.append_option(e.ttft_ms);
        let tokens = [
            e.input_tokens,
            e.output_tokens,
            e.cache_read_tokens,
            e.cache_write_tokens,
            e.reasoning_tokens,
        ];
        for (b, v) in self.tokens.iter_mut().zip(tokens) {
            b.append_option(v);
        }
        self.cost_usd.append_option(e.cost_usd);
        self.cost_source.append_option(e.cost_source);
        self.finish_reason.append_option(e.finish_reason.as_deref());
        self.error_type.append_option(e.error_type.as_deref());
        self.status.append_value(&e.status);
        self.session_id.append_option(e.session_id.as_deref());
        self.user_id.append_option(e.user_id.as_deref());
        self.feedback.append_option(e.feedback);
        self.feedback_for.append_option(e.feedback_for.as_deref());
        self.expected.append_option(e.expected.as_deref());
        if e.attributes.is_empty() {
            self.attributes
                .append(false)
                .expect("map builder keys and values stay aligned");
        } else {
            for (k, v) in &e.attributes {
                self.attributes.keys().append_value(k);
                self.attributes.values().append_value(v);
            }
            self.attributes
                .append(true)
                .expect("map builder keys and values stay aligned");
        }
        self.source_format.append_value(src.format);
        self.source_topic.append_value(src.topic);
        self.source_partition.append_value(src.partition);
        self.source_offset.append_value(src.offset);
        self.len += 1;
    }

    /// Takes the accumulated rows as a batch and leaves the builder empty.
    pub fn finish(&mut self) -> RecordBatch {
        let [
            app,
            environment,
            operation,
            provider,
            model,
            response_model,
            prompt_id,
            prompt_version,
            variant,
            experiment,
        ] = &mut self.dims;
        let [input, input_messages, output, system] = &mut self.texts;
        let [it, ot, crt, cwt, rt] = &mut self.tokens;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(app.finish()),
            Arc::new(environment.finish()),
            Arc::new(operation.finish()),
            Arc::new(provider.finish()),
            Arc::new(model.finish()),
            Arc::new(response_model.finish()),
            Arc::new(prompt_id.finish()),
            Arc::new(prompt_version.finish()),
            Arc::new(variant.finish()),
            Arc::new(experiment.finish()),
            Arc::new(input.finish()),
            Arc::new(input_messages.finish()),
            Arc::new(output.finish()),
            Arc::new(system.finish()),
            Arc::new(self.latency_ms.finish()),
            Arc::new(self.ttft_ms.finish()),
            Arc::new(it.finish()),
            Arc::new(ot.finish()),
            Arc::new(crt.finish()),
            Arc::new(cwt.finish()),
            Arc::new(rt.finish()),
            Arc::new(self.cost_usd.finish()),
            Arc::new(self.cost_source.finish()),
            Arc::new(self.finish_reason.finish()),
            Arc::new(self.error_type.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.feedback.finish()),
            Arc::new(self.feedback_for.finish()),
            Arc::new(self.expected.finish()),
            Arc::new(self.attributes.finish()),
            Arc::new(self.source_format.finish()),
            Arc::new(self.source_topic.finish()),
            Arc::new(self.source_partition.finish()),
            Arc::new(self.source_offset.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(event_schema(), columns)
            .expect("builder columns follow event_schema() in order and type")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};

    #[test]
    fn builder_output_matches_schema_and_values() {
        let mut b = EventBatchBuilder::new();
        let e = LlmEvent {
            event_id: "a".into(),
            timestamp_ms: 1_700_000_000_000,
            model: Some("gpt-4o".into()),
            status: "ok".into(),
            input_tokens: Some(12),
            attributes: vec![("region".into(), "eu".into())],
            ..Default::default()
        };
        let src = Provenance {
            format: "telltale",
            topic: "t",
            partition: 3,
            offset: 42,
        };
        b.append(&e, &src);
        b.append(
            &LlmEvent {
                event_id: "b".into(),
                status: "error".into(),
                ..Default::default()
            },
            &src,
        );
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), event_schema());
        let model = batch.column_by_name("model").unwrap().as_string::<i32>();
        assert_eq!(model.value(0), "gpt-4o");
        assert!(model.is_null(1));
        let attrs = batch.column_by_name("attributes").unwrap().as_map();
        assert_eq!(attrs.value(0).len(), 1);
        assert!(attrs.is_null(1));
        assert!(b.is_empty());
    }

    /// The published JSON Schema and the Parquet columns describe the same fields.
    #[test]
    fn json_schema_matches_columns() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/llm_event.v1.schema.json"
        );
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut documented: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        // Columns that telltale derives rather than reads.
        let derived = [
            "input_messages",
            "cost_source",
            "source_format",
            "source_topic",
            "source_partition",
            "source_offset",
        ];
        let schema_ref = event_schema();
        let mut columns: Vec<&str> = schema_ref
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| !derived.contains(n))
            .collect();
        columns.sort_unstable();
        assert_eq!(documented, columns);
        assert_eq!(
            schema["required"],
            serde_json::json!(["event_id", "timestamp"])
        );
    }
}
