//! Loopback fakes of the Azure data planes the handler calls itself: Service Bus REST send,
//! Event Grid publish and Key Vault secrets. Each checks what the real service checks (the SAS
//! signature and expiry, the bearer token, the `BrokerProperties` header, the content type, the
//! Key Vault challenge) and records what it accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

pub const SAS_KEY_NAME: &str = "sync-sender";
pub const SAS_KEY: &str = "bG9vcGJhY2stc2VjcmV0LWtleQ==";
pub const BEARER: &str = "entra-test-token";

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("127.0.0.1:{}", addr.port())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() + 1 {
            out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A message Service Bus accepted.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub queue: String,
    pub broker_properties: Value,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

#[derive(Clone, Default)]
pub struct FakeServiceBus {
    pub host: String,
    pub sent: Arc<Mutex<Vec<SentMessage>>>,
    pub refusals: Arc<Mutex<Vec<String>>>,
}

impl FakeServiceBus {
    pub async fn start() -> Self {
        let mut fake = Self::default();
        let router = Router::new()
            .route("/{queue}/messages", post(service_bus_send))
            .with_state(fake.clone());
        fake.host = serve(router).await;
        fake
    }

    /// A connection string for this fake, as the Service Bus emulator's look.
    pub fn connection_string(&self, key: &str) -> String {
        format!(
            "Endpoint=sb://{};SharedAccessKeyName={SAS_KEY_NAME};SharedAccessKey={key};UseDevelopmentEmulator=true",
            self.host
        )
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.sent.lock().unwrap().clone()
    }
}

/// Checks a SAS token the way Service Bus does: the signature over the resource and expiry,
/// the key name, an unexpired expiry, and a resource that covers the URL.
fn check_sas(token: &str, url: &str) -> Result<(), String> {
    let fields: BTreeMap<&str, &str> = token
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let (sr, sig, se, skn) = (
        fields.get("sr"),
        fields.get("sig"),
        fields.get("se"),
        fields.get("skn"),
    );
    let (Some(sr), Some(sig), Some(se), Some(skn)) = (sr, sig, se, skn) else {
        return Err("sr, sig, se and skn are required".into());
    };
    if *skn != SAS_KEY_NAME {
        return Err(format!("unknown key name {skn}"));
    }
    let expiry: i64 = se.parse().map_err(|_| "se is not a number")?;
    if expiry < chrono::Utc::now().timestamp() {
        return Err("the token has expired".into());
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SAS_KEY.as_bytes()).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if percent_decode(sig) != expected {
        return Err("the signature does not match".into());
    }
    let resource = percent_decode(sr);
    if !url.starts_with(resource.trim_end_matches('/')) {
        return Err(format!("the token is for {resource}, not {url}"));
    }
    Ok(())
}

async fn service_bus_send(
    State(fake): State<FakeServiceBus>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let url = format!("http://{}/{queue}", header("host").unwrap_or_default());
    let authorized = match header("authorization") {
        Some(token) if token == format!("Bearer {BEARER}") => Ok(()),
        Some(token) => check_sas(&token, &url),
        None => Err("no Authorization".into()),
    };
    if let Err(reason) = authorized {
        fake.refusals.lock().unwrap().push(reason.clone());
        return (StatusCode::UNAUTHORIZED, reason).into_response();
    }
    let Some(Ok(broker_properties)) =
        header("brokerproperties").map(|p| serde_json::from_str::<Value>(&p))
    else {
        return (StatusCode::BAD_REQUEST, "BrokerProperties must be JSON").into_response();
    };
    if header("content-type").is_none() {
        return (StatusCode::BAD_REQUEST, "no Content-Type").into_response();
    }
    if queue == "sync-outbound" && broker_properties.get("SessionId").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "The SessionId was not set on a message, and it cannot be sent to the entity",
        )
            .into_response();
    }
    let headers = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    fake.sent.lock().unwrap().push(SentMessage {
        queue,
        broker_properties,
        headers,
        body: body.to_vec(),
    });
    StatusCode::CREATED.into_response()
}

/// A batch Event Grid accepted.
#[derive(Debug, Clone)]
pub struct PublishedBatch {
    pub content_type: String,
    pub events: Vec<Value>,
}

#[derive(Clone, Default)]
pub struct FakeEventGrid {
    pub endpoint: String,
    pub key: String,
    pub batches: Arc<Mutex<Vec<PublishedBatch>>>,
}

impl FakeEventGrid {
    pub async fn start(key: &str) -> Self {
        let mut fake = Self {
            key: key.to_string(),
            ..Self::default()
        };
        let router = Router::new()
            .route("/api/events", post(event_grid_publish))
            .with_state(fake.clone());
        fake.endpoint = format!("http://{}/api/events", serve(router).await);
        fake
    }

    pub fn events(&self) -> Vec<Value> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.events.clone())
            .collect()
    }
}

async fn event_grid_publish(
    State(fake): State<FakeEventGrid>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let key_ok = header("aeg-sas-key") == fake.key;
    let bearer_ok = header("authorization") == format!("Bearer {BEARER}");
    if !key_ok && !bearer_ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "Unauthorized", "message": "bad key"}})),
        )
            .into_response();
    }
    if query.get("api-version").map(String::as_str) != Some("2018-01-01") {
        return (StatusCode::BAD_REQUEST, "api-version is required").into_response();
    }
    if body.len() > 1_048_576 {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let content_type = header("content-type");
    let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be an array of events",
        )
            .into_response();
    };
    let required: &[&str] = if content_type.starts_with("application/cloudevents-batch+json") {
        &["specversion", "type", "source", "id"]
    } else {
        &["id", "eventType", "subject", "eventTime"]
    };
    if let Some(missing) = required
        .iter()
        .find(|f| events.iter().any(|e| e.get(**f).is_none()))
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("an event has no {missing}"),
        )
            .into_response();
    }
    fake.batches.lock().unwrap().push(PublishedBatch {
        content_type,
        events,
    });
    StatusCode::OK.into_response()
}

/// Key Vault's secrets API with its authentication challenge: a request without a bearer token
/// gets a 401 naming the authority and resource, as the real vault answers.
#[derive(Clone, Default)]
pub struct FakeKeyVault {
    pub addr: String,
    pub secrets: Arc<Mutex<HashMap<String, String>>>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeKeyVault {
    pub async fn start() -> Self {
        let mut fake = Self::default();
        let router = Router::new()
            .route("/secrets/{name}", get(kv_get).put(kv_put))
            .route("/secrets/{name}/", get(kv_get))
            .with_state(fake.clone());
        fake.addr = serve(router).await;
        fake
    }
}

fn challenge(headers: &HeaderMap) -> Option<Response> {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {BEARER}"));
    (!authorized).then(|| {
        let mut response = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}})),
        )
            .into_response();
        response.headers_mut().insert(
            "www-authenticate",
            r#"Bearer authorization="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net""#
                .parse()
                .unwrap(),
        );
        response
    })
}

async fn kv_get(
    State(fake): State<FakeKeyVault>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.requests.lock().unwrap().push(format!("GET {name}"));
    if let Some(answer) = challenge(&headers) {
        return answer;
    }
    match fake.secrets.lock().unwrap().get(&name) {
        Some(value) => Json(json!({"value": value, "id": format!("https://kv-sync-dev.vault.azure.net/secrets/{name}/0001"),
                                    "attributes": {"enabled": true}}))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "SecretNotFound", "message": format!("A secret with (name/id) {name} was not found in this key vault.")}})),
        )
            .into_response(),
    }
}

async fn kv_put(
    State(fake): State<FakeKeyVault>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.requests.lock().unwrap().push(format!("PUT {name}"));
    if let Some(answer) = challenge(&headers) {
        return answer;
    }
    let Ok(parsed) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "not JSON").into_response();
    };
    let Some(value) = parsed["value"].as_str() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadParameter", "message": "value is required"}})),
        )
            .into_response();
    };
    fake.secrets
        .lock()
        .unwrap()
        .insert(name.clone(), value.to_string());
    Json(json!({"value": value, "id": format!("https://kv-sync-dev.vault.azure.net/secrets/{name}/0002")})).into_response()
}
