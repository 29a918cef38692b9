//! Salesforce over its REST API.
//!
//! * Records come from SOQL (`/query`), `SystemModstamp >=` five minutes before the cursor for
//!   incremental syncs (records commit after others stamped later; not once a sync began that
//!   long after the cursor, [`FetchRequest::read_from`]), ordered by
//!   `SystemModstamp, Id`, paged by `nextRecordsUrl`. The cursor is the latest
//!   `SystemModstamp` synced, as `2026-01-01T10:00:00.000Z`.
//! * Deletions come from `/sobjects/{entity}/deleted/`, read from where the last read ended
//!   (its `latestDateCovered`), so an object nobody edits is still checked within the 15 days
//!   Salesforce remembers deletions; a full sync reads all 15. When the recycle bin no longer
//!   reaches back that far (`earliestDateAvailable` is later), the next sync lists the object
//!   whole and asks `queryAll` about the records the listing left out (`Pull::gone`).
//! * Tokens: the access token expires silently (the token response has no `expires_in`), so a
//!   401 `INVALID_SESSION_ID` refreshes it and retries the request once. The latest
//!   `instance_url` and, with rotation enabled, the new refresh token are kept.
//! * Limits: at most 25 requests per second per integration; every answer carries
//!   `Sforce-Limit-Info: api-usage=used/allowed`, and the job stops (partial, resumed next run)
//!   once usage reaches the integration's share of the daily allocation; a 403
//!   `REQUEST_LIMIT_EXCEEDED` stops it the same way. A write-back is refused before it reads
//!   or writes anything (and held for later) while the usage the integration's latest answer
//!   reported, in the last [`USAGE_KNOWN_FOR`], is at its share; an update's read of its
//!   record, or a delete's search for it, may say so too, and then writes nothing.
//! * Webhooks: Outbound Messages ([`outbound_messages`]), identified by OrganizationId.
//!
//! * Write-back: creates as upserts on an External ID field (the mapping's
//!   `idempotencyField`) keyed by the write's idempotency key, updates under
//!   `If-Unmodified-Since`, deletes ([`WriteBack`]). A field `describe` says a create or an
//!   update may not set (a contact's compound `Name`, a formula) would have the whole write
//!   refused: the engine leaves it out ([`WriteBack::read_only_fields`]).
//!
//! Connection settings (`structuredData.connection`): `loginHost` (`production`, `sandbox`, or
//! a My Domain URL), `apiVersion` (default `v62.0`), `organizationId`, `maxApiUsage` (share of
//! the daily allocation a sync or a write-back may use, default 0.8). Credentials: `refresh_token`,
//! `client_id`, optional `client_secret`, and the engine-kept `access_token` and `instance_url`.

pub mod outbound_messages;

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::OrGone;
use crate::http::{self, Retries};
use crate::oauth::{self, ClientAuth, Grant};
use crate::{
    Connection, Deleted, ErrorCode, FetchRequest, LeftOut, Page, Provider, ProviderError, Pull,
    RateLimiter, Record, RecordWrite, RouteKey, WebhookDelivery, WebhookError, WebhookRequest,
    WebhookRoute, Webhooks, WriteBack, Written,
};

const DEFAULT_API_VERSION: &str = "v62.0";

/// Writes go through duplicate rules that only alert, as a user who saw the alert in
/// Salesforce's own pages may save: the API's default refuses them (400
/// `DUPLICATES_DETECTED`), and Castiel's record would never reach the org. Rules that block
/// still block. (API v52.0 and later.)
fn duplicate_rules_alerting_only() -> (&'static str, String) {
    ("Sforce-Duplicate-Rule-Header", "allowSave=true".into())
}
const DEFAULT_MAX_API_USAGE: f64 = 0.8;
/// Salesforce keeps deletions for 15 days at most.
const DELETED_WINDOW_DAYS: i64 = 15;

/// How far before the cursor an incremental sync asks for records. `SystemModstamp` is set as
/// a save begins, and a record is seen once its transaction commits: a long transaction (a
/// trigger, a bulk load) commits records stamped before others a sync has already read. Read
/// again, a record that has not changed is skipped on its shard's fingerprint.
const RECORDS_LOOKBACK: chrono::Duration = chrono::Duration::minutes(5);

/// How far before the end of the last read the next read of deletions starts.
const DELETIONS_LOOKBACK: chrono::Duration = chrono::Duration::minutes(5);

pub struct Salesforce {
    limiter: RateLimiter,
    /// What `describe` said of an object, by integration, instance and object, and when: a
    /// listing's leftovers are asked about a page at a time, and write-backs one record at a
    /// time. An object's key prefix changes only if it is made again; which fields a write
    /// may set changes with an admin's edit, seen within the hour.
    described: std::sync::Mutex<std::collections::HashMap<DescribedKey, (Described, Instant)>>,
    /// The API usage (`used`, `allowed`) each integration's latest answer from its instance
    /// reported, and when: what a write-back, or a read of notified records, checks its share
    /// against ([`Salesforce::share_left`]).
    usage: std::sync::Mutex<std::collections::HashMap<(String, String), ReportedUsage>>,
}

/// The API usage an answer reported (`used`, `allowed`), and when it came.
type ReportedUsage = ((u64, u64), Instant);

/// Whose usage an answer reports: the integration's, at its instance (credentials stored again
/// for another org start afresh).
fn usage_key(conn: &Connection) -> (String, String) {
    (
        conn.integration_id.clone(),
        conn.credentials
            .get("instance_url")
            .unwrap_or_default()
            .to_string(),
    )
}

/// How long the usage an answer reported is taken as the usage of the moment, for write-backs.
/// Past it, a write is sent and its answer says again: while usage stays at the share, a write
/// gets through every so often rather than never, for no other answer would say it fell.
const USAGE_KNOWN_FOR: Duration = Duration::from_secs(15 * 60);

/// Whose description of which object: the integration, its instance and the object.
type DescribedKey = (String, String, String);

/// How long a description is taken as it was.
const DESCRIBED_FOR: Duration = Duration::from_secs(60 * 60);

/// What a listing's leftovers are checked with, and what a write may set, of an object's
/// description.
#[derive(Clone, serde::Deserialize)]
struct Described {
    /// What the object's ids begin with; none for some system objects.
    #[serde(rename = "keyPrefix")]
    key_prefix: Option<String>,
    #[serde(default)]
    fields: Vec<DescribedField>,
}

#[derive(Clone, serde::Deserialize)]
struct DescribedField {
    name: String,
    /// A create may set it.
    #[serde(default)]
    createable: bool,
    /// An update may set it.
    #[serde(default)]
    updateable: bool,
    /// Its type (`string`, `base64`, …).
    #[serde(default, rename = "type")]
    kind: String,
}

impl Described {
    /// Whether the object has `IsDeleted` (not every object has).
    fn has_is_deleted(&self) -> bool {
        self.fields.iter().any(|f| f.name == "IsDeleted")
    }
}

impl Default for Salesforce {
    fn default() -> Self {
        Self::new()
    }
}

impl Salesforce {
    pub fn new() -> Self {
        Self {
            limiter: RateLimiter::new(25),
            described: Default::default(),
            usage: Default::default(),
        }
    }

    fn login_host(conn: &Connection) -> String {
        match conn.setting("loginHost") {
            None | Some("production") => "https://login.salesforce.com".into(),
            Some("sandbox") => "https://test.salesforce.com".into(),
            Some(url) => url.trim_end_matches('/').to_string(),
        }
    }

    fn api_version(conn: &Connection) -> String {
        conn.setting("apiVersion")
            .unwrap_or(DEFAULT_API_VERSION)
            .to_string()
    }

    /// Refreshes the access token, once per integration at a time, storing the result (and a
    /// rotated refresh token) before it is used.
    async fn refresh(&self, conn: &mut Connection) -> Result<(), ProviderError> {
        let url = format!("{}/services/oauth2/token", Self::login_host(conn));
        let retry = conn.retry;
        let client = http::client();
        self.limiter.acquire(&conn.integration_id).await;
        // Salesforce's answer has no `expires_in`: the token expires silently, after the session
        // timeout the org sets. It names the instance to call from now on (`instance_url`).
        // Every Salesforce token is asked for alike: whoever refreshed, theirs serves.
        crate::credentials::refresh(
            conn,
            |_| true,
            |credentials| {
                let url = url.clone();
                async move {
                    let request = oauth::Exchange {
                        url: &url,
                        grant: Grant::RefreshToken,
                        extra: &[],
                        client_auth: ClientAuth::Form,
                    };
                    oauth::exchange(client, &request, credentials, retry).await
                }
            },
        )
        .await
    }

    /// Whether the integration's user sees every record of the org (`View All Data`), so that
    /// a record it cannot read does not exist. Asked of `UserPermissionAccess`, the current
    /// user's permissions; an org that will not say is taken for no.
    async fn sees_everything(&self, conn: &mut Connection) -> Result<bool, ProviderError> {
        let soql = "SELECT Id, PermissionsViewAllData FROM UserPermissionAccess".to_string();
        let asked = self.read_whole(conn, "query", soql).await;
        match asked {
            Ok((records, _)) => Ok(records
                .iter()
                .any(|r| r.fields.get("PermissionsViewAllData") == Some(&Value::Bool(true)))),
            Err(e) if e.is_retryable() || e.resume_next_run => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// What `describe` says of `entity`, asked once an hour per integration, instance and
    /// object.
    async fn describe(
        &self,
        conn: &mut Connection,
        entity: &str,
    ) -> Result<Described, ProviderError> {
        let key = |conn: &Connection| {
            let instance = conn.credentials.get("instance_url").unwrap_or_default();
            (
                conn.integration_id.clone(),
                instance.to_string(),
                entity.to_string(),
            )
        };
        let known = match self.described.lock() {
            Ok(known) => known
                .get(&key(conn))
                .filter(|(_, at)| at.elapsed() < DESCRIBED_FOR)
                .map(|(described, _)| described.clone()),
            Err(_) => None,
        };
        if let Some(described) = known {
            return Ok(described);
        }
        let version = Self::api_version(conn);
        let (described, _): (Described, _) = self
            .get(
                conn,
                &format!("/services/data/{version}/sobjects/{entity}/describe"),
                &[],
                None,
            )
            .await?;
        // Under the instance the request named, once its token was refreshed.
        if let Ok(mut known) = self.described.lock() {
            known.insert(key(conn), (described.clone(), Instant::now()));
        }
        Ok(described)
    }

    /// `request` with the fields a mapping that copies every field reads, where it names none:
    /// every field `describe` lists, but for file bodies (`base64`), which SOQL reads only one
    /// record at a time. Salesforce answers only the fields a query selects.
    async fn with_every_field<'r>(
        &self,
        conn: &mut Connection,
        request: &'r FetchRequest,
    ) -> Result<std::borrow::Cow<'r, FetchRequest>, ProviderError> {
        if !request.fields.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(request));
        }
        let described = self.describe(conn, &request.entity).await?;
        let every = FetchRequest {
            fields: described
                .fields
                .iter()
                .filter(|f| f.kind != "base64")
                .map(|f| f.name.clone())
                .collect(),
            ..request.clone()
        };
        Ok(std::borrow::Cow::Owned(every))
    }

    /// Every record `soql` finds through `resource` (`query`, or `queryAll`, which finds deleted
    /// and archived records too), its batches followed to the last. Returns them and the API
    /// usage the last answer reported.
    async fn read_whole(
        &self,
        conn: &mut Connection,
        resource: &str,
        soql: String,
    ) -> Result<(Vec<Record>, Option<(u64, u64)>), ProviderError> {
        let version = Self::api_version(conn);
        let mut path = format!("/services/data/{version}/{resource}");
        let mut params = vec![("q", soql)];
        let mut records = Vec::new();
        loop {
            let (answer, usage): (QueryAnswer, _) =
                self.get(conn, &path, &params, Some(2000)).await?;
            let next = answer.next().map(str::to_string);
            records.extend(answer.into_records());
            match next {
                Some(next) => {
                    path = next;
                    params.clear();
                }
                None => return Ok((records, usage)),
            }
        }
    }

    /// Sends a GET to `path_and_query` on the instance. Returns the body, read as `T`, and the
    /// API usage the answer reported.
    async fn get<T: DeserializeOwned>(
        &self,
        conn: &mut Connection,
        path_and_query: &str,
        query: &[(&str, String)],
        batch_size: Option<usize>,
    ) -> Result<(T, Option<(u64, u64)>), ProviderError> {
        let request = Request {
            method: Method::GET,
            path: path_and_query,
            query,
            body: None,
            headers: &[],
            batch_size,
        };
        self.send(conn, &request).await
    }

    /// Sends a request to the instance, refreshing the token first if there is none and once
    /// more on a 401, and retrying in place what a retry can fix (every write here is
    /// idempotent: an upsert by external id, an update, a delete).
    ///
    /// A successful answer is read straight into `T` (an empty one as JSON `null`): a page of
    /// records becomes the records' own field maps, with no document in between.
    async fn send<T: DeserializeOwned>(
        &self,
        conn: &mut Connection,
        r: &Request<'_>,
    ) -> Result<(T, Option<(u64, u64)>), ProviderError> {
        let Request {
            method,
            path: path_and_query,
            query,
            body,
            headers,
            batch_size,
        } = r;
        if conn.credentials.get("access_token").is_none()
            || conn.credentials.get("instance_url").is_none()
        {
            self.refresh(conn).await?;
        }
        let mut refreshed = false;
        let mut retries = Retries::new(conn.retry);
        loop {
            let instance = conn
                .credentials
                .get("instance_url")
                .unwrap_or_default()
                .trim_end_matches('/');
            let token = conn.credentials.get("access_token").unwrap_or_default();
            let mut request = http::client()
                .request(method.clone(), format!("{instance}{path_and_query}"))
                .bearer_auth(token)
                .header("Accept", "application/json");
            if !query.is_empty() {
                request = request.query(query);
            }
            for (name, value) in headers.iter() {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            if let Some(size) = batch_size {
                request = request.header("Sforce-Query-Options", format!("batchSize={size}"));
            }
            self.limiter.acquire(&conn.integration_id).await;
            let (error, retry_after) = match request.send().await {
                Err(e) => (http::transport_error("Salesforce", &e), None),
                Ok(response) => {
                    let status = response.status();
                    let usage = response
                        .headers()
                        .get("sforce-limit-info")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_api_usage);
                    if let Some(usage) = usage {
                        self.usage
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(usage_key(conn), (usage, Instant::now()));
                    }
                    let retry_after = http::retry_after(response.headers(), Utc::now());
                    let bytes = match response.bytes().await {
                        Ok(bytes) => bytes,
                        // An answer that broke off is no answer, not an empty one.
                        Err(e) => {
                            let error = http::transport_error("Salesforce", &e);
                            retries.wait_or_fail(error, retry_after).await?;
                            continue;
                        }
                    };
                    if status.is_success() {
                        let unreadable = |e: &dyn std::fmt::Display| {
                            ProviderError::new(
                                ErrorCode::ServiceUnavailable,
                                format!("Salesforce's answer is unreadable: {e}"),
                            )
                        };
                        // The page checked as UTF-8 at once, rather than each of its
                        // hundred thousand strings on its own as a byte slice's are.
                        let text = match std::str::from_utf8(&bytes) {
                            Ok("") => "null",
                            Ok(text) => text,
                            Err(e) => return Err(unreadable(&e)),
                        };
                        return serde_json::from_str(text)
                            .map(|body| (body, usage))
                            .map_err(|e| unreadable(&e));
                    }
                    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if status == StatusCode::UNAUTHORIZED && !refreshed {
                        refreshed = true;
                        self.refresh(conn).await?;
                        continue;
                    }
                    let error = answer_error(status, &body);
                    // A request Salesforce stopped for running too long would run as long
                    // again at once: the job's retry, seconds to minutes later, tries it.
                    if ran_too_long(&body) {
                        return Err(error);
                    }
                    (error, retry_after)
                }
            };
            retries.wait_or_fail(error, retry_after).await?;
        }
    }

    /// Refuses a write, or a read of notified records, while the usage the integration's
    /// latest answer reported, if it came in the last [`USAGE_KNOWN_FOR`], has reached its
    /// share of the daily allocation: a quota error, which holds a write-back until later
    /// without spending an attempt.
    fn share_left(&self, conn: &Connection) -> Result<(), ProviderError> {
        let known = self
            .usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&usage_key(conn))
            .filter(|(_, at)| at.elapsed() < USAGE_KNOWN_FOR)
            .map(|(usage, _)| *usage);
        match Self::usage_stop(conn, known) {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }

    /// The stop signal for a page whose answer reported `usage`, if the integration's share of
    /// the daily allocation is used up.
    fn usage_stop(conn: &Connection, usage: Option<(u64, u64)>) -> Option<ProviderError> {
        let (used, allowed) = usage?;
        let share = conn
            .setting_f64("maxApiUsage")
            .unwrap_or(DEFAULT_MAX_API_USAGE);
        (allowed > 0 && used as f64 >= share * allowed as f64).then(|| {
            ProviderError::quota(format!(
                "API usage {used}/{allowed} reached the {:.0}% this integration may use",
                share * 100.0
            ))
        })
    }
}

/// One request to the instance.
struct Request<'a> {
    method: Method,
    path: &'a str,
    query: &'a [(&'a str, String)],
    body: Option<&'a Value>,
    headers: &'a [(&'a str, String)],
    batch_size: Option<usize>,
}

/// Whether `name` can be an sObject or field API name (`Account`, `Castiel_Id__c`), and so
/// go into a path as it is.
fn is_api_name(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn sobject_path(conn: &Connection, entity: &str, rest: &str) -> Result<String, ProviderError> {
    if !is_api_name(entity) {
        return Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("`{entity}` is not an sObject name"),
        ));
    }
    Ok(format!(
        "/services/data/{}/sobjects/{entity}/{rest}",
        Salesforce::api_version(conn)
    ))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Writes go to the sObject rows API. A create is an upsert on an External ID field (the
/// write's `key_field`) keyed by the write's idempotency key, so that a retried
/// create finds the record the first attempt made instead of making another. An update sends
/// `If-Unmodified-Since` with the version it is based on (the `SystemModstamp` read), and
/// Salesforce refuses it with 412 if the record has changed since.
#[async_trait]
impl WriteBack for Salesforce {
    fn may_write(&self, conn: &Connection) -> Result<(), ProviderError> {
        self.share_left(conn)
    }

    /// The object's fields `describe` says a create (or an update) may not set: compound
    /// fields (a contact's `Name`, an address), formulas, system fields.
    async fn read_only_fields(
        &self,
        conn: &mut Connection,
        entity: &str,
        creating: bool,
    ) -> Result<Vec<String>, ProviderError> {
        // An object the API will not describe is written as it was before anyone asked.
        let described = match self.describe(conn, entity).await {
            Ok(described) => described,
            Err(e)
                if !e.code.is_retryable()
                    && !matches!(
                        e.code,
                        ErrorCode::AuthenticationFailed | ErrorCode::InvalidCredentials
                    ) =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        Ok(described
            .fields
            .into_iter()
            .filter(|f| {
                if creating {
                    !f.createable
                } else {
                    !f.updateable
                }
            })
            .map(|f| f.name)
            .collect())
    }

    async fn create(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        let path = keyed_path(conn, write)?;
        let body = Value::Object(write.fields.clone());
        let request = Request {
            method: Method::PATCH,
            path: &path,
            query: &[],
            body: Some(&body),
            headers: &[duplicate_rules_alerting_only()],
            batch_size: None,
        };
        let (answer, _): (Value, _) = self.send(conn, &request).await?;
        let external_id = answer["id"]
            .as_str()
            .and_then(normalize_id)
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorCode::ValidationError,
                    "Salesforce's upsert answer names no record id",
                )
            })?;
        Ok(Written {
            external_id,
            version: None,
        })
    }

    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        // The record was just read (its version): its answer may have reached the share.
        self.share_left(conn)?;
        let id = write_target(write)?;
        let path = sobject_path(conn, &write.entity, &id)?;
        let headers: Vec<(&str, String)> = write
            .expected_version
            .as_deref()
            .and_then(parse_timestamp)
            .map(|t| {
                (
                    "If-Unmodified-Since",
                    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
                )
            })
            .into_iter()
            .chain([duplicate_rules_alerting_only()])
            .collect();
        let body = Value::Object(write.fields.clone());
        let request = Request {
            method: Method::PATCH,
            path: &path,
            query: &[],
            body: Some(&body),
            headers: &headers,
            batch_size: None,
        };
        self.send::<Value>(conn, &request).await?;
        Ok(Written {
            external_id: id,
            version: None,
        })
    }

    async fn delete(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<(), ProviderError> {
        let id = match &write.external_id {
            Some(_) => write_target(write)?,
            // The record a create whose answer was lost made, if it did.
            None => match self.find_by_key(conn, write).await? {
                Some(id) => {
                    // The search's answer may have reached the share.
                    self.share_left(conn)?;
                    id
                }
                None => return Ok(()),
            },
        };
        let path = sobject_path(conn, &write.entity, &id)?;
        let request = Request {
            method: Method::DELETE,
            path: &path,
            query: &[],
            body: None,
            headers: &[],
            batch_size: None,
        };
        self.send::<Value>(conn, &request).await.or_gone().map(drop)
    }
}

/// What `getDeleted` said of a range of time.
struct DeletedLog {
    ids: Vec<String>,
    /// Minutes it would not list, described.
    unread: Vec<String>,
    /// How far back the log reaches (`earliestDateAvailable`).
    earliest: Option<DateTime<Utc>>,
    /// How far it was read (`latestDateCovered`).
    covered: Option<DateTime<Utc>>,
}

impl Salesforce {
    /// The deletions logged from `start` to `end`. Salesforce lists at most 600,000 ids at once
    /// and otherwise answers EXCEEDED_ID_LIMIT, asking for a narrower range: the range is read
    /// in halves, in order, until each fits (or is down to its minute).
    async fn deleted_between(
        &self,
        conn: &mut Connection,
        entity: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<DeletedLog, ProviderError> {
        let version = Self::api_version(conn);
        let path = format!("/services/data/{version}/sobjects/{entity}/deleted/");
        let format = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, false);
        let mut log = DeletedLog {
            ids: Vec::new(),
            unread: Vec::new(),
            earliest: None,
            covered: None,
        };
        // Last out first: the earlier half of a split range is read first.
        let mut ranges = vec![(start, end)];
        while let Some((from, to)) = ranges.pop() {
            let answer = self
                .get::<Value>(
                    conn,
                    &path,
                    &[("start", format(from)), ("end", format(to))],
                    None,
                )
                .await;
            let body = match answer {
                Ok((body, _)) => body,
                Err(e) if e.message.contains("EXCEEDED_ID_LIMIT") => {
                    if to - from >= chrono::Duration::minutes(2) {
                        let middle = from + (to - from) / 2;
                        ranges.push((middle, to));
                        ranges.push((from, middle));
                    } else {
                        // A minute that holds more than Salesforce lists: the rest is read.
                        log.unread.push(format!(
                            "Salesforce would not list the {entity} deletions from {} to {}: more than it lists at once",
                            format(from),
                            format(to)
                        ));
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let time = |field: &str| body[field].as_str().and_then(parse_timestamp);
            log.earliest = log.earliest.or(time("earliestDateAvailable"));
            log.covered = log.covered.max(time("latestDateCovered"));
            if let Some(records) = body["deletedRecords"].as_array() {
                log.ids.extend(
                    records
                        .iter()
                        .filter_map(|r| r["id"].as_str().map(str::to_string)),
                );
            }
        }
        Ok(log)
    }

    /// The id of the record whose External ID field `write.key_field` holds the write's
    /// idempotency key (`GET /sobjects/{entity}/{field}/{key}`): the one a create made, though
    /// its answer was lost.
    async fn find_by_key(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Option<String>, ProviderError> {
        let path = keyed_path(conn, write)?;
        let request = Request {
            method: Method::GET,
            path: &path,
            query: &[],
            body: None,
            headers: &[],
            batch_size: None,
        };
        match self.send::<Value>(conn, &request).await {
            Ok((record, _)) => Ok(record["Id"].as_str().and_then(normalize_id)),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The path of the record a write keys by its idempotency key in an External ID field:
/// `/sobjects/{entity}/{field}/{key}`.
fn keyed_path(conn: &Connection, write: &RecordWrite) -> Result<String, ProviderError> {
    let field = write.create_key()?;
    if !is_api_name(field) {
        return Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("`{field}` is not a field name"),
        ));
    }
    let rest = format!("{field}/{}", percent_encode(&write.idempotency_key));
    sobject_path(conn, &write.entity, &rest)
}

/// The record an update or delete is for, as an 18-character id.
fn write_target(write: &RecordWrite) -> Result<String, ProviderError> {
    write
        .external_id
        .as_deref()
        .and_then(normalize_id)
        .ok_or_else(|| {
            ProviderError::new(
                ErrorCode::ValidationError,
                "the write names no Salesforce record id",
            )
        })
}

/// The SOQL for one entity, from `since` on.
pub fn soql(request: &FetchRequest, since: Option<DateTime<Utc>>) -> String {
    soql_where(request, since, None)
}

/// The SOQL for one entity, with one more condition.
fn soql_where(
    request: &FetchRequest,
    since: Option<DateTime<Utc>>,
    condition: Option<String>,
) -> String {
    let mut fields = vec!["Id".to_string(), "SystemModstamp".to_string()];
    for field in &request.fields {
        if !fields.iter().any(|f| f.eq_ignore_ascii_case(field)) {
            fields.push(field.clone());
        }
    }
    let mut conditions = Vec::new();
    if let Some(since) = since {
        conditions.push(format!(
            "SystemModstamp >= {}",
            since.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    conditions.extend(condition);
    for filter in &request.filters {
        conditions.push(format!("({filter})"));
    }
    let mut soql = format!("SELECT {} FROM {}", fields.join(", "), request.entity);
    if !conditions.is_empty() {
        soql.push_str(" WHERE ");
        soql.push_str(&conditions.join(" AND "));
    }
    soql.push_str(" ORDER BY SystemModstamp ASC, Id ASC");
    soql
}

/// Ids asked for in one `WHERE Id IN (...)` query.
const IDS_PER_QUERY: usize = 200;

/// How long a query's text may be once it is in the URL. Salesforce refuses a request line
/// past 16 KB (414): a query keeps inside, with room for the rest of the line.
const QUERY_URL_BUDGET: usize = 16_000;

/// What a read by id sizes its list of ids to: a little short of [`QUERY_URL_BUDGET`].
const READ_BY_ID_BUDGET: usize = 15_000;

/// How many ids one `WHERE Id IN (...)` query of `request`'s fields may ask for: up to
/// [`IDS_PER_QUERY`], fewer where a wide mapping's field list takes much of the URL, and at
/// least one (a field list too long for any is refused by [`fits_a_query`]).
fn ids_per_query(request: &FetchRequest) -> usize {
    // Each id goes as `'001…'` with `, ` between: 18 characters, two quotes and a comma of
    // three bytes each, and a space of one.
    const ENCODED_ID: usize = 18 + 3 * 3 + 1;
    let base = soql_where(request, None, Some("Id IN ()".into()));
    (READ_BY_ID_BUDGET.saturating_sub(encoded_len(&base)) / ENCODED_ID).clamp(1, IDS_PER_QUERY)
}

/// Refuses `soql`, a query of `request`, too long for Salesforce's URL: every read of it
/// would fail with 414.
fn fits_a_query(request: &FetchRequest, soql: &str) -> Result<(), ProviderError> {
    if encoded_len(soql) <= QUERY_URL_BUDGET {
        return Ok(());
    }
    let filters = match request.filters.len() {
        0 => String::new(),
        n => format!(" and {n} filters"),
    };
    Err(ProviderError::new(
        ErrorCode::ValidationError,
        format!(
            "`{}` is read with {} fields{filters}, more than one query can name: list fewer in the mapping's fieldMappings",
            request.entity,
            request.fields.len()
        ),
    ))
}

/// The length of `soql` once it is form-encoded into a URL's query, as the client sends it:
/// letters, digits and `*-._` as they are, a space as `+`, anything else in three bytes.
fn encoded_len(soql: &str) -> usize {
    soql.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"*-._ ".contains(&b) {
                1
            } else {
                3
            }
        })
        .sum()
}

/// A Salesforce record id in its 18-character, case-insensitive form. The 15-character form
/// (case-sensitive) gets its three-character checksum: one letter per group of five characters
/// saying which of them are upper case. An 18-character id is kept as it is; anything else is
/// not an id.
pub fn normalize_id(id: &str) -> Option<String> {
    const SUFFIX: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345";
    let id = id.trim();
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    match id.len() {
        18 => Some(id.to_string()),
        15 => {
            let mut out = id.to_string();
            for chunk in id.as_bytes().chunks(5) {
                let bits = chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.is_ascii_uppercase())
                    .fold(0usize, |acc, (i, _)| acc | (1 << i));
                out.push(SUFFIX[bits] as char);
            }
            Some(out)
        }
        _ => None,
    }
}

/// The records of a query answer.
/// One answer of the query API: a batch of records, and where the next batch is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryAnswer {
    records: Vec<QueriedRecord>,
    #[serde(default = "finished")]
    done: bool,
    #[serde(default)]
    next_records_url: Option<String>,
}

fn finished() -> bool {
    true
}

impl QueryAnswer {
    /// Where the next batch is, if there is one.
    fn next(&self) -> Option<&str> {
        if self.done {
            None
        } else {
            self.next_records_url.as_deref()
        }
    }

    fn into_records(self) -> Vec<Record> {
        self.records.into_iter().filter_map(record_from).collect()
    }
}

/// Salesforce reads a query's field names without regard to case, but answers each as the
/// object spells it: a mapping that asks for `email` is answered `Email`. Where the first
/// record says the two differ, every record gets the field as asked too.
fn spell_as_asked(records: &mut [Record], asked: &[String]) {
    let Some(first) = records.first() else {
        return;
    };
    let respelt: Vec<(String, &String)> = asked
        .iter()
        .filter(|a| !first.fields.contains_key(a.as_str()))
        .filter_map(|a| {
            let answered = first.fields.keys().find(|k| k.eq_ignore_ascii_case(a))?;
            Some((answered.clone(), a))
        })
        .collect();
    if respelt.is_empty() {
        return;
    }
    for record in records {
        for (answered, asked) in &respelt {
            if let Some(value) = record.fields.get(answered).cloned() {
                record.fields.insert(asked.to_string(), value);
            }
        }
    }
}

/// Reads `api-usage=10018/100000` from a `Sforce-Limit-Info` header.
fn parse_api_usage(header: &str) -> Option<(u64, u64)> {
    header.split(',').find_map(|part| {
        let value = part.trim().strip_prefix("api-usage=")?;
        let (used, allowed) = value.split_once('/')?;
        Some((used.trim().parse().ok()?, allowed.trim().parse().ok()?))
    })
}

/// The error a failed answer means (a 401 here is one that a token refresh did not cure).
fn answer_error(status: StatusCode, body: &Value) -> ProviderError {
    let (error_code, message) = first_error(body);
    match status {
        // Another transaction (a flow, a bulk load) held the record past Salesforce's wait for
        // its lock: it is released in time.
        _ if error_code == "UNABLE_TO_LOCK_ROW" => {
            ProviderError::new(ErrorCode::Timeout, format!("{error_code}: {message}"))
        }
        // A query or request that ran past Salesforce's limit on a busy org: answered 400,
        // but the same request a while later runs in time.
        _ if ran_too_long(body) => {
            ProviderError::new(ErrorCode::Timeout, format!("{error_code}: {message}"))
        }
        // The same 404 says an External ID field is not one, or not visible to the user: no
        // record can be found by it, and none is known to be missing.
        StatusCode::NOT_FOUND if message.contains("external ID field") => ProviderError::new(
            ErrorCode::ValidationError,
            format!("{error_code}: {message}"),
        ),
        StatusCode::UNAUTHORIZED => ProviderError::new(
            ErrorCode::AuthenticationFailed,
            format!("{error_code}: {message} (after a token refresh)"),
        ),
        // The same code says the org's concurrent long-running requests are at their cap,
        // shared with every other app and freed within seconds: retried, not held for the day.
        StatusCode::FORBIDDEN
            if error_code == "REQUEST_LIMIT_EXCEEDED" && message.contains("Concurrent") =>
        {
            ProviderError::new(ErrorCode::RateLimit, format!("{error_code}: {message}"))
        }
        StatusCode::FORBIDDEN if error_code == "REQUEST_LIMIT_EXCEEDED" => {
            ProviderError::quota(format!("{error_code}: {message}"))
        }
        StatusCode::FORBIDDEN => ProviderError::new(
            ErrorCode::AuthenticationFailed,
            format!("{error_code}: {message}"),
        ),
        StatusCode::NOT_FOUND => {
            ProviderError::new(ErrorCode::NotFound, format!("{error_code}: {message}"))
        }
        StatusCode::PRECONDITION_FAILED => ProviderError::new(
            ErrorCode::Conflict,
            format!("the record changed since the version written from: {error_code}: {message}"),
        ),
        StatusCode::TOO_MANY_REQUESTS => {
            ProviderError::new(ErrorCode::RateLimit, format!("{error_code}: {message}"))
        }
        s if s.is_server_error() => ProviderError::new(
            ErrorCode::ServiceUnavailable,
            format!("Salesforce answered {s}: {error_code}: {message}"),
        ),
        s => ProviderError::new(
            ErrorCode::ValidationError,
            format!("Salesforce answered {s}: {error_code}: {message}"),
        ),
    }
}

/// Whether Salesforce stopped the request for running past its time limit.
fn ran_too_long(body: &Value) -> bool {
    matches!(
        first_error(body).0.as_str(),
        "QUERY_TIMEOUT" | "REQUEST_RUNNING_TOO_LONG"
    )
}

/// Salesforce errors are an array of `{message, errorCode}`.
fn first_error(body: &Value) -> (String, String) {
    let first = body.as_array().and_then(|a| a.first()).unwrap_or(body);
    (
        first["errorCode"]
            .as_str()
            .unwrap_or("UNKNOWN_ERROR")
            .to_string(),
        first["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string(),
    )
}

/// A cursor: the timestamp it holds, or why it cannot be used.
fn cursor_time(cursor: &str) -> Result<DateTime<Utc>, ProviderError> {
    parse_timestamp(cursor).ok_or_else(|| {
        ProviderError::resync_required(format!("`{cursor}` is not a Salesforce cursor"))
    })
}

/// A timestamp as cursors spell it.
fn cursor_of(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Salesforce timestamps: `2024-05-02T10:00:00.000+0000`.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    // Salesforce writes `+0000`, RFC 3339 wants `+00:00`; RFC 3339's parser is the fast one,
    // and every record of every page carries a timestamp.
    let bytes = text.as_bytes();
    let colonless = bytes.len() > 5
        && matches!(bytes[bytes.len() - 5], b'+' | b'-')
        && bytes[bytes.len() - 4..].iter().all(u8::is_ascii_digit);
    // Room for the longest form Salesforce writes, nanoseconds and all, with the colon.
    let mut buffer = [0u8; 40];
    let parsed = if colonless && bytes.len() < buffer.len() {
        let (head, minutes) = bytes.split_at(bytes.len() - 2);
        buffer[..head.len()].copy_from_slice(head);
        buffer[head.len()] = b':';
        buffer[head.len() + 1..=bytes.len()].copy_from_slice(minutes);
        std::str::from_utf8(&buffer[..=bytes.len()])
            .ok()
            .and_then(|with_colon| DateTime::parse_from_rfc3339(with_colon).ok())
    } else {
        DateTime::parse_from_rfc3339(text).ok()
    };
    parsed
        .or_else(|| DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z").ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A record of a query answer, read without its `attributes` (its type and URL, which every
/// record repeats and nothing reads).
struct QueriedRecord(Map<String, Value>);

impl<'de> Deserialize<'de> for QueriedRecord {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;

        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = QueriedRecord;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a record")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<QueriedRecord, A::Error> {
                let mut fields = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "attributes" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    } else {
                        let value = map.next_value()?;
                        fields.insert(key, value);
                    }
                }
                Ok(QueriedRecord(fields))
            }
        }

        deserializer.deserialize_map(Fields)
    }
}

/// A record of a query result.
fn record_from(QueriedRecord(fields): QueriedRecord) -> Option<Record> {
    let id = fields.get("Id")?.as_str()?.to_string();
    let modified_at = fields
        .get("SystemModstamp")
        .and_then(Value::as_str)
        .and_then(parse_timestamp);
    let deleted = fields
        .get("IsDeleted")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Some(Record {
        id,
        modified_at,
        deleted,
        fields,
        listed_until: None,
    })
}

#[async_trait]
impl Pull for Salesforce {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let version = Self::api_version(conn);
        let (query, path, params) = match &request.page_token {
            Some(next) => (None, next.clone(), Vec::new()),
            None => {
                let since = request.cursor.as_deref().map(cursor_time).transpose()?;
                let asked = self.with_every_field(conn, request).await?;
                let soql = soql(
                    &asked,
                    since.map(|t| request.read_from(t, RECORDS_LOOKBACK)),
                );
                fits_a_query(&asked, &soql)?;
                (
                    Some(soql.clone()),
                    format!("/services/data/{version}/query"),
                    vec![("q", soql)],
                )
            }
        };
        let batch = request.page_size.clamp(200, 2000);
        let (answer, usage): (QueryAnswer, _) = self.get(conn, &path, &params, Some(batch)).await?;
        let next_page = answer.next().map(str::to_string);
        let mut records = answer.into_records();
        spell_as_asked(&mut records, &request.fields);
        let cursor = records.iter().filter_map(|r| r.modified_at).max();
        Ok(Page {
            unreadable: Vec::new(),
            cursor: cursor.map(cursor_of),
            records,
            next_page,
            query,
            stop_after: Self::usage_stop(conn, usage),
        })
    }

    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        // The ids come from unsigned notifications: only well-formed ids reach the query.
        let mut ids: Vec<String> = ids.iter().filter_map(|id| normalize_id(id)).collect();
        ids.sort();
        ids.dedup();
        let unbounded = FetchRequest {
            cursor: None,
            page_token: None,
            ..self.with_every_field(conn, request).await?.into_owned()
        };
        fits_a_query(
            &unbounded,
            &soql_where(
                &unbounded,
                None,
                Some("Id IN ('001000000000000AAA')".into()),
            ),
        )?;
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ids_per_query(&unbounded)) {
            // Notified records are read within the integration's share of the org's daily
            // allocation, as a sync's pages are: a busy object's notifications would spend
            // the rest of it, which every other app of the org shares. The next sync reads
            // them from its cursor.
            self.share_left(conn)?;
            let quoted: Vec<String> = chunk.iter().map(|id| format!("'{id}'")).collect();
            let soql = soql_where(
                &unbounded,
                None,
                Some(format!("Id IN ({})", quoted.join(", "))),
            );
            let (read, _) = self.read_whole(conn, "query", soql).await?;
            records.extend(read);
        }
        spell_as_asked(&mut records, &request.fields);
        Ok(records)
    }

    fn reports_deletions_apart(&self, _entity: &str) -> bool {
        true
    }

    /// Asks `queryAll`, which answers deleted (`IsDeleted`) and archived records as well, for
    /// each id of the object: one it answers live stays; one it answers deleted is gone. One it
    /// does not answer was purged from the recycle bin, or is out of the integration user's
    /// sight (sharing changed): gone only if the user sees every record (`View All Data`),
    /// else undecided. An id of another object (a record of another entity merged into one of
    /// this entity's shards), told by the key prefix its ids begin with, is not this listing's
    /// to judge, nor is anything that is not a Salesforce id.
    async fn gone(
        &self,
        conn: &mut Connection,
        entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        let described = self.describe(conn, entity).await?;
        let mut left = LeftOut::default();
        // An object whose ids have no known beginning cannot tell its records from others'.
        let Some(key_prefix) = described.key_prefix.clone() else {
            left.undecided = ids.len();
            return Ok(left);
        };
        // Without `IsDeleted` an answered record is taken for live.
        let deletable = described.has_is_deleted();
        // Asked only once a record goes unanswered.
        let mut sees_everything = None;
        let asked: Vec<(String, String)> = ids
            .into_iter()
            .filter_map(|id| normalize_id(&id).map(|normal| (id, normal)))
            .filter(|(_, normal)| normal.starts_with(&key_prefix))
            .collect();
        let select = if deletable { "Id, IsDeleted" } else { "Id" };
        for (n, chunk) in asked.chunks(IDS_PER_QUERY).enumerate() {
            let quoted: Vec<String> = chunk.iter().map(|(_, id)| format!("'{id}'")).collect();
            let soql = format!(
                "SELECT {select} FROM {entity} WHERE Id IN ({})",
                quoted.join(", ")
            );
            let (read, usage) = self.read_whole(conn, "queryAll", soql).await?;
            let answered: std::collections::HashMap<String, bool> =
                read.into_iter().map(|r| (r.id, r.deleted)).collect();
            for (id, normal) in chunk {
                match answered.get(normal) {
                    Some(false) => {}
                    Some(true) => left.gone.push(id.clone()),
                    None => {
                        let sees = match sees_everything {
                            Some(sees) => sees,
                            None => *sees_everything.insert(self.sees_everything(conn).await?),
                        };
                        if sees {
                            left.gone.push(id.clone());
                        } else {
                            left.undecided += 1;
                        }
                    }
                }
            }
            // A listing's leftovers may be many questions: they stop at the integration's
            // share of the allocation, as a sync's pages do, with what was answered kept.
            if let Some(stop) = Self::usage_stop(conn, usage) {
                left.stopped = Some(stop);
                left.unasked = asked.len().saturating_sub((n + 1) * IDS_PER_QUERY);
                break;
            }
        }
        Ok(left)
    }

    async fn fetch_deleted(
        &self,
        conn: &mut Connection,
        entity: &str,
        since: Option<DateTime<Utc>>,
    ) -> Result<Deleted, ProviderError> {
        let now = Utc::now();
        let window = chrono::Duration::days(DELETED_WINDOW_DAYS);
        // With no time to start from, the whole window less a minute, so that the request is
        // inside it when Salesforce reads it.
        let from_window = since.is_none();
        let oldest = now - window + chrono::Duration::minutes(1);
        let since = since.unwrap_or(oldest);
        if now - since > window {
            return Ok(Deleted {
                full_resync_required: true,
                ..Deleted::default()
            });
        }
        // Read again from a few minutes before: a deletion committed late is logged with the
        // time it began. Deletions read twice change nothing the second time.
        let start = (since - DELETIONS_LOOKBACK).max(oldest.min(since));
        let log = match self.deleted_between(conn, entity, start, now).await {
            Ok(log) => log,
            // The log no longer reaches back to `start`.
            Err(e) if e.message.contains("INVALID_REPLICATION_DATE") => {
                if !from_window {
                    return Ok(Deleted {
                        full_resync_required: true,
                        ..Deleted::default()
                    });
                }
                // Asked for as much as Salesforce keeps and refused all the same: deletions are
                // read on from now; those before are not known.
                return Ok(Deleted {
                    covered_until: Some(now),
                    ..Deleted::default()
                });
            }
            Err(e) => return Err(e),
        };
        // A recycle bin emptied early: deletions since `since` are lost. Asked for the whole
        // window, what is left of it is all there is to read.
        if !from_window && log.earliest.is_some_and(|earliest| earliest > since) {
            return Ok(Deleted {
                full_resync_required: true,
                ..Deleted::default()
            });
        }
        let ids = log.ids;
        let unread = log.unread;
        Ok(Deleted {
            ids,
            full_resync_required: false,
            // Salesforce reads whole minutes: the minute under way is read next time.
            covered_until: log.covered,
            unread,
        })
    }

    fn version_of(&self, record: &Record) -> Option<String> {
        record
            .fields
            .get("SystemModstamp")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        parse_timestamp(cursor)
    }

    fn newer_cursor(&self, earlier: String, later: String) -> String {
        match (parse_timestamp(&earlier), parse_timestamp(&later)) {
            (Some(a), Some(b)) if a > b => earlier,
            _ => later,
        }
    }
}

impl Provider for Salesforce {
    fn name(&self) -> &'static str {
        "salesforce"
    }

    fn applies_filters(&self) -> bool {
        true
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        for name in ["loginHost", "apiVersion", "organizationId"] {
            if let Some(value) = settings.get(name)
                && !value.is_string()
            {
                return Err(format!("connection.{name} must be a string"));
            }
        }
        if let Some(host) = settings.get("loginHost").and_then(Value::as_str)
            && !matches!(host, "production" | "sandbox")
        {
            crate::http::check_url(settings, "loginHost").map_err(|_| {
                "connection.loginHost must be `production`, `sandbox` or a My Domain URL \
                 (https; plain http only to a loopback address)"
                    .to_string()
            })?;
        }
        if let Some(version) = settings.get("apiVersion").and_then(Value::as_str) {
            let number = version.strip_prefix('v').unwrap_or("");
            if number.parse::<f64>().is_err() {
                return Err("connection.apiVersion must look like `v62.0`".into());
            }
        }
        if let Some(org) = settings.get("organizationId").and_then(Value::as_str) {
            let normalized = normalize_id(org).ok_or(
                "connection.organizationId must be a Salesforce id (15 or 18 letters and digits)",
            )?;
            settings.insert("organizationId".into(), Value::String(normalized));
        }
        match settings.get("maxApiUsage") {
            None => {}
            Some(v) if v.as_f64().is_some_and(|f| f > 0.0 && f <= 1.0) => {}
            Some(_) => {
                return Err("connection.maxApiUsage must be a number above 0 and at most 1".into());
            }
        }
        Ok(())
    }

    fn webhooks(&self) -> Option<&dyn Webhooks> {
        Some(self)
    }

    fn write_back(&self) -> Option<&dyn WriteBack> {
        Some(self)
    }
}

/// Outbound Messages carry no signature: a delivery is trusted as far as its OrganizationId
/// names an integration connected to that org, and it only says which records to read back.
#[async_trait]
impl Webhooks for Salesforce {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        let message = outbound_messages::parse(request)?;
        Ok(WebhookRoute::To(vec![RouteKey::Setting {
            name: "organizationId",
            value: message.organization_id,
        }]))
    }

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        _key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError> {
        let message = outbound_messages::parse(request)?;
        if conn.setting("organizationId") != Some(message.organization_id.as_str()) {
            return Err(WebhookError::Forged(
                "the delivery's OrganizationId is not the integration's".into(),
            ));
        }
        Ok(WebhookDelivery {
            notifications: message.notifications,
            answer: outbound_messages::ack(),
        })
    }
}

#[cfg(test)]
mod tests {
    use reqwest::StatusCode;

    use crate::ErrorCode;

    #[test]
    fn errors_are_told_apart_by_what_salesforce_says_not_by_status_alone() {
        let error = |status: u16, code: &str, message: &str| {
            let body = json!([{"errorCode": code, "message": message}]);
            super::answer_error(StatusCode::from_u16(status).unwrap(), &body).code
        };
        assert_eq!(
            error(
                400,
                "QUERY_TIMEOUT",
                "Your query request was running for too long."
            ),
            ErrorCode::Timeout
        );
        assert_eq!(
            error(
                400,
                "REQUEST_RUNNING_TOO_LONG",
                "Your request was running for too long"
            ),
            ErrorCode::Timeout
        );
        assert_eq!(
            error(400, "INVALID_FIELD", "No such column 'Foo__c'"),
            ErrorCode::ValidationError
        );
        assert_eq!(
            error(404, "NOT_FOUND", "The requested resource does not exist"),
            ErrorCode::NotFound
        );
        assert_eq!(
            error(
                404,
                "NOT_FOUND",
                "Provided external ID field does not exist or is not accessible: Castiel_Id__c"
            ),
            ErrorCode::ValidationError,
            "no record can be looked up by the field; none is known to be gone"
        );
    }

    #[test]
    fn a_wide_mappings_reads_by_id_stay_inside_salesforces_url_limit() {
        let request = |fields: usize| super::FetchRequest {
            entity: "Account".into(),
            fields: (0..fields)
                .map(|i| format!("Custom_Field_{i:03}__c"))
                .collect(),
            cursor: None,
            page_token: None,
            filters: Vec::new(),
            page_size: 200,
            cursor_read_at: None,
        };
        assert_eq!(super::ids_per_query(&request(10)), super::IDS_PER_QUERY);
        for fields in [150, 300, 500] {
            let wide = request(fields);
            let per_query = super::ids_per_query(&wide);
            let ids: Vec<String> = (0..per_query).map(|i| format!("'001{i:015}'")).collect();
            let soql = super::soql_where(&wide, None, Some(format!("Id IN ({})", ids.join(", "))));
            let mut url =
                reqwest::Url::parse("https://acme.my.salesforce.com/services/data/v62.0/query")
                    .unwrap();
            url.query_pairs_mut().append_pair("q", &soql);
            assert!(
                url.as_str().len() <= super::READ_BY_ID_BUDGET + 100,
                "{fields} fields, {per_query} ids: {} bytes",
                url.as_str().len()
            );
        }
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn a_query_answers_records_are_read_without_their_attributes() {
        let answer: QueryAnswer = serde_json::from_value(json!({
            "totalSize": 2, "done": true,
            "records": [
                {"attributes": {"type": "Contact", "url": "/services/data/v62.0/sobjects/Contact/003A"},
                 "Id": "003A", "Name": "Ann Lee", "SystemModstamp": "2026-01-01T10:00:00.000+0000",
                 "Account": {"attributes": {"type": "Account"}, "Name": "Acme"}},
                {"attributes": {"type": "Contact"}, "Name": "no id"}
            ]
        }))
        .unwrap();
        let records = answer.into_records();
        assert_eq!(records.len(), 1, "a record without an id is left out");
        assert_eq!(records[0].id, "003A");
        assert!(records[0].modified_at.is_some());
        assert_eq!(
            Value::Object(records[0].fields.clone()),
            json!({"Id": "003A", "Name": "Ann Lee", "SystemModstamp": "2026-01-01T10:00:00.000+0000",
                   "Account": {"attributes": {"type": "Account"}, "Name": "Acme"}})
        );
    }

    #[test]
    fn incremental_soql_is_inclusive_and_ordered() {
        let request = FetchRequest {
            entity: "Account".into(),
            fields: vec!["Name".into(), "Id".into()],
            cursor: None,
            page_token: None,
            filters: vec!["Type = 'Customer'".into()],
            page_size: 2000,
            cursor_read_at: None,
        };
        let since = cursor_time("2026-01-01T10:00:00.000Z").unwrap();
        assert_eq!(
            soql(&request, Some(since)),
            "SELECT Id, SystemModstamp, Name FROM Account WHERE SystemModstamp >= 2026-01-01T10:00:00Z \
             AND (Type = 'Customer') ORDER BY SystemModstamp ASC, Id ASC"
        );
    }

    #[test]
    fn ids_are_normalized_to_their_18_character_form() {
        // Salesforce's documented example and an org id as Setup shows it.
        assert_eq!(
            normalize_id("001A0000006Vm9r").as_deref(),
            Some("001A0000006Vm9rIAC")
        );
        assert_eq!(
            normalize_id("00D000000000062").as_deref(),
            Some("00D000000000062EAA")
        );
        assert_eq!(
            normalize_id("00D000000000062EAA").as_deref(),
            Some("00D000000000062EAA")
        );
        assert_eq!(normalize_id("003' OR Name != '"), None);
        assert_eq!(normalize_id("0030000000001"), None);
    }

    #[test]
    fn connection_settings_are_checked_and_the_org_id_normalized() {
        let check = |settings: serde_json::Value| {
            let mut map = settings.as_object().unwrap().clone();
            Salesforce::new().check_connection(&mut map).map(|()| map)
        };
        let ok =
            check(serde_json::json!({"loginHost": "sandbox", "organizationId": "00D000000000062"}))
                .unwrap();
        assert_eq!(ok["organizationId"], "00D000000000062EAA");
        for (bad, field) in [
            (serde_json::json!({"loginHost": 7}), "loginHost"),
            (serde_json::json!({"loginHost": "staging"}), "loginHost"),
            (
                serde_json::json!({"organizationId": "acme"}),
                "organizationId",
            ),
            (serde_json::json!({"maxApiUsage": "80%"}), "maxApiUsage"),
            (serde_json::json!({"apiVersion": "latest"}), "apiVersion"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains(&format!("connection.{field}")), "{err}");
        }
    }

    #[test]
    fn the_login_host_is_production_sandbox_or_my_domain() {
        let with = |host: Option<&str>| {
            let mut settings = Map::new();
            if let Some(host) = host {
                settings.insert("loginHost".into(), Value::String(host.into()));
            }
            Salesforce::login_host(&Connection::new(
                "i",
                settings,
                crate::Credentials::default(),
            ))
        };
        assert_eq!(with(None), "https://login.salesforce.com");
        assert_eq!(with(Some("production")), "https://login.salesforce.com");
        assert_eq!(with(Some("sandbox")), "https://test.salesforce.com");
        assert_eq!(
            with(Some("https://acme.my.salesforce.com/")),
            "https://acme.my.salesforce.com"
        );
        let sf = Salesforce::new();
        let mut plain = Map::new();
        plain.insert("loginHost".into(), json!("http://acme.my.salesforce.com"));
        let err = sf.check_connection(&mut plain).unwrap_err();
        assert!(
            err.contains("plain http only to a loopback address"),
            "{err}"
        );
        plain.insert("loginHost".into(), json!("http://127.0.0.1:8443"));
        assert!(sf.check_connection(&mut plain).is_ok());
    }

    #[test]
    fn api_usage_and_timestamps_are_read() {
        assert_eq!(
            parse_api_usage("api-usage=10018/100000"),
            Some((10018, 100000))
        );
        assert_eq!(
            parse_api_usage("per-app-api-usage=1/2, api-usage=5/10"),
            Some((5, 10))
        );
        assert_eq!(parse_api_usage("nonsense"), None);
        assert_eq!(
            parse_timestamp("2024-05-02T10:00:00.000+0000")
                .unwrap()
                .to_rfc3339(),
            "2024-05-02T10:00:00+00:00"
        );
        for (text, utc) in [
            (
                "2024-05-02T12:30:00.250+0230",
                "2024-05-02T10:00:00.250+00:00",
            ),
            ("2024-05-02T07:00:00-0300", "2024-05-02T10:00:00+00:00"),
            (
                "2024-05-02T10:00:00.123456789+0000",
                "2024-05-02T10:00:00.123456789+00:00",
            ),
            ("2024-05-02T10:00:00Z", "2024-05-02T10:00:00+00:00"),
            (
                "2024-05-02T10:00:00.5+00:00",
                "2024-05-02T10:00:00.500+00:00",
            ),
        ] {
            assert_eq!(parse_timestamp(text).unwrap().to_rfc3339(), utc, "{text}");
        }
        assert_eq!(parse_timestamp("2024-05-02"), None);
        assert_eq!(parse_timestamp("not a time+0000"), None);
    }

    #[test]
    fn cursors_are_timestamps_in_any_form_integrations_stored_them() {
        let sf = Salesforce::new();
        // Cursors stored before they were opaque strings have chrono's own spelling.
        for stored in [
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00.000Z",
            "2026-01-01T10:00:00.000+0000",
        ] {
            assert_eq!(
                cursor_of(cursor_time(stored).unwrap()),
                "2026-01-01T10:00:00.000Z"
            );
        }
        assert_eq!(
            sf.newer_cursor(
                "2026-01-01T10:00:00Z".into(),
                "2026-01-01T09:59:59.500Z".into()
            ),
            "2026-01-01T10:00:00Z"
        );
        assert_eq!(
            sf.newer_cursor(
                "2026-01-01T10:00:00Z".into(),
                "2026-01-01T10:00:00.500Z".into()
            ),
            "2026-01-01T10:00:00.500Z"
        );
        let err = cursor_time("deltatoken=919042").unwrap_err();
        assert!(err.resync, "{err}");
    }
}
