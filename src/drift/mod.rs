//! Drift detection (work in progress, issue #4): what users ask and what the model answers,
//! compared window by window against a reference, with a calibrated false-alarm rate.
//!
//! Landed so far, as tested building blocks (not yet wired into the pipeline):
//! - [`embed`]: the [`embed::Embedder`] trait and [`embed::HashEmbedder`], the
//!   dependency-free embedder the pipeline falls back on;
//! - [`sample`]: [`sample::BottomK`], deterministic, mergeable sampling of texts per series
//!   and window (what an embedding budget is spent on);
//! - [`stats`]: MMD² (RBF kernel, median heuristic, permutation null) and the centroid cosine
//!   distance (bootstrap null), each returning a p-value whose false-alarm rate is checked
//!   over many seeded runs, and PCA for reducing embeddings first.
//!
//! Still to come: sentence-model embedders (fastembed, static), the per-series drift stage
//! with reference management (`telltale baseline`), scalar drift, explanations, the `drift`
//! table, and drift rules in `alerts/`.

pub mod embed;
pub mod sample;
pub mod scalar;
pub mod stage;
pub mod state;
pub mod stats;
pub mod table;

pub use stage::{DriftConfig, DriftSender, DriftStage, EmbedderKind, Judge, SampleWindow};

#[cfg(test)]
mod tests;
