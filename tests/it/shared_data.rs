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

fn lines(path: PathBuf) -> impl Iterator<Item = serde_json::Value> {
    std::io::BufReader::new(flate2::read::GzDecoder::new(
        std::fs::File::open(path).unwrap(),
    ))
    .lines()
    .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
}

/// A prompt as a user retypes it: a typo, a dropped word, a greeting, other case and
/// punctuation (one or two of them).
fn retyped(s: &str, rng: &mut rand::rngs::SmallRng) -> String {
    use rand::Rng;
    let mut words: Vec<String> = s.split(' ').map(str::to_owned).collect();
    for _ in 0..rng.random_range(1..=2) {
        match rng.random_range(0..5) {
            0 => {
                let i = rng.random_range(0..words.len());
                let mut w: Vec<char> = words[i].chars().collect();
                if w.len() >= 4 {
                    let j = rng.random_range(1..w.len() - 2);
                    w.swap(j, j + 1);
                    words[i] = w.into_iter().collect();
                }
            }
            1 if words.len() > 3 => {
                words.remove(rng.random_range(0..words.len()));
            }
            2 => words.insert(0, "Hi, quick question:".into()),
            3 => words.push("Thanks!".into()),
            _ => {
                for w in &mut words {
                    *w = w.to_lowercase().replace(['?', ',', ':', '.'], "");
                }
            }
        }
    }
    words.join(" ")
}

/// Harvest's near-duplicate folding on real questions (TruthfulQA, ShareGPT first turns), each
/// failing 1–5 times as retyped copies: how many copies fold into their own question's example
/// (recall), how many into another's (precision). And templated real prompts: which stay apart.
#[test]
fn harvest_folds_retyped_real_questions_and_keeps_distinct_ones_apart() {
    use rand::{Rng, SeedableRng};
    use telltale::harvest::collect::Candidate;
    use telltale::harvest::{HarvestConfig, Reason};
    let (Some(tqa), Some(sgpt), Some(primes), Some(senators)) = (
        shared("labeled/truthfulqa.jsonl.gz"),
        shared("conversations/sharegpt_pairs_dev.jsonl.gz"),
        shared("labeled/primality_snowball.jsonl.gz"),
        shared("prompts/senator_search_snowball.jsonl.gz"),
    ) else {
        return;
    };
    let mut bases: Vec<String> = lines(tqa)
        .filter_map(|v| v["prompt"].as_str().map(str::to_owned))
        .collect();
    let mut seen = std::collections::HashSet::new();
    bases.extend(
        lines(sgpt)
            .filter(|v| v["turn"] == 0)
            .filter_map(|v| v["prompt"].as_str().map(str::to_owned))
            .filter(|p| (20..600).contains(&p.len()) && seen.insert(p.clone()))
            .take(300),
    );
    let embedder = telltale::drift::embed::CharGramEmbedder::new(1024);
    let hc = HarvestConfig {
        max_event_ids: 100,
        ..HarvestConfig::default()
    };
    let cand = |id: String, input: String| Candidate {
        event_id: id,
        input: Some(input),
        reasons: [Reason::JudgeFail].into(),
        ..Default::default()
    };
    let (mut right, mut wrong, mut dups) = (0usize, 0usize, 0usize);
    for seed in 0..3 {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut cands = Vec::new();
        let mut truth = std::collections::HashMap::new();
        for (k, b) in bases.iter().enumerate() {
            for j in 0..rng.random_range(1..=5) {
                let id = format!("{k}-{j}");
                truth.insert(id.clone(), k);
                cands.push(cand(
                    id,
                    if j == 0 {
                        b.clone()
                    } else {
                        retyped(b, &mut rng)
                    },
                ));
            }
        }
        dups += cands.len() - bases.len();
        for i in (1..cands.len()).rev() {
            cands.swap(i, rng.random_range(0..=i));
        }
        let dir = tempfile::tempdir().unwrap();
        let mut ds =
            telltale::harvest::dataset::Dataset::open(dir.path(), dir.path(), "d").unwrap();
        ds.absorb(cands, &embedder, &hc).unwrap();
        for ex in ds.examples() {
            let own = truth[&ex.provenance.event_ids[0]];
            for id in &ex.provenance.event_ids[1..] {
                if truth[id] == own {
                    right += 1;
                } else {
                    wrong += 1;
                }
            }
        }
    }
    let (precision, recall) = (
        right as f64 / (right + wrong).max(1) as f64,
        right as f64 / dups as f64,
    );
    eprintln!(
        "real questions ({} distinct, 3 runs): folding precision {precision:.4}, recall {recall:.3} ({wrong} folded wrongly of {dups} duplicates)",
        bases.len()
    );
    assert!(precision >= 0.99, "{precision}");
    // Short questions retyped with a greeting or a dropped word change a quarter of their
    // trigrams; precision is what the default threshold protects (measured: 0.996 / 0.736;
    // near_duplicate = 0.84 gives 0.994 / 0.825, 0.8 gives 0.986 / 0.885).
    assert!(recall >= 0.7, "{recall}");

    // Templated prompts: questions that differ only in a number stay apart (a retyped prompt
    // keeps its numbers; amounts, ids and dates are what such prompts are about), while
    // questions that differ in one word of a long template fold into a few examples with
    // their counts ("not 500 copies of the same failure").
    for (file, key, kept_share) in [
        (primes, "question", 1.0..=1.0),
        (senators, "prompt", 0.0..=0.5),
    ] {
        let questions: Vec<String> = lines(file)
            .filter_map(|v| v[key].as_str().map(str::to_owned))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = questions.len();
        let dir = tempfile::tempdir().unwrap();
        let mut ds =
            telltale::harvest::dataset::Dataset::open(dir.path(), dir.path(), "d").unwrap();
        let cands = questions
            .into_iter()
            .enumerate()
            .map(|(i, q)| cand(i.to_string(), q))
            .collect();
        ds.absorb(cands, &embedder, &hc).unwrap();
        let kept = ds.examples().len();
        eprintln!("templated questions ({key}): {kept} of {n} distinct ones kept apart");
        assert!(
            kept_share.contains(&(kept as f64 / n as f64)),
            "{kept} of {n}"
        );
    }
}
