//! Pinned drift baselines (`telltale baseline pin | show | unpin`).
//!
//! By default a series is judged against its trailing reference (the last 24 h), which
//! follows the traffic: a lasting change is flagged while it is new and then becomes the
//! norm. A pinned baseline does not move. It is made once, from `events`: the traffic of a
//! time range, or all traffic of one prompt version (then every version of the series is
//! judged against it). Per series and drift window it keeps what the trailing reference
//! keeps — a thinned set of embedded texts per field and the scalar histograms — and its
//! calibration history: the test statistics of up to [`CALIBRATION_WINDOWS`] of its own
//! windows, each tested against the rest of the baseline (leave one window out). A live
//! window's statistic is placed against that fixed history, so the false-alarm rate is that
//! of the baseline's own window-to-window variation, and the persistence rule applies as it
//! does for trailing references.
//!
//! Stored in `<root>/_state/drift/`: `baseline.json` (the manifest: per series its scope,
//! embedder and sizes) and the data file it names (written first; the manifest's rename is
//! the commit). Running pipelines pick up a new manifest at their next drift window.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::embed::{EmbedError, Embedder};
use super::sample::WindowSample;
use super::stage::{DriftConfig, Kept, RefWindow, SeriesRef, seed, statistics};
use super::table::FIELDS;
use crate::config::SinkConfig;
use crate::metrics::fmt_ms;
use crate::sink::{SinkError, write_durably};
use crate::window::{Dimension, SeriesKey};

/// The value a version pin puts in the series' `prompt_version`: every version matches.
pub const ANY_VERSION: &str = "*";

/// Baseline windows whose statistics calibrate the verdicts, at most (spread evenly over
/// the baseline; a robust median and spread need far fewer).
pub const CALIBRATION_WINDOWS: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    Manifest { path: String, message: String },
}

/// What to pin.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// The traffic of `from_ms..to_ms`.
    Period { from_ms: i64, to_ms: i64 },
    /// All traffic of a prompt version (within `from_ms..to_ms`); every version of the
    /// series is judged against it.
    Version {
        version: String,
        from_ms: i64,
        to_ms: i64,
    },
}

impl Scope {
    fn range(&self) -> (i64, i64) {
        match self {
            Scope::Period { from_ms, to_ms } | Scope::Version { from_ms, to_ms, .. } => {
                (*from_ms, *to_ms)
            }
        }
    }

    fn describe(&self) -> String {
        let (from, to) = self.range();
        let period = if from == i64::MIN && to == i64::MAX {
            String::new()
        } else {
            format!(
                "{} to {}",
                if from == i64::MIN {
                    "-".into()
                } else {
                    fmt_ms(from)
                },
                if to == i64::MAX {
                    "-".into()
                } else {
                    fmt_ms(to)
                }
            )
        };
        match self {
            Scope::Period { .. } => period,
            Scope::Version { version, .. } if period.is_empty() => {
                format!("prompt_version {version}")
            }
            Scope::Version { version, .. } => format!("prompt_version {version}, {period}"),
        }
    }
}

/// One pinned series in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The series' dimension values; a version pin has [`ANY_VERSION`] as its version.
    pub series: Vec<Option<String>>,
    /// What was pinned, for people: a period, or a prompt version.
    pub scope: String,
    pub embedder: String,
    pub pinned_at: String,
    /// Drift windows of the baseline, and how many of them calibrate (input, output).
    pub windows: usize,
    pub calibration: [usize; 2],
    /// Reference texts kept (input, output).
    pub texts: [usize; 2],
    pub events: u64,
}

impl Entry {
    /// The series' key (a version pin's has [`ANY_VERSION`] as its version).
    pub fn key(&self) -> SeriesKey {
        let v: Vec<Option<&str>> = self.series.iter().map(|x| x.as_deref()).collect();
        SeriesKey::new(&v)
    }
}

/// `<root>/_state/drift/baseline.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Manifest {
    /// The data file beside the manifest holding the entries' windows.
    pub file: String,
    /// The dimensions the series are keyed by.
    pub dimensions: Vec<String>,
    pub entries: Vec<Entry>,
}

pub fn manifest_path(root: &Path) -> PathBuf {
    crate::sink::state_dir(root, "drift").join("baseline.json")
}

/// The manifest, or `None` when nothing is pinned.
pub fn read_manifest(root: &Path) -> Result<Option<Manifest>, BaselineError> {
    let path = manifest_path(root);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::sink::io_err(&path)(e).into()),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| BaselineError::Manifest {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

fn read_data(root: &Path, m: &Manifest) -> Result<HashMap<SeriesKey, SeriesRef>, BaselineError> {
    let path = manifest_path(root).with_file_name(&m.file);
    Ok(super::state::load_from(&path)?)
}

/// Writes the data, then the manifest naming it, then removes every other data file (the one
/// it replaced, and any an interrupted pin left).
fn write(
    root: &Path,
    mut manifest: Manifest,
    data: &HashMap<SeriesKey, SeriesRef>,
    sink: &SinkConfig,
) -> Result<(), BaselineError> {
    let path = manifest_path(root);
    if manifest.entries.is_empty() {
        // Nothing pinned: no data file is kept.
        manifest.file.clear();
        crate::sink::remove_if_exists(&path)?;
    } else {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        manifest.file = format!("baseline-{stamp}.parquet");
        super::state::save_to(&path.with_file_name(&manifest.file), data, sink)?;
        let text = serde_json::to_string_pretty(&manifest).expect("serializable");
        write_durably(&path, text.as_bytes())?;
    }
    // The data file replaced, and any a pin interrupted before its manifest left behind.
    let dir = path.parent().expect("has a directory");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("baseline-") && name.ends_with(".parquet") && name != manifest.file {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// `name=value` filters on dimension columns, as indices into `dims`.
fn filters(
    dims: &[String],
    raw: &[(String, String)],
) -> Result<Vec<(usize, String)>, BaselineError> {
    raw.iter()
        .map(|(name, value)| {
            dims.iter()
                .position(|d| d == name)
                .map(|i| (i, value.clone()))
                .ok_or_else(|| {
                    BaselineError::Invalid(format!(
                        "--where {name}={value}: {name} is not a dimension of this pipeline (dimensions: {})",
                        dims.join(", ")
                    ))
                })
        })
        .collect()
}

fn matches<S: AsRef<str>>(values: &[Option<S>], filters: &[(usize, String)]) -> bool {
    filters.iter().all(|(i, v)| {
        values
            .get(*i)
            .is_some_and(|x| x.as_ref().map(AsRef::as_ref) == Some(v.as_str()))
    })
}

/// What a pin did.
#[derive(Debug, Clone)]
pub struct PinReport {
    pub pinned: Vec<Entry>,
    /// Series with traffic in the scope that could not be pinned, and why.
    pub skipped: Vec<(String, String)>,
    /// Entries of an earlier pin that this one replaced.
    pub replaced: usize,
    pub texts_embedded: usize,
}

/// A window's sampled texts (sampling hash, text) per field.
type Texts = [Vec<(u64, Box<str>)>; 2];

/// One series' baseline while it is made.
struct Draft {
    key: SeriesKey,
    events: u64,
    /// Per window: its start and its (shrunk) samples per field.
    windows: Vec<(i64, Texts)>,
    /// The windows whose full samples calibrate, per field.
    calibration: [Vec<usize>; 2],
    reference: SeriesRef,
}

/// Pins the traffic of `scope` (restricted to series matching `where_`) as the drift
/// baseline of the series it covers, replacing their earlier pins.
#[allow(clippy::too_many_arguments)]
pub fn pin(
    root: &Path,
    dimensions: &[Dimension],
    cfg: &DriftConfig,
    embedder: &dyn Embedder,
    scope: &Scope,
    where_: &[(String, String)],
    sink: &SinkConfig,
    progress: bool,
) -> Result<PinReport, BaselineError> {
    let dims: Vec<String> = dimensions.iter().map(Dimension::column).collect();
    let filters = filters(&dims, where_)?;
    let version_slot = dims.iter().position(|d| d == "prompt_version");
    let (from, to) = scope.range();
    let mut columns = crate::metrics::rebuild::event_columns(dimensions, true, false);
    if !columns.contains(&"prompt_version") {
        columns.push("prompt_version");
    }
    let mut series = Traffic::new();
    let read = crate::metrics::rebuild::events_between(root, from, to, &columns, |e| {
        if let Scope::Version { version, .. } = scope
            && e.prompt_version.as_deref() != Some(version.as_str())
        {
            return;
        }
        let mut values: Vec<Option<&str>> = dimensions.iter().map(|d| d.value(e)).collect();
        if !matches(&values, &filters) {
            return;
        }
        if let (Scope::Version { .. }, Some(i)) = (scope, version_slot) {
            values[i] = Some(ANY_VERSION);
        }
        let (events, windows) = series.entry(SeriesKey::new(&values)).or_default();
        *events += 1;
        windows
            .entry(e.timestamp_ms.div_euclid(cfg.window_ms) * cfg.window_ms)
            .or_insert_with(|| WindowSample::new(cfg.samples_per_window))
            .observe(e, cfg.max_text_chars);
    })?;
    if series.is_empty() {
        let only = if where_.is_empty() {
            String::new()
        } else {
            format!(
                " matching {}",
                where_
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(BaselineError::Invalid(format!(
            "no events{only} for {} in {} ({read} events in that time range)",
            scope.describe(),
            root.join("events").display()
        )));
    }
    let built = build(
        cfg,
        embedder,
        dimensions,
        &scope.describe(),
        series,
        progress,
    )?;
    let replaced = store(root, &dims, &built, sink)?;
    info!(series = built.entries.len(), "drift baseline pinned");
    Ok(PinReport {
        pinned: built.entries,
        skipped: built.skipped,
        replaced,
        texts_embedded: built.embedded,
    })
}

/// Per series: its events and its drift windows' samples.
pub(crate) type Traffic = BTreeMap<SeriesKey, (u64, BTreeMap<i64, WindowSample>)>;

/// Baselines made, not stored yet.
pub(crate) struct Built {
    pub entries: Vec<Entry>,
    pub data: HashMap<SeriesKey, SeriesRef>,
    pub skipped: Vec<(String, String)>,
    pub embedded: usize,
}

/// Makes each series' baseline from its windows' samples: thins them to the reference
/// size, embeds what is kept and the calibration windows' samples, and tests each
/// calibration window against the rest.
pub(crate) fn build(
    cfg: &DriftConfig,
    embedder: &dyn Embedder,
    dimensions: &[Dimension],
    scope: &str,
    series: Traffic,
    progress: bool,
) -> Result<Built, BaselineError> {
    let per_field = cfg.texts_per_field(series.len());
    let mut skipped = Vec::new();
    let mut drafts = Vec::new();
    for (key, (events, windows)) in series {
        let mut d = Draft {
            key,
            events,
            windows: Vec::with_capacity(windows.len()),
            calibration: [Vec::new(), Vec::new()],
            reference: SeriesRef::default(),
        };
        for (start, mut s) in windows {
            s.shrink(per_field);
            let texts = [&s.inputs, &s.outputs]
                .map(|b| b.items().map(|(h, t)| (*h, t.text.clone())).collect());
            d.reference.windows.push_back(RefWindow {
                start_ms: start,
                // Hashes only for now: thinned first, so only kept texts are embedded.
                texts: [&s.inputs, &s.outputs]
                    .map(|b| b.items().map(|(h, _)| (*h, Kept::default())).collect()),
                scalars: s.scalars,
                z: [[None; super::stage::METHODS]; 2],
                r: [[None; super::stage::METHODS]; 2],
            });
            d.windows.push((start, texts));
        }
        d.reference.thin(cfg.reference_size);
        for f in 0..2 {
            let eligible: Vec<usize> = (0..d.windows.len())
                .filter(|&i| d.windows[i].1[f].len() >= cfg.min_samples)
                .collect();
            let n = eligible.len().min(CALIBRATION_WINDOWS);
            d.calibration[f] = (0..n).map(|j| eligible[j * eligible.len() / n]).collect();
        }
        let name = d.key.display(dimensions);
        let enough = |f: usize| d.calibration[f].len() >= cfg.calibration_windows;
        if !enough(0) && !enough(1) {
            skipped.push((
                name,
                format!(
                    "{} of its {} drift windows have {} texts or more; {} are needed (pin a longer period)",
                    d.calibration[0].len().max(d.calibration[1].len()),
                    d.windows.len(),
                    cfg.min_samples,
                    cfg.calibration_windows
                ),
            ));
            continue;
        }
        drafts.push(d);
    }
    if drafts.is_empty() {
        return Err(BaselineError::Invalid(format!(
            "nothing pinned: {}",
            skipped
                .iter()
                .map(|(s, why)| format!("{s}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }

    // Embed what is needed: the kept reference texts, and the calibration windows' samples.
    let mut jobs: Vec<(usize, usize, usize, u64)> = Vec::new();
    for (s, d) in drafts.iter().enumerate() {
        for (w, (_, texts)) in d.windows.iter().enumerate() {
            for (f, sample) in texts.iter().enumerate() {
                let full = d.calibration[f].contains(&w);
                let kept = &d.reference.windows[w].texts[f];
                for (h, _) in sample {
                    if full || kept.iter().any(|(k, _)| k == h) {
                        jobs.push((s, w, f, *h));
                    }
                }
            }
        }
    }
    let bar = progress_bar(progress, jobs.len() as u64, "embedding");
    let mut vectors: HashMap<(usize, usize, usize, u64), Vec<f32>> = HashMap::new();
    for chunk in jobs.chunks(256) {
        let texts: Vec<&str> = chunk
            .iter()
            .map(|&(s, w, f, h)| {
                let t = &drafts[s].windows[w].1[f];
                &*t.iter()
                    .find(|(k, _)| *k == h)
                    .expect("job from this sample")
                    .1
            })
            .collect();
        for (job, v) in chunk.iter().zip(embedder.embed(&texts)?) {
            vectors.insert(*job, v);
        }
        if let Some(b) = &bar {
            b.inc(chunk.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for (s, d) in drafts.iter_mut().enumerate() {
        for (w, rw) in d.reference.windows.iter_mut().enumerate() {
            for (f, texts) in rw.texts.iter_mut().enumerate() {
                for (h, v) in texts.iter_mut() {
                    *v = Kept::new(&vectors[&(s, w, f, *h)]);
                }
            }
        }
    }

    // Calibrate: each calibration window against the rest of the baseline.
    let tests: usize = drafts
        .iter()
        .map(|d| d.calibration[0].len() + d.calibration[1].len())
        .sum();
    let bar = progress_bar(progress, tests as u64, "calibrating");
    let pinned_at = fmt_ms(chrono::Utc::now().timestamp_millis());
    let mut entries = Vec::with_capacity(drafts.len());
    let mut data: HashMap<SeriesKey, SeriesRef> = HashMap::new();
    for (s, mut d) in drafts.into_iter().enumerate() {
        let mut calibrated = [0; 2];
        for f in 0..2 {
            for &w in &d.calibration[f] {
                let current: Vec<Vec<f32>> = d.windows[w].1[f]
                    .iter()
                    .map(|(h, _)| vectors[&(s, w, f, *h)].clone())
                    .collect();
                let reference: Vec<Vec<f32>> = d
                    .reference
                    .windows
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != w)
                    .flat_map(|(_, rw)| rw.texts[f].iter().map(|(_, v)| v.to_vec()))
                    .collect();
                if reference.len() >= cfg.min_reference {
                    let start = d.windows[w].0;
                    let (t, _) =
                        statistics(cfg, &reference, &current, seed(&d.key, start, FIELDS[f]));
                    d.reference.windows[w].z[f] = t.map(|t| Some(t.z));
                    calibrated[f] += 1;
                }
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
        }
        let texts = [0, 1].map(|f| {
            d.reference
                .windows
                .iter()
                .map(|w| w.texts[f].len())
                .sum::<usize>()
        });
        entries.push(Entry {
            series: d
                .key
                .values()
                .iter()
                .map(|v| v.as_deref().map(str::to_owned))
                .collect(),
            scope: scope.to_owned(),
            embedder: embedder.id().to_owned(),
            pinned_at: pinned_at.clone(),
            windows: d.windows.len(),
            calibration: calibrated,
            texts,
            events: d.events,
        });
        data.insert(d.key, d.reference);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    Ok(Built {
        entries,
        data,
        skipped,
        embedded: jobs.len(),
    })
}

/// Stores baselines beside the earlier pins of other series; returns how many earlier pins
/// they replaced.
pub(crate) fn store(
    root: &Path,
    dims: &[String],
    built: &Built,
    sink: &SinkConfig,
) -> Result<usize, BaselineError> {
    let mut data = built.data.clone();
    let mut replaced = 0;
    let mut manifest = Manifest {
        file: String::new(),
        dimensions: dims.to_vec(),
        entries: Vec::new(),
    };
    if let Some(old) = read_manifest(root)?
        && old.dimensions == dims
    {
        let mut old_data = read_data(root, &old)?;
        for e in old.entries {
            match data.entry(e.key()) {
                std::collections::hash_map::Entry::Occupied(_) => replaced += 1,
                std::collections::hash_map::Entry::Vacant(v) => {
                    if let Some(r) = old_data.remove(v.key()) {
                        v.insert(r);
                        manifest.entries.push(e);
                    }
                }
            }
        }
    }
    manifest.entries.extend(built.entries.iter().cloned());
    write(root, manifest, &data, sink)?;
    Ok(replaced)
}

fn progress_bar(on: bool, len: u64, what: &'static str) -> Option<indicatif::ProgressBar> {
    on.then(|| {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {human_pos}/{human_len} ({per_sec}, {eta} left)",
            )
            .expect("the template is valid"),
        );
        b.set_message(what);
        b
    })
}

/// Removes the pins of the series matching `where_` (all of them when empty); returns the
/// entries removed. Those series are judged against their trailing reference again.
pub fn unpin(
    root: &Path,
    where_: &[(String, String)],
    sink: &SinkConfig,
) -> Result<Vec<Entry>, BaselineError> {
    let Some(m) = read_manifest(root)? else {
        return Ok(Vec::new());
    };
    let filters = filters(&m.dimensions, where_)?;
    let (removed, kept): (Vec<Entry>, Vec<Entry>) = m
        .entries
        .iter()
        .cloned()
        .partition(|e| matches(&e.series, &filters));
    if removed.is_empty() {
        return Ok(removed);
    }
    let mut data = if kept.is_empty() {
        HashMap::new()
    } else {
        read_data(root, &m)?
    };
    data.retain(|k, _| kept.iter().any(|e| e.key() == *k));
    write(root, Manifest { entries: kept, ..m }, &data, sink)?;
    Ok(removed)
}

/// The pinned baselines a drift stage judges against, by series.
pub(crate) struct Pinned {
    entries: HashMap<SeriesKey, (Entry, SeriesRef)>,
    version_slot: Option<usize>,
}

impl Pinned {
    /// The pins usable by a stage with these dimensions and this embedder (others are
    /// named in a warning and left out: their series keep their trailing reference).
    pub fn load(
        root: &Path,
        dims: &[String],
        embedder: &str,
    ) -> Result<Option<Pinned>, BaselineError> {
        let Some(m) = read_manifest(root)? else {
            return Ok(None);
        };
        if m.dimensions != dims {
            warn!(pinned = ?m.dimensions, pipeline = ?dims, "the pinned drift baseline is keyed by other dimensions than this pipeline's; not used (pin it again)");
            return Ok(None);
        }
        let mut data = read_data(root, &m)?;
        let mut entries = HashMap::new();
        for e in m.entries {
            if e.embedder != embedder {
                warn!(series = ?e.series, pinned = %e.embedder, pipeline = %embedder, "this series' pinned drift baseline was embedded with another model; it is judged against its trailing reference until pinned again");
                continue;
            }
            let key = e.key();
            if let Some(r) = data.remove(&key) {
                entries.insert(key, (e, r));
            }
        }
        Ok(Some(Pinned {
            entries,
            version_slot: dims.iter().position(|d| d == "prompt_version"),
        }))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The series' own pin, else a pin of its version-less series (a version pin).
    pub fn get(&self, key: &SeriesKey) -> Option<&(Entry, SeriesRef)> {
        self.entries.get(key).or_else(|| {
            let i = self.version_slot?;
            let mut v: Vec<Option<&str>> = key.values().iter().map(|x| x.as_deref()).collect();
            *v.get_mut(i)? = Some(ANY_VERSION);
            self.entries.get(&SeriesKey::new(&v))
        })
    }
}

/// The manifest as `telltale baseline show` prints it.
pub fn render(m: Option<&Manifest>) -> String {
    let Some(m) = m.filter(|m| !m.entries.is_empty()) else {
        return "no drift baseline is pinned: every series is judged against its trailing reference\n".into();
    };
    let mut out = format!(
        "{} series pinned (dimensions: {}):\n",
        m.entries.len(),
        m.dimensions.join(", ")
    );
    for e in &m.entries {
        let series: Vec<String> = m
            .dimensions
            .iter()
            .zip(&e.series)
            .map(|(d, v)| format!("{d}={}", v.as_deref().unwrap_or("-")))
            .collect();
        out.push_str(&format!(
            "  {}\n    {} · {} windows, {} events · reference texts {} in / {} out · calibrated on {} / {} windows · {} · pinned {}\n",
            series.join(","),
            e.scope,
            e.windows,
            e.events,
            e.texts[0],
            e.texts[1],
            e.calibration[0],
            e.calibration[1],
            e.embedder,
            e.pinned_at
        ));
    }
    out
}
