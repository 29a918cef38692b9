//! Google Drive over the Drive API v3.
//!
//! * One entity, `files`. A full sync asks for a `startPageToken` first, then lists the files
//!   (`files.list`, `nextPageToken`, up to 1,000 a page), and keeps that start token as the
//!   cursor, so changes made while it listed are read by the next sync. An incremental sync
//!   reads `changes.list` from the cursor; its last page's `newStartPageToken` is the next
//!   cursor. A change with `removed: true`, or a file in the trash, is a deletion. A page token
//!   Drive refuses restarts the entity from the beginning, and a listing from the beginning
//!   after the entity was synced (that restart, a full sync) is compared: a file it leaves
//!   out was deleted or trashed meanwhile. A search it says came back incomplete compares
//!   nothing.
//! * Shared drives: `driveId` syncs one shared drive; `includeSharedDrives` adds every shared
//!   drive the user can see to My Drive. A cursor is kept with the drives it reads
//!   (`drive:{id}`, `all-drives` or `my-drive`, then the token): one of other drives, after
//!   either setting changed, starts the entity over, since its token names nothing the new
//!   drives already held.
//! * Tokens: Google's OAuth endpoint with the refresh-token grant. Google does not rotate
//!   refresh tokens; a revoked one answers `invalid_grant`. Access tokens last an hour.
//! * Limits: 403 `userRateLimitExceeded` / `rateLimitExceeded` and 429 are retried with
//!   backoff like a 503; the adapter paces itself at 10 requests a second per integration.
//! * Push notifications: a `changes.watch` channel per integration delivers to
//!   `/api/webhooks/google_drive` with the channel's id (the routing key) and its secret token
//!   in `X-Goog-Channel-Token`. The first message, `sync`, is acknowledged; `change` asks for a
//!   catch-up sync (notifications carry no file). Channels cannot be renewed: a new one
//!   replaces the old, which is stopped with its `resourceId`.
//!
//! * Write-back renames a file, describes it and moves it (`files.update`; a move adds and
//!   removes parents by query parameters, as Drive wants), and moves a file Castiel deleted
//!   to the trash, where it can be restored. Drive v3 takes no condition on a write, so the
//!   adapter reads the file's `version` just before and refuses to write over a newer one; a
//!   change made at Drive in the milliseconds between is overwritten. It creates no file: a
//!   file has content, and a shard made in Castiel has none.
//!
//! Connection settings: `tokenUrl` (default `https://oauth2.googleapis.com/token`), `apiBaseUrl`
//! (default `https://www.googleapis.com/drive/v3`), `driveId`, `includeSharedDrives`.
//! Credentials: `client_id`, `client_secret`, `refresh_token` (scope
//! `https://www.googleapis.com/auth/drive.readonly`; for write-back,
//! `https://www.googleapis.com/auth/drive`: Google's refresh tokens carry the scopes consented,
//! and a read-only one is answered 403 `insufficientPermissions`).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::api::{Api, Dialect, TokenRequest, endpoint};
use crate::oauth::{ClientAuth, Grant};
use crate::{
    Connection, ErrorCode, FetchRequest, LeftOut, Page, Provider, ProviderError, Pull, RateLimiter,
    Record, RecordWrite, RouteKey, SubscriptionInfo, SubscriptionRequest, Subscriptions,
    TokenRefresh, Unreadable, WebhookAnswer, WebhookDelivery, WebhookError, WebhookNotification,
    WebhookRequest, WebhookRoute, Webhooks, WriteBack, Written,
};
use crate::{Kept, OrGone, keep_scoped};

pub const ENTITY: &str = "files";
const DEFAULT_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_API_BASE: &str = "https://www.googleapis.com/drive/v3";
/// The most files or changes Drive returns per page.
const MAX_PAGE_SIZE: usize = 1000;
/// What a write to a file may set; Drive sets the rest (size, version, links, times).
const WRITABLE: [&str; 3] = ["name", "description", "parents"];
/// Drive keeps a changes channel for a week at most.
const MAX_CHANNEL_DAYS: i64 = 7;
/// The file fields every sync reads; a mapping may ask for more.
const FILE_FIELDS: &[&str] = &[
    "id",
    "name",
    "mimeType",
    "modifiedTime",
    "trashed",
    "parents",
    "size",
    "version",
    "driveId",
    "webViewLink",
];

pub struct GoogleDrive {
    api: Api<Google>,
}

impl Default for GoogleDrive {
    fn default() -> Self {
        Self::new()
    }
}

/// Google's APIs as the shared request loop speaks them.
struct Google;

impl Dialect for Google {
    fn service(&self) -> &'static str {
        "Google Drive"
    }

    fn token_request(&self, conn: &Connection) -> TokenRequest {
        TokenRequest {
            url: conn
                .setting("tokenUrl")
                .unwrap_or(DEFAULT_TOKEN_URL)
                .to_string(),
            extra: Vec::new(),
            client_auth: ClientAuth::Form,
            grant: Some(Grant::RefreshToken),
        }
    }

    /// Google says "slow down" with a 403 as often as with a 429; only the reason tells it
    /// from a permission refused.
    fn error(&self, status: StatusCode, body: &Value) -> ProviderError {
        let reason = body["error"]["errors"][0]["reason"].as_str().unwrap_or("");
        let message = body["error"]["message"].as_str().unwrap_or("");
        let code = match (status.as_u16(), reason) {
            (403, "userRateLimitExceeded" | "rateLimitExceeded") => ErrorCode::RateLimit,
            // A request Drive will never take, whoever asks: not a credentials problem.
            (403, "fieldNotWritable" | "cannotAddParent" | "teamDrivesParentLimit") => {
                ErrorCode::ValidationError
            }
            // A notification address Drive will not call (not HTTPS, a domain not verified
            // for the project), whatever the status: the address's fault, not the
            // credentials'.
            (_, reason) if reason.starts_with("push.") => ErrorCode::ValidationError,
            _ => crate::http::status_code(status),
        };
        let mut text = format!("{status}");
        if !reason.is_empty() {
            text.push_str(&format!(" {reason}"));
        }
        if !message.is_empty() {
            text.push_str(&format!(": {message}"));
        }
        // What the error is about: a page token Drive no longer takes says so here.
        if let Some(location) = body["error"]["errors"][0]["location"]
            .as_str()
            .filter(|l| !l.is_empty())
        {
            text.push_str(&format!(" (at {location})"));
        }
        if reason == "dailyLimitExceeded" {
            // The project's daily allocation: back at midnight Pacific time, which Drive does
            // not name.
            return ProviderError::quota(text);
        }
        ProviderError::new(code, text)
    }
}

/// Where a sync stands between pages, and of which drives (`scope`, as the cursor names
/// them): a read the integration's drives changed under, between two of its jobs, is read
/// again from the start, or its pages would be kept as a read of drives it never listed.
/// (Empty in tokens from before they said.)
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "phase", rename_all = "lowercase")]
enum Position {
    /// Listing files for a full sync; `start` becomes the cursor when the list ends, unless
    /// Drive said a page of it was incomplete.
    List {
        start: String,
        next: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        incomplete: bool,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        scope: String,
    },
    /// Reading changes.
    Changes {
        next: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        scope: String,
    },
}

impl Position {
    /// Refuses a position of drives other than `scope`. A listing from before positions named
    /// their drives may be of others, and would leave its start token as a cursor of these: it
    /// is listed again. Changes read on from such a token are kept under `scope` by the
    /// cursor they end with, which names its drives.
    fn of(self, scope: &str) -> Result<Self, ProviderError> {
        match &self {
            Self::List { scope: read, .. } if read.is_empty() => {
                Err(ProviderError::resync_required(
                    "a listing begun before page tokens named their drives is listed again",
                ))
            }
            Self::List { scope: read, .. } | Self::Changes { scope: read, .. }
                if read.is_empty() || read == scope =>
            {
                Ok(self)
            }
            Self::List { scope: read, .. } | Self::Changes { scope: read, .. } => {
                Err(ProviderError::resync_required(format!(
                    "the drives to read changed from `{read}` to `{scope}` while they were read"
                )))
            }
        }
    }
}

impl GoogleDrive {
    pub fn new() -> Self {
        Self {
            api: Api::new(Google, RateLimiter::new(10)),
        }
    }

    fn base(conn: &Connection) -> &str {
        conn.setting("apiBaseUrl").unwrap_or(DEFAULT_API_BASE)
    }

    /// The query parameters that say which drives a request covers.
    fn drive_params(conn: &Connection) -> Vec<(&'static str, String)> {
        let mut params = vec![("supportsAllDrives", "true".to_string())];
        if let Some(drive) = conn.setting("driveId") {
            params.push(("includeItemsFromAllDrives", "true".into()));
            params.push(("driveId", drive.to_string()));
        } else if Self::includes_shared_drives(conn) {
            params.push(("includeItemsFromAllDrives", "true".into()));
        }
        params
    }

    fn includes_shared_drives(conn: &Connection) -> bool {
        conn.settings
            .get("includeSharedDrives")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    async fn get(
        &self,
        conn: &mut Connection,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Value, ProviderError> {
        self.call(conn, Method::GET, path, params, None).await
    }

    async fn post(
        &self,
        conn: &mut Connection,
        path: &str,
        params: &[(&str, String)],
        body: &Value,
    ) -> Result<Value, ProviderError> {
        self.call(conn, Method::POST, path, params, Some(body))
            .await
    }

    async fn call(
        &self,
        conn: &mut Connection,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let url = endpoint(Self::base(conn), path, params)?;
        Ok(self.api.send(conn, method, &url, &[], body).await?.body)
    }

    /// One file's path, its id checked to be one.
    fn file_path(id: &str) -> Result<String, ProviderError> {
        if !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            Ok(format!("/files/{id}"))
        } else {
            Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("`{id}` is not a Drive file id"),
            ))
        }
    }

    /// Which drives the integration reads, as a cursor is kept with it: a changes token of
    /// other drives (before `driveId` or `includeSharedDrives` changed) reads nothing of the
    /// files these drives already had.
    fn scope(conn: &Connection) -> String {
        match conn.setting("driveId") {
            Some(drive) => format!("drive:{drive}"),
            None if Self::includes_shared_drives(conn) => "all-drives".into(),
            None => "my-drive".into(),
        }
    }

    async fn start_token(&self, conn: &mut Connection) -> Result<String, ProviderError> {
        let params = Self::drive_params(conn);
        let body = self.get(conn, "/changes/startPageToken", &params).await?;
        body["startPageToken"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                ProviderError::new(ErrorCode::ValidationError, "Drive gave no startPageToken")
            })
    }
}

/// The file fields to ask for: the ones every sync reads and the mapping's (top level).
fn file_fields(request: &FetchRequest) -> String {
    let mut fields: Vec<String> = FILE_FIELDS.iter().map(|f| f.to_string()).collect();
    for field in &request.fields {
        let top = field.split('.').next().unwrap_or_default();
        if !top.is_empty()
            && top.chars().all(|c| c.is_ascii_alphanumeric())
            && !fields.iter().any(|f| f == top)
        {
            fields.push(top.to_string());
        }
    }
    fields.join(",")
}

fn record_of(file: &Map<String, Value>) -> Option<Record> {
    let id = file.get("id")?.as_str()?.to_string();
    Some(Record {
        id,
        modified_at: file
            .get("modifiedTime")
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        deleted: file
            .get("trashed")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        fields: file.clone(),
        listed_until: None,
    })
}

fn check_entity(entity: &str) -> Result<(), ProviderError> {
    if entity == ENTITY {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("Google Drive syncs `{ENTITY}`, not `{entity}`"),
        ))
    }
}

/// The changes token the engine kept for `scope`; one kept before tokens named their drives is
/// read as it is.
fn token_of<'a>(scope: &str, kept: &'a str) -> Result<&'a str, ProviderError> {
    match crate::kept_under(scope, kept, "changes token")? {
        Kept::Scoped(token) | Kept::Unscoped(token) => Ok(token),
    }
}

/// Whether `e` is Drive refusing the page token it was given (400 `invalid` at `pageToken`),
/// not any other request it will not take (a field mask naming a field Drive does not know):
/// only the first means the cursor is dead and the drive must be listed again.
fn is_bad_page_token(e: &ProviderError) -> bool {
    e.code == ErrorCode::ValidationError
        && e.message.contains("400")
        && e.message.contains("(at pageToken)")
}

#[async_trait]
impl Pull for GoogleDrive {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        check_entity(&request.entity)?;
        let scope = Self::scope(conn);
        let position = match (&request.page_token, &request.cursor) {
            (Some(token), _) => serde_json::from_str::<Position>(token)
                .map_err(|_| {
                    ProviderError::new(ErrorCode::ValidationError, "unreadable Drive page token")
                })?
                .of(&scope)?,
            (None, Some(cursor)) => Position::Changes {
                next: token_of(&scope, cursor)?.to_string(),
                scope: scope.clone(),
            },
            (None, None) => Position::List {
                start: self.start_token(conn).await?,
                next: String::new(),
                incomplete: false,
                scope: scope.clone(),
            },
        };
        let size = request.page_size.clamp(1, MAX_PAGE_SIZE).to_string();
        let fields = file_fields(request);
        let mut params = Self::drive_params(conn);
        params.push(("pageSize", size));
        match position {
            Position::List {
                start,
                next,
                incomplete,
                ..
            } => {
                params.push((
                    "fields",
                    format!("nextPageToken,incompleteSearch,files({fields})"),
                ));
                params.push(("q", "trashed = false".into()));
                if conn.setting("driveId").is_some() {
                    params.push(("corpora", "drive".into()));
                } else if params
                    .iter()
                    .any(|(n, _)| *n == "includeItemsFromAllDrives")
                {
                    params.push(("corpora", "allDrives".into()));
                }
                if !next.is_empty() {
                    params.push(("pageToken", next));
                }
                let body = self.get(conn, "/files", &params).await?;
                let records = body["files"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object)
                    .filter_map(record_of)
                    .collect();
                // A search of every drive may leave files out and say so. The files it left
                // out would be missed until they change if the listing became the cursor: the
                // next sync lists again instead, and the run says why.
                let incomplete_here = body["incompleteSearch"].as_bool() == Some(true);
                let incomplete = incomplete || incomplete_here;
                let unreadable = incomplete_here
                    .then(|| Unreadable {
                        record_id: None,
                        message: "Drive's search came back incomplete (incompleteSearch): the \
                                  files it left out are looked for again by the next sync; \
                                  a shared drive named by `driveId` is listed whole"
                            .into(),
                    })
                    .into_iter()
                    .collect();
                let (next_page, cursor) = match body["nextPageToken"].as_str() {
                    Some(next) => (
                        Some(Position::List {
                            start,
                            next: next.to_string(),
                            incomplete,
                            scope: scope.clone(),
                        }),
                        None,
                    ),
                    None => (None, (!incomplete).then(|| keep_scoped(&scope, &start))),
                };
                Ok(Page {
                    unreadable,
                    records,
                    next_page: next_page.map(|p| json!(p).to_string()),
                    query: Some("files.list q=trashed = false".into()),
                    stop_after: None,
                    cursor,
                })
            }
            Position::Changes { next, .. } => {
                params.push((
                    "fields",
                    format!(
                        "nextPageToken,newStartPageToken,changes(changeType,time,removed,fileId,file({fields}))"
                    ),
                ));
                params.push(("includeRemoved", "true".into()));
                params.push(("pageToken", next));
                let body = match self.get(conn, "/changes", &params).await {
                    Err(e) if is_bad_page_token(&e) => {
                        return Err(ProviderError::resync_required(e.message));
                    }
                    other => other?,
                };
                let mut records = Vec::new();
                for change in body["changes"].as_array().into_iter().flatten() {
                    if change["changeType"].as_str().is_some_and(|t| t != "file") {
                        continue;
                    }
                    let Some(id) = change["fileId"].as_str() else {
                        continue;
                    };
                    let removed = change["removed"].as_bool().unwrap_or(false);
                    match change["file"].as_object().filter(|_| !removed) {
                        Some(file) => records.extend(record_of(file)),
                        None => records.push(Record {
                            id: id.to_string(),
                            modified_at: None,
                            deleted: true,
                            fields: Map::new(),
                            listed_until: None,
                        }),
                    }
                }
                Ok(Page {
                    unreadable: Vec::new(),
                    records,
                    next_page: body["nextPageToken"].as_str().map(|n| {
                        json!(Position::Changes {
                            next: n.into(),
                            scope: scope.clone()
                        })
                        .to_string()
                    }),
                    query: Some("changes.list".into()),
                    stop_after: None,
                    cursor: body["newStartPageToken"]
                        .as_str()
                        .map(|token| keep_scoped(&scope, token)),
                })
            }
        }
    }

    /// `files.list` lists every file not in the trash (or says its search was incomplete).
    fn lists_everything_from_start(
        &self,
        _settings: &Map<String, Value>,
        _request: &FetchRequest,
    ) -> bool {
        true
    }

    /// Files deleted, or in the trash; one still there that the listing left out (a drive no
    /// longer in the integration's scope, a file modified while the listing was paged through)
    /// stays.
    async fn gone(
        &self,
        conn: &mut Connection,
        entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        crate::gone_unless_found(self, conn, entity, ids, 1).await
    }

    /// The file's `version`, which Drive raises with every change to it.
    fn version_of(&self, record: &Record) -> Option<String> {
        record.fields.get("version")?.as_str().map(str::to_string)
    }

    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        check_entity(&request.entity)?;
        let params = [
            ("fields", file_fields(request)),
            ("supportsAllDrives", "true".to_string()),
        ];
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let file = self
                .get(conn, &Self::file_path(id)?, &params)
                .await
                .or_gone()?;
            if let Some(Value::Object(file)) = file {
                records.extend(record_of(&file));
            }
        }
        Ok(records)
    }
}

/// Renames, describes and moves files only over the version the engine read, and trashes
/// them.
#[async_trait]
impl WriteBack for GoogleDrive {
    fn writable_fields(&self, _entity: &str) -> Option<&'static [&'static str]> {
        Some(&WRITABLE)
    }

    async fn create(
        &self,
        _conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        check_entity(&write.entity)?;
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            "Drive files have content: a shard made in Castiel has none to create one from \
             (files synced from Drive are renamed, moved and trashed)",
        ))
    }

    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        check_entity(&write.entity)?;
        write.check_writable(&WRITABLE, "a Drive file")?;
        let id = write.external_id.as_deref().unwrap_or_default();
        let path = Self::file_path(id)?;
        let mut body = write.fields.clone();
        let wanted: Option<Vec<String>> = match body.remove("parents") {
            None => None,
            Some(Value::Array(ids)) => Some(
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ),
            Some(_) => {
                return Err(ProviderError::new(
                    ErrorCode::ValidationError,
                    "`parents` of a Drive file is a list of folder ids",
                ));
            }
        };
        let mut params = vec![("supportsAllDrives", "true".to_string())];
        let now = self
            .get(
                conn,
                &path,
                &[("fields", "version,parents".into()), params[0].clone()],
            )
            .await?;
        if let Some(expected) = &write.expected_version
            && now["version"].as_str() != Some(expected.as_str())
        {
            return Err(ProviderError::new(
                ErrorCode::Conflict,
                format!("the file changed at Drive since version {expected} was read"),
            ));
        }
        if let Some(wanted) = wanted {
            let held: Vec<String> = now["parents"]
                .as_array()
                .map(|ids| {
                    ids.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let apart = |from: &[String], other: &[String]| -> String {
                let ids: Vec<&str> = from
                    .iter()
                    .filter(|id| !other.contains(id))
                    .map(String::as_str)
                    .collect();
                ids.join(",")
            };
            for (name, ids) in [
                ("addParents", apart(&wanted, &held)),
                ("removeParents", apart(&held, &wanted)),
            ] {
                if !ids.is_empty() {
                    params.push((name, ids));
                }
            }
        }
        params.push(("fields", "id,version".into()));
        let url = endpoint(Self::base(conn), &path, &params)?;
        let file = self
            .api
            .send(conn, Method::PATCH, &url, &[], Some(&Value::Object(body)))
            .await?
            .body;
        Ok(Written {
            external_id: id.to_string(),
            version: file["version"].as_str().map(str::to_string),
        })
    }

    /// To the trash, which Castiel's own sync reads as a deletion and a person can undo.
    async fn delete(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<(), ProviderError> {
        check_entity(&write.entity)?;
        // Without an id, the record a create of the shard made: Drive's write-back makes none.
        let Some(id) = write.external_id.as_deref() else {
            return Ok(());
        };
        let path = Self::file_path(id)?;
        let params = [
            ("supportsAllDrives", "true".to_string()),
            ("fields", "id".into()),
        ];
        let url = endpoint(Self::base(conn), &path, &params)?;
        let trash = json!({"trashed": true});
        self.api
            .send(conn, Method::PATCH, &url, &[], Some(&trash))
            .await
            .or_gone()
            .map(drop)
    }
}

#[async_trait]
impl TokenRefresh for GoogleDrive {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.api.refresh(conn).await
    }
}

fn header<'a>(request: &'a WebhookRequest<'_>, name: &str) -> Result<&'a str, WebhookError> {
    request
        .header(name)
        .ok_or_else(|| WebhookError::Malformed(format!("a Drive notification has no {name}")))
}

#[async_trait]
impl Webhooks for GoogleDrive {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        let channel = header(request, "X-Goog-Channel-ID")?;
        Ok(WebhookRoute::To(vec![RouteKey::Subscription(
            channel.to_string(),
        )]))
    }

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError> {
        let RouteKey::Subscription(channel) = key else {
            return Err(WebhookError::Malformed(
                "a Drive notification is routed by channel".into(),
            ));
        };
        let kept = conn
            .credentials
            .get(&format!("clientState:{channel}"))
            .ok_or_else(|| {
                WebhookError::NotKept(format!("channel `{channel}` has no token kept"))
            })?;
        let given = request.header("X-Goog-Channel-Token").unwrap_or_default();
        if !crate::same_secret(given, kept) {
            return Err(WebhookError::Forged(
                "the notification's X-Goog-Channel-Token is wrong".into(),
            ));
        }
        let state = header(request, "X-Goog-Resource-State")?;
        let number = header(request, "X-Goog-Message-Number")?;
        let notifications = match state {
            // The first message of a channel says only that it works.
            "sync" => Vec::new(),
            _ => vec![WebhookNotification::CatchUp {
                id: format!("{channel}-{number}"),
                entity: ENTITY.to_string(),
            }],
        };
        Ok(WebhookDelivery {
            notifications,
            answer: WebhookAnswer::new(200, "text/plain; charset=utf-8", ""),
        })
    }
}

#[async_trait]
impl Subscriptions for GoogleDrive {
    /// The changes feed the integration reads, named with the drives it covers: a channel
    /// made before `driveId` or `includeSharedDrives` changed watches other drives, and is
    /// replaced.
    fn resources(&self, settings: &Map<String, Value>, _entities: &[String]) -> Vec<String> {
        let shared = settings
            .get("includeSharedDrives")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match settings.get("driveId").and_then(Value::as_str) {
            Some(drive) => vec![format!("changes?driveId={drive}")],
            None if shared => vec!["changes?includeItemsFromAllDrives=true".into()],
            None => vec!["changes".into()],
        }
    }

    fn max_lifetime(&self, _resource: &str) -> Duration {
        Duration::days(MAX_CHANNEL_DAYS)
    }

    async fn subscribe(
        &self,
        conn: &mut Connection,
        request: &SubscriptionRequest,
    ) -> Result<SubscriptionInfo, ProviderError> {
        // The channel id travels in every notification's headers; it is not the secret.
        let id = format!("func-sync-{}", uuid::Uuid::new_v4().simple());
        let mut params = Self::drive_params(conn);
        params.push(("pageToken", self.start_token(conn).await?));
        let body = json!({
            "id": id,
            "type": "web_hook",
            "address": request.notification_url,
            "token": request.client_state,
            "expiration": request.expires_at.timestamp_millis().to_string(),
        });
        let channel = self
            .post(conn, "/changes/watch", &params, &body)
            .await
            .map_err(|e| crate::http::without_query_of(e, &request.notification_url))?;
        let expires_at = channel["expiration"]
            .as_str()
            .and_then(|ms| ms.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(request.expires_at);
        Ok(SubscriptionInfo {
            id: channel["id"].as_str().unwrap_or(&id).to_string(),
            resource: request.resource.clone(),
            expires_at,
            resource_id: channel["resourceId"].as_str().map(str::to_string),
        })
    }

    async fn renew(
        &self,
        _conn: &mut Connection,
        subscription: &SubscriptionInfo,
        _expires_at: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ProviderError> {
        Err(ProviderError::new(
            ErrorCode::NotFound,
            format!(
                "Drive channel `{}` cannot be renewed; a new one replaces it",
                subscription.id
            ),
        ))
    }

    async fn unsubscribe(
        &self,
        conn: &mut Connection,
        subscription: &SubscriptionInfo,
    ) -> Result<(), ProviderError> {
        let body = json!({"id": subscription.id, "resourceId": subscription.resource_id});
        self.post(conn, "/channels/stop", &[], &body)
            .await
            .or_gone()
            .map(drop)
    }
}

impl Provider for GoogleDrive {
    fn name(&self) -> &'static str {
        "google_drive"
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        for name in ["tokenUrl", "apiBaseUrl"] {
            crate::http::check_url(settings, name)?;
        }
        if let Some(drive) = settings.get("driveId")
            && !drive.as_str().is_some_and(|d| {
                !d.is_empty()
                    && d.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            })
        {
            return Err("connection.driveId must be a shared drive's id".into());
        }
        if settings
            .get("includeSharedDrives")
            .is_some_and(|v| !v.is_boolean())
        {
            return Err("connection.includeSharedDrives must be true or false".into());
        }
        Ok(())
    }

    fn token_refresh(&self) -> Option<&dyn TokenRefresh> {
        Some(self)
    }

    fn webhooks(&self) -> Option<&dyn Webhooks> {
        Some(self)
    }

    fn subscriptions(&self) -> Option<&dyn Subscriptions> {
        Some(self)
    }

    fn write_back(&self) -> Option<&dyn WriteBack> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_to_delete_that_no_link_names_was_never_made() {
        let mut conn = Connection::new("int-1", Map::new(), crate::Credentials::new(Map::new()));
        let write = RecordWrite::unlinked_delete(ENTITY);
        GoogleDrive::new().delete(&mut conn, &write).await.unwrap();
    }

    #[test]
    fn a_403_is_a_rate_limit_only_when_google_says_so() {
        let body = |reason: &str| json!({"error": {"code": 403, "message": "m", "errors": [{"reason": reason}]}});
        let e = Google.error(StatusCode::FORBIDDEN, &body("userRateLimitExceeded"));
        assert_eq!(e.code, ErrorCode::RateLimit);
        assert!(e.is_retryable());
        let e = Google.error(StatusCode::FORBIDDEN, &body("rateLimitExceeded"));
        assert_eq!(e.code, ErrorCode::RateLimit);
        let e = Google.error(StatusCode::FORBIDDEN, &body("insufficientFilePermissions"));
        assert_eq!(e.code, ErrorCode::InvalidCredentials);
        // What no credentials can make Drive take, and the project's daily allocation.
        for reason in ["fieldNotWritable", "cannotAddParent"] {
            let e = Google.error(StatusCode::FORBIDDEN, &body(reason));
            assert_eq!(e.code, ErrorCode::ValidationError, "{reason}");
        }
        let e = Google.error(StatusCode::FORBIDDEN, &body("dailyLimitExceeded"));
        assert!(e.code == ErrorCode::RateLimit && e.resume_next_run);
    }

    #[test]
    fn a_channel_names_the_drives_it_watches() {
        let resources = |settings: Value| {
            GoogleDrive::new().resources(settings.as_object().unwrap(), &[ENTITY.to_string()])
        };
        assert_eq!(resources(json!({})), ["changes"]);
        assert_eq!(
            resources(json!({"includeSharedDrives": true})),
            ["changes?includeItemsFromAllDrives=true"]
        );
        assert_eq!(
            resources(json!({"driveId": "0Ashared"})),
            ["changes?driveId=0Ashared"]
        );
    }

    #[test]
    fn a_changes_token_is_read_only_for_the_drives_it_was_given_for() {
        let kept = keep_scoped("drive:0Ashared", "4711");
        assert_eq!(token_of("drive:0Ashared", &kept).unwrap(), "4711");
        assert!(token_of("all-drives", &kept).unwrap_err().resync);
        assert_eq!(
            token_of("my-drive", "4711").unwrap(),
            "4711",
            "a token kept before tokens named their drives"
        );
    }

    #[test]
    fn page_tokens_say_which_phase_a_sync_is_in() {
        let list = Position::List {
            start: "42".into(),
            next: "~!abc".into(),
            incomplete: false,
            scope: "my-drive".into(),
        };
        let text = json!(list).to_string();
        assert_eq!(
            text,
            r#"{"next":"~!abc","phase":"list","scope":"my-drive","start":"42"}"#
        );
        assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), list);
    }

    #[test]
    fn a_read_of_other_drives_is_not_gone_on_with() {
        let list = |scope: &str| Position::List {
            start: "42".into(),
            next: "~!abc".into(),
            incomplete: false,
            scope: scope.into(),
        };
        assert!(list("my-drive").of("my-drive").is_ok());
        assert!(
            list("").of("all-drives").unwrap_err().resync,
            "a listing from before: of which drives is not known"
        );
        let refused = list("my-drive").of("all-drives").unwrap_err();
        assert!(refused.resync, "{refused:?}");
        let changes = Position::Changes {
            next: "77".into(),
            scope: "drive:0Ashared".into(),
        };
        assert!(changes.of("my-drive").unwrap_err().resync);
    }

    #[test]
    fn mapped_fields_are_added_to_the_selection() {
        let request = FetchRequest {
            entity: ENTITY.into(),
            fields: vec![
                "owners.displayName".into(),
                "name".into(),
                "bad field".into(),
            ],
            cursor: None,
            page_token: None,
            filters: vec![],
            page_size: 100,
            cursor_read_at: None,
        };
        let fields = file_fields(&request);
        assert!(fields.ends_with(",webViewLink,owners"), "{fields}");
    }
}
