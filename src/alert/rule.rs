//! Alert rules: the TOML files in `alerts/`, label matchers and annotation templates.
//!
//! A rule file holds `[[rule]]` entries (and `[[inhibit]]` entries). Every problem in every
//! file is reported at once, each with its file, line, the key's path and what to write instead.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;

use crate::config::ConfigError;
use crate::config::reader::parse_duration;
use crate::config::reader::{Errors, Obj};

/// The metric sources a rule can read (per-window outputs of the stages).
pub const SOURCES: &[&str] = &["metrics", "drift", "quality", "experiments"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchOp {
    Eq,
    Ne,
    Re,
    NotRe,
}

/// `name="value"`, `name!="value"`, `name=~"regex"`, `name!~"regex"` (Alertmanager's syntax;
/// regexes are anchored; a missing label matches as the empty string).
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    op: MatchOp,
    value: String,
    re: Option<Regex>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.op == other.op && self.value == other.value
    }
}

impl Matcher {
    pub fn parse(s: &str) -> Result<Matcher, String> {
        let bad = || {
            format!(
                "{s:?} is not a matcher (expected name=\"value\", name!=\"value\", name=~\"regex\" or name!~\"regex\")"
            )
        };
        let pos = s.find(['=', '!']).ok_or_else(bad)?;
        let name = s[..pos].trim();
        let rest = &s[pos..];
        let (op, raw) = if let Some(r) = rest.strip_prefix("=~") {
            (MatchOp::Re, r)
        } else if let Some(r) = rest.strip_prefix("!~") {
            (MatchOp::NotRe, r)
        } else if let Some(r) = rest.strip_prefix("!=") {
            (MatchOp::Ne, r)
        } else if let Some(r) = rest.strip_prefix('=') {
            (MatchOp::Eq, r)
        } else {
            return Err(bad());
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid_name {
            return Err(bad());
        }
        let raw = raw.trim();
        let value = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(v) => v.replace("\\\"", "\""),
            None if raw.contains('"') => return Err(bad()),
            None => raw.to_owned(),
        };
        let re = match op {
            MatchOp::Re | MatchOp::NotRe => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("{s:?}: invalid regex: {e}"))?,
            ),
            _ => None,
        };
        Ok(Matcher {
            name: name.to_owned(),
            op,
            value,
            re,
        })
    }

    pub fn matches(&self, value: Option<&str>) -> bool {
        let v = value.unwrap_or("");
        match self.op {
            MatchOp::Eq => v == self.value,
            MatchOp::Ne => v != self.value,
            MatchOp::Re => self.re.as_ref().is_some_and(|r| r.is_match(v)),
            MatchOp::NotRe => !self.re.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            MatchOp::Eq => "=",
            MatchOp::Ne => "!=",
            MatchOp::Re => "=~",
            MatchOp::NotRe => "!~",
        };
        write!(f, "{}{op}{:?}", self.name, self.value)
    }
}

/// Whether every matcher accepts the labels `get` returns.
pub fn matches_all<'a>(ms: &[Matcher], get: impl Fn(&str) -> Option<&'a str>) -> bool {
    ms.iter().all(|m| m.matches(get(&m.name)))
}

pub fn parse_matchers(items: &[String], path: &str, e: &mut Errors) -> Vec<Matcher> {
    let mut out = Vec::new();
    for (i, s) in items.iter().enumerate() {
        match Matcher::parse(s) {
            Ok(m) => out.push(m),
            Err(msg) => e.push(&format!("{path}[{i}]"), msg),
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Above,
    Below,
}

impl Cmp {
    pub fn holds(self, v: f64, threshold: f64) -> bool {
        match self {
            Cmp::Above => v > threshold,
            Cmp::Below => v < threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// value / baseline
    Ratio,
    /// value − baseline
    Difference,
}

/// What makes a series' window violate the rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The metric against a fixed value.
    Threshold { cmp: Cmp, value: f64 },
    /// The metric against its own request-weighted mean over the trailing period (the current
    /// window excluded) or over a pinned time range, as a ratio or a difference.
    Change {
        kind: ChangeKind,
        cmp: Cmp,
        value: f64,
        trailing_ms: i64,
        /// `baseline = { from, to }`: a fixed period (epoch ms, to exclusive) instead of the
        /// trailing one, read from the `metrics` table when the stage starts.
        pinned: Option<(i64, i64)>,
        /// `baseline = { prompt_version = "v3", within = "7d" }`: against all the traffic of
        /// that version (the same series otherwise) — its hourly roll-ups within the period
        /// when the stage starts, then every window of it as it arrives.
        versus: Option<(String, i64)>,
    },
    /// (value − mean) / sd of the series' own window values, exponentially weighted with the
    /// given half-life; no decision before `min_history` windows.
    ZScore {
        cmp: Cmp,
        value: f64,
        half_life_ms: i64,
        min_history: u32,
    },
    /// Multi-window SLO burn rate (Google SRE workbook, ch. 5): the bad fraction over both the
    /// long and the short window exceeds `factor` × the error budget (1 − objective). Bad =
    /// errors, or requests slower than `slow_above_ms` when set (read from the histograms).
    BurnRate {
        objective: f64,
        long_ms: i64,
        short_ms: i64,
        factor: f64,
        slow_above_ms: Option<f64>,
    },
}

/// One `[[rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Where it was defined: `alerts/latency.toml:12`.
    pub origin: String,
    pub source: String,
    pub resolution_ms: i64,
    pub select: Vec<Matcher>,
    /// The column of the source's table the condition reads (unused by burn rates).
    pub metric: String,
    /// Windows with fewer events than this are not judged (neither violating nor clear).
    pub min_samples: u64,
    pub condition: Condition,
    pub for_ms: i64,
    pub keep_firing_for_ms: i64,
    pub severity: Severity,
    pub labels: BTreeMap<String, String>,
    pub annotations: Vec<(String, Template)>,
}

/// `[[inhibit]]`: while an alert matching `source` fires, alerts matching `target` with the
/// same values of the `equal` labels are muted.
#[derive(Debug, Clone)]
pub struct Inhibit {
    pub source: Vec<Matcher>,
    pub target: Vec<Matcher>,
    pub equal: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub inhibits: Vec<Inhibit>,
}

/// What a rule file may refer to.
#[derive(Debug, Clone)]
pub struct RuleContext {
    /// Series dimension column names (`app`, `prompt_version`, `attr_team`…).
    pub dimensions: Vec<String>,
    /// The metrics window (the default resolution) and roll-up.
    pub window_ms: i64,
    pub rollup_ms: i64,
    /// The drift window (`source = "drift"` rules judge one per window).
    pub drift_window_ms: i64,
    /// What `source = "quality"` rules can read (from the configured scorers).
    pub quality_metrics: Vec<String>,
    /// The experiments window (`source = "experiments"` rules judge one look per window).
    pub experiments_window_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("{dir}: cannot read alert rules: {source}")]
    Io { dir: String, source: std::io::Error },
    #[error("{}", render(.0))]
    Invalid(Vec<String>),
}

fn render(problems: &[String]) -> String {
    let mut s = format!(
        "{} error{} in alert rules",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  ");
        s.push_str(p);
    }
    s
}

/// Loads every `*.toml` in `dir` (sorted by name). Rule names must be unique across files.
pub fn load_dir(dir: &Path, ctx: &RuleContext) -> Result<RuleSet, RuleError> {
    let io = |source| RuleError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut set = RuleSet::default();
    let mut problems = Vec::new();
    for f in files {
        let src = std::fs::read_to_string(&f).map_err(io)?;
        match parse_rules(&src, &f.display().to_string(), ctx) {
            Ok(s) => {
                set.rules.extend(s.rules);
                set.inhibits.extend(s.inhibits);
            }
            Err(p) => problems.extend(p),
        }
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &set.rules {
        if let Some(first) = seen.insert(&r.name, &r.origin) {
            problems.push(format!(
                "{}: rule name {:?} is already used at {first} (names identify alerts: make it unique)",
                r.origin, r.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(RuleError::Invalid(problems))
    }
}

/// Parses one rule file; on failure, every problem as `file:line: path: message`.
pub fn parse_rules(src: &str, file: &str, ctx: &RuleContext) -> Result<RuleSet, Vec<String>> {
    let table: toml::Table = match src.parse() {
        Ok(t) => t,
        Err(err) => {
            let line = err
                .span()
                .map(|s| line_at(src, s.start))
                .map_or(String::new(), |l| format!(":{l}"));
            return Err(vec![format!(
                "{file}{line}: not valid TOML: {}",
                err.message()
            )]);
        }
    };
    let mut e = Errors::default();
    let mut root = Obj::new("", table);
    let mut set = RuleSet::default();
    for mut r in root.tables(&mut e, "rule") {
        let line = line_of(src, &r.path_of("name")).unwrap_or(1);
        if let Some(rule) = read_rule(&mut r, &mut e, ctx, format!("{file}:{line}")) {
            set.rules.push(rule);
        }
        r.finish(&mut e);
    }
    for mut i in root.tables(&mut e, "inhibit") {
        let source = i.string_list(&mut e, "source").unwrap_or_default();
        let target = i.string_list(&mut e, "target").unwrap_or_default();
        let equal = i.string_list(&mut e, "equal").unwrap_or_default();
        let inh = Inhibit {
            source: parse_matchers(&source, &i.path_of("source"), &mut e),
            target: parse_matchers(&target, &i.path_of("target"), &mut e),
            equal,
        };
        if inh.source.is_empty() || inh.target.is_empty() {
            e.push(
                &i.path_of("target"),
                "an inhibit rule needs both `source` and `target` matchers, e.g. source = ['alertname=\"AppErrorRateHigh\"']",
            );
        }
        i.finish(&mut e);
        set.inhibits.push(inh);
    }
    root.finish(&mut e);
    if e.0.is_empty() {
        Ok(set)
    } else {
        Err(e.0.iter().map(|c| locate(src, file, c)).collect())
    }
}

fn locate(src: &str, file: &str, c: &ConfigError) -> String {
    match line_of(src, &c.path) {
        Some(l) => format!("{file}:{l}: {}: {}", c.path, c.message),
        None => format!("{file}: {}: {}", c.path, c.message),
    }
}

fn line_at(src: &str, byte: usize) -> usize {
    src[..byte.min(src.len())].matches('\n').count() + 1
}

/// The line of the value at `path` (`rule[2].threshold.above`), or of the closest enclosing
/// value that exists (an unknown key is found; a missing one points at its table).
pub fn line_of(src: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(src).ok()?;
    let mut span = None;
    let mut table: Option<&DeTable> = Some(doc.get_ref());
    let mut value: Option<&DeValue> = None;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let key = key.trim_matches('"');
        let t = match (table, value) {
            (Some(t), _) => t,
            (None, Some(DeValue::Table(t))) => t,
            _ => break,
        };
        let Some((_, v)) = t.iter().find(|(k, _)| k.get_ref().as_ref() == key) else {
            break;
        };
        span = Some(v.span());
        let mut v = v.get_ref();
        if let (Some(i), DeValue::Array(items)) = (index, v) {
            let Some(item) = items.get(i) else { break };
            span = Some(item.span());
            v = item.get_ref();
        }
        table = None;
        value = Some(v);
    }
    span.map(|s| line_at(src, s.start))
}

fn ms(d: std::time::Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn read_rule(r: &mut Obj, e: &mut Errors, ctx: &RuleContext, origin: String) -> Option<Rule> {
    let name = r.required_string(e, "name", "e.g. \"SupportBotLatencyHigh\"");
    let source = r.string_or(e, "source", "metrics");
    if !SOURCES.contains(&source.as_str()) {
        e.push(
            &r.path_of("source"),
            format!(
                "{source:?} is not a source (expected one of: {})",
                SOURCES.join(", ")
            ),
        );
    }
    let drift = source == "drift";
    let experiments = source == "experiments";
    let default_res = if drift {
        ctx.drift_window_ms
    } else if experiments {
        ctx.experiments_window_ms
    } else {
        ctx.window_ms
    };
    let res = ms(r.duration(
        e,
        "resolution",
        std::time::Duration::from_millis(default_res as u64),
    ));
    if drift && res != ctx.drift_window_ms {
        e.push(
            &r.path_of("resolution"),
            format!(
                "the drift table has windows of {} only (drift.window)",
                crate::metrics::resolution_name(ctx.drift_window_ms)
            ),
        );
    } else if experiments && res != ctx.experiments_window_ms {
        e.push(
            &r.path_of("resolution"),
            format!(
                "the experiments table has windows of {} only (experiments.window)",
                crate::metrics::resolution_name(ctx.experiments_window_ms)
            ),
        );
    } else if !drift && !experiments && res != ctx.window_ms && res != ctx.rollup_ms {
        e.push(
            &r.path_of("resolution"),
            format!(
                "the metrics table has windows of {} and {} only",
                crate::metrics::resolution_name(ctx.window_ms),
                crate::metrics::resolution_name(ctx.rollup_ms)
            ),
        );
    }
    let select = r.string_list(e, "select").unwrap_or_default();
    let select = parse_matchers(&select, &r.path_of("select"), e);
    let labels_of_source = if experiments {
        crate::alert::engine::experiment_dimensions()
    } else {
        ctx.dimensions.clone()
    };
    for m in &select {
        if !labels_of_source.contains(&m.name) {
            e.push(
                &r.path_of("select"),
                format!(
                    "{:?} is not a {} (the pipeline's are: {})",
                    m.name,
                    if experiments {
                        "label of experiment rows"
                    } else {
                        "series dimension"
                    },
                    labels_of_source.join(", ")
                ),
            );
        }
    }
    let metric = r.string(e, "metric");
    let min_samples = r.integer(e, "min_samples", 0, i64::MAX).unwrap_or(20) as u64;
    let condition = read_condition(r, e, res, &ctx.dimensions);
    if let (Some(m), Some(c)) = (&metric, &condition)
        && matches!(c, Condition::BurnRate { .. })
    {
        e.push(
            &r.path_of("metric"),
            format!("a burn_rate rule reads errors (or the latency histogram with slow_above_ms), not {m:?}: remove `metric`"),
        );
    }
    let needs_metric = !matches!(condition, Some(Condition::BurnRate { .. }) | None);
    if needs_metric && metric.is_none() {
        e.push(
            &r.path_of("metric"),
            "is required (a column of the metrics table, e.g. \"latency_ms_p99\", \"error_rate\", \"cost_usd_sum\")",
        );
    }
    if let Some(m) = &metric
        && drift
        && !crate::drift::table::frame_metrics().contains(m)
    {
        e.push(
            &r.path_of("metric"),
            format!(
                "{m:?} is not a drift verdict (expected one of: {})",
                crate::drift::table::frame_metrics().join(", ")
            ),
        );
    } else if let Some(m) = &metric
        && experiments
        && !crate::experiment::table::FRAME_METRICS.contains(&m.as_str())
    {
        e.push(
            &r.path_of("metric"),
            format!(
                "{m:?} is not an experiment verdict (expected one of: {})",
                crate::experiment::table::FRAME_METRICS.join(", ")
            ),
        );
    } else if let Some(m) = &metric
        && source == "quality"
    {
        // Category rates may be named without a scorer of that category (shipped rules):
        // the rule then never has data.
        let category_rate = crate::quality::Category::ALL.iter().any(|c| {
            crate::quality::table::CATEGORY_METRICS
                .iter()
                .any(|x| *m == format!("{}_{x}", c.name()))
        });
        if !ctx.quality_metrics.contains(m) && !category_rate {
            let known = if ctx.quality_metrics.len() > 1 {
                ctx.quality_metrics.join(", ")
            } else {
                "none: the pipeline has no [[quality.scorer]]".to_owned()
            };
            e.push(
                &r.path_of("metric"),
                format!("{m:?} is not a quality metric (per scorer <name>_pass_rate, _pass_rate_low, _pass_rate_high, _mean_score; per category <category>_fail_rate, _fail_rate_low, _fail_rate_high; this pipeline's: {known})"),
            );
        }
    } else if let Some(m) = &metric
        && !drift
        && !experiments
        && !is_numeric_metric(m)
    {
        e.push(
            &r.path_of("metric"),
            format!("{m:?} is not a numeric column of the metrics table (e.g. \"latency_ms_p99\", \"ttft_ms_p50\", \"error_rate\", \"events\", \"cost_usd_sum\")"),
        );
    }
    let for_ms = ms(r.duration(e, "for", std::time::Duration::ZERO));
    let keep_firing_for_ms = ms(r.duration(e, "keep_firing_for", std::time::Duration::ZERO));
    let severity = match r.string_or(e, "severity", "warning").as_str() {
        "critical" => Severity::Critical,
        "warning" => Severity::Warning,
        "info" => Severity::Info,
        other => {
            e.push(
                &r.path_of("severity"),
                format!("{other:?} is not a severity (expected critical, warning or info)"),
            );
            Severity::Warning
        }
    };
    let labels = r.string_map(e, "labels");
    for k in labels.keys() {
        if k == "alertname" || k == "severity" || labels_of_source.contains(k) {
            e.push(
                &format!("{}.{k}", r.path_of("labels")),
                "is set by telltale (alertname, severity and the series dimensions): choose another name",
            );
        }
    }
    let mut annotations = Vec::new();
    for (k, text) in r.string_map(e, "annotations") {
        match Template::parse(&text, &labels_of_source) {
            Ok(t) => annotations.push((k, t)),
            Err(msg) => e.push(&format!("{}.{k}", r.path_of("annotations")), msg),
        }
    }
    Some(Rule {
        name: name?,
        origin,
        source,
        resolution_ms: res,
        select,
        metric: metric.unwrap_or_default(),
        min_samples,
        condition: condition?,
        for_ms,
        keep_firing_for_ms,
        severity,
        labels,
        annotations,
    })
}

/// Numeric columns of the `metrics` table a rule can compare.
pub fn is_numeric_metric(m: &str) -> bool {
    use crate::metrics::series::{Measure, QUANTILES};
    const PLAIN: &[&str] = &[
        "events",
        "errors",
        "error_rate",
        "input_tokens_sum",
        "output_tokens_sum",
        "cache_read_tokens_sum",
        "cache_write_tokens_sum",
        "reasoning_tokens_sum",
        "cost_usd_sum",
        "cost_computed",
        "cost_unknown",
    ];
    PLAIN.contains(&m)
        || Measure::ALL.iter().any(|x| {
            m.strip_prefix(x.name())
                .and_then(|s| s.strip_prefix('_'))
                .is_some_and(|s| {
                    s == "count" || s == "max" || QUANTILES.iter().any(|(_, q)| *q == s)
                })
        })
}

const CONDITIONS: &[&str] = &["threshold", "change", "zscore", "burn_rate"];

fn read_condition(r: &mut Obj, e: &mut Errors, res: i64, dims: &[String]) -> Option<Condition> {
    let present: Vec<&str> = CONDITIONS.iter().copied().filter(|k| r.has(k)).collect();
    if present.len() != 1 {
        let msg = if present.is_empty() {
            "needs one condition: threshold = { above = 5000 }, change = { ratio_above = 2, trailing = \"1h\" }, zscore = { above = 4 }, or burn_rate = { objective = 0.995 }".to_owned()
        } else {
            format!(
                "has {} conditions ({}): keep one per rule",
                present.len(),
                present.join(", ")
            )
        };
        e.push(&r.path_of("name"), msg);
        r.discard(&["threshold", "change", "zscore", "burn_rate"]);
        return None;
    }
    let dur = |v: i64| std::time::Duration::from_millis(v as u64);
    match present[0] {
        "threshold" => {
            let mut t = r.table(e, "threshold")?;
            let c = cmp_value(
                &mut t,
                e,
                ["above", "below"],
                "threshold = { above = 5000 }",
            );
            t.finish(e);
            let (cmp, value) = c?;
            Some(Condition::Threshold { cmp, value })
        }
        "change" => {
            let mut t = r.table(e, "change")?;
            let has_trailing = t.has("trailing");
            let has_baseline = t.has("baseline");
            let trailing_ms = ms(t.duration(e, "trailing", dur(3_600_000)));
            let mut versus = None;
            let pinned = t.table(e, "baseline").and_then(|mut b| {
                if b.has("prompt_version") {
                    let v = b.required_string(e, "prompt_version", "the version whose traffic is the baseline")?;
                    if !dims.iter().any(|d| d == "prompt_version") {
                        e.push(
                            &b.path_of("prompt_version"),
                            "needs prompt_version among the series dimensions ([metrics] dimensions)",
                        );
                    }
                    let within = ms(b.duration(e, "within", dur(7 * 24 * 3_600_000)));
                    b.finish(e);
                    versus = Some((v, within));
                    return None;
                }
                let mut time = |key: &'static str| {
                    let raw = b.required_string(e, key, "an RFC 3339 time, e.g. \"2026-11-20T00:00:00Z\"")?;
                    match chrono::DateTime::parse_from_rfc3339(&raw) {
                        Ok(t) => Some(t.timestamp_millis()),
                        Err(_) => {
                            e.push(&b.path_of(key), format!("{raw:?} is not an RFC 3339 time (e.g. \"2026-11-20T00:00:00Z\")"));
                            None
                        }
                    }
                };
                let (from, to) = (time("from"), time("to"));
                if let (Some(f), Some(t)) = (from, to)
                    && f >= t
                {
                    e.push(&b.path_of("to"), "must be after `from`");
                }
                b.finish(e);
                Some((from?, to?)).filter(|(f, t)| f < t)
            });
            if has_trailing && has_baseline {
                e.push(
                    &t.path_of("baseline"),
                    "set either `trailing` or `baseline`, not both",
                );
            }
            let keys = [
                "ratio_above",
                "ratio_below",
                "increase_above",
                "decrease_above",
            ];
            let found: Vec<&str> = keys.iter().copied().filter(|k| t.has(k)).collect();
            let out = if found.len() != 1 {
                e.push(
                    &t.path_of("ratio_above"),
                    "needs exactly one of ratio_above, ratio_below, increase_above, decrease_above (e.g. change = { ratio_above = 2.0, trailing = \"1h\" })",
                );
                t.discard(&[
                    "ratio_above",
                    "ratio_below",
                    "increase_above",
                    "decrease_above",
                ]);
                None
            } else {
                let (kind, cmp, key) = match found[0] {
                    "ratio_above" => (ChangeKind::Ratio, Cmp::Above, "ratio_above"),
                    "ratio_below" => (ChangeKind::Ratio, Cmp::Below, "ratio_below"),
                    "increase_above" => (ChangeKind::Difference, Cmp::Above, "increase_above"),
                    _ => (ChangeKind::Difference, Cmp::Below, "decrease_above"),
                };
                let v = t.non_negative(e, key);
                v.map(|v| Condition::Change {
                    kind,
                    cmp,
                    value: if kind == ChangeKind::Difference && cmp == Cmp::Below {
                        -v
                    } else {
                        v
                    },
                    trailing_ms,
                    pinned,
                    versus,
                })
            };
            if trailing_ms < 2 * res {
                e.push(
                    &t.path_of("trailing"),
                    "must span at least two windows of the rule's resolution",
                );
            }
            t.finish(e);
            out
        }
        "zscore" => {
            let mut t = r.table(e, "zscore")?;
            let c = cmp_value(&mut t, e, ["above", "below"], "zscore = { above = 4 }");
            let half_life_ms = ms(t.duration(e, "half_life", dur(6 * 3_600_000)));
            let min_history = t.integer(e, "min_history", 2, 100_000).unwrap_or(30) as u32;
            if half_life_ms < res {
                e.push(&t.path_of("half_life"), "must be at least one window");
            }
            t.finish(e);
            let (cmp, value) = c?;
            Some(Condition::ZScore {
                cmp,
                value,
                half_life_ms,
                min_history,
            })
        }
        _ => {
            let mut t = r.table(e, "burn_rate")?;
            let objective = t.non_negative(e, "objective");
            let long_ms = ms(t.duration(e, "long", dur(3_600_000)));
            let short_ms = ms(t.duration(e, "short", dur(300_000)));
            let factor = t.non_negative(e, "factor").unwrap_or(14.4);
            let slow_above_ms = t.non_negative(e, "slow_above_ms");
            if objective.is_none() && !t.has("objective") {
                e.push(
                    &t.path_of("objective"),
                    "is required (e.g. objective = 0.995 for 99.5 % good requests)",
                );
            }
            if let Some(o) = objective
                && !(0.0..1.0).contains(&o)
            {
                e.push(
                    &t.path_of("objective"),
                    format!("{o} must be below 1 (e.g. 0.995)"),
                );
            }
            if short_ms < res || long_ms <= short_ms || long_ms % res != 0 || short_ms % res != 0 {
                e.push(
                    &t.path_of("short"),
                    "short and long must be multiples of the rule's resolution, with short < long (e.g. long = \"1h\", short = \"5m\")",
                );
            }
            t.finish(e);
            Some(Condition::BurnRate {
                objective: objective.filter(|o| *o < 1.0)?,
                long_ms,
                short_ms,
                factor,
                slow_above_ms,
            })
        }
    }
}

fn cmp_value(
    t: &mut Obj,
    e: &mut Errors,
    keys: [&'static str; 2],
    example: &str,
) -> Option<(Cmp, f64)> {
    let above = t.has(keys[0]);
    let below = t.has(keys[1]);
    if above == below {
        e.push(
            &t.path_of(keys[0]),
            format!(
                "needs exactly one of `{}` or `{}` (e.g. {example})",
                keys[0], keys[1]
            ),
        );
        t.discard(&keys);
        return None;
    }
    let key = if above { keys[0] } else { keys[1] };
    let v = number(t, e, key)?;
    Some((if above { Cmp::Above } else { Cmp::Below }, v))
}

/// Any finite number (thresholds may be negative, e.g. a z-score below −4).
fn number(t: &mut Obj, e: &mut Errors, key: &'static str) -> Option<f64> {
    let path = t.path_of(key);
    match t.value(key)? {
        toml::Value::Integer(i) => Some(i as f64),
        toml::Value::Float(f) if f.is_finite() => Some(f),
        other => {
            e.push(&path, format!("expected a number, got {other}"));
            None
        }
    }
}

/// `{{ .series.prompt_version }}`, `{{ .labels.team }}`, `{{ .value }}`, `{{ .baseline }}`,
/// `{{ .threshold }}`, `{{ .rule }}`, `{{ .severity }}`, `{{ .window }}`, `{{ .rollback_to }}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Var {
    Series(String),
    Label(String),
    Value,
    Baseline,
    Threshold,
    Rule,
    Severity,
    Window,
    RollbackTo,
}

/// What a template is rendered with.
pub trait Scope {
    fn var(&self, v: &Var) -> String;
}

impl Template {
    pub fn parse(s: &str, dimensions: &[String]) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("{s:?}: `{{{{` without a closing `}}}}`"))?;
            let name = after[..close].trim();
            let var = match name {
                ".value" => Var::Value,
                ".baseline" => Var::Baseline,
                ".threshold" => Var::Threshold,
                ".rule" => Var::Rule,
                ".severity" => Var::Severity,
                ".window" => Var::Window,
                ".rollback_to" => Var::RollbackTo,
                n => {
                    if let Some(d) = n.strip_prefix(".series.") {
                        if !dimensions.iter().any(|x| x == d) {
                            return Err(format!(
                                "{{{{ {n} }}}}: {d:?} is not a series dimension (the pipeline's are: {})",
                                dimensions.join(", ")
                            ));
                        }
                        Var::Series(d.to_owned())
                    } else if let Some(l) = n.strip_prefix(".labels.") {
                        Var::Label(l.to_owned())
                    } else {
                        return Err(format!(
                            "{{{{ {n} }}}} is not a template variable (use .series.<dimension>, .labels.<name>, .value, .baseline, .threshold, .rule, .severity, .window or .rollback_to)"
                        ));
                    }
                }
            };
            parts.push(Part::Var(var));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template(parts))
    }

    pub fn render(&self, scope: &dyn Scope) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => out.push_str(&scope.var(v)),
            }
        }
        out
    }
}

/// A number as people read it in an alert: `2350`, `0.0312`, `1.5`.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() && a < 1e15 {
        format!("{}", v.round() as i64)
    } else {
        let digits = (3 - (a.log10().floor() as i32 + 1)).clamp(0, 12) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    }
}

/// Durations in rule files and messages: `90s` → "1m30s" is not needed; "5m", "1h", "90s".
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    parse_duration(s).map(ms)
}
