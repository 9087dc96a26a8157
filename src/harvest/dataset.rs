//! A dataset on disk: immutable versions, each a complete snapshot.
//!
//! ```text
//! <datasets>/<name>/v0001/examples.jsonl   one example a line (the canonical format)
//!                         embeddings.f32   each example's anchor vector (little-endian f32)
//!                         manifest.json    counts, embedder, sha256 of every file
//! <data_root>/harvest/date=…/hour=…/harvest-<name>-v0001.parquet   one row per harvested event
//! ```
//!
//! A version is written under `.v0001.tmp` and renamed into place: the rename is the commit.
//! Its `harvest` rows are written just before; rows of a version whose directory never landed
//! are deleted when the dataset is next opened, and the rerun writes them again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use super::collect::{Candidate, ScoreNote};
use super::{HarvestConfig, HarvestError, Reason, RunReport, dataset_err};
use crate::drift::embed::{Embedder, cosine};
use crate::quality::pii::Redactor;

/// Where an example came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    /// The representative production event.
    pub event_id: String,
    pub timestamp: String,
    /// Up to `max_event_ids` events it stands for (the first ones seen).
    pub event_ids: Vec<String>,
    pub first_seen: String,
    pub last_seen: String,
    pub app: Option<String>,
    pub environment: Option<String>,
    pub model: Option<String>,
    pub prompt_id: Option<String>,
    pub prompt_version: Option<String>,
    /// Every prompt version it failed on.
    pub prompt_versions: Vec<String>,
    /// Rules of alerts it was harvested under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

/// One eval case: a production input that failed, with what the model answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub id: String,
    pub input: String,
    pub output: Option<String>,
    pub expected: Option<String>,
    pub system: Option<String>,
    pub reasons: Vec<Reason>,
    /// How many production events it stands for.
    pub count: u64,
    /// How many of them failed for each reason (an event can fail for several).
    pub reason_counts: BTreeMap<Reason, u64>,
    /// The representative's scores (failing ones with their explanations).
    pub scores: Vec<ScoreNote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<f64>,
    pub provenance: Provenance,
    pub redacted: bool,
    pub added_in: String,
    pub updated_in: String,
}

impl Example {
    /// Ranks representatives: more failing scores, then a lower score, is a clearer case.
    fn rank(scores: &[ScoreNote]) -> (usize, f64) {
        let failing = scores.iter().filter(|s| s.passed == Some(false)).count();
        let low = scores
            .iter()
            .filter_map(|s| s.value)
            .fold(f64::INFINITY, f64::min);
        (failing, -low)
    }

    pub fn last_seen_ms(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(&self.provenance.last_seen)
            .ok()
            .map(|t| t.timestamp_millis())
    }
}

/// How a harvested event entered the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    New,
    Exact,
    Near,
    /// Harvested before for another reason; only its reasons changed.
    Reason,
}

impl Fold {
    fn name(self) -> &'static str {
        match self {
            Fold::New => "new",
            Fold::Exact => "exact",
            Fold::Near => "near",
            Fold::Reason => "reason",
        }
    }
}

struct Row {
    event_id: String,
    timestamp_ms: i64,
    dims: [Option<String>; 5],
    reasons: String,
    example_id: String,
    fold: Fold,
    similarity: Option<f64>,
}

/// A dataset: its latest version in memory, and the run being built on it.
pub struct Dataset {
    name: String,
    dir: PathBuf,
    latest: u32,
    examples: Vec<Example>,
    anchors: Vec<Vec<f32>>,
    anchors_by: Option<String>,
    exact: HashMap<u64, usize>,
    ids: HashMap<String, usize>,
    /// Event id → reasons it was harvested for (committed versions).
    harvested: HashMap<String, BTreeSet<Reason>>,
    /// Event id → example, for events harvested before (only those within provenance).
    by_event: HashMap<String, usize>,
    rows: Vec<Row>,
    changed: BTreeSet<usize>,
}

pub fn version_name(v: u32) -> String {
    format!("v{v:04}")
}

fn parse_version(s: &str) -> Option<u32> {
    s.strip_prefix('v')?.parse().ok()
}

/// The versions of the dataset in `dir`, oldest first.
pub fn versions(dir: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("manifest.json").is_file())
        .filter_map(|e| parse_version(&e.file_name().to_string_lossy()))
        .collect();
    out.sort_unstable();
    out
}

/// The examples of one version.
pub fn read_examples(version_dir: &Path) -> Result<Vec<Example>, HarvestError> {
    let path = version_dir.join("examples.jsonl");
    let text = fs::read_to_string(&path).map_err(|e| dataset_err(&path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| dataset_err(&path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Normalized-input key for exact duplicates: lower case, words only.
pub fn exact_key(input: &str) -> u64 {
    let norm: Vec<String> = input
        .split(|c: char| !c.is_alphanumeric() && c != '<' && c != '>' && c != '_')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    xxh3_64(norm.join(" ").as_bytes())
}

/// The numbers in a text, in order.
fn numbers(s: &str) -> Vec<&str> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .collect()
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The longest text embedded for near-duplicate search.
const EMBED_CHARS: usize = 2_000;

impl Dataset {
    pub fn open(root: &Path, datasets: &Path, name: &str) -> Result<Dataset, HarvestError> {
        let dir = datasets.join(name);
        fs::create_dir_all(&dir).map_err(|e| dataset_err(&dir, e))?;
        // A run killed before its rename leaves a temporary directory.
        for e in fs::read_dir(&dir)
            .map_err(|e| dataset_err(&dir, e))?
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(".tmp") {
                fs::remove_dir_all(e.path()).map_err(|x| dataset_err(&e.path(), x))?;
            }
        }
        let latest = versions(&dir).last().copied().unwrap_or(0);
        let mut ds = Dataset {
            name: name.to_owned(),
            dir,
            latest,
            examples: Vec::new(),
            anchors: Vec::new(),
            anchors_by: None,
            exact: HashMap::new(),
            ids: HashMap::new(),
            harvested: HashMap::new(),
            by_event: HashMap::new(),
            rows: Vec::new(),
            changed: BTreeSet::new(),
        };
        if latest > 0 {
            let vdir = ds.dir.join(version_name(latest));
            ds.examples = read_examples(&vdir)?;
            let manifest: serde_json::Value = serde_json::from_slice(
                &fs::read(vdir.join("manifest.json")).map_err(|e| dataset_err(&vdir, e))?,
            )
            .map_err(|e| dataset_err(&vdir.join("manifest.json"), e))?;
            let dim = manifest["embedding_dim"].as_u64().unwrap_or(0) as usize;
            if let (Some(by), true) = (manifest["embedder"].as_str(), dim > 0) {
                let bytes = fs::read(vdir.join("embeddings.f32")).unwrap_or_default();
                if bytes.len() == dim * 4 * ds.examples.len() {
                    ds.anchors = bytes
                        .chunks_exact(dim * 4)
                        .map(|c| {
                            c.chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .collect()
                        })
                        .collect();
                    ds.anchors_by = Some(by.to_owned());
                }
            }
            for (i, ex) in ds.examples.iter().enumerate() {
                ds.exact.insert(exact_key(&ex.input), i);
                ds.ids.insert(ex.id.clone(), i);
                for id in &ex.provenance.event_ids {
                    ds.by_event.insert(id.clone(), i);
                }
            }
        }
        ds.load_harvested(root)?;
        Ok(ds)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn latest(&self) -> u32 {
        self.latest
    }

    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    fn file_prefix(&self) -> String {
        format!("harvest-{}-", self.name)
    }

    /// Which events committed versions hold, and for which reasons; deletes the rows of a
    /// version that never landed.
    fn load_harvested(&mut self, root: &Path) -> Result<(), HarvestError> {
        let prefix = self.file_prefix();
        for path in crate::metrics::rebuild::table_files(root, "harvest", i64::MIN, i64::MAX)? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some(v) = name
                .as_deref()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|r| r.strip_suffix(".parquet"))
                .and_then(parse_version)
            else {
                continue;
            };
            if v > self.latest {
                fs::remove_file(&path).map_err(|e| dataset_err(&path, e))?;
                continue;
            }
            let cols = ["event_id", "reasons"];
            for b in crate::metrics::rebuild::read_parquet(&path, Some(&cols))? {
                use arrow::array::AsArray;
                let (Some(id), Some(rs)) = (
                    b.column_by_name("event_id")
                        .and_then(|c| c.as_string_opt::<i32>()),
                    b.column_by_name("reasons")
                        .and_then(|c| c.as_string_opt::<i32>()),
                ) else {
                    continue;
                };
                for i in 0..b.num_rows() {
                    let set = self.harvested.entry(id.value(i).to_owned()).or_default();
                    set.extend(rs.value(i).split(',').filter_map(Reason::parse));
                }
            }
        }
        Ok(())
    }

    /// Folds a run's candidates into the dataset (in memory); `report.version` is set when
    /// anything changed.
    pub fn absorb(
        &mut self,
        candidates: Vec<Candidate>,
        embedder: &dyn Embedder,
        hc: &HarvestConfig,
    ) -> Result<RunReport, HarvestError> {
        let mut report = RunReport {
            dataset: self.name.clone(),
            candidates: candidates.len(),
            ..Default::default()
        };
        let version = version_name(self.latest + 1);
        if self.anchors_by.as_deref() != Some(embedder.id()) && !self.examples.is_empty() {
            let texts: Vec<String> = self
                .examples
                .iter()
                .map(|e| super::collect::clip(&e.input, EMBED_CHARS))
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            self.anchors = embedder.embed(&refs)?;
        }
        self.anchors_by = Some(embedder.id().to_owned());

        // Redact, drop what was harvested before, and split exact hits from the rest.
        let mut fresh: Vec<(Candidate, BTreeSet<Reason>, bool)> = Vec::new();
        for mut c in candidates {
            let before = self.harvested.get(&c.event_id).cloned().unwrap_or_default();
            let new: BTreeSet<Reason> = c.reasons.difference(&before).copied().collect();
            if new.is_empty() {
                report.already_harvested += 1;
                continue;
            }
            let seen_before = !before.is_empty();
            c.reasons = new.clone();
            if hc.redact {
                redact(&mut c, hc);
            }
            if c.input.as_deref().is_none_or(|s| s.trim().is_empty()) {
                report.skipped_no_input += 1;
                continue;
            }
            for r in &new {
                *report.by_reason.entry(r.name().to_owned()).or_default() += 1;
            }
            if seen_before && let Some(&i) = self.by_event.get(&c.event_id) {
                self.fold(i, &c, false, &version, hc);
                self.row(&c, i, Fold::Reason, None);
                report.reasons_added += 1;
                continue;
            }
            fresh.push((c, new, seen_before));
        }
        // Near duplicates need the embeddings of what exact keys do not settle.
        let need: Vec<usize> = (0..fresh.len())
            .filter(|&i| {
                !self
                    .exact
                    .contains_key(&exact_key(fresh[i].0.input.as_deref().unwrap_or("")))
            })
            .collect();
        let texts: Vec<String> = need
            .iter()
            .map(|&i| super::collect::clip(fresh[i].0.input.as_deref().unwrap_or(""), EMBED_CHARS))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut vectors: HashMap<usize, Vec<f32>> = need
            .iter()
            .copied()
            .zip(if refs.is_empty() {
                Vec::new()
            } else {
                embedder.embed(&refs)?
            })
            .collect();
        for (k, (c, _, seen_before)) in fresh.into_iter().enumerate() {
            let input = c.input.as_deref().unwrap_or("");
            let key = exact_key(input);
            let count = !seen_before;
            if let Some(&i) = self.exact.get(&key) {
                self.fold(i, &c, count, &version, hc);
                self.row(&c, i, Fold::Exact, Some(1.0));
                report.folded_exact += 1;
                continue;
            }
            let v = match vectors.remove(&k) {
                Some(v) => v,
                // Not embedded up front: its exact key arrived earlier in this run.
                None => embedder.embed(&[input])?.remove(0),
            };
            // The most similar example above the threshold whose numbers are the same: a
            // retyped prompt keeps its numbers, "Is 7411 prime?" and "Is 7417 prime?" are
            // two cases.
            let digits = numbers(input);
            let best = self
                .anchors
                .iter()
                .enumerate()
                .map(|(i, a)| (i, cosine(a, &v)))
                .filter(|(i, sim)| {
                    *sim >= hc.near_duplicate && numbers(&self.examples[*i].input) == digits
                })
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((i, sim)) = best {
                self.exact.insert(key, i);
                self.fold(i, &c, count, &version, hc);
                self.row(&c, i, Fold::Near, Some(sim as f64));
                report.folded_near += 1;
                continue;
            }
            let i = self.create(&c, key, v, &version, hc);
            self.row(&c, i, Fold::New, None);
            report.new_examples += 1;
        }
        if !self.rows.is_empty() {
            report.version = Some(version);
        }
        Ok(report)
    }

    fn create(
        &mut self,
        c: &Candidate,
        key: u64,
        anchor: Vec<f32>,
        version: &str,
        hc: &HarvestConfig,
    ) -> usize {
        let mut id = format!("ex-{key:016x}");
        let mut n = 1;
        while self.ids.contains_key(&id) {
            n += 1;
            id = format!("ex-{key:016x}-{n}");
        }
        let seen = rfc3339(c.timestamp_ms);
        let ex = Example {
            id: id.clone(),
            input: c.input.clone().unwrap_or_default(),
            output: c.output.clone(),
            expected: c.expected.clone(),
            system: c.system.clone(),
            reasons: c.reasons.iter().copied().collect(),
            count: 1,
            reason_counts: c.reasons.iter().map(|r| (*r, 1)).collect(),
            scores: c.scores.clone(),
            error_type: c.error_type.clone(),
            feedback: c.feedback,
            provenance: Provenance {
                event_id: c.event_id.clone(),
                timestamp: seen.clone(),
                event_ids: vec![c.event_id.clone()],
                first_seen: seen.clone(),
                last_seen: seen,
                app: c.app.clone(),
                environment: c.environment.clone(),
                model: c.model.clone(),
                prompt_id: c.prompt_id.clone(),
                prompt_version: c.prompt_version.clone(),
                prompt_versions: c.prompt_version.iter().cloned().collect(),
                alerts: c.alerts.iter().cloned().collect(),
            },
            redacted: hc.redact,
            added_in: version.to_owned(),
            updated_in: version.to_owned(),
        };
        let i = self.examples.len();
        self.examples.push(ex);
        self.anchors.push(anchor);
        self.exact.insert(key, i);
        self.ids.insert(id, i);
        self.by_event.insert(c.event_id.clone(), i);
        self.changed.insert(i);
        i
    }

    fn fold(&mut self, i: usize, c: &Candidate, count: bool, version: &str, hc: &HarvestConfig) {
        let ex = &mut self.examples[i];
        if count {
            ex.count += 1;
        }
        let mut reasons: BTreeSet<Reason> = ex.reasons.iter().copied().collect();
        reasons.extend(c.reasons.iter().copied());
        for r in &c.reasons {
            *ex.reason_counts.entry(*r).or_default() += 1;
        }
        ex.reasons = reasons.into_iter().collect();
        let p = &mut ex.provenance;
        let t = rfc3339(c.timestamp_ms);
        if t < p.first_seen {
            p.first_seen = t.clone();
        }
        if t > p.last_seen {
            p.last_seen = t;
        }
        if p.event_ids.len() < hc.max_event_ids && !p.event_ids.contains(&c.event_id) {
            p.event_ids.push(c.event_id.clone());
            self.by_event.insert(c.event_id.clone(), i);
        }
        if let Some(v) = &c.prompt_version
            && !p.prompt_versions.contains(v)
        {
            p.prompt_versions.push(v.clone());
        }
        for a in &c.alerts {
            if !p.alerts.contains(a) {
                p.alerts.push(a.clone());
            }
        }
        // A clearer failure becomes the representative (the id and anchor stay).
        if Example::rank(&c.scores) > Example::rank(&ex.scores) && c.event_id != p.event_id {
            ex.input = c.input.clone().unwrap_or_default();
            ex.output = c.output.clone();
            ex.expected = c.expected.clone();
            ex.system = c.system.clone();
            ex.scores = c.scores.clone();
            ex.error_type = c.error_type.clone();
            ex.feedback = c.feedback;
            p.event_id = c.event_id.clone();
            p.timestamp = rfc3339(c.timestamp_ms);
            p.app = c.app.clone();
            p.environment = c.environment.clone();
            p.model = c.model.clone();
            p.prompt_id = c.prompt_id.clone();
            p.prompt_version = c.prompt_version.clone();
        }
        ex.updated_in = version.to_owned();
        self.changed.insert(i);
    }

    fn row(&mut self, c: &Candidate, i: usize, fold: Fold, similarity: Option<f64>) {
        self.rows.push(Row {
            event_id: c.event_id.clone(),
            timestamp_ms: c.timestamp_ms,
            dims: [
                c.app.clone(),
                c.environment.clone(),
                c.model.clone(),
                c.prompt_id.clone(),
                c.prompt_version.clone(),
            ],
            reasons: c
                .reasons
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(","),
            example_id: self.examples[i].id.clone(),
            fold,
            similarity,
        });
    }

    /// Writes the run's `harvest` rows, then the new version (renamed into place last).
    pub fn commit(
        &mut self,
        root: &Path,
        hc: &HarvestConfig,
        embedder_id: &str,
        window: (i64, i64),
        now_ms: i64,
        report: &mut RunReport,
    ) -> Result<(), HarvestError> {
        let v = self.latest + 1;
        let vname = version_name(v);
        let hour = now_ms.div_euclid(3_600_000);
        let rows_path = root
            .join("harvest")
            .join(crate::sink::hour_dir(hour))
            .join(format!("{}{vname}.parquet", self.file_prefix()));
        let batch = harvest_batch(&self.rows, &self.name, &vname, now_ms);
        crate::sink::write_into_place(
            &rows_path,
            &batch,
            crate::sink::Table::Harvest,
            &crate::config::SinkConfig::default(),
        )?;
        crate::sink::fsync_dir(rows_path.parent().expect("a partition directory"))?;

        let tmp = self.dir.join(format!(".{vname}.tmp"));
        fs::create_dir_all(&tmp).map_err(|e| dataset_err(&tmp, e))?;
        let mut jsonl = Vec::new();
        for ex in &self.examples {
            serde_json::to_writer(&mut jsonl, ex).map_err(|e| dataset_err(&tmp, e))?;
            jsonl.push(b'\n');
        }
        let dim = self.anchors.first().map_or(0, Vec::len);
        let mut emb = Vec::with_capacity(self.anchors.len() * dim * 4);
        for a in &self.anchors {
            for x in a {
                emb.extend_from_slice(&x.to_le_bytes());
            }
        }
        let mut files = BTreeMap::new();
        for (name, bytes) in [("examples.jsonl", &jsonl), ("embeddings.f32", &emb)] {
            write_file(&tmp.join(name), bytes)?;
            files.insert(
                name,
                serde_json::json!({ "bytes": bytes.len(), "sha256": sha256_hex(bytes) }),
            );
        }
        let updated = self
            .changed
            .iter()
            .filter(|&&i| self.examples[i].added_in != vname)
            .count();
        let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
        for ex in &self.examples {
            for (r, n) in &ex.reason_counts {
                *by_reason.entry(r.name()).or_default() += n;
            }
        }
        let manifest = serde_json::json!({
            "dataset": self.name,
            "version": vname,
            "parent": (self.latest > 0).then(|| version_name(self.latest)),
            "created_at": rfc3339(now_ms),
            "harvested_from": rfc3339(window.0),
            "harvested_to": rfc3339(window.1),
            "embedder": embedder_id,
            "embedding_dim": dim,
            "near_duplicate": hc.near_duplicate,
            "redacted": hc.redact,
            "content_hash": format!("sha256:{}", sha256_hex(&jsonl)),
            "counts": {
                "examples": self.examples.len(),
                "events": self.examples.iter().map(|e| e.count).sum::<u64>(),
                "new_examples": report.new_examples,
                "updated_examples": updated,
                "harvested_events": self.rows.len(),
                "folded_exact": report.folded_exact,
                "folded_near": report.folded_near,
                "events_by_reason": by_reason,
            },
            "files": files,
        });
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| dataset_err(&tmp, e))?;
        write_file(&tmp.join("manifest.json"), &body)?;
        crate::sink::fsync_dir(&tmp)?;
        let dest = self.dir.join(&vname);
        fs::rename(&tmp, &dest).map_err(|e| dataset_err(&dest, e))?;
        crate::sink::fsync_dir(&self.dir)?;
        for r in self.rows.drain(..) {
            self.harvested
                .entry(r.event_id)
                .or_default()
                .extend(r.reasons.split(',').filter_map(Reason::parse));
        }
        self.changed.clear();
        self.latest = v;
        report.version = Some(vname);
        Ok(())
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), HarvestError> {
    let mut f = fs::File::create(path).map_err(|e| dataset_err(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| dataset_err(path, e))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// PII out of every text a candidate carries, one placeholder numbering across them.
fn redact(c: &mut Candidate, hc: &HarvestConfig) {
    let mut r = Redactor::new(&hc.redact_kinds);
    for s in [&mut c.input, &mut c.output, &mut c.system, &mut c.expected]
        .into_iter()
        .flatten()
    {
        *s = r.redact(s);
    }
    for s in &mut c.scores {
        if let Some(x) = &mut s.explanation {
            *x = r.redact(x);
        }
        if let Some(x) = &mut s.label {
            *x = r.redact(x);
        }
    }
}

pub fn harvest_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        Field::new("run_time", ts.clone(), false),
        Field::new("dataset", DataType::Utf8, false),
        Field::new("version", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, false),
        Field::new("timestamp", ts, false),
        s("app"),
        s("environment"),
        s("model"),
        s("prompt_id"),
        s("prompt_version"),
        Field::new("reasons", DataType::Utf8, false),
        Field::new("example_id", DataType::Utf8, false),
        Field::new("fold", DataType::Utf8, false),
        Field::new("similarity", DataType::Float64, true),
    ]))
}

fn harvest_batch(rows: &[Row], dataset: &str, version: &str, now_ms: i64) -> RecordBatch {
    use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
    let time = |f: &dyn Fn(&Row) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"),
        )
    };
    let text = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let constant = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; rows.len()])) };
    let dim = |k: usize| text(&move |r: &Row| r.dims[k].as_deref());
    let columns = vec![
        time(&|_| now_ms),
        constant(dataset),
        constant(version),
        text(&|r| Some(&r.event_id)),
        time(&|r| r.timestamp_ms),
        dim(0),
        dim(1),
        dim(2),
        dim(3),
        dim(4),
        text(&|r| Some(&r.reasons)),
        text(&|r| Some(&r.example_id)),
        text(&|r| Some(r.fold.name())),
        Arc::new(rows.iter().map(|r| r.similarity).collect::<Float64Array>()),
    ];
    RecordBatch::try_new(harvest_schema(), columns).expect("columns match the harvest schema")
}

/// Publishes the examples new or changed in versions not yet published to `topic` (key: the
/// example id; at-least-once: a crash between the broker's ack and the state file sends a
/// version again, and consumers keep the last record per key).
pub fn publish(
    ds: &Dataset,
    cfg: &crate::config::PipelineConfig,
    topic: &str,
) -> Result<usize, HarvestError> {
    let crate::config::SourceConfig::Kafka(k) = &cfg.source else {
        return Err(HarvestError::Kafka(
            "harvest.kafka_topic needs a Kafka source (its brokers are used)".into(),
        ));
    };
    let state = crate::sink::state_dir(&cfg.data_root, "harvest");
    fs::create_dir_all(&state).map_err(|e| dataset_err(&state, e))?;
    let path = state.join(format!("{}.published", ds.name));
    let done: u32 = fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if done >= ds.latest {
        return Ok(0);
    }
    let props: Vec<(String, String)> = k.properties.clone().into_iter().collect();
    let producer = crate::replay::producer(&k.brokers, &props)
        .map_err(|e| HarvestError::Kafka(e.to_string()))?;
    let mut sent = 0u64;
    for v in (done + 1)..=ds.latest {
        let vname = version_name(v);
        let vdir = ds.dir.join(&vname);
        if !vdir.is_dir() {
            continue;
        }
        for ex in read_examples(&vdir)?
            .iter()
            .filter(|e| e.updated_in == vname)
        {
            let mut body = serde_json::to_value(ex).map_err(|e| dataset_err(&vdir, e))?;
            body["dataset"] = serde_json::json!(ds.name);
            body["version"] = serde_json::json!(vname);
            let bytes = serde_json::to_vec(&body).map_err(|e| dataset_err(&vdir, e))?;
            crate::replay::send(&producer, topic, Some(ex.id.as_bytes()), &bytes)
                .map_err(|e| HarvestError::Kafka(e.to_string()))?;
            sent += 1;
        }
    }
    crate::replay::finish(&producer, sent).map_err(|e| HarvestError::Kafka(e.to_string()))?;
    crate::sink::write_durably(&path, ds.latest.to_string().as_bytes())?;
    Ok(sent as usize)
}
