//! What the drift stage keeps across restarts, in `<root>/_state/drift/`:
//! - `<stream>.json`: the close position (every drift window ending at or before it was
//!   judged and written) and the embedder;
//! - `<stream>-reference.parquet`: each series' reference — per past window, the sampling
//!   hashes and embeddings of its kept texts (a byte per dimension and a scale,
//!   `stage::Kept`), its standardized test statistics (the history that calibrates later
//!   verdicts) and its scalar histograms — rewritten atomically after every judged window.
//!
//! On start, the references are read back (unless the embedder changed: vectors of another
//! model are not comparable, and the references fill up again), and the minutes the metrics
//! stage closed after the drift close position are read back from `events`
//! ([`crate::metrics::rebuild::events_between`]), so that a restart neither loses nor judges
//! twice a window.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, BinaryBuilder, Int8Builder, Int64Builder, RecordBatch, StringBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Int8Type, Int64Type, Schema, UInt64Type};

use super::scalar::{Binned, Categories, Scalars};
use super::stage::{Kept, METHODS, RefWindow, SeriesRef};
use crate::config::SinkConfig;
use crate::sink::{SinkError, Table, fsync_dir, write_into_place};
use crate::window::SeriesKey;

/// The `field` code of a text kept as bytes ([`Kept`]): this plus the field's index (input 0,
/// output 1). Codes 0 and 1 are f32 vectors, as written before; 2 is the window's statistics.
const QUANTIZED: i8 = 3;
const QUANTIZED_OUTPUT: i8 = QUANTIZED + 1;

pub fn reference_file(root: &Path, stream: &str) -> PathBuf {
    crate::sink::state_dir(root, "drift").join(format!("{stream}-reference.parquet"))
}

fn key_json(key: &SeriesKey) -> String {
    serde_json::Value::Array(
        key.values()
            .iter()
            .map(|v| {
                v.as_deref()
                    .map_or(serde_json::Value::Null, |s| s.to_owned().into())
            })
            .collect(),
    )
    .to_string()
}

fn key_from_json(s: &str) -> Option<SeriesKey> {
    let v: Vec<Option<String>> = serde_json::from_str(s).ok()?;
    let refs: Vec<Option<&str>> = v.iter().map(|x| x.as_deref()).collect();
    Some(SeriesKey::new(&refs))
}

fn window_json(w: &RefWindow) -> Vec<u8> {
    let s = &w.scalars;
    serde_json::json!({
        "z": w.z,
        "r": w.r,
        "numeric": s.numeric.iter().map(|b| b.counts_raw().to_vec()).collect::<Vec<_>>(),
        "categorical": s.categorical.iter().map(|c| {
            c.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<String, u64>>()
        }).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

fn window_from_json(b: &[u8], w: &mut RefWindow) -> Option<()> {
    #[derive(serde::Deserialize)]
    struct S {
        z: Vec<Vec<Option<f64>>>,
        // Absent in references written before the persistence rule.
        #[serde(default)]
        r: Vec<Vec<Option<f64>>>,
        numeric: Vec<Vec<u64>>,
        categorical: Vec<BTreeMap<String, u64>>,
    }
    let s: S = serde_json::from_slice(b).ok()?;
    // Per field, one value per method; a reference written before a method existed has
    // none for it (its history fills up again).
    let per_method = |v: Vec<Vec<Option<f64>>>| {
        let mut out = [[None; METHODS]; 2];
        for (o, f) in out.iter_mut().zip(v) {
            for (o, x) in o.iter_mut().zip(f) {
                *o = x;
            }
        }
        out
    };
    w.z = per_method(s.z);
    w.r = per_method(s.r);
    let mut out = Scalars::default();
    for (o, v) in out.numeric.iter_mut().zip(s.numeric) {
        *o = Binned::from_counts(v);
    }
    for (o, m) in out.categorical.iter_mut().zip(s.categorical) {
        *o = m
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v))
            .collect::<Categories>();
    }
    w.scalars = out;
    Some(())
}

/// Writes every series' reference (atomically: temp file, rename).
pub(crate) fn save(
    root: &Path,
    stream: &str,
    refs: &HashMap<SeriesKey, SeriesRef>,
    sink: &SinkConfig,
) -> Result<(), SinkError> {
    save_to(&reference_file(root, stream), refs, sink)
}

/// Writes references to `path` (atomically: temp file, rename; the directory synced).
pub(crate) fn save_to(
    path: &Path,
    refs: &HashMap<SeriesKey, SeriesRef>,
    sink: &SinkConfig,
) -> Result<(), SinkError> {
    let (mut series, mut start, mut field, mut hash, mut data) = (
        StringBuilder::new(),
        Int64Builder::new(),
        Int8Builder::new(),
        UInt64Builder::new(),
        BinaryBuilder::new(),
    );
    let mut keys: Vec<&SeriesKey> = refs.keys().collect();
    keys.sort();
    for key in keys {
        let k = key_json(key);
        for w in &refs[key].windows {
            for (f, texts) in w.texts.iter().enumerate() {
                for (h, v) in texts {
                    series.append_value(&k);
                    start.append_value(w.start_ms);
                    field.append_value(QUANTIZED + f as i8);
                    hash.append_value(*h);
                    data.append_value(v.to_bytes());
                }
            }
            series.append_value(&k);
            start.append_value(w.start_ms);
            field.append_value(2);
            hash.append_value(0);
            data.append_value(window_json(w));
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("series", DataType::Utf8, false),
        Field::new("window_start", DataType::Int64, false),
        Field::new("field", DataType::Int8, false),
        Field::new("hash", DataType::UInt64, false),
        Field::new("data", DataType::Binary, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(series.finish()),
            Arc::new(start.finish()),
            Arc::new(field.finish()),
            Arc::new(hash.finish()),
            Arc::new(data.finish()),
        ],
    )
    .expect("columns match");
    write_into_place(path, &batch, Table::Drift, sink)?;
    fsync_dir(path.parent().expect("has a directory"))
}

/// Reads the references back (empty when there are none or the file is unreadable).
pub(crate) fn load(root: &Path, stream: &str) -> HashMap<SeriesKey, SeriesRef> {
    let path = reference_file(root, stream);
    if !path.exists() {
        return HashMap::new();
    }
    load_from(&path).unwrap_or_else(|err| {
        tracing::warn!(error = %err, "cannot read the drift references; they fill up again");
        HashMap::new()
    })
}

/// Reads references written by [`save_to`].
pub(crate) fn load_from(path: &Path) -> Result<HashMap<SeriesKey, SeriesRef>, SinkError> {
    let mut out: HashMap<SeriesKey, SeriesRef> = HashMap::new();
    let batches = crate::metrics::rebuild::read_parquet(path, None)?;
    for b in batches {
        let (Some(series), Some(start), Some(field), Some(hash), Some(data)) = (
            b.column(0).as_string_opt::<i32>(),
            b.column(1).as_primitive_opt::<Int64Type>(),
            b.column(2).as_primitive_opt::<Int8Type>(),
            b.column(3).as_primitive_opt::<UInt64Type>(),
            b.column(4).as_binary_opt::<i32>(),
        ) else {
            continue;
        };
        for row in 0..b.num_rows() {
            if series.is_null(row) {
                continue;
            }
            let Some(key) = key_from_json(series.value(row)) else {
                continue;
            };
            let r = out.entry(key).or_default();
            let ws = start.value(row);
            if r.windows.back().is_none_or(|w| w.start_ms != ws) {
                r.windows.push_back(RefWindow {
                    start_ms: ws,
                    texts: [Vec::new(), Vec::new()],
                    scalars: Scalars::default(),
                    z: [[None; METHODS]; 2],
                    r: [[None; METHODS]; 2],
                });
            }
            let w = r.windows.back_mut().expect("pushed above");
            match field.value(row) {
                // Written before vectors were kept as bytes: f32s, kept as bytes now.
                f @ (0 | 1) => {
                    let v: Vec<f32> = data
                        .value(row)
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    w.texts[f as usize].push((hash.value(row), Kept::new(&v)));
                }
                f @ (QUANTIZED | QUANTIZED_OUTPUT) => {
                    if let Some(v) = Kept::from_bytes(data.value(row)) {
                        w.texts[(f - QUANTIZED) as usize].push((hash.value(row), v));
                    }
                }
                _ => {
                    let _ = window_from_json(data.value(row), w);
                }
            }
        }
    }
    Ok(out)
}
