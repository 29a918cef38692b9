//! [`MessageQueue`] on Azure Service Bus, over its REST send API.
//!
//! The Functions host receives from the queues; the handler only sends. Output bindings cannot
//! set MessageId, SessionId or a schedule, so the handler posts to
//! `https://<namespace>/<queue>/messages` itself, with the broker properties in the
//! `BrokerProperties` header and application properties as headers of their own.
//!
//! Authorization is a Shared Access Signature from a connection string, or an Entra bearer
//! token (managed identity) when only the namespace is configured, as the Functions host's own
//! `ServiceBusConnection` / `ServiceBusConnection__fullyQualifiedNamespace` settings do.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use chrono::Utc;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::{MessageQueue, OutgoingMessage, QueueError};
use crate::identity::TokenSource;

/// The Entra scope of Service Bus data-plane requests.
pub const SCOPE: &str = "https://servicebus.azure.net/.default";

/// How long a SAS token this sender mints is valid.
const SAS_LIFETIME_SECS: i64 = 60 * 60;

#[derive(Clone)]
pub enum ServiceBusAuth {
    /// A shared access key: `SharedAccessKeyName` and `SharedAccessKey` of a connection string.
    Sas { key_name: String, key: String },
    /// Entra bearer tokens (role: Azure Service Bus Data Sender).
    Entra(Arc<dyn TokenSource>),
}

/// Where and how to send.
#[derive(Clone)]
pub struct ServiceBusConfig {
    /// `https://<namespace>.servicebus.windows.net` (or `http://` for a local emulator).
    pub endpoint: String,
    pub auth: ServiceBusAuth,
}

impl std::fmt::Debug for ServiceBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.auth {
            ServiceBusAuth::Sas { key_name, .. } => format!("SAS({key_name})"),
            ServiceBusAuth::Entra(_) => "Entra".into(),
        };
        write!(f, "ServiceBusConfig({}, {auth})", self.endpoint)
    }
}

impl ServiceBusConfig {
    /// Reads a connection string: `Endpoint=sb://<ns>/;SharedAccessKeyName=<rule>;SharedAccessKey=<key>`
    /// (`UseDevelopmentEmulator=true` sends over plain HTTP, as the Service Bus emulator wants).
    /// Errors never contain the key.
    pub fn from_connection_string(text: &str) -> Result<Self, String> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut emulator = false;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                "a connection string is `Name=value` pairs separated by `;`".to_string()
            })?;
            match name.to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.to_string()),
                "sharedaccesskeyname" => key_name = Some(value.to_string()),
                // The key is base64 text and may itself end in `=`.
                "sharedaccesskey" => key = Some(part[name.len() + 1..].to_string()),
                "usedevelopmentemulator" => emulator = value.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or("the connection string has no Endpoint")?;
        let host = endpoint
            .strip_prefix("sb://")
            .ok_or("the connection string's Endpoint must start with sb://")?
            .trim_end_matches('/');
        if host.is_empty() {
            return Err("the connection string's Endpoint has no namespace".into());
        }
        let scheme = if emulator { "http" } else { "https" };
        Ok(Self {
            endpoint: format!("{scheme}://{host}"),
            auth: ServiceBusAuth::Sas {
                key_name: key_name.ok_or("the connection string has no SharedAccessKeyName")?,
                key: key.ok_or("the connection string has no SharedAccessKey")?,
            },
        })
    }

    /// An identity-based connection to `<namespace>.servicebus.windows.net`.
    pub fn from_namespace(
        namespace: &str,
        credential: Arc<dyn TokenSource>,
    ) -> Result<Self, String> {
        let host = namespace_host(namespace).ok_or(
            "not a Service Bus namespace host name; expected <name>.servicebus.windows.net",
        )?;
        Ok(Self {
            endpoint: format!("https://{host}"),
            auth: ServiceBusAuth::Entra(credential),
        })
    }
}

/// The host name of a namespace given as `<name>.servicebus.windows.net`, with or without an
/// `sb://` or `https://` scheme and a trailing `/`; `None` if it is not a host name.
pub fn namespace_host(namespace: &str) -> Option<&str> {
    let host = namespace
        .trim()
        .trim_start_matches("sb://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then_some(host)
}

/// A Shared Access Signature for `resource` (a URL), valid until `expiry` (Unix seconds):
/// `sig = base64(hmac_sha256(key, urlencode(resource) + "\n" + expiry))`, the key used as its
/// UTF-8 text, not base64-decoded.
pub fn sas_token(resource: &str, key_name: &str, key: &str, expiry: i64) -> String {
    let encoded_resource = url_encode(resource);
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(format!("{encoded_resource}\n{expiry}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={encoded_resource}&sig={}&se={expiry}&skn={key_name}",
        url_encode(&signature)
    )
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Clone)]
pub struct ServiceBusSender {
    http: reqwest::Client,
    config: ServiceBusConfig,
}

impl ServiceBusSender {
    pub fn new(config: ServiceBusConfig) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client with default TLS builds"),
            config,
        }
    }

    async fn authorization(&self) -> Result<String, QueueError> {
        match &self.config.auth {
            ServiceBusAuth::Sas { key_name, key } => {
                // A token for the namespace is valid for every entity under it.
                let resource = format!("{}/", self.config.endpoint);
                Ok(sas_token(
                    &resource,
                    key_name,
                    key,
                    Utc::now().timestamp() + SAS_LIFETIME_SECS,
                ))
            }
            ServiceBusAuth::Entra(credential) => credential
                .token(SCOPE)
                .await
                .map(|t| format!("Bearer {t}"))
                .map_err(|e| {
                    QueueError::Unavailable(format!("no Entra token for Service Bus: {e}"))
                }),
        }
    }
}

/// A message peek-locked over REST: what it holds, and the lock that deletes or unlocks it.
#[derive(Debug, Clone, PartialEq)]
pub struct LockedMessage {
    /// The URL of the lock (`Location`), for delete and unlock.
    pub lock_url: String,
    pub sequence_number: i64,
    pub message_id: String,
    pub session_id: Option<String>,
    pub delivery_count: u32,
    pub enqueued_at: chrono::DateTime<Utc>,
    pub content_type: Option<String>,
    pub properties: Map<String, Value>,
    pub body: Vec<u8>,
}

/// Response headers that are HTTP's or the broker's own, not a message's properties.
const NOT_PROPERTIES: [&str; 9] = [
    "brokerproperties",
    "location",
    "content-type",
    "content-length",
    "date",
    "server",
    "transfer-encoding",
    "strict-transport-security",
    "connection",
];

/// An application property as a received message's header carries it: strings in quotes,
/// numbers and booleans bare.
fn property_value(header: &str) -> Value {
    match serde_json::from_str::<Value>(header) {
        Ok(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(header.to_string()),
    }
}

/// A header's text: UTF-8 where its bytes are (an id written in another script, sent back as
/// it was sent), else each byte the character it is in Latin-1, as HTTP reads headers.
fn header_value(value: &reqwest::header::HeaderValue) -> String {
    match std::str::from_utf8(value.as_bytes()) {
        Ok(text) => text.to_string(),
        Err(_) => value.as_bytes().iter().map(|&b| char::from(b)).collect(),
    }
}

/// Reads a peek-lock answer: the body, `BrokerProperties`, `Location` and one header per
/// application property.
pub fn locked_message(
    headers: &reqwest::header::HeaderMap,
    body: Vec<u8>,
) -> Result<LockedMessage, String> {
    let header = |name: &str| headers.get(name).map(header_value);
    let broker: Value = header("BrokerProperties")
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .ok_or("the message has no readable BrokerProperties")?;
    let lock_url = header("Location").ok_or("the message has no Location to settle it by")?;
    let properties = headers
        .iter()
        .filter(|(name, _)| !NOT_PROPERTIES.contains(&name.as_str()))
        .map(|(name, v)| (name.to_string(), property_value(&header_value(v))))
        .collect();
    Ok(LockedMessage {
        lock_url,
        sequence_number: broker["SequenceNumber"]
            .as_i64()
            .ok_or("BrokerProperties has no SequenceNumber")?,
        message_id: broker["MessageId"].as_str().unwrap_or_default().to_string(),
        session_id: broker["SessionId"].as_str().map(str::to_string),
        delivery_count: broker["DeliveryCount"].as_u64().unwrap_or_default() as u32,
        enqueued_at: broker["EnqueuedTimeUtc"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc2822(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default(),
        content_type: header("Content-Type"),
        properties,
        body,
    })
}

impl ServiceBusSender {
    /// Locks and reads the next message of `path` (a queue, or `<queue>/$DeadLetterQueue`);
    /// `None` when there is none.
    pub async fn peek_lock(&self, path: &str) -> Result<Option<LockedMessage>, QueueError> {
        // The shortest wait the REST API takes: an empty entity answers after a second.
        let url = format!("{}/{path}/messages/head?timeout=1", self.config.endpoint);
        let response = self
            .http
            .post(&url)
            .header("Authorization", self.authorization().await?)
            .header("Content-Length", "0")
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(format!("reading `{path}` failed: {e}")))?;
        let status = response.status();
        if status.as_u16() == 204 {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(answer_error(status, &format!("reading `{path}`"), response).await);
        }
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| QueueError::Unavailable(format!("reading `{path}` failed: {e}")))?;
        locked_message(&headers, body.to_vec())
            .map(Some)
            .map_err(|e| QueueError::Rejected(format!("`{path}`: {e}")))
    }

    /// Completes a locked message: it leaves its queue.
    pub async fn delete_locked(&self, message: &LockedMessage) -> Result<(), QueueError> {
        self.settle(reqwest::Method::DELETE, message).await
    }

    /// Gives a locked message back to its queue at once.
    pub async fn unlock(&self, message: &LockedMessage) -> Result<(), QueueError> {
        self.settle(reqwest::Method::PUT, message).await
    }

    async fn settle(
        &self,
        method: reqwest::Method,
        message: &LockedMessage,
    ) -> Result<(), QueueError> {
        let what = format!("settling message {}", message.sequence_number);
        let response = self
            .http
            .request(method, &message.lock_url)
            .header("Authorization", self.authorization().await?)
            .header("Content-Length", "0")
            .send()
            .await
            .map_err(|e| QueueError::Unavailable(format!("{what} failed: {e}")))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(answer_error(response.status(), &what, response).await)
        }
    }
}

/// A failed answer as a [`QueueError`]: worth retrying (5xx, 429, 408) or not.
async fn answer_error(
    status: reqwest::StatusCode,
    what: &str,
    response: reqwest::Response,
) -> QueueError {
    let detail = response.text().await.unwrap_or_default();
    let detail: String = detail.chars().take(300).collect();
    let error = format!("Service Bus answered {status} {what}: {detail}");
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        QueueError::Unavailable(error)
    } else {
        QueueError::Rejected(error)
    }
}

/// The `BrokerProperties` header of a message.
pub fn broker_properties(message: &OutgoingMessage) -> Value {
    let mut props = Map::new();
    props.insert(
        "MessageId".into(),
        Value::String(super::broker_message_id(&message.message_id).into_owned()),
    );
    if let Some(session) = &message.session_id {
        props.insert("SessionId".into(), Value::String(session.clone()));
    }
    if let Some(correlation) = &message.correlation_id {
        props.insert("CorrelationId".into(), Value::String(correlation.clone()));
    }
    if let Some(at) = message.scheduled_enqueue_time {
        // RFC 1123, as the REST API wants it.
        props.insert(
            "ScheduledEnqueueTimeUtc".into(),
            Value::String(at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()),
        );
    }
    Value::Object(props)
}

/// JSON text in ASCII alone, every other character escaped (`\u00e9`, a surrogate pair past
/// U+FFFF), as a header must carry it: header bytes are not read as UTF-8, and Service Bus
/// would take the `é` of an integration's id, its session id, for two other characters.
fn ascii_json(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
            continue;
        }
        // Outside ASCII (and DEL, which a header may not hold), serde_json writes characters
        // only inside strings, where an escape says the same.
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
    }
    out
}

/// The most bytes of a property's value sent: a dead letter's description, read from a
/// provider's error, may quote a whole query, and a header that long is refused.
const MAX_PROPERTY_BYTES: usize = 4096;

/// A property's value as the text of its header. A header cannot carry a line break, and a
/// request with one is never sent: a dead letter whose description came from a provider's
/// multi-line error would fail to send at every delivery. Control characters become spaces,
/// and what is not ASCII is escaped (`\u{e9}`), which headers carry everywhere; the text is
/// cut short, at a whole character, past [`MAX_PROPERTY_BYTES`].
fn header_text(value: &Value) -> String {
    const CUT: &str = "...";
    let text = match value {
        Value::String(s) => s.as_str(),
        other => return other.to_string(),
    };
    let mut out = String::with_capacity(text.len().min(MAX_PROPERTY_BYTES));
    // How much of `out` (whole characters) leaves room for `CUT` after it.
    let mut room_for_cut = 0;
    let mut ascii = [0; 1];
    for c in text.chars() {
        let escaped;
        let piece: &str = if c.is_ascii_control() {
            " "
        } else if c.is_ascii() {
            c.encode_utf8(&mut ascii)
        } else {
            escaped = format!("\\u{{{:x}}}", u32::from(c));
            &escaped
        };
        if out.len() + piece.len() > MAX_PROPERTY_BYTES {
            out.truncate(room_for_cut);
            out.push_str(CUT);
            break;
        }
        out.push_str(piece);
        if out.len() + CUT.len() <= MAX_PROPERTY_BYTES {
            room_for_cut = out.len();
        }
    }
    out
}

#[async_trait]
impl MessageQueue for ServiceBusSender {
    async fn send(&self, message: OutgoingMessage) -> Result<(), QueueError> {
        let url = format!(
            "{}/{}/messages?timeout=60",
            self.config.endpoint, message.queue
        );
        let mut request = self
            .http
            .post(&url)
            .header("Authorization", self.authorization().await?)
            .header(
                "Content-Type",
                message
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream"),
            )
            .header("BrokerProperties", ascii_json(&broker_properties(&message)));
        for (name, value) in &message.properties {
            request = request.header(name.as_str(), header_text(value));
        }
        let response = request.body(message.body).send().await.map_err(|e| {
            QueueError::Unavailable(format!("sending to `{}` failed: {e}", message.queue))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        Err(answer_error(status, &format!("for `{}`", message.queue), response).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn a_sas_token_signs_the_encoded_resource_and_expiry() {
        let token = sas_token(
            "https://sb-sync-dev.servicebus.windows.net/",
            "RootManageSharedAccessKey",
            "c2VjcmV0LWtleQ==",
            1_767_225_600,
        );
        let expected_sig = {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"c2VjcmV0LWtleQ==").unwrap();
            mac.update(b"https%3A%2F%2Fsb-sync-dev.servicebus.windows.net%2F\n1767225600");
            url_encode(
                &base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()),
            )
        };
        assert_eq!(
            token,
            format!(
                "SharedAccessSignature sr=https%3A%2F%2Fsb-sync-dev.servicebus.windows.net%2F&sig={expected_sig}&se=1767225600&skn=RootManageSharedAccessKey"
            )
        );
    }

    #[test]
    fn connection_strings_are_read_and_their_errors_never_show_the_key() {
        let config = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://sb-sync-dev.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc+/def==",
        )
        .unwrap();
        assert_eq!(
            config.endpoint,
            "https://sb-sync-dev.servicebus.windows.net"
        );
        match &config.auth {
            ServiceBusAuth::Sas { key_name, key } => {
                assert_eq!((key_name.as_str(), key.as_str()), ("send", "abc+/def=="))
            }
            ServiceBusAuth::Entra(_) => panic!("SAS expected"),
        }
        assert!(!format!("{config:?}").contains("abc+/def"));
        let emulator = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=k;SharedAccessKey=s3cret;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(emulator.endpoint, "http://127.0.0.1:5672");
        let err =
            ServiceBusConfig::from_connection_string("Endpoint=sb://x/;SharedAccessKey=s3cret")
                .unwrap_err();
        assert_eq!(err, "the connection string has no SharedAccessKeyName");
        assert!(ServiceBusConfig::from_connection_string("garbage").is_err());
    }

    #[test]
    fn a_property_is_sent_as_one_line_of_ascii() {
        assert_eq!(
            header_text(&json!("No such column 'Foo'\r\n ^\nERROR at Row:1\tcafé")),
            "No such column 'Foo'   ^ ERROR at Row:1 caf\\u{e9}"
        );
        assert_eq!(header_text(&json!(3)), "3");
        let long = header_text(&json!("x".repeat(10_000)));
        assert_eq!(long.len(), MAX_PROPERTY_BYTES);
        assert!(long.ends_with("x..."));
        // Escaped, a character takes up to ten bytes: the cut counts what is sent.
        let japanese = header_text(&json!("行をロックできません".repeat(500)));
        assert!(japanese.len() <= MAX_PROPERTY_BYTES, "{}", japanese.len());
        assert!(japanese.ends_with("}..."), "cut between characters");
        let fits = "y".repeat(MAX_PROPERTY_BYTES);
        assert_eq!(header_text(&json!(fits)), fits, "what fits is whole");
        reqwest::header::HeaderValue::from_str(&header_text(&json!("a\nb\u{7f}ü"))).unwrap();
    }

    #[test]
    fn broker_properties_travel_in_ascii_whatever_the_ids_are_written_in() {
        let message = OutgoingMessage::json("sync-outbound", "intégration-1:évt\u{7f}", &json!({}))
            .in_session("intégration-1 🚀");
        let header = ascii_json(&broker_properties(&message));
        assert!(header.is_ascii() && !header.contains('\u{7f}'), "{header}");
        reqwest::header::HeaderValue::from_str(&header).unwrap();
        assert!(
            header.contains("\\u00e9") && header.contains("\\ud83d\\ude80"),
            "{header}"
        );
        let read: Value = serde_json::from_str(&header).unwrap();
        assert_eq!(read["SessionId"], "intégration-1 🚀");
        assert_eq!(read, broker_properties(&message));
    }

    #[test]
    fn broker_properties_carry_id_session_and_schedule() {
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let message = OutgoingMessage::json("sync-outbound", "c-1:evt-9", &serde_json::json!({}))
            .in_session("c-1")
            .scheduled_at(at);
        assert_eq!(
            broker_properties(&message),
            serde_json::json!({"MessageId": "c-1:evt-9", "SessionId": "c-1",
                               "ScheduledEnqueueTimeUtc": "Thu, 01 Jan 2026 00:00:00 GMT"})
        );
    }
}
