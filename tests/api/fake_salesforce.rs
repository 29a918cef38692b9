//! A Salesforce REST API on loopback, reproducing the wire facts the adapter depends on: the
//! OAuth refresh (no `expires_in`, optional refresh-token rotation that invalidates the old
//! token, `invalid_grant`), SOQL with `nextRecordsUrl` paging and `Sforce-Query-Options`
//! batch sizes, `SystemModstamp` timestamps in `+0000` form, `getDeleted` with its
//! `earliestDateAvailable` window (nothing deleted before it is listed) and whole minutes,
//! `Sforce-Limit-Info`, 401 `INVALID_SESSION_ID` when a token expires and 403
//! `REQUEST_LIMIT_EXCEEDED` when the allocation runs out, errors as arrays.
//! `WHERE Id IN (...)` reads notified records back. `queryAll` answers ids with `IsDeleted`,
//! the recycle bin's records and archived ones included, which `/query` leaves out; a record
//! purged from the recycle bin is in neither. `describe` gives an object's key prefix and
//! fields, and `UserPermissionAccess` whether the integration user has View All Data. Knobs
//! let a test expire the token, answer a token request with a proxy's page, lock records
//! against writes, exhaust the allocation, fail a share of requests, hold a page,
//! a getDeleted or a queryAll mid-sync, take `queryAll` down, archive records, refuse
//! `describe`, or describe objects without a key prefix or a recycle bin.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;

pub const CLIENT_ID: &str = "3MVG9-fake-client";
pub const ORG_ID: &str = "00D000000000062EAA";

/// A query's result and how far the client has read it.
type Cursor = (Arc<QueryResult>, usize);

/// The rows a query found, in order, as they were when it ran (a query locator's result is a
/// snapshot; a record written since is a new `Arc`), and the fields it selected.
struct QueryResult {
    entity: String,
    fields: Vec<String>,
    rows: Vec<Arc<Map<String, Value>>>,
}

#[derive(Default)]
pub struct Org {
    /// Records per entity, each with `Id` and `SystemModstamp`.
    pub records: BTreeMap<String, Vec<Arc<Map<String, Value>>>>,
    pub deleted: Vec<(String, String, DateTime<Utc>)>,
    /// Ids of archived records (old activities): `/query` leaves them out, `queryAll` answers
    /// them.
    pub archived: HashSet<String>,
    /// `describe` answers 400 INVALID_TYPE (an object the API will not describe).
    pub refuse_describe: bool,
    /// Objects are described with no `keyPrefix` (as some system objects are).
    pub no_key_prefix: bool,
    /// Objects have no `IsDeleted` field and no recycle bin: a deleted record is gone at once,
    /// and a query that selects `IsDeleted` is refused (400 INVALID_FIELD).
    pub no_recycle_bin: bool,
    /// Every `queryAll` answers 503 (a part of the API down).
    pub query_all_down: bool,
    pub earliest_deleted_available: Option<DateTime<Utc>>,
    /// The most deletions `getDeleted` lists at once (Salesforce's is 600,000); over it, 400
    /// EXCEEDED_ID_LIMIT.
    pub deleted_ids_limit: Option<usize>,
    /// Refresh tokens that work; with rotation, a refresh replaces the one used.
    pub refresh_tokens: HashSet<String>,
    pub rotate_refresh_tokens: bool,
    /// The next N token requests are answered 200 with a proxy's HTML page, and go no further.
    pub token_proxy_pages: usize,
    pub access_tokens: HashSet<String>,
    /// The current access token stops working after this many more data requests.
    pub expire_token_after: Option<usize>,
    /// Data requests answer 403 REQUEST_LIMIT_EXCEEDED after this many more.
    pub limit_exceeded_after: Option<usize>,
    /// The next N data requests answer 403 REQUEST_LIMIT_EXCEEDED for the org's concurrent
    /// long-running requests (other apps' reports), which frees within seconds.
    pub concurrent_limit_next: usize,
    pub api_usage: (u64, u64),
    /// Every data request answers this status (a Salesforce outage).
    pub outage: Option<StatusCode>,
    /// Every Nth data request answers 503 (a flaky Salesforce).
    pub fail_every: Option<usize>,
    /// The next N data requests answer 503.
    pub fail_next: usize,
    /// A request for this query locator waits until the test releases it.
    pub hold_locator: Option<String>,
    /// The next getDeleted waits until the test releases it.
    pub hold_next_deleted: bool,
    /// The next queryAll waits until the test releases it.
    pub hold_next_query_all: bool,
    /// The next write is made, then its answer waits until the test releases it (for a
    /// crash between the provider's write and the handler's acknowledgement).
    pub hold_next_write: bool,
    /// The next N writes find their record locked by another transaction (400
    /// UNABLE_TO_LOCK_ROW) and change nothing.
    pub locked_writes: usize,
    /// An active duplicate rule: a create or update giving this field a value another record
    /// of the object has is answered 400 DUPLICATES_DETECTED, unless the rule only alerts
    /// (`blocks` false) and the request's `Sforce-Duplicate-Rule-Header` says `allowSave=true`.
    pub duplicate_rule: Option<DuplicateRule>,
    /// Every data request's path and query, in order.
    pub requests: Vec<String>,
    pub token_refreshes: usize,
    cursors: BTreeMap<String, Cursor>,
    next_cursor: usize,
    issued: usize,
}

pub struct DuplicateRule {
    pub field: String,
    pub blocks: bool,
}

/// The answer an active duplicate rule gives a write of `fields` to the record `id` (none
/// for a create) of `entity`, if it stops it.
fn duplicate_refusal(
    org: &Org,
    entity: &str,
    id: Option<&Value>,
    fields: &Map<String, Value>,
    headers: &HeaderMap,
) -> Option<Response> {
    let rule = org.duplicate_rule.as_ref()?;
    let rows = org.records.get(entity);
    // The rule reads the record as the write leaves it.
    let kept = || {
        rows?
            .iter()
            .find(|r| Some(&r["Id"]) == id)?
            .get(&rule.field)
    };
    let value = fields
        .get(&rule.field)
        .or_else(kept)
        .filter(|v| !v.is_null())?;
    let duplicated = rows.is_some_and(|rows| {
        rows.iter()
            .any(|r| Some(&r["Id"]) != id && r.get(&rule.field) == Some(value))
    });
    let allow_save = headers
        .get("sforce-duplicate-rule-header")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').any(|part| part.trim() == "allowSave=true"));
    if !duplicated || (!rule.blocks && allow_save) {
        return None;
    }
    let message = if rule.blocks {
        "You're creating a duplicate record. We recommend you use an existing record instead."
    } else {
        "Use one of these records?"
    };
    Some(sf_error(
        StatusCode::BAD_REQUEST,
        "DUPLICATES_DETECTED",
        message,
    ))
}

#[derive(Clone)]
pub struct FakeSalesforce {
    pub url: String,
    pub org: Arc<Mutex<Org>>,
    pub held: Arc<Notify>,
    pub release: Arc<Notify>,
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string()
}

fn sf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code}])),
    )
        .into_response()
}

impl FakeSalesforce {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let org = Arc::new(Mutex::new(Org {
            api_usage: (1000, 100_000),
            ..Org::default()
        }));
        org.lock()
            .unwrap()
            .refresh_tokens
            .insert("rt-initial".into());
        // The integration user's permissions, as `UserPermissionAccess` answers them.
        org.lock().unwrap().records.insert(
            "UserPermissionAccess".into(),
            vec![Arc::new(
                json!({"Id": "0XA000000000001AAA", "PermissionsViewAllData": false,
                       "SystemModstamp": timestamp(Utc::now())})
                .as_object()
                .unwrap()
                .clone(),
            )],
        );
        let fake = Self {
            url,
            org,
            held: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        };
        let router = Router::new()
            .route("/services/oauth2/token", post(token))
            .route("/services/data/v62.0/query", get(query))
            .route("/services/data/v62.0/query/{locator}", get(query_more))
            .route("/services/data/v62.0/queryAll", get(query_all))
            .route(
                "/services/data/v62.0/sobjects/{entity}/describe",
                get(describe),
            )
            .route(
                "/services/data/v62.0/sobjects/{entity}/deleted/",
                get(deleted),
            )
            .route(
                "/services/data/v62.0/sobjects/{entity}/{id}",
                patch(update).delete(delete_record),
            )
            .route(
                "/services/data/v62.0/sobjects/{entity}/{field}/{key}",
                patch(upsert).get(record_by_key),
            )
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for this org.
    pub fn credentials(&self) -> Value {
        json!({"refresh_token": "rt-initial", "client_id": CLIENT_ID, "client_secret": "s3cr3t-client"})
    }

    pub fn add(&self, entity: &str, fields: Value, modified: DateTime<Utc>) {
        let mut record = fields.as_object().unwrap().clone();
        record.insert("SystemModstamp".into(), json!(timestamp(modified)));
        let mut org = self.org.lock().unwrap();
        let records = org.records.entry(entity.to_string()).or_default();
        records.retain(|r| r["Id"] != record["Id"]);
        records.push(Arc::new(record));
    }

    /// Adds many new records at once (no check for ids already there).
    pub fn load(&self, entity: &str, records: impl IntoIterator<Item = (Value, DateTime<Utc>)>) {
        let mut org = self.org.lock().unwrap();
        let rows = org.records.entry(entity.to_string()).or_default();
        for (fields, modified) in records {
            let mut record = fields.as_object().unwrap().clone();
            record.insert("SystemModstamp".into(), json!(timestamp(modified)));
            rows.push(Arc::new(record));
        }
    }

    pub fn delete(&self, entity: &str, id: &str, at: DateTime<Utc>) {
        let mut org = self.org.lock().unwrap();
        if let Some(records) = org.records.get_mut(entity) {
            records.retain(|r| r["Id"] != id);
        }
        org.deleted.push((entity.to_string(), id.to_string(), at));
    }

    /// Gives the integration user `View All Data`: every record of the org in its sight.
    pub fn grant_view_all_data(&self) {
        let mut org = self.org.lock().unwrap();
        let access = &mut org.records.get_mut("UserPermissionAccess").unwrap()[0];
        Arc::make_mut(access).insert("PermissionsViewAllData".into(), json!(true));
    }

    pub fn requests(&self) -> Vec<String> {
        self.org.lock().unwrap().requests.clone()
    }
}

/// Checks the bearer token and the limits; `Err` is the answer to send instead.
fn admit(fake: &FakeSalesforce, headers: &HeaderMap, what: String) -> Result<(), Box<Response>> {
    let mut org = fake.org.lock().unwrap();
    org.requests.push(what);
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    if let Some(n) = org.expire_token_after {
        if n == 0 {
            org.access_tokens.clear();
            org.expire_token_after = None;
        } else {
            org.expire_token_after = Some(n - 1);
        }
    }
    if !org.access_tokens.contains(&token) {
        return Err(Box::new(sf_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        )));
    }
    let flaky = org
        .fail_every
        .is_some_and(|n| org.requests.len().is_multiple_of(n));
    if flaky || org.fail_next > 0 {
        org.fail_next = org.fail_next.saturating_sub(1);
        return Err(Box::new(sf_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Service temporarily unavailable",
        )));
    }
    if let Some(status) = org.outage {
        return Err(Box::new(sf_error(
            status,
            "SERVER_UNAVAILABLE",
            "Service temporarily unavailable",
        )));
    }
    if org.concurrent_limit_next > 0 {
        org.concurrent_limit_next -= 1;
        return Err(Box::new(sf_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "ConcurrentRequests (Concurrent API Requests) Limit exceeded.",
        )));
    }
    if let Some(n) = org.limit_exceeded_after {
        if n == 0 {
            return Err(Box::new(sf_error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            )));
        }
        org.limit_exceeded_after = Some(n - 1);
    }
    org.api_usage.0 += 1;
    Ok(())
}

fn with_usage(fake: &FakeSalesforce, body: Value) -> Response {
    let (used, allowed) = fake.org.lock().unwrap().api_usage;
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        "Sforce-Limit-Info",
        format!("api-usage={used}/{allowed}").parse().unwrap(),
    );
    response
}

async fn token(
    State(fake): State<FakeSalesforce>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let mut org = fake.org.lock().unwrap();
    if org.token_proxy_pages > 0 {
        org.token_proxy_pages -= 1;
        let page = "<html><body>Service is down for maintenance</body></html>";
        return ([("content-type", "text/html")], page).into_response();
    }
    let refresh = form.get("refresh_token").cloned().unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"}))).into_response();
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_client_id", "error_description": "client identifier invalid"}))).into_response();
    }
    if !org.refresh_tokens.contains(&refresh) {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": "expired access/refresh token"}))).into_response();
    }
    org.token_refreshes += 1;
    org.issued += 1;
    let access = format!("00D!AQ-access-{}", org.issued);
    org.access_tokens.insert(access.clone());
    let mut body = json!({
        "access_token": access, "signature": "sig=", "scope": "refresh_token api id",
        "instance_url": fake.url, "id": format!("https://login.salesforce.com/id/{ORG_ID}/005000000000001"),
        "token_type": "Bearer", "issued_at": Utc::now().timestamp_millis().to_string()
    });
    if org.rotate_refresh_tokens {
        org.refresh_tokens.remove(&refresh);
        let rotated = format!("rt-rotated-{}", org.issued);
        org.refresh_tokens.insert(rotated.clone());
        body["refresh_token"] = json!(rotated);
    }
    Json(body).into_response()
}

fn batch_size(headers: &HeaderMap) -> usize {
    headers
        .get("sforce-query-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("batchSize="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Serves the next batch of a query cursor.
fn page(fake: &FakeSalesforce, locator: &str, size: usize) -> Response {
    let mut org = fake.org.lock().unwrap();
    let Some((result, at)) = org.cursors.get(locator).cloned() else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        );
    };
    let end = (at + size).min(result.rows.len());
    let done = end >= result.rows.len();
    let next_records_url = (!done).then(|| {
        let next = format!("{}-{}", locator.split('-').next().unwrap(), end);
        org.cursors.insert(next.clone(), (result.clone(), end));
        format!("/services/data/v62.0/query/{next}")
    });
    drop(org);
    let mut body =
        serde_json::to_vec(&json!({"totalSize": result.rows.len(), "done": done})).unwrap();
    body.pop();
    if let Some(url) = next_records_url {
        body.extend_from_slice(br#","nextRecordsUrl":"#);
        serde_json::to_writer(&mut body, &url).unwrap();
    }
    body.extend_from_slice(br#","records":["#);
    // A row as Salesforce answers it: its `attributes`, then the selected fields in the order
    // of the SELECT, each spelt as the object spells it whatever the SELECT's case, null where
    // the record has no value.
    let entity = &result.entity;
    for (i, row) in result.rows[at..end].iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        let id = row.get("Id").and_then(Value::as_str).unwrap_or_default();
        body.extend_from_slice(
            format!(
                r#"{{"attributes":{{"type":"{entity}","url":"/services/data/v62.0/sobjects/{entity}/{id}"}}"#
            )
            .as_bytes(),
        );
        for field in &result.fields {
            let (name, value) = row
                .get_key_value(field.as_str())
                .or_else(|| row.iter().find(|(k, _)| k.eq_ignore_ascii_case(field)))
                .unwrap_or((field, &Value::Null));
            body.push(b',');
            serde_json::to_writer(&mut body, name).unwrap();
            body.push(b':');
            serde_json::to_writer(&mut body, value).unwrap();
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    let mut response = ([("content-type", "application/json")], body).into_response();
    let (used, allowed) = fake.org.lock().unwrap().api_usage;
    response.headers_mut().insert(
        "Sforce-Limit-Info",
        format!("api-usage={used}/{allowed}").parse().unwrap(),
    );
    response
}

async fn query(
    State(fake): State<FakeSalesforce>,
    headers: HeaderMap,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let soql = params.get("q").cloned().unwrap_or_default();
    if let Err(answer) = admit(&fake, &headers, format!("query {soql}")) {
        return *answer;
    }
    let Some((select, rest)) = soql
        .strip_prefix("SELECT ")
        .and_then(|s| s.split_once(" FROM "))
    else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "unexpected token",
        );
    };
    let entity = rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    // `timestamp` writes every `SystemModstamp` in one fixed-width UTC form, so the text
    // sorts as the time does: the rows are ordered and filtered without parsing each one.
    let since = rest.split_once("SystemModstamp >= ").map(|(_, t)| {
        let token = t.split_whitespace().next().unwrap();
        timestamp(
            DateTime::parse_from_rfc3339(token)
                .unwrap()
                .with_timezone(&Utc),
        )
    });
    // `Id IN ('001…', '001…')`: what a notified record is read back with.
    let wanted: Option<Vec<String>> = rest.split_once("Id IN (").map(|(_, list)| {
        list.split(')')
            .next()
            .unwrap()
            .split(", ")
            .map(|id| id.trim_matches('\'').to_string())
            .collect()
    });
    let fields: Vec<&str> = select.split(", ").collect();
    let mut org = fake.org.lock().unwrap();
    // Object names are matched without regard to case, as Salesforce matches them.
    let entity = org
        .records
        .keys()
        .find(|name| name.eq_ignore_ascii_case(&entity))
        .cloned()
        .unwrap_or(entity);
    let text = |r: &Map<String, Value>, field: &str| -> String {
        r.get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut rows: Vec<&Arc<Map<String, Value>>> = org
        .records
        .get(&entity)
        .into_iter()
        .flatten()
        .filter(|r| {
            since
                .as_deref()
                .is_none_or(|s| text(r, "SystemModstamp").as_str() >= s)
        })
        .filter(|r| {
            wanted
                .as_ref()
                .is_none_or(|ids| ids.iter().any(|id| r["Id"] == id.as_str()))
        })
        .filter(|r| !org.archived.contains(&text(r, "Id")))
        .collect();
    fn order(r: &Map<String, Value>) -> (Option<&str>, Option<&str>) {
        (
            r.get("SystemModstamp").and_then(Value::as_str),
            r.get("Id").and_then(Value::as_str),
        )
    }
    rows.sort_by_cached_key(|r| order(r));
    let result = QueryResult {
        entity,
        fields: fields.iter().map(|f| f.to_string()).collect(),
        rows: rows.into_iter().cloned().collect(),
    };
    org.next_cursor += 1;
    let locator = format!("01gRO00000{:06}", org.next_cursor);
    org.cursors.insert(locator.clone(), (Arc::new(result), 0));
    drop(org);
    page(&fake, &locator, batch_size(&headers))
}

/// The key prefix every id of a standard object begins with.
const KEY_PREFIXES: [(&str, &str); 6] = [
    ("Account", "001"),
    ("Contact", "003"),
    ("Opportunity", "006"),
    ("Lead", "00Q"),
    ("Task", "00T"),
    ("Event", "00U"),
];

/// An object's description; of its many properties, its name and `keyPrefix`.
async fn describe(
    State(fake): State<FakeSalesforce>,
    headers: HeaderMap,
    Path(entity): Path<String>,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("describe {entity}")) {
        return *answer;
    }
    if fake.org.lock().unwrap().refuse_describe {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_TYPE",
            "sObject type is not supported",
        );
    }
    let Some((_, prefix)) = KEY_PREFIXES.iter().find(|(name, _)| *name == entity) else {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        );
    };
    let org = fake.org.lock().unwrap();
    // The object's usual fields and any its records hold, each saying whether a write may
    // set it.
    let mut names: Vec<String> = [
        "Id",
        "SystemModstamp",
        "Name",
        "FirstName",
        "LastName",
        "Email",
    ]
    .iter()
    .map(|n| n.to_string())
    .chain(
        org.records
            .get(&entity)
            .into_iter()
            .flatten()
            .flat_map(|r| r.keys().cloned()),
    )
    .collect();
    if !org.no_recycle_bin {
        names.push("IsDeleted".into());
    }
    names.sort();
    names.dedup();
    let fields: Vec<Value> = names
        .iter()
        .map(|name| {
            let writable = !read_only(&entity, name);
            json!({"name": name, "createable": writable, "updateable": writable})
        })
        .collect();
    let prefix = (!org.no_key_prefix).then_some(prefix);
    Json(json!({"name": entity, "keyPrefix": prefix, "queryable": true, "fields": fields}))
        .into_response()
}

/// `queryAll` of `SELECT Id, IsDeleted FROM <entity> WHERE Id IN (...)` (or `SELECT Id`), in
/// one batch: the live records (archived ones too), and those in the recycle bin with
/// `IsDeleted` true.
async fn query_all(
    State(fake): State<FakeSalesforce>,
    headers: HeaderMap,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let soql = params.get("q").cloned().unwrap_or_default();
    if let Err(answer) = admit(&fake, &headers, format!("queryAll {soql}")) {
        return *answer;
    }
    if fake.org.lock().unwrap().query_all_down {
        return sf_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Service temporarily unavailable",
        );
    }
    if std::mem::take(&mut fake.org.lock().unwrap().hold_next_query_all) {
        let released = fake.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        fake.held.notify_one();
        released.await;
    }
    let parsed = soql
        .strip_prefix("SELECT Id, IsDeleted FROM ")
        .or_else(|| soql.strip_prefix("SELECT Id FROM "))
        .and_then(|rest| rest.split_once(" WHERE Id IN ("))
        .and_then(|(entity, list)| Some((entity, list.strip_suffix(')')?)));
    let Some((entity, list)) = parsed else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "unexpected token",
        );
    };
    let org = fake.org.lock().unwrap();
    if org.no_recycle_bin && soql.contains("IsDeleted") {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "No such column 'IsDeleted' on entity",
        );
    }
    let records: Vec<Value> = list
        .split(", ")
        .map(|id| id.trim_matches('\''))
        .filter_map(|id| {
            let live = org
                .records
                .get(entity)
                .is_some_and(|rows| rows.iter().any(|r| r["Id"] == id));
            let binned = !org.no_recycle_bin
                && org.deleted.iter().any(|(e, d, _)| e == entity && d == id);
            (live || binned).then(|| {
                json!({"attributes": {"type": entity, "url": format!("/services/data/v62.0/sobjects/{entity}/{id}")},
                       "Id": id, "IsDeleted": !live})
            })
        })
        .collect();
    drop(org);
    with_usage(
        &fake,
        json!({"totalSize": records.len(), "done": true, "records": records}),
    )
}

async fn query_more(
    State(fake): State<FakeSalesforce>,
    headers: HeaderMap,
    Path(locator): Path<String>,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("more {locator}")) {
        return *answer;
    }
    let hold = fake.org.lock().unwrap().hold_locator.as_deref() == Some(locator.as_str());
    if hold {
        // Waiting for the release before saying it is held: a release sent as soon as the
        // test hears of it is not missed.
        let released = fake.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        fake.held.notify_one();
        released.await;
    }
    page(&fake, &locator, batch_size(&headers))
}

async fn deleted(
    State(fake): State<FakeSalesforce>,
    headers: HeaderMap,
    Path(entity): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("deleted {entity}")) {
        return *answer;
    }
    if std::mem::take(&mut fake.org.lock().unwrap().hold_next_deleted) {
        let released = fake.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        fake.held.notify_one();
        released.await;
    }
    let parse = |name: &str| {
        params
            .get(name)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    // Salesforce reads whole minutes: the seconds of both ends are ignored, and what it
    // covered ends at the last whole minute.
    let minute = |t: DateTime<Utc>| DateTime::from_timestamp(t.timestamp() / 60 * 60, 0).unwrap();
    let (Some(start), Some(end)) = (parse("start").map(minute), parse("end").map(minute)) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_REPLICATION_DATE",
            "start and end are required",
        );
    };
    let org = fake.org.lock().unwrap();
    let earliest = org
        .earliest_deleted_available
        .unwrap_or(end - Duration::days(15));
    let records: Vec<Value> = org
        .deleted
        .iter()
        .filter(|(e, _, at)| *e == entity && *at >= start.max(earliest) && *at <= end)
        .map(|(_, id, at)| json!({"id": id, "deletedDate": timestamp(*at)}))
        .collect();
    if records.len() > org.deleted_ids_limit.unwrap_or(600_000) {
        drop(org);
        return sf_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "too many ids for getDeleted; narrow the date range",
        );
    }
    let body = json!({"deletedRecords": records, "earliestDateAvailable": timestamp(earliest),
                      "latestDateCovered": timestamp(end)});
    drop(org);
    with_usage(&fake, body)
}

impl FakeSalesforce {
    /// The record of `entity` with `id`, if the org has it.
    pub fn record(&self, entity: &str, id: &str) -> Option<Map<String, Value>> {
        self.org
            .lock()
            .unwrap()
            .records
            .get(entity)?
            .iter()
            .find(|r| r["Id"] == id)
            .map(|r| Map::clone(r))
    }

    /// Every record of `entity`.
    pub fn records(&self, entity: &str) -> Vec<Map<String, Value>> {
        self.org
            .lock()
            .unwrap()
            .records
            .get(entity)
            .into_iter()
            .flatten()
            .map(|r| Map::clone(r))
            .collect()
    }
}

/// Applies `write` to the org, then answers, first waiting for the test when it holds writes.
async fn written(fake: &FakeSalesforce, write: impl FnOnce(&mut Org) -> Response) -> Response {
    let (answer, hold) = {
        let mut org = fake.org.lock().unwrap();
        if org.locked_writes > 0 {
            org.locked_writes -= 1;
            return sf_error(
                StatusCode::BAD_REQUEST,
                "UNABLE_TO_LOCK_ROW",
                "unable to obtain exclusive access to this record or 1 records",
            );
        }
        let answer = write(&mut org);
        (answer, std::mem::take(&mut org.hold_next_write))
    };
    if hold {
        let released = fake.release.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        fake.held.notify_one();
        released.await;
    }
    answer
}

/// An id in the entity's key prefix (`001` for Account, `003` for Contact), 18 characters.
fn new_id(org: &Org, entity: &str) -> String {
    let prefix = match entity {
        "Account" => "001",
        "Contact" => "003",
        "Opportunity" => "006",
        _ => "a00",
    };
    let n: usize = org.records.values().map(Vec::len).sum::<usize>() + org.deleted.len() + 1;
    let fifteen = format!("{prefix}{n:012}");
    let suffix: String = fifteen
        .as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk
                .iter()
                .enumerate()
                .filter(|(_, c)| c.is_ascii_uppercase())
                .fold(0, |acc, (i, _)| acc | (1 << i));
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits] as char
        })
        .collect();
    format!("{fifteen}{suffix}")
}

/// Fields no write may set: the system's, and compound fields (a contact's or a lead's `Name`
/// is its `FirstName` and `LastName`; an address, its street, city and the rest).
fn read_only(entity: &str, field: &str) -> bool {
    [
        "Id",
        "SystemModstamp",
        "IsDeleted",
        "CreatedDate",
        "LastModifiedDate",
    ]
    .contains(&field)
        || matches!(
            (entity, field),
            ("Contact" | "Lead", "Name")
                | (_, "BillingAddress" | "ShippingAddress" | "MailingAddress")
        )
}

fn fields_of(entity: &str, body: &Value) -> Result<Map<String, Value>, Box<Response>> {
    let fields = body.as_object().cloned().ok_or_else(|| {
        Box::new(sf_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "the body is not an object",
        ))
    })?;
    if let Some(name) = fields.keys().find(|k| read_only(entity, k)) {
        return Err(Box::new(sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD_FOR_INSERT_UPDATE",
            &format!("Unable to create/update fields: {name}."),
        )));
    }
    Ok(fields)
}

/// The written values as Salesforce keeps them, and reads them back: a number as a double
/// (`5000` reads `5000.0`), a date-time in its own form (`2026-02-01T09:00:00Z` reads
/// `2026-02-01T09:00:00.000+0000`).
fn as_kept(fields: Map<String, Value>) -> Map<String, Value> {
    fields
        .into_iter()
        .map(|(name, value)| {
            let kept = match &value {
                Value::Number(n) => n.as_f64().map_or(value.clone(), |f| json!(f)),
                Value::String(text) => DateTime::parse_from_rfc3339(text)
                    .map_or(value.clone(), |t| json!(timestamp(t.with_timezone(&Utc)))),
                _ => value,
            };
            (name, kept)
        })
        .collect()
}

/// `PATCH /sobjects/{entity}/{externalIdField}/{key}`: an upsert by External ID. 201 with the
/// new id when it creates, 200 when a record already has the key.
/// A record by an External ID field's value, as `GET /sobjects/{entity}/{field}/{key}` reads
/// it; 404 NOT_FOUND when no record has it.
async fn record_by_key(
    State(fake): State<FakeSalesforce>,
    Path((entity, field, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("GET {entity}/{field}/{key}")) {
        return *answer;
    }
    let org = fake.org.lock().unwrap();
    let found = org
        .records
        .get(&entity)
        .and_then(|rows| rows.iter().find(|r| r.get(&field) == Some(&json!(key))))
        .map(|r| Value::Object(Map::clone(r)));
    drop(org);
    match found {
        Some(record) => with_usage(&fake, record),
        None => sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

async fn upsert(
    State(fake): State<FakeSalesforce>,
    Path((entity, field, key)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("PATCH {entity}/{field}/{key}")) {
        return *answer;
    }
    let fields = match fields_of(&entity, &body) {
        Ok(f) => as_kept(f),
        Err(answer) => return *answer,
    };
    written(&fake, |org| {
        let now = timestamp(Utc::now());
        let id = org.records.get(&entity).and_then(|rows| {
            rows.iter()
                .find(|r| r.get(&field) == Some(&json!(key)))
                .map(|r| r["Id"].clone())
        });
        if let Some(refused) = duplicate_refusal(org, &entity, id.as_ref(), &fields, &headers) {
            return refused;
        }
        let existing = org
            .records
            .get_mut(&entity)
            .and_then(|rows| rows.iter_mut().find(|r| r.get(&field) == Some(&json!(key))));
        if let Some(row) = existing {
            let row = Arc::make_mut(row);
            row.extend(fields);
            row.insert("SystemModstamp".into(), json!(now));
            let id = row["Id"].clone();
            return Json(json!({"id": id, "success": true, "errors": [], "created": false}))
                .into_response();
        }
        let id = new_id(org, &entity);
        let mut row = fields;
        row.insert("Id".into(), json!(id));
        row.insert(field.clone(), json!(key));
        row.insert("SystemModstamp".into(), json!(now));
        org.records
            .entry(entity.clone())
            .or_default()
            .push(Arc::new(row));
        (
            StatusCode::CREATED,
            Json(json!({"id": id, "success": true, "errors": [], "created": true})),
        )
            .into_response()
    })
    .await
}

/// `PATCH /sobjects/{entity}/{id}`: 204, 404 for a missing record, 412 under
/// `If-Unmodified-Since` when the record changed after that time.
async fn update(
    State(fake): State<FakeSalesforce>,
    Path((entity, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("PATCH {entity}/{id}")) {
        return *answer;
    }
    let fields = match fields_of(&entity, &body) {
        Ok(f) => as_kept(f),
        Err(answer) => return *answer,
    };
    let unmodified_since = headers
        .get("if-unmodified-since")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| DateTime::parse_from_rfc2822(v).ok());
    written(&fake, |org| {
        if let Some(refused) = duplicate_refusal(org, &entity, Some(&json!(id)), &fields, &headers)
        {
            return refused;
        }
        let Some(row) = org
            .records
            .get_mut(&entity)
            .and_then(|rows| rows.iter_mut().find(|r| r["Id"] == id))
        else {
            return sf_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
        };
        let modified = row["SystemModstamp"]
            .as_str()
            .and_then(|t| DateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.3f%z").ok());
        // The header has whole seconds; a record modified within that second is not newer.
        if let (Some(since), Some(modified)) = (unmodified_since, modified)
            && modified.timestamp() > since.timestamp()
        {
            return sf_error(
                StatusCode::PRECONDITION_FAILED,
                "PRECONDITION_FAILED",
                "The entity has been modified since the specified date",
            );
        }
        let row = Arc::make_mut(row);
        row.extend(fields);
        row.insert("SystemModstamp".into(), json!(timestamp(Utc::now())));
        StatusCode::NO_CONTENT.into_response()
    })
    .await
}

/// `DELETE /sobjects/{entity}/{id}`: 204, or 404 `ENTITY_IS_DELETED` when it is gone already.
async fn delete_record(
    State(fake): State<FakeSalesforce>,
    Path((entity, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(answer) = admit(&fake, &headers, format!("DELETE {entity}/{id}")) {
        return *answer;
    }
    written(&fake, |org| {
        let rows = org.records.entry(entity.clone()).or_default();
        let before = rows.len();
        rows.retain(|r| r["Id"] != id);
        if rows.len() == before {
            return sf_error(
                StatusCode::NOT_FOUND,
                "ENTITY_IS_DELETED",
                "entity is deleted",
            );
        }
        org.deleted.push((entity.clone(), id.clone(), Utc::now()));
        StatusCode::NO_CONTENT.into_response()
    })
    .await
}
