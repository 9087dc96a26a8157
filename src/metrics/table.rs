//! The `metrics` table: one row per series per window per resolution.
//!
//! Columns: `resolution` (`1m`, `1h`…), `window_start`, `window_end`, `stream` (the consumer
//! group or backfill that produced the row), `series` (`dim=value,…`), one column per series
//! dimension, counts (`events`, `errors`, `error_rate`, `error_types`, `finish_reasons`), sums
//! (`*_tokens_sum`, `cost_usd_sum`, `cost_computed`, `cost_unknown`), and for each of
//! `latency_ms`, `ttft_ms`, `input_tokens`, `output_tokens`, `cost_usd`: `<m>_count`,
//! `<m>_p50 … _p999`, `<m>_max` and `<m>_hist`, the HdrHistogram V2 bytes (cost in 1e-9 USD)
//! that `hdr_merge` / `hdr_quantile` merge exactly in SQL.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Float64Builder, Int64Builder, MapBuilder,
    MapFieldNames, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use hdrhistogram::{Counter, Histogram};

use super::series::{Counters, LabelCounts, Measure, NANO_USD, QUANTILES, SealedMetrics};
use crate::window::{Dimension, SeriesKey};

fn counts_map_type() -> DataType {
    crate::event::map_type(DataType::Int64)
}

const SUMS: [&str; 5] = [
    "input_tokens_sum",
    "output_tokens_sum",
    "cache_read_tokens_sum",
    "cache_write_tokens_sum",
    "reasoning_tokens_sum",
];

/// The leading columns of every per-window table (`metrics`, `quality`): `resolution`,
/// `window_start`, `window_end`, `stream`, `series`, and one column per series dimension.
pub fn window_key_fields(dims: &[Dimension]) -> Vec<Field> {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let mut f = vec![
        Field::new("resolution", DataType::Utf8, false),
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("series", DataType::Utf8, false),
    ];
    for d in dims {
        f.push(Field::new(d.column(), DataType::Utf8, true));
    }
    f
}

/// Builds the [`window_key_fields`] columns.
pub struct WindowKeys {
    dim_names: Vec<Dimension>,
    resolution: StringBuilder,
    start: TimestampMillisecondBuilder,
    end: TimestampMillisecondBuilder,
    stream: StringBuilder,
    series: StringBuilder,
    dims: Vec<StringBuilder>,
}

impl WindowKeys {
    pub fn new(dims: &[Dimension]) -> Self {
        WindowKeys {
            dim_names: dims.to_vec(),
            resolution: StringBuilder::new(),
            start: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            end: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            stream: StringBuilder::new(),
            series: StringBuilder::new(),
            dims: dims.iter().map(|_| StringBuilder::new()).collect(),
        }
    }

    /// The same key for `n` rows (one for a metrics row, one per scorer for quality).
    pub fn append_n(
        &mut self,
        resolution: &str,
        start_ms: i64,
        end_ms: i64,
        stream: &str,
        key: &SeriesKey,
        n: usize,
    ) {
        let series = key.display(&self.dim_names);
        for _ in 0..n {
            self.resolution.append_value(resolution);
            self.start.append_value(start_ms);
            self.end.append_value(end_ms);
            self.stream.append_value(stream);
            self.series.append_value(&series);
            for (b, v) in self.dims.iter_mut().zip(key.values()) {
                b.append_option(v.as_deref());
            }
        }
    }

    /// The columns, in [`window_key_fields`] order; the builders are left empty.
    pub fn finish(&mut self) -> Vec<ArrayRef> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(self.resolution.finish()),
            Arc::new(self.start.finish()),
            Arc::new(self.end.finish()),
            Arc::new(self.stream.finish()),
            Arc::new(self.series.finish()),
        ];
        for b in &mut self.dims {
            cols.push(Arc::new(b.finish()));
        }
        cols
    }
}

/// Each row's series key, read from the dimension columns (a missing column reads as null).
pub fn row_series_keys(batch: &RecordBatch, dims: &[Dimension]) -> Vec<SeriesKey> {
    let cols: Vec<_> = dims
        .iter()
        .map(|d| {
            batch
                .column_by_name(&d.column())
                .and_then(|c| c.as_string_opt::<i32>())
        })
        .collect();
    (0..batch.num_rows())
        .map(|row| {
            let values: Vec<Option<&str>> = cols
                .iter()
                .map(|c| c.and_then(|c| (!c.is_null(row)).then(|| c.value(row))))
                .collect();
            SeriesKey::new(&values)
        })
        .collect()
}

/// The table's schema for a set of series dimensions.
pub fn metrics_schema(dims: &[Dimension]) -> SchemaRef {
    let mut f = window_key_fields(dims);
    f.push(Field::new("events", DataType::Int64, false));
    f.push(Field::new("errors", DataType::Int64, false));
    f.push(Field::new("error_rate", DataType::Float64, false));
    f.push(Field::new("error_types", counts_map_type(), true));
    f.push(Field::new("finish_reasons", counts_map_type(), true));
    for s in SUMS {
        f.push(Field::new(s, DataType::Int64, false));
    }
    f.push(Field::new("cost_usd_sum", DataType::Float64, false));
    f.push(Field::new("cost_computed", DataType::Int64, false));
    f.push(Field::new("cost_unknown", DataType::Int64, false));
    for m in Measure::ALL {
        let n = m.name();
        f.push(Field::new(format!("{n}_count"), DataType::Int64, false));
        for (_, q) in QUANTILES {
            f.push(Field::new(format!("{n}_{q}"), DataType::Float64, true));
        }
        f.push(Field::new(format!("{n}_max"), DataType::Float64, true));
        f.push(Field::new(format!("{n}_hist"), DataType::Binary, false));
    }
    Arc::new(Schema::new(f))
}

struct MeasureCols {
    count: Int64Builder,
    quantiles: [Float64Builder; 5],
    max: Float64Builder,
    hist: BinaryBuilder,
}

/// Builds `metrics` rows.
pub struct MetricsBatchBuilder {
    schema: SchemaRef,
    keys: WindowKeys,
    events: Int64Builder,
    errors: Int64Builder,
    error_rate: Float64Builder,
    error_types: MapBuilder<StringBuilder, Int64Builder>,
    finish_reasons: MapBuilder<StringBuilder, Int64Builder>,
    sums: [Int64Builder; 5],
    cost_sum: Float64Builder,
    cost_computed: Int64Builder,
    cost_unknown: Int64Builder,
    measures: Vec<MeasureCols>,
    len: usize,
}

fn map_builder() -> MapBuilder<StringBuilder, Int64Builder> {
    let names = MapFieldNames {
        entry: "entries".into(),
        key: "keys".into(),
        value: "values".into(),
    };
    MapBuilder::new(Some(names), StringBuilder::new(), Int64Builder::new())
}

fn append_counts(b: &mut MapBuilder<StringBuilder, Int64Builder>, c: &LabelCounts) {
    for (l, n) in c.sorted() {
        b.keys().append_value(l);
        b.values().append_value(n as i64);
    }
    b.append(!c.0.is_empty())
        .expect("map keys and values stay aligned");
}

impl MetricsBatchBuilder {
    pub fn new(dims: &[Dimension]) -> Self {
        MetricsBatchBuilder {
            schema: metrics_schema(dims),
            keys: WindowKeys::new(dims),
            events: Int64Builder::new(),
            errors: Int64Builder::new(),
            error_rate: Float64Builder::new(),
            error_types: map_builder(),
            finish_reasons: map_builder(),
            sums: std::array::from_fn(|_| Int64Builder::new()),
            cost_sum: Float64Builder::new(),
            cost_computed: Int64Builder::new(),
            cost_unknown: Int64Builder::new(),
            measures: Measure::ALL
                .iter()
                .map(|_| MeasureCols {
                    count: Int64Builder::new(),
                    quantiles: std::array::from_fn(|_| Float64Builder::new()),
                    max: Float64Builder::new(),
                    hist: BinaryBuilder::new(),
                })
                .collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One row. `hists[i]` is the histogram of `Measure::ALL[i]`, `encoded[i]` its V2 bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn append<T: Counter>(
        &mut self,
        resolution: &str,
        start_ms: i64,
        end_ms: i64,
        stream: &str,
        key: &SeriesKey,
        counters: &Counters,
        hists: &[&Histogram<T>; 5],
        encoded: &[Vec<u8>; 5],
    ) {
        self.keys
            .append_n(resolution, start_ms, end_ms, stream, key, 1);
        let c = counters;
        self.events.append_value(c.events as i64);
        self.errors.append_value(c.errors as i64);
        self.error_rate.append_value(c.error_rate());
        append_counts(&mut self.error_types, &c.error_types);
        append_counts(&mut self.finish_reasons, &c.finish_reasons);
        let sums = [
            c.input_tokens,
            c.output_tokens,
            c.cache_read_tokens,
            c.cache_write_tokens,
            c.reasoning_tokens,
        ];
        for (b, v) in self.sums.iter_mut().zip(sums) {
            b.append_value(v as i64);
        }
        self.cost_sum
            .append_value(c.cost_nano_usd as f64 / NANO_USD);
        self.cost_computed.append_value(c.cost_computed as i64);
        self.cost_unknown.append_value(c.cost_unknown as i64);
        for (i, m) in Measure::ALL.iter().enumerate() {
            let h = hists[i];
            let cols = &mut self.measures[i];
            let n = h.len();
            cols.count.append_value(n as i64);
            let scale = m.scale();
            if n > 0 {
                // One pass over the counts for all five quantiles (same values as
                // `value_at_quantile`, which `hdr_quantile` uses).
                let values = h.value_at_quantiles(QUANTILES.map(|(q, _)| q));
                for (b, v) in cols.quantiles.iter_mut().zip(values) {
                    b.append_value(v as f64 * scale);
                }
            } else {
                for b in &mut cols.quantiles {
                    b.append_null();
                }
            }
            cols.max
                .append_option((n > 0).then(|| h.max() as f64 * scale));
            cols.hist.append_value(&encoded[i]);
        }
        self.len += 1;
    }

    /// A row from a sealed (serialized) state.
    pub fn append_sealed(
        &mut self,
        resolution: &str,
        start_ms: i64,
        end_ms: i64,
        stream: &str,
        key: &SeriesKey,
        s: &SealedMetrics,
    ) {
        let h: [Histogram<u64>; 5] = std::array::from_fn(|i| s.histogram(Measure::ALL[i]));
        let refs = [&h[0], &h[1], &h[2], &h[3], &h[4]];
        self.append(
            resolution,
            start_ms,
            end_ms,
            stream,
            key,
            &s.counters,
            &refs,
            &s.hists,
        );
    }

    pub fn finish(&mut self) -> RecordBatch {
        let mut cols = self.keys.finish();
        cols.push(Arc::new(self.events.finish()));
        cols.push(Arc::new(self.errors.finish()));
        cols.push(Arc::new(self.error_rate.finish()));
        cols.push(Arc::new(self.error_types.finish()));
        cols.push(Arc::new(self.finish_reasons.finish()));
        for b in &mut self.sums {
            cols.push(Arc::new(b.finish()));
        }
        cols.push(Arc::new(self.cost_sum.finish()));
        cols.push(Arc::new(self.cost_computed.finish()));
        cols.push(Arc::new(self.cost_unknown.finish()));
        for m in &mut self.measures {
            cols.push(Arc::new(m.count.finish()));
            for q in &mut m.quantiles {
                cols.push(Arc::new(q.finish()));
            }
            cols.push(Arc::new(m.max.finish()));
            cols.push(Arc::new(m.hist.finish()));
        }
        self.len = 0;
        RecordBatch::try_new(self.schema.clone(), cols)
            .expect("builder columns follow metrics_schema() in order and type")
    }
}

fn label_counts(col: Option<&ArrayRef>, row: usize) -> LabelCounts {
    let mut out = LabelCounts::default();
    let Some(map) = col.and_then(|c| c.as_map_opt()) else {
        return out;
    };
    if map.is_null(row) {
        return out;
    }
    let entries = map.value(row);
    let keys = entries.column(0).as_string::<i32>();
    let values = entries.column(1).as_primitive::<Int64Type>();
    for i in 0..entries.len() {
        out.add(keys.value(i), values.value(i).max(0) as u64);
    }
    out
}

/// Reads rows back as (series key, sealed state), for restoring a roll-up. Rows whose
/// histograms do not decode are skipped (returned in the error count).
pub fn sealed_rows(
    batch: &RecordBatch,
    dims: &[Dimension],
) -> (Vec<(SeriesKey, SealedMetrics)>, usize) {
    let int = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
    };
    let keys = row_series_keys(batch, dims);
    let hist_cols: Vec<_> = Measure::ALL
        .iter()
        .map(|m| {
            batch
                .column_by_name(&format!("{}_hist", m.name()))
                .and_then(|c| c.as_binary_opt::<i32>())
        })
        .collect();
    let cost_sum = batch
        .column_by_name("cost_usd_sum")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Float64Type>());
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut bad = 0;
    'rows: for (row, key) in keys.into_iter().enumerate() {
        let get = |name: &str| int(name).map_or(0, |c| c.value(row).max(0) as u64);
        let mut hists: [Vec<u8>; 5] = Default::default();
        for (slot, col) in hists.iter_mut().zip(&hist_cols) {
            match col {
                Some(c) if super::series::deserialize(c.value(row)).is_ok() => {
                    *slot = c.value(row).to_vec()
                }
                _ => {
                    bad += 1;
                    continue 'rows;
                }
            }
        }
        let counters = Counters {
            events: get("events"),
            errors: get("errors"),
            error_types: label_counts(batch.column_by_name("error_types"), row),
            finish_reasons: label_counts(batch.column_by_name("finish_reasons"), row),
            input_tokens: get(SUMS[0]),
            output_tokens: get(SUMS[1]),
            cache_read_tokens: get(SUMS[2]),
            cache_write_tokens: get(SUMS[3]),
            reasoning_tokens: get(SUMS[4]),
            cost_nano_usd: cost_sum.map_or(0, |c| (c.value(row) * NANO_USD).round() as u64),
            cost_computed: get("cost_computed"),
            cost_unknown: get("cost_unknown"),
        };
        out.push((key, SealedMetrics { counters, hists }));
    }
    (out, bad)
}
