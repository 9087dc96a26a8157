//! Drift detection (issue #4): what users ask and what the model answers, compared window by
//! window with each series' own recent past, with a calibrated false-alarm rate.
//!
//! ```text
//!  events ─► metrics stage: per series and minute, bottom-k texts + scalar histograms
//!                  │ (closed minutes, once durable)
//!                  ▼
//!            drift stage thread: minutes → 5-min windows → budget → embed → tests against the
//!            trailing reference, calibrated on the series' history → `drift` table, frames for
//!            the alert stage, state (`_state/drift/`)
//! ```
//!
//! - [`embed`]: the [`embed::Embedder`] trait and [`embed::HashEmbedder`];
//! - [`sample`]: [`sample::BottomK`] and the per-series window sample;
//! - [`stats`]: MMD² and nearest neighbours (permutation nulls), centroid distance (bootstrap
//!   null), PCA;
//! - [`scalar`]: lengths, tokens, finish reasons, refusals, scripts (JS, PSI, KS, W₁);
//! - [`stage`]: [`Judge`] (windows, budget, references, verdicts) and [`DriftStage`];
//! - [`state`]: references and verdict history across restarts;
//! - [`baseline`]: pinned baselines (`telltale baseline pin`), judged against instead of the
//!   trailing reference;
//! - [`table`]: the `drift` table and the alert frame.
//!
//! Embedders: [`embed::HashEmbedder`] (always there), [`sentence`] (all-MiniLM-L6-v2 on ONNX
//! Runtime) and [`static_model`] (model2vec, distilled from it).

pub mod baseline;
pub mod embed;
pub mod sample;
pub mod scalar;
pub mod sentence;
pub mod stage;
pub mod state;
pub mod static_model;
pub mod stats;
pub mod table;

pub use stage::{DriftConfig, DriftSender, DriftStage, EmbedderKind, Judge, SampleWindow};

#[cfg(test)]
mod tests;
