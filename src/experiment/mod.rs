//! experiments: prompt variants on live traffic, judged with statistics that stay valid under
//! continuous monitoring.
//!
//! An experiment (`[[experiment]]` in a pipeline file, [`config`]) names the event field that
//! carries the arm (`variant` or `prompt_version`), its arms with the control first and their
//! expected split, and its metrics: goal, secondary and guardrail, each with a direction and,
//! for guardrails, a tolerated degradation. Once a window has settled, [`collect`] reads its
//! events, scores and late feedback from the committed tables into per-arm moments,
//! [`scorecard`] merges them into the running totals and decides (keep running, promote,
//! roll back, invalid), [`table`] writes the `experiments` table and the alert frame, and
//! [`stage`] drives it all, in the pipeline or once for a backfill. The statistics are in
//! [`stats`].

pub mod collect;
pub mod config;
pub mod report;
pub mod scorecard;
pub mod stage;
pub mod stats;
pub mod table;
#[cfg(test)]
mod tests;

pub use config::{ExperimentConfig, ExperimentsConfig};
pub use scorecard::{Decision, Look};
pub use stage::{Evaluator, ExperimentStage};
