//! Reading a TOML table into typed values while collecting every error with its path.
//!
//! Each [`Obj`] owns its table and removes keys as they are read; whatever is left at
//! [`Obj::finish`] is an unknown key, reported with the closest known key as a hint.

use std::collections::BTreeMap;
use std::time::Duration;

use super::ConfigError;

/// Collected errors of one load.
#[derive(Default)]
pub struct Errors(pub Vec<ConfigError>);

impl Errors {
    pub fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

pub struct Obj {
    path: String,
    map: toml::Table,
    known: Vec<&'static str>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

impl Obj {
    pub fn new(path: impl Into<String>, map: toml::Table) -> Obj {
        Obj {
            path: path.into(),
            map,
            known: Vec::new(),
        }
    }

    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn take(&mut self, key: &'static str) -> Option<toml::Value> {
        self.known.push(key);
        self.map.remove(key)
    }

    /// The raw value, for types the helpers below do not cover.
    pub fn value(&mut self, key: &'static str) -> Option<toml::Value> {
        self.take(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn string(&mut self, e: &mut Errors, key: &'static str) -> Option<String> {
        match self.take(key)? {
            toml::Value::String(s) => Some(s),
            other => {
                e.push(
                    &self.path_of(key),
                    format!("expected a string, got {}", type_name(&other)),
                );
                None
            }
        }
    }

    pub fn string_or(&mut self, e: &mut Errors, key: &'static str, default: &str) -> String {
        self.string(e, key).unwrap_or_else(|| default.to_owned())
    }

    pub fn required_string(
        &mut self,
        e: &mut Errors,
        key: &'static str,
        hint: &str,
    ) -> Option<String> {
        let present = self.has(key);
        let v = self.string(e, key);
        if !present {
            e.push(&self.path_of(key), format!("is required ({hint})"));
        }
        v.filter(|s| {
            if s.trim().is_empty() {
                e.push(&self.path_of(key), format!("must not be empty ({hint})"));
                false
            } else {
                true
            }
        })
    }

    pub fn integer(
        &mut self,
        e: &mut Errors,
        key: &'static str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        match self.take(key)? {
            toml::Value::Integer(i) if (min..=max).contains(&i) => Some(i),
            toml::Value::Integer(i) => {
                e.push(
                    &self.path_of(key),
                    format!("{i} is out of range (expected {min} to {max})"),
                );
                None
            }
            other => {
                e.push(
                    &self.path_of(key),
                    format!("expected an integer, got {}", type_name(&other)),
                );
                None
            }
        }
    }

    /// A number (integer or float) in `min..=max`.
    pub fn float(&mut self, e: &mut Errors, key: &'static str, min: f64, max: f64) -> Option<f64> {
        let v = match self.take(key)? {
            toml::Value::Integer(i) => i as f64,
            toml::Value::Float(f) => f,
            other => {
                e.push(
                    &self.path_of(key),
                    format!("expected a number, got {}", type_name(&other)),
                );
                return None;
            }
        };
        if (min..=max).contains(&v) {
            Some(v)
        } else {
            e.push(
                &self.path_of(key),
                format!("{v} is out of range (expected {min} to {max})"),
            );
            None
        }
    }

    pub fn string_list(&mut self, e: &mut Errors, key: &'static str) -> Option<Vec<String>> {
        let path = self.path_of(key);
        match self.take(key)? {
            toml::Value::String(s) => Some(vec![s]),
            toml::Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => e.push(
                            &format!("{path}[{i}]"),
                            format!("expected a string, got {}", type_name(&other)),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                e.push(
                    &path,
                    format!("expected a list of strings, got {}", type_name(&other)),
                );
                None
            }
        }
    }

    /// A table of string values (numbers and booleans are accepted and written as text,
    /// as librdkafka properties are).
    pub fn string_map(&mut self, e: &mut Errors, key: &'static str) -> BTreeMap<String, String> {
        let path = self.path_of(key);
        let mut out = BTreeMap::new();
        match self.take(key) {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (k, v) in t {
                    match v {
                        toml::Value::String(s) => {
                            out.insert(k, s);
                        }
                        toml::Value::Integer(i) => {
                            out.insert(k, i.to_string());
                        }
                        toml::Value::Boolean(b) => {
                            out.insert(k, b.to_string());
                        }
                        other => e.push(
                            &join(&path, &k),
                            format!("expected a string, got {}", type_name(&other)),
                        ),
                    }
                }
            }
            Some(other) => e.push(
                &path,
                format!("expected a table, got {}", type_name(&other)),
            ),
        }
        out
    }

    /// A string value parsed by `parse`; integers go through `from_int` (sizes accept bytes).
    fn parsed<T>(
        &mut self,
        e: &mut Errors,
        key: &'static str,
        default: T,
        parse: fn(&str) -> Result<T, String>,
        from_int: fn(i64) -> Option<T>,
        example: &str,
    ) -> T {
        let path = self.path_of(key);
        let got = match self.take(key) {
            None => return default,
            Some(toml::Value::String(s)) => parse(&s),
            Some(toml::Value::Integer(i)) if from_int(i).is_some() => {
                Ok(from_int(i).expect("checked"))
            }
            Some(other) => Err(format!(
                "expected a string such as {example:?}, got {}",
                type_name(&other)
            )),
        };
        got.unwrap_or_else(|msg| {
            e.push(&path, msg);
            default
        })
    }

    pub fn duration(&mut self, e: &mut Errors, key: &'static str, default: Duration) -> Duration {
        self.parsed(e, key, default, parse_duration, |_| None, "30s")
    }

    pub fn size(&mut self, e: &mut Errors, key: &'static str, default: u64) -> u64 {
        self.parsed(
            e,
            key,
            default,
            parse_size,
            |i| u64::try_from(i).ok(),
            "128MiB",
        )
    }

    /// A number (integer or float) that must be finite and at least 0.
    pub fn non_negative(&mut self, e: &mut Errors, key: &'static str) -> Option<f64> {
        let v = match self.take(key)? {
            toml::Value::Float(f) => f,
            toml::Value::Integer(i) => i as f64,
            other => {
                e.push(
                    &self.path_of(key),
                    format!("expected a number, got {}", type_name(&other)),
                );
                return None;
            }
        };
        if !v.is_finite() || v < 0.0 {
            e.push(&self.path_of(key), format!("{v} must be a number ≥ 0"));
            return None;
        }
        Some(v)
    }

    pub fn boolean(&mut self, e: &mut Errors, key: &'static str) -> Option<bool> {
        match self.take(key)? {
            toml::Value::Boolean(b) => Some(b),
            other => {
                e.push(
                    &self.path_of(key),
                    format!("expected true or false, got {}", type_name(&other)),
                );
                None
            }
        }
    }

    /// Every remaining entry as a named sub-table (tables keyed by user-chosen names).
    pub fn named_tables(&mut self, e: &mut Errors) -> Vec<(String, Obj)> {
        let mut out = Vec::new();
        for (k, v) in std::mem::take(&mut self.map) {
            let path = join(&self.path, &format!("{k:?}"));
            match v {
                toml::Value::Table(t) => out.push((k, Obj::new(path, t))),
                other => e.push(
                    &path,
                    format!("expected a table, got {}", type_name(&other)),
                ),
            }
        }
        out
    }

    /// An array of tables (`[[a.b]]` or `b = [{…}, {…}]`); empty when absent.
    pub fn tables(&mut self, e: &mut Errors, key: &'static str) -> Vec<Obj> {
        let path = self.path_of(key);
        match self.take(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    toml::Value::Table(t) => Some(Obj::new(format!("{path}[{i}]"), t)),
                    other => {
                        e.push(
                            &format!("{path}[{i}]"),
                            format!("expected a table, got {}", type_name(&other)),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                e.push(
                    &path,
                    format!("expected an array of tables, got {}", type_name(&other)),
                );
                Vec::new()
            }
        }
    }

    /// A sub-table; `None` (and no error) when absent.
    pub fn table(&mut self, e: &mut Errors, key: &'static str) -> Option<Obj> {
        let path = self.path_of(key);
        match self.take(key)? {
            toml::Value::Table(t) => Some(Obj::new(path, t)),
            other => {
                e.push(
                    &path,
                    format!("expected a table, got {}", type_name(&other)),
                );
                None
            }
        }
    }

    /// Drops keys unread (they cannot be checked, e.g. when the variant is unknown).
    pub fn discard(&mut self, keys: &[&'static str]) {
        for k in keys {
            self.take(k);
        }
    }

    /// Reports every key that was not read, with the closest known key as a hint.
    pub fn finish(self, e: &mut Errors) {
        for key in self.map.keys() {
            let hint = self
                .known
                .iter()
                .map(|k| (strsim::levenshtein(k, key), *k))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, k)| format!(" (did you mean `{k}`?)"))
                .unwrap_or_else(|| {
                    let mut known = self.known.clone();
                    known.sort_unstable();
                    known.dedup();
                    format!(" (known keys: {})", known.join(", "))
                });
            e.push(&join(&self.path, key), format!("unknown key{hint}"));
        }
    }
}

/// Splits "128MiB" into (128.0, "MiB"); `what` and `example` go into the error message.
fn number_and_unit<'s>(s: &'s str, what: &str, example: &str) -> Result<(f64, &'s str), String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value = num
        .parse()
        .map_err(|_| format!("{s:?} is not a {what} (expected e.g. {example})"))?;
    Ok((value, unit.trim()))
}

/// Parses "250ms", "30s", "5m", "1h", "2d".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (value, unit) = number_and_unit(s, "duration", "\"30s\", \"5m\", \"1h\"")?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "{s:?} is not a duration (expected a unit of ms, s, m, h or d, e.g. \"30s\")"
            ));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses "512", "64KiB", "128MiB", "1GiB", "10MB", "1GB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (value, unit) = number_and_unit(s, "size", "\"64KiB\", \"128MiB\"")?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => {
            return Err(format!(
                "{s:?} is not a size (expected a unit of B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    Ok((value * mult) as u64)
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value, recording unset variables.
pub fn interpolate(
    value: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    e: &mut Errors,
) {
    match value {
        toml::Value::String(s) if s.contains("${") => match interpolate_str(s, env) {
            Ok(out) => *s = out,
            Err(msg) => e.push(path, msg),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate(item, &format!("{path}[{i}]"), env, e);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                interpolate(v, &join(path, k), env, e);
            }
        }
        _ => {}
    }
}

fn interpolate_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{expr}}}` is not a valid variable name"));
        }
        match (env(name), default) {
            (Some(v), None) => out.push_str(&v),
            (Some(v), Some(_)) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set (set it, or give a default: ${{{name}:-value}})"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_sizes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("expected a unit")
        );
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("is not a duration")
        );
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn interpolates_env_with_defaults() {
        let env = |k: &str| (k == "HOST").then(|| "kafka:9092".to_owned());
        assert_eq!(interpolate_str("${HOST}", &env).unwrap(), "kafka:9092");
        assert_eq!(interpolate_str("x-${MISSING:-d}-y", &env).unwrap(), "x-d-y");
        assert!(
            interpolate_str("${MISSING}", &env)
                .unwrap_err()
                .contains("MISSING is not set")
        );
        assert!(
            interpolate_str("${HOST", &env)
                .unwrap_err()
                .contains("unclosed")
        );
    }
}
