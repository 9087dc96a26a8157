//! One series' metrics in one window: HDR histograms, counts and sums — all mergeable.
//!
//! Precision: every histogram keeps 2 significant digits (values within 1 %) with `u32`
//! counts, and grows its range on demand (auto-resize), so a series only pays for the range
//! its values span. Latencies are recorded in whole milliseconds, tokens as counts, cost in
//! nano-dollars (1e-9 USD, so a $0.000015 call is 15 000 and keeps its 2 digits).
//!
//! Closed windows leave here serialized in the HdrHistogram V2 format, the same bytes the
//! `metrics` table stores, so a roll-up or a later query merges them exactly.

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

use crate::event::LlmEvent;

/// Significant digits of every histogram.
pub const SIGFIG: u8 = 2;
/// Cost histograms and sums are in units of 1e-9 USD.
pub const NANO_USD: f64 = 1e9;

/// The histogrammed quantities, in column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    LatencyMs,
    TtftMs,
    InputTokens,
    OutputTokens,
    Cost,
}

impl Measure {
    pub const ALL: [Measure; 5] = [
        Measure::LatencyMs,
        Measure::TtftMs,
        Measure::InputTokens,
        Measure::OutputTokens,
        Measure::Cost,
    ];

    /// Column prefix in the `metrics` table.
    pub fn name(self) -> &'static str {
        match self {
            Measure::LatencyMs => "latency_ms",
            Measure::TtftMs => "ttft_ms",
            Measure::InputTokens => "input_tokens",
            Measure::OutputTokens => "output_tokens",
            Measure::Cost => "cost_usd",
        }
    }

    /// Recorded value → the column's unit.
    pub fn scale(self) -> f64 {
        match self {
            Measure::Cost => 1.0 / NANO_USD,
            _ => 1.0,
        }
    }

    /// The event's value in recorded units (non-negative integers).
    fn value(self, e: &LlmEvent<'_>) -> Option<u64> {
        let f = match self {
            Measure::LatencyMs => e.latency_ms?,
            Measure::TtftMs => e.ttft_ms?,
            Measure::InputTokens => e.input_tokens? as f64,
            Measure::OutputTokens => e.output_tokens? as f64,
            Measure::Cost => e.cost_usd? * NANO_USD,
        };
        (f.is_finite() && f >= 0.0).then(|| f.round() as u64)
    }
}

pub fn new_histogram() -> Histogram<u32> {
    Histogram::new(SIGFIG).expect("2 significant digits is a valid precision")
}

/// Counts by label (finish reason, error type): few distinct values, so a small vector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelCounts(pub Vec<(Box<str>, u64)>);

impl LabelCounts {
    pub fn add(&mut self, label: &str, n: u64) {
        match self.0.iter_mut().find(|(l, _)| &**l == label) {
            Some((_, c)) => *c += n,
            None => self.0.push((label.into(), n)),
        }
    }

    pub fn merge(&mut self, other: &LabelCounts) {
        for (l, n) in &other.0 {
            self.add(l, *n);
        }
    }

    pub fn sorted(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<_> = self.0.iter().map(|(l, n)| (&**l, *n)).collect();
        v.sort();
        v
    }
}

/// Counts and sums of a series in a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub events: u64,
    pub errors: u64,
    pub error_types: LabelCounts,
    pub finish_reasons: LabelCounts,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    /// 1e-9 USD, summed as integers so merging is exact in any order.
    pub cost_nano_usd: u64,
    /// Events whose cost telltale computed from the price table.
    pub cost_computed: u64,
    /// Events with tokens but no cost and no price for their model.
    pub cost_unknown: u64,
}

impl Counters {
    /// Errors per event (0 without events).
    pub fn error_rate(&self) -> f64 {
        if self.events == 0 {
            0.0
        } else {
            self.errors as f64 / self.events as f64
        }
    }

    pub fn merge(&mut self, o: &Counters) {
        self.events += o.events;
        self.errors += o.errors;
        self.error_types.merge(&o.error_types);
        self.finish_reasons.merge(&o.finish_reasons);
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cache_read_tokens += o.cache_read_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.cost_nano_usd += o.cost_nano_usd;
        self.cost_computed += o.cost_computed;
        self.cost_unknown += o.cost_unknown;
    }
}

/// How an event's cost was obtained (the `cost_source` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    Reported,
    Computed,
    /// The event has tokens but neither a cost nor a price for its model.
    Unknown,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Computed => "computed",
            CostSource::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<CostSource> {
        match s {
            "reported" => Some(CostSource::Reported),
            "computed" => Some(CostSource::Computed),
            "unknown" => Some(CostSource::Unknown),
            _ => None,
        }
    }
}

/// A series' state in one open window. Histograms are live while the window receives events
/// in order; once every partition has moved past the window ([`WindowState::settle`]) they are
/// packed into their V2 bytes (a few hundred bytes instead of kilobytes) and unpacked again
/// only if a straggler arrives, so the windows kept open for late events cost little.
#[derive(Debug, Clone)]
pub struct SeriesMetrics {
    pub counters: Counters,
    hists: Hists,
    /// Texts and scalar features for the drift stage (when it runs).
    pub sample: Option<Box<crate::drift::sample::WindowSample>>,
    /// Per-scorer counts of the quality stage (when it runs and sampled an event).
    pub quality: Option<Box<crate::quality::QualityCounts>>,
}

#[derive(Debug, Clone)]
enum Hists {
    Live(Box<[Histogram<u32>; 5]>),
    Packed(Box<[Vec<u8>; 5]>),
}

impl Default for SeriesMetrics {
    fn default() -> Self {
        SeriesMetrics {
            counters: Counters::default(),
            hists: Hists::Live(Box::new(std::array::from_fn(|_| new_histogram()))),
            sample: None,
            quality: None,
        }
    }
}

impl crate::window::WindowState for SeriesMetrics {
    fn settle(&mut self) {
        if let Hists::Live(h) = &self.hists {
            self.hists = Hists::Packed(Box::new(std::array::from_fn(|i| serialize(&h[i]))));
        }
    }
}

impl SeriesMetrics {
    /// The live histograms, unpacking them if the window was settled.
    pub fn histograms(&mut self) -> &mut [Histogram<u32>; 5] {
        if let Hists::Packed(p) = &self.hists {
            let live: [Histogram<u32>; 5] = std::array::from_fn(|i| {
                let mut h: Histogram<u32> = Deserializer::new()
                    .deserialize(&mut &p[i][..])
                    .expect("bytes this process serialized decode");
                h.auto(true);
                h
            });
            self.hists = Hists::Live(Box::new(live));
        }
        match &mut self.hists {
            Hists::Live(h) => h,
            Hists::Packed(_) => unreachable!("unpacked above"),
        }
    }

    pub fn is_packed(&self) -> bool {
        matches!(self.hists, Hists::Packed(_))
    }

    pub fn observe(&mut self, e: &LlmEvent<'_>, cost: Option<CostSource>) {
        let c = &mut self.counters;
        c.events += 1;
        if e.status == "error" || e.error_type.is_some() {
            c.errors += 1;
            c.error_types
                .add(e.error_type.as_deref().unwrap_or("unknown"), 1);
        }
        if let Some(f) = &e.finish_reason {
            c.finish_reasons.add(f, 1);
        }
        let pos = |v: Option<i64>| v.map_or(0, |v| v.max(0) as u64);
        c.input_tokens += pos(e.input_tokens);
        c.output_tokens += pos(e.output_tokens);
        c.cache_read_tokens += pos(e.cache_read_tokens);
        c.cache_write_tokens += pos(e.cache_write_tokens);
        c.reasoning_tokens += pos(e.reasoning_tokens);
        match cost {
            Some(CostSource::Computed) => c.cost_computed += 1,
            Some(CostSource::Unknown) => c.cost_unknown += 1,
            _ => {}
        }
        if let Some(v) = Measure::Cost.value(e) {
            self.counters.cost_nano_usd += v;
        }
        let hists = self.histograms();
        for (h, m) in hists.iter_mut().zip(Measure::ALL) {
            if let Some(v) = m.value(e) {
                // Auto-resizing: `record` grows the range (`saturating_record` would clamp
                // to the current one); it fails only past u64 ranges, then saturate.
                if h.record(v).is_err() {
                    h.saturating_record(v);
                }
            }
        }
    }

    /// Heap and inline bytes held, for the memory figures.
    pub fn memory_bytes(&self) -> usize {
        let hists = match &self.hists {
            Hists::Live(h) => h
                .iter()
                .map(|h| {
                    std::mem::size_of::<Histogram<u32>>()
                        + h.distinct_values() * std::mem::size_of::<u32>()
                })
                .sum::<usize>(),
            Hists::Packed(p) => p.iter().map(|b| 24 + b.capacity()).sum(),
        };
        self.sample.as_ref().map_or(0, |s| s.memory_bytes())
            + std::mem::size_of::<Self>()
            + hists
            + (self.counters.error_types.0.len() + self.counters.finish_reasons.0.len()) * 32
    }

    /// The compact form kept after the window closes.
    pub fn seal(&self) -> SealedMetrics {
        SealedMetrics {
            counters: self.counters.clone(),
            hists: match &self.hists {
                Hists::Live(h) => std::array::from_fn(|i| serialize(&h[i])),
                Hists::Packed(p) => (**p).clone(),
            },
        }
    }
}

/// A closed window's state: counters and V2-serialized histograms.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedMetrics {
    pub counters: Counters,
    pub hists: [Vec<u8>; 5],
}

impl SealedMetrics {
    /// Exact merge: histograms are decoded, added and encoded again.
    pub fn merge(&mut self, other: &SealedMetrics) {
        self.counters.merge(&other.counters);
        for (mine, theirs) in self.hists.iter_mut().zip(&other.hists) {
            let mut h = deserialize(mine).unwrap_or_else(|_| new_histogram_u64());
            if let Ok(o) = deserialize(theirs) {
                h.add(&o)
                    .expect("auto-resizing histograms accept any value");
            }
            *mine = serialize(&h);
        }
    }

    pub fn histogram(&self, m: Measure) -> Histogram<u64> {
        deserialize(&self.hists[m as usize]).unwrap_or_else(|_| new_histogram_u64())
    }
}

pub fn new_histogram_u64() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("2 significant digits is a valid precision")
}

/// HdrHistogram V2 encoding (uncompressed; Parquet compresses the column).
pub fn serialize<T: hdrhistogram::Counter>(h: &Histogram<T>) -> Vec<u8> {
    let mut out = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut out)
        .expect("writing to a Vec cannot fail");
    out
}

/// Decodes a V2 (or V2 + deflate) histogram into `u64` counts, resizable for merging.
pub fn deserialize(bytes: &[u8]) -> Result<Histogram<u64>, String> {
    let mut h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("not an HdrHistogram V2 encoding: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

/// The quantiles every histogram column is summarised by, and their column suffixes.
pub const QUANTILES: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.95, "p95"),
    (0.99, "p99"),
    (0.999, "p999"),
];
