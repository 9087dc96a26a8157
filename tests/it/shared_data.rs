//! Decoding real third-party traffic from `../shared/data` (see its README). Skipped, with a
//! note, when that folder is absent, as it is in a user's fresh clone.

use std::io::BufRead;
use std::path::PathBuf;

use telltale::decode::{Decoder, DecoderConfig};

fn shared(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

/// Every ShareGPT prompt/response pair, wrapped as a logging proxy would write it, decodes with
/// its texts intact: unicode, code blocks, escapes and very long answers included.
#[test]
fn sharegpt_pairs_decode_with_texts_intact() {
    let Some(path) = shared("conversations/sharegpt_pairs_dev.jsonl.gz") else {
        return;
    };
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(
        std::fs::File::open(path).unwrap(),
    ));
    let decoder = Decoder::new(DecoderConfig::default());
    let mut n = 0;
    for (i, line) in reader.lines().enumerate().take(20_000) {
        let row: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let (prompt, response) = (
            row["prompt"].as_str().unwrap_or(""),
            row["response"].as_str().unwrap_or(""),
        );
        let record = serde_json::json!({
            "request": {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": prompt}]},
            "response": {"id": format!("chatcmpl-{i}"), "created": 1_795_754_400,
                         "choices": [{"message": {"role": "assistant", "content": response}, "finish_reason": "stop"}]},
            "metadata": {"app": "sharegpt", "conversation": row["conv_id"].clone()},
        });
        let bytes = serde_json::to_vec(&record).unwrap();
        let d = decoder
            .decode(Some(&bytes), None)
            .unwrap_or_else(|e| panic!("row {i}: {e}"));
        assert_eq!(d.format, "openai");
        assert_eq!(d.event.input.as_deref().unwrap_or(""), prompt, "row {i}");
        assert_eq!(d.event.output.as_deref().unwrap_or(""), response, "row {i}");
        assert_eq!(d.event.event_id, format!("chatcmpl-{i}"));
        n += 1;
    }
    assert!(n > 1000, "read {n} rows");
}

/// Costs from litellm's real price table, checked against values computed by hand from its
/// published per-token rates.
#[test]
fn cost_from_the_real_litellm_table() {
    use telltale::event::LlmEvent;
    use telltale::metrics::cost::PriceTable;
    let Some(path) = shared("tables/litellm_model_prices_and_context_window.json") else {
        return;
    };
    let table = PriceTable::load(&path).unwrap();
    assert!(table.len() > 1000, "{} priced models", table.len());
    let call = |model: &str, input: i64, output: i64, cache_read: i64, cache_write: i64| {
        table
            .cost(&LlmEvent {
                model: Some(model.to_owned().into()),
                input_tokens: Some(input),
                output_tokens: Some(output),
                cache_read_tokens: Some(cache_read),
                cache_write_tokens: Some(cache_write),
                ..Default::default()
            })
            .unwrap_or_else(|| panic!("{model} is priced"))
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    // gpt-4o: $2.50 / M input, $10 / M output.
    assert!(close(call("gpt-4o", 1000, 200, 0, 0), 0.0025 + 0.002));
    // gpt-4o with 400 of 1000 input tokens from the prompt cache at $1.25 / M.
    assert!(close(
        call("gpt-4o", 1000, 200, 400, 0),
        600.0 * 2.5e-6 + 400.0 * 1.25e-6 + 0.002
    ));
    // Claude Sonnet 4.5: $3 / M input, $15 / M output, cache reads $0.30 / M, cache writes $3.75 / M.
    let claude = call("claude-sonnet-4-5", 10_000, 500, 6_000, 1_000);
    assert!(
        close(
            claude,
            3_000.0 * 3e-6 + 6_000.0 * 3e-7 + 1_000.0 * 3.75e-6 + 500.0 * 1.5e-5
        ),
        "{claude}"
    );
    // The same model under its provider prefix.
    assert!(close(
        call("anthropic/claude-sonnet-4-5", 10_000, 500, 6_000, 1_000),
        claude
    ));
    // gemini-2.5-pro above 200k input tokens: the whole request at $2.50 / $15 per M.
    assert!(close(
        call("gemini-2.5-pro", 250_000, 1_000, 0, 0),
        250_000.0 * 2.5e-6 + 1_000.0 * 1.5e-5
    ));
}
