//! Objective scorers: checks computed from the case alone, no model call.
//!
//! Scorers know nothing of Kafka, windows or Parquet: they take a [`Case`] (the texts of one
//! production event, or one row of an eval dataset) and return a [`Score`], so the same
//! definitions run over an eval file offline.
//!
//! Every score is pass/fail with a value in [0, 1] (1 = pass). Detectors (refusal, PII) pass
//! when nothing is detected, so a low pass rate is bad for every scorer, and the category rate
//! (`refusal_rate`, `pii_rate`) is the failure rate of its scorers.

use std::borrow::Cow;

use regex::Regex;

use super::pii::{self, PiiKind};

/// The texts a scorer sees.
#[derive(Debug, Clone, Copy, Default)]
pub struct Case<'a> {
    pub input: Option<&'a str>,
    pub output: Option<&'a str>,
    pub expected: Option<&'a str>,
    pub system: Option<&'a str>,
    /// Retrieved context the answer should be faithful to (the event's `context` attribute).
    pub context: Option<&'a str>,
    /// The output's token count when the event reports it.
    pub output_tokens: Option<i64>,
}

impl<'a> Case<'a> {
    /// An event's texts (the `context` attribute is the faithfulness context).
    pub fn of(e: &'a crate::event::LlmEvent<'_>) -> Case<'a> {
        Case {
            input: e.input.as_deref(),
            output: e.output.as_deref(),
            expected: e.expected.as_deref(),
            system: e.system.as_deref(),
            context: e
                .attributes
                .iter()
                .find(|(k, _)| k == "context")
                .map(|(_, v)| &**v),
            output_tokens: e.output_tokens,
        }
    }

    pub fn field(&self, f: Field) -> Option<&'a str> {
        match f {
            Field::Input => self.input,
            Field::Output => self.output,
        }
    }
}

/// Which text a scorer checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Input,
    Output,
}

/// One scorer's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub value: f64,
    pub passed: bool,
    pub explanation: Option<String>,
}

impl Score {
    fn pass() -> Score {
        Score {
            value: 1.0,
            passed: true,
            explanation: None,
        }
    }
    fn fail(why: impl Into<String>) -> Score {
        Score {
            value: 0.0,
            passed: false,
            explanation: Some(why.into()),
        }
    }
    fn check(ok: bool, why: impl FnOnce() -> String) -> Score {
        if ok {
            Score::pass()
        } else {
            Score::fail(why())
        }
    }
    pub fn label(&self) -> &'static str {
        if self.passed { "pass" } else { "fail" }
    }
}

/// What a scorer measures, for the per-window rates alert rules use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    Correctness,
    Format,
    Refusal,
    Pii,
    Hallucination,
    Unsafe,
    Relevance,
    Custom,
}

impl Category {
    pub const ALL: [Category; 8] = [
        Category::Correctness,
        Category::Format,
        Category::Refusal,
        Category::Pii,
        Category::Hallucination,
        Category::Unsafe,
        Category::Relevance,
        Category::Custom,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Category::Correctness => "correctness",
            Category::Format => "format",
            Category::Refusal => "refusal",
            Category::Pii => "pii",
            Category::Hallucination => "hallucination",
            Category::Unsafe => "unsafe",
            Category::Relevance => "relevance",
            Category::Custom => "custom",
        }
    }
    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// An objective check.
#[derive(Debug, Clone)]
pub enum Check {
    /// The field equals `expected` (any of them when `expected` is a JSON array of strings).
    ExactMatch,
    /// The same after SQuAD normalization: lower case, no punctuation or articles, single
    /// spaces.
    NormalizedMatch,
    /// The regex matches (`must_match`) or does not.
    Regex { re: Regex, must_match: bool },
    /// The field parses as JSON (a fenced ```json block is unwrapped first).
    Json,
    /// The field parses as JSON and validates against the schema.
    JsonSchema(Box<jsonschema::Validator>),
    /// The field contains any (or `all`) of the values.
    Contains {
        values: Vec<String>,
        all: bool,
        case_sensitive: bool,
    },
    /// The field contains none of the values.
    NotContains {
        values: Vec<String>,
        case_sensitive: bool,
    },
    /// Length bounds; tokens are the event's `output_tokens` for outputs, else ≈ chars / 4.
    Length {
        min_chars: Option<usize>,
        max_chars: Option<usize>,
        min_tokens: Option<i64>,
        max_tokens: Option<i64>,
    },
    /// Fails when the output reads as a refusal.
    Refusal,
    /// Fails when any of the kinds is found.
    Pii(Vec<PiiKind>),
    /// LLM-as-a-judge (scored off the ingest path, by the deferred stage).
    Judge(super::judge::Rubric),
    /// An external command speaking the custom-scorer protocol (deferred).
    Command {
        argv: Vec<String>,
        timeout: std::time::Duration,
    },
    /// An HTTP endpoint speaking the custom-scorer protocol (deferred).
    Http {
        url: String,
        timeout: std::time::Duration,
    },
}

impl Check {
    /// Whether the check runs off the ingest path (it calls a model or another process).
    pub fn is_deferred(&self) -> bool {
        matches!(
            self,
            Check::Judge(_) | Check::Command { .. } | Check::Http { .. }
        )
    }

    /// The category a check reports under unless configured otherwise.
    pub fn default_category(&self) -> Category {
        match self {
            Check::Judge(r) => r.kind.category(),
            Check::Command { .. } | Check::Http { .. } => Category::Custom,
            Check::ExactMatch | Check::NormalizedMatch | Check::Contains { .. } => {
                Category::Correctness
            }
            Check::Refusal => Category::Refusal,
            Check::Pii(_) => Category::Pii,
            _ => Category::Format,
        }
    }

    /// The verdict on `case`'s `field`; `None` when the check does not apply (no text, or no
    /// `expected` for a match).
    pub fn score(&self, case: &Case<'_>, field: Field) -> Option<Score> {
        if self.is_deferred() {
            return None;
        }
        let text = case.field(field)?;
        Some(match self {
            Check::ExactMatch => {
                let expected = case.expected?;
                let ok = answers(expected).iter().any(|a| a.trim() == text.trim());
                Score::check(ok, || format!("expected {}", clip(expected)))
            }
            Check::NormalizedMatch => {
                let expected = case.expected?;
                let got = normalize(text);
                let ok = answers(expected).iter().any(|a| normalize(a) == got);
                Score::check(ok, || format!("expected {}", clip(expected)))
            }
            Check::Regex { re, must_match } => {
                let found = re.find(text);
                match (found, must_match) {
                    (Some(_), true) | (None, false) => Score::pass(),
                    (None, true) => Score::fail(format!("no match for /{}/", re.as_str())),
                    (Some(m), false) => Score::fail(format!("matched {:?}", clip(m.as_str()))),
                }
            }
            Check::Json => match serde_json::from_str::<serde::de::IgnoredAny>(json_body(text)) {
                Ok(_) => Score::pass(),
                Err(e) => Score::fail(format!("invalid JSON: {e}")),
            },
            Check::JsonSchema(v) => {
                match serde_json::from_str::<serde_json::Value>(json_body(text)) {
                    Err(e) => Score::fail(format!("invalid JSON: {e}")),
                    Ok(doc) => match v.iter_errors(&doc).next() {
                        None => Score::pass(),
                        Some(err) => Score::fail(format!(
                            "schema: {} at {}",
                            err,
                            if err.instance_path().as_str().is_empty() {
                                "/"
                            } else {
                                err.instance_path().as_str()
                            }
                        )),
                    },
                }
            }
            Check::Contains {
                values,
                all,
                case_sensitive,
            } => {
                let hay = fold(text, *case_sensitive);
                let missing: Vec<&str> = values
                    .iter()
                    .filter(|v| !hay.contains(&*fold(v, *case_sensitive)))
                    .map(String::as_str)
                    .collect();
                let ok = if *all {
                    missing.is_empty()
                } else {
                    missing.len() < values.len()
                };
                Score::check(ok, || format!("missing {}", missing.join(", ")))
            }
            Check::NotContains {
                values,
                case_sensitive,
            } => {
                let hay = fold(text, *case_sensitive);
                let found: Vec<&str> = values
                    .iter()
                    .filter(|v| hay.contains(&*fold(v, *case_sensitive)))
                    .map(String::as_str)
                    .collect();
                Score::check(found.is_empty(), || {
                    format!("contains {}", found.join(", "))
                })
            }
            Check::Length {
                min_chars,
                max_chars,
                min_tokens,
                max_tokens,
            } => {
                let chars = text.chars().count();
                let tokens = match (field, case.output_tokens) {
                    (Field::Output, Some(t)) => t,
                    _ => chars.div_ceil(4) as i64,
                };
                let mut why = Vec::new();
                if min_chars.is_some_and(|m| chars < m) {
                    why.push(format!("{chars} chars < {}", min_chars.unwrap_or(0)));
                }
                if max_chars.is_some_and(|m| chars > m) {
                    why.push(format!("{chars} chars > {}", max_chars.unwrap_or(0)));
                }
                if min_tokens.is_some_and(|m| tokens < m) {
                    why.push(format!("{tokens} tokens < {}", min_tokens.unwrap_or(0)));
                }
                if max_tokens.is_some_and(|m| tokens > m) {
                    why.push(format!("{tokens} tokens > {}", max_tokens.unwrap_or(0)));
                }
                Score::check(why.is_empty(), || why.join(", "))
            }
            Check::Refusal => {
                let r = refusal(text);
                Score::check(r.is_none(), || format!("refusal: {:?}", r.unwrap_or("")))
            }
            Check::Pii(kinds) => {
                let found = pii::find(text, kinds);
                Score::check(found.is_empty(), || {
                    let mut names: Vec<&str> = found.iter().map(|m| m.kind.name()).collect();
                    names.dedup();
                    format!("found {}", names.join(", "))
                })
            }
            Check::Judge(_) | Check::Command { .. } | Check::Http { .. } => {
                unreachable!("deferred checks return above")
            }
        })
    }
}

/// The accepted answers: the elements of a JSON array of strings, else the text itself.
fn answers(expected: &str) -> Vec<Cow<'_, str>> {
    if expected.trim_start().starts_with('[')
        && let Ok(list) = serde_json::from_str::<Vec<String>>(expected)
    {
        return list.into_iter().map(Cow::Owned).collect();
    }
    vec![Cow::Borrowed(expected)]
}

fn fold(s: &str, case_sensitive: bool) -> Cow<'_, str> {
    if case_sensitive {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.to_lowercase())
    }
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{:?}…", &s[..i]),
        None => format!("{s:?}"),
    }
}

/// SQuAD's answer normalization: lower case, punctuation removed, articles (a, an, the)
/// removed, whitespace collapsed.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let cleaned: String = lower
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The JSON inside a Markdown code fence, else the trimmed text.
fn json_body(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```") {
        let rest = rest.strip_prefix("json").unwrap_or(rest);
        if let Some(end) = rest.rfind("```") {
            return rest[..end].trim();
        }
    }
    t
}

/// Refusal openings: an apology or inability statement followed by a refusal, or a policy
/// statement. Looked for in the first 300 characters (refusals come first), case-insensitive,
/// typographic apostrophes folded.
const REFUSAL_PHRASES: &[&str] = &[
    "i'm sorry, but",
    "i am sorry, but",
    "sorry, but i can",
    "i apologize, but",
    "i'm sorry, i can",
    "i am sorry, i can",
    "i'm sorry, i cannot",
    "i can't help with",
    "i cannot help with",
    "i can't assist",
    "i cannot assist",
    "i can't provide",
    "i cannot provide",
    "i can't fulfill",
    "i cannot fulfill",
    "i can't comply",
    "i cannot comply",
    "i can't create",
    "i cannot create",
    "i can't write",
    "i cannot write",
    "i can't do that",
    "i cannot do that",
    "i can't engage",
    "i cannot engage",
    "i can't support",
    "i cannot support",
    "i won't be able",
    "i will not be able",
    "i won't provide",
    "i will not provide",
    "i won't help",
    "i am unable to",
    "i'm unable to",
    "i am not able to",
    "i'm not able to",
    "unable to comply",
    "i must decline",
    "i have to decline",
    "i'm not comfortable",
    "i am not comfortable",
    "as an ai language model, i can",
    "as an ai, i can",
    "against my guidelines",
    "against my programming",
    "violates my guidelines",
    "not appropriate for me to",
    "it is not appropriate to",
    "it's not appropriate to",
];

static REFUSAL: std::sync::LazyLock<aho_corasick::AhoCorasick> = std::sync::LazyLock::new(|| {
    // Each phrase also with the typographic apostrophe.
    let curly = REFUSAL_PHRASES.iter().map(|p| p.replace('\'', "\u{2019}"));
    let all: Vec<String> = REFUSAL_PHRASES
        .iter()
        .map(|p| (*p).to_owned())
        .chain(curly)
        .collect();
    aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(all)
        .expect("refusal phrases compile")
});

/// The refusal phrase the text opens with, if any.
pub fn refusal(text: &str) -> Option<&'static str> {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let m = REFUSAL.find(&text[..end])?;
    Some(REFUSAL_PHRASES[m.pattern().as_usize() % REFUSAL_PHRASES.len()])
}
