//! The custom-handler wire protocol of the Azure Functions host (v4).
//!
//! The host posts `{"Data": {...}, "Metadata": {...}}` to `/{FunctionName}` and expects a 2xx
//! `application/json` answer `{"Outputs": {...}, "Logs": [...], "ReturnValue": ...}`. The host
//! serializes every value with Newtonsoft, which gives the envelope its traps:
//!
//! * a string value is JSON-encoded a second time (`"abc"` arrives as `"\"abc\""`), and that is
//!   how a Service Bus message body arrives too;
//! * numbers and booleans in `Metadata` arrive as strings (`"DeliveryCount": "1"`);
//! * dates arrive with or without an offset and fraction (`"2025-01-01T10:00:00"`);
//! * HTTP request headers are arrays of strings, and `Body` is missing for a chunked request;
//! * a timer's `ScheduleStatus` may be `null`, and its `Last` may be `0001-01-01T00:00:00`.
//!
//! This module turns that into typed triggers ([`HttpRequest`], [`TimerInfo`],
//! [`ServiceBusMessage`]) and back ([`InvocationResponse`]). It is lenient where the host has
//! varied across versions and strict where a mistake would lose data: an envelope it cannot read
//! is an [`EnvelopeError`] naming what is wrong.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

pub use crate::queue::ServiceBusMessage;

/// An invocation request as the host sends it.
#[derive(Debug, Clone)]
pub struct InvocationRequest {
    pub data: Map<String, Value>,
    pub metadata: Map<String, Value>,
}

/// Why an invocation envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EnvelopeError(pub String);

fn err(message: impl Into<String>) -> EnvelopeError {
    EnvelopeError(message.into())
}

impl InvocationRequest {
    /// Parses the body the host posted.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        if body.is_empty() {
            return Err(err(
                "the invocation body is empty; expected {\"Data\":…,\"Metadata\":…}",
            ));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| err(format!("the invocation body is not JSON: {e}")))?;
        let Value::Object(mut envelope) = value else {
            return Err(err("the invocation body is not a JSON object"));
        };
        let data = match envelope.remove("Data") {
            Some(Value::Object(data)) => data,
            Some(other) => {
                return Err(err(format!(
                    "`Data` must be an object, found {}",
                    kind(&other)
                )));
            }
            None => return Err(err("the invocation has no `Data` object")),
        };
        let metadata = match envelope.remove("Metadata") {
            Some(Value::Object(metadata)) => metadata,
            Some(Value::Null) | None => Map::new(),
            Some(other) => {
                return Err(err(format!(
                    "`Metadata` must be an object, found {}",
                    kind(&other)
                )));
            }
        };
        Ok(Self { data, metadata })
    }

    fn trigger_value(&self, binding: &str) -> Result<&Value, EnvelopeError> {
        self.data
            .get(binding)
            .ok_or_else(|| err(format!("`Data.{binding}` is missing")))
    }

    /// The `sys.UtcNow` the host stamps on every invocation, if present and readable.
    pub fn utc_now(&self) -> Option<DateTime<Utc>> {
        self.metadata
            .get("sys")
            .and_then(|sys| sys.get("UtcNow"))
            .and_then(decode_datetime)
    }

    /// Reads the value of an httpTrigger binding.
    pub fn http_request(&self, binding: &str) -> Result<HttpRequest, EnvelopeError> {
        let req = self
            .trigger_value(binding)?
            .as_object()
            .ok_or_else(|| err(format!("`Data.{binding}` must be an HTTP request object")))?;
        // `Data.req`'s values are the request's own text, never double-encoded (only
        // Metadata's are): a header value in quotes (`SOAPAction: ""`, a secret chosen with a
        // `"` in it) is taken as it came.
        let string_field = |name: &str| req.get(name).and_then(plain_string);
        let url = string_field("Url").unwrap_or_default();
        let method = string_field("Method")
            .ok_or_else(|| err(format!("`Data.{binding}.Method` is missing")))?
            .to_ascii_uppercase();
        let query = string_map(req.get("Query"));
        let params = string_map(req.get("Params"));
        let mut headers = Vec::new();
        if let Some(Value::Object(h)) = req.get("Headers") {
            for (name, value) in h {
                let values = match value {
                    Value::Array(items) => items.iter().filter_map(plain_string).collect(),
                    other => plain_string(other).into_iter().collect(),
                };
                headers.push((name.clone(), values));
            }
        }
        let body = match req.get("Body") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(text.clone()),
            // Older hosts parsed JSON bodies into objects; keep their exact JSON text.
            Some(other) => Some(other.to_string()),
        };
        Ok(HttpRequest {
            url,
            method,
            query,
            headers,
            params,
            body,
        })
    }

    /// Reads the value of a timerTrigger binding.
    pub fn timer(&self, binding: &str) -> Result<TimerInfo, EnvelopeError> {
        let timer = self
            .trigger_value(binding)?
            .as_object()
            .ok_or_else(|| err(format!("`Data.{binding}` must be a timer object")))?;
        let is_past_due = timer
            .get("IsPastDue")
            .and_then(decode_bool)
            .unwrap_or(false);
        let schedule_status = match timer.get("ScheduleStatus") {
            Some(Value::Object(status)) => Some(ScheduleStatus {
                last: status
                    .get("Last")
                    .and_then(decode_datetime)
                    .filter(|last| *last != DateTime::<Utc>::MIN_UTC && last.timestamp() > 0),
                next: status.get("Next").and_then(decode_datetime),
                last_updated: status.get("LastUpdated").and_then(decode_datetime),
            }),
            _ => None,
        };
        Ok(TimerInfo {
            is_past_due,
            schedule_status,
        })
    }

    /// Reads the value and metadata of a serviceBusTrigger binding.
    pub fn service_bus_message(&self, binding: &str) -> Result<ServiceBusMessage, EnvelopeError> {
        let body = match self.trigger_value(binding)? {
            Value::String(encoded) => match serde_json::from_str::<String>(encoded) {
                Ok(text) => text.into_bytes(),
                // Not double-encoded (an older host): the text as it came. No binding here is
                // `dataType: binary`, so it is never base64, and plain text that happens to read
                // as base64 (`test`) would be turned into other bytes.
                Err(_) => encoded.clone().into_bytes(),
            },
            Value::Null => return Err(err(format!("`Data.{binding}` is null"))),
            other => other.to_string().into_bytes(),
        };
        let m = &self.metadata;
        let text = |key: &str| m.get(key).and_then(decode_string);
        let application_properties = match m
            .get("ApplicationProperties")
            .or_else(|| m.get("UserProperties"))
        {
            Some(Value::Object(props)) => props.clone(),
            _ => Map::new(),
        };
        Ok(ServiceBusMessage {
            body,
            delivery_count: m
                .get("DeliveryCount")
                .and_then(decode_u64)
                .map(|n| n.min(u32::MAX as u64) as u32)
                .unwrap_or(1),
            message_id: text("MessageId"),
            session_id: text("SessionId"),
            correlation_id: text("CorrelationId"),
            content_type: text("ContentType"),
            sequence_number: m.get("SequenceNumber").and_then(decode_u64),
            enqueued_time_utc: m
                .get("EnqueuedTimeUtc")
                .or_else(|| m.get("EnqueuedTime"))
                .and_then(decode_datetime),
            application_properties,
        })
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An HTTP request as an httpTrigger delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub url: String,
    pub method: String,
    pub query: BTreeMap<String, String>,
    /// Headers in the order the host sent them; names as sent, each with all its values.
    pub headers: Vec<(String, Vec<String>)>,
    pub params: BTreeMap<String, String>,
    /// The body as text; `None` when the caller sent none or sent it chunked.
    pub body: Option<String>,
}

impl HttpRequest {
    /// The first value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, values)| values.first())
            .map(String::as_str)
    }
}

/// A timer invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerInfo {
    pub is_past_due: bool,
    /// `None` when the host keeps no schedule status (first run without a monitor, `useMonitor`
    /// false).
    pub schedule_status: Option<ScheduleStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleStatus {
    /// The previous occurrence; `None` on a first run (the host sends `0001-01-01T00:00:00`).
    pub last: Option<DateTime<Utc>>,
    pub next: Option<DateTime<Utc>>,
    pub last_updated: Option<DateTime<Utc>>,
}

/// Removes the host's extra layer of JSON encoding from a string value, if it has one.
pub fn decode_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(strip_string_layer(s)),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn strip_string_layer(s: &str) -> String {
    if s.len() >= 2
        && s.starts_with('"')
        && s.ends_with('"')
        && let Ok(inner) = serde_json::from_str::<String>(s)
    {
        return inner;
    }
    s.to_string()
}

/// Reads a number sent as a number or as a (possibly double-encoded) numeric string.
pub fn decode_u64(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(_) => decode_string(value)?.trim().parse().ok(),
        _ => None,
    }
}

fn decode_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(_) => match decode_string(value)?.trim() {
            "true" | "True" => Some(true),
            "false" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Reads a date with or without offset and fraction; one without an offset is UTC.
pub fn decode_datetime(value: &Value) -> Option<DateTime<Utc>> {
    let text = decode_string(value)?;
    let text = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return Some(dt.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc())
}

/// A value of `Data.req` as the request carried it: text as it is, a number or a boolean
/// written out.
fn plain_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    match value {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(k, v)| plain_string(v).map(|v| (k.clone(), v)))
            .collect(),
        // Hosts before the 2020 fix sent `Query` as a JSON string of an object.
        Some(Value::String(s)) => serde_json::from_str::<Value>(&strip_string_layer(s))
            .ok()
            .map(|v| string_map(Some(&v)))
            .unwrap_or_default(),
        _ => BTreeMap::new(),
    }
}

/// What the handler answers to a successful invocation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InvocationResponse {
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    #[serde(rename = "ReturnValue")]
    pub return_value: Value,
}

impl InvocationResponse {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the `res` output of an HTTP-triggered function.
    pub fn with_http(mut self, binding: &str, res: HttpResponse) -> Self {
        self.outputs.insert(
            binding.to_string(),
            serde_json::to_value(res).expect("an HTTP response serializes"),
        );
        self
    }

    pub fn log(mut self, line: impl Into<String>) -> Self {
        self.logs.push(line.into());
        self
    }
}

/// The `res` output of an HTTP-triggered function. The host wants an object whose `body` is a
/// string written verbatim and whose header values are strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpResponse {
    #[serde(rename = "statusCode")]
    pub status_code: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HttpResponse {
    /// A response with a JSON body.
    pub fn json(status_code: u16, body: &Value) -> Self {
        Self {
            status_code,
            headers: BTreeMap::from([("Content-Type".to_string(), "application/json".to_string())]),
            body: body.to_string(),
        }
    }

    /// A response with any body and content type.
    pub fn with_content_type(status_code: u16, content_type: &str, body: String) -> Self {
        Self {
            status_code,
            headers: BTreeMap::from([("Content-Type".to_string(), content_type.to_string())]),
            body,
        }
    }

    /// A 4xx/5xx whose JSON body gives the reason.
    pub fn error(status_code: u16, reason: impl Into<String>) -> Self {
        Self::json(status_code, &serde_json::json!({ "error": reason.into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_service_bus_body_is_unwrapped_from_its_second_encoding() {
        // The shape captured from a real host (extension v4): body {"hello":"world"}.
        let body = br#"{"Data":{"myQueueItem":"\"{\\\"hello\\\":\\\"world\\\"}\""},
            "Metadata":{"DeliveryCount":"1","MessageId":"\"088fb2b9d00f4d6c8e4a\"",
            "EnqueuedTimeUtc":"2020-10-08T21:49:35.809","hello":"\"world\"",
            "UserProperties":{},"sys":{"MethodName":"QueueTrigger","UtcNow":"2020-10-08T21:49:36.1Z","RandGuid":"x"}}}"#;
        let req = InvocationRequest::parse(body).unwrap();
        let msg = req.service_bus_message("myQueueItem").unwrap();
        assert_eq!(msg.body, br#"{"hello":"world"}"#);
        assert_eq!(msg.delivery_count, 1);
        assert_eq!(msg.message_id.as_deref(), Some("088fb2b9d00f4d6c8e4a"));
        assert_eq!(
            msg.enqueued_time_utc.unwrap().to_rfc3339(),
            "2020-10-08T21:49:35.809+00:00"
        );
        assert!(req.utc_now().is_some());
    }

    #[test]
    fn a_service_bus_body_not_encoded_twice_is_taken_as_it_came() {
        for (sent, body) in [
            ("test", "test"),
            ("null", "null"),
            ("{\"a\":1}", "{\"a\":1}"),
        ] {
            let req = InvocationRequest {
                data: json!({"message": sent}).as_object().unwrap().clone(),
                metadata: Map::new(),
            };
            let msg = req.service_bus_message("message").unwrap();
            assert_eq!(String::from_utf8(msg.body).unwrap(), body, "{sent}");
        }
    }

    #[test]
    fn session_metadata_is_read_from_strings() {
        let req = InvocationRequest {
            data: json!({"message": "\"{}\""}).as_object().unwrap().clone(),
            metadata: json!({
                "DeliveryCount": "3",
                "SessionId": "\"int-1\"",
                "SequenceNumber": "17",
                "CorrelationId": "\"corr-1\"",
                "ApplicationProperties": {"tenant": "t1", "attempt": 2},
                "MessageActions": {}
            })
            .as_object()
            .unwrap()
            .clone(),
        };
        let msg = req.service_bus_message("message").unwrap();
        assert_eq!(msg.delivery_count, 3);
        assert_eq!(msg.session_id.as_deref(), Some("int-1"));
        assert_eq!(msg.sequence_number, Some(17));
        assert_eq!(msg.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(msg.application_properties["attempt"], json!(2));
    }

    #[test]
    fn a_first_timer_run_has_no_last_occurrence() {
        let body = br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},
            "ScheduleStatus":{"Last":"0001-01-01T00:00:00","Next":"2024-11-30T14:45:51+00:00",
            "LastUpdated":"2024-11-30T14:43:50.403838+00:00"},"IsPastDue":false}},
            "Metadata":{"sys":{"MethodName":"SyncScheduler","UtcNow":"2024-11-30T14:43:50.46239Z","RandGuid":"r"}}}"#;
        let timer = InvocationRequest::parse(body)
            .unwrap()
            .timer("timer")
            .unwrap();
        let status = timer.schedule_status.unwrap();
        assert_eq!(status.last, None);
        assert_eq!(
            status.next.unwrap().to_rfc3339(),
            "2024-11-30T14:45:51+00:00"
        );
        assert!(!timer.is_past_due);
    }

    #[test]
    fn a_timer_may_have_no_schedule_status() {
        let body = br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},"ScheduleStatus":null,"IsPastDue":true}},"Metadata":{}}"#;
        let timer = InvocationRequest::parse(body)
            .unwrap()
            .timer("timer")
            .unwrap();
        assert_eq!(timer.schedule_status, None);
        assert!(timer.is_past_due);
    }

    #[test]
    fn http_headers_are_arrays_and_a_chunked_request_has_no_body() {
        let body = br#"{"Data":{"req":{"Url":"https://app/api/webhooks/salesforce?x=1","Method":"POST",
            "Query":{"x":"1"},"Headers":{"Content-Type":["text/xml; charset=utf-8"],"X-Multi":["a","b"]},
            "Params":{"provider":"salesforce"},"Identities":[]}},
            "Metadata":{"provider":"\"salesforce\"","Headers":{"Content-Type":"text/xml; charset=utf-8"}}}"#;
        let req = InvocationRequest::parse(body)
            .unwrap()
            .http_request("req")
            .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.header("content-type"), Some("text/xml; charset=utf-8"));
        assert_eq!(
            req.headers[1],
            (
                "X-Multi".to_string(),
                vec!["a".to_string(), "b".to_string()]
            )
        );
        assert_eq!(req.params["provider"], "salesforce");
        assert_eq!(req.query["x"], "1");
        assert_eq!(req.body, None);
    }

    #[test]
    fn a_requests_own_values_in_quotes_are_taken_as_they_came() {
        let body = br#"{"Data":{"req":{"Url":"https://app/api/webhooks/dynamics365","Method":"POST",
            "Query":{"key":"\"a\""},"Headers":{"SOAPAction":["\"\""],"x-webhook-key":["\"k\\\"1\""]},
            "Identities":[]}},"Metadata":{}}"#;
        let req = InvocationRequest::parse(body)
            .unwrap()
            .http_request("req")
            .unwrap();
        assert_eq!(req.header("soapaction"), Some("\"\""));
        assert_eq!(req.header("x-webhook-key"), Some("\"k\\\"1\""));
        assert_eq!(req.query["key"], "\"a\"");
    }

    #[test]
    fn malformed_envelopes_say_what_is_wrong() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "empty"),
            (b"not json", "not JSON"),
            (b"[1]", "not a JSON object"),
            (b"{\"Metadata\":{}}", "no `Data` object"),
            (
                b"{\"Data\":\"x\",\"Metadata\":{}}",
                "`Data` must be an object",
            ),
        ];
        for (body, expected) in cases {
            let e = InvocationRequest::parse(body).unwrap_err();
            assert!(e.0.contains(expected), "{body:?}: {e}");
        }
        let req = InvocationRequest::parse(b"{\"Data\":{},\"Metadata\":{}}").unwrap();
        assert_eq!(
            req.service_bus_message("message").unwrap_err().0,
            "`Data.message` is missing"
        );
    }

    #[test]
    fn dates_are_read_with_or_without_offset_and_fraction() {
        for (text, expected) in [
            ("2025-01-01T10:00:00", "2025-01-01T10:00:00+00:00"),
            ("2025-01-01T10:00:00+00:00", "2025-01-01T10:00:00+00:00"),
            (
                "2025-01-01T12:00:00.1234567+02:00",
                "2025-01-01T10:00:00.123456700+00:00",
            ),
            (
                "\"2020-10-08T21:49:35.809Z\"",
                "2020-10-08T21:49:35.809+00:00",
            ),
        ] {
            let dt = decode_datetime(&json!(text)).unwrap();
            assert_eq!(dt.to_rfc3339(), expected, "{text}");
        }
    }

    #[test]
    fn the_response_uses_the_hosts_casing() {
        let res = InvocationResponse::new()
            .with_http("res", HttpResponse::error(400, "bad"))
            .log("rejected");
        let json = serde_json::to_value(res).unwrap();
        assert_eq!(
            json,
            json!({
                "Outputs": {"res": {"statusCode": 400,
                    "headers": {"Content-Type": "application/json"},
                    "body": "{\"error\":\"bad\"}"}},
                "Logs": ["rejected"],
                "ReturnValue": null
            })
        );
    }
}
