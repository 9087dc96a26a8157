//! SQL functions over the serialized histograms of the `metrics` table, registered in every
//! `telltale sql` session:
//!
//! - `hdr_merge(hist)` — aggregate: the exact merge of V2-encoded histograms (Binary).
//! - `hdr_quantile(hist, q)` — the value at quantile `q` (0–1) of one histogram (Float64).
//! - `hdr_count(hist)` — how many values it holds (Int64).
//!
//! ```sql
//! -- p99 latency per prompt version over the last 6 hours, exact to the histograms' 1 %:
//! SELECT prompt_version, hdr_quantile(hdr_merge(latency_ms_hist), 0.99) AS p99_ms
//! FROM metrics
//! WHERE resolution = '1m' AND window_start >= now() - INTERVAL '6 hours'
//! GROUP BY prompt_version
//! ```
//! Cost histograms hold 1e-9 USD: divide `hdr_quantile(cost_usd_hist, q)` by 1e9.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array};
use arrow::datatypes::Field;
use arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, ColumnarValue, ScalarUDF, Signature, SimpleAggregateUDF,
    SimpleScalarUDF, TypeSignature, Volatility,
};
use datafusion::prelude::SessionContext;
use hdrhistogram::Histogram;

use super::series::{deserialize, new_histogram_u64, serialize};

fn decode(bytes: &[u8]) -> DfResult<Histogram<u64>> {
    deserialize(bytes).map_err(DataFusionError::Execution)
}

#[derive(Debug)]
struct MergeAcc {
    h: Histogram<u64>,
    any: bool,
}

impl MergeAcc {
    fn add_array(&mut self, a: &ArrayRef) -> DfResult<()> {
        for bytes in binaries(a)? {
            let Some(bytes) = bytes else { continue };
            let h = decode(bytes)?;
            self.h
                .add(&h)
                .map_err(|e| DataFusionError::Execution(format!("hdr_merge: {e:?}")))?;
            self.any = true;
        }
        Ok(())
    }

    fn value(&self) -> ScalarValue {
        ScalarValue::Binary(self.any.then(|| serialize(&self.h)))
    }
}

impl Accumulator for MergeAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add_array(&values[0])
    }
    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.add_array(&states[0])
    }
    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(vec![self.value()])
    }
    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(self.value())
    }
    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.h.distinct_values() * 8
    }
}

/// The values of a Binary, BinaryView (how DataFusion reads Parquet binaries) or LargeBinary
/// column.
fn binaries(a: &ArrayRef) -> DfResult<Box<dyn Iterator<Item = Option<&[u8]>> + '_>> {
    if let Some(b) = a.as_binary_opt::<i32>() {
        Ok(Box::new(b.iter()))
    } else if let Some(b) = a.as_binary_view_opt() {
        Ok(Box::new(b.iter()))
    } else if let Some(b) = a.as_binary_opt::<i64>() {
        Ok(Box::new(b.iter()))
    } else {
        Err(DataFusionError::Execution(format!(
            "expected a binary histogram column, got {}",
            a.data_type()
        )))
    }
}

/// One argument of any binary type, then the given others.
fn binary_signature(rest: &[DataType]) -> Signature {
    let variants = [
        DataType::Binary,
        DataType::BinaryView,
        DataType::LargeBinary,
    ]
    .into_iter()
    .map(|b| {
        let mut args = vec![b];
        args.extend_from_slice(rest);
        TypeSignature::Exact(args)
    })
    .collect();
    Signature::one_of(variants, Volatility::Immutable)
}

/// Applies `f` to each histogram of a Binary argument (array or scalar).
fn map_hist<T>(
    arg: &ColumnarValue,
    mut f: impl FnMut(Option<&Histogram<u64>>, usize) -> DfResult<Option<T>>,
) -> DfResult<(Vec<Option<T>>, bool)> {
    match arg {
        ColumnarValue::Array(a) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, bytes) in binaries(a)?.enumerate() {
                match bytes {
                    None => out.push(f(None, i)?),
                    Some(b) => out.push(f(Some(&decode(b)?), i)?),
                }
            }
            Ok((out, false))
        }
        ColumnarValue::Scalar(
            ScalarValue::Binary(b) | ScalarValue::BinaryView(b) | ScalarValue::LargeBinary(b),
        ) => {
            let h = b.as_deref().map(decode).transpose()?;
            Ok((vec![f(h.as_ref(), 0)?], true))
        }
        ColumnarValue::Scalar(s) if s.is_null() => Ok((vec![f(None, 0)?], true)),
        other => Err(DataFusionError::Execution(format!(
            "expected a Binary histogram, got {}",
            other.data_type()
        ))),
    }
}

fn quantile(args: &[ColumnarValue]) -> DfResult<ColumnarValue> {
    let qs: Box<dyn Fn(usize) -> Option<f64>> = match &args[1] {
        ColumnarValue::Scalar(s) => {
            let q = match s {
                ScalarValue::Float64(v) => *v,
                other => other
                    .cast_to(&DataType::Float64)
                    .ok()
                    .and_then(|v| match v {
                        ScalarValue::Float64(v) => v,
                        _ => None,
                    }),
            };
            Box::new(move |_| q)
        }
        ColumnarValue::Array(a) => {
            let a = arrow::compute::cast(a, &DataType::Float64)?;
            let a = a.as_primitive::<Float64Type>().clone();
            Box::new(move |i| (!a.is_null(i)).then(|| a.value(i)))
        }
    };
    let (vals, scalar) = map_hist(&args[0], |h, i| {
        let (Some(h), Some(q)) = (h, qs(i)) else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&q) {
            return Err(DataFusionError::Execution(format!(
                "hdr_quantile: quantile {q} is outside 0..1"
            )));
        }
        Ok((!h.is_empty()).then(|| h.value_at_quantile(q) as f64))
    })?;
    Ok(if scalar {
        ColumnarValue::Scalar(ScalarValue::Float64(vals[0]))
    } else {
        ColumnarValue::Array(Arc::new(Float64Array::from(vals)))
    })
}

fn count(args: &[ColumnarValue]) -> DfResult<ColumnarValue> {
    let (vals, scalar) = map_hist(&args[0], |h, _| Ok(h.map(|h| h.len() as i64)))?;
    Ok(if scalar {
        ColumnarValue::Scalar(ScalarValue::Int64(vals[0]))
    } else {
        ColumnarValue::Array(Arc::new(Int64Array::from(vals)))
    })
}

/// Registers `hdr_merge`, `hdr_quantile` and `hdr_count`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(SimpleAggregateUDF::new_with_signature(
        "hdr_merge",
        binary_signature(&[]),
        DataType::Binary,
        Arc::new(|_| {
            Ok(Box::new(MergeAcc {
                h: new_histogram_u64(),
                any: false,
            }))
        }),
        vec![Arc::new(Field::new(
            "hdr_merge_state",
            DataType::Binary,
            true,
        ))],
    )));
    ctx.register_udf(ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "hdr_quantile",
        binary_signature(&[DataType::Float64]),
        DataType::Float64,
        Arc::new(quantile),
    )));
    ctx.register_udf(ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "hdr_count",
        binary_signature(&[]),
        DataType::Int64,
        Arc::new(count),
    )));
}
