//! Zoom over its REST API v2.
//!
//! * Entities: `meetings` (a user's scheduled meetings, `/users/{userId}/meetings`),
//!   `recordings` (cloud recordings, `/users/{userId}/recordings`) and `participants` (who
//!   attended the meetings that took place: `/report/users/{userId}/meetings`, then each
//!   meeting's `/report/meetings/{uuid}/participants`). Pages follow `next_page_token` (an
//!   empty string at the end), up to 300 records.
//! * Zoom has no modified-since filter. Meetings are listed whole on every sync (unchanged ones
//!   cost no write, by content hash); recordings and past meetings are listed by date windows
//!   (`from`/`to`, at most a month each): a full sync walks from `recordingsSince` (default 90 days back) to
//!   today, and the cursor is the day the next sync starts from, a day before the last one
//!   read, so late recordings are not missed.
//! * Deletions come by webhook (`meeting.deleted`; `recording.trashed` and `recording.deleted`,
//!   whose recording is read again and goes only if Zoom no longer serves it; a
//!   `meeting.deleted` naming `occurrences` deleted some of a series, whose meeting is read
//!   again); and since meetings are listed whole, a meeting a sync no longer lists before its
//!   start time is reconciled as deleted. Zoom stops listing a meeting once it expires (30
//!   days after it was held), so one left out after its start time keeps its shard
//!   (`Record::listed_until`). A recording made ready (`recording.completed`, which may come
//!   days after its meeting), taken back from the trash (`recording.recovered`) or renamed
//!   (`recording.renamed`) is read by its uuid (`/meetings/{uuid}/recordings`), since a sync's
//!   window, by the meeting's start, may not list it again.
//! * Tokens: `POST {tokenUrl}` with the client authenticated by HTTP Basic. User-managed apps
//!   refresh with a refresh token that Zoom rotates (the old one dies when the new one is
//!   issued, so it is stored before use); Server-to-Server apps use the `account_credentials`
//!   grant with `accountId`. Access tokens last an hour.
//! * Limits: paced at 20 requests a second per integration; a 429's `Retry-After` is waited out.
//!   Meeting updates are also capped at 100 a day per user: that 429 names no wait and lasts
//!   until midnight UTC, so it is not retried in place but reported as an allocation that comes
//!   back then.
//! * Write-back updates a meeting (`PATCH /meetings/{id}`: `topic`, `agenda`, `start_time`,
//!   `duration`, `timezone`) and deletes one. Zoom keeps no version of a meeting, so the
//!   engine's conflict check compares the fields it reads just before with the ones both sides
//!   last agreed on. It creates none: Zoom has nowhere to keep a key that would find the
//!   meeting a lost answer made, so a retried create could schedule a second one.
//! * Webhooks: Zoom signs each delivery: `x-zm-signature` is `v0=` and the hex HMAC-SHA256 of
//!   `v0:{x-zm-request-timestamp}:{body}` under the app's secret token; deliveries older than
//!   five minutes are refused as replays. `endpoint.url_validation` is answered with the
//!   `plainToken` and its HMAC, `encryptedToken`. The webhook URL names the integration
//!   (`/api/webhooks/zoom?integration={id}`), because an app's deliveries say nothing else a
//!   route could use before the signature is checked. An app installed for the whole account is
//!   told of every user's meetings: what a notification names is read by id, and a meeting or
//!   recording another user hosts (its `host_id` is not the integration user's, from
//!   `GET /users/{userId}`, which needs `user:read`; an app without it tells no hosts apart) is
//!   passed over.
//!
//! Connection settings: `tokenUrl` (default `https://zoom.us/oauth/token`), `apiBaseUrl`
//! (default `https://api.zoom.us/v2`), `userId` (default `me`), `accountId` (Server-to-Server),
//! `recordingsSince` (a date). Credentials: `client_id`, `client_secret`, `refresh_token` (for
//! user-managed apps) or `account_id` (Server-to-Server, if not in the settings),
//! `webhook_secret_token`.

use async_trait::async_trait;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::OrGone;
use crate::api::{Api, Dialect, TokenRequest, endpoint};
use crate::oauth::{ClientAuth, Grant};
use crate::{
    Connection, ErrorCode, FetchRequest, LeftOut, Page, Provider, ProviderError, Pull, RateLimiter,
    Record, RecordWrite, RouteKey, TokenRefresh, WebhookAnswer, WebhookDelivery, WebhookError,
    WebhookNotification, WebhookRequest, WebhookRoute, Webhooks, WriteBack, Written,
};

pub const MEETINGS: &str = "meetings";
pub const RECORDINGS: &str = "recordings";
pub const PARTICIPANTS: &str = "participants";
const DEFAULT_TOKEN_URL: &str = "https://zoom.us/oauth/token";
const DEFAULT_API_BASE: &str = "https://api.zoom.us/v2";
const MAX_PAGE_SIZE: usize = 300;
/// Zoom lists recordings by at most a month at a time.
const WINDOW_DAYS: i64 = 30;
/// How far back a first recordings sync reaches unless `recordingsSince` says.
const DEFAULT_RECORDINGS_DAYS: i64 = 90;
/// What a write to a meeting may set; Zoom sets the rest (its links, host, times made).
const WRITABLE: [&str; 5] = ["topic", "agenda", "start_time", "duration", "timezone"];
/// A delivery signed longer ago than this is a replay.
const MAX_DELIVERY_AGE_SECONDS: i64 = 300;

pub struct Zoom {
    api: Api<ZoomApi>,
    /// The Zoom id of each integration's user (`userId` may be `me` or an email), by
    /// integration and `userId`, as it was last asked.
    hosts: std::sync::Mutex<std::collections::HashMap<(String, String), KnownHost>>,
}

/// What Zoom said of an integration user's id, and when: kept a while, since the credentials
/// behind `userId` `me` may change hands.
struct KnownHost {
    /// `None` when Zoom would not say (an app not granted `user:read`): meetings are then not
    /// told apart by their host.
    id: Option<String>,
    asked: std::time::Instant,
}

/// What one read by id knows of the integration user's id.
enum Host {
    /// Nothing asked yet: no object named a host.
    Unasked,
    /// As kept (`None`: Zoom would not say).
    Kept(Option<String>),
    /// As Zoom said just now.
    Asked(Option<String>),
}

/// How long a user's id is taken as known.
const HOST_KEPT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

impl Default for Zoom {
    fn default() -> Self {
        Self::new()
    }
}

struct ZoomApi;

impl Dialect for ZoomApi {
    fn service(&self) -> &'static str {
        "Zoom"
    }

    /// The daily cap on meeting updates is a quota until midnight UTC, not a throttle.
    fn error(&self, status: reqwest::StatusCode, body: &Value) -> ProviderError {
        let message = body["message"].as_str().unwrap_or_default();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS && message.contains("daily rate limit")
        {
            return ProviderError::quota(format!("{status}: {message}"))
                .resuming_at(after_midnight_utc(Utc::now()));
        }
        ProviderError::new(
            crate::http::status_code(status),
            format!("{status}: {message}"),
        )
    }

    fn token_request(&self, conn: &Connection) -> TokenRequest {
        let url = conn
            .setting("tokenUrl")
            .unwrap_or(DEFAULT_TOKEN_URL)
            .to_string();
        if conn.credentials.get("refresh_token").is_some() {
            TokenRequest {
                url,
                extra: Vec::new(),
                client_auth: ClientAuth::Basic,
                grant: Some(Grant::RefreshToken),
            }
        } else {
            TokenRequest {
                url,
                extra: vec![(
                    "account_id",
                    conn.setting("accountId")
                        .or_else(|| conn.credentials.get("account_id"))
                        .unwrap_or_default()
                        .to_string(),
                )],
                client_auth: ClientAuth::Basic,
                grant: Some(Grant::AccountCredentials),
            }
        }
    }
}

/// Where a participants sync stands: the window of past meetings being read, the page of them,
/// the meetings of that page still to read, and the page of the first one's participants.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Attendance {
    from: Option<NaiveDate>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    meetings_next: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    queue: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    participants_next: String,
}

/// A meeting uuid as a path segment. Zoom wants a uuid that begins with `/` or holds `//`
/// encoded twice.
fn uuid_segment(uuid: &str) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    if uuid.starts_with('/') || uuid.contains("//") {
        encode(&encode(uuid))
    } else {
        encode(uuid)
    }
}

/// Where a recordings sync stands: the window being read and the page in it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Window {
    from: NaiveDate,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    next: String,
}

impl Zoom {
    pub fn new() -> Self {
        Self {
            api: Api::new(ZoomApi, RateLimiter::new(20)),
            hosts: Default::default(),
        }
    }

    /// The Zoom id of the user the integration syncs (`GET /users/{userId}`), which meetings
    /// and recordings name as their `host_id`: as kept, unless `fresh`. `None` when the app was
    /// not granted `user:read`. Should asking again fail, the id kept is used.
    async fn host_id(
        &self,
        conn: &mut Connection,
        fresh: bool,
    ) -> Result<Option<String>, ProviderError> {
        let key = (conn.integration_id.clone(), Self::user(conn)?.to_string());
        let kept = self
            .hosts
            .lock()
            .unwrap()
            .get(&key)
            .map(|known| (known.id.clone(), known.asked.elapsed() < HOST_KEPT));
        if let Some((id, true)) = &kept
            && !fresh
        {
            return Ok(id.clone());
        }
        let id = match self.get(conn, &format!("/users/{}", key.1), &[]).await {
            Ok(user) => Some(
                user["id"]
                    .as_str()
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        ProviderError::new(
                            ErrorCode::ValidationError,
                            "Zoom named no id for the integration's user",
                        )
                    })?
                    .to_string(),
            ),
            // Not granted `user:read`: hosts are not told apart, as before they were asked.
            Err(e) if e.message.contains("does not contain scopes") => None,
            Err(e) => match kept {
                Some((id, _)) => return Ok(id),
                None => return Err(e),
            },
        };
        let known = KnownHost {
            id: id.clone(),
            asked: std::time::Instant::now(),
        };
        self.hosts.lock().unwrap().insert(key, known);
        Ok(id)
    }

    /// Whether the integration's user hosts `object`: the user's id is asked for only once an
    /// object names a host, and again (once a read) before an object is taken for another
    /// user's, unless it was asked just now.
    async fn hosted(
        &self,
        conn: &mut Connection,
        object: &Value,
        host: &mut Host,
    ) -> Result<bool, ProviderError> {
        let Some(of) = object["host_id"].as_str() else {
            return Ok(true);
        };
        if let Host::Unasked = host {
            *host = Host::Kept(self.host_id(conn, false).await?);
        }
        if let Host::Kept(Some(user)) = host
            && user != of
        {
            *host = Host::Asked(self.host_id(conn, true).await?);
        }
        Ok(match host {
            Host::Kept(id) | Host::Asked(id) => id.as_deref().is_none_or(|user| user == of),
            Host::Unasked => true,
        })
    }

    fn user(conn: &Connection) -> Result<&str, ProviderError> {
        let user = conn.setting("userId").unwrap_or("me");
        if user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            Ok(user)
        } else {
            Err(ProviderError::new(
                ErrorCode::ValidationError,
                "connection.userId is not a Zoom user id",
            ))
        }
    }

    async fn get(
        &self,
        conn: &mut Connection,
        path: &str,
        params: &[(&str, String)],
    ) -> Result<Value, ProviderError> {
        let base = conn.setting("apiBaseUrl").unwrap_or(DEFAULT_API_BASE);
        let url = endpoint(base, path, params)?;
        Ok(self
            .api
            .send(conn, Method::GET, &url, &[], None)
            .await?
            .body)
    }

    async fn meetings(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        request.listed_whole()?;
        let user = Self::user(conn)?.to_string();
        let mut params = vec![
            ("type", "scheduled".to_string()),
            (
                "page_size",
                request.page_size.clamp(1, MAX_PAGE_SIZE).to_string(),
            ),
        ];
        if let Some(next) = &request.page_token {
            params.push(("next_page_token", next.clone()));
        }
        let body = self
            .get(conn, &format!("/users/{user}/meetings"), &params)
            .await?;
        Ok(Page {
            unreadable: Vec::new(),
            records: meetings(&body["meetings"]),
            next_page: next_token(&body),
            query: Some(format!("GET /users/{user}/meetings?type=scheduled")),
            stop_after: None,
            cursor: None,
        })
    }

    /// Who attended the meetings that took place: the Reports API's past meetings, by month
    /// windows like recordings, and each one's participants.
    async fn participants(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let user = Self::user(conn)?.to_string();
        let today = Utc::now().date_naive();
        let mut at: Attendance = match (&request.page_token, &request.cursor) {
            (Some(token), _) => serde_json::from_str(token).map_err(|_| {
                ProviderError::new(ErrorCode::ValidationError, "unreadable Zoom page token")
            })?,
            (None, Some(cursor)) => Attendance {
                from: Some(NaiveDate::parse_from_str(cursor, "%Y-%m-%d").map_err(|_| {
                    ProviderError::resync_required(format!("`{cursor}` is not a Zoom cursor"))
                })?),
                ..Attendance::default()
            },
            (None, None) => Attendance {
                from: Some(recordings_since(conn, today)),
                ..Attendance::default()
            },
        };
        let from = at.from.unwrap_or(today);
        if from > today && at.queue.is_empty() {
            return Ok(before_the_first_day(format!(
                "GET /report/users/{user}/meetings?from&to"
            )));
        }
        let to = window_end(from, today);
        let size = request.page_size.clamp(1, MAX_PAGE_SIZE).to_string();
        let mut records = Vec::new();
        if at.queue.is_empty() {
            let mut params = vec![
                ("from", from.to_string()),
                ("to", to.to_string()),
                ("page_size", size),
            ];
            if !at.meetings_next.is_empty() {
                params.push(("next_page_token", at.meetings_next.clone()));
            }
            let body = self
                .get(conn, &format!("/report/users/{user}/meetings"), &params)
                .await?;
            at.queue = body["meetings"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["uuid"].as_str().map(str::to_string))
                .collect();
            at.meetings_next = next_token(&body).unwrap_or_default();
        } else {
            let uuid = at.queue[0].clone();
            let mut params = vec![("page_size", size)];
            if !at.participants_next.is_empty() {
                params.push(("next_page_token", at.participants_next.clone()));
            }
            let path = format!("/report/meetings/{}/participants", uuid_segment(&uuid));
            // A meeting Zoom no longer reports had nobody to list.
            let body = self
                .get(conn, &path, &params)
                .await
                .or_gone()?
                .unwrap_or(Value::Null);
            for mut record in records_of_participants(&body["participants"], &uuid) {
                record
                    .fields
                    .insert("meeting_uuid".into(), Value::String(uuid.clone()));
                records.push(record);
            }
            match next_token(&body) {
                Some(next) => at.participants_next = next,
                None => {
                    at.queue.remove(0);
                    at.participants_next.clear();
                }
            }
        }
        let (next_page, cursor) = if !at.queue.is_empty() || !at.meetings_next.is_empty() {
            (Some(at), None)
        } else if to < today {
            (
                Some(Attendance {
                    from: Some(to),
                    ..Attendance::default()
                }),
                None,
            )
        } else {
            (None, Some((today - Duration::days(1)).to_string()))
        };
        Ok(Page {
            unreadable: Vec::new(),
            records,
            next_page: next_page.map(|a| json!(a).to_string()),
            query: Some(format!(
                "GET /report/users/{user}/meetings?from&to, then each meeting's participants"
            )),
            stop_after: None,
            cursor,
        })
    }

    async fn recordings(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let user = Self::user(conn)?.to_string();
        let today = Utc::now().date_naive();
        let window = match (&request.page_token, &request.cursor) {
            (Some(token), _) => serde_json::from_str(token).map_err(|_| {
                ProviderError::new(ErrorCode::ValidationError, "unreadable Zoom page token")
            })?,
            (None, Some(cursor)) => Window {
                from: NaiveDate::parse_from_str(cursor, "%Y-%m-%d").map_err(|_| {
                    ProviderError::resync_required(format!("`{cursor}` is not a Zoom cursor"))
                })?,
                next: String::new(),
            },
            (None, None) => Window {
                from: recordings_since(conn, today),
                next: String::new(),
            },
        };
        if window.from > today {
            return Ok(before_the_first_day(format!(
                "GET /users/{user}/recordings?from&to"
            )));
        }
        let to = window_end(window.from, today);
        let mut params = vec![
            ("from", window.from.to_string()),
            ("to", to.to_string()),
            (
                "page_size",
                request.page_size.clamp(1, MAX_PAGE_SIZE).to_string(),
            ),
        ];
        if !window.next.is_empty() {
            params.push(("next_page_token", window.next.clone()));
        }
        let body = self
            .get(conn, &format!("/users/{user}/recordings"), &params)
            .await?;
        let (next_page, cursor) = match next_token(&body) {
            Some(next) => (
                Some(Window {
                    from: window.from,
                    next,
                }),
                None,
            ),
            // The window is read: the next one, or the end, whose cursor trails by a day.
            None if to < today => (
                Some(Window {
                    from: to,
                    next: String::new(),
                }),
                None,
            ),
            None => (None, Some((today - Duration::days(1)).to_string())),
        };
        Ok(Page {
            unreadable: Vec::new(),
            records: records(&body["meetings"], "uuid"),
            next_page: next_page.map(|w| json!(w).to_string()),
            query: Some(format!("GET /users/{user}/recordings?from&to")),
            stop_after: None,
            cursor,
        })
    }
}

fn recordings_since(conn: &Connection, today: NaiveDate) -> NaiveDate {
    conn.setting("recordingsSince")
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        .unwrap_or(today - Duration::days(DEFAULT_RECORDINGS_DAYS))
}

/// `next_page_token`, which Zoom ends with an empty string.
fn next_token(body: &Value) -> Option<String> {
    body["next_page_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// The participants of meeting `uuid` as records: one per attendance (a person who joined
/// twice attended twice), identified within the meeting. A guest signed in to no Zoom account
/// has an empty `id`: Zoom's `user_id`, the participant's id within the meeting, names them
/// instead (never their place in a page, which changes with the page's size).
fn records_of_participants(list: &Value, uuid: &str) -> Vec<Record> {
    let text = |p: &Map<String, Value>, name: &str| {
        p.get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .map(|p| {
            let who = text(p, "id")
                .or_else(|| text(p, "user_id").map(|id| format!("guest-{id}")))
                .unwrap_or_else(|| {
                    // No name in an id, which links and the sync history show.
                    let name = text(p, "name").unwrap_or_default();
                    let left = text(p, "leave_time").unwrap_or_default();
                    let digest = <Sha256 as sha2::Digest>::digest(format!("{name}\n{left}"));
                    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                    format!("guest-{short}")
                });
            let joined = p.get("join_time").and_then(Value::as_str).unwrap_or("");
            Record {
                id: format!("{uuid}:{who}:{joined}"),
                modified_at: None,
                deleted: false,
                fields: p.clone(),
                listed_until: None,
            }
        })
        .collect()
}

/// Meetings from a list, each with the time the `scheduled` listing lists it until.
///
/// Zoom lists only meetings that have not expired, and a meeting expires some time after it
/// was held or last started (30 days for a single meeting, a year for a recurring one with no
/// fixed time), which the listing does not say; `GET /meetings/{id}` then answers 3001, as for
/// a deleted meeting. So a meeting counts as listed only until its start time: one left out of
/// a listing before then was deleted, and one left out after may just have expired, and
/// keeps its shard (its deletion comes by webhook). A meeting with no start time (recurring,
/// with no fixed time) counts from when it was made, and so does an instant one, which the
/// listing never holds.
fn meetings(list: &Value) -> Vec<Record> {
    let mut meetings = records(list, "id");
    for meeting in &mut meetings {
        let time = |key: &str| {
            meeting
                .fields
                .get(key)
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let instant = meeting.fields.get("type").and_then(Value::as_u64) == Some(1);
        meeting.listed_until = if instant {
            time("created_at")
        } else {
            time("start_time").or_else(|| time("created_at"))
        };
    }
    meetings
}

/// Records from a list, identified by `key` (a meeting's numeric id, a recording's uuid).
fn records(list: &Value, key: &str) -> Vec<Record> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .filter_map(|object| {
            let id = match object.get(key)? {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => return None,
            };
            Some(Record {
                id,
                modified_at: None,
                deleted: false,
                fields: object.clone(),
                listed_until: None,
            })
        })
        .collect()
}

#[async_trait]
impl Pull for Zoom {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        match request.entity.as_str() {
            MEETINGS => self.meetings(conn, request).await,
            RECORDINGS => self.recordings(conn, request).await,
            PARTICIPANTS => self.participants(conn, request).await,
            other => Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!(
                    "Zoom syncs `{MEETINGS}`, `{RECORDINGS}` and `{PARTICIPANTS}`, not `{other}`"
                ),
            )),
        }
    }

    /// Meetings are listed whole every sync: one that is no longer listed before its start
    /// time was deleted.
    fn lists_everything(&self, entity: &str) -> bool {
        entity == MEETINGS
    }

    /// A meeting is listed until it expires ([`meetings`]).
    fn lists_for_a_time(&self, entity: &str) -> bool {
        entity == MEETINGS
    }

    /// Of the meetings a listing left out, those Zoom no longer has (`GET /meetings/{id}`
    /// answers 404). One Zoom still has, whoever hosts it now, keeps its shard: the listing's
    /// scope changed (the integration's user changed, a meeting was handed over), not the
    /// meeting. Past [`crate::LOOKUPS_PER_PAGE`] leftovers of a page, none are asked about and
    /// all stay: a new user's listing leaves out every meeting of the old one at once.
    async fn gone(
        &self,
        conn: &mut Connection,
        entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        let mut left = LeftOut::default();
        if entity != MEETINGS || ids.len() > crate::LOOKUPS_PER_PAGE {
            left.undecided = ids.len();
            return Ok(left);
        }
        for id in ids {
            if !id.chars().all(|c| c.is_ascii_digit()) {
                left.undecided += 1;
                continue;
            }
            match self
                .get(conn, &format!("/meetings/{id}"), &[])
                .await
                .or_gone()
            {
                Ok(Some(_)) => {}
                Ok(None) => left.gone.push(id),
                Err(e) if crate::fails_the_comparison(&e) => return Err(e),
                Err(_) => left.undecided += 1,
            }
        }
        Ok(left)
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        NaiveDate::parse_from_str(cursor, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
    }

    /// Meetings by id, as Zoom has them now; a meeting Zoom no longer has is absent, and so is
    /// one another user hosts: an app installed for the whole account is told of every user's
    /// meetings, and the integration syncs one user's.
    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut host = Host::Unasked;
        if request.entity == RECORDINGS {
            // A meeting instance's recordings, by its uuid. One in the trash, or deleted, is
            // not found, and comes back deleted: a `recording.trashed` is read like this rather
            // than believed, since it may be a late retry after the recording came back, or
            // tell of one file of several.
            let mut found = Vec::new();
            for uuid in ids {
                let path = format!("/meetings/{}/recordings", uuid_segment(uuid));
                match self.get(conn, &path, &[]).await.or_gone()? {
                    Some(recording) => {
                        if self.hosted(conn, &recording, &mut host).await? {
                            found.extend(records(&json!([recording]), "uuid"));
                        }
                    }
                    None => found.push(Record::gone(uuid.clone())),
                }
            }
            return Ok(found);
        }
        if request.entity != MEETINGS {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!(
                    "Zoom reads `{MEETINGS}` and `{RECORDINGS}` by id, not `{}`",
                    request.entity
                ),
            ));
        }
        let mut found = Vec::new();
        for id in ids
            .iter()
            .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
        {
            let path = format!("/meetings/{id}");
            if let Some(meeting) = self.get(conn, &path, &[]).await.or_gone()?
                && self.hosted(conn, &meeting, &mut host).await?
            {
                found.extend(meetings(&json!([meeting])));
            }
        }
        Ok(found)
    }
}

/// When Zoom's daily caps lift: midnight UTC after `now`, and a minute for clocks that differ.
fn after_midnight_utc(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive() + chrono::Days::new(1);
    tomorrow.and_time(chrono::NaiveTime::MIN).and_utc() + Duration::minutes(1)
}

/// A meeting's path, its id checked to be one (digits).
fn meeting_path(write: &RecordWrite) -> Result<String, ProviderError> {
    if write.entity != MEETINGS {
        return Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("Zoom writes `{MEETINGS}` back, not `{}`", write.entity),
        ));
    }
    match write.external_id.as_deref() {
        Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()) => {
            Ok(format!("/meetings/{id}"))
        }
        other => Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("`{}` is not a Zoom meeting id", other.unwrap_or_default()),
        )),
    }
}

/// Updates and deletes meetings.
#[async_trait]
impl WriteBack for Zoom {
    fn writable_fields(&self, _entity: &str) -> Option<&'static [&'static str]> {
        Some(&WRITABLE)
    }

    async fn create(
        &self,
        _conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!(
                "Zoom keeps no key to find a `{}` record a lost answer made, so a retried create \
                 could make a second one: schedule it in Zoom and sync it in",
                write.entity
            ),
        ))
    }

    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        let path = meeting_path(write)?;
        write.check_writable(&WRITABLE, "a Zoom meeting")?;
        let base = conn.setting("apiBaseUrl").unwrap_or(DEFAULT_API_BASE);
        let url = endpoint(base, &path, &[])?;
        let body = Value::Object(write.fields.clone());
        self.api
            .send(conn, Method::PATCH, &url, &[], Some(&body))
            .await?;
        Ok(Written {
            external_id: write.external_id.clone().unwrap_or_default(),
            version: None,
        })
    }

    async fn delete(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<(), ProviderError> {
        // Without an id, the record a create of the shard made: Zoom's write-back makes none.
        if write.external_id.is_none() && write.entity == MEETINGS {
            return Ok(());
        }
        let path = meeting_path(write)?;
        let base = conn.setting("apiBaseUrl").unwrap_or(DEFAULT_API_BASE);
        let url = endpoint(base, &path, &[])?;
        self.api
            .send(conn, Method::DELETE, &url, &[], None)
            .await
            .or_gone()
            .map(drop)
    }
}

#[async_trait]
impl TokenRefresh for Zoom {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.api.refresh(conn).await
    }
}

/// The hex HMAC-SHA256 of `message` under `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(message.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a delivery's signature and age against `secret` at `now`.
fn check_signature(
    request: &WebhookRequest<'_>,
    secret: &str,
    now: DateTime<Utc>,
) -> Result<(), WebhookError> {
    let forged = |why: &str| WebhookError::Forged(format!("the Zoom delivery {why}"));
    let timestamp = request
        .header("x-zm-request-timestamp")
        .ok_or_else(|| forged("has no x-zm-request-timestamp"))?;
    let signature = request
        .header("x-zm-signature")
        .ok_or_else(|| forged("has no x-zm-signature"))?;
    let signed_at = timestamp
        .parse::<i64>()
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .ok_or_else(|| forged("has an unreadable x-zm-request-timestamp"))?;
    if (now - signed_at).num_seconds().abs() > MAX_DELIVERY_AGE_SECONDS {
        return Err(forged(
            "was signed more than five minutes ago (a replay is refused)",
        ));
    }
    let body = request.body.unwrap_or_default();
    let expected = format!("v0={}", sign(secret, &format!("v0:{timestamp}:{body}")));
    if !crate::same_secret(signature, &expected) {
        return Err(forged("has a signature that does not verify"));
    }
    Ok(())
}

#[async_trait]
impl Webhooks for Zoom {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        let id = request.query.get("integration").ok_or_else(|| {
            WebhookError::Malformed(
                "a Zoom webhook URL names its integration: /api/webhooks/zoom?integration={id}"
                    .into(),
            )
        })?;
        Ok(WebhookRoute::To(vec![RouteKey::Integration(id.clone())]))
    }

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        _key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError> {
        let secret = conn
            .credentials
            .get("webhook_secret_token")
            .ok_or_else(|| {
                WebhookError::Forged(
                    "the integration has no webhook_secret_token to check with".into(),
                )
            })?;
        check_signature(request, secret, Utc::now())?;
        let body: Value = request
            .body
            .and_then(|b| serde_json::from_str(b).ok())
            .ok_or_else(|| WebhookError::Malformed("a Zoom delivery is JSON".into()))?;
        let event = body["event"].as_str().unwrap_or_default();
        let object = &body["payload"]["object"];
        if event == "endpoint.url_validation" {
            let plain = body["payload"]["plainToken"].as_str().ok_or_else(|| {
                WebhookError::Malformed("a URL validation has no plainToken".into())
            })?;
            let answer = json!({"plainToken": plain, "encryptedToken": sign(secret, plain)});
            return Ok(WebhookDelivery {
                notifications: Vec::new(),
                answer: WebhookAnswer::new(200, "application/json", answer.to_string()),
            });
        }
        let object_id = |key: &str| match &object[key] {
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            _ => None,
        };
        // A recording's events name the meeting instance too: the instances of a recurring
        // meeting share its id. A uuid's bytes go in hex, which keeps every one apart.
        let instance: String = object_id("uuid")
            .map(|uuid| uuid.bytes().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        let id = format!(
            "zoom-{}-{}-{}-{instance}",
            event.replace('.', "-"),
            body["event_ts"],
            object_id("id").unwrap_or_default()
        )
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        let notifications = match event {
            "meeting.created" | "meeting.updated" => object_id("id")
                .map(|record| WebhookNotification::Records {
                    id,
                    entity: MEETINGS.into(),
                    record_ids: vec![record],
                })
                .into_iter()
                .collect(),
            // Occurrences of a recurring meeting deleted: the meeting lives on, and is read
            // again.
            "meeting.deleted"
                if object["occurrences"]
                    .as_array()
                    .is_some_and(|o| !o.is_empty()) =>
            {
                object_id("id")
                    .map(|record| WebhookNotification::Records {
                        id,
                        entity: MEETINGS.into(),
                        record_ids: vec![record],
                    })
                    .into_iter()
                    .collect()
            }
            "meeting.deleted" => object_id("id")
                .map(|record| WebhookNotification::Deleted {
                    id,
                    entity: MEETINGS.into(),
                    record_ids: vec![record],
                })
                .into_iter()
                .collect(),
            // A recording ready (processing may end days after its meeting), taken back from
            // the trash, or renamed: one a sync's window (from the day before the last sync,
            // by the meeting's start) may not list again, so it is read by itself.
            "recording.completed" | "recording.recovered" | "recording.renamed" => {
                object_id("uuid")
                    .map(|record| WebhookNotification::Records {
                        id,
                        entity: RECORDINGS.into(),
                        record_ids: vec![record],
                    })
                    .into_iter()
                    .collect()
            }
            // Read too, whatever they say: a recording trashed and taken back since (Zoom
            // retries an event for up to a day), or one with files left, stays.
            "recording.trashed" | "recording.deleted" => object_id("uuid")
                .map(|record| WebhookNotification::Records {
                    id,
                    entity: RECORDINGS.into(),
                    record_ids: vec![record],
                })
                .into_iter()
                .collect(),
            // Events the integration does not sync are acknowledged and dropped.
            _ => Vec::new(),
        };
        Ok(WebhookDelivery {
            notifications,
            answer: WebhookAnswer::new(200, "application/json", "{}"),
        })
    }
}

impl Provider for Zoom {
    fn name(&self) -> &'static str {
        "zoom"
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        for name in ["tokenUrl", "apiBaseUrl"] {
            crate::http::check_url(settings, name)?;
        }
        for name in ["userId", "accountId"] {
            if let Some(value) = settings.get(name)
                && !value.as_str().is_some_and(|v| {
                    !v.is_empty()
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
                })
            {
                return Err(format!("connection.{name} must be a Zoom id"));
            }
        }
        if let Some(since) = settings.get("recordingsSince")
            && since
                .as_str()
                .is_none_or(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err())
        {
            return Err("connection.recordingsSince must be a date (2026-01-31)".into());
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

/// The page of a read whose first day is after today in UTC (a `recordingsSince` still to come,
/// or today where the day began before it did in UTC): nothing yet, which Zoom would refuse to
/// be asked for, and no cursor, so that the next sync reads the setting again (a date typed
/// wrong and then mended is followed).
fn before_the_first_day(query: String) -> Page {
    Page {
        query: Some(query),
        ..Page::default()
    }
}

/// The last day of the window that starts on `from`: [`WINDOW_DAYS`] later, or today if that
/// is sooner (a cursor past any date included).
fn window_end(from: NaiveDate, today: NaiveDate) -> NaiveDate {
    from.checked_add_signed(Duration::days(WINDOW_DAYS))
        .map_or(today, |end| end.min(today))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_guest_keeps_one_id_wherever_a_page_puts_them() {
        let member = json!({"id": "u1", "user_id": "16778240", "name": "Ann Lee",
                            "join_time": "2026-12-01T09:00:00Z"});
        let guest = json!({"id": "", "user_id": "16778241", "name": "Visitor",
                           "join_time": "2026-12-01T09:00:00Z"});
        let other_guest = json!({"id": "", "user_id": "16778242", "name": "Visitor",
                                 "join_time": "2026-12-01T09:00:00Z"});
        let ids = |list: Value| -> Vec<String> {
            records_of_participants(&list, "m==")
                .into_iter()
                .map(|r| r.id)
                .collect()
        };
        let alone = ids(json!([guest.clone()]));
        let after = ids(json!([member, guest, other_guest]));
        assert_eq!(after[0], "m==:u1:2026-12-01T09:00:00Z");
        assert_eq!(after[1], alone[0]);
        assert_ne!(after[1], after[2], "two guests admitted together");
    }

    #[tokio::test]
    async fn a_meeting_to_delete_that_no_link_names_was_never_made() {
        let mut conn = Connection::new("int-1", Map::new(), crate::Credentials::new(Map::new()));
        Zoom::new()
            .delete(&mut conn, &RecordWrite::unlinked_delete(MEETINGS))
            .await
            .unwrap();
    }

    #[test]
    fn a_window_ends_thirty_days_on_or_today_even_from_a_cursor_past_any_date() {
        let today = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        assert_eq!(
            window_end(day(2026, 10, 1), today),
            day(2026, 10, 1) + Duration::days(WINDOW_DAYS)
        );
        assert_eq!(window_end(day(2026, 11, 30), today), today);
        assert_eq!(window_end(NaiveDate::MAX, today), today);
    }

    fn delivery(headers: &[(&str, String)], body: &str) -> Result<(), WebhookError> {
        let headers: Vec<(String, Vec<String>)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), vec![v.clone()]))
            .collect();
        let query = BTreeMap::new();
        let request = WebhookRequest {
            url: "https://func-sync.example/api/webhooks/zoom",
            headers: &headers,
            query: &query,
            body: Some(body),
        };
        check_signature(&request, "s3cret", Utc::now())
    }

    #[test]
    fn deliveries_verify_only_with_the_secret_and_only_while_fresh() {
        let body = r#"{"event":"meeting.updated","payload":{"object":{"id":1}}}"#;
        let now = Utc::now().timestamp().to_string();
        let signed =
            |ts: &str, secret: &str| format!("v0={}", sign(secret, &format!("v0:{ts}:{body}")));
        assert!(
            delivery(
                &[
                    ("x-zm-request-timestamp", now.clone()),
                    ("x-zm-signature", signed(&now, "s3cret"))
                ],
                body
            )
            .is_ok()
        );
        let forged = delivery(
            &[
                ("x-zm-request-timestamp", now.clone()),
                ("x-zm-signature", signed(&now, "guess")),
            ],
            body,
        );
        assert!(matches!(forged, Err(WebhookError::Forged(m)) if m.contains("does not verify")));
        let old = (Utc::now().timestamp() - 301).to_string();
        let replay = delivery(
            &[
                ("x-zm-request-timestamp", old.clone()),
                ("x-zm-signature", signed(&old, "s3cret")),
            ],
            body,
        );
        assert!(matches!(replay, Err(WebhookError::Forged(m)) if m.contains("replay")));
        assert!(delivery(&[], body).is_err());
    }

    #[test]
    fn the_url_validation_token_is_the_hmac_of_the_plain_token() {
        // Zoom's documented example shape: hex HMAC-SHA256 under the secret token.
        assert_eq!(
            sign("key", "The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn uuids_that_would_read_as_paths_are_encoded_twice() {
        assert_eq!(
            uuid_segment("4444AAAiAAAAAiAiAiiAii=="),
            "4444AAAiAAAAAiAiAiiAii%3D%3D"
        );
        assert_eq!(
            uuid_segment("/ajXp112QmuoKj4854875=="),
            "%252FajXp112QmuoKj4854875%253D%253D"
        );
        assert_eq!(uuid_segment("ab//cd"), "ab%252F%252Fcd");
    }

    #[test]
    fn lists_end_with_an_empty_page_token_and_records_keep_their_ids() {
        assert_eq!(next_token(&json!({"next_page_token": ""})), None);
        assert_eq!(
            next_token(&json!({"next_page_token": "abc"})).as_deref(),
            Some("abc")
        );
        let found = records(&json!([{"id": 85746065432u64, "topic": "Standup"}]), "id");
        assert_eq!(found[0].id, "85746065432");
    }

    #[test]
    fn a_meeting_counts_as_listed_until_its_start_or_an_instant_one_until_it_was_made() {
        let made = "2026-11-01T09:00:00Z";
        let starts = "2026-12-10T15:00:00Z";
        let found = meetings(&json!([
            {"id": 1, "type": 2, "start_time": starts, "created_at": made},
            {"id": 2, "type": 8, "start_time": starts, "created_at": made},
            {"id": 3, "type": 3, "created_at": made},
            {"id": 4, "type": 1, "start_time": starts, "created_at": made},
            {"id": 5, "type": 2}
        ]));
        let until: Vec<_> = found.iter().map(|m| m.listed_until).collect();
        let at = |t: &str| Some(t.parse::<DateTime<Utc>>().unwrap());
        assert_eq!(until, [at(starts), at(starts), at(made), at(made), None]);
    }
}
