//! Integration tests: one binary (see STYLE.md), real broker, real files.

mod alerts;
mod cli;
mod drift;
mod experiments;
mod harvest;
mod kafka;
mod quality;
mod shared_data;
mod support;
