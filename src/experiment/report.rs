//! The scorecard as text: `telltale experiment status`, `telltale gate --experiment` and the
//! demo print it from an `experiments` window's rows.

use std::fmt::Write as _;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};

/// The decision and reason of a window's rows (`None` for no rows).
pub fn decision(batch: &RecordBatch) -> Option<(String, String)> {
    if batch.num_rows() == 0 {
        return None;
    }
    let s = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_string_opt::<i32>())
            .map(|c| c.value(0).to_owned())
    };
    Some((s("decision")?, s("reason")?))
}

fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.3}")
    } else if a >= 0.001 {
        format!("{x:.4}")
    } else {
        format!("{x:.2e}")
    }
}

fn p(x: f64) -> String {
    if x < 1e-4 {
        "<0.0001".into()
    } else {
        format!("{x:.4}")
    }
}

/// A window's rows as a scorecard: the decision and why, then per metric and arm the
/// estimate, the lift against the control with its always-valid interval, the p-values and
/// the verdict.
pub fn scorecard(batch: &RecordBatch) -> String {
    let mut out = String::new();
    let Some((decision, reason)) = decision(batch) else {
        return "no looks yet".into();
    };
    let s = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_string_opt::<i32>())
            .expect("experiments schema")
    };
    let f = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_primitive_opt::<Float64Type>())
            .expect("experiments schema")
    };
    let i = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .expect("experiments schema")
    };
    let ts = |n: &str| {
        batch
            .column_by_name(n)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
            .map_or(0, |c| c.value(0))
    };
    let opt = |c: &arrow::array::Float64Array, r: usize| (!c.is_null(r)).then(|| c.value(r));
    let (metric, role, arm, verdict, better) =
        (s("metric"), s("role"), s("arm"), s("verdict"), s("better"));
    let (n, events) = (i("n"), i("events"));
    let (est, lift, diff, cs_lo, cs_hi, avp, adj, pf, srm) = (
        f("estimate"),
        f("lift"),
        f("diff"),
        f("cs_low"),
        f("cs_high"),
        f("always_valid_p"),
        f("adjusted_p"),
        f("p_value"),
        f("srm_p_value"),
    );
    let _ = writeln!(
        out,
        "experiment {} (control {}), as of {}: {}",
        s("experiment").value(0),
        s("control").value(0),
        crate::metrics::fmt_ms(ts("window_end")),
        decision.to_uppercase()
    );
    let _ = writeln!(out, "  {reason}");
    let mut arms: Vec<(String, i64)> = Vec::new();
    for r in 0..batch.num_rows() {
        if !arms.iter().any(|(a, _)| a == arm.value(r)) {
            arms.push((arm.value(r).to_owned(), events.value(r)));
        }
    }
    let _ = writeln!(
        out,
        "  traffic: {} (sample-ratio check p = {})",
        arms.iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        p(srm.value(0))
    );
    let _ = writeln!(
        out,
        "  {:<16} {:<9} {:<12} {:>7} {:>10} {:>9} {:>25} {:>9} {:>9} {:>9}  verdict",
        "metric",
        "role",
        "arm",
        "n",
        "estimate",
        "lift",
        "diff, always-valid CI",
        "p(seq)",
        "p(adj)",
        "p(fixed)"
    );
    for r in 0..batch.num_rows() {
        let name = format!(
            "{} {}",
            metric.value(r),
            if better.value(r) == "higher" {
                "↑"
            } else {
                "↓"
            }
        );
        let cs = match (opt(diff, r), opt(cs_lo, r), opt(cs_hi, r)) {
            (Some(d), Some(lo), Some(hi)) => format!("{} [{}, {}]", num(d), num(lo), num(hi)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:<12} {:>7} {:>10} {:>9} {:>25} {:>9} {:>9} {:>9}  {}",
            name,
            role.value(r),
            arm.value(r),
            n.value(r),
            opt(est, r).map(num).unwrap_or_default(),
            opt(lift, r)
                .map(|l| format!("{:+.1}%", l * 100.0))
                .unwrap_or_default(),
            cs,
            opt(avp, r).map(p).unwrap_or_default(),
            opt(adj, r).map(p).unwrap_or_default(),
            opt(pf, r).map(p).unwrap_or_default(),
            verdict.value(r).replace('_', " ")
        );
    }
    out
}
