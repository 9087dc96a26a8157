//! The `telltale` command line: parse arguments, load config, run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};

use telltale::config::{PipelineConfig, SourceConfig};
use telltale::ingest::{self, Shutdown};
use telltale::query::{self, OutputFormat};
use telltale::telemetry::{self, Stats};
use telltale::{alert, demo, replay};

#[derive(Parser)]
#[command(
    name = "telltale",
    version,
    about = "Watches production LLM traffic: Kafka in, Parquet and SQL out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline until interrupted (Kafka) or until its input ends (files).
    #[command(
        after_help = "Examples:\n  telltale run --pipeline pipelines/default.toml\n  \
        telltale run --pipeline pipelines/default.toml --source 'file:logs/*.jsonl.gz'\n\n\
        SIGINT/SIGTERM: buffers are written, offsets committed, exit 0. A second signal exits at once."
    )]
    Run {
        /// The pipeline file (TOML).
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Read from files instead of the pipeline's source: file:PATH, file:GLOB or file:- (stdin).
        #[arg(long)]
        source: Option<String>,
    },
    /// Send JSON Lines files (plain or gzip) to a Kafka topic, one record per line.
    #[command(
        after_help = "Example:\n  telltale replay 'exports/*.jsonl.gz' --topic llm-events --brokers 127.0.0.1:9092 --rate 5000"
    )]
    Replay {
        /// A file, a glob, or - for stdin.
        input: String,
        #[arg(long)]
        topic: String,
        #[arg(long, env = "KAFKA_BROKERS")]
        brokers: String,
        /// Records per second (default: as fast as the broker takes them).
        #[arg(long)]
        rate: Option<f64>,
        /// A top-level JSON field whose value becomes the record key (e.g. session_id).
        #[arg(long)]
        key_field: Option<String>,
        /// A librdkafka producer property, KEY=VALUE (repeatable).
        #[arg(short = 'X', value_parser = parse_kv)]
        property: Vec<(String, String)>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Run SQL over the Parquet tables (events, rejects, metrics, …) with DataFusion; hdr_merge,
    /// hdr_quantile and hdr_count read the metrics table's histograms.
    #[command(
        after_help = "Examples:\n  telltale sql \"SELECT count(*) FROM events\"\n  \
        telltale sql \"SELECT prompt_version, hdr_quantile(hdr_merge(latency_ms_hist), 0.99) AS p99_ms FROM metrics WHERE resolution = '1m' AND window_start >= now() - INTERVAL '6 hours' GROUP BY 1\"\n  \
        telltale sql --format csv \"SELECT app, model, count(*) FROM events GROUP BY 1, 2\" > counts.csv\n  \
        echo \"SELECT reason, count(*) FROM rejects GROUP BY 1\" | telltale sql --data-dir /data/telltale"
    )]
    Sql {
        /// The statement; read from stdin when absent.
        sql: Option<String>,
        /// The data root (default: ./telltale-data, or the pipeline's data_root with --pipeline).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Take the data root from this pipeline file.
        #[arg(long, short)]
        pipeline: Option<PathBuf>,
        #[arg(long, short, value_enum, default_value = "table")]
        format: OutputFormat,
        /// Table format: cut cells longer than this many characters.
        #[arg(long, default_value_t = 60)]
        max_width: usize,
    },
    /// Validate a pipeline file, then check the broker and the data root.
    #[command(after_help = "Example:\n  telltale check --pipeline pipelines/default.toml")]
    Check {
        #[arg(long, short)]
        pipeline: PathBuf,
        /// Only validate the file; connect to nothing.
        #[arg(long)]
        offline: bool,
    },
    /// Mute alerts that match label matchers for a while (Alertmanager's silences).
    #[command(
        subcommand,
        after_help = "Examples:\n  telltale silence add 'alertname=\"LatencyRegression\"' 'app=\"support-bot\"' --for 2h --comment \"provider incident\"\n  \
        telltale silence list\n  telltale silence expire 3f2a9c1e"
    )]
    Silence(SilenceCommand),
    /// Exit non-zero when critical alerts fire for a prompt version, or when an experiment says
    /// roll back: a CI/CD deployment gate.
    #[command(
        after_help = "Example:\n  telltale gate --app support-bot --env prod --prompt-version v4 || ./rollback.sh\n\n\
        telltale gate --experiment summary-style || ./rollback.sh\n\n\
        Exit status: 0 no critical alert fires for that version (or the experiment keeps running or\n\
        may be promoted); 1 some do (listed, with the last known-good version to roll back to), or\n\
        the experiment says rollback or invalid; 2 the state could not be read."
    )]
    Gate {
        #[arg(long, required_unless_present = "experiment")]
        app: Option<String>,
        #[arg(long = "env", required_unless_present = "experiment")]
        environment: Option<String>,
        #[arg(long, required_unless_present = "experiment")]
        prompt_version: Option<String>,
        /// Gate on an experiment's latest decision instead: exit 1 on rollback or invalid.
        #[arg(long, conflicts_with_all = ["app", "environment", "prompt_version"])]
        experiment: Option<String>,
        #[command(flatten)]
        root: RootArgs,
    },
    /// A/B experiments on prompt variants: their scorecards.
    #[command(
        subcommand,
        after_help = "Examples:\n  telltale experiment status summary-style\n  telltale experiment list --pipeline pipelines/demo.toml"
    )]
    Experiment(ExperimentCommand),
    /// Embedding models for drift and harvest: what is installed, and the static model.
    #[command(
        subcommand,
        after_help = "Examples:\n  bash scripts/models.sh && telltale models distill\n  telltale models list"
    )]
    Models(ModelsCommand),
    /// Pin the drift baseline: series are judged against a fixed period, or against all traffic
    /// of one prompt version, instead of their trailing 24 h.
    #[command(
        subcommand,
        after_help = "Examples:\n  telltale baseline pin --pipeline pipelines/default.toml --from 2026-11-20T00:00:00Z --to 2026-11-21T00:00:00Z\n  \
        telltale baseline pin --pipeline pipelines/default.toml --prompt-version v3 --where app=support-bot\n  \
        telltale baseline show --pipeline pipelines/default.toml\n  \
        telltale baseline unpin --pipeline pipelines/default.toml --where app=support-bot"
    )]
    Baseline(BaselineCommand),
    /// List pending and firing alerts (from the running pipelines' state).
    Alerts {
        #[command(flatten)]
        root: RootArgs,
    },
    /// Failing production cases → versioned, deduplicated, redacted eval datasets.
    #[command(
        subcommand,
        after_help = "Examples:\n  telltale harvest run --pipeline pipelines/default.toml\n  \
        telltale harvest export --pipeline pipelines/default.toml --since 24h --reason judge_fail --prompt-version v7 --format promptfoo --out evals/\n  \
        telltale harvest stats --pipeline pipelines/default.toml"
    )]
    Harvest(HarvestCommand),
    /// Run the whole pipeline on generated traffic with an in-process broker; no setup needed.
    #[command(
        after_help = "Example:\n  telltale demo\n  telltale sql \"SELECT app, count(*) FROM events GROUP BY app\""
    )]
    Demo {
        /// Where the demo writes its tables (replaced on each run if a demo made it).
        #[arg(long, default_value = "./telltale-data")]
        data_dir: PathBuf,
        /// Records to generate.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct RootArgs {
    /// The data root (default: ./telltale-data, or the pipeline's data_root with --pipeline).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Take the data root (and alerting settings) from this pipeline file.
    #[arg(long, short)]
    pipeline: Option<PathBuf>,
}

impl RootArgs {
    fn resolve(&self) -> Result<(PathBuf, Option<PipelineConfig>)> {
        Ok(match (&self.data_dir, &self.pipeline) {
            (Some(d), p) => (
                d.clone(),
                p.as_deref().map(PipelineConfig::load).transpose()?,
            ),
            (None, Some(p)) => {
                let c = PipelineConfig::load(p)?;
                (c.data_root.clone(), Some(c))
            }
            (None, None) => (PathBuf::from("./telltale-data"), None),
        })
    }
}

#[derive(Subcommand)]
enum SilenceCommand {
    /// Add a silence: every matcher must match (name="v", name!="v", name=~"re", name!~"re").
    Add {
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 30m, 2h, 1d.
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        #[arg(long, short)]
        comment: String,
        #[arg(long, env = "USER", default_value = "unknown")]
        author: String,
        #[command(flatten)]
        root: RootArgs,
    },
    /// List silences (active and pending; --all adds expired ones).
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        root: RootArgs,
    },
    /// End a silence now.
    Expire {
        id: String,
        #[command(flatten)]
        root: RootArgs,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// The embedders and whether their files are installed (in TELLTALE_MODELS, default
    /// ~/.cache/telltale/models).
    List,
    /// Distill the static (model2vec) embedder from the sentence model `scripts/models.sh`
    /// installed: every vocabulary token through the transformer, 256 principal components,
    /// smooth-inverse-frequency weights. About a minute; replaces an earlier one.
    Distill {
        /// ONNX Runtime threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// Pin the traffic of a period (--from/--to or --last), or all traffic of a prompt version,
    /// as the drift baseline of the series it covers (replacing their earlier pins). Reads
    /// `events`, embeds with the pipeline's embedder and calibrates on the baseline's own
    /// windows; running pipelines use it from their next drift window.
    Pin {
        /// Start of the period (RFC 3339, e.g. 2026-11-20T00:00:00Z).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// End of the period (RFC 3339), excluded.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// The period that ends now and lasts this long, e.g. 24h or 7d.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        last: Option<String>,
        /// All traffic of this prompt version (within the period, if one is given): every
        /// version of each series is judged against it.
        #[arg(long)]
        prompt_version: Option<String>,
        /// Only series with this dimension value, NAME=VALUE (repeatable), e.g. app=support-bot.
        #[arg(long = "where", value_parser = parse_kv)]
        filters: Vec<(String, String)>,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        #[command(flatten)]
        root: RootArgs,
    },
    /// The pinned series: scope, windows, reference texts, calibration, embedder.
    Show {
        #[command(flatten)]
        root: RootArgs,
    },
    /// Unpin the series matching every --where (all of them without one): they are judged
    /// against their trailing reference again, calibrating afresh.
    Unpin {
        #[arg(long = "where", value_parser = parse_kv)]
        filters: Vec<(String, String)>,
        #[command(flatten)]
        root: RootArgs,
    },
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// The latest look at an experiment: decision, reason, and per metric and arm the
    /// estimate, lift, always-valid interval, p-values and verdict.
    Status {
        name: String,
        #[command(flatten)]
        root: RootArgs,
    },
    /// Every experiment with a look in the data root, with its latest decision.
    List {
        #[command(flatten)]
        root: RootArgs,
    },
}

#[derive(Subcommand)]
enum HarvestCommand {
    /// Harvest now: failures of the lookback window become a new dataset version.
    Run {
        #[arg(long, short)]
        pipeline: PathBuf,
        /// How far back to look (default: harvest.lookback, 24h).
        #[arg(long)]
        lookback: Option<String>,
    },
    /// Write a dataset version as files an eval tool reads.
    Export {
        /// jsonl (telltale's own), promptfoo (YAML tests), openai (evals JSONL), langfuse
        /// (dataset items JSON).
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// The directory to write into.
        #[arg(long, default_value = "evals")]
        out: PathBuf,
        /// Only examples seen within this long (e.g. 24h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only examples with this reason (repeatable): judge_fail, low_score, scorer_fail,
        /// negative_feedback, error, guardrail, drift_outlier, alert.
        #[arg(long)]
        reason: Vec<String>,
        #[arg(long)]
        prompt_version: Option<String>,
        #[arg(long)]
        app: Option<String>,
        #[arg(long = "env")]
        environment: Option<String>,
        /// The version (default: the latest), e.g. v0003.
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        harvest: HarvestArgs,
    },
    /// What was harvested, by reason and series, and how many duplicates folded.
    Stats {
        /// Only events harvested from this long ago (e.g. 24h).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        harvest: HarvestArgs,
    },
}

#[derive(clap::Args)]
struct HarvestArgs {
    /// The dataset (default: harvest.dataset, production-failures).
    #[arg(long)]
    dataset: Option<String>,
    /// Where datasets live (default: harvest.dir, else <data root>/datasets).
    #[arg(long)]
    datasets_dir: Option<PathBuf>,
    #[command(flatten)]
    root: RootArgs,
}

impl HarvestArgs {
    fn resolve(&self) -> Result<(PathBuf, PipelineConfig)> {
        let (root, cfg) = self.root.resolve()?;
        let mut cfg = cfg.unwrap_or_else(|| {
            PipelineConfig::kafka("", "", "telltale", &root, Default::default())
        });
        if let Some(d) = &self.dataset {
            cfg.harvest.dataset = d.clone();
        }
        if let Some(d) = &self.datasets_dir {
            cfg.harvest.dir = Some(d.clone());
        }
        Ok((root, cfg))
    }
}

fn since_ms(s: Option<&str>) -> Result<Option<i64>> {
    s.map(|s| {
        let d = telltale::config::reader::parse_duration(s)
            .map_err(|e| anyhow::anyhow!("--since {s:?}: {e}"))?;
        Ok(chrono::Utc::now().timestamp_millis() - d.as_millis() as i64)
    })
    .transpose()
}

fn rfc3339_ms(flag: &str, s: &str) -> Result<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            anyhow::anyhow!("{flag} {s:?} is not an RFC 3339 time (e.g. 2026-11-20T00:00:00Z): {e}")
        })
}

fn baseline(command: BaselineCommand) -> Result<()> {
    use telltale::drift::baseline::{self, Scope};
    let config = |root: &RootArgs| -> Result<(PathBuf, PipelineConfig)> {
        let (dir, cfg) = root.resolve()?;
        let cfg = cfg.unwrap_or_else(|| {
            // A pipeline file's defaults: the embedder is `auto`.
            let mut c = PipelineConfig::kafka("", "", "telltale", &dir, Default::default());
            c.drift.embedder = telltale::drift::EmbedderKind::auto();
            c.drift.budget_texts_per_s = c.drift.embedder.default_budget();
            c
        });
        Ok((dir, cfg))
    };
    match command {
        BaselineCommand::Pin {
            from,
            to,
            last,
            prompt_version,
            filters,
            quiet,
            root,
        } => {
            let (dir, cfg) = config(&root)?;
            let (from_ms, to_ms) = match (&from, &to, &last) {
                (Some(f), Some(t), _) => (rfc3339_ms("--from", f)?, rfc3339_ms("--to", t)?),
                (_, _, Some(l)) => {
                    let d = telltale::config::reader::parse_duration(l)
                        .map_err(|e| anyhow::anyhow!("--last {l:?}: {e}"))?;
                    let now = chrono::Utc::now().timestamp_millis();
                    (now - d.as_millis() as i64, now)
                }
                _ if prompt_version.is_some() => (i64::MIN, i64::MAX),
                _ => anyhow::bail!(
                    "say what to pin: --from and --to, --last (e.g. 24h), or --prompt-version"
                ),
            };
            anyhow::ensure!(from_ms < to_ms, "--from must be before --to");
            let scope = match prompt_version {
                Some(version) => Scope::Version {
                    version,
                    from_ms,
                    to_ms,
                },
                None => Scope::Period { from_ms, to_ms },
            };
            let embedder = cfg.drift.embedder.try_build().map_err(|e| {
                anyhow::anyhow!(
                    "drift.embedder: {e} (`telltale models list` says what is installed)"
                )
            })?;
            let report = baseline::pin(
                &dir,
                &cfg.metrics.window.dimensions,
                &cfg.drift,
                embedder.as_ref(),
                &scope,
                &filters,
                &cfg.sink,
                !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )?;
            println!(
                "pinned {} series ({} texts embedded with {}){}",
                report.pinned.len(),
                report.texts_embedded,
                embedder.id(),
                if report.replaced > 0 {
                    format!(", replacing {} earlier pins", report.replaced)
                } else {
                    String::new()
                }
            );
            for e in &report.pinned {
                // Named as the series it skipped are.
                println!(
                    "  {}: {} windows, calibrated on {} / {}",
                    e.key().display(&cfg.metrics.window.dimensions),
                    e.windows,
                    e.calibration[0],
                    e.calibration[1]
                );
            }
            for (series, why) in &report.skipped {
                println!("  not pinned: {series}: {why}");
            }
        }
        BaselineCommand::Show { root } => {
            let (dir, _) = config(&root)?;
            print!(
                "{}",
                baseline::render(baseline::read_manifest(&dir)?.as_ref())
            );
        }
        BaselineCommand::Unpin { filters, root } => {
            let (dir, cfg) = config(&root)?;
            let removed = baseline::unpin(&dir, &filters, &cfg.sink)?;
            println!(
                "unpinned {} series; they are judged against their trailing reference again",
                removed.len()
            );
        }
    }
    Ok(())
}

fn harvest(command: HarvestCommand) -> Result<()> {
    use telltale::harvest::{self, Reason, dataset, export};
    match command {
        HarvestCommand::Run { pipeline, lookback } => {
            let mut cfg = PipelineConfig::load(&pipeline)?;
            if let Some(l) = lookback {
                cfg.harvest.lookback = telltale::config::reader::parse_duration(&l)
                    .map_err(|e| anyhow::anyhow!("--lookback {l:?}: {e}"))?;
            }
            let r = harvest::run(&cfg, chrono::Utc::now().timestamp_millis())?;
            println!("{}", harvest::describe(&r));
        }
        HarvestCommand::Export {
            format,
            out,
            since,
            reason,
            prompt_version,
            app,
            environment,
            version,
            harvest: args,
        } => {
            let (root, cfg) = args.resolve()?;
            let format = export::Format::parse(&format).with_context(|| {
                format!(
                    "--format {format:?}: expected one of {}",
                    export::Format::NAMES
                )
            })?;
            let mut reasons = Vec::new();
            for r in &reason {
                reasons.push(Reason::parse(r).with_context(|| {
                    format!("--reason {r:?}: expected one of {}", Reason::names())
                })?);
            }
            let dir = cfg.harvest.datasets_dir(&root).join(&cfg.harvest.dataset);
            let v = match version {
                Some(v) => v,
                None => match dataset::versions(&dir).last() {
                    Some(v) => dataset::version_name(*v),
                    None => bail!(
                        "dataset {} has no versions in {} (run `telltale harvest run --pipeline …` first)",
                        cfg.harvest.dataset,
                        dir.display()
                    ),
                },
            };
            let vdir = dir.join(&v);
            if !vdir.join("manifest.json").is_file() {
                bail!(
                    "{} is not a dataset version (no manifest.json)",
                    vdir.display()
                );
            }
            let examples = dataset::read_examples(&vdir)?;
            let filter = export::Filter {
                since_ms: since_ms(since.as_deref())?,
                reasons,
                prompt_version,
                app,
                environment,
            };
            let chosen: Vec<&dataset::Example> =
                examples.iter().filter(|e| filter.accepts(e)).collect();
            let path = export::export(
                &chosen,
                format,
                &cfg.harvest.dataset,
                &v,
                &cfg.quality,
                &out,
            )?;
            println!(
                "wrote {} of {} examples of {} {v} to {}",
                chosen.len(),
                examples.len(),
                cfg.harvest.dataset,
                path.display()
            );
        }
        HarvestCommand::Stats {
            since,
            harvest: args,
        } => {
            let (root, cfg) = args.resolve()?;
            print!(
                "{}",
                harvest::stats(&root, &cfg.harvest, since_ms(since.as_deref())?)?
            );
        }
    }
    Ok(())
}

/// 3600 s → "1h", 90 s → "90s".
fn humantime(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() {
    let cli = Cli::parse();
    // The demo prints its own summary; its logs would only interleave with it.
    telemetry::init_logging(if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    if let Err(err) = runtime.block_on(dispatch(cli.command)) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run { pipeline, source } => run(&pipeline, source.as_deref()).await,
        Command::Replay {
            input,
            topic,
            brokers,
            rate,
            key_field,
            property,
            quiet,
        } => {
            if rate.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
                bail!("--rate must be a positive number of records per second");
            }
            let opts = replay::ReplayOptions {
                input,
                topic,
                brokers,
                rate,
                key_field,
                properties: property,
                progress: !quiet,
            };
            let report = tokio::task::spawn_blocking(move || replay::replay(&opts)).await??;
            eprintln!(
                "sent {} records ({:.1} MiB) in {:.1} s ({:.0} records/s)",
                report.records,
                report.bytes as f64 / (1 << 20) as f64,
                report.elapsed.as_secs_f64(),
                report.records as f64 / report.elapsed.as_secs_f64().max(1e-9)
            );
            Ok(())
        }
        Command::Sql {
            sql,
            data_dir,
            pipeline,
            format,
            max_width,
        } => {
            let root = match (data_dir, pipeline) {
                (Some(d), _) => d,
                (None, Some(p)) => PipelineConfig::load(&p)?.data_root,
                (None, None) => PathBuf::from("./telltale-data"),
            };
            let sql = match sql {
                Some(s) => s,
                None => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading SQL from stdin")?;
                    s
                }
            };
            if sql.trim().is_empty() {
                bail!("no SQL given (pass it as an argument or on stdin)");
            }
            if !root.exists() {
                eprintln!(
                    "note: {} does not exist yet; tables are empty (run `telltale demo` or `telltale run` first)",
                    root.display()
                );
            }
            let batches = query::run_sql(&root, &sql).await?;
            let mut out = std::io::stdout().lock();
            query::write_batches(&mut out, &batches, format, max_width)?;
            out.flush()?;
            Ok(())
        }
        Command::Check { pipeline, offline } => check(&pipeline, offline).await,
        Command::Silence(cmd) => silence(cmd),
        Command::Gate {
            experiment: Some(name),
            root,
            ..
        } => {
            let (root, _) = root.resolve()?;
            experiment_gate(&root, &name)
        }
        Command::Experiment(c) => experiment(c),
        Command::Models(c) => models(c),
        Command::Baseline(c) => tokio::task::spawn_blocking(move || baseline(c)).await?,
        Command::Gate {
            app,
            environment,
            prompt_version,
            root,
            ..
        } => {
            let (app, environment, prompt_version) = (
                app.unwrap_or_default(),
                environment.unwrap_or_default(),
                prompt_version.unwrap_or_default(),
            );
            let (root, cfg) = root.resolve()?;
            let after = cfg.map_or(alert::AlertingConfig::default().known_good_after_ms, |c| {
                c.alerting.known_good_after_ms
            });
            let report = match alert::gate(&root, after, &app, &environment, &prompt_version) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            if report.streams == 0 {
                eprintln!(
                    "note: no alert state under {} (is a pipeline with [alerting] running there?)",
                    root.display()
                );
            }
            let target = format!("{app}/{environment} prompt_version {prompt_version}");
            if report.blocking.is_empty() {
                println!("ok: no critical alert fires for {target}");
                return Ok(());
            }
            println!(
                "blocked: {} critical alert(s) fire for {target}",
                report.blocking.len()
            );
            for a in &report.blocking {
                let summary = a.annotations.get("summary").cloned().unwrap_or_default();
                println!(
                    "  {} since {} (value {}) {summary}",
                    a.rule,
                    telltale::metrics::fmt_ms(a.fired_at.unwrap_or(a.active_at)),
                    alert::rule::human(a.value)
                );
            }
            match report.known_good {
                Some(g) if g != prompt_version => {
                    println!("roll back to prompt_version {g} (the last known-good version)")
                }
                _ => println!("no known-good version to roll back to"),
            }
            std::process::exit(1);
        }
        Command::Alerts { root } => {
            let (root, _) = root.resolve()?;
            let mut n = 0;
            for f in alert::state_files(&root)? {
                let st = alert::read_state(&f)?;
                for a in &st.engine.alerts {
                    n += 1;
                    let labels: Vec<String> = a
                        .labels
                        .iter()
                        .filter(|(k, _)| *k != "alertname" && *k != "severity")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!(
                        "{:<8} {:<9} {:<24} since {}  value {}  {}",
                        format!("{:?}", a.state).to_lowercase(),
                        a.severity,
                        a.rule,
                        telltale::metrics::fmt_ms(a.fired_at.unwrap_or(a.active_at)),
                        alert::rule::human(a.value),
                        labels.join(" ")
                    );
                }
            }
            if n == 0 {
                println!("no pending or firing alerts under {}", root.display());
            }
            Ok(())
        }
        Command::Harvest(c) => tokio::task::spawn_blocking(move || harvest(c)).await?,
        Command::Demo {
            data_dir,
            records,
            seed,
        } => {
            let opts = demo::DemoOptions {
                data_dir,
                records,
                seed,
                ..Default::default()
            };
            let mut out = std::io::stdout();
            demo::run(opts, &mut out).await?;
            Ok(())
        }
    }
}

fn silence(cmd: SilenceCommand) -> Result<()> {
    let now = chrono::Utc::now().timestamp_millis();
    match cmd {
        SilenceCommand::Add {
            matchers,
            duration,
            comment,
            author,
            root,
        } => {
            let (root, _) = root.resolve()?;
            for m in &matchers {
                alert::rule::Matcher::parse(m).map_err(anyhow::Error::msg)?;
            }
            let ms = alert::rule::parse_duration_ms(&duration)
                .map_err(|e| anyhow::anyhow!("--for: {e}"))?;
            if ms <= 0 {
                bail!("--for must be longer than 0");
            }
            let mut all = alert::read_silences(&root)?;
            let id = format!(
                "{:08x}",
                xxhash_rust::xxh3::xxh3_64(format!("{now}{matchers:?}{comment}").as_bytes()) as u32
            );
            all.push(alert::Silence {
                id: id.clone(),
                matchers,
                starts_at: now,
                ends_at: now + ms,
                created_by: author,
                comment,
            });
            alert::write_silences(&root, &all)?;
            println!(
                "silence {id} until {} (running pipelines pick it up within a second)",
                telltale::metrics::fmt_ms(now + ms)
            );
        }
        SilenceCommand::List { all, root } => {
            let (root, _) = root.resolve()?;
            let silences = alert::read_silences(&root)?;
            let shown: Vec<_> = silences.iter().filter(|s| all || s.ends_at > now).collect();
            if shown.is_empty() {
                println!("no silences");
            }
            for s in shown {
                let state = if s.is_active(now) {
                    "active"
                } else if s.starts_at > now {
                    "pending"
                } else {
                    "expired"
                };
                println!(
                    "{}  {state:<7}  until {}  by {}  {}  ({})",
                    s.id,
                    telltale::metrics::fmt_ms(s.ends_at),
                    s.created_by,
                    s.matchers.join(" "),
                    s.comment
                );
            }
        }
        SilenceCommand::Expire { id, root } => {
            let (root, _) = root.resolve()?;
            let mut all = alert::read_silences(&root)?;
            let Some(s) = all.iter_mut().find(|s| s.id == id) else {
                bail!("no silence with id {id} (see `telltale silence list --all`)");
            };
            s.ends_at = s.ends_at.min(now);
            alert::write_silences(&root, &all)?;
            println!("silence {id} expired");
        }
    }
    Ok(())
}

/// First signal: graceful shutdown. Second: exit at once.
fn install_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut count = 0;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            count += 1;
            if count == 1 {
                tracing::info!(
                    "shutting down: writing buffers and committing offsets (signal again to exit at once)"
                );
                shutdown.trigger();
            } else {
                eprintln!(
                    "exiting without flushing; uncommitted records will be read again on restart"
                );
                std::process::exit(130);
            }
        }
    });
}

async fn run(pipeline: &Path, source: Option<&str>) -> Result<()> {
    let mut config = PipelineConfig::load(pipeline)?;
    if let Some(s) = source {
        let path = s
            .strip_prefix("file:")
            .with_context(|| format!("--source {s:?}: expected file:PATH, file:GLOB or file:-"))?;
        config = config.with_file_source(path);
    }
    std::fs::create_dir_all(&config.data_root)
        .with_context(|| format!("creating data root {}", config.data_root.display()))?;
    let stats = Arc::new(Stats::default());
    if let Some(addr) = config.telemetry.listen {
        let served = telemetry::server::serve(addr, stats.clone())
            .await
            .with_context(|| {
                format!("cannot serve /metrics on {addr} (set [telemetry] listen to another address, or \"off\")")
            });
        match served {
            Ok(_) => {}
            // A backfill next to a running pipeline (which holds the port) still runs.
            Err(err) if matches!(config.source, telltale::config::SourceConfig::File(_)) => {
                tracing::warn!("{err:#}; continuing without the endpoint")
            }
            Err(err) => return Err(err),
        }
    }
    let shutdown = Shutdown::new();
    install_signals(shutdown.clone());
    let snap = tokio::task::spawn_blocking(move || ingest::run(&config, stats, shutdown)).await??;
    eprintln!(
        "done: {} records read, {} events and {} rejects written to {} files",
        snap.records_in, snap.events_written, snap.rejects_written, snap.files_written
    );
    let deferred = snap.quality_deferred_scored
        + snap.quality_deferred_failed
        + snap.quality_budget_skipped
        + snap.quality_deferred_dropped;
    if snap.scores_written + deferred > 0 {
        eprintln!(
            "quality: {} scores written with their events; deferred scorers: {} scored, {} failed, {} skipped (token budget), {} dropped (queue full)",
            snap.scores_written,
            snap.quality_deferred_scored,
            snap.quality_deferred_failed,
            snap.quality_budget_skipped,
            snap.quality_deferred_dropped
        );
    }
    Ok(())
}

async fn check(pipeline: &Path, offline: bool) -> Result<()> {
    let config = PipelineConfig::load(pipeline)?;
    println!(
        "ok   {}: valid pipeline {:?}",
        pipeline.display(),
        config.name
    );
    let prices = telltale::metrics::load_prices(&config.metrics)?;
    println!(
        "ok   price table {}: {} models",
        config
            .metrics
            .prices
            .as_ref()
            .map_or("(built-in)".to_owned(), |p| p.display().to_string()),
        prices.len()
    );
    let q = &config.quality;
    if q.enabled() {
        println!(
            "ok   quality: {} scorers ({}); {} % of events sampled, {} per-series rules",
            q.scorers.len(),
            q.scorers
                .iter()
                .map(|s| format!("{} {}", s.name, s.kind))
                .collect::<Vec<_>>()
                .join(", "),
            q.sample_rate * 100.0,
            q.rules.len()
        );
        let judges = q
            .scorers
            .iter()
            .filter(|s| matches!(s.check, telltale::quality::Check::Judge(_)))
            .count();
        if judges > 0 {
            let j = &q.judge;
            if let Some(var) = &j.api_key_env
                && std::env::var(var).is_err()
            {
                bail!(
                    "quality.judge: the API key variable {var} is not set (set it, or api_key_env = \"\" for a server without keys)"
                );
            }
            println!(
                "ok   judge: {} at {} for {judges} scorer(s); {} in flight, budget {}",
                j.model,
                j.base_url,
                j.concurrency,
                match q.budget_tokens_per_hour {
                    0 => "unlimited".to_owned(),
                    b => format!("{b} tokens/hour"),
                }
            );
        }
    }
    let h = &config.harvest;
    if h.enabled {
        let embedder = h.embedder.try_build().context("harvest.embedder")?;
        println!(
            "ok   harvest: dataset {} in {} every {}, looking back {}; reasons {}; near duplicates at cosine {} ({}); redaction {}{}",
            h.dataset,
            h.datasets_dir(&config.data_root).display(),
            humantime(h.interval),
            humantime(h.lookback),
            h.reasons
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>()
                .join(", "),
            h.near_duplicate,
            embedder.id(),
            if h.redact { "on" } else { "off" },
            h.kafka_topic
                .as_ref()
                .map_or(String::new(), |t| format!("; published to {t}")),
        );
    }
    let xc = &config.experiments;
    for x in &xc.experiments {
        let arms: Vec<String> = x
            .arms
            .iter()
            .zip(&x.split)
            .enumerate()
            .map(|(i, (a, s))| {
                format!(
                    "{a}{} {:.0} %",
                    if i == 0 { " (control)" } else { "" },
                    s * 100.0
                )
            })
            .collect();
        let metrics: Vec<String> = x
            .metrics
            .iter()
            .map(|m| {
                let tol = if m.tolerance > 0.0 {
                    format!(", {:.0} % tolerated", m.tolerance * 100.0)
                } else {
                    String::new()
                };
                format!(
                    "{} {} ({}{tol})",
                    m.role.name(),
                    m.name,
                    if m.higher_is_better {
                        "higher is better"
                    } else {
                        "lower is better"
                    }
                )
            })
            .collect();
        println!(
            "ok   experiment {}: arms by {} [{}]{}; {}; a look every {} once settled {}, alpha {}",
            x.name,
            x.arm.name(),
            arms.join(", "),
            if x.filter.is_empty() {
                String::new()
            } else {
                format!(
                    " where {}",
                    x.filter
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            metrics.join(", "),
            humantime(xc.window),
            humantime(xc.settle),
            xc.alpha
        );
    }
    if config.alerting.enabled {
        let ctx = alert::pipeline_rule_context(&config);
        let rules = alert::load_rules(&config.alerting, &ctx)?;
        println!(
            "ok   alert rules: {} rules, {} inhibit rules; receivers: {}",
            rules.rules.len(),
            rules.inhibits.len(),
            config
                .alerting
                .receivers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if offline {
        return Ok(());
    }
    let mut failures = 0;
    let root = &config.data_root;
    let probe = root.join(".telltale-write-probe");
    match std::fs::create_dir_all(root)
        .and_then(|_| std::fs::write(&probe, b"probe"))
        .and_then(|_| std::fs::remove_file(&probe))
    {
        Ok(()) => println!("ok   data root {} is writable", root.display()),
        Err(e) => {
            failures += 1;
            println!("FAIL data root {} is not writable: {e}", root.display());
        }
    }
    match &config.source {
        SourceConfig::Kafka(k) => {
            let k = k.clone();
            let result = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
                let consumer: BaseConsumer = ingest::kafka::client_config(&k).create()?;
                let md = consumer.fetch_metadata(None, Duration::from_secs(10))?;
                let mut lines = vec![format!(
                    "ok   brokers {} reachable ({} broker(s))",
                    k.brokers,
                    md.brokers().len()
                )];
                for t in &k.topics {
                    match md.topics().iter().find(|mt| mt.name() == t) {
                        Some(mt) if mt.error().is_none() => lines.push(format!(
                            "ok   topic {t}: {} partitions",
                            mt.partitions().len()
                        )),
                        _ => lines.push(format!("FAIL topic {t} does not exist on {}", k.brokers)),
                    }
                }
                Ok(lines)
            })
            .await?;
            match result {
                Ok(lines) => {
                    for l in lines {
                        failures += usize::from(l.starts_with("FAIL"));
                        println!("{l}");
                    }
                }
                Err(e) => {
                    failures += 1;
                    println!("FAIL cannot reach brokers: {e:#}");
                }
            }
        }
        SourceConfig::File(f) => match ingest::file::expand(&f.path) {
            Ok(files) => println!("ok   {} input file(s) match {:?}", files.len(), f.path),
            Err(e) => {
                failures += 1;
                println!("FAIL {e}");
            }
        },
    }
    if failures > 0 {
        bail!("{failures} check(s) failed");
    }
    Ok(())
}

fn latest_look(root: &std::path::Path, name: &str) -> Option<arrow::array::RecordBatch> {
    match telltale::experiment::table::latest(root, name) {
        Ok(Some(b)) => Some(b),
        Ok(None) => {
            eprintln!(
                "error: no look at experiment {name:?} under {} (is a pipeline with [[experiment]] name = {name:?} running or backfilled there? `telltale experiment list` shows the ones that are)",
                root.display()
            );
            None
        }
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

fn experiment_gate(root: &std::path::Path, name: &str) -> Result<()> {
    let Some(batch) = latest_look(root, name) else {
        std::process::exit(2);
    };
    let (decision, reason) = telltale::experiment::report::decision(&batch).unwrap_or_default();
    match decision.as_str() {
        "rollback" | "invalid" => {
            println!("blocked: experiment {name} says {decision}: {reason}");
            std::process::exit(1);
        }
        _ => {
            println!("ok: experiment {name} says {decision}: {reason}");
            Ok(())
        }
    }
}

fn models(c: ModelsCommand) -> Result<()> {
    use telltale::drift::{sentence, static_model};
    let dir = sentence::models_dir();
    match c {
        ModelsCommand::List => {
            println!("models directory: {}", dir.display());
            let state = |ok: bool, fix: &str| {
                if ok {
                    "installed".to_owned()
                } else {
                    format!("missing ({fix})")
                }
            };
            println!(
                "  fastembed  all-MiniLM-L6-v2, 384 dims, ONNX Runtime   {}",
                state(sentence::available(&dir), "bash scripts/models.sh")
            );
            println!(
                "  static     {}, {} dims (model2vec)     {}",
                static_model::STATIC_MODEL,
                static_model::DIMS,
                state(
                    static_model::available(&dir),
                    "bash scripts/models.sh, then telltale models distill"
                )
            );
            println!("  hash       hashed words, 256 dims                    built in");
            println!("  chargram   hashed character trigrams, 1024 dims      built in");
            Ok(())
        }
        ModelsCommand::Distill { threads } => {
            let started = std::time::Instant::now();
            let mut shown = 0;
            let out = static_model::distill(&dir, threads, |done, total| {
                if done * 10 / total > shown || done == total {
                    shown = done * 10 / total;
                    eprintln!("distill: {done}/{total} tokens embedded");
                }
            })?;
            let e = static_model::StaticEmbedder::load(&dir)?;
            println!(
                "static model written to {} ({} dims, {:.0} s); drift.embedder = \"static\" uses it",
                out.display(),
                telltale::drift::embed::Embedder::dim(&e),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn experiment(c: ExperimentCommand) -> Result<()> {
    match c {
        ExperimentCommand::Status { name, root } => {
            let (root, _) = root.resolve()?;
            let Some(batch) = latest_look(&root, &name) else {
                std::process::exit(2);
            };
            print!("{}", telltale::experiment::report::scorecard(&batch));
            Ok(())
        }
        ExperimentCommand::List { root } => {
            let (root, cfg) = root.resolve()?;
            let mut names: std::collections::BTreeSet<String> = cfg
                .map(|c| {
                    c.experiments
                        .experiments
                        .iter()
                        .map(|x| x.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            names.extend(telltale::experiment::table::names(&root)?);
            if names.is_empty() {
                println!("no experiments under {}", root.display());
            }
            for n in names {
                match telltale::experiment::table::latest(&root, &n)? {
                    Some(b) => {
                        let (d, r) = telltale::experiment::report::decision(&b).unwrap_or_default();
                        println!("{n:<24} {d:<13} {r}");
                    }
                    None => println!("{n:<24} {:<13} no look yet", "-"),
                }
            }
            Ok(())
        }
    }
}
