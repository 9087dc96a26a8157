//! Cost from a price table, for events that do not carry one.
//!
//! The table is in litellm's `model_prices_and_context_window.json` format: an object of model
//! name → rates in USD **per token**. telltale reads `input_cost_per_token`,
//! `output_cost_per_token`, `cache_read_input_token_cost`, `cache_creation_input_token_cost`,
//! `output_cost_per_reasoning_token`, and the tiered variants `*_above_<N>k_tokens` /
//! `*_above_<N>_tokens` (the whole request is priced at the tier its input size reaches, as the
//! providers bill it). Batch, priority and flex rates, per-image/audio/second prices and
//! `sample_spec` are ignored. Pipeline overrides (custom and fine-tuned models) take precedence.
//!
//! The formula, with `input_tokens` counting every input token (cached ones included):
//! ```text
//! cost = (input − cache_read − cache_write) × input_rate
//!      + cache_read × cache_read_rate      (input_rate when the model has none)
//!      + cache_write × cache_write_rate    (input_rate when the model has none)
//!      + (output − reasoning) × output_rate
//!      + reasoning × reasoning_rate        (output_rate when the model has none)
//! ```
//! Model lookup: `response_model`, then `model`, each as given, then with a `provider/` prefix
//! removed, then (for `provider` = p) as `p/model`.

use std::collections::HashMap;
use std::path::Path;

use crate::event::LlmEvent;

/// Rates in USD per token. `None`: the model has no separate rate (the base one applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub input: Option<f64>,
    pub output: Option<f64>,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
    pub reasoning: Option<f64>,
}

impl Rates {
    /// `self` with the rates `over` sets replacing its own.
    fn overlaid(&self, over: &Rates) -> Rates {
        Rates {
            input: over.input.or(self.input),
            output: over.output.or(self.output),
            cache_read: over.cache_read.or(self.cache_read),
            cache_write: over.cache_write.or(self.cache_write),
            reasoning: over.reasoning.or(self.reasoning),
        }
    }
}

/// A model's price: base rates and tiers by input size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Price {
    pub base: Rates,
    /// (input tokens above which the tier applies, its rates), ascending.
    pub tiers: Vec<(u64, Rates)>,
}

impl Price {
    /// Rates for a request with `input_tokens` input tokens.
    pub fn rates_for(&self, input_tokens: u64) -> Rates {
        let mut rates = self.base.clone();
        for (above, tier) in &self.tiers {
            if input_tokens > *above {
                rates = rates.overlaid(tier);
            }
        }
        rates
    }

    /// Cost of one call in USD; `None` when the model has no input or output rate.
    pub fn cost(&self, u: &Usage) -> Option<f64> {
        let r = self.rates_for(u.input);
        let input = r.input?;
        let output = r.output?;
        let cached = u.cache_read + u.cache_write;
        let uncached = u.input.saturating_sub(cached) as f64;
        let reasoning = u.reasoning.min(u.output);
        Some(
            uncached * input
                + u.cache_read as f64 * r.cache_read.unwrap_or(input)
                + u.cache_write as f64 * r.cache_write.unwrap_or(input)
                + (u.output - reasoning) as f64 * output
                + reasoning as f64 * r.reasoning.unwrap_or(output),
        )
    }
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl Usage {
    /// The event's usage; `None` when it reports no tokens at all.
    pub fn of(e: &LlmEvent<'_>) -> Option<Usage> {
        if e.input_tokens.is_none() && e.output_tokens.is_none() {
            return None;
        }
        let n = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
        Some(Usage {
            input: n(e.input_tokens),
            output: n(e.output_tokens),
            cache_read: n(e.cache_read_tokens),
            cache_write: n(e.cache_write_tokens),
            reasoning: n(e.reasoning_tokens),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("{path}: cannot read price table: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a litellm-format price table: {message}")]
    Format { path: String, message: String },
}

/// Prices by model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    models: HashMap<String, Price>,
}

impl PriceTable {
    pub fn load(path: &Path) -> Result<PriceTable, PriceError> {
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_litellm_json(&text).map_err(|message| PriceError::Format {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses litellm's format; entries without token prices are skipped.
    pub fn from_litellm_json(text: &str) -> Result<PriceTable, String> {
        let root: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut models = HashMap::new();
        for (name, entry) in root {
            if name == "sample_spec" {
                continue;
            }
            let Some(obj) = entry.as_object() else {
                continue;
            };
            let price = parse_entry(obj);
            if price.base.input.is_some() || price.base.output.is_some() {
                models.insert(name, price);
            }
        }
        Ok(PriceTable { models })
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Sets (or replaces) one model's price.
    pub fn insert(&mut self, model: &str, price: Price) {
        self.models.insert(model.to_owned(), price);
    }

    /// Applies an override: rates it sets replace the model's, the others are kept.
    pub fn overlay(&mut self, model: &str, over: &Price) {
        let entry = self.models.entry(model.to_owned()).or_default();
        entry.base = entry.base.overlaid(&over.base);
        for (above, rates) in &over.tiers {
            match entry.tiers.iter_mut().find(|(a, _)| a == above) {
                Some((_, r)) => *r = r.overlaid(rates),
                None => entry.tiers.push((*above, rates.clone())),
            }
        }
        entry.tiers.sort_by_key(|(a, _)| *a);
    }

    pub fn get(&self, model: &str) -> Option<&Price> {
        self.models.get(model)
    }

    /// The price for an event's model (see the module docs for the lookup order).
    pub fn lookup(&self, e: &LlmEvent<'_>) -> Option<&Price> {
        for m in [e.response_model.as_deref(), e.model.as_deref()]
            .into_iter()
            .flatten()
        {
            if let Some(p) = self.models.get(m) {
                return Some(p);
            }
            if let Some((_, bare)) = m.split_once('/')
                && let Some(p) = self.models.get(bare)
            {
                return Some(p);
            }
            if let Some(provider) = e.provider.as_deref()
                && let Some(p) = self.models.get(&format!("{provider}/{m}"))
            {
                return Some(p);
            }
        }
        None
    }

    /// The event's cost in USD from this table, if its model is priced and it reports tokens.
    pub fn cost(&self, e: &LlmEvent<'_>) -> Option<f64> {
        self.lookup(e)?.cost(&Usage::of(e)?)
    }
}

fn num(obj: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<f64> {
    obj.get(key)?
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// `above_128k_tokens` → 128 000; `above_1000_tokens` → 1 000.
fn tier_threshold(s: &str) -> Option<u64> {
    let n = s.strip_prefix("above_")?.strip_suffix("_tokens")?;
    match n.strip_suffix('k') {
        Some(k) => k.parse::<u64>().ok().map(|v| v * 1000),
        None => n.parse().ok(),
    }
}

const RATE_KEYS: [&str; 5] = [
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token",
];

fn set_rate(r: &mut Rates, i: usize, v: f64) {
    match i {
        0 => r.input = Some(v),
        1 => r.output = Some(v),
        2 => r.cache_read = Some(v),
        3 => r.cache_write = Some(v),
        _ => r.reasoning = Some(v),
    }
}

fn parse_entry(obj: &serde_json::Map<String, serde_json::Value>) -> Price {
    let mut price = Price::default();
    for (i, key) in RATE_KEYS.iter().enumerate() {
        if let Some(v) = num(obj, key) {
            set_rate(&mut price.base, i, v);
        }
    }
    let mut tiers: HashMap<u64, Rates> = HashMap::new();
    for (k, v) in obj {
        for (i, key) in RATE_KEYS.iter().enumerate() {
            let Some(rest) = k.strip_prefix(key).and_then(|r| r.strip_prefix('_')) else {
                continue;
            };
            if let (Some(above), Some(v)) = (tier_threshold(rest), v.as_f64()) {
                set_rate(tiers.entry(above).or_default(), i, v);
            }
        }
    }
    price.tiers = tiers.into_iter().collect();
    price.tiers.sort_by_key(|(a, _)| *a);
    price
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"{
        "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0},
        "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                   "cache_read_input_token_cost": 1.25e-06, "input_cost_per_token_batches": 1.25e-06},
        "gemini-2.5-pro": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
                   "input_cost_per_token_above_200k_tokens": 2.5e-06,
                   "output_cost_per_token_above_200k_tokens": 1.5e-05,
                   "input_cost_per_token_above_200k_tokens_priority": 9.0},
        "dall-e-3": {"output_cost_per_image": 0.04}
    }"#;

    fn event(model: &str, input: i64, output: i64) -> LlmEvent<'static> {
        LlmEvent {
            model: Some(model.to_owned().into()),
            input_tokens: Some(input),
            output_tokens: Some(output),
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn parses_rates_tiers_and_skips_the_rest() {
        let t = PriceTable::from_litellm_json(TABLE).unwrap();
        assert_eq!(t.len(), 2, "sample_spec and image-only models are skipped");
        let g = t.get("gemini-2.5-pro").unwrap();
        assert_eq!(g.tiers.len(), 1);
        assert_eq!(g.tiers[0].0, 200_000);
        assert_eq!(
            g.tiers[0].1.input,
            Some(2.5e-06),
            "the _priority variant is ignored"
        );
    }

    #[test]
    fn cost_with_cache_reasoning_and_tiers() {
        let t = PriceTable::from_litellm_json(TABLE).unwrap();
        // 1000 input of which 400 cached, 200 output: 600×2.5e-6 + 400×1.25e-6 + 200×1e-5.
        let mut e = event("gpt-4o", 1000, 200);
        e.cache_read_tokens = Some(400);
        assert!(close(t.cost(&e).unwrap(), 0.0015 + 0.0005 + 0.002));
        // Provider prefixes resolve to the bare name.
        assert!(t.cost(&event("openai/gpt-4o", 1000, 0)).is_some());
        // Below and above the 200k tier: the whole request moves to the higher rates.
        let below = t.cost(&event("gemini-2.5-pro", 200_000, 1000)).unwrap();
        assert!(close(below, 200_000.0 * 1.25e-6 + 1000.0 * 1e-5));
        let above = t.cost(&event("gemini-2.5-pro", 200_001, 1000)).unwrap();
        assert!(close(above, 200_001.0 * 2.5e-6 + 1000.0 * 1.5e-5));
        assert_eq!(t.cost(&event("unknown-model", 10, 10)), None);
        assert_eq!(t.cost(&LlmEvent::default()), None, "no tokens, no cost");
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let mut t = PriceTable::from_litellm_json(TABLE).unwrap();
        t.overlay(
            "gpt-4o",
            &Price {
                base: Rates {
                    output: Some(2e-5),
                    ..Default::default()
                },
                tiers: vec![],
            },
        );
        let p = t.get("gpt-4o").unwrap();
        assert_eq!(p.base.input, Some(2.5e-06));
        assert_eq!(p.base.output, Some(2e-05));
    }
}
