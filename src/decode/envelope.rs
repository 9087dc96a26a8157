//! One parse of a record that serves both formats: the canonical fields and the OpenAI
//! request/response pair sit side by side, nested values stay unparsed (`RawValue`) until
//! the chosen format reads them.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use xxhash_rust::xxh3::xxh3_128;

use super::text::{self, is_null, short};
use super::{DecodeError, RejectReason};
use crate::event::LlmEvent;

#[derive(Deserialize, Default)]
pub struct Envelope<'a> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default)]
    app: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    environment: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    operation: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    provider: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    response_model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    prompt_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    prompt_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    variant: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    experiment: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    output: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(default)]
    latency_ms: Option<f64>,
    #[serde(default)]
    ttft_ms: Option<f64>,
    #[serde(default)]
    input_tokens: Option<i64>,
    #[serde(default)]
    output_tokens: Option<i64>,
    #[serde(default)]
    cache_read_tokens: Option<i64>,
    #[serde(default)]
    cache_write_tokens: Option<i64>,
    #[serde(default)]
    reasoning_tokens: Option<i64>,
    #[serde(default)]
    cost_usd: Option<f64>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    feedback: Option<&'a RawValue>,
    #[serde(borrow, default)]
    feedback_for: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    expected: Option<&'a RawValue>,
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
    // The OpenAI request/response pair.
    #[serde(borrow, default)]
    request: Option<&'a RawValue>,
    #[serde(borrow, default)]
    response: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(default)]
    status_code: Option<i64>,
}

/// Parses a nested value, reporting a type error with its path (`response.usage.prompt_tokens`).
fn nested<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    field: &str,
    format: &'static str,
) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            field.to_owned()
        } else {
            format!("{field}.{path}")
        };
        DecodeError::new(
            RejectReason::WrongType,
            format,
            format!("`{path}`: {}", e.into_inner()),
        )
    })
}

/// Maps a failed top-level parse to a reason, with the field path for type errors.
fn classify(err: serde_json::Error, text: &str) -> DecodeError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Data => {
            let mut de = serde_json::Deserializer::from_str(text);
            let located: Result<Envelope<'_>, _> = serde_path_to_error::deserialize(&mut de);
            let msg = match located {
                Err(e) => {
                    let path = e.path().to_string();
                    format!("`{path}`: {}", e.into_inner())
                }
                Ok(_) => err.to_string(),
            };
            DecodeError::new(RejectReason::WrongType, "unknown", msg)
        }
        _ => DecodeError::new(
            RejectReason::InvalidJson,
            "unknown",
            format!("not valid JSON: {err}"),
        ),
    }
}

fn required<T>(v: Option<T>, field: &str, format: &'static str) -> Result<T, DecodeError> {
    v.ok_or_else(|| {
        DecodeError::new(
            RejectReason::MissingField,
            format,
            format!("`{field}` is required"),
        )
    })
}

fn non_empty(v: Option<Cow<'_, str>>) -> Option<Cow<'_, str>> {
    v.filter(|s| !s.is_empty())
}

fn status<'a>(
    given: Option<Cow<'a, str>>,
    error_type: &Option<Cow<'a, str>>,
    format: &'static str,
) -> Result<Cow<'a, str>, DecodeError> {
    match given {
        None => Ok(Cow::Borrowed(if error_type.is_some() {
            "error"
        } else {
            "ok"
        })),
        Some(s) if s.eq_ignore_ascii_case("ok") => Ok(Cow::Borrowed("ok")),
        Some(s) if s.eq_ignore_ascii_case("error") => Ok(Cow::Borrowed("error")),
        Some(s) => Err(DecodeError::new(
            RejectReason::InvalidValue,
            format,
            format!(
                "`status` must be \"ok\" or \"error\", got {:?}",
                text::short(&s)
            ),
        )),
    }
}

fn non_negative(
    name: &str,
    v: Option<i64>,
    format: &'static str,
) -> Result<Option<i64>, DecodeError> {
    match v {
        Some(n) if n < 0 => Err(DecodeError::new(
            RejectReason::InvalidValue,
            format,
            format!("`{name}` must not be negative, got {n}"),
        )),
        _ => Ok(v),
    }
}

fn non_negative_f(
    name: &str,
    v: Option<f64>,
    format: &'static str,
) -> Result<Option<f64>, DecodeError> {
    match v {
        Some(x) if !(x >= 0.0 && x.is_finite()) => Err(DecodeError::new(
            RejectReason::InvalidValue,
            format,
            format!("`{name}` must be a non-negative number, got {x}"),
        )),
        _ => Ok(v),
    }
}

impl<'a> Envelope<'a> {
    pub fn parse(text: &'a str) -> Result<Envelope<'a>, DecodeError> {
        let first = text.trim_start().as_bytes().first().copied();
        if first != Some(b'{') {
            return Err(DecodeError::new(
                RejectReason::NotAnObject,
                "unknown",
                format!("expected a JSON object, got {}", short(text.trim())),
            ));
        }
        serde_json::from_str(text).map_err(|e| classify(e, text))
    }

    pub fn looks_like_openai(&self) -> bool {
        self.request.is_some() || self.response.is_some()
    }

    pub fn into_native(self, _text: &'a str) -> Result<LlmEvent<'a>, DecodeError> {
        const F: &str = "telltale";
        let event_id = required(non_empty(self.event_id), "event_id", F)?;
        let timestamp_ms =
            text::timestamp_ms(required(self.timestamp, "timestamp", F)?, "timestamp", F)?;
        let (input, input_messages, system_from_messages) = match self.input {
            Some(raw) => text::text_or_messages(raw, "input", F, false)?,
            None => (None, None, None),
        };
        let output = match self.output {
            Some(raw) => text::text_or_messages(raw, "output", F, true)?.0,
            None => None,
        };
        let system = match self.system {
            Some(raw) => text::text_or_messages(raw, "system", F, false)?.0,
            None => system_from_messages,
        };
        let mut attributes = Vec::new();
        if let Some(raw) = self.attributes {
            text::attributes(raw, F, &mut attributes)?;
        }
        let error_type = non_empty(self.error_type);
        Ok(LlmEvent {
            event_id,
            timestamp_ms,
            app: self.app,
            environment: self.environment,
            operation: self.operation,
            provider: self.provider,
            model: self.model,
            response_model: self.response_model,
            prompt_id: self.prompt_id,
            prompt_version: self.prompt_version,
            variant: self.variant,
            experiment: self.experiment,
            input,
            input_messages,
            output,
            system,
            latency_ms: non_negative_f("latency_ms", self.latency_ms, F)?,
            ttft_ms: non_negative_f("ttft_ms", self.ttft_ms, F)?,
            input_tokens: non_negative("input_tokens", self.input_tokens, F)?,
            output_tokens: non_negative("output_tokens", self.output_tokens, F)?,
            cache_read_tokens: non_negative("cache_read_tokens", self.cache_read_tokens, F)?,
            cache_write_tokens: non_negative("cache_write_tokens", self.cache_write_tokens, F)?,
            reasoning_tokens: non_negative("reasoning_tokens", self.reasoning_tokens, F)?,
            cost_usd: non_negative_f("cost_usd", self.cost_usd, F)?,
            cost_source: None,
            finish_reason: self.finish_reason,
            status: status(self.status, &error_type, F)?,
            error_type,
            session_id: self.session_id,
            user_id: self.user_id,
            feedback: match self.feedback {
                Some(raw) => text::feedback(raw, F)?,
                None => None,
            },
            feedback_for: non_empty(self.feedback_for),
            expected: self.expected.filter(|r| !is_null(r)).map(text::any_as_text),
            attributes,
        })
    }

    pub fn into_openai(
        self,
        text: &'a str,
        broker_timestamp_ms: Option<i64>,
    ) -> Result<LlmEvent<'a>, DecodeError> {
        const F: &str = "openai";
        let request: OaRequest<'a> = match self.request {
            Some(raw) if !is_null(raw) => nested(raw, "request", F)?,
            _ => OaRequest::default(),
        };
        let response: OaResponse<'a> = match self.response {
            Some(raw) if !is_null(raw) => nested(raw, "response", F)?,
            _ => OaResponse::default(),
        };
        let mut meta = Metadata::default();
        if let Some(raw) = self.metadata.filter(|r| !is_null(r)) {
            meta.read(raw, F)?;
        }

        // Event time: the proxy's own stamp, else the response's `created` (seconds), else the
        // broker's timestamp.
        let timestamp_ms = match meta.timestamp.or(self.timestamp) {
            Some(raw) => text::timestamp_ms(raw, "metadata.timestamp", F)?,
            None => match (response.created, broker_timestamp_ms) {
                (Some(s), _) if s > 0 => s * 1000,
                (_, Some(ts)) if ts > 0 => ts,
                _ => {
                    return Err(DecodeError::new(
                        RejectReason::MissingField,
                        F,
                        "no event time: set `metadata.timestamp`, or `response.created`",
                    ));
                }
            },
        };
        // The id: given, the response's, or a hash of the record so a replay gets the same id.
        let event_id = non_empty(self.event_id)
            .or(non_empty(meta.event_id.take()))
            .or(non_empty(response.id))
            .unwrap_or_else(|| Cow::Owned(format!("tt-{:032x}", xxh3_128(text.as_bytes()))));

        let (input, input_messages, system, operation) = if let Some(raw) = request.messages {
            let conv = text::conversation(raw, "request.messages", F)?;
            (
                conv.last_user,
                Some(Cow::Borrowed(raw.get())),
                conv.system,
                "chat",
            )
        } else if let Some(raw) = request.prompt {
            (
                text::text_or_messages(raw, "request.prompt", F, false)?.0,
                None,
                None,
                "text_completion",
            )
        } else {
            (None, None, None, "chat")
        };

        let choice = response.choices.into_iter().next();
        let (output, finish_reason) = match choice {
            Some(c) => {
                let out = match (c.message, c.text) {
                    (Some(m), _) => {
                        text::text_or_messages(m, "response.choices[0].message", F, true)?.0
                    }
                    (None, Some(t)) => text::json_string(t),
                    (None, None) => None,
                };
                (out, c.finish_reason)
            }
            None => (None, None),
        };

        let error = self.error.or(response.error).filter(|r| !is_null(r));
        let error_type = match error {
            Some(raw) => Some(error_type(raw, F)?),
            None => match self.status_code {
                Some(code) if code >= 400 => Some(Cow::Owned(format!("http_{code}"))),
                _ => None,
            },
        };

        let usage = response.usage.unwrap_or_default();
        let cache_read = usage
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .or(usage
                .input_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens))
            .or(usage.cache_read_input_tokens);
        let mut attributes = meta.rest;
        if let Some(fp) = response.system_fingerprint {
            attributes.push((Cow::Borrowed("system_fingerprint"), fp));
        }
        Ok(LlmEvent {
            event_id,
            timestamp_ms,
            app: meta.app,
            environment: meta.environment,
            operation: meta.operation.or(Some(Cow::Borrowed(operation))),
            provider: meta.provider.or(Some(Cow::Borrowed("openai"))),
            model: request.model.or_else(|| response.model.clone()),
            response_model: response.model,
            prompt_id: meta.prompt_id,
            prompt_version: meta.prompt_version,
            variant: meta.variant,
            experiment: meta.experiment,
            input,
            input_messages,
            output,
            system,
            latency_ms: non_negative_f("latency_ms", self.latency_ms.or(meta.latency_ms), F)?,
            ttft_ms: non_negative_f("ttft_ms", self.ttft_ms.or(meta.ttft_ms), F)?,
            input_tokens: non_negative("usage.prompt_tokens", usage.total_input_tokens(), F)?,
            output_tokens: non_negative(
                "usage.completion_tokens",
                usage.completion_tokens.or(usage.output_tokens),
                F,
            )?,
            cache_read_tokens: non_negative(
                "usage.prompt_tokens_details.cached_tokens",
                cache_read,
                F,
            )?,
            cache_write_tokens: non_negative(
                "usage.cache_creation_input_tokens",
                usage.cache_creation_input_tokens,
                F,
            )?,
            reasoning_tokens: non_negative(
                "usage.completion_tokens_details.reasoning_tokens",
                usage
                    .completion_tokens_details
                    .and_then(|d| d.reasoning_tokens),
                F,
            )?,
            cost_usd: non_negative_f("cost_usd", self.cost_usd.or(meta.cost_usd), F)?,
            cost_source: None,
            finish_reason,
            status: Cow::Borrowed(if error_type.is_some() { "error" } else { "ok" }),
            error_type,
            session_id: meta.session_id,
            user_id: meta.user_id.or(request.user),
            feedback: match meta.feedback {
                Some(raw) => text::feedback(raw, F)?,
                None => None,
            },
            feedback_for: None,
            expected: meta.expected.map(text::any_as_text),
            attributes,
        })
    }
}

fn error_type<'a>(raw: &'a RawValue, format: &'static str) -> Result<Cow<'a, str>, DecodeError> {
    if let Some(s) = text::json_string(raw) {
        return Ok(s);
    }
    #[derive(Deserialize)]
    struct OaError<'a> {
        #[serde(borrow, default, rename = "type")]
        kind: Option<&'a RawValue>,
        #[serde(borrow, default)]
        code: Option<&'a RawValue>,
    }
    let e: OaError<'a> = nested(raw, "error", format)?;
    let pick = |r: Option<&'a RawValue>| r.filter(|r| !is_null(r)).map(text::any_as_text);
    Ok(pick(e.kind)
        .or(pick(e.code))
        .unwrap_or(Cow::Borrowed("error")))
}

#[derive(Deserialize, Default)]
struct OaRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct OaResponse<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<i64>,
    #[serde(borrow, default)]
    choices: Vec<OaChoice<'a>>,
    #[serde(default)]
    usage: Option<OaUsage>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system_fingerprint: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct OaChoice<'a> {
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct OaUsage {
    #[serde(default)]
    prompt_tokens: Option<i64>,
    #[serde(default)]
    completion_tokens: Option<i64>,
    // The Responses API's and Anthropic's names for the same counts.
    #[serde(default)]
    input_tokens: Option<i64>,
    #[serde(default)]
    output_tokens: Option<i64>,
    #[serde(default)]
    cache_read_input_tokens: Option<i64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<i64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    /// The Responses API's: its `input_tokens` includes these cached tokens.
    #[serde(default)]
    input_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

impl OaUsage {
    /// All input tokens, cached ones included (OpenAI's `prompt_tokens` and the Responses API's
    /// `input_tokens` already include them; Anthropic's `input_tokens` does not, so its cache
    /// reads and writes are added).
    fn total_input_tokens(&self) -> Option<i64> {
        if let Some(n) = self.prompt_tokens {
            return Some(n);
        }
        let n = self.input_tokens?;
        if self.input_tokens_details.is_some() {
            return Some(n);
        }
        let extra = self.cache_read_input_tokens.unwrap_or(0).max(0)
            + self.cache_creation_input_tokens.unwrap_or(0).max(0);
        Some(n.saturating_add(extra))
    }
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<i64>,
}

/// `metadata` as a logging proxy adds it: known keys fill event fields, the rest become attributes.
#[derive(Default)]
struct Metadata<'a> {
    event_id: Option<Cow<'a, str>>,
    timestamp: Option<&'a RawValue>,
    app: Option<Cow<'a, str>>,
    environment: Option<Cow<'a, str>>,
    operation: Option<Cow<'a, str>>,
    provider: Option<Cow<'a, str>>,
    prompt_id: Option<Cow<'a, str>>,
    prompt_version: Option<Cow<'a, str>>,
    variant: Option<Cow<'a, str>>,
    experiment: Option<Cow<'a, str>>,
    session_id: Option<Cow<'a, str>>,
    user_id: Option<Cow<'a, str>>,
    latency_ms: Option<f64>,
    ttft_ms: Option<f64>,
    cost_usd: Option<f64>,
    feedback: Option<&'a RawValue>,
    expected: Option<&'a RawValue>,
    rest: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> Metadata<'a> {
    fn read(&mut self, raw: &'a RawValue, format: &'static str) -> Result<(), DecodeError> {
        let entries = text::object_entries(raw).ok_or_else(|| {
            DecodeError::new(
                RejectReason::WrongType,
                format,
                format!("`metadata` must be an object, got {}", short(raw.get())),
            )
        })?;
        for (key, value) in entries {
            if is_null(value) {
                continue;
            }
            let string = |field: &str| -> Result<Cow<'a, str>, DecodeError> {
                text::json_string(value).ok_or_else(|| {
                    DecodeError::new(
                        RejectReason::WrongType,
                        format,
                        format!(
                            "`metadata.{field}` must be a string, got {}",
                            short(value.get())
                        ),
                    )
                })
            };
            let number =
                |field: &str| -> Result<f64, DecodeError> { nested_number(value, field, format) };
            match key.as_ref() {
                "event_id" => self.event_id = Some(string("event_id")?),
                "timestamp" => self.timestamp = Some(value),
                "app" => self.app = Some(string("app")?),
                "environment" => self.environment = Some(string("environment")?),
                "operation" => self.operation = Some(string("operation")?),
                "provider" => self.provider = Some(string("provider")?),
                "prompt_id" => self.prompt_id = Some(string("prompt_id")?),
                "prompt_version" => self.prompt_version = Some(text::any_as_text(value)),
                "variant" => self.variant = Some(string("variant")?),
                "experiment" => self.experiment = Some(string("experiment")?),
                "session_id" => self.session_id = Some(text::any_as_text(value)),
                "user_id" => self.user_id = Some(text::any_as_text(value)),
                "latency_ms" => self.latency_ms = Some(number("latency_ms")?),
                "ttft_ms" => self.ttft_ms = Some(number("ttft_ms")?),
                "cost_usd" => self.cost_usd = Some(number("cost_usd")?),
                "feedback" => self.feedback = Some(value),
                "expected" => self.expected = Some(value),
                _ => self.rest.push((key, text::any_as_text(value))),
            }
        }
        Ok(())
    }
}

fn nested_number(raw: &RawValue, field: &str, format: &'static str) -> Result<f64, DecodeError> {
    let v: f64 = parse_owned(raw).ok_or_else(|| {
        DecodeError::new(
            RejectReason::WrongType,
            format,
            format!(
                "`metadata.{field}` must be a number, got {}",
                short(raw.get())
            ),
        )
    })?;
    Ok(v)
}

fn parse_owned<T: DeserializeOwned>(raw: &RawValue) -> Option<T> {
    serde_json::from_str(raw.get()).ok()
}
