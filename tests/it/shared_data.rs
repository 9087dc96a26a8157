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
