//! telltale watches production LLM traffic as it streams past.
//!
//! ```text
//!  Kafka topic(s) ──► ingest ──► decode ──► per-partition ──► sink ──► Parquet: events, rejects
//!  or JSONL files     consumer   telltale /  Arrow buffers     writer    <root>/<table>/date=…/hour=…/
//!                     group      openai /                      thread    then commit offsets
//!                                auto ──► metrics (windows) ──► Parquet: metrics, /metrics
//!                                  │ bad record                  │ closed windows, once durable
//!                                  │                             ▼
//!                                  │                alert: rules, lifecycle, grouping ──► email,
//!                                  │                silences, inhibition, rollback hint   webhooks
//!                                  └──► rejects (reason, coordinates)      Parquet: alerts
//!                                                          telltale sql (DataFusion) over all tables
//! ```
//!
//! Delivery: at-least-once from Kafka, exactly-once into Parquet: a batch's files are renamed
//! into place before its offsets are committed, and a batch written but not committed when the
//! process died is rolled back when its partition is next assigned ([`sink`]).
//!
//! Modules, in data-flow order: [`ingest`] (Kafka and file sources), [`decode`] (wire formats
//! → [`event::LlmEvent`]), [`event`] and [`rejects`] (the tables' rows), [`metrics`] (cost, and
//! per-series histograms per event-time window, on [`window`]'s series and windows), [`alert`]
//! (rules over closed windows, notifications), [`drift`], [`quality`] (scorers and the judge),
//! [`experiment`] (A/B tests on the committed tables, sequential statistics), [`harvest`]
//! (failures → eval datasets), [`sink`] (Parquet and the commit protocol),
//! [`query`] (SQL). [`config`] turns pipeline files into
//! typed config; [`demo`] is the self-contained `telltale demo`; [`telemetry`] is telltale's own
//! logs, counters and `/metrics` endpoint.

pub mod alert;
pub mod config;
pub mod decode;
pub mod demo;
pub mod drift;
pub mod event;
pub mod experiment;
pub mod harvest;
pub mod ingest;
pub mod metrics;
pub mod quality;
pub mod query;
pub mod rejects;
pub mod replay;
pub mod sink;
pub mod telemetry;
pub mod window;
