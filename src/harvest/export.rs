//! A dataset version → files eval tools read.
//!
//! - `jsonl`: telltale's canonical examples, one a line.
//! - `promptfoo`: a promptfoo test list (YAML; `tests: file://…` in a promptfooconfig) with
//!   `vars.input` (and `vars.system`), assertions derived from the scorers that failed
//!   (regex, is-json, contains…, llm-rubric for judges), and provenance in `metadata`.
//! - `openai`: OpenAI evals samples (JSON Lines: `input` chat messages, `ideal` when the event
//!   carried a reference answer).
//! - `langfuse`: Langfuse dataset items (a JSON array of `POST /api/public/dataset-items`
//!   bodies; `id` makes re-imports upserts).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::dataset::Example;
use super::{HarvestError, Reason, dataset_err};
use crate::quality::QualityConfig;
use crate::quality::scorer::Check;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Promptfoo,
    OpenAi,
    Langfuse,
}

impl Format {
    pub const NAMES: &'static str = "jsonl, promptfoo, openai, langfuse";

    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "jsonl" | "telltale" => Format::Jsonl,
            "promptfoo" => Format::Promptfoo,
            "openai" | "openai-evals" => Format::OpenAi,
            "langfuse" => Format::Langfuse,
            _ => return None,
        })
    }

    fn suffix(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Promptfoo => "promptfoo.yaml",
            Format::OpenAi => "openai.jsonl",
            Format::Langfuse => "langfuse.json",
        }
    }
}

/// Which examples to export.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Last seen at or after this.
    pub since_ms: Option<i64>,
    /// Any of these reasons (empty: all).
    pub reasons: Vec<Reason>,
    /// Failed on this prompt version (at least once).
    pub prompt_version: Option<String>,
    pub app: Option<String>,
    pub environment: Option<String>,
}

impl Filter {
    pub fn accepts(&self, e: &Example) -> bool {
        let p = &e.provenance;
        self.since_ms
            .is_none_or(|s| e.last_seen_ms().is_some_and(|t| t >= s))
            && (self.reasons.is_empty() || self.reasons.iter().any(|r| e.reasons.contains(r)))
            && self
                .prompt_version
                .as_ref()
                .is_none_or(|v| p.prompt_versions.contains(v))
            && self.app.as_ref().is_none_or(|a| p.app.as_ref() == Some(a))
            && self
                .environment
                .as_ref()
                .is_none_or(|a| p.environment.as_ref() == Some(a))
    }
}

/// Writes `examples` as `format` into `out` (created); returns the file written.
pub fn export(
    examples: &[&Example],
    format: Format,
    dataset: &str,
    version: &str,
    quality: &QualityConfig,
    out: &Path,
) -> Result<PathBuf, HarvestError> {
    std::fs::create_dir_all(out).map_err(|e| dataset_err(out, e))?;
    let path = out.join(format!("{dataset}-{version}.{}", format.suffix()));
    let body = render(examples, format, dataset, version, quality)?;
    crate::sink::write_durably(&path, body.as_bytes())?;
    Ok(path)
}

/// The file's text.
pub fn render(
    examples: &[&Example],
    format: Format,
    dataset: &str,
    version: &str,
    quality: &QualityConfig,
) -> Result<String, HarvestError> {
    let js = |v: &Value| serde_json::to_string(v).expect("JSON values serialize");
    Ok(match format {
        Format::Jsonl => examples
            .iter()
            .map(|e| serde_json::to_string(e).expect("examples serialize") + "\n")
            .collect(),
        Format::OpenAi => examples.iter().map(|e| js(&openai(e)) + "\n").collect(),
        Format::Langfuse => {
            let items: Vec<Value> = examples.iter().map(|e| langfuse(e, dataset)).collect();
            serde_json::to_string_pretty(&items).expect("JSON values serialize") + "\n"
        }
        Format::Promptfoo => {
            let mut s = format!(
                "# promptfoo tests harvested by telltale: dataset {dataset} {version}, {} examples.\n\
                 # Use from a promptfooconfig: `tests: file://<this file>`; prompts read {{{{input}}}}.\n",
                examples.len()
            );
            let tests: Vec<Value> = examples.iter().map(|e| promptfoo(e, quality)).collect();
            yaml(&Value::Array(tests), 0, &mut s);
            s
        }
    })
}

fn openai(e: &Example) -> Value {
    let mut input = Vec::new();
    if let Some(s) = &e.system {
        input.push(json!({"role": "system", "content": s}));
    }
    input.push(json!({"role": "user", "content": e.input}));
    let mut v = json!({ "input": input });
    if let Some(x) = &e.expected {
        v["ideal"] = json!(x);
    }
    v
}

fn metadata(e: &Example) -> Value {
    json!({
        "telltale_id": e.id,
        "reasons": e.reasons,
        "count": e.count,
        "reason_counts": e.reason_counts,
        "event_id": e.provenance.event_id,
        "event_ids": e.provenance.event_ids,
        "first_seen": e.provenance.first_seen,
        "last_seen": e.provenance.last_seen,
        "app": e.provenance.app,
        "environment": e.provenance.environment,
        "model": e.provenance.model,
        "prompt_id": e.provenance.prompt_id,
        "prompt_version": e.provenance.prompt_version,
        "prompt_versions": e.provenance.prompt_versions,
        "production_output": e.output,
        "scores": e.scores,
        "error_type": e.error_type,
        "redacted": e.redacted,
    })
}

fn langfuse(e: &Example, dataset: &str) -> Value {
    let mut input = json!({ "input": e.input });
    if let Some(s) = &e.system {
        input["system"] = json!(s);
    }
    json!({
        "datasetName": dataset,
        "id": e.id,
        "input": input,
        "expectedOutput": e.expected,
        "metadata": metadata(e),
        "status": "ACTIVE",
    })
}

fn promptfoo(e: &Example, quality: &QualityConfig) -> Value {
    let mut vars = json!({ "input": e.input });
    if let Some(s) = &e.system {
        vars["system"] = json!(s);
    }
    let mut asserts: Vec<Value> = Vec::new();
    for s in e.scores.iter().filter(|s| s.passed == Some(false)) {
        let def = quality.scorers.iter().find(|d| d.name == s.name);
        let a = match def.map(|d| &d.check) {
            Some(Check::ExactMatch) | Some(Check::NormalizedMatch) => match &e.expected {
                Some(x) => json!({"type": "equals", "value": x}),
                None => continue,
            },
            Some(Check::Regex { re, must_match }) => json!({
                "type": if *must_match { "regex" } else { "not-regex" },
                "value": re.as_str(),
            }),
            Some(Check::Json) | Some(Check::JsonSchema(_)) => json!({"type": "is-json"}),
            Some(Check::Contains {
                values,
                all,
                case_sensitive,
            }) => json!({
                "type": match (*all, *case_sensitive) {
                    (true, true) => "contains-all",
                    (true, false) => "icontains-all",
                    (false, true) => "contains-any",
                    (false, false) => "icontains-any",
                },
                "value": values,
            }),
            Some(Check::NotContains {
                values,
                case_sensitive,
            }) => json!({
                "type": if *case_sensitive { "not-contains-any" } else { "not-icontains-any" },
                "value": values,
            }),
            Some(Check::Length {
                min_chars,
                max_chars,
                ..
            }) => {
                let mut cond = Vec::new();
                if let Some(n) = min_chars {
                    cond.push(format!("output.length >= {n}"));
                }
                if let Some(n) = max_chars {
                    cond.push(format!("output.length <= {n}"));
                }
                if cond.is_empty() {
                    continue;
                }
                json!({"type": "javascript", "value": cond.join(" && ")})
            }
            Some(Check::Refusal) => {
                rubric("Answers the request instead of refusing or deflecting it.")
            }
            Some(Check::Pii(_)) => rubric(
                "Contains no personal data or secrets: no e-mail addresses, phone numbers, payment card numbers, IBANs, API keys or private keys.",
            ),
            Some(Check::Judge(r)) => rubric(&match &r.criteria {
                Some(c) => c.clone(),
                None => format!("Passes the {:?} rubric ({}).", r.kind, s.name),
            }),
            _ => rubric(&format!(
                "Passes the '{}' check{}",
                s.name,
                s.explanation
                    .as_ref()
                    .map(|x| format!(" (in production it failed: {x})"))
                    .unwrap_or_else(|| ".".into())
            )),
        };
        if !asserts.contains(&a) {
            asserts.push(a);
        }
    }
    if let Some(x) = &e.expected
        && !asserts.iter().any(|a| a["type"] == "equals")
    {
        asserts.push(json!({"type": "factuality", "value": x}));
    }
    if e.reasons.contains(&Reason::NegativeFeedback) {
        asserts.push(rubric(
            "A user rated an earlier answer to this request as bad: the answer must be helpful, correct and on topic.",
        ));
    }
    if asserts.is_empty() {
        asserts.push(rubric(&format!(
            "Responds helpfully and correctly to the request (in production it failed: {}).",
            e.reasons
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let reasons: Vec<&str> = e.reasons.iter().map(|r| r.name()).collect();
    json!({
        "description": format!("{} — {} ({}×)", e.id, reasons.join(", "), e.count),
        "vars": vars,
        "assert": asserts,
        "metadata": metadata(e),
    })
}

fn rubric(text: &str) -> Value {
    json!({"type": "llm-rubric", "value": text})
}

/// Block-style YAML for a JSON value: every scalar string double-quoted with JSON escapes
/// (a subset of YAML's double-quoted style), so nothing a user typed can change the structure.
fn yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        let mut first = true;
                        for (k, x) in ordered(m) {
                            let lead = if first {
                                format!("{pad}- ")
                            } else {
                                format!("{pad}  ")
                            };
                            first = false;
                            entry(&lead, k, x, indent + 2, out);
                        }
                    }
                    Value::Array(a) if !a.is_empty() => {
                        let _ = writeln!(out, "{pad}-");
                        yaml(item, indent + 2, out);
                    }
                    _ => {
                        let _ = writeln!(out, "{pad}- {}", scalar(item));
                    }
                }
            }
        }
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in ordered(m) {
                entry(&pad, k, x, indent, out);
            }
        }
        _ => {
            let _ = writeln!(out, "{pad}{}", scalar(v));
        }
    }
}

/// A promptfoo test reads best as description, vars, assert, then the rest.
fn ordered(m: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let rank = |k: &str| match k {
        "description" => 0,
        "vars" => 1,
        "type" => 1,
        "assert" => 2,
        "value" => 2,
        _ => 3,
    };
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by_key(|(k, _)| rank(k));
    v
}

fn entry(lead: &str, k: &str, x: &Value, indent: usize, out: &mut String) {
    let plain = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        // YAML 1.1 reads these as booleans and null.
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        );
    let key = if plain {
        k.to_owned()
    } else {
        serde_json::to_string(k).expect("strings serialize")
    };
    match x {
        Value::Array(a) if !a.is_empty() => {
            let _ = writeln!(out, "{lead}{key}:");
            yaml(x, indent + 2, out);
        }
        Value::Object(m) if !m.is_empty() => {
            let _ = writeln!(out, "{lead}{key}:");
            yaml(x, indent + 2, out);
        }
        _ => {
            let _ = writeln!(out, "{lead}{key}: {}", scalar(x));
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
        other => serde_json::to_string(other).expect("JSON values serialize"),
    }
}
