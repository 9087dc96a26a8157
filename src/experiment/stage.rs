//! Running the experiments: windows are evaluated once they have settled, from the committed
//! tables, in event time; each look writes one `experiments` file per window and hands its
//! frame to the alert stage.
//!
//! ## Why from the tables, not inline
//! An experiment's metrics arrive late by design: the judge scores an event minutes after it
//! was written (deferred scorers), and users give feedback later still, in events that name
//! the original (`feedback_for`). Evaluating a window `settle` after the metrics stage closed
//! it, from `events` and `scores`, counts all of that; the per-window partials it stores are
//! mergeable, so the running totals are a fold over the windows, never a rescan.
//!
//! ## Crash safety
//! The running totals and the end of the last evaluated window are kept in
//! `<root>/_state/experiments/<stream>.json`, written atomically after the window's file is
//! durable. A crash in between re-evaluates the window from the same tables with the same
//! totals, and rewrites the same file under the same name. Events delivered twice (the same
//! `event_id`) are counted once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};
use tracing::{info, warn};

use super::collect::{ArmIndex, scan};
use super::config::ExperimentsConfig;
use super::scorecard::{Look, Running, look};
use super::table::{experiments_batch, experiments_file};
use crate::alert::FrameSender;
use crate::alert::engine::Frame;
use crate::config::SinkConfig;
use crate::sink::{SinkError, Table};
use crate::telemetry::Stats;

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// The end of the last window evaluated.
    pub evaluated_through_ms: Option<i64>,
    pub experiments: BTreeMap<String, Running>,
}

pub fn state_path(root: &Path, stream: &str) -> PathBuf {
    crate::sink::state_dir(root, "experiments").join(format!("{stream}.json"))
}

fn read_state(path: &Path) -> Result<State, SinkError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| SinkError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!("corrupt experiments state: {e}")),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(SinkError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Evaluates settled windows; owns the running totals.
pub struct Evaluator {
    cfg: ExperimentsConfig,
    root: PathBuf,
    stream: String,
    sink: SinkConfig,
    /// `None`: a backfill, which keeps no state (it recomputes from scratch each run).
    state_path: Option<PathBuf>,
    state: State,
    index: ArmIndex,
    frames: Option<FrameSender>,
    stats: Arc<Stats>,
}

impl Evaluator {
    /// An evaluator for `stream`; `persist` keeps the running totals across restarts.
    pub fn open(
        cfg: ExperimentsConfig,
        root: &Path,
        stream: &str,
        persist: bool,
        sink: SinkConfig,
        frames: Option<FrameSender>,
        stats: Arc<Stats>,
    ) -> Result<Evaluator, SinkError> {
        let state_path = persist.then(|| state_path(root, stream));
        let mut state = match &state_path {
            Some(p) => read_state(p)?,
            None => State::default(),
        };
        // An experiment removed from the config is forgotten; a changed one (other arms or
        // metrics) starts over, since its totals no longer describe it.
        state.experiments.retain(|name, run| {
            cfg.find(name).is_some_and(|x| {
                x.arms.iter().all(|a| run.events.contains_key(a))
                    && x.metrics.iter().all(|m| {
                        x.arms
                            .iter()
                            .all(|a| run.moments.contains_key(&format!("{}/{a}", m.name)))
                    })
                    || run.looks == 0
            })
        });
        if let Some(t) = state.evaluated_through_ms {
            info!(stream, evaluated_through = %crate::metrics::fmt_ms(t), experiments = state.experiments.len(), "experiments state restored");
        }
        Ok(Evaluator {
            cfg,
            root: root.to_owned(),
            stream: stream.to_owned(),
            sink,
            state_path,
            state,
            index: ArmIndex::default(),
            frames,
            stats,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Where a fresh evaluator starts: the earliest `start`, else `initial_lookback` before
    /// `through`; a backfill starts at the first hour of `events`.
    fn first_window(&self, through_ms: i64) -> Result<i64, SinkError> {
        let starts: Vec<i64> = self
            .cfg
            .experiments
            .iter()
            .filter_map(|x| x.start_ms)
            .collect();
        if starts.len() == self.cfg.experiments.len()
            && let Some(s) = starts.iter().min()
        {
            return Ok(*s);
        }
        if self.state_path.is_none() {
            let hours = crate::metrics::rebuild::table_hours(&self.root, "events")?;
            if let Some(first) = hours.iter().map(|(t, _)| *t).min() {
                return Ok(first);
            }
        }
        Ok(through_ms - self.cfg.initial_lookback.as_millis() as i64)
    }

    /// Evaluates every window that ends at or before `through_ms`, oldest first. Returns the
    /// looks taken.
    pub fn advance(&mut self, through_ms: i64) -> Result<Vec<Look>, SinkError> {
        let w = self.cfg.window_ms();
        let through = through_ms.div_euclid(w) * w;
        let from = match self.state.evaluated_through_ms {
            Some(t) => t,
            None => self.first_window(through)?.div_euclid(w) * w,
        };
        let mut out = Vec::new();
        if from >= through {
            return Ok(out);
        }
        // Scan an hour (whole windows) at a time: each file is read once per chunk.
        let chunk = (3_600_000 / w).max(1) * w;
        let mut at = from;
        while at < through {
            let to = (at + chunk).min(through);
            let (tallies, notes) = scan(&self.root, &self.cfg, at, to, &mut self.index)?;
            if notes.duplicates > 0 || notes.feedback_unmatched > 0 {
                info!(
                    duplicates = notes.duplicates,
                    feedback_unmatched = notes.feedback_unmatched,
                    "experiments: events delivered twice counted once; feedback naming no experiment event skipped"
                );
            }
            for (start, per_exp) in tallies {
                let mut looks = Vec::new();
                for (x, t) in self.cfg.experiments.iter().zip(&per_exp) {
                    if t.is_empty() {
                        continue;
                    }
                    let run = self.state.experiments.entry(x.name.clone()).or_default();
                    looks.push((x, look(&self.cfg, x, run, Some(t), start, start + w)));
                }
                if looks.is_empty() {
                    continue;
                }
                let batch = experiments_batch(&self.stream, &looks);
                let path = self.root.join(experiments_file(&self.stream, start));
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| SinkError::Io {
                        path: dir.to_owned(),
                        source: e,
                    })?;
                }
                crate::sink::write_into_place(&path, &batch, Table::Experiments, &self.sink)?;
                crate::sink::fsync_dir(path.parent().expect("has a directory"))?;
                self.stats
                    .experiment_looks
                    .fetch_add(looks.len() as u64, Ordering::Relaxed);
                for (_, l) in &looks {
                    self.stats.note_experiment(&l.experiment, l.decision.name());
                }
                if let Some(f) = &self.frames
                    && let Some(frame) = Frame::from_experiments(&batch)
                {
                    f.send(vec![frame]);
                }
                out.extend(looks.into_iter().map(|(_, l)| l));
            }
            self.state.evaluated_through_ms = Some(to);
            self.save()?;
            at = to;
        }
        Ok(out)
    }

    fn save(&self) -> Result<(), SinkError> {
        let Some(p) = &self.state_path else {
            return Ok(());
        };
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SinkError::Io {
                path: dir.to_owned(),
                source: e,
            })?;
        }
        let body = serde_json::to_vec_pretty(&self.state).expect("state serializes");
        crate::sink::write_durably(p, &body)
    }
}

enum Msg {
    /// The metrics stage closed (durably) every window ending at or before this time.
    ClosedThrough(i64),
    Stop,
}

/// The evaluator on its own thread, fed by the metrics stage's close positions.
pub struct ExperimentStage {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

/// Tells a running stage how far windows are closed; cheap to clone.
#[derive(Clone)]
pub struct ClosedSender(Sender<Msg>);

impl ClosedSender {
    pub fn closed_through(&self, t: i64) {
        // The stage only needs the latest position: a full queue drops a stale one.
        let _ = self.0.try_send(Msg::ClosedThrough(t));
    }
}

impl ExperimentStage {
    pub fn start(
        cfg: ExperimentsConfig,
        root: &Path,
        stream: &str,
        sink: SinkConfig,
        frames: Option<FrameSender>,
        stats: Arc<Stats>,
    ) -> Result<ExperimentStage, SinkError> {
        let settle = cfg.settle.as_millis() as i64;
        let durable_after = sink.roll_interval * 2 + Duration::from_secs(2);
        let mut ev = Evaluator::open(cfg, root, stream, true, sink, frames, stats)?;
        let (tx, rx) = bounded(64);
        let thread = std::thread::Builder::new()
            .name("telltale-experiments".into())
            .spawn(move || drive(&mut ev, rx, settle, durable_after))
            .map_err(|e| SinkError::Io {
                path: "experiments thread".into(),
                source: e,
            })?;
        Ok(ExperimentStage {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn sender(&self) -> ClosedSender {
        ClosedSender(self.tx.clone().expect("the stage is running"))
    }

    /// Evaluates the windows closed so far (the scorers that would settle them have
    /// stopped too) and stops.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ExperimentStage {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn drive(ev: &mut Evaluator, rx: Receiver<Msg>, settle: i64, durable_after: Duration) {
    // A window the metrics stage closed may still have events in a partition buffer that is
    // not yet written: each close position waits `durable_after` (two buffer rolls) of wall
    // time before the windows it settles are read from the tables.
    let mut waiting: std::collections::VecDeque<(i64, std::time::Instant)> = Default::default();
    let mut closed = i64::MIN;
    let step = |ev: &mut Evaluator, through: i64| {
        if through == i64::MIN {
            return;
        }
        if let Err(e) = ev.advance(through) {
            warn!(error = %e, "experiments: evaluation failed; retried at the next window");
        }
    };
    loop {
        let wait = waiting.front().map_or(Duration::from_secs(30), |(_, at)| {
            durable_after.saturating_sub(at.elapsed())
        });
        match rx.recv_timeout(wait) {
            Ok(Msg::ClosedThrough(t)) => {
                if t > closed {
                    closed = t;
                    waiting.push_back((t.saturating_sub(settle), std::time::Instant::now()));
                }
            }
            Ok(Msg::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                // Stopping: the writer has made everything durable, and the scorers that
                // would settle the last windows have stopped.
                step(ev, closed);
                return;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
        let mut through = i64::MIN;
        while let Some((t, at)) = waiting.front() {
            if at.elapsed() < durable_after {
                break;
            }
            through = through.max(*t);
            waiting.pop_front();
        }
        step(ev, through);
    }
}

/// Evaluates a backfill's experiments once, over every window of the data root's tables
/// (no state: a rerun recomputes and replaces its own files).
pub fn once(
    config: &crate::config::PipelineConfig,
    stream: &str,
    frames: Option<FrameSender>,
    stats: Arc<Stats>,
) -> Result<Vec<Look>, SinkError> {
    let mut ev = Evaluator::open(
        config.experiments.clone(),
        &config.data_root,
        stream,
        false,
        config.sink.clone(),
        frames,
        stats,
    )?;
    let hours = crate::metrics::rebuild::table_hours(&config.data_root, "events")?;
    let Some(last) = hours.iter().map(|(t, _)| *t).max() else {
        return Ok(Vec::new());
    };
    ev.advance(last + 3_600_000)
}
