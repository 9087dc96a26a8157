//! Helpers that turn loosely-typed JSON values (strings, message lists, content parts,
//! timestamps) into the event's typed fields, borrowing from the payload where possible.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{DecodeError, RejectReason};

/// Milliseconds below this are taken as a mistake (epoch seconds given as milliseconds): it is
/// 1973-03-03 in milliseconds and the year 5138 in seconds.
const MIN_EPOCH_MS: i64 = 100_000_000_000;

pub(super) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A JSON string as text (borrowed when it has no escapes); any other JSON value as its source.
pub(super) fn any_as_text(raw: &RawValue) -> Cow<'_, str> {
    let s = raw.get();
    if s.starts_with('"') {
        json_string(raw).unwrap_or(Cow::Borrowed(s))
    } else {
        Cow::Borrowed(s)
    }
}

/// Parses a JSON string value, borrowing when it has no escapes. `None` when not a string.
pub(super) fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    if let Ok(b) = serde_json::from_str::<&str>(s) {
        return Some(Cow::Borrowed(b));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// Message content: a string, or a list of parts of which the text parts are joined.
fn content_text(raw: &RawValue) -> Option<Cow<'_, str>> {
    if is_null(raw) {
        return None;
    }
    if let Some(s) = json_string(raw) {
        return Some(s);
    }
    let parts: Vec<Part<'_>> = serde_json::from_str(raw.get()).ok()?;
    let mut texts = parts.into_iter().filter_map(|p| p.text);
    let first = texts.next()?;
    match texts.next() {
        None => Some(first),
        Some(second) => {
            let mut joined = first.into_owned();
            for t in std::iter::once(second).chain(texts) {
                joined.push('\n');
                joined.push_str(&t);
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// What a chat message list says, split into the parts the event keeps.
#[derive(Default)]
pub(super) struct Conversation<'a> {
    /// Content of the last message with role `user` (or the last message when none has it).
    pub last_user: Option<Cow<'a, str>>,
    /// Content of system/developer messages, joined.
    pub system: Option<Cow<'a, str>>,
    /// Content of the last assistant message, or its tool calls as JSON.
    pub last_assistant: Option<Cow<'a, str>>,
}

pub(super) fn conversation<'a>(
    raw: &'a RawValue,
    field: &str,
    format: &'static str,
) -> Result<Conversation<'a>, DecodeError> {
    let messages: Vec<Message<'a>> = serde_json::from_str(raw.get()).map_err(|e| {
        DecodeError::new(
            RejectReason::WrongType,
            format,
            format!("`{field}` must be a list of messages with `role` and `content`: {e}"),
        )
    })?;
    let mut conv = Conversation::default();
    let mut last_any = None;
    for m in &messages {
        let content = m.content.and_then(content_text);
        if content.is_some() {
            last_any = content.clone();
        }
        match m.role.as_deref() {
            Some("system") | Some("developer") => {
                if let Some(c) = content {
                    conv.system = Some(match conv.system.take() {
                        None => c,
                        Some(prev) => Cow::Owned(format!("{prev}\n{c}")),
                    });
                }
            }
            Some("user") => conv.last_user = content.clone().or(conv.last_user.take()),
            Some("assistant") => {
                conv.last_assistant = content
                    .clone()
                    .or_else(|| m.tool_calls.map(|t| Cow::Borrowed(t.get())))
                    .or(conv.last_assistant.take())
            }
            _ => {}
        }
    }
    if conv.last_user.is_none() {
        conv.last_user = last_any;
    }
    Ok(conv)
}

/// What a text field holds: its text, the raw message list (if it was one), and the system
/// messages found in that list.
pub(super) type TextParts<'a> = (
    Option<Cow<'a, str>>,
    Option<Cow<'a, str>>,
    Option<Cow<'a, str>>,
);

/// A text field that may be a plain string, a message object, or a list of messages.
pub(super) fn text_or_messages<'a>(
    raw: &'a RawValue,
    field: &str,
    format: &'static str,
    pick_assistant: bool,
) -> Result<TextParts<'a>, DecodeError> {
    let s = raw.get();
    match s.as_bytes().first() {
        Some(b'"') => Ok((json_string(raw), None, None)),
        Some(b'n') => Ok((None, None, None)),
        Some(b'[') => {
            let conv = conversation(raw, field, format)?;
            let text = if pick_assistant {
                conv.last_assistant
            } else {
                conv.last_user
            };
            Ok((text, Some(Cow::Borrowed(s)), conv.system))
        }
        Some(b'{') => {
            let m: Message<'a> = serde_json::from_str(s).map_err(|e| {
                DecodeError::new(RejectReason::WrongType, format, format!("`{field}`: {e}"))
            })?;
            Ok((m.content.and_then(content_text), None, None))
        }
        _ => Err(DecodeError::new(
            RejectReason::WrongType,
            format,
            format!(
                "`{field}` must be a string, a message or a list of messages, got {}",
                short(s)
            ),
        )),
    }
}

/// Event time: an RFC 3339 string, or an integer number of milliseconds since the epoch.
pub(super) fn timestamp_ms(
    raw: &RawValue,
    field: &str,
    format: &'static str,
) -> Result<i64, DecodeError> {
    let s = raw.get();
    let bad = |msg: String| DecodeError::new(RejectReason::InvalidValue, format, msg);
    if let Some(text) = json_string(raw) {
        return chrono::DateTime::parse_from_rfc3339(&text)
            .map(|t| t.timestamp_millis())
            .map_err(|e| {
                bad(format!(
                    "`{field}` {} is not an RFC 3339 time ({e}); expected e.g. \"2026-11-27T04:40:00Z\" or epoch milliseconds",
                    short(s)
                ))
            });
    }
    let ms = match serde_json::from_str::<serde_json::Number>(s) {
        Ok(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i,
            (None, Some(f)) if f.is_finite() && f.abs() < 9.0e15 => f.round() as i64,
            _ => return Err(bad(format!("`{field}` {} is out of range", short(s)))),
        },
        Err(_) => {
            return Err(DecodeError::new(
                RejectReason::WrongType,
                format,
                format!(
                    "`{field}` must be an RFC 3339 string or epoch milliseconds, got {}",
                    short(s)
                ),
            ));
        }
    };
    if ms < MIN_EPOCH_MS {
        return Err(bad(format!(
            "`{field}` {ms} looks like epoch seconds; telltale expects epoch milliseconds (multiply by 1000)"
        )));
    }
    Ok(ms)
}

/// User feedback: a number, or a boolean (thumbs up = 1, down = 0).
pub(super) fn feedback(raw: &RawValue, format: &'static str) -> Result<Option<f64>, DecodeError> {
    match raw.get() {
        "null" => Ok(None),
        "true" => Ok(Some(1.0)),
        "false" => Ok(Some(0.0)),
        s => match serde_json::from_str::<f64>(s) {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(DecodeError::new(
                RejectReason::WrongType,
                format,
                format!("`feedback` must be a number or a boolean, got {}", short(s)),
            )),
        },
    }
}

/// `attributes`: an object; string values are kept as they are, any other value as its JSON.
pub(super) fn attributes<'a>(
    raw: &'a RawValue,
    format: &'static str,
    out: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
) -> Result<(), DecodeError> {
    if is_null(raw) {
        return Ok(());
    }
    let map: Vec<(Cow<'a, str>, &'a RawValue)> = object_entries(raw).ok_or_else(|| {
        DecodeError::new(
            RejectReason::WrongType,
            format,
            format!("`attributes` must be an object, got {}", short(raw.get())),
        )
    })?;
    for (k, v) in map {
        if !is_null(v) {
            out.push((k, any_as_text(v)));
        }
    }
    Ok(())
}

/// The entries of a JSON object in document order, values unparsed.
pub(super) fn object_entries(raw: &RawValue) -> Option<Vec<(Cow<'_, str>, &RawValue)>> {
    struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);
    impl<'de> Deserialize<'de> for Entries<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Entries<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut out = Vec::new();
                    while let Some(k) = m.next_key::<KeyStr<'de>>()? {
                        out.push((k.0, m.next_value::<&'de RawValue>()?));
                    }
                    Ok(Entries(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    struct KeyStr<'a>(Cow<'a, str>);
    impl<'de> Deserialize<'de> for KeyStr<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = KeyStr<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(KeyStr(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(KeyStr(Cow::Owned(v.to_owned())))
                }
            }
            d.deserialize_str(V)
        }
    }
    serde_json::from_str::<Entries<'_>>(raw.get())
        .ok()
        .map(|e| e.0)
}

/// The start of a JSON value, for error messages.
pub(super) fn short(s: &str) -> String {
    const MAX: usize = 40;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
