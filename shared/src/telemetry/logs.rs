//! The log subscriber every chainrun function installs at cold start (instead of
//! `lambda_runtime`'s default one), configured the way Lambda's advanced logging controls
//! say ([`LogConfig`]).
//!
//! In JSON format each line is one object:
//!
//! ```json
//! {"timestamp":"2025-01-06T10:00:00.123456Z","level":"INFO","message":"run finished",
//!  "target":"chainrun_core::engine::end","requestId":"…","xrayTraceId":"Root=1-…",
//!  "run_id":"01J…","workflow":"triage","revision":0,"status":"Completed",
//!  "spans":["Lambda runtime invoke","invocation","run"]}
//! ```
//!
//! The fields of every span the line is printed in sit at the top level next to the
//! event's own, so a line carries `run_id` because it was printed inside a run's span, not
//! because each call site remembered to add it; `spans` names those spans, outermost first.
//! The stock JSON formatter of `tracing-subscriber` nests span fields (`span`, `spans`), and
//! `json-subscriber`'s flattening writes a key twice when an event repeats a span's field
//! (many of ours do: `info!(run_id = %id, …)` inside a run's span); this formatter merges
//! them into one object instead: the event's field wins over a span's, an inner span's over
//! an outer's.
//!
//! Lambda's application log-level filter reads `level`; a line without one (an EMF metric
//! line) counts as INFO.

use crate::config::{ConfigError, Source};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, span fields flattened in (see the module docs).
    Json,
    /// `tracing`'s human-readable lines, span fields in `name{…}:` prefixes.
    Text,
}

/// What the log subscriber is built from, read once at cold start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `EnvFilter` directives (`info`, `info,chainrun_core=debug`).
    pub filter: String,
}

impl LogConfig {
    /// `AWS_LAMBDA_LOG_FORMAT` (set by Lambda from the function's `LoggingConfig.LogFormat`):
    /// `JSON` or `Text`; JSON when unset, so a function run outside Lambda (the local stack)
    /// prints what CloudWatch gets. The filter: `RUST_LOG` when set (it may name crates),
    /// else `AWS_LAMBDA_LOG_LEVEL` (`LoggingConfig.ApplicationLogLevel`), else `info` — the
    /// precedence of `lambda_runtime`'s own subscriber, whose `RUST_LOG` directives replace
    /// the Lambda level whenever they parse.
    pub fn from_source(env: &impl Source) -> Result<Self, ConfigError> {
        let set = |name: &str| env.get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let format = match set("AWS_LAMBDA_LOG_FORMAT") {
            None => LogFormat::Json,
            Some(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
            Some(f) if f.eq_ignore_ascii_case("text") => LogFormat::Text,
            Some(other) => {
                return Err(ConfigError::Invalid { name: "AWS_LAMBDA_LOG_FORMAT", reason: format!("{other:?} is neither JSON nor Text") });
            }
        };
        let filter = match (set("RUST_LOG"), set("AWS_LAMBDA_LOG_LEVEL")) {
            (Some(directives), _) => {
                EnvFilter::try_new(&directives).map_err(|e| ConfigError::Invalid { name: "RUST_LOG", reason: e.to_string() })?;
                directives
            }
            (None, Some(level)) => lambda_level(&level)
                .ok_or_else(|| ConfigError::Invalid { name: "AWS_LAMBDA_LOG_LEVEL", reason: format!("{level:?} is not a Lambda log level") })?
                .to_owned(),
            (None, None) => "info".to_owned(),
        };
        Ok(Self { format, filter })
    }
}

/// The `tracing` level of a Lambda application log level (FATAL has none of its own).
fn lambda_level(level: &str) -> Option<&'static str> {
    ["trace", "debug", "info", "warn", "error"]
        .into_iter()
        .find(|l| l.eq_ignore_ascii_case(level))
        .or_else(|| level.eq_ignore_ascii_case("fatal").then_some("error"))
}

/// Installs the subscriber `config` describes, writing to stdout, for the whole process.
pub fn init(config: &LogConfig) -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    tracing::subscriber::set_global_default(subscriber(config, std::io::stdout))
}

/// The subscriber `config` describes, writing to `writer` (tests capture the lines).
pub fn subscriber<W>(config: &LogConfig, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // Checked when the configuration was read.
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(false);
    match config.format {
        LogFormat::Json => Box::new(builder.fmt_fields(JsonFields::new()).event_format(JsonLines).finish()),
        // CloudWatch stamps each line itself.
        LogFormat::Text => Box::new(builder.with_target(false).without_time().finish()),
    }
}

/// Keys the formatter writes itself; a field of the same name is written as `field.<name>`.
const RESERVED: [&str; 5] = ["timestamp", "level", "message", "target", "spans"];

/// Formats an event as one JSON object, the fields of its spans flattened in.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, JsonFields>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = Map::new();
        let mut spans = Vec::new();
        for span in ctx.event_scope().into_iter().flat_map(|scope| scope.from_root()) {
            spans.push(span.name());
            let extensions = span.extensions();
            // `JsonFields` keeps a span's fields as one JSON object (empty when it has none).
            if let Some(Ok(Value::Object(recorded))) = extensions.get::<FormattedFields<JsonFields>>().map(|f| serde_json::from_str(f)) {
                fields.extend(recorded);
            }
        }
        let mut message = None;
        event.record(&mut EventFields { fields: &mut fields, message: &mut message });
        let metadata = event.metadata();
        let line = Line {
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            level: metadata.level().as_str(),
            message,
            target: metadata.target(),
            fields,
            spans,
        };
        let json = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{json}")
    }
}

/// One line, its keys in reading order.
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    message: Option<String>,
    target: &'a str,
    fields: Map<String, Value>,
    spans: Vec<&'static str>,
}

impl Serialize for Line<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("timestamp", &self.timestamp)?;
        map.serialize_entry("level", self.level)?;
        if let Some(message) = &self.message {
            map.serialize_entry("message", message)?;
        }
        map.serialize_entry("target", self.target)?;
        for (key, value) in &self.fields {
            match RESERVED.contains(&key.as_str()) {
                true => map.serialize_entry(&format!("field.{key}"), value)?,
                false => map.serialize_entry(key, value)?,
            }
        }
        map.serialize_entry("spans", &self.spans)?;
        map.end()
    }
}

/// Records an event's fields as JSON values; its `message` apart.
struct EventFields<'a> {
    fields: &'a mut Map<String, Value>,
    message: &'a mut Option<String>,
}

impl EventFields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("message", Value::String(text)) => *self.message = Some(text),
            (name, value) => {
                self.fields.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for EventFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, value.to_string().into());
    }

    // `%x` fields arrive here too, wrapped so that `{:?}` prints their `Display`.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::capture::Capture;
    use std::collections::HashMap;
    use tracing::{debug, info, info_span, warn};

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn json_lines(capture: &Capture) -> Vec<Value> {
        capture.lines().iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
    }

    fn config(filter: &str) -> LogConfig {
        LogConfig { format: LogFormat::Json, filter: filter.to_owned() }
    }

    #[test]
    fn lines_carry_the_fields_of_every_span_they_are_printed_in() {
        let capture = Capture::default();
        tracing::subscriber::with_default(subscriber(&config("info"), capture.clone()), || {
            let _run = info_span!("run", run_id = "01J", workflow = "triage", revision = 2u32).entered();
            info!(settled = 1u64, "resuming run");
            let step = info_span!("step", step_id = "extract", attempt = tracing::field::Empty);
            step.record("attempt", 2u32);
            let _step = step.entered();
            warn!(code = %"THROTTLED", "attempt failed; retrying");
        });
        let lines = json_lines(&capture);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            (lines[0]["run_id"].as_str(), lines[0]["workflow"].as_str(), lines[0]["revision"].as_u64()),
            (Some("01J"), Some("triage"), Some(2))
        );
        assert_eq!(
            (lines[0]["message"].as_str(), lines[0]["settled"].as_u64(), lines[0]["level"].as_str()),
            (Some("resuming run"), Some(1), Some("INFO"))
        );
        assert!(lines[0].get("step_id").is_none(), "outside the step: {}", lines[0]);
        assert_eq!(
            (lines[1]["run_id"].as_str(), lines[1]["step_id"].as_str(), lines[1]["attempt"].as_u64()),
            (Some("01J"), Some("extract"), Some(2))
        );
        assert_eq!((lines[1]["code"].as_str(), lines[1]["level"].as_str()), (Some("THROTTLED"), Some("WARN")));
        assert_eq!(lines[1]["spans"], serde_json::json!(["run", "step"]));
        let stamped = chrono::DateTime::parse_from_rfc3339(lines[1]["timestamp"].as_str().unwrap());
        assert!(stamped.is_ok(), "RFC 3339, as Lambda reads it: {}", lines[1]["timestamp"]);
    }

    #[test]
    fn an_event_field_overrides_a_span_field_of_the_same_name_and_no_key_is_written_twice() {
        let capture = Capture::default();
        tracing::subscriber::with_default(subscriber(&config("info"), capture.clone()), || {
            let _outer = info_span!("run", run_id = "outer", level = "span's").entered();
            let _inner = info_span!("invocation", run_id = "inner").entered();
            info!(run_id = "event", "same run");
        });
        let raw = capture.lines().remove(0);
        assert_eq!(raw.matches("\"run_id\"").count(), 1, "{raw}");
        let line: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(line["run_id"], "event");
        assert_eq!((line["level"].as_str(), line["field.level"].as_str()), (Some("INFO"), Some("span's")), "a field cannot hide the line's level");
    }

    #[test]
    fn the_filter_drops_lines_below_its_level() {
        let capture = Capture::default();
        tracing::subscriber::with_default(subscriber(&config("warn"), capture.clone()), || {
            debug!("hidden");
            info!("hidden too");
            warn!("shown");
        });
        let lines = json_lines(&capture);
        assert_eq!(lines.iter().map(|l| l["message"].as_str().unwrap()).collect::<Vec<_>>(), ["shown"]);
    }

    #[test]
    fn the_format_follows_lambdas_log_format_and_is_json_outside_lambda() {
        assert_eq!(LogConfig::from_source(&env(&[])).unwrap(), config("info"));
        assert_eq!(LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_FORMAT", "JSON")])).unwrap().format, LogFormat::Json);
        assert_eq!(LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_FORMAT", "Text")])).unwrap().format, LogFormat::Text);
        let err = LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_FORMAT", "xml")])).unwrap_err().to_string();
        assert!(err.contains("AWS_LAMBDA_LOG_FORMAT") && err.contains("xml"), "{err}");
    }

    #[test]
    fn rust_log_takes_precedence_over_lambdas_level_which_takes_precedence_over_info() {
        let both = env(&[("RUST_LOG", "info,chainrun_core=debug"), ("AWS_LAMBDA_LOG_LEVEL", "WARN")]);
        assert_eq!(LogConfig::from_source(&both).unwrap().filter, "info,chainrun_core=debug");
        assert_eq!(LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_LEVEL", "DEBUG")])).unwrap().filter, "debug");
        assert_eq!(LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_LEVEL", "FATAL")])).unwrap().filter, "error");
        let err = LogConfig::from_source(&env(&[("AWS_LAMBDA_LOG_LEVEL", "LOUD")])).unwrap_err().to_string();
        assert!(err.contains("AWS_LAMBDA_LOG_LEVEL"), "{err}");
        let err = LogConfig::from_source(&env(&[("RUST_LOG", "info,chainrun_core=loud")])).unwrap_err().to_string();
        assert!(err.contains("RUST_LOG"), "{err}");
    }

    #[test]
    fn the_text_format_prints_span_fields_as_prefixes() {
        let capture = Capture::default();
        let text = LogConfig { format: LogFormat::Text, filter: "info".into() };
        tracing::subscriber::with_default(subscriber(&text, capture.clone()), || {
            let _run = info_span!("run", run_id = "01J").entered();
            info!("hello");
        });
        let line = capture.lines().remove(0);
        assert!(line.contains("run{run_id=\"01J\"}: hello"), "{line}");
    }
}
