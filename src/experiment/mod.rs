//! experiments: prompt variants on live traffic, judged with statistics that stay valid under
//! continuous monitoring. This increment holds the statistics ([`stats`]); the stage that keeps
//! per-arm moments per window, the scorecard, the decisions and the `experiments` table build
//! on it (issue #8).

pub mod stats;
#[cfg(test)]
mod tests;
