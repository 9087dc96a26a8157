use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn load(text: &str) -> Result<PipelineConfig, ConfigLoadError> {
    PipelineConfig::from_str_with_env(text, "p.toml", &no_env)
}

const MINIMAL: &str = r#"
[source]
type = "kafka"
brokers = "b:9092"
topics = ["t"]
"#;

#[test]
fn minimal_file_gets_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.name, "default");
    assert_eq!(c.data_root, PathBuf::from("./telltale-data"));
    assert_eq!(c.sink, SinkConfig::default());
    assert_eq!(c.decode.format, Format::Auto);
    let SourceConfig::Kafka(k) = c.source else {
        panic!("kafka source expected")
    };
    assert_eq!(
        (k.group_id.as_str(), k.start_from.as_str()),
        ("telltale", "earliest")
    );
}

#[test]
fn reports_every_error_with_its_path() {
    let text = r#"
[pipeline]
nmae = "x"

[source]
type = "kafka"
topics = []
start_from = "middle"

[source.properties]
"enable.auto.commit" = "true"

[decode]
format = "xml"
max_field_bytes = "lots"

[sink]
roll_interval = "5x"
queue_depth = 0
"#;
    let err = load(text).unwrap_err();
    let ConfigLoadError::Invalid { errors, .. } = &err else {
        panic!("{err}")
    };
    let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let expected = [
        "pipeline.nmae: unknown key (did you mean `name`?)",
        "source.brokers: is required (e.g. \"kafka-1:9092,kafka-2:9092\")",
        "source.topics: at least one topic is required (e.g. topics = [\"llm-events\"])",
        "source.start_from: \"middle\" is not one of: earliest, latest",
        "source.properties.enable.auto.commit: cannot be set here: telltale commits offsets itself, after the data is durable",
        "decode.format: unknown format \"xml\" (expected one of: auto, telltale, openai)",
        "decode.max_field_bytes: \"lots\" is not a size (expected e.g. \"64KiB\", \"128MiB\")",
        "sink.roll_interval: \"5x\" is not a duration (expected a unit of ms, s, m, h or d, e.g. \"30s\")",
        "sink.queue_depth: 0 is out of range (expected 1 to 1024)",
    ];
    assert_eq!(got, expected);
    let shown = err.to_string();
    assert!(
        shown.starts_with("p.toml: 9 errors in pipeline config"),
        "{shown}"
    );
    assert!(
        shown.contains("\n  p.toml: sink.queue_depth: 0 is out of range"),
        "{shown}"
    );
}

#[test]
fn interpolates_environment_and_reports_unset_variables() {
    let text = r#"
[pipeline]
data_root = "${ROOT:-/var/lib/telltale}"
[source]
type = "kafka"
brokers = "${BROKERS}"
topics = ["${TOPIC}"]
"#;
    let env = |k: &str| (k == "BROKERS").then(|| "k1:9092,k2:9092".to_owned());
    let err = PipelineConfig::from_str_with_env(text, "p.toml", &env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("source.topics[0]: environment variable TOPIC is not set"),
        "{err}"
    );
    let env = |k: &str| match k {
        "BROKERS" => Some("k1:9092,k2:9092".to_owned()),
        "TOPIC" => Some("llm".to_owned()),
        _ => None,
    };
    let c = PipelineConfig::from_str_with_env(text, "p.toml", &env).unwrap();
    assert_eq!(c.data_root, PathBuf::from("/var/lib/telltale"));
    let SourceConfig::Kafka(k) = c.source else {
        panic!()
    };
    assert_eq!(
        (k.brokers.as_str(), k.topics),
        ("k1:9092,k2:9092", vec!["llm".to_owned()])
    );
}

#[test]
fn file_source_and_unknown_type() {
    let c = load("[source]\ntype = \"file\"\npath = \"logs/*.jsonl.gz\"\n").unwrap();
    assert_eq!(
        c.source,
        SourceConfig::File(FileSourceConfig {
            path: "logs/*.jsonl.gz".into()
        })
    );
    let err = load("[source]\ntype = \"file\"\npath = \"x\"\nbrokers = \"b\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("source.brokers: unknown key"), "{err}");
    let err = load("[source]\ntype = \"kinesis\"\nbrokers = \"b\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "source.type: unknown source type \"kinesis\" (expected \"kafka\" or \"file\")"
        ),
        "{err}"
    );
    assert!(
        !err.contains("brokers"),
        "keys of an unknown source type are not reported: {err}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let err = load("[source\ntype = 1").unwrap_err().to_string();
    assert!(err.starts_with("p.toml: not valid TOML"), "{err}");
    assert!(err.contains("line 1"), "{err}");
}

/// Every shipped pipeline file loads (with the variables it documents unset).
#[test]
fn shipped_pipelines_load() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            PipelineConfig::from_str_with_env(&text, &path.display().to_string(), &no_env)
                .unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected default.toml and demo.toml, found {seen} files"
    );
}

/// The deliberately broken example gets exactly these messages.
#[test]
fn broken_example_reports_exact_errors() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/broken-pipeline.toml"
    );
    let err = PipelineConfig::load(std::path::Path::new(path)).unwrap_err();
    let ConfigLoadError::Invalid { errors, .. } = err else {
        panic!("expected validation errors")
    };
    let got: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "source.brokers: is required (e.g. \"kafka-1:9092,kafka-2:9092\")",
            "source.group: unknown key (did you mean `group_id`?)",
            "sink.roll_size: \"big\" is not a size (expected e.g. \"64KiB\", \"128MiB\")",
            "sink.compression: unknown key (known keys: debug_commit_delay, max_buffered, queue_depth, roll_interval, roll_size, row_group_rows, zstd_level)",
        ]
    );
}

#[test]
fn metrics_cost_and_telemetry_sections() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.metrics, MetricsConfig::default());
    assert_eq!(c.telemetry, TelemetryConfig::default());
    let text = format!(
        "{MINIMAL}
[metrics]
dimensions = [\"app\", \"attributes.team\"]
window = \"30s\"
rollup = \"10m\"
allowed_lateness = \"45s\"
max_series = 500
[cost]
price_table = \"prices.json\"
[cost.models.\"ft:x\"]
input_per_mtok = 0.3
output_per_mtok = 1.2
tiers = [{{ above_input_tokens = 1000, input_per_mtok = 0.6 }}]
[telemetry]
listen = \"off\"
"
    );
    let c = load(&text).unwrap();
    let w = &c.metrics.window;
    assert_eq!(
        (w.size_ms, w.rollup_ms, w.lateness_ms, w.max_series),
        (30_000, 600_000, 45_000, 500)
    );
    assert_eq!(w.dimensions[1], Dimension::Attribute("team".into()));
    assert_eq!(c.metrics.prices, Some(PathBuf::from("prices.json")));
    let p = &c.metrics.price_overrides["ft:x"];
    assert_eq!(p.base.input, Some(0.3e-6));
    assert_eq!(p.tiers[0].0, 1000);
    assert_eq!(c.telemetry.listen, None);

    let bad = format!(
        "{MINIMAL}
[metrics]
dimensions = [\"modle\"]
rollup = \"90s\"
[cost.models.m]
input_per_mtok = -1
tiers = [{{ input_per_mtok = 2 }}]
[telemetry]
listen = \"localhost\"
"
    );
    let Err(ConfigLoadError::Invalid { errors, .. }) = load(&bad) else {
        panic!("invalid")
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "metrics.dimensions[0]",
            "metrics.rollup",
            "cost.models.\"m\".input_per_mtok",
            "cost.models.\"m\".tiers[0].above_input_tokens",
            "telemetry.listen"
        ]
    );
    assert!(
        errors[0].message.contains("prompt_version"),
        "{}",
        errors[0].message
    );
}

#[test]
fn alerting_section_reads_routes_and_receivers_and_reports_every_mistake() {
    let ok = load(&format!(
        r#"{MINIMAL}
[alerting]
rules = "rules"
clock = "event"
notify = ["log"]
group_wait = "10s"
[[alerting.routes]]
matchers = ['severity="critical"']
notify = ["pager", "mail"]
repeat_interval = "1h"
[alerting.receivers.log]
type = "log"
[alerting.receivers.pager]
type = "pagerduty"
routing_key = "abc"
[alerting.receivers.mail]
type = "email"
smtp = "smtp.example.com"
tls = "tls"
from = "telltale@example.com"
to = ["oncall@example.com"]
"#
    ))
    .unwrap();
    let a = &ok.alerting;
    assert!(a.enabled);
    assert_eq!(a.clock, crate::alert::Clock::Event);
    assert_eq!(a.default_route.receivers, ["log"]);
    assert_eq!(a.default_route.group_wait_ms, 10_000);
    assert_eq!(a.routes[0].receivers, ["pager", "mail"]);
    assert_eq!(
        a.routes[0].group_wait_ms, 10_000,
        "routes inherit the defaults"
    );
    assert_eq!(a.routes[0].repeat_interval_ms, 3_600_000);
    assert_eq!(
        a.receivers["mail"],
        ReceiverConfig::Email {
            transport: EmailTransport::Smtp {
                host: "smtp.example.com".into(),
                port: 465,
                tls: SmtpTls::Tls,
                username: None,
                password: None,
                accept_invalid_certs: false,
            },
            from: "telltale@example.com".into(),
            to: vec!["oncall@example.com".into()],
        }
    );
    let err = load(&format!(
        r#"{MINIMAL}
[alerting]
notify = ["nobody"]
[[alerting.routes]]
notify = ["log"]
[alerting.receivers.log]
type = "sms"
[alerting.receivers.hook]
type = "webhook"
url = "hooks.example.com"
[alerting.receivers.mail]
type = "email"
smtp = "smtp.example.com:587"
dir = "out"
from = "telltale@example.com"
to = []
"#
    ))
    .unwrap_err()
    .to_string();
    for want in [
        "alerting.routes[0].matchers: a route needs matchers",
        "alerting.receivers.\"log\".type: \"sms\" is not a receiver type",
        "alerting.receivers.\"hook\".url: \"hooks.example.com\" is not an http(s) URL",
        "alerting.receivers.\"mail\".to: needs at least one address",
        "alerting.receivers.\"mail\".smtp: set exactly one of `smtp`",
        "alerting.notify: no receiver named \"nobody\"",
        "alerting.routes[0].notify: no receiver named \"log\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in\n{err}");
    }
}

#[test]
fn experiments_are_read_and_every_mistake_is_reported_with_its_path() {
    let good = format!(
        "{MINIMAL}{}",
        r#"
[[quality.scorer]]
name = "json"
type = "refusal"

[experiments]
window = "10m"
correction = "benjamini-hochberg"

[[experiment]]
name = "style"
arm = "prompt_version"
arms = ["v2", "v3"]
control = "v3"
split = { v2 = 1, v3 = 3 }
where = { app = "bot" }

[[experiment.metric]]
name = "ok"
value = "pass:json"

[[experiment.metric]]
name = "latency"
value = "latency_ms"
role = "guardrail"
tolerance = 0.1
"#
    );
    let c = load(&good).unwrap();
    let x = &c.experiments;
    assert_eq!(x.window_ms(), 600_000);
    assert_eq!(
        x.correction,
        crate::experiment::config::Correction::BenjaminiHochberg
    );
    let e = &x.experiments[0];
    assert_eq!(e.arms, ["v3", "v2"], "the control comes first");
    assert_eq!(e.split, [0.75, 0.25]);
    assert_eq!(e.filter, [("app".to_owned(), "bot".to_owned())]);
    assert!(e.metrics[0].higher_is_better && !e.metrics[1].higher_is_better);
    assert_eq!(e.metrics[1].tolerance, 0.1);
    let unscored = good.replace("name = \"json\"", "name = \"other\"");
    let err = load(&unscored).unwrap_err().to_string();
    assert!(
        err.contains("experiment[0].metric[0].value: \"json\" is not a configured scorer"),
        "{err}"
    );

    let bad = format!(
        "{MINIMAL}{}",
        r#"
[experiments]
corection = "holm"

[[experiment]]
name = "a b"
arm = "model"
arms = ["A"]
split = { B = 1 }
where = { region = "eu" }

[[experiment.metric]]
name = "x"
value = "latency"
role = "primary"
tolerance = 0.1
"#
    );
    let err = load(&bad).unwrap_err();
    let ConfigLoadError::Invalid { errors, .. } = &err else {
        panic!("{err}")
    };
    let got: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let want = [
        "experiments.corection: unknown key (did you mean `correction`?)",
        "experiment[0].name: \"a b\" is not an experiment name",
        "experiment[0].arm: \"model\" is not an arm field",
        "experiment[0].arms: is required: at least two arms",
        "experiment[0].split: has no share for the arm \"A\"",
        "experiment[0].split.B: \"B\" is not one of the arms",
        "experiment[0].where.region: \"region\" is not a field an experiment can select on",
        "experiment[0].metric[0].value: \"latency\" is not a metric value",
        "experiment[0].metric[0].role: \"primary\" is not a role",
        "experiment[0].metric[0].tolerance: applies to guardrails only",
    ];
    for w in want {
        assert!(
            got.iter().any(|g| g.starts_with(w)),
            "{w:?} not in {got:#?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{got:#?}");

    let no_goal = format!(
        "{MINIMAL}{}",
        "[[experiment]]\nname = \"s\"\narms = [\"A\", \"B\"]\n[[experiment.metric]]\nname = \"l\"\nvalue = \"latency_ms\"\nrole = \"guardrail\"\n"
    );
    let err = load(&no_goal).unwrap_err().to_string();
    assert!(
        err.contains(
            "experiment[0].metric: has no goal metric (role = \"goal\"): nothing could be promoted"
        ),
        "{err}"
    );
}
