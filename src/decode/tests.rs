use super::*;
use proptest::prelude::*;

fn dec() -> Decoder {
    Decoder::new(DecoderConfig::default())
}

fn ok(json: &str) -> LlmEvent<'_> {
    match dec().decode(Some(json.as_bytes()), None) {
        Ok(d) => d.event,
        Err(e) => panic!("expected {json} to decode, got {e}"),
    }
}

fn reject(bytes: &[u8]) -> DecodeError {
    match dec().decode(Some(bytes), None) {
        Ok(d) => panic!("expected a reject, got {:?}", d.event),
        Err(e) => e,
    }
}

#[test]
fn decodes_native_event_with_messages_and_attributes() {
    let e = ok(
        r#"{"event_id":"e1","timestamp":"2026-11-27T04:40:00.250Z","app":"bot","model":"gpt-4o",
        "input":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":[{"type":"text","text":"part one"},{"type":"text","text":"part two"}]}],
        "output":{"role":"assistant","content":"answer"},"latency_ms":812.5,"input_tokens":12,"feedback":true,
        "attributes":{"region":"eu","retries":2,"flags":{"a":1}}}"#,
    );
    assert_eq!(e.event_id, "e1");
    assert_eq!(e.timestamp_ms, 1_795_754_400_250);
    assert_eq!(e.input.as_deref(), Some("part one\npart two"));
    assert_eq!(e.system.as_deref(), Some("be brief"));
    assert!(
        e.input_messages
            .as_deref()
            .unwrap()
            .starts_with("[{\"role\":\"system\"")
    );
    assert_eq!(e.output.as_deref(), Some("answer"));
    assert_eq!(e.latency_ms, Some(812.5));
    assert_eq!(e.feedback, Some(1.0));
    assert_eq!(e.status, "ok");
    assert_eq!(
        e.attributes,
        vec![
            ("region".into(), "eu".into()),
            ("retries".into(), "2".into()),
            ("flags".into(), "{\"a\":1}".into())
        ]
    );
}

#[test]
fn borrows_unescaped_strings_from_the_payload() {
    let e = ok(
        r#"{"event_id":"e1","timestamp":1795754400000,"input":"plain text","output":"with \"escape\""}"#,
    );
    assert!(matches!(e.input, Some(std::borrow::Cow::Borrowed(_))));
    assert_eq!(e.output.as_deref(), Some("with \"escape\""));
}

#[test]
fn error_type_implies_error_status() {
    let e = ok(r#"{"event_id":"e1","timestamp":1795754400000,"error_type":"timeout"}"#);
    assert_eq!(e.status, "error");
    let r = reject(br#"{"event_id":"e1","timestamp":1795754400000,"status":"maybe"}"#);
    assert_eq!(r.reason, RejectReason::InvalidValue);
}

#[test]
fn decodes_openai_pair_with_usage_and_metadata() {
    let e = ok(
        r#"{"request":{"model":"gpt-4o-mini","messages":[{"role":"system","content":"sys"},{"role":"user","content":"What is 2+2?"}],"user":"u-9"},
        "response":{"id":"chatcmpl-1","created":1795754400,"model":"gpt-4o-mini-2024-07-18",
          "choices":[{"index":0,"message":{"role":"assistant","content":"4"},"finish_reason":"stop"}],
          "usage":{"prompt_tokens":20,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":16},"completion_tokens_details":{"reasoning_tokens":0}}},
        "latency_ms":321,"metadata":{"app":"calc","prompt_version":3,"team":"math"}}"#,
    );
    assert_eq!(e.event_id, "chatcmpl-1");
    assert_eq!(e.timestamp_ms, 1_795_754_400_000);
    assert_eq!(e.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(e.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(e.operation.as_deref(), Some("chat"));
    assert_eq!(e.provider.as_deref(), Some("openai"));
    assert_eq!(e.input.as_deref(), Some("What is 2+2?"));
    assert_eq!(e.system.as_deref(), Some("sys"));
    assert_eq!(e.output.as_deref(), Some("4"));
    assert_eq!(
        (
            e.input_tokens,
            e.output_tokens,
            e.cache_read_tokens,
            e.reasoning_tokens
        ),
        (Some(20), Some(1), Some(16), Some(0))
    );
    assert_eq!(e.prompt_version.as_deref(), Some("3"));
    assert_eq!(e.user_id.as_deref(), Some("u-9"));
    assert_eq!(e.finish_reason.as_deref(), Some("stop"));
    assert_eq!(e.attributes, vec![("team".into(), "math".into())]);
    assert_eq!(e.status, "ok");
}

#[test]
fn openai_error_response_gets_error_type_and_a_stable_id() {
    let rec = br#"{"request":{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]},"response":{"error":{"type":"rate_limit_error","message":"slow down"}},"status_code":429}"#;
    let a = dec().decode(Some(rec), Some(1_795_754_400_123)).unwrap();
    assert_eq!(a.format, "openai");
    assert_eq!(a.event.status, "error");
    assert_eq!(a.event.error_type.as_deref(), Some("rate_limit_error"));
    assert_eq!(
        a.event.timestamp_ms, 1_795_754_400_123,
        "falls back to the broker timestamp"
    );
    let b = dec().decode(Some(rec), Some(1)).unwrap();
    assert_eq!(
        a.event.event_id, b.event.event_id,
        "the derived id depends on the record only"
    );
    assert!(a.event.event_id.starts_with("tt-"));
}

#[test]
fn openai_without_any_time_is_rejected() {
    let r = reject(br#"{"request":{"model":"gpt-4o"},"response":{"id":"x","choices":[]}}"#);
    assert_eq!(r.reason, RejectReason::MissingField);
    assert!(r.message.contains("metadata.timestamp"), "{}", r.message);
}

#[test]
fn legacy_completion_prompt_and_text() {
    let e = ok(
        r#"{"request":{"model":"gpt-3.5-turbo-instruct","prompt":"Say hi"},"response":{"id":"cmpl-1","created":1795754400,"choices":[{"text":"hi","finish_reason":"length"}]}}"#,
    );
    assert_eq!(e.operation.as_deref(), Some("text_completion"));
    assert_eq!(
        (e.input.as_deref(), e.output.as_deref()),
        (Some("Say hi"), Some("hi"))
    );
}

#[test]
fn format_is_enforced_when_not_auto() {
    let d = Decoder::new(DecoderConfig {
        format: Format::Telltale,
        ..Default::default()
    });
    let r = d
        .decode(
            Some(br#"{"request":{},"response":{"id":"x","created":1795754400}}"#),
            None,
        )
        .unwrap_err();
    assert_eq!(
        r.reason,
        RejectReason::MissingField,
        "read as telltale, it lacks event_id: {r}"
    );
}

#[test]
fn reject_reasons_and_messages() {
    let cases: &[(&[u8], RejectReason, &str)] = &[
        (b"", RejectReason::EmptyRecord, "no payload"),
        (b"  \n", RejectReason::EmptyRecord, "no payload"),
        (
            b"{\"event_id\": \"a\", ",
            RejectReason::InvalidJson,
            "not valid JSON",
        ),
        (
            b"[1,2]",
            RejectReason::NotAnObject,
            "expected a JSON object",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":1795754400000,\"latency_ms\":\"fast\"}",
            RejectReason::WrongType,
            "`latency_ms`",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":1795754400000,\"input_tokens\":-3}",
            RejectReason::InvalidValue,
            "must not be negative",
        ),
        (
            b"{\"timestamp\":1795754400000}",
            RejectReason::MissingField,
            "`event_id` is required",
        ),
        (
            b"{\"event_id\":\"a\"}",
            RejectReason::MissingField,
            "`timestamp` is required",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":1795754400}",
            RejectReason::InvalidValue,
            "looks like epoch seconds",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":\"yesterday\"}",
            RejectReason::InvalidValue,
            "not an RFC 3339 time",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":1795754400000,\"input\":42}",
            RejectReason::WrongType,
            "`input` must be a string",
        ),
        (
            b"{\"event_id\":\"a\",\"timestamp\":1795754400000,\"attributes\":[1]}",
            RejectReason::WrongType,
            "`attributes` must be an object",
        ),
        (
            b"{\"request\":{\"model\":5},\"response\":{}}",
            RejectReason::WrongType,
            "`request.model`",
        ),
        (
            b"{\"request\":{},\"response\":{\"usage\":{\"prompt_tokens\":\"x\"}}}",
            RejectReason::WrongType,
            "`response.usage.prompt_tokens`",
        ),
    ];
    for (bytes, reason, needle) in cases {
        let e = reject(bytes);
        assert_eq!(e.reason, *reason, "{}: {e}", String::from_utf8_lossy(bytes));
        assert!(
            e.message.contains(needle),
            "{}: message {:?} lacks {needle:?}",
            String::from_utf8_lossy(bytes),
            e.message
        );
    }
    let mut bad = b"{\"event_id\":\"a\",\"timestamp\":1795754400000,\"input\":\"".to_vec();
    bad.extend_from_slice(&[0xc3, 0x28, b'"', b'}']);
    let e = reject(&bad);
    assert_eq!(e.reason, RejectReason::InvalidUtf8);
    assert!(e.message.contains("offset 51"), "{}", e.message);
}

#[test]
fn size_limits() {
    let d = Decoder::new(DecoderConfig {
        max_record_bytes: 200,
        max_field_bytes: 10,
        ..Default::default()
    });
    let big = format!(
        r#"{{"event_id":"a","timestamp":1795754400000,"input":"{}"}}"#,
        "x".repeat(300)
    );
    assert_eq!(
        d.decode(Some(big.as_bytes()), None).unwrap_err().reason,
        RejectReason::RecordTooLarge
    );
    let e = d
        .decode(
            Some(br#"{"event_id":"a","timestamp":1795754400000,"output":"eleven chars"}"#),
            None,
        )
        .unwrap_err();
    assert_eq!(e.reason, RejectReason::FieldTooLarge);
    assert!(e.message.contains("`output` is 12 bytes"), "{}", e.message);
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", "[a-z \"\\\\\n\u{e9}\u{1F600}]{0,20}"]
}

proptest! {
    /// Whatever the bytes, decoding returns an event or a reject; it never panics.
    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = dec().decode(Some(&bytes), Some(1_795_754_400_000));
    }

    /// Text written as JSON by serde comes back unchanged, escapes and all.
    #[test]
    fn native_text_round_trips(input in arb_text(), output in arb_text(), app in arb_text(), ts in 100_000_000_000i64..4_000_000_000_000) {
        let json = serde_json::json!({"event_id": "id-1", "timestamp": ts, "app": app, "input": input, "output": output}).to_string();
        let e = dec().decode(Some(json.as_bytes()), None).unwrap().event;
        prop_assert_eq!(e.timestamp_ms, ts);
        prop_assert_eq!(e.app.as_deref(), Some(app.as_str()));
        prop_assert_eq!(e.input.as_deref(), Some(input.as_str()));
        prop_assert_eq!(e.output.as_deref(), Some(output.as_str()));
    }
}
