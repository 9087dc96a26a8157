//! The `rejects` table: records that could not be decoded, with why and where they came from.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::decode::DecodeError;
use crate::event::SourceRecord;

static REJECT_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("reason", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new(
            "record_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("key", DataType::Binary, true),
        Field::new("raw", DataType::Binary, true),
        Field::new("raw_size", DataType::Int64, false),
        Field::new("raw_truncated", DataType::Boolean, false),
    ]))
});

/// The Arrow schema of the `rejects` table (without the Hive partition columns).
pub fn reject_schema() -> SchemaRef {
    REJECT_SCHEMA.clone()
}

pub struct RejectBatchBuilder {
    reason: StringBuilder,
    error: StringBuilder,
    format: StringBuilder,
    topic: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    timestamp: TimestampMillisecondBuilder,
    key: BinaryBuilder,
    raw: BinaryBuilder,
    raw_size: Int64Builder,
    raw_truncated: BooleanBuilder,
    max_raw_bytes: usize,
    len: usize,
}

impl RejectBatchBuilder {
    pub fn new(max_raw_bytes: usize) -> Self {
        RejectBatchBuilder {
            reason: StringBuilder::new(),
            error: StringBuilder::new(),
            format: StringBuilder::new(),
            topic: StringBuilder::new(),
            partition: Int32Builder::new(),
            offset: Int64Builder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            key: BinaryBuilder::new(),
            raw: BinaryBuilder::new(),
            raw_size: Int64Builder::new(),
            raw_truncated: BooleanBuilder::new(),
            max_raw_bytes,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn append(&mut self, rec: &SourceRecord<'_>, err: &DecodeError) {
        self.reason.append_value(err.reason.code());
        self.error.append_value(&err.message);
        self.format.append_value(err.format);
        self.topic.append_value(rec.topic);
        self.partition.append_value(rec.partition);
        self.offset.append_value(rec.offset);
        self.timestamp.append_option(rec.timestamp_ms);
        self.key
            .append_option(rec.key.map(|k| &k[..k.len().min(self.max_raw_bytes)]));
        let size = rec.payload.map_or(0, <[u8]>::len);
        self.raw
            .append_option(rec.payload.map(|p| &p[..size.min(self.max_raw_bytes)]));
        self.raw_size.append_value(size as i64);
        self.raw_truncated.append_value(size > self.max_raw_bytes);
        self.len += 1;
    }

    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.reason.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.format.finish()),
            Arc::new(self.topic.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.raw.finish()),
            Arc::new(self.raw_size.finish()),
            Arc::new(self.raw_truncated.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(reject_schema(), columns)
            .expect("builder columns follow reject_schema()")
    }
}
