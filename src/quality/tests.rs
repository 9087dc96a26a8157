use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::pii::{self, PiiKind};
use super::scorer::{self, Case, Check, Field};
use super::*;
use crate::config::reader::{Errors, Obj};

fn case(output: &str) -> Case<'_> {
    Case {
        output: Some(output),
        ..Case::default()
    }
}

fn check(c: &Check, output: &str) -> bool {
    c.score(&case(output), Field::Output)
        .expect("applies")
        .passed
}

fn parse(toml_src: &str) -> Result<QualityConfig, Vec<String>> {
    let table: toml::Table = toml::from_str(toml_src).expect("valid TOML");
    let mut root = Obj::new("", table);
    let mut e = Errors(Vec::new());
    let cfg = config::read_quality(&mut root, std::path::Path::new(""), &mut e);
    if e.0.is_empty() {
        Ok(cfg)
    } else {
        Err(e.0.iter().map(|x| x.to_string()).collect())
    }
}

fn scorer(src: &str) -> ScorerDef {
    let cfg = parse(&format!("[[quality.scorer]]\nname = \"s\"\n{src}")).expect("valid scorer");
    cfg.scorers.into_iter().next().expect("one scorer")
}

#[test]
fn match_scorers_compare_with_expected_and_skip_without_it() {
    let exact = Check::ExactMatch;
    let c = Case {
        output: Some(" Paris "),
        expected: Some("Paris"),
        ..Case::default()
    };
    assert!(exact.score(&c, Field::Output).unwrap().passed);
    let c2 = Case {
        output: Some("paris."),
        expected: Some("Paris"),
        ..Case::default()
    };
    assert!(!exact.score(&c2, Field::Output).unwrap().passed);
    assert!(
        Check::NormalizedMatch
            .score(&c2, Field::Output)
            .unwrap()
            .passed
    );
    // Any of a JSON list of accepted answers.
    let c3 = Case {
        output: Some("The Eiffel Tower"),
        expected: Some(r#"["Tour Eiffel", "Eiffel tower"]"#),
        ..Case::default()
    };
    assert!(
        Check::NormalizedMatch
            .score(&c3, Field::Output)
            .unwrap()
            .passed
    );
    assert!(!Check::ExactMatch.score(&c3, Field::Output).unwrap().passed);
    // Not applicable: no expected answer, or no output.
    assert!(exact.score(&case("x"), Field::Output).is_none());
    assert!(Check::Json.score(&Case::default(), Field::Output).is_none());
    assert_eq!(
        scorer::normalize("The  answer, is: A cat!"),
        "answer is cat"
    );
}

#[test]
fn format_scorers() {
    let re = scorer("type = \"regex\"\npattern = '^\\d{4}-\\d{2}-\\d{2}$'");
    assert!(check(&re.check, "2026-11-27"));
    assert!(!check(&re.check, "27/11/2026"));
    let not = scorer("type = \"regex\"\npattern = '(?i)as an ai'\nmust_match = false");
    assert!(check(&not.check, "Here you go"));
    let s = not
        .check
        .score(&case("As an AI, I think"), Field::Output)
        .unwrap();
    assert!(!s.passed);
    assert!(s.explanation.unwrap().contains("As an AI"));

    assert!(check(&Check::Json, r#"{"a": [1, 2]}"#));
    assert!(check(&Check::Json, "```json\n{\"a\": 1}\n```"));
    assert!(!check(&Check::Json, "{\"a\": 1"));

    let schema = scorer(
        "type = \"json_schema\"\nschema = { type = \"object\", required = [\"answer\"], properties = { answer = { type = \"string\" } } }",
    );
    assert_eq!(schema.kind, "json_schema");
    assert!(check(&schema.check, r#"{"answer": "42"}"#));
    let s = schema
        .check
        .score(&case(r#"{"answer": 42}"#), Field::Output)
        .unwrap();
    assert!(!s.passed);
    assert!(
        s.explanation.as_deref().unwrap().contains("/answer"),
        "{s:?}"
    );
    assert!(!check(&schema.check, r#"{"other": "x"}"#));
    assert!(!check(&schema.check, "not json"));

    let any = scorer("type = \"contains\"\nvalues = [\"refund\", \"exchange\"]");
    assert!(check(&any.check, "We offer a Refund."));
    assert!(!check(&any.check, "No."));
    let all = scorer("type = \"contains\"\nvalues = [\"refund\", \"exchange\"]\nall = true");
    assert!(!check(&all.check, "We offer a refund."));
    assert!(check(&all.check, "refund or exchange"));
    let none = scorer("type = \"not_contains\"\nvalues = [\"TODO\"]\ncase_sensitive = true");
    assert!(check(&none.check, "todo: fine"));
    assert!(!check(&none.check, "TODO: not fine"));

    let len = scorer("type = \"length\"\nmin_chars = 3\nmax_tokens = 10");
    assert!(check(&len.check, "four"));
    assert!(!check(&len.check, "ab"));
    // Tokens: the event's count when it has one, else chars / 4.
    let long = "x".repeat(60);
    assert!(!check(&len.check, &long));
    let reported = Case {
        output: Some(&long),
        output_tokens: Some(5),
        ..Case::default()
    };
    assert!(len.check.score(&reported, Field::Output).unwrap().passed);
}

#[test]
fn refusal_detector_reads_the_opening() {
    for r in [
        "I'm sorry, but I can't help with that request.",
        "I\u{2019}m sorry, but I cannot provide that.",
        "I cannot assist with creating malware.",
        "As an AI language model, I cannot browse the internet.",
        "I'm unable to share personal data.",
    ] {
        assert!(scorer::refusal(r).is_some(), "{r}");
        assert!(!check(&Check::Refusal, r), "{r}");
    }
    for ok in [
        "Sure! Here is the poem you asked for.",
        "The error means the connection was refused; I can help you fix it.",
        "Sorry for the delay: the answer is 42.",
    ] {
        assert!(scorer::refusal(ok).is_none(), "{ok}");
    }
    // Only the opening counts: a quoted refusal deep in a long answer is not one.
    let late = format!(
        "{} I'm sorry, but I can't.",
        "Here is a long answer. ".repeat(20)
    );
    assert!(scorer::refusal(&late).is_none());
}

/// A valid card number of `len` digits with prefix `prefix` (Luhn check digit appended).
fn card(prefix: &str, len: usize, rng: &mut SmallRng) -> String {
    let mut d: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    while d.len() < len - 1 {
        d.push(rng.random_range(0..10));
    }
    for check in 0..10 {
        let mut full = d.clone();
        full.push(check);
        if pii::luhn(&full) {
            return full.iter().map(|x| char::from(b'0' + x)).collect();
        }
    }
    unreachable!("one check digit satisfies Luhn")
}

#[test]
fn pii_detector_validates_what_it_finds() {
    let mut rng = SmallRng::seed_from_u64(7);
    let all = &PiiKind::ALL;
    let kinds = |t: &str| -> Vec<PiiKind> { pii::find(t, all).iter().map(|m| m.kind).collect() };
    assert_eq!(
        kinds("write to jane.doe+work@example.co.uk today"),
        [PiiKind::Email]
    );
    assert_eq!(
        kinds("call (415) 555-0132 or +44 20 7946 0958"),
        [PiiKind::Phone, PiiKind::Phone]
    );
    for _ in 0..50 {
        let visa = card("4", 16, &mut rng);
        let grouped = format!(
            "{} {} {} {}",
            &visa[..4],
            &visa[4..8],
            &visa[8..12],
            &visa[12..]
        );
        assert_eq!(
            kinds(&format!("card {grouped} exp 12/29")),
            [PiiKind::CreditCard],
            "{grouped}"
        );
        // A number right after the card (same separator) is not part of it.
        let found = pii::find(&format!("card {grouped} 2024"), all);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].end - found[0].start, grouped.len());
        let amex = card("37", 15, &mut rng);
        assert_eq!(kinds(&format!("amex {amex}")), [PiiKind::CreditCard]);
        // One digit changed breaks the checksum: not reported.
        let mut broken = visa.into_bytes();
        broken[5] = b'0' + (broken[5] - b'0' + 1) % 10;
        let broken = String::from_utf8(broken).unwrap();
        assert!(kinds(&broken).is_empty(), "{broken}");
    }
    // ISO 13616's example IBANs, grouped and compact; a changed digit fails mod 97.
    assert_eq!(
        kinds("IBAN GB82 WEST 1234 5698 7654 32 please"),
        [PiiKind::Iban]
    );
    assert_eq!(kinds("DE89370400440532013000"), [PiiKind::Iban]);
    assert!(kinds("DE89370400440532013001").is_empty());
    assert_eq!(
        kinds("key sk-proj-abcdefghijklmnopqrstuvwx1234"),
        [PiiKind::Secret]
    );
    assert_eq!(kinds("AKIAIOSFODNN7EXAMPLE"), [PiiKind::Secret]);
    assert_eq!(
        kinds("-----BEGIN RSA PRIVATE KEY-----\nMIIE"),
        [PiiKind::Secret]
    );
    // Numbers that are not PII.
    for clean in [
        "Released 2024-10-12, version 1.2.3.4, build 20241012123456.",
        "The total is 1234567890123 units",
        "Pi is 3.14159265358979",
        "ISBN 978-3-16-148410-0",
        "IP 192.168.100.200",
    ] {
        assert!(kinds(clean).is_empty(), "{clean}: {:?}", kinds(clean));
    }
    // Only the kinds asked for.
    assert!(pii::find("a@b.com", &[PiiKind::Phone]).is_empty());
    assert!(pii::contains("a@b.com", &[PiiKind::Email]));
}

#[test]
fn redaction_numbers_values_and_leaves_no_pii() {
    let text = "Mail ann@x.org, then bob@y.org, then ann@x.org again; card 4111 1111 1111 1111.";
    let r = pii::redact(text, &PiiKind::ALL);
    assert_eq!(
        r,
        "Mail <EMAIL_1>, then <EMAIL_2>, then <EMAIL_1> again; card <CREDIT_CARD_1>."
    );
    assert!(pii::find(&r, &PiiKind::ALL).is_empty());
}

#[test]
fn sampling_rate_is_binomial_deterministic_and_nested() {
    let q = Quality::new(QualityConfig {
        sample_rate: 0.1,
        scorers: vec![
            scorer("type = \"json\""),
            ScorerDef {
                name: "sub".into(),
                sample_rate: Some(0.02),
                ..scorer("type = \"json\"")
            },
        ],
        ..QualityConfig::default()
    });
    let n = 100_000;
    let mut sampled = 0u64;
    let mut sub = 0u64;
    let mut scored = Vec::new();
    for i in 0..n {
        let e = LlmEvent {
            event_id: format!("evt-{i}").into(),
            output: Some("{}".into()),
            status: "ok".into(),
            ..Default::default()
        };
        let first = q.assess(&e, &mut scored);
        let again = q.sample(&e);
        assert_eq!(first, again.map(|x| x.0), "deterministic");
        if first.is_some() {
            sampled += 1;
            assert!(
                scored.iter().any(|s| s.scorer == 0),
                "the base scorer runs on every sampled event"
            );
            sub += scored.iter().filter(|s| s.scorer == 1).count() as u64;
        } else {
            assert!(scored.is_empty());
        }
    }
    // Binomial(n, p): within 4.5 standard deviations (a false failure ≈ 1e-5).
    let within = |k: u64, p: f64| {
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (k as f64 - n as f64 * p).abs() < 4.5 * sd
    };
    assert!(within(sampled, 0.1), "sampled {sampled}");
    assert!(within(sub, 0.02), "nested {sub}");
}

#[test]
fn always_rules_and_per_series_rates() {
    let cfg = parse(
        r#"
[quality]
sample_rate = 0.0
[[quality.sample]]
when = ['app="vip"']
rate = 1.0
[[quality.sample]]
when = ['app="quiet"']
rate = 0.0
[[quality.scorer]]
name = "ok"
type = "refusal"
"#,
    )
    .unwrap();
    let q = Quality::new(cfg);
    let ev = |id: &str, app: &str, status: &str, feedback: Option<f64>| LlmEvent {
        event_id: id.to_owned().into(),
        app: Some(app.to_owned().into()),
        status: status.to_owned().into(),
        feedback,
        output: Some("fine".into()),
        ..Default::default()
    };
    let mut out = Vec::new();
    assert_eq!(
        q.assess(&ev("a", "vip", "ok", None), &mut out),
        Some(SampleReason::Rule)
    );
    assert_eq!(out.len(), 1);
    assert_eq!(q.assess(&ev("b", "other", "ok", None), &mut out), None);
    assert_eq!(
        q.assess(&ev("c", "quiet", "error", None), &mut out),
        Some(SampleReason::Error)
    );
    assert_eq!(
        q.assess(&ev("d", "quiet", "ok", Some(-1.0)), &mut out),
        Some(SampleReason::NegativeFeedback)
    );
    assert_eq!(q.assess(&ev("e", "quiet", "ok", Some(1.0)), &mut out), None);
}

#[test]
fn wilson_interval_covers_at_its_level() {
    // Over many seeded binomial draws the 95 % interval must contain p about 95 % of the
    // time; Wilson's is known to stay near nominal even for small n and extreme p.
    let mut rng = SmallRng::seed_from_u64(11);
    for &(p, n) in &[(0.5, 20u64), (0.9, 30), (0.03, 200), (0.2, 1000)] {
        let runs = 4000;
        let mut covered = 0;
        for _ in 0..runs {
            let k = (0..n).filter(|_| rng.random::<f64>() < p).count() as u64;
            let (lo, hi) = wilson(k, n);
            assert!(lo <= k as f64 / n as f64 && k as f64 / n as f64 <= hi);
            covered += u32::from(lo <= p && p <= hi);
        }
        let rate = f64::from(covered) / f64::from(runs);
        assert!(
            (0.92..=0.99).contains(&rate),
            "p={p} n={n}: coverage {rate}"
        );
    }
    assert_eq!(wilson(0, 0), (0.0, 1.0));
}

#[test]
fn counts_merge_like_one_stream() {
    let mut rng = SmallRng::seed_from_u64(3);
    let verdict = |rng: &mut SmallRng| Scored {
        scorer: rng.random_range(0..3),
        score: Score {
            value: f64::from(rng.random_range(0..=4u8)) / 4.0,
            passed: rng.random(),
            explanation: None,
        },
    };
    let mut whole = QualityCounts::default();
    let mut parts = [QualityCounts::default(), QualityCounts::default()];
    for i in 0..500 {
        let v: Vec<Scored> = (0..rng.random_range(0..3))
            .map(|_| verdict(&mut rng))
            .collect();
        whole.observe(&v);
        parts[i % 2].observe(&v);
    }
    let [mut a, b] = parts;
    a.merge(&b);
    assert_eq!(a.sampled, whole.sampled);
    for (x, y) in a.scorers.iter().zip(&whole.scorers) {
        assert_eq!((x.n, x.passed), (y.n, y.passed));
        assert!((x.value_sum - y.value_sum).abs() < 1e-9);
    }
}

#[test]
fn deferred_scorers_parse_and_skip_the_ingest_path() {
    let cfg = parse(
        r#"
[quality]
sample_rate = 1.0
[quality.judge]
base_url = "http://127.0.0.1:1/v1"
model = "judge"
api_key_env = ""
budget_tokens_per_hour = 5000
[[quality.scorer]]
name = "faithful"
type = "llm_judge"
rubric = "faithfulness"
[[quality.scorer]]
name = "mine"
type = "http"
url = "http://127.0.0.1:1/score"
timeout = "2s"
sample_rate = 0.0
[[quality.scorer]]
name = "json"
type = "json"
"#,
    )
    .unwrap();
    assert_eq!(cfg.judge.model, "judge");
    assert_eq!(cfg.judge.api_key_env, None);
    assert_eq!(cfg.budget_tokens_per_hour, 5000);
    assert_eq!(cfg.scorers[0].category, Category::Hallucination);
    assert_eq!(cfg.scorers[1].category, Category::Custom);
    let q = Quality::new(cfg);
    assert!(q.has_deferred());
    let e = LlmEvent {
        event_id: "e".into(),
        output: Some("{}".into()),
        status: "ok".into(),
        attributes: vec![("context".into(), "ctx".into())],
        ..Default::default()
    };
    let mut out = Vec::new();
    let reason = q.assess(&e, &mut out).unwrap();
    // Inline: only the JSON check; the judge and the endpoint wait for the deferred stage
    // (the endpoint's own rate is 0, so only the judge).
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].scorer, 2);
    let d = q.deferred(&e, reason).unwrap();
    assert_eq!(d.scorers, [0]);
    assert_eq!(
        d.event.attributes.len(),
        1,
        "the context travels with the event"
    );
    // Alert rules may read every scorer (deferred ones from the deferred stage's windows).
    let m = table::frame_metrics(q.scorers());
    assert!(m.contains(&"json_pass_rate".to_owned()));
    assert!(m.contains(&"faithful_pass_rate_low".to_owned()));
    assert!(m.contains(&"hallucination_fail_rate".to_owned()));
}

#[test]
fn config_errors_name_their_paths() {
    let errs = parse(
        r#"
[quality]
sample_rate = 2.0
[[quality.sample]]
when = ['app=vip"']
[[quality.scorer]]
name = "bad name"
type = "regexp"
[[quality.scorer]]
name = "r"
type = "regex"
pattern = "("
[[quality.scorer]]
name = "j"
type = "json_schema"
schema = { type = 12 }
[[quality.scorer]]
name = "p"
type = "pii"
kinds = ["email", "ssn"]
colour = "red"
[[quality.scorer]]
name = "j1"
type = "llm_judge"
rubric = "vibes"
[[quality.scorer]]
name = "j2"
type = "llm_judge"
rubric = "custom"
[[quality.scorer]]
name = "c"
type = "command"
[quality.judge]
concurrency = 0
"#,
    )
    .unwrap_err();
    let all = errs.join("\n");
    for want in [
        "quality.sample_rate",
        "quality.sample[0].when[0]",
        "quality.sample[0].rate",
        "quality.scorer[0].name",
        "quality.scorer[0].type: \"regexp\" is not a scorer type",
        "quality.scorer[1].pattern: invalid regex",
        "quality.scorer[2].schema: invalid JSON Schema",
        "quality.scorer[3].kinds[1]",
        "quality.scorer[3].colour: unknown key",
        "quality.scorer[4].rubric: \"vibes\" is not a rubric",
        "quality.scorer[5].criteria: is required for the custom rubric",
        "quality.scorer[6].command: is required",
        "quality.judge.concurrency",
    ] {
        assert!(all.contains(want), "missing {want:?} in:\n{all}");
    }
}

/// `../shared/data` (third-party data) when present.
fn shared(rel: &str) -> Option<Vec<serde_json::Value>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel);
    let file = std::fs::File::open(&path).ok()?;
    let text = std::io::read_to_string(flate2::read::GzDecoder::new(file)).ok()?;
    Some(
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
    )
}

/// Refusal detector on PyRIT's human-labelled refusal set (half of it ships in
/// ../shared/data; PyRIT also labels off-topic answers as refusals, which an opening-phrase
/// detector does not try to catch, so recall is bounded by that share).
#[test]
fn refusal_precision_recall_on_labelled_data() {
    let Some(rows) = shared("labeled/pyrit_refusal_dev.jsonl.gz") else {
        eprintln!("skipped: ../shared/data is absent");
        return;
    };
    let (mut tp, mut fp, mut fneg, mut tn) = (0, 0, 0, 0);
    for r in &rows {
        let (Some(resp), Some(label)) = (r["response"].as_str(), r["is_refusal"].as_i64()) else {
            continue;
        };
        match (scorer::refusal(resp).is_some(), label == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            (false, false) => tn += 1,
        }
    }
    let precision = f64::from(tp) / f64::from((tp + fp).max(1));
    let recall = f64::from(tp) / f64::from((tp + fneg).max(1));
    eprintln!(
        "refusal on pyrit dev: tp {tp} fp {fp} fn {fneg} tn {tn}; precision {precision:.3} recall {recall:.3}"
    );
    assert!(tp + fp + fneg + tn >= 100);
    assert!(precision >= 0.9, "precision {precision}");
    assert!(recall >= 0.5, "recall {recall}");
}

/// PII detector: false alarms on real answers (ShareGPT responses, which should hold almost
/// no real PII: every hit is printed for inspection), and recall on the same answers with
/// synthetic PII of each kind inserted at a random word boundary.
#[test]
fn pii_precision_recall_on_real_text() {
    let Some(rows) = shared("conversations/sharegpt_pairs_dev.jsonl.gz") else {
        eprintln!("skipped: ../shared/data is absent");
        return;
    };
    let texts: Vec<&str> = rows
        .iter()
        .filter_map(|r| r["response"].as_str())
        .take(5000)
        .collect();
    let mut flagged = 0;
    for t in &texts {
        let found = pii::find(t, &PiiKind::ALL);
        if !found.is_empty() {
            flagged += 1;
            if flagged <= 10 || found[0].kind == PiiKind::CreditCard {
                let m = found[0];
                eprintln!("hit {:?}: {:?}", m.kind, &t[m.start..m.end]);
            }
        }
    }
    let flag_rate = f64::from(flagged) / texts.len() as f64;
    let mut rng = SmallRng::seed_from_u64(5);
    let mut hits = [0u32; 5];
    let trials = 400;
    for i in 0..trials {
        let base = texts[i % texts.len()];
        let cut = base
            .char_indices()
            .filter(|(_, c)| *c == ' ')
            .map(|(j, _)| j)
            .nth(rng.random_range(0..5))
            .unwrap_or(0);
        let values = [
            format!(
                "user{}@mail{}.com",
                rng.random_range(0..999),
                rng.random_range(0..99)
            ),
            format!(
                "({}) 555-{:04}",
                rng.random_range(200..999),
                rng.random_range(0..9999)
            ),
            card("52", 16, &mut rng),
            "GB82 WEST 1234 5698 7654 32".to_owned(),
            format!(
                "sk-{}",
                (0..40)
                    .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                    .collect::<String>()
            ),
        ];
        for (k, v) in values.iter().enumerate() {
            let t = format!("{} {v} {}", &base[..cut], &base[cut..]);
            if pii::find(&t, &[PiiKind::ALL[k]])
                .iter()
                .any(|m| &t[m.start..m.end] == v.as_str())
            {
                hits[k] += 1;
            }
        }
    }
    let recall: Vec<f64> = hits.iter().map(|h| f64::from(*h) / trials as f64).collect();
    eprintln!(
        "pii on {} ShareGPT answers: {flagged} flagged ({:.2} %); recall of inserted values by kind (email, phone, card, iban, secret): {recall:?}",
        texts.len(),
        100.0 * flag_rate
    );
    assert!(flag_rate < 0.02, "flag rate {flag_rate}");
    assert!(recall.iter().all(|r| *r == 1.0), "{recall:?}");
}
