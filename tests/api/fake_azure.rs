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

/// A message held by the fake broker.
#[derive(Debug, Clone)]
pub struct HeldMessage {
    pub sequence_number: i64,
    pub message_id: String,
    pub session_id: Option<String>,
    pub content_type: String,
    /// Application properties, as JSON values.
    pub properties: BTreeMap<String, Value>,
    pub body: Vec<u8>,
    pub delivery_count: u32,
    pub enqueued_at: chrono::DateTime<chrono::Utc>,
    lock: Option<String>,
}

impl HeldMessage {
    pub fn new(message_id: &str, body: &[u8], properties: &[(&str, Value)]) -> Self {
        Self {
            sequence_number: 0,
            message_id: message_id.into(),
            session_id: None,
            content_type: "application/json".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            body: body.to_vec(),
            delivery_count: 0,
            enqueued_at: chrono::Utc::now(),
            lock: None,
        }
    }
}

/// Entities (queues and `<queue>/$DeadLetterQueue` subqueues) and what they hold.
#[derive(Default)]
pub struct Broker {
    pub entities: BTreeMap<String, Vec<HeldMessage>>,
    next_sequence: BTreeMap<String, i64>,
}

impl Broker {
    /// Adds a message at the tail of `entity`, numbered in its queue's sequence (a subqueue
    /// keeps the number the message had in its queue, so numbers count per queue).
    fn enqueue(&mut self, entity: &str, mut message: HeldMessage) -> i64 {
        let queue = entity.split('/').next().unwrap_or(entity).to_string();
        if message.sequence_number == 0 {
            let next = self.next_sequence.entry(queue).or_insert(0);
            *next += 1;
            message.sequence_number = *next;
        }
        let seq = message.sequence_number;
        self.entities
            .entry(entity.to_string())
            .or_default()
            .push(message);
        seq
    }
}

/// The queues' maxDeliveryCount, as provisioned; dead-letter subqueues have none.
fn max_delivery_count(entity: &str) -> Option<u32> {
    match entity {
        "sync-inbound-webhook" => Some(5),
        e if e.contains('/') => None,
        _ => Some(10),
    }
}

#[derive(Clone, Default)]
pub struct FakeServiceBus {
    pub host: String,
    pub sent: Arc<Mutex<Vec<SentMessage>>>,
    pub refusals: Arc<Mutex<Vec<String>>>,
    pub broker: Arc<Mutex<Broker>>,
    /// Queues whose sends answer 503 Service Unavailable.
    pub unavailable: Arc<Mutex<Vec<String>>>,
    /// How many more peek-locks find the locks they meet lapsed, as a lock duration shorter
    /// than a command's run makes them (`usize::MAX`: every one): a locked message is locked
    /// again, and the lock it had is lost.
    pub lapsing_locks: Arc<std::sync::atomic::AtomicUsize>,
    /// Entities whose messages another operator takes as soon as a reader has read to their
    /// end (its replay, run meanwhile).
    pub taken_once_read: Arc<Mutex<Vec<String>>>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeServiceBus {
    pub async fn start() -> Self {
        let mut fake = Self::default();
        let router = Router::new()
            .fallback(service_bus_request)
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

    /// Authorized requests answered so far.
    pub fn requests(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Puts `message` in `queue`'s dead-letter subqueue, as the broker does with the reason
    /// and description as application properties. Returns its sequence number.
    pub fn dead_letter(
        &self,
        queue: &str,
        mut message: HeldMessage,
        reason: &str,
        description: &str,
    ) -> i64 {
        message
            .properties
            .insert("DeadLetterReason".into(), json!(reason));
        message
            .properties
            .insert("DeadLetterErrorDescription".into(), json!(description));
        self.broker
            .lock()
            .unwrap()
            .enqueue(&format!("{queue}/$DeadLetterQueue"), message)
    }

    /// What `entity` holds now, locked or not.
    pub fn held(&self, entity: &str) -> Vec<HeldMessage> {
        self.broker
            .lock()
            .unwrap()
            .entities
            .get(entity)
            .cloned()
            .unwrap_or_default()
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

/// Every Service Bus REST call: send (`POST <queue>/messages`), peek-lock
/// (`POST <entity>/messages/head`), unlock (`PUT` on the lock's URL) and delete (`DELETE`).
async fn service_bus_request(
    State(fake): State<FakeServiceBus>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let path = percent_decode(uri.path().trim_start_matches('/'));
    let host = header("host").unwrap_or_default();
    let url = format!("http://{host}/{path}");
    let authorized = match header("authorization") {
        Some(token) if token == format!("Bearer {BEARER}") => Ok(()),
        Some(token) => check_sas(&token, &url),
        None => Err("no Authorization".into()),
    };
    if let Err(reason) = authorized {
        fake.refusals.lock().unwrap().push(reason.clone());
        return (StatusCode::UNAUTHORIZED, reason).into_response();
    }
    fake.answered
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let segments: Vec<&str> = path.split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", [queue, "messages"]) => send(&fake, queue, &headers, body),
        ("POST", [entity @ .., "messages", "head"]) => peek_lock(&fake, &entity.join("/"), &host),
        ("PUT" | "DELETE", [entity @ .., "messages", _id, lock]) => settle(
            &fake,
            &entity.join("/"),
            lock,
            method == axum::http::Method::DELETE,
        ),
        _ => (
            StatusCode::NOT_FOUND,
            format!("no such operation: {method} {path}"),
        )
            .into_response(),
    }
}

fn send(fake: &FakeServiceBus, queue: &str, headers: &HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if fake.unavailable.lock().unwrap().iter().any(|q| q == queue) {
        return (StatusCode::SERVICE_UNAVAILABLE, "the entity is busy").into_response();
    }
    let Some(Ok(broker_properties)) =
        header("brokerproperties").map(|p| serde_json::from_str::<Value>(&p))
    else {
        return (StatusCode::BAD_REQUEST, "BrokerProperties must be JSON").into_response();
    };
    let Some(content_type) = header("content-type") else {
        return (StatusCode::BAD_REQUEST, "no Content-Type").into_response();
    };
    if broker_properties["MessageId"]
        .as_str()
        .is_some_and(|id| id.len() > 128)
    {
        return (
            StatusCode::BAD_REQUEST,
            "The value supplied for MessageId exceeds the maximum length of 128",
        )
            .into_response();
    }
    if queue == "sync-outbound" && broker_properties.get("SessionId").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "The SessionId was not set on a message, and it cannot be sent to the entity",
        )
            .into_response();
    }
    let all: HashMap<String, String> = headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let standard = [
        "host",
        "authorization",
        "content-type",
        "content-length",
        "brokerproperties",
        "accept",
        "user-agent",
    ];
    let mut held = HeldMessage::new(
        broker_properties["MessageId"].as_str().unwrap_or_default(),
        &body,
        &[],
    );
    held.session_id = broker_properties["SessionId"].as_str().map(str::to_string);
    held.content_type = content_type;
    // Sent properties arrive as plain header text; the broker keeps them as strings.
    held.properties = all
        .iter()
        .filter(|(n, _)| !standard.contains(&n.as_str()))
        .map(|(n, v)| (n.clone(), json!(v)))
        .collect();
    fake.broker.lock().unwrap().enqueue(queue, held);
    fake.sent.lock().unwrap().push(SentMessage {
        queue: queue.to_string(),
        broker_properties,
        headers: all,
        body: body.to_vec(),
    });
    StatusCode::CREATED.into_response()
}

fn peek_lock(fake: &FakeServiceBus, entity: &str, host: &str) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    let lapsing = fake.lapsing_locks.load(SeqCst);
    let mut broker = fake.broker.lock().unwrap();
    let Some(message) = broker.entities.get_mut(entity).and_then(|messages| {
        messages
            .iter_mut()
            .find(|m| lapsing > 0 || m.lock.is_none())
    }) else {
        let mut taken = fake.taken_once_read.lock().unwrap();
        if let Some(i) = taken.iter().position(|e| e == entity) {
            taken.remove(i);
            broker.entities.remove(entity);
        }
        return StatusCode::NO_CONTENT.into_response();
    };
    if message.lock.is_some() && lapsing != usize::MAX {
        fake.lapsing_locks.store(lapsing - 1, SeqCst);
    }
    let lock = uuid::Uuid::new_v4().to_string();
    message.lock = Some(lock.clone());
    message.delivery_count += 1;
    let mut broker_properties = json!({
        "DeliveryCount": message.delivery_count,
        "EnqueuedSequenceNumber": 0,
        "EnqueuedTimeUtc": message.enqueued_at.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        "LockToken": lock,
        "LockedUntilUtc": (chrono::Utc::now() + chrono::Duration::minutes(1))
            .format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        "MessageId": message.message_id,
        "SequenceNumber": message.sequence_number,
        "State": "Active",
        "TimeToLive": 1209600,
    });
    if let Some(session) = &message.session_id {
        broker_properties["SessionId"] = json!(session);
    }
    let mut response = (StatusCode::CREATED, message.body.clone()).into_response();
    let out = response.headers_mut();
    out.insert("content-type", message.content_type.parse().unwrap());
    out.insert(
        "brokerproperties",
        broker_properties.to_string().parse().unwrap(),
    );
    out.insert(
        "location",
        format!(
            "http://{host}/{entity}/messages/{}/{lock}",
            message.message_id
        )
        .parse()
        .unwrap(),
    );
    // Received properties come back as headers, strings in quotes.
    for (name, value) in &message.properties {
        out.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.to_string().parse().unwrap(),
        );
    }
    response
}

fn settle(fake: &FakeServiceBus, entity: &str, lock: &str, delete: bool) -> Response {
    let mut broker = fake.broker.lock().unwrap();
    let Some(messages) = broker.entities.get_mut(entity) else {
        return (StatusCode::GONE, "no such entity").into_response();
    };
    let Some(index) = messages
        .iter()
        .position(|m| m.lock.as_deref() == Some(lock))
    else {
        return (
            StatusCode::NOT_FOUND,
            "the lock is lost or the message gone",
        )
            .into_response();
    };
    if delete {
        messages.remove(index);
        return StatusCode::OK.into_response();
    }
    messages[index].lock = None;
    // An unlock is an abandoned delivery: past maxDeliveryCount the broker dead-letters.
    if max_delivery_count(entity).is_some_and(|max| messages[index].delivery_count >= max) {
        let mut message = messages.remove(index);
        // The broker's stamp replaces properties of those names, however a sender cased them.
        message.properties.retain(|name, _| {
            !name.eq_ignore_ascii_case("DeadLetterReason")
                && !name.eq_ignore_ascii_case("DeadLetterErrorDescription")
        });
        message
            .properties
            .insert("DeadLetterReason".into(), json!("MaxDeliveryCountExceeded"));
        message.properties.insert(
            "DeadLetterErrorDescription".into(),
            json!("Message could not be consumed after 10 delivery attempts."),
        );
        broker.enqueue(&format!("{entity}/$DeadLetterQueue"), message);
    }
    StatusCode::OK.into_response()
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
    /// Answers given, in turn, to the next posts instead of accepting them.
    pub busy: Arc<Mutex<Vec<BusyAnswer>>>,
}

/// A status, and the `Retry-After` seconds it says, if any.
pub type BusyAnswer = (u16, Option<u64>);

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
    let busy = {
        let mut busy = fake.busy.lock().unwrap();
        (!busy.is_empty()).then(|| busy.remove(0))
    };
    if let Some((status, retry_after)) = busy {
        let mut answer = (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({"error": {"code": "ServerBusy", "message": "try again later"}})),
        )
            .into_response();
        if let Some(seconds) = retry_after {
            answer
                .headers_mut()
                .insert("retry-after", seconds.to_string().parse().unwrap());
        }
        return answer;
    }
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
    /// Secrets deleted with soft delete on: their names are taken until recovered or purged.
    pub deleted: Arc<Mutex<HashMap<String, String>>>,
    /// Secrets being recovered, and how many more writes the vault refuses meanwhile.
    pub recovering: Arc<Mutex<HashMap<String, u32>>>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl FakeKeyVault {
    pub async fn start() -> Self {
        let mut fake = Self::default();
        let router = Router::new()
            .route("/secrets/{name}", get(kv_get).put(kv_put))
            .route("/secrets/{name}/", get(kv_get))
            .route("/deletedsecrets/{name}", get(kv_get_deleted))
            .route("/deletedsecrets/{name}/recover", post(kv_recover))
            .with_state(fake.clone());
        fake.addr = serve(router).await;
        fake
    }

    /// Deletes a secret as a vault with soft delete does.
    pub fn delete(&self, name: &str) {
        let value = self.secrets.lock().unwrap().remove(name).unwrap();
        self.deleted.lock().unwrap().insert(name.to_string(), value);
    }
}

fn kv_conflict(inner: &str, message: String) -> Response {
    (
        StatusCode::CONFLICT,
        Json(json!({"error": {"code": "Conflict", "message": message,
                              "innererror": {"code": inner}}})),
    )
        .into_response()
}

async fn kv_get_deleted(
    State(fake): State<FakeKeyVault>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.requests
        .lock()
        .unwrap()
        .push(format!("GET deleted {name}"));
    if let Some(answer) = challenge(&headers) {
        return answer;
    }
    if fake.deleted.lock().unwrap().contains_key(&name) {
        Json(json!({"id": format!("https://kv-sync-dev.vault.azure.net/secrets/{name}/0001"),
                    "recoveryId": format!("https://kv-sync-dev.vault.azure.net/deletedsecrets/{name}"),
                    "attributes": {"enabled": true, "recoveryLevel": "Recoverable+Purgeable"}}))
        .into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "SecretNotFound", "message": format!("Deleted Secret not found: {name}")}})),
        )
            .into_response()
    }
}

async fn kv_recover(
    State(fake): State<FakeKeyVault>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    fake.requests
        .lock()
        .unwrap()
        .push(format!("POST recover {name}"));
    if let Some(answer) = challenge(&headers) {
        return answer;
    }
    let Some(value) = fake.deleted.lock().unwrap().remove(&name) else {
        return (StatusCode::NOT_FOUND, "no such deleted secret").into_response();
    };
    fake.secrets.lock().unwrap().insert(name.clone(), value);
    // The vault takes a moment to bring it back.
    fake.recovering.lock().unwrap().insert(name.clone(), 1);
    Json(
        json!({"id": format!("https://kv-sync-dev.vault.azure.net/secrets/{name}/0001"),
                "attributes": {"enabled": true}}),
    )
    .into_response()
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
    if fake.deleted.lock().unwrap().contains_key(&name) {
        return kv_conflict(
            "ObjectIsDeletedButRecoverable",
            format!(
                "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged."
            ),
        );
    }
    if let Some(left) = fake.recovering.lock().unwrap().get_mut(&name)
        && *left > 0
    {
        *left -= 1;
        return kv_conflict(
            "ObjectIsBeingRecovered",
            format!("Secret {name} is currently being recovered; try again later."),
        );
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
