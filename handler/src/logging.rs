//! Structured logs: one line per event, on stdout where the Functions host collects a custom
//! handler's output (the operator commands write theirs to stderr, so that what they print on
//! stdout stays parseable).
//!
//! Logged values often come from outside: a webhook's notification id, a message's MessageId, a
//! provider's error text. Two rules keep such a value from forging or flooding the log:
//!
//! * every value is escaped: a control character (a newline above all) never reaches the output
//!   as itself, so one event is always exactly one line;
//! * every value is cut to [`MAX_VALUE_CHARS`] characters, with the original length said.
//!
//! Both formats keep the rules: `json` (one object a line, for log collectors) and `text` (for
//! people). The Azure SDK's own chatter is logged from `warn` up unless `RUST_LOG` asks for more.

use std::fmt::{self, Write as _};

use opentelemetry_sdk::trace::Tracer;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;

use crate::settings::LogFormat;

/// The longest value a log line carries; the rest is cut.
pub const MAX_VALUE_CHARS: usize = 1024;

/// The filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,azure_core=warn,azure_data_cosmos=warn,\
    azure_data_cosmos_driver=warn,azure_identity=warn,azure_security_keyvault_secrets=warn";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The function host and `handler local`: the host collects stdout.
    Stdout,
    /// Operator commands: stdout is their answer.
    Stderr,
}

/// Installs the global subscriber. The filter comes from `RUST_LOG` (default: `info`, and
/// `warn` for the Azure SDK). With a `tracer`, spans (one per invocation, one per job) are also
/// exported as trace spans.
pub fn init(format: LogFormat, destination: Destination, tracer: Option<Tracer>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let writer = match destination {
        Destination::Stdout => BoxMakeWriter::new(std::io::stdout),
        Destination::Stderr => BoxMakeWriter::new(std::io::stderr),
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    drop(tracing::subscriber::set_global_default(subscriber(
        format, filter, writer, tracer,
    )));
}

/// The subscriber that writes `format` lines to `writer`, and hands spans to `tracer`.
fn subscriber(
    format: LogFormat,
    filter: EnvFilter,
    writer: BoxMakeWriter,
    tracer: Option<Tracer>,
) -> Box<dyn Subscriber + Send + Sync> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .fmt_fields(JsonFields)
                .event_format(JsonLine)
                .finish()
                .with(traces(&tracer)),
        ),
        LogFormat::Text => Box::new(
            builder
                .fmt_fields(TextFields)
                .finish()
                .with(traces(&tracer)),
        ),
    }
}

/// The layer that exports spans through `tracer`; typed by the subscriber it sits on, so each
/// log format makes its own.
fn traces<S>(
    tracer: &Option<Tracer>,
) -> Option<tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracer
        .clone()
        .map(|t| tracing_opentelemetry::layer().with_tracer(t))
}

/// `value` cut to [`MAX_VALUE_CHARS`] characters, saying how long it was.
pub fn truncated(value: &str) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(MAX_VALUE_CHARS) {
        None => value.into(),
        Some((cut, _)) => format!("{}…[{} bytes in all]", &value[..cut], value.len()).into(),
    }
}

/// `value` cut and with every control character escaped, for a text log line.
pub fn escaped(value: &str) -> String {
    let value = truncated(value);
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Collects an event's or a span's fields as JSON values, cut to size.
#[derive(Default)]
struct JsonVisitor(Map<String, Value>);

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(truncated(value).into()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// A span's fields as a JSON object, kept by the subscriber for [`JsonLine`].
struct JsonFields;

impl<'w> FormatFields<'w> for JsonFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = JsonVisitor::default();
        fields.record(&mut visitor);
        write!(writer, "{}", Value::Object(visitor.0))
    }
}

/// One JSON object a line: `timestamp`, `level`, `target`, the event's fields, and the current
/// span's fields under `span`.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        let mut fields = JsonVisitor::default();
        event.record(&mut fields);
        line.extend(fields.0);
        line.insert("target".into(), meta.target().into());
        if let Some(span) = ctx.lookup_current() {
            let extensions = span.extensions();
            let mut object = extensions
                .get::<FormattedFields<N>>()
                .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                .unwrap_or_default();
            object.insert("name".into(), span.name().into());
            line.insert("span".into(), Value::Object(object));
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// `name=value` pairs with escaped, cut values, for text lines.
struct TextFields;

struct TextVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl Visit for TextVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{}", escaped(value))
        } else {
            write!(
                self.writer,
                "{separator}{}={}",
                field.name(),
                escaped(value)
            )
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            writer: &mut writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_a_text_line() {
        assert_eq!(
            escaped("id-1\nlevel=ERROR forged\r\t\u{1b}[31m"),
            "id-1\\nlevel=ERROR forged\\r\\t\\u{1b}[31m"
        );
        assert_eq!(escaped("plain ünïcode"), "plain ünïcode");
    }

    /// What one event logged with a hostile id looks like in `format`.
    fn log_line(format: LogFormat) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let hostile = format!("n1\nERROR forged line {}", "x".repeat(5000));
        tracing::subscriber::with_default(
            subscriber(
                format,
                EnvFilter::new("info"),
                BoxMakeWriter::new(move || writer.clone()),
                None,
            ),
            || tracing::info!(notification_id = %hostile, "webhook accepted"),
        );
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn one_event_is_one_short_line_in_either_format() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let line = log_line(format);
            assert_eq!(line.matches('\n').count(), 1, "{format:?}: {line}");
            assert!(line.ends_with('\n'));
            assert!(line.len() < 1300, "{format:?}: {} bytes", line.len());
            assert!(line.contains("5021 bytes in all"), "{line}");
        }
        let json: Value = serde_json::from_str(&log_line(LogFormat::Json)).unwrap();
        assert_eq!(json["message"], "webhook accepted");
        assert_eq!(json["level"], "INFO");
        assert!(
            json["notification_id"]
                .as_str()
                .unwrap()
                .starts_with("n1\nERROR forged")
        );
        assert!(log_line(LogFormat::Text).contains("notification_id=n1\\nERROR forged"));
    }

    #[test]
    fn long_values_are_cut_and_say_their_length() {
        let long = "x".repeat(3 * 1024 * 1024);
        let cut = truncated(&long);
        assert!(cut.len() < MAX_VALUE_CHARS + 40);
        assert!(cut.ends_with(&format!("…[{} bytes in all]", long.len())));
        assert_eq!(truncated("short"), "short");
    }
}
