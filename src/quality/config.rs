//! `[quality]` of a pipeline file: the sampler and the scorers.
//!
//! ```toml
//! [quality]
//! sample_rate = 0.1                 # base rate (by event-id hash)
//! always_errors = true              # errors are always sampled
//! always_negative_feedback = true   # so are events with feedback < 0
//!
//! [[quality.sample]]                # first matching rule sets the rate (1 = always)
//! when = ['app="support-bot"', 'environment="prod"']
//! rate = 0.5
//!
//! [[quality.scorer]]
//! name = "valid_json"               # evaluation_name in the scores table
//! type = "json_schema"              # see `CHECK_TYPES`
//! schema = { type = "object", required = ["answer"] }
//! when = ['prompt_id="extract"']    # only these events
//! ```

use std::path::Path;

use regex::Regex;

use super::pii::PiiKind;
use super::scorer::{Category, Check, Field};
use super::{QualityConfig, SampleRule, ScorerDef};
use crate::alert::rule::parse_matchers;
use crate::config::reader::{Errors, Obj};

/// The objective check types a scorer can have.
pub const CHECK_TYPES: &[&str] = &[
    "exact_match",
    "normalized_match",
    "regex",
    "json",
    "json_schema",
    "contains",
    "not_contains",
    "length",
    "refusal",
    "pii",
    "llm_judge",
    "command",
    "http",
];

/// `base`: the pipeline file's directory (relative `schema_file`s are resolved against it).
pub(crate) fn read_quality(root: &mut Obj, base: &Path, e: &mut Errors) -> QualityConfig {
    let d = QualityConfig::default();
    let Some(mut t) = root.table(e, "quality") else {
        return d;
    };
    let mut cfg = d.clone();
    cfg.sample_rate = t.float(e, "sample_rate", 0.0, 1.0).unwrap_or(d.sample_rate);
    cfg.always_errors = t.boolean(e, "always_errors").unwrap_or(d.always_errors);
    cfg.always_negative_feedback = t
        .boolean(e, "always_negative_feedback")
        .unwrap_or(d.always_negative_feedback);
    cfg.always_drift_outliers = t
        .boolean(e, "always_drift_outliers")
        .unwrap_or(d.always_drift_outliers);
    for mut r in t.tables(e, "sample") {
        let when = r.string_list(e, "when").unwrap_or_default();
        if when.is_empty() {
            e.push(
                &r.path_of("when"),
                "is required: matchers on event fields, e.g. ['app=\"support-bot\"']",
            );
        }
        let when = parse_matchers(&when, &r.path_of("when"), e);
        let rate = r.float(e, "rate", 0.0, 1.0);
        if rate.is_none() && !r.has("rate") {
            e.push(
                &r.path_of("rate"),
                "is required (0 to 1; 1 samples every match)",
            );
        }
        r.finish(e);
        cfg.rules.push(SampleRule {
            when,
            rate: rate.unwrap_or(1.0),
        });
    }
    cfg.deferred_queue = t
        .integer(e, "deferred_queue", 1, 10_000_000)
        .map_or(d.deferred_queue, |v| v as usize);
    if let Some(mut j) = t.table(e, "judge") {
        let jd = super::judge::JudgeConfig::default();
        let judge = &mut cfg.judge;
        judge.base_url = j.string_or(e, "base_url", &jd.base_url);
        judge.model = j.string_or(e, "model", &jd.model);
        judge.api_key_env = match j.string(e, "api_key_env") {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(v),
            None => jd.api_key_env.clone(),
        };
        judge.timeout = j.duration(e, "timeout", jd.timeout);
        judge.max_attempts = j
            .integer(e, "max_attempts", 1, 20)
            .map_or(jd.max_attempts, |v| v as u32);
        judge.concurrency = j
            .integer(e, "concurrency", 1, 1024)
            .map_or(jd.concurrency, |v| v as usize);
        judge.requests_per_minute = j
            .integer(e, "requests_per_minute", 0, 1_000_000)
            .map_or(jd.requests_per_minute, |v| v as u32);
        judge.json_mode = j.boolean(e, "json_mode").unwrap_or(jd.json_mode);
        judge.max_tokens = j
            .integer(e, "max_tokens", 16, 100_000)
            .map_or(jd.max_tokens, |v| v as u32);
        cfg.budget_tokens_per_hour = j
            .integer(e, "budget_tokens_per_hour", 0, i64::MAX)
            .map_or(d.budget_tokens_per_hour, |v| v as u64);
        cfg.judge_cache = j.string(e, "cache").map(|p| base.join(p));
        j.finish(e);
    }
    for mut s in t.tables(e, "scorer") {
        if let Some(def) = read_scorer(&mut s, base, e) {
            if cfg.scorers.iter().any(|o| o.name == def.name) {
                e.push(
                    &s.path_of("name"),
                    format!("{:?} is already the name of another scorer", def.name),
                );
            }
            cfg.scorers.push(def);
        }
        s.finish(e);
    }
    t.finish(e);
    cfg
}

fn read_scorer(s: &mut Obj, base: &Path, e: &mut Errors) -> Option<ScorerDef> {
    let name = s.required_string(e, "name", "e.g. \"answer_correct\"");
    if let Some(n) = &name
        && !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        e.push(
            &s.path_of("name"),
            format!("{n:?} must be letters, digits and _ (it names alert metrics)"),
        );
    }
    let kind = s.required_string(e, "type", &format!("one of: {}", CHECK_TYPES.join(", ")));
    let version = s.string_or(e, "version", "1");
    let field = match s.string_or(e, "field", "output").as_str() {
        "output" => Field::Output,
        "input" => Field::Input,
        other => {
            e.push(
                &s.path_of("field"),
                format!("{other:?} is not a field (expected \"output\" or \"input\")"),
            );
            Field::Output
        }
    };
    let sample_rate = s.float(e, "sample_rate", 0.0, 1.0);
    let when = s.string_list(e, "when").unwrap_or_default();
    let when = parse_matchers(&when, &s.path_of("when"), e);
    let category = s.string(e, "category").and_then(|c| {
        let parsed = Category::parse(&c);
        if parsed.is_none() {
            let all: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
            e.push(
                &s.path_of("category"),
                format!(
                    "{c:?} is not a category (expected one of: {})",
                    all.join(", ")
                ),
            );
        }
        parsed
    });
    let kind = kind?;
    let Some(&kind) = CHECK_TYPES.iter().find(|k| **k == kind) else {
        e.push(
            &s.path_of("type"),
            format!(
                "{kind:?} is not a scorer type (expected one of: {})",
                CHECK_TYPES.join(", ")
            ),
        );
        return None;
    };
    let check = read_check(s, base, e, kind)?;
    Some(ScorerDef {
        name: name?,
        version,
        kind,
        category: category.unwrap_or_else(|| check.default_category()),
        check,
        field,
        sample_rate,
        when,
    })
}

fn read_check(s: &mut Obj, base: &Path, e: &mut Errors, kind: &str) -> Option<Check> {
    let case_sensitive =
        |s: &mut Obj, e: &mut Errors| s.boolean(e, "case_sensitive").unwrap_or(false);
    let values = |s: &mut Obj, e: &mut Errors| {
        let v = s.string_list(e, "values").unwrap_or_default();
        if v.is_empty() {
            e.push(
                &s.path_of("values"),
                "is required: a non-empty list of strings",
            );
        }
        v
    };
    Some(match kind {
        "exact_match" => Check::ExactMatch,
        "normalized_match" => Check::NormalizedMatch,
        "json" => Check::Json,
        "refusal" => Check::Refusal,
        "regex" => {
            let pattern =
                s.required_string(e, "pattern", "a regular expression (Rust regex syntax)")?;
            let must_match = s.boolean(e, "must_match").unwrap_or(true);
            match Regex::new(&pattern) {
                Ok(re) => Check::Regex { re, must_match },
                Err(err) => {
                    e.push(&s.path_of("pattern"), format!("invalid regex: {err}"));
                    return None;
                }
            }
        }
        "json_schema" => {
            let schema = match (s.value("schema"), s.string(e, "schema_file")) {
                (Some(v), None) => serde_json::to_value(v).ok(),
                (None, Some(path)) => match std::fs::read_to_string(base.join(&path)) {
                    Ok(text) => match serde_json::from_str(&text) {
                        Ok(v) => Some(v),
                        Err(err) => {
                            e.push(
                                &s.path_of("schema_file"),
                                format!("{path}: not JSON: {err}"),
                            );
                            None
                        }
                    },
                    Err(err) => {
                        e.push(&s.path_of("schema_file"), format!("{path}: {err}"));
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    e.push(
                        &s.path_of("schema"),
                        "give `schema` or `schema_file`, not both",
                    );
                    None
                }
                (None, None) => {
                    e.push(
                        &s.path_of("schema"),
                        "is required: an inline JSON Schema table, or `schema_file` = a path",
                    );
                    None
                }
            }?;
            match jsonschema::validator_for(&schema) {
                Ok(v) => Check::JsonSchema(Box::new(v)),
                Err(err) => {
                    e.push(&s.path_of("schema"), format!("invalid JSON Schema: {err}"));
                    return None;
                }
            }
        }
        "contains" => Check::Contains {
            values: values(s, e),
            all: s.boolean(e, "all").unwrap_or(false),
            case_sensitive: case_sensitive(s, e),
        },
        "not_contains" => Check::NotContains {
            values: values(s, e),
            case_sensitive: case_sensitive(s, e),
        },
        "length" => {
            let int = |s: &mut Obj, e: &mut Errors, k| s.integer(e, k, 0, i64::MAX);
            let (min_c, max_c) = (int(s, e, "min_chars"), int(s, e, "max_chars"));
            let (min_t, max_t) = (int(s, e, "min_tokens"), int(s, e, "max_tokens"));
            if [min_c, max_c, min_t, max_t].iter().all(Option::is_none) {
                e.push(
                    &s.path_of("max_chars"),
                    "a length scorer needs at least one of min_chars, max_chars, min_tokens, max_tokens",
                );
            }
            Check::Length {
                min_chars: min_c.map(|v| v as usize),
                max_chars: max_c.map(|v| v as usize),
                min_tokens: min_t,
                max_tokens: max_t,
            }
        }
        "pii" => {
            let names = s.string_list(e, "kinds");
            let kinds = match names {
                None => PiiKind::ALL.to_vec(),
                Some(names) => {
                    let mut kinds = Vec::new();
                    for (i, n) in names.iter().enumerate() {
                        match PiiKind::parse(n) {
                            Some(k) => kinds.push(k),
                            None => {
                                let all: Vec<&str> =
                                    PiiKind::ALL.iter().map(|k| k.name()).collect();
                                e.push(
                                    &format!("{}[{i}]", s.path_of("kinds")),
                                    format!(
                                        "{n:?} is not a PII kind (expected one of: {})",
                                        all.join(", ")
                                    ),
                                );
                            }
                        }
                    }
                    kinds
                }
            };
            Check::Pii(kinds)
        }
        "llm_judge" => {
            let rubric = s.required_string(
                e,
                "rubric",
                "correctness, relevance, faithfulness, safety or custom",
            )?;
            let Some(kind) = super::judge::RubricKind::parse(&rubric) else {
                e.push(
                    &s.path_of("rubric"),
                    format!("{rubric:?} is not a rubric (expected correctness, relevance, faithfulness, safety or custom)"),
                );
                return None;
            };
            let criteria = s.string(e, "criteria");
            if kind == super::judge::RubricKind::Custom && criteria.is_none() {
                e.push(
                    &s.path_of("criteria"),
                    "is required for the custom rubric: what a good answer is",
                );
            }
            let version = s.string_or(e, "rubric_version", "1");
            Check::Judge(super::judge::Rubric {
                kind,
                criteria,
                version,
            })
        }
        "command" => {
            let argv = s.string_list(e, "command").unwrap_or_default();
            if argv.is_empty() {
                e.push(
                    &s.path_of("command"),
                    "is required: the program and its arguments, e.g. [\"python3\", \"scorer.py\"]",
                );
                return None;
            }
            let argv = argv
                .into_iter()
                .enumerate()
                .map(|(i, a)| {
                    // A relative script path (not the program itself) is relative to the file.
                    if i > 0 && !a.starts_with('-') && base.join(&a).exists() {
                        base.join(&a).display().to_string()
                    } else {
                        a
                    }
                })
                .collect();
            Check::Command {
                argv,
                timeout: s.duration(e, "timeout", std::time::Duration::from_secs(10)),
            }
        }
        "http" => Check::Http {
            url: s.required_string(
                e,
                "url",
                "the scorer's endpoint, e.g. \"http://127.0.0.1:8080/score\"",
            )?,
            timeout: s.duration(e, "timeout", std::time::Duration::from_secs(10)),
        },
        _ => unreachable!("checked against CHECK_TYPES"),
    })
}
