//! bytes → [`LlmEvent`], for each accepted wire format.
//!
//! In: one record's payload (a Kafka message value or a line of a JSONL file) and, for formats
//! that lack an event time, the record's broker timestamp. Out: an event that borrows from the
//! payload where it can, or a [`DecodeError`] carrying a stable [`RejectReason`] code and a
//! message a human can act on. Decoding never panics and never stops the pipeline: the caller
//! writes the error to the `rejects` table with the record's coordinates and goes on.
//!
//! Accepted shapes (documented with examples in the README):
//! - `telltale`: the canonical event as JSON (`schemas/llm_event.v1.schema.json`).
//! - `openai`: `{"request": {...}, "response": {...}, "latency_ms": ..., "metadata": {...}}`,
//!   an OpenAI chat-completions (or completions) request and response as logging proxies write
//!   them; `response` may be an error object.
//! - `auto`: per record, `openai` when the object has a `request` or `response` key, else `telltale`.
//!   Both are read from one parse of the record.

mod envelope;
mod text;

#[cfg(test)]
mod tests;

use std::fmt;

use crate::event::LlmEvent;

pub use envelope::Envelope;

/// Which wire format records are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Auto,
    Telltale,
    OpenAi,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "auto" => Some(Format::Auto),
            "telltale" => Some(Format::Telltale),
            "openai" => Some(Format::OpenAi),
            _ => None,
        }
    }

    pub const NAMES: &'static str = "auto, telltale, openai";
}

/// Why a record was rejected; the code is stored in `rejects.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The record has no payload (a Kafka tombstone) or only white space.
    EmptyRecord,
    RecordTooLarge,
    InvalidUtf8,
    InvalidJson,
    NotAnObject,
    WrongType,
    MissingField,
    InvalidValue,
    FieldTooLarge,
}

impl RejectReason {
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::EmptyRecord => "empty_record",
            RejectReason::RecordTooLarge => "record_too_large",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::WrongType => "wrong_type",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::FieldTooLarge => "field_too_large",
        }
    }
}

/// A record that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub reason: RejectReason,
    pub message: String,
    /// The format the record was read as, or `unknown` when it was not even JSON.
    pub format: &'static str,
}

impl DecodeError {
    fn new(reason: RejectReason, format: &'static str, message: impl Into<String>) -> Self {
        DecodeError {
            reason,
            message: message.into(),
            format,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message)
    }
}

impl std::error::Error for DecodeError {}

/// A decoded record and the format it was read as.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub event: LlmEvent<'a>,
    pub format: &'static str,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub format: Format,
    pub max_record_bytes: usize,
    pub max_field_bytes: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            format: Format::Auto,
            max_record_bytes: 4 << 20,
            max_field_bytes: 1 << 20,
        }
    }
}

/// Decodes records of the configured format.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: DecoderConfig,
}

impl Decoder {
    pub fn new(config: DecoderConfig) -> Self {
        Decoder { config }
    }

    /// Decodes one record. `broker_timestamp_ms` is the record's Kafka timestamp, used as the
    /// event time only by formats whose records may lack one (`openai`).
    pub fn decode<'a>(
        &self,
        payload: Option<&'a [u8]>,
        broker_timestamp_ms: Option<i64>,
    ) -> Result<Decoded<'a>, DecodeError> {
        let unknown = "unknown";
        let bytes = match payload {
            Some(b) if !b.iter().all(u8::is_ascii_whitespace) => b,
            _ => {
                return Err(DecodeError::new(
                    RejectReason::EmptyRecord,
                    unknown,
                    "record has no payload",
                ));
            }
        };
        if bytes.len() > self.config.max_record_bytes {
            return Err(DecodeError::new(
                RejectReason::RecordTooLarge,
                unknown,
                format!(
                    "record is {} bytes, over decode.max_record_bytes ({})",
                    bytes.len(),
                    self.config.max_record_bytes
                ),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            DecodeError::new(
                RejectReason::InvalidUtf8,
                unknown,
                format!(
                    "payload is not UTF-8: invalid byte at offset {}",
                    e.valid_up_to()
                ),
            )
        })?;
        let envelope = Envelope::parse(text)?;
        let (event, format) = match self.config.format {
            Format::Telltale => (envelope.into_native(text)?, "telltale"),
            Format::OpenAi => (envelope.into_openai(text, broker_timestamp_ms)?, "openai"),
            Format::Auto if envelope.looks_like_openai() => {
                (envelope.into_openai(text, broker_timestamp_ms)?, "openai")
            }
            Format::Auto => (envelope.into_native(text)?, "telltale"),
        };
        for (name, value) in event.text_fields() {
            if let Some(v) = value
                && v.len() > self.config.max_field_bytes
            {
                return Err(DecodeError::new(
                    RejectReason::FieldTooLarge,
                    format,
                    format!(
                        "field `{name}` is {} bytes, over decode.max_field_bytes ({})",
                        v.len(),
                        self.config.max_field_bytes
                    ),
                ));
            }
        }
        Ok(Decoded { event, format })
    }
}
