//! Invocation envelopes, built as the Functions host builds them.
//!
//! The host serializes each value with Newtonsoft: strings are JSON-encoded a second time,
//! numbers and booleans become strings, objects stay objects, nulls are left out, and dates
//! lose their offset (`DateTime`) or keep `+00:00` (`DateTimeOffset`) at seconds precision.
//! `handler local` sends exactly these shapes so that local runs exercise the same decoding as
//! Azure does.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::definition::FunctionName;
use crate::queue::ReceivedMessage;

/// A value as the host puts it into `Data` or `Metadata`; `None` for null (left out).
pub fn host_value(value: &Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(Value::String(Value::String(s.clone()).to_string())),
        Value::Number(n) => Some(Value::String(n.to_string())),
        Value::Bool(b) => Some(Value::String(b.to_string())),
        other => Some(other.clone()),
    }
}

fn host_string(s: &str) -> Value {
    Value::String(Value::String(s.to_string()).to_string())
}

/// A .NET `DateTime` (UTC kind) after the host's round trip.
pub fn host_datetime(t: DateTime<Utc>) -> Value {
    Value::String(t.format("%Y-%m-%dT%H:%M:%S").to_string())
}

/// A .NET `DateTimeOffset` after the host's round trip.
pub fn host_datetime_offset(t: DateTime<Utc>) -> Value {
    Value::String(t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string())
}

fn sys(function: FunctionName, now: DateTime<Utc>) -> Value {
    json!({
        "MethodName": function.as_str(),
        // .NET prints seven fractional digits (100 ns ticks).
        "UtcNow": format!(
            "{}.{:07}Z",
            now.format("%Y-%m-%dT%H:%M:%S"),
            now.timestamp_subsec_nanos() / 100
        ),
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// Adds the top-level properties of a JSON object body to the metadata, as the host does.
fn add_body_properties(metadata: &mut Map<String, Value>, body: &[u8]) {
    if let Ok(Value::Object(props)) = serde_json::from_slice::<Value>(body) {
        for (name, value) in props {
            if let Some(v) = host_value(&value) {
                metadata.entry(name).or_insert(v);
            }
        }
    }
}

/// The envelope for a Service Bus message bound as a string (no `dataType`).
pub fn service_bus(
    function: FunctionName,
    binding: &str,
    message: &ReceivedMessage,
    now: DateTime<Utc>,
) -> Value {
    let body_text = String::from_utf8_lossy(&message.body);
    let mut metadata = Map::new();
    let mut put = |k: &str, v: Value| {
        metadata.insert(k.to_string(), v);
    };
    put(
        "DeliveryCount",
        Value::String(message.delivery_count.to_string()),
    );
    put("LockToken", host_string(&message.lock_token));
    put("ExpiresAtUtc", host_datetime(message.expires_at));
    put("ExpiresAt", host_datetime_offset(message.expires_at));
    put("EnqueuedTimeUtc", host_datetime(message.enqueued_at));
    put("EnqueuedTime", host_datetime_offset(message.enqueued_at));
    put("MessageId", host_string(&message.message_id));
    if let Some(ct) = &message.content_type {
        put("ContentType", host_string(ct));
    }
    put(
        "SequenceNumber",
        Value::String(message.sequence_number.to_string()),
    );
    if let Some(c) = &message.correlation_id {
        put("CorrelationId", host_string(c));
    }
    if let Some(s) = &message.session_id {
        put("SessionId", host_string(s));
    }
    put(
        "ApplicationProperties",
        Value::Object(message.properties.clone()),
    );
    put("UserProperties", Value::Object(message.properties.clone()));
    for actions in ["MessageActions", "ReceiveActions"] {
        put(actions, json!({}));
    }
    if message.session_id.is_some() {
        put("SessionActions", json!({}));
    }
    add_body_properties(&mut metadata, &message.body);
    metadata.insert("sys".into(), sys(function, now));
    json!({
        "Data": { binding: host_string(&body_text) },
        "Metadata": metadata,
    })
}

/// The schedule status the host keeps for a timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleStatus {
    pub last: Option<DateTime<Utc>>,
    pub next: DateTime<Utc>,
    pub last_updated: DateTime<Utc>,
}

/// The envelope for a timer occurrence. On a first run the host sends `Last` as .NET's
/// minimum date.
pub fn timer(
    function: FunctionName,
    binding: &str,
    status: ScheduleStatus,
    is_past_due: bool,
    now: DateTime<Utc>,
) -> Value {
    let last = match status.last {
        Some(last) => Value::String(last.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()),
        None => Value::String("0001-01-01T00:00:00".into()),
    };
    json!({
        "Data": { binding: {
            "Schedule": { "AdjustForDST": true },
            "ScheduleStatus": {
                "Last": last,
                "Next": status.next.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
                "LastUpdated": status.last_updated.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
            },
            "IsPastDue": is_past_due,
        }},
        "Metadata": { "sys": sys(function, now) },
    })
}

/// An HTTP request as it reached the front door.
#[derive(Debug, Clone)]
pub struct IncomingHttp {
    pub url: String,
    pub method: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub params: BTreeMap<String, String>,
    /// `None` when the request had no Content-Length (chunked) or an empty body.
    pub body: Option<Vec<u8>>,
}

/// The envelope for an httpTrigger in the host's default (non-forwarding) mode.
pub fn http(
    function: FunctionName,
    binding: &str,
    req: &IncomingHttp,
    now: DateTime<Utc>,
) -> Value {
    let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &req.query {
        query.entry(k.clone()).or_default().push(v.clone());
    }
    let query: Map<String, Value> = query
        .into_iter()
        .map(|(k, v)| (k, Value::String(v.join(","))))
        .collect();
    let mut headers: Vec<(String, Vec<String>)> = Vec::new();
    for (name, value) in &req.headers {
        match headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some((_, values)) => values.push(value.clone()),
            None => headers.push((name.clone(), vec![value.clone()])),
        }
    }
    let content_type = req
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();

    let mut request = Map::new();
    request.insert("Url".into(), Value::String(req.url.clone()));
    request.insert("Method".into(), Value::String(req.method.clone()));
    request.insert("Query".into(), Value::Object(query.clone()));
    request.insert(
        "Headers".into(),
        Value::Object(headers.iter().map(|(n, v)| (n.clone(), json!(v))).collect()),
    );
    if !req.params.is_empty() {
        request.insert("Params".into(), json!(req.params));
    }
    request.insert(
        "Identities".into(),
        json!([{ "AuthenticationType": null, "IsAuthenticated": false, "Claims": [] }]),
    );
    if let Some(body) = &req.body {
        let binary = content_type.starts_with("application/octet-stream")
            || content_type.starts_with("multipart/");
        let text = if binary {
            base64::engine::general_purpose::STANDARD.encode(body)
        } else {
            String::from_utf8_lossy(body).into_owned()
        };
        request.insert("Body".into(), Value::String(text));
    }

    let mut metadata = Map::new();
    if let Some(body) = &req.body {
        add_body_properties(&mut metadata, body);
    }
    for (k, v) in &query {
        if k != "code" {
            metadata
                .entry(k.clone())
                .or_insert_with(|| host_value(v).unwrap_or(Value::Null));
        }
    }
    for (k, v) in &req.params {
        metadata.entry(k.clone()).or_insert_with(|| host_string(v));
    }
    metadata.entry("Query").or_insert(Value::Object(query));
    metadata.entry("Headers").or_insert_with(|| {
        Value::Object(
            headers
                .iter()
                .map(|(n, v)| (n.clone(), Value::String(v.join(","))))
                .collect(),
        )
    });
    metadata.insert("sys".into(), sys(function, now));
    json!({ "Data": { binding: request }, "Metadata": metadata })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::InvocationRequest;
    use chrono::TimeZone;

    fn received(body: &str) -> ReceivedMessage {
        let t = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 0).unwrap();
        ReceivedMessage {
            queue: "sync-outbound".into(),
            sequence_number: 17,
            lock_token: "4223106e".into(),
            locked_until: t,
            message_id: "c-1:evt-9".into(),
            session_id: Some("c-1".into()),
            correlation_id: None,
            content_type: Some("application/json".into()),
            properties: Map::new(),
            body: body.as_bytes().to_vec(),
            enqueued_at: t,
            expires_at: t,
            delivery_count: 2,
        }
    }

    #[test]
    fn a_service_bus_envelope_has_the_hosts_encodings() {
        let now = Utc.with_ymd_and_hms(2026, 5, 1, 12, 0, 1).unwrap();
        let envelope = service_bus(
            FunctionName::SyncOutbound,
            "message",
            &received(r#"{"connectionId":"c-1","n":5}"#),
            now,
        );
        assert_eq!(
            envelope["Data"]["message"],
            json!("\"{\\\"connectionId\\\":\\\"c-1\\\",\\\"n\\\":5}\"")
        );
        let m = &envelope["Metadata"];
        assert_eq!(m["DeliveryCount"], "2");
        assert_eq!(m["MessageId"], "\"c-1:evt-9\"");
        assert_eq!(m["SessionId"], "\"c-1\"");
        assert_eq!(m["SequenceNumber"], "17");
        assert_eq!(m["EnqueuedTimeUtc"], "2026-05-01T12:00:00");
        assert_eq!(m["EnqueuedTime"], "2026-05-01T12:00:00+00:00");
        assert_eq!(m["connectionId"], "\"c-1\"");
        assert_eq!(m["n"], "5");

        // And the handler reads back exactly what was sent.
        let req = InvocationRequest::parse(envelope.to_string().as_bytes()).unwrap();
        let msg = req.service_bus_message("message").unwrap();
        assert_eq!(msg.body, br#"{"connectionId":"c-1","n":5}"#);
        assert_eq!(msg.delivery_count, 2);
        assert_eq!(msg.session_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn a_chunked_http_request_has_no_body_and_headers_are_arrays() {
        let req = IncomingHttp {
            url: "http://127.0.0.1:7071/api/webhooks/zoom?code=k&x=1".into(),
            method: "POST".into(),
            query: vec![("code".into(), "k".into()), ("x".into(), "1".into())],
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-multi".into(), "a".into()),
                ("x-multi".into(), "b".into()),
            ],
            params: BTreeMap::from([("provider".into(), "zoom".into())]),
            body: None,
        };
        let envelope = http(FunctionName::WebhookReceiver, "req", &req, Utc::now());
        let data = &envelope["Data"]["req"];
        assert!(data.get("Body").is_none());
        assert_eq!(data["Headers"]["x-multi"], json!(["a", "b"]));
        assert_eq!(data["Params"]["provider"], "zoom");
        let m = &envelope["Metadata"];
        assert_eq!(m["provider"], "\"zoom\"");
        assert_eq!(m["x"], "\"1\"");
        assert!(m.get("code").is_none(), "the function key is not metadata");
        assert_eq!(m["Headers"]["x-multi"], "a,b");
    }
}
