//! Dynamics 365 over the Dataverse Web API (`{environmentUrl}/api/data/v9.2`).
//!
//! * Records come from an entity set (`accounts`, `contacts`) with `$select`, paged by
//!   `@odata.nextLink` under `Prefer: odata.maxpagesize` (5,000 at most).
//! * Incremental syncs use change tracking: the first sync asks with
//!   `Prefer: odata.track-changes` and its last page carries an `@odata.deltaLink`, which is
//!   the entity's cursor; the next sync GETs it and receives changed rows and `$deletedEntity`
//!   entries for deleted ones (soft deletes). A delta token Dataverse no longer honours (older
//!   than the org's `ExpireChangeTrackingInDays`), or one that does not select a column the
//!   mapping now reads, restarts the entity from the beginning; that first round lists every
//!   row, so what it leaves out was deleted meanwhile (`Pull::lists_everything_from_start`).
//!   Change tracking cannot filter: an integration with filters, or with
//!   `changeTracking: false`, polls `modifiedon ge` five minutes before the cursor instead (a
//!   row commits after others stamped later; not once a sync began that long after the
//!   cursor) and sees no deletions.
//! * Tokens: the Microsoft identity platform ([`crate::microsoft`]), scope
//!   `{environmentUrl}/.default` app-only or `{environmentUrl}/user_impersonation` delegated.
//! * Limits: service protection allows 6,000 requests per 5 minutes per user; requests are
//!   paced at 60 a second and 6,000 per 5 minutes per integration, and a 429 is waited out
//!   after its `Retry-After`.
//! * Webhooks: a service endpoint registered with the Plug-in Registration Tool posts a
//!   `RemoteExecutionContext`. It carries no signature: the delivery must bring the
//!   integration's shared key (an `x-webhook-key` header with the HttpHeader option, or
//!   `?code=` with WebhookKey where no function key takes `code`), compared in constant time.
//!   It is routed by its `OrganizationId`.
//! * Writes: create (POST), update (PATCH under `If-Match`: the version written against, or
//!   `*` so an update never creates) and delete (a row already gone counts as deleted), each
//!   answering the row's new `@odata.etag`.
//!
//! Connection settings: `environmentUrl` (required), `tenantId` or `tokenUrl`, `apiVersion`
//! (default `v9.2`), `organizationId` (the org's id, for webhooks), `changeTracking` (default
//! true), `logicalNames` (entity set → table logical name, where dropping the plural's `s`
//! is wrong), `primaryKeys` (entity set → primary key column, where it is not the logical
//! name and `id`; activity tables' `activityid` is known). Credentials: `client_id`, `client_secret`, `refresh_token` for delegated access,
//! `webhook_key` for webhooks.

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::Method;
use serde_json::{Map, Value};

use crate::OrGone;
use crate::api::{Api, Dialect, TokenRequest};
use crate::microsoft;
use crate::{
    Connection, ErrorCode, FetchRequest, LeftOut, Page, Provider, ProviderError, Pull, RateLimiter,
    Record, RecordWrite, RouteKey, TokenRefresh, WebhookAnswer, WebhookDelivery, WebhookError,
    WebhookNotification, WebhookRequest, WebhookRoute, Webhooks, WriteBack, Written,
};

const DEFAULT_API_VERSION: &str = "v9.2";
/// How far before the cursor a poll asks for rows: `modifiedon` is set as an operation
/// begins, and a row committed by a long one is seen after rows stamped later. Read again, an
/// unchanged row is skipped on its shard's fingerprint.
const MODIFIED_LOOKBACK: chrono::Duration = chrono::Duration::minutes(5);
/// The most rows Dataverse returns per page.
const MAX_PAGE_SIZE: usize = 5000;
/// Ids read back per `In` query, short enough for any URL limit.
const IDS_PER_QUERY: usize = 50;
/// Dataverse's code for a change-tracking version it no longer keeps (ExpiredVersionStamp).
const EXPIRED_VERSION: &str = "0x80044352";

pub struct Dynamics365 {
    api: Api<Dataverse>,
}

/// Dataverse as the shared request loop speaks it.
struct Dataverse;

impl Dialect for Dataverse {
    fn service(&self) -> &'static str {
        "Dataverse"
    }

    fn token_request(&self, conn: &Connection) -> TokenRequest {
        microsoft::token_request(conn, &Dynamics365::scope(conn))
    }

    fn error(&self, status: reqwest::StatusCode, body: &Value) -> ProviderError {
        let mut error = microsoft::answer_error(status, body);
        // Dataverse's 403 is a privilege the application user's security role lacks on a
        // table (PrivilegeDenied), not credentials gone bad: granting it is enough, and the
        // integration must not wait for new credentials.
        if status == reqwest::StatusCode::FORBIDDEN {
            error.code = ErrorCode::ValidationError;
        }
        error
    }
}

impl Default for Dynamics365 {
    fn default() -> Self {
        Self::new()
    }
}

impl Dynamics365 {
    pub fn new() -> Self {
        Self {
            api: Api::new(
                Dataverse,
                RateLimiter::new(60).with_window(6000, std::time::Duration::from_secs(300)),
            ),
        }
    }

    fn environment(conn: &Connection) -> Result<&str, ProviderError> {
        conn.setting("environmentUrl").ok_or_else(|| {
            ProviderError::new(
                ErrorCode::ValidationError,
                "the connection has no environmentUrl",
            )
        })
    }

    fn api_root(conn: &Connection) -> Result<String, ProviderError> {
        let version = conn.setting("apiVersion").unwrap_or(DEFAULT_API_VERSION);
        Ok(format!("{}/api/data/{version}", Self::environment(conn)?))
    }

    /// The scope a token for this environment is asked with.
    fn scope(conn: &Connection) -> String {
        let environment = conn.setting("environmentUrl").unwrap_or_default();
        if conn.credentials.get("refresh_token").is_some() {
            format!("{environment}/user_impersonation")
        } else {
            format!("{environment}/.default")
        }
    }

    fn change_tracking(settings: &Map<String, Value>, request: &FetchRequest) -> bool {
        request.filters.is_empty()
            && settings
                .get("changeTracking")
                .and_then(Value::as_bool)
                .unwrap_or(true)
    }

    /// GETs `url`, which must be on the integration's environment: links come back from the
    /// service and cursors from storage, and the token must never go anywhere else.
    async fn get(
        &self,
        conn: &mut Connection,
        url: &str,
        prefer: &str,
    ) -> Result<Value, ProviderError> {
        if !on_environment(Self::environment(conn)?, url) {
            return Err(ProviderError::resync_required(
                "a Dataverse link points outside the integration's environment",
            ));
        }
        let headers = [
            ("OData-MaxVersion", "4.0".to_string()),
            ("OData-Version", "4.0".to_string()),
            ("Prefer", prefer.to_string()),
        ];
        match self.api.send(conn, Method::GET, url, &headers, None).await {
            Ok(answer) => Ok(answer.body),
            Err(e)
                if e.message.contains(EXPIRED_VERSION)
                    || e.message
                        .contains("Version stamp associated with the client has expired") =>
            {
                Err(ProviderError::resync_required(e.message))
            }
            Err(e) => Err(e),
        }
    }
}

/// Dataverse's activity tables: each shares the `activitypointer` table's key, `activityid`.
const ACTIVITY_TABLES: [&str; 17] = [
    "activitypointer",
    "appointment",
    "bulkoperation",
    "campaignactivity",
    "campaignresponse",
    "email",
    "fax",
    "incidentresolution",
    "letter",
    "opportunityclose",
    "orderclose",
    "phonecall",
    "quoteclose",
    "recurringappointmentmaster",
    "serviceappointment",
    "socialactivity",
    "task",
];

/// The primary key column of an entity set: configured, `activityid` for an activity table,
/// or the logical name and `id` (`accountid` for `accounts`).
fn primary_key(settings: &Map<String, Value>, entity_set: &str) -> String {
    if let Some(key) = settings
        .get("primaryKeys")
        .and_then(|m| m.get(entity_set))
        .and_then(Value::as_str)
    {
        return key.to_string();
    }
    let logical = logical_name(settings, entity_set);
    if ACTIVITY_TABLES.contains(&logical.as_str()) {
        "activityid".into()
    } else {
        format!("{logical}id")
    }
}

/// The table's logical name for an entity set: configured, or the set without its plural.
fn logical_name(settings: &Map<String, Value>, entity_set: &str) -> String {
    if let Some(name) = settings
        .get("logicalNames")
        .and_then(|m| m.get(entity_set))
        .and_then(Value::as_str)
    {
        return name.to_string();
    }
    if let Some(stem) = entity_set.strip_suffix("ies") {
        return format!("{stem}y");
    }
    let stem = entity_set.strip_suffix('s').unwrap_or(entity_set);
    match stem.strip_suffix('e') {
        Some(plain) if takes_es(plain) => plain.to_string(),
        _ => stem.to_string(),
    }
}

/// Whether a table's name takes `es` for its plural (`faxes`, `customeraddresses`,
/// `new_batches`). Not names in `z`: the plural alone cannot tell `new_quiz` from `new_size`,
/// which is the likelier; a name it gets wrong (`new_cache`, `new_quiz`) is given in
/// `logicalNames`.
fn takes_es(logical: &str) -> bool {
    ["ss", "x", "ch", "sh"]
        .iter()
        .any(|end| logical.ends_with(end))
}

/// Whether `url` is on `environment`, by origin: the host a client sends is lowercased, and so
/// are the links that come back, whatever case the environment's URL was given in.
fn on_environment(environment: &str, url: &str) -> bool {
    let origin = |url: &str| reqwest::Url::parse(url).map(|u| u.origin()).ok();
    origin(environment).is_some_and(|environment| origin(url) == Some(environment))
}

/// The entity set of a table's logical name, as webhooks name tables.
fn entity_set(settings: &Map<String, Value>, logical: &str) -> String {
    if let Some(Value::Object(names)) = settings.get("logicalNames")
        && let Some((set, _)) = names.iter().find(|(_, l)| l.as_str() == Some(logical))
    {
        return set.clone();
    }
    if let Some(stem) = logical.strip_suffix('y')
        && stem.ends_with(|c: char| c.is_ascii_alphabetic() && !"aeiou".contains(c))
    {
        format!("{stem}ies")
    } else if takes_es(logical) {
        format!("{logical}es")
    } else {
        format!("{logical}s")
    }
}

fn is_guid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A column name safe to put in `$select`.
fn is_column(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `$select` list: the mapped columns, the key and `modifiedon`.
fn select(request: &FetchRequest, key: &str) -> Result<String, ProviderError> {
    let mut columns = vec![key.to_string(), "modifiedon".to_string()];
    for field in &request.fields {
        if !is_column(field) {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{field}` is not a Dataverse column name"),
            ));
        }
        if !columns.iter().any(|c| c.eq_ignore_ascii_case(field)) {
            columns.push(field.to_ascii_lowercase());
        }
    }
    Ok(columns.join(","))
}

/// Whether the delta link `link` selects every one of `columns` (comma-separated): a link
/// with no `$select` reads them all.
fn selects_all(link: &str, columns: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(link) else {
        return true;
    };
    let Some((_, selected)) = url.query_pairs().find(|(name, _)| name == "$select") else {
        return true;
    };
    let selected: Vec<&str> = selected.split(',').map(str::trim).collect();
    columns
        .split(',')
        .all(|c| selected.iter().any(|s| s.eq_ignore_ascii_case(c)))
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The rows of an answer as records; `$deletedEntity` entries are deletions.
fn records_of(body: &Value, key: &str) -> Vec<Record> {
    let rows = body["value"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    rows.iter()
        .filter_map(|row| {
            let row = row.as_object()?;
            let deleted = row
                .get("@odata.context")
                .and_then(Value::as_str)
                .is_some_and(|c| c.ends_with("$deletedEntity"));
            if deleted {
                return Some(Record {
                    id: row.get("id")?.as_str()?.to_string(),
                    modified_at: None,
                    deleted: true,
                    fields: Map::new(),
                    listed_until: None,
                });
            }
            let id = row.get(key)?.as_str()?.to_string();
            Some(Record {
                modified_at: row
                    .get("modifiedon")
                    .and_then(Value::as_str)
                    .and_then(parse_time),
                id,
                deleted: false,
                fields: row.clone(),
                listed_until: None,
            })
        })
        .collect()
}

fn prefer(page_size: usize, track_changes: bool) -> String {
    let size = format!("odata.maxpagesize={}", page_size.clamp(1, MAX_PAGE_SIZE));
    if track_changes {
        format!("odata.track-changes,{size}")
    } else {
        size
    }
}

#[async_trait]
impl Pull for Dynamics365 {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let key = primary_key(&conn.settings, &request.entity);
        let tracking = Self::change_tracking(&conn.settings, request);
        let is_link = |c: &str| c.starts_with("http://") || c.starts_with("https://");
        let (url, query) = match (&request.page_token, &request.cursor) {
            (Some(next), _) => (next.clone(), None),
            // A poll's cursor, from before change tracking was on: its deletions were never
            // seen, so the entity is read from the start and compared.
            (None, Some(cursor)) if tracking && !is_link(cursor) => {
                return Err(ProviderError::resync_required(
                    "the cursor is a poll's, and change tracking is on",
                ));
            }
            (None, Some(delta)) if tracking && is_link(delta) => {
                // A delta link reads the columns its first round selected: a column since
                // added to the mapping would arrive only with the row's next change.
                if !selects_all(delta, &select(request, &key)?) {
                    return Err(ProviderError::resync_required(
                        "the mapping reads columns the delta link does not select",
                    ));
                }
                (delta.clone(), None)
            }
            (None, cursor) => {
                if !is_column(&request.entity) {
                    return Err(ProviderError::new(
                        ErrorCode::ValidationError,
                        format!("`{}` is not a Dataverse entity set", request.entity),
                    ));
                }
                let mut params = vec![("$select", select(request, &key)?)];
                if !tracking {
                    let mut conditions: Vec<String> =
                        request.filters.iter().map(|f| format!("({f})")).collect();
                    if let Some(cursor) = cursor {
                        let since = parse_time(cursor).ok_or_else(|| {
                            ProviderError::resync_required(format!(
                                "`{cursor}` is not a modifiedon cursor"
                            ))
                        })?;
                        conditions.insert(
                            0,
                            format!(
                                "modifiedon ge {}",
                                request
                                    .read_from(since, MODIFIED_LOOKBACK)
                                    .to_rfc3339_opts(SecondsFormat::Secs, true)
                            ),
                        );
                    }
                    if !conditions.is_empty() {
                        params.push(("$filter", conditions.join(" and ")));
                    }
                    params.push(("$orderby", format!("modifiedon asc,{key} asc")));
                }
                // Encoded: a filter's `&`, `+`, `#` or `%` is the filter's, not the URL's.
                let url = crate::api::endpoint(
                    &Self::api_root(conn)?,
                    &format!("/{}", request.entity),
                    &params,
                )?;
                let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (
                    url,
                    Some(format!("GET {}?{}", request.entity, query.join("&"))),
                )
            }
        };
        let body = self
            .get(conn, &url, &prefer(request.page_size, tracking))
            .await?;
        let records = records_of(&body, &key);
        let cursor = if tracking {
            body["@odata.deltaLink"].as_str().map(str::to_string)
        } else {
            records
                .iter()
                .filter_map(|r| r.modified_at)
                .max()
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        };
        Ok(Page {
            unreadable: Vec::new(),
            records,
            next_page: body["@odata.nextLink"].as_str().map(str::to_string),
            query,
            stop_after: None,
            cursor,
        })
    }

    /// Change tracking's first round lists every row; a poll, filtered, leaves rows out.
    fn lists_everything_from_start(
        &self,
        settings: &Map<String, Value>,
        request: &FetchRequest,
    ) -> bool {
        Self::change_tracking(settings, request)
    }

    /// Rows Dataverse no longer returns by id.
    async fn gone(
        &self,
        conn: &mut Connection,
        entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        crate::gone_unless_found(self, conn, entity, ids, IDS_PER_QUERY).await
    }

    fn newer_cursor(&self, earlier: String, later: String) -> String {
        // Delta links follow one another; modifiedon cursors are a high-water mark.
        match (parse_time(&earlier), parse_time(&later)) {
            (Some(a), Some(b)) if a > b => earlier,
            _ => later,
        }
    }

    fn version_of(&self, record: &Record) -> Option<String> {
        record
            .fields
            .get("@odata.etag")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        parse_time(cursor)
    }

    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        let key = primary_key(&conn.settings, &request.entity);
        // The ids come from deliveries: only GUIDs reach the query.
        let mut ids: Vec<String> = ids
            .iter()
            .map(|id| id.to_ascii_lowercase())
            .filter(|id| is_guid(id))
            .collect();
        ids.sort();
        ids.dedup();
        let columns = select(request, &key)?;
        let root = Self::api_root(conn)?;
        let mut records = Vec::with_capacity(ids.len());
        // A row the integration's or the mapping's filters leave out is not read, as a poll
        // would not read it.
        let filtered: String = request
            .filters
            .iter()
            .map(|f| format!(" and ({f})"))
            .collect();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let values: Vec<String> = chunk.iter().map(|id| format!("'{id}'")).collect();
            let mut url = crate::api::endpoint(
                &root,
                &format!("/{}", request.entity),
                &[
                    ("$select", columns.clone()),
                    (
                        "$filter",
                        format!(
                            "Microsoft.Dynamics.CRM.In(PropertyName='{key}',PropertyValues=[{}]){filtered}",
                            values.join(",")
                        ),
                    ),
                ],
            )?;
            loop {
                let body = self.get(conn, &url, &prefer(MAX_PAGE_SIZE, false)).await?;
                records.extend(records_of(&body, &key));
                match body["@odata.nextLink"].as_str() {
                    Some(next) => url = next.to_string(),
                    None => break,
                }
            }
        }
        Ok(records)
    }
}

/// The row's version as Dataverse reports it (`W/"72201545"`), for `If-Match`.
fn version_of(row: &Value) -> Option<String> {
    row["@odata.etag"].as_str().map(str::to_string)
}

impl Dynamics365 {
    /// Sends a write to `url` with the Web API's headers and `extra` ones; answers with the row
    /// as it now is (`Prefer: return=representation`).
    async fn write(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        extra: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let answer = self
            .api
            .send(conn, method, url, &write_headers(extra), body)
            .await?;
        Ok(answer.body)
    }

    fn row_url(conn: &Connection, write: &RecordWrite) -> Result<String, ProviderError> {
        let id = write
            .external_id
            .as_deref()
            .map(str::to_ascii_lowercase)
            .filter(|id| is_guid(id))
            .ok_or_else(|| {
                ProviderError::new(ErrorCode::ValidationError, "a Dataverse row id is a GUID")
            })?;
        if !is_column(&write.entity) {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{}` is not a Dataverse entity set", write.entity),
            ));
        }
        Ok(format!("{}/{}({id})", Self::api_root(conn)?, write.entity))
    }
}

impl Dynamics365 {
    /// The row whose `write.key_field` column holds the write's idempotency key: the one a
    /// create made, though its answer was lost.
    async fn find_by_key(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Option<Value>, ProviderError> {
        if !is_column(&write.entity) {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{}` is not a Dataverse entity set", write.entity),
            ));
        }
        let key_field = write.create_key()?;
        if !is_column(key_field) {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{key_field}` is not a column name"),
            ));
        }
        let root = Self::api_root(conn)?;
        let filter = format!(
            "{key_field} eq '{}'",
            write.idempotency_key.replace('\'', "''")
        );
        let lookup = crate::api::endpoint(
            &root,
            &format!("/{}", write.entity),
            &[("$filter", filter), ("$top", "1".into())],
        )?;
        let found = self
            .api
            .send(
                conn,
                Method::GET,
                &lookup,
                &[
                    ("OData-MaxVersion", "4.0".into()),
                    ("OData-Version", "4.0".into()),
                ],
                None,
            )
            .await?;
        Ok(found.body["value"]
            .as_array()
            .and_then(|rows| rows.first())
            .cloned())
    }
}

/// Writes rows. A create keeps the write's idempotency key in a column (`key_field`) and
/// looks it up first, so that a retried create finds the row a lost answer left behind. Updates never create
/// (`If-Match: *`, or the expected version, which Dataverse checks where the table has
/// optimistic concurrency: a mismatch is a [`ErrorCode::Conflict`]).
#[async_trait]
impl WriteBack for Dynamics365 {
    async fn create(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        if !is_column(&write.entity) {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{}` is not a Dataverse entity set", write.entity),
            ));
        }
        let key_field = write.create_key()?;
        let key = primary_key(&conn.settings, &write.entity);
        let root = Self::api_root(conn)?;
        // A first attempt may have created the row before its answer was lost.
        if let Some(row) = self.find_by_key(conn, write).await?
            && let Some(id) = row[&key].as_str()
        {
            // The row holds what the first attempt sent; the shard may have changed since.
            // It is written as asked now, over the version just read.
            let found = RecordWrite {
                external_id: Some(id.to_string()),
                expected_version: version_of(&row),
                ..write.clone()
            };
            return self.update(conn, &found).await;
        }
        let url = format!("{root}/{}", write.entity);
        let mut fields = write.fields.clone();
        fields.insert(
            key_field.to_string(),
            Value::String(write.idempotency_key.clone()),
        );
        let body = Value::Object(fields);
        // Sent once: a create whose answer is lost is looked up again (above) by the engine's
        // retry, never posted again blindly.
        let row = self
            .api
            .send_once(conn, Method::POST, &url, &write_headers(&[]), Some(&body))
            .await?
            .body;
        let external_id = row[&key].as_str().map(str::to_string).ok_or_else(|| {
            ProviderError::new(
                ErrorCode::ValidationError,
                format!("Dataverse created a row without its `{key}`"),
            )
        })?;
        Ok(Written {
            external_id,
            version: version_of(&row),
        })
    }

    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        let url = Self::row_url(conn, write)?;
        let if_match = write
            .expected_version
            .clone()
            .unwrap_or_else(|| "*".to_string());
        let body = Value::Object(write.fields.clone());
        let row = self
            .write(
                conn,
                Method::PATCH,
                &url,
                &[("If-Match", if_match)],
                Some(&body),
            )
            .await?;
        Ok(Written {
            external_id: write.external_id.clone().unwrap_or_default(),
            version: version_of(&row),
        })
    }

    async fn delete(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<(), ProviderError> {
        if write.external_id.is_none() {
            // The row a create whose answer was lost made, if it did.
            let key = primary_key(&conn.settings, &write.entity);
            let Some(id) = self
                .find_by_key(conn, write)
                .await?
                .and_then(|row| row[&key].as_str().map(str::to_string))
            else {
                return Ok(());
            };
            let found = RecordWrite {
                external_id: Some(id),
                ..write.clone()
            };
            return self.delete(conn, &found).await;
        }
        let url = Self::row_url(conn, write)?;
        let headers: Vec<(&str, String)> = write
            .expected_version
            .iter()
            .map(|v| ("If-Match", v.clone()))
            .collect();
        self.write(conn, Method::DELETE, &url, &headers, None)
            .await
            .or_gone()
            .map(drop)
    }
}

#[async_trait]
impl TokenRefresh for Dynamics365 {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.api.refresh(conn).await
    }
}

impl Provider for Dynamics365 {
    fn name(&self) -> &'static str {
        "dynamics365"
    }

    fn applies_filters(&self) -> bool {
        true
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        crate::http::check_url(settings, "environmentUrl")?
            .ok_or("connection.environmentUrl is required (https://{org}.crm.dynamics.com)")?;
        microsoft::check_identity(settings)?;
        if let Some(version) = settings.get("apiVersion") {
            let ok = version
                .as_str()
                .and_then(|v| v.strip_prefix('v'))
                .is_some_and(|n| n.parse::<f64>().is_ok());
            if !ok {
                return Err("connection.apiVersion must look like `v9.2`".into());
            }
        }
        if let Some(org) = settings.get("organizationId") {
            let org = org
                .as_str()
                .map(str::to_ascii_lowercase)
                .filter(|o| is_guid(o))
                .ok_or("connection.organizationId must be the organization's GUID")?;
            settings.insert("organizationId".into(), Value::String(org));
        }
        if settings
            .get("changeTracking")
            .is_some_and(|v| !v.is_boolean())
        {
            return Err("connection.changeTracking must be true or false".into());
        }
        match settings.get("logicalNames") {
            None => {}
            Some(Value::Object(names))
                if names.values().all(|v| v.as_str().is_some_and(is_column)) => {}
            Some(_) => {
                return Err(
                    "connection.logicalNames must map entity sets to table logical names".into(),
                );
            }
        }
        match settings.get("primaryKeys") {
            None => {}
            Some(Value::Object(keys))
                if keys.values().all(|v| v.as_str().is_some_and(is_column)) => {}
            Some(_) => {
                return Err(
                    "connection.primaryKeys must map entity sets to primary key columns".into(),
                );
            }
        }
        Ok(())
    }

    fn token_refresh(&self) -> Option<&dyn TokenRefresh> {
        Some(self)
    }

    fn webhooks(&self) -> Option<&dyn Webhooks> {
        Some(self)
    }

    fn write_back(&self) -> Option<&dyn WriteBack> {
        Some(self)
    }
}

/// A `RemoteExecutionContext` as far as the receiver reads it.
struct ExecutionContext {
    organization_id: String,
    request_id: String,
    message: String,
    table: String,
    record_id: String,
}

fn read_context(request: &WebhookRequest<'_>) -> Result<ExecutionContext, WebhookError> {
    let malformed = |why: &str| WebhookError::Malformed(format!("a Dataverse delivery {why}"));
    let body: Value = request
        .body
        .and_then(|b| serde_json::from_str(b).ok())
        .ok_or_else(|| malformed("is a RemoteExecutionContext in JSON; this body is not JSON"))?;
    let text = |name: &str| {
        body[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| malformed(&format!("has no {name}")))
    };
    let organization_id = text("OrganizationId")?.to_ascii_lowercase();
    if !is_guid(&organization_id) {
        return Err(malformed("has an OrganizationId that is not a GUID"));
    }
    let request_id = body["RequestId"]
        .as_str()
        .map(str::to_string)
        .or_else(|| request.header("x-request-id").map(str::to_string))
        .ok_or_else(|| malformed("has no RequestId"))?;
    Ok(ExecutionContext {
        organization_id,
        request_id,
        message: text("MessageName")?,
        table: text("PrimaryEntityName")?,
        record_id: text("PrimaryEntityId")?.to_ascii_lowercase(),
    })
}

#[async_trait]
impl Webhooks for Dynamics365 {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        let context = read_context(request)?;
        Ok(WebhookRoute::To(vec![RouteKey::Setting {
            name: "organizationId",
            value: context.organization_id,
        }]))
    }

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        _key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError> {
        let expected = conn.credentials.get("webhook_key").ok_or_else(|| {
            WebhookError::Forged(
                "the integration has no webhook_key to check deliveries with".into(),
            )
        })?;
        // The header first: behind the Functions host's `function` auth level, `?code=` is the
        // host's key, and the endpoint authenticates with HttpHeader.
        let given = request
            .header("x-webhook-key")
            .or_else(|| request.query.get("code").map(String::as_str))
            .ok_or_else(|| WebhookError::Forged("the delivery brings no key".into()))?;
        if !crate::same_secret(given, expected) {
            return Err(WebhookError::Forged("the delivery's key is wrong".into()));
        }
        let context = read_context(request)?;
        let entity = entity_set(&conn.settings, &context.table);
        // A request that changes many rows (`UpdateMultiple`, a cascade) runs the step once a
        // row under its one RequestId: the message and the row tell its notifications apart,
        // and a redelivery of one keeps its id. A deleted row cannot be read back, so its
        // notification says it is deleted: an incremental sync would not see it where the
        // integration polls (`changeTracking: false`, or filters), which reads no deletions.
        if !is_guid(&context.record_id) {
            return Err(WebhookError::Malformed(
                "a Dataverse delivery's PrimaryEntityId is not a GUID".into(),
            ));
        }
        let id = format!(
            "{}:{}:{}",
            context.request_id, context.message, context.record_id
        );
        let record_ids = vec![context.record_id];
        let notification = match context.message.as_str() {
            "Delete" => WebhookNotification::Deleted {
                id,
                entity,
                record_ids,
            },
            _ => WebhookNotification::Records {
                id,
                entity,
                record_ids,
            },
        };
        Ok(WebhookDelivery {
            notifications: vec![notification],
            answer: WebhookAnswer::new(200, "application/json", "{}"),
        })
    }
}

/// The headers of a write: OData 4.0, the written row in the answer, and `extra`.
fn write_headers<'a>(extra: &[(&'a str, String)]) -> Vec<(&'a str, String)> {
    let mut headers = vec![
        ("OData-MaxVersion", "4.0".to_string()),
        ("OData-Version", "4.0".to_string()),
        ("Prefer", "return=representation".to_string()),
    ];
    headers.extend(extra.iter().cloned());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_delta_link_serves_a_mapping_only_if_it_selects_every_column_it_reads() {
        let link = "https://contoso.crm4.dynamics.com/api/data/v9.2/contacts?$select=contactid,modifiedon,fullname&$deltatoken=919058%2108%2f22%2f2017";
        assert!(selects_all(link, "contactid,modifiedon,fullname"));
        assert!(selects_all(link, "contactid,FullName"));
        assert!(!selects_all(
            link,
            "contactid,modifiedon,fullname,telephone1"
        ));
        let encoded = "https://contoso.crm4.dynamics.com/api/data/v9.2/contacts?%24select=contactid%2Cfullname&%24deltatoken=1";
        assert!(selects_all(encoded, "contactid,fullname"));
        assert!(!selects_all(encoded, "contactid,emailaddress1"));
        let everything = "https://contoso.crm4.dynamics.com/api/data/v9.2/contacts?$deltatoken=1";
        assert!(selects_all(everything, "contactid,telephone1"));
    }

    #[test]
    fn links_are_followed_on_the_environment_whatever_the_case_it_was_given_in() {
        let environment = "https://Contoso.crm4.dynamics.com";
        let next = "https://contoso.crm4.dynamics.com/api/data/v9.2/contacts?$skiptoken=x";
        assert!(on_environment(environment, next));
        assert!(on_environment("https://contoso.crm4.dynamics.com/", next));
        assert!(!on_environment(
            environment,
            "https://contoso.crm4.dynamics.com.evil.example/api/data/v9.2/contacts"
        ));
        assert!(!on_environment(
            environment,
            "http://contoso.crm4.dynamics.com/api/data/v9.2/contacts"
        ));
        assert!(!on_environment("not a url", next));
    }

    #[test]
    fn entity_sets_and_tables_are_named_both_ways() {
        let plain = Map::new();
        assert_eq!(primary_key(&plain, "accounts"), "accountid");
        assert_eq!(primary_key(&plain, "opportunities"), "opportunityid");
        assert_eq!(primary_key(&plain, "phonecalls"), "activityid");
        assert_eq!(primary_key(&plain, "faxes"), "activityid");
        assert_eq!(logical_name(&plain, "customeraddresses"), "customeraddress");
        assert_eq!(entity_set(&plain, "fax"), "faxes");
        assert_eq!(entity_set(&plain, "mailbox"), "mailboxes");
        assert_eq!(logical_name(&plain, "queues"), "queue");
        assert_eq!(logical_name(&plain, "new_sizes"), "new_size");
        assert_eq!(logical_name(&plain, "new_batches"), "new_batch");
        // A custom activity table is keyed as every activity is; its name does not say so.
        let keyed = settings(json!({"primaryKeys": {"new_visits": "activityid"}}));
        assert_eq!(primary_key(&keyed, "new_visits"), "activityid");
        assert!(
            Dynamics365::new()
                .check_connection(&mut settings(json!({
                    "environmentUrl": "https://contoso.crm4.dynamics.com",
                    "tenantId": "contoso.onmicrosoft.com",
                    "primaryKeys": {"new_visits": 7}
                })))
                .unwrap_err()
                .contains("primaryKeys")
        );
        assert_eq!(entity_set(&plain, "contact"), "contacts");
        assert_eq!(entity_set(&plain, "opportunity"), "opportunities");
        assert_eq!(entity_set(&plain, "msfp_survey"), "msfp_surveys");
        assert_eq!(
            entity_set(&plain, "msdyn_customerjourney"),
            "msdyn_customerjourneys"
        );
        assert_eq!(logical_name(&plain, "msfp_surveys"), "msfp_survey");
        let custom = settings(json!({"logicalNames": {"new_projectses": "new_projects"}}));
        assert_eq!(primary_key(&custom, "new_projectses"), "new_projectsid");
        assert_eq!(entity_set(&custom, "new_projects"), "new_projectses");
    }

    #[test]
    fn connection_settings_are_checked_and_named() {
        let dynamics = Dynamics365::new();
        let mut ok = settings(json!({
            "environmentUrl": "https://contoso.crm4.dynamics.com/",
            "tenantId": "contoso.onmicrosoft.com",
            "organizationId": "4EF5B371-0000-4000-8000-000000000001"
        }));
        dynamics.check_connection(&mut ok).unwrap();
        assert_eq!(ok["environmentUrl"], "https://contoso.crm4.dynamics.com");
        assert_eq!(ok["organizationId"], "4ef5b371-0000-4000-8000-000000000001");
        for (bad, named) in [
            (json!({"tenantId": "t"}), "connection.environmentUrl"),
            (
                json!({"environmentUrl": "http://contoso.crm.dynamics.com", "tenantId": "t"}),
                "connection.environmentUrl",
            ),
            (
                json!({"environmentUrl": "https://c.crm.dynamics.com"}),
                "connection.tenantId",
            ),
            (
                json!({"environmentUrl": "https://c.crm.dynamics.com", "tenantId": "t", "organizationId": "x"}),
                "connection.organizationId",
            ),
            (
                json!({"environmentUrl": "https://c.crm.dynamics.com", "tenantId": "t", "apiVersion": "9.2"}),
                "connection.apiVersion",
            ),
            (
                json!({"environmentUrl": "https://c.crm.dynamics.com", "tenantId": "t", "changeTracking": "yes"}),
                "connection.changeTracking",
            ),
        ] {
            let err = dynamics
                .check_connection(&mut settings(bad.clone()))
                .unwrap_err();
            assert!(err.starts_with(named), "{bad}: {err}");
        }
    }

    #[test]
    fn rows_and_deleted_entities_become_records() {
        let body = json!({"value": [
            {"@odata.etag": "W/\"101\"", "accountid": "a1", "name": "Acme", "modifiedon": "2026-11-22T07:00:00Z"},
            {"@odata.context": "https://x/api/data/v9.2/$metadata#accounts/$deletedEntity", "id": "a2", "reason": "deleted"}
        ]});
        let records = records_of(&body, "accountid");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].id, "a1");
        assert_eq!(records[0].fields["name"], "Acme");
        assert!(records[0].modified_at.is_some());
        assert!(records[1].deleted && records[1].id == "a2");
    }

    #[test]
    fn selected_columns_are_plain_names() {
        let request = FetchRequest {
            entity: "accounts".into(),
            fields: vec!["name".into(), "accountid".into(), "Revenue".into()],
            cursor: None,
            page_token: None,
            filters: vec![],
            page_size: 2000,
            cursor_read_at: None,
        };
        assert_eq!(
            select(&request, "accountid").unwrap(),
            "accountid,modifiedon,name,revenue"
        );
        let bad = FetchRequest {
            fields: vec!["name,secret".into()],
            ..request
        };
        assert!(select(&bad, "accountid").is_err());
    }
}
