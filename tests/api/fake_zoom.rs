//! Zoom on loopback for the Zoom adapter, reproducing the wire facts it depends on: the OAuth
//! token endpoint (`POST /oauth/token`) with the client's id and secret in HTTP Basic auth,
//! grant parameters in the form body or the query string, the refresh-token grant that rotates
//! (every refresh returns a new refresh token and the one used stops working, so a client that
//! spends one twice gets `invalid_grant`), the Server-to-Server `account_credentials` grant with
//! no refresh token, `expires_in` 3599 and `api_url`, and errors as `{"reason","error"}`; the
//! REST API v2 under `/v2` with `{"code","message"}` errors: 401 code 124 for a bad access
//! token, 429 with `Retry-After` and the `X-RateLimit-*` headers, 503, and `X-RateLimit-Limit`/
//! `X-RateLimit-Remaining` on every answer that gets past those; scheduled meetings listed by
//! `page_size` (default 30, at most 300) and an opaque `next_page_token` that is an empty string
//! on the last page, lives 15 minutes and answers 400 code 300 when unknown or expired, and only
//! until they expire, 30 days after their start; one meeting by id, or 404 code 3001 (for an
//! expired meeting too); cloud recordings by a `from`/`to` window of UTC dates that
//! may span at most a month, newest first, and one meeting instance's recording by its uuid
//! (double-encoded where it begins with `/` or holds `//`; 404 code 3301 when it is in the
//! trash or gone); a meeting updated (`PATCH`, 204 with no body: its
//! `topic`, `agenda`, `start_time`, `duration`, `timezone`; any other field is 400 code 300
//! `Validation Failed.`) or deleted (204; 404 code 3001 once gone), by a token whose app has
//! `meeting:write` (else 400 code 4711), at most 100 updates a day per user (then 429 with no
//! `Retry-After`: the cap lifts at midnight UTC). Zoom has no change feed and its lists carry no
//! tombstones: a deleted meeting just stops being listed, and deletes reach a client only as
//! webhooks. Those are built here as Zoom signs them (`x-zm-request-timestamp` in seconds,
//! `x-zm-signature` = `v0=` + hex HMAC-SHA256 over `v0:{timestamp}:{body}`), as is the
//! `endpoint.url_validation` challenge with the `encryptedToken` answer it expects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const ACCOUNT_ID: &str = "lAAAAAAAAAAAAAAAAA";
pub const CLIENT_ID: &str = "zM9kq3TbQ5aXv0HcWn1fPg";
pub const CLIENT_SECRET: &str = "Xq7rT2mVb9LcK4sW8eN1pJ6hG3fD0aZy";
/// The app's "Secret Token": the key of webhook signatures and of the URL validation answer.
pub const WEBHOOK_SECRET: &str = "sT9kQ2wX7vB4nM1pL6cR3z";
pub const REFRESH_TOKEN: &str = "eyJzdiI6IjAwMDAwMSJ9.rt-initial";
/// The authorized user, host of every meeting; `me` in a path stands for them.
pub const HOST_ID: &str = "KDcuGIm1QgePTO8WbOqwIQ";
/// The first meeting id; later ones count up from it. Real ids have 10 or 11 digits, beyond
/// what a 32-bit integer holds.
const FIRST_MEETING_ID: u64 = 85_746_065_432;
const DEFAULT_PAGE: usize = 30;
const MAX_PAGE: usize = 300;
const EXPIRES_IN: u64 = 3599;
/// The rate limit reported in `X-RateLimit-Limit`; nothing counts down against it.
const RATE_LIMIT: u32 = 30;
const PAGE_TOKEN_LIFETIME_MINUTES: i64 = 15;
/// A meeting expires this long after its start: Zoom then neither lists it nor finds it by id.
const MEETING_EXPIRY_DAYS: i64 = 30;
/// How long Zoom waits for a webhook receiver to answer before it counts the delivery failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
const RECORDING_MINUTES: i64 = 30;

#[derive(Clone, Debug)]
pub struct Meeting {
    pub id: u64,
    pub uuid: String,
    /// The user who hosts it: [`HOST_ID`], the user the credentials are for, or a colleague.
    pub host_id: String,
    pub topic: String,
    pub start_time: DateTime<Utc>,
    /// Minutes.
    pub duration: u32,
    pub created_at: DateTime<Utc>,
    pub agenda: String,
}

/// A meeting that took place, and its participants as the Reports API lists them.
#[derive(Clone, Debug)]
pub struct PastMeeting {
    pub uuid: String,
    pub id: u64,
    pub topic: String,
    pub start_time: DateTime<Utc>,
    pub participants: Vec<Value>,
}

/// One recorded instance of a meeting, with its files as the API lists them.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The instance's uuid: a meeting id recorded twice has two.
    pub uuid: String,
    pub meeting_id: u64,
    pub topic: String,
    pub start_time: DateTime<Utc>,
    pub files: Vec<Value>,
}

/// Where a page token continues a listing. Tokens stand for this in a table, as Zoom's do: a
/// client cannot make one up, and they run out.
#[derive(Clone)]
enum Listing {
    /// After this meeting id.
    Meetings { after: u64 },
    /// After this (start, uuid), newest first, in the window the first page asked for.
    Recordings {
        from: NaiveDate,
        to: NaiveDate,
        after: (DateTime<Utc>, String),
    },
}

struct PageToken {
    listing: Listing,
    issued: DateTime<Utc>,
}

pub struct Zoom {
    /// Refresh tokens that work. Zoom rotates them: a refresh issues a new one and the one used
    /// dies.
    pub refresh_tokens: HashSet<String>,
    pub access_tokens: HashSet<String>,
    /// The current access tokens stop working after this many more data requests.
    pub expire_token_after: Option<usize>,
    pub token_refreshes: usize,
    /// Server-to-Server (`account_credentials`) tokens issued.
    pub account_grants: usize,
    /// Live meetings by id; a deleted one is simply gone.
    pub meetings: BTreeMap<u64, Meeting>,
    /// Recordings by meeting uuid.
    pub recordings: BTreeMap<String, Recording>,
    /// Recordings in the trash, by meeting uuid: neither listed nor read, until recovered.
    pub trash: BTreeMap<String, Recording>,
    /// Meetings that took place, by uuid, with who attended (the Reports API's view).
    pub past_meetings: BTreeMap<String, PastMeeting>,
    /// The next N data requests answer 429 with `Retry-After` of this many seconds.
    pub throttle: Option<(usize, u64)>,
    /// The throttle starts only after this many more data requests (a sync stopped mid-way).
    pub throttle_after: Option<usize>,
    /// The next N data requests answer 503.
    pub unavailable: usize,
    /// The next N data requests answer 200 with a proxy's HTML page, as a corporate proxy or a
    /// gateway's error page may.
    pub proxy_pages: usize,
    /// Every page token answers 400 as if its 15 minutes were up.
    pub expire_page_tokens: bool,
    /// How many days Zoom's calendar runs ahead of the clock: meetings expire by it.
    pub days_passed: i64,
    /// The scopes the app was given, which every token it gets carries.
    pub app_scopes: &'static str,
    /// Meeting updates the user may still make today.
    pub updates_left_today: usize,
    /// Every data request's method, path and decoded query, in order.
    pub requests: Vec<String>,
    url: String,
    issued: usize,
    next_meeting_id: u64,
    page_tokens: HashMap<String, PageToken>,
}

#[derive(Clone)]
pub struct FakeZoom {
    /// `http://127.0.0.1:port`: the OAuth host and, under `/v2`, the API.
    pub url: String,
    pub state: Arc<Mutex<Zoom>>,
    client: reqwest::Client,
}

fn zoom_error(status: u16, code: u32, message: &str) -> Response {
    let body = json!({"code": code, "message": message});
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

/// The documented validation envelope, naming the offending field.
fn validation_failed(field: &str) -> Response {
    let body = json!({
        "code": 300,
        "message": "Validation Failed.",
        "errors": [{"field": field, "message": "Invalid field."}]
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn invalid_page_token() -> Response {
    zoom_error(400, 300, "The next page token is invalid or expired.")
}

/// The OAuth endpoint's own error shape, unlike the API's.
fn oauth_error(status: StatusCode, error: &str, reason: &str) -> Response {
    (status, Json(json!({"reason": reason, "error": error}))).into_response()
}

/// The current time in whole seconds, the precision Zoom reports times in: what a test stores
/// is then exactly what the API shows.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

fn seconds(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `page_size`, defaulted and capped the way Zoom does rather than refused.
fn page_size(params: &[(String, String)]) -> usize {
    param(params, "page_size")
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .map_or(DEFAULT_PAGE, |n| n.min(MAX_PAGE))
}

/// A non-empty `next_page_token`: clients commonly send an empty one on the first page.
fn page_token(params: &[(String, String)]) -> Option<&str> {
    param(params, "next_page_token").filter(|t| !t.is_empty())
}

/// The first `size` of `rows`, and whether more follow.
fn take_page<T>(rows: impl Iterator<Item = T>, size: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = rows.take(size + 1).collect();
    let more = page.len() > size;
    page.truncate(size);
    (page, more)
}

/// A meeting uuid as Zoom makes them: 16 bytes in standard base64, so `+`, `/` and `=` turn
/// up, and some begin with `/` or hold `//`, which a client must encode twice. Made from the
/// meeting's number, each kind in turn, so that every run of a test meets the same ones.
fn meeting_uuid(meeting: u64) -> String {
    let mut state = meeting.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let bytes: Vec<u8> = (0..16)
        .map(|_| {
            state ^= state >> 29;
            state = state.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (state >> 56) as u8
        })
        .collect();
    let mut uuid = STANDARD.encode(bytes);
    match meeting % 4 {
        0 => uuid.replace_range(0..1, "/"),
        1 => uuid.replace_range(5..7, "//"),
        2 => uuid.replace_range(3..4, "+"),
        _ => {}
    }
    uuid
}

/// An alphanumeric token of 32 characters, like Zoom's page tokens.
fn opaque_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let bytes = [*Uuid::new_v4().as_bytes(), *Uuid::new_v4().as_bytes()].concat();
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn hmac_hex(key: &str, message: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key");
    mac.update(message.as_bytes());
    let digest = mac.finalize().into_bytes();
    digest.iter().fold(String::new(), |mut hex, b| {
        hex.push_str(&format!("{b:02x}"));
        hex
    })
}

/// The headers of a webhook delivery of `body` sent at `at`, signed as Zoom signs them.
fn signed_headers(body: &str, at: DateTime<Utc>) -> Vec<(String, String)> {
    let timestamp = at.timestamp().to_string();
    let signature = format!(
        "v0={}",
        hmac_hex(WEBHOOK_SECRET, &format!("v0:{timestamp}:{body}"))
    );
    [
        (
            "content-type",
            "application/json; charset=utf-8".to_string(),
        ),
        ("user-agent", "Zoom Marketplace/1.0a".to_string()),
        ("x-zm-request-timestamp", timestamp),
        ("x-zm-signature", signature),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect()
}

/// The client id and secret from an HTTP Basic `Authorization` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    let value = HeaderValue::from_str(value).unwrap();
    response.headers_mut().insert(name, value);
    response
}

fn meeting_json(m: &Meeting) -> Value {
    json!({
        "uuid": m.uuid,
        "id": m.id,
        "host_id": m.host_id,
        "topic": m.topic,
        "type": 2,
        "start_time": seconds(m.start_time),
        "duration": m.duration,
        "timezone": "UTC",
        "created_at": seconds(m.created_at),
        "join_url": format!("https://zoom.us/j/{}", m.id)
    })
}

fn recording_json(r: &Recording) -> Value {
    let total_size: u64 = r.files.iter().filter_map(|f| f["file_size"].as_u64()).sum();
    // The meeting lasted as long as its longest file ran.
    let end = r
        .files
        .iter()
        .filter_map(|f| DateTime::parse_from_rfc3339(f["recording_end"].as_str()?).ok())
        .max();
    let duration = end.map_or(0, |e| (e.with_timezone(&Utc) - r.start_time).num_minutes());
    let share = URL_SAFE_NO_PAD.encode(&Sha256::digest(r.uuid.as_bytes())[..18]);
    json!({
        "uuid": r.uuid,
        "id": r.meeting_id,
        "account_id": ACCOUNT_ID,
        "host_id": HOST_ID,
        "topic": r.topic,
        "type": 2,
        "start_time": seconds(r.start_time),
        "duration": duration.max(0),
        "total_size": total_size,
        "recording_count": r.files.len(),
        "share_url": format!("https://zoom.us/rec/share/{share}"),
        "recording_files": r.files
    })
}

fn recording_file(meeting_uuid: &str, start: DateTime<Utc>) -> Value {
    let id = Uuid::new_v4().to_string();
    let end = start + TimeDelta::minutes(RECORDING_MINUTES);
    json!({
        "id": id,
        "meeting_id": meeting_uuid,
        "recording_start": seconds(start),
        "recording_end": seconds(end),
        "file_type": "MP4",
        "file_extension": "MP4",
        "file_size": 24_815_616,
        "play_url": format!("https://zoom.us/rec/play/{id}"),
        "download_url": format!("https://zoom.us/rec/download/{id}"),
        "status": "completed",
        "recording_type": "shared_screen_with_speaker_view"
    })
}

impl Zoom {
    fn new(url: String) -> Self {
        Self {
            refresh_tokens: HashSet::from([REFRESH_TOKEN.to_string()]),
            access_tokens: HashSet::new(),
            expire_token_after: None,
            token_refreshes: 0,
            account_grants: 0,
            meetings: BTreeMap::new(),
            recordings: BTreeMap::new(),
            trash: BTreeMap::new(),
            past_meetings: BTreeMap::new(),
            throttle: None,
            throttle_after: None,
            unavailable: 0,
            proxy_pages: 0,
            expire_page_tokens: false,
            days_passed: 0,
            app_scopes: "meeting:read recording:read",
            updates_left_today: 100,
            requests: Vec::new(),
            url,
            issued: 0,
            next_meeting_id: FIRST_MEETING_ID,
            page_tokens: HashMap::new(),
        }
    }

    fn new_meeting(&mut self, topic: &str, created_at: DateTime<Utc>) -> Meeting {
        let id = self.next_meeting_id;
        self.next_meeting_id += 1;
        Meeting {
            id,
            uuid: meeting_uuid(id),
            host_id: HOST_ID.to_string(),
            topic: topic.to_string(),
            start_time: created_at + TimeDelta::days(1),
            duration: 30,
            created_at,
            agenda: String::new(),
        }
    }

    /// Whether Zoom still has `meeting`: it expires some days after its start.
    fn unexpired(&self, meeting: &Meeting) -> bool {
        let today = now() + TimeDelta::days(self.days_passed);
        meeting.start_time + TimeDelta::days(MEETING_EXPIRY_DAYS) > today
    }

    fn meeting_mut(&mut self, id: &str) -> &mut Meeting {
        let key = id.parse::<u64>().ok();
        key.and_then(|k| self.meetings.get_mut(&k))
            .unwrap_or_else(|| panic!("no meeting {id}"))
    }

    /// Answers a token request: `params` are the query string and the form body together, as
    /// Zoom reads the grant from either.
    fn token(&mut self, headers: &HeaderMap, params: &[(String, String)]) -> Response {
        if basic_credentials(headers) != Some((CLIENT_ID.to_string(), CLIENT_SECRET.to_string())) {
            let reason = "Invalid client_id or client_secret";
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", reason);
        }
        let field = |name: &str| param(params, name).unwrap_or_default();
        let mut answer = json!({
            "token_type": "bearer",
            "expires_in": EXPIRES_IN,
            "scope": self.app_scopes,
            "api_url": self.url
        });
        match field("grant_type") {
            "refresh_token" => {
                if !self.refresh_tokens.remove(field("refresh_token")) {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "Invalid Token!");
                }
                self.token_refreshes += 1;
                answer["access_token"] = json!(self.issue_access_token());
                let refresh_token = format!("eyJzdiI6IjAwMDAwMSJ9.rt-{}", self.issued);
                self.refresh_tokens.insert(refresh_token.clone());
                answer["refresh_token"] = json!(refresh_token);
            }
            "account_credentials" => {
                if field("account_id") != ACCOUNT_ID {
                    let reason = "Invalid account_id";
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", reason);
                }
                self.account_grants += 1;
                answer["access_token"] = json!(self.issue_access_token());
            }
            _ => {
                let reason = "Unsupported grant type";
                return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", reason);
            }
        }
        Json(answer).into_response()
    }

    fn issue_access_token(&mut self) -> String {
        self.issued += 1;
        let token = format!("eyJzdiI6IjAwMDAwMiJ9.at-{}", self.issued);
        self.access_tokens.insert(token.clone());
        token
    }

    /// Whether a data request's bearer token is one issued here and still honoured; counts the
    /// request against `expire_token_after`.
    fn admits(&mut self, headers: &HeaderMap) -> bool {
        if let Some(n) = self.expire_token_after {
            if n == 0 {
                self.access_tokens.clear();
                self.expire_token_after = None;
            } else {
                self.expire_token_after = Some(n - 1);
            }
        }
        headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.access_tokens.contains(token))
    }

    /// Logs a data request, then answers it instead of the route when the token is not
    /// admitted or a knob says so, checked in that order.
    fn refuse(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Response> {
        let params = Query::<Vec<(String, String)>>::try_from_uri(uri).map_or(Vec::new(), |q| q.0);
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        self.requests
            .push(format!("{method} {}{query}", uri.path()));
        if !self.admits(headers) {
            return Some(zoom_error(401, 124, "Invalid access token."));
        }
        let throttling = match self.throttle_after {
            Some(0) | None => true,
            Some(n) => {
                self.throttle_after = Some(n - 1);
                false
            }
        };
        if let Some((n, seconds)) = self.throttle.filter(|(n, _)| throttling && *n > 0) {
            self.throttle = (n > 1).then_some((n - 1, seconds));
            let message =
                "You have reached the maximum per-second rate limit for this API. Try again later.";
            let mut answer = zoom_error(429, 429, message);
            for (name, value) in [
                ("retry-after", seconds.to_string()),
                ("x-ratelimit-category", "Light".to_string()),
                ("x-ratelimit-type", "QPS".to_string()),
                ("x-ratelimit-limit", RATE_LIMIT.to_string()),
                ("x-ratelimit-remaining", "0".to_string()),
            ] {
                answer = with_header(answer, name, &value);
            }
            return Some(answer);
        }
        if self.unavailable > 0 {
            self.unavailable -= 1;
            return Some(zoom_error(503, 503, "Service temporarily unavailable."));
        }
        if self.proxy_pages > 0 {
            self.proxy_pages -= 1;
            let page = "<html><body>Please wait while we check your connection</body></html>";
            return Some(with_header(
                (StatusCode::OK, page).into_response(),
                "content-type",
                "text/html",
            ));
        }
        None
    }

    /// Issues a page token for the rest of a listing.
    fn issue_page_token(&mut self, listing: Listing) -> String {
        let token = opaque_token();
        let issued = Utc::now();
        self.page_tokens
            .insert(token.clone(), PageToken { listing, issued });
        token
    }

    /// Where a page token continues, while it lives. A token can be used again: a client
    /// retrying a throttled page sends the same one.
    fn page(&self, token: &str) -> Option<Listing> {
        if self.expire_page_tokens {
            return None;
        }
        let page = self.page_tokens.get(token)?;
        let lifetime = TimeDelta::minutes(PAGE_TOKEN_LIFETIME_MINUTES);
        (Utc::now() - page.issued < lifetime).then(|| page.listing.clone())
    }

    fn list_meetings(&mut self, params: &[(String, String)]) -> Response {
        // Every meeting here is a scheduled one, so `type` changes nothing.
        let size = page_size(params);
        let after = match page_token(params).map(|t| self.page(t)) {
            None => 0,
            Some(Some(Listing::Meetings { after })) => after,
            Some(_) => return invalid_page_token(),
        };
        let rows = self.meetings.range((Excluded(after), Unbounded));
        let listed = |m: &&Meeting| m.host_id == HOST_ID && self.unexpired(m);
        let (page, more) = take_page(rows.map(|(_, m)| m).filter(listed), size);
        let total = self.meetings.values().filter(listed).count();
        let meetings: Vec<Value> = page.iter().map(|m| meeting_json(m)).collect();
        let last = page.last().filter(|_| more).map(|m| m.id);
        let next = last.map_or(String::new(), |after| {
            self.issue_page_token(Listing::Meetings { after })
        });
        Json(json!({
            "page_size": size,
            "total_records": total,
            "next_page_token": next,
            "meetings": meetings
        }))
        .into_response()
    }

    fn list_recordings(&mut self, params: &[(String, String)]) -> Response {
        let size = page_size(params);
        let (from, to, after) = match page_token(params).map(|t| self.page(t)) {
            Some(Some(Listing::Recordings { from, to, after })) => (from, to, Some(after)),
            Some(_) => return invalid_page_token(),
            None => {
                let today = Utc::now().date_naive();
                let day = |name: &str, default: NaiveDate| match param(params, name) {
                    None => Some(default),
                    Some(text) => NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(),
                };
                let Some(from) = day("from", today - TimeDelta::days(1)) else {
                    return validation_failed("from");
                };
                let Some(to) = day("to", today) else {
                    return validation_failed("to");
                };
                if to < from || to - from > TimeDelta::days(30) {
                    let message = "The date range is invalid, it can only be within one month.";
                    return zoom_error(400, 300, message);
                }
                (from, to, None)
            }
        };
        let mut rows: Vec<&Recording> = self
            .recordings
            .values()
            .filter(|r| (from..=to).contains(&r.start_time.date_naive()))
            .collect();
        rows.sort_by(|a, b| (b.start_time, &b.uuid).cmp(&(a.start_time, &a.uuid)));
        let total = rows.len();
        let rest = rows.into_iter().filter(|r| match &after {
            None => true,
            Some((start, uuid)) => (r.start_time, &r.uuid) < (*start, uuid),
        });
        let (page, more) = take_page(rest, size);
        let meetings: Vec<Value> = page.iter().map(|r| recording_json(r)).collect();
        let last = page
            .last()
            .filter(|_| more)
            .map(|r| (r.start_time, r.uuid.clone()));
        let next = last.map_or(String::new(), |after| {
            self.issue_page_token(Listing::Recordings { from, to, after })
        });
        Json(json!({
            "from": date(from),
            "to": date(to),
            "page_size": size,
            "total_records": total,
            "next_page_token": next,
            "meetings": meetings
        }))
        .into_response()
    }
}

/// Zoom's answer for a user other than the authorized one, who is all this fake knows.
fn unknown_user(user: &str) -> Option<Response> {
    (user != "me" && user != HOST_ID)
        .then(|| zoom_error(404, 1001, &format!("User does not exist: {user}.")))
}

async fn token(
    State(fake): State<FakeZoom>,
    headers: HeaderMap,
    Query(mut params): Query<Vec<(String, String)>>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    // A Server-to-Server request often has no body at all: its grant is in the query.
    if let Ok(Form(fields)) = form {
        params.extend(fields);
    }
    fake.state.lock().unwrap().token(&headers, &params)
}

/// Every `/v2` route: logs the request, answers instead of the route when the token is not
/// admitted or a knob says so, and otherwise adds the rate-limit headers Zoom sends on every
/// answer.
async fn admit(State(fake): State<FakeZoom>, request: Request, next: Next) -> Response {
    let refusal =
        fake.state
            .lock()
            .unwrap()
            .refuse(request.method(), request.uri(), request.headers());
    if let Some(answer) = refusal {
        return answer;
    }
    let answer = next.run(request).await;
    let answer = with_header(answer, "x-ratelimit-limit", &RATE_LIMIT.to_string());
    with_header(
        answer,
        "x-ratelimit-remaining",
        &(RATE_LIMIT - 1).to_string(),
    )
}

async fn list_meetings(
    State(fake): State<FakeZoom>,
    Path(user): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Some(answer) = unknown_user(&user) {
        return answer;
    }
    fake.state.lock().unwrap().list_meetings(&params)
}

/// `GET /users/{userId}`: the user the credentials are for, to an app granted `user:read`.
async fn get_user(State(fake): State<FakeZoom>, Path(user): Path<String>) -> Response {
    if !fake
        .state
        .lock()
        .unwrap()
        .app_scopes
        .split(' ')
        .any(|s| s == "user:read")
    {
        let message = "Invalid access token, does not contain scopes:[user:read].";
        return zoom_error(400, 4711, message);
    }
    if let Some(answer) = unknown_user(&user) {
        return answer;
    }
    Json(json!({
        "id": HOST_ID, "first_name": "Dana", "last_name": "Reyes",
        "email": "dana@contoso.test", "type": 2, "account_id": ACCOUNT_ID, "status": "active"
    }))
    .into_response()
}

async fn get_meeting(State(fake): State<FakeZoom>, Path(id): Path<String>) -> Response {
    let zoom = fake.state.lock().unwrap();
    let meeting = id.parse::<u64>().ok().and_then(|k| zoom.meetings.get(&k));
    let Some(meeting) = meeting.filter(|m| zoom.unexpired(m)) else {
        return zoom_error(404, 3001, &format!("Meeting does not exist: {id}."));
    };
    let mut body = meeting_json(meeting);
    body["agenda"] = json!(meeting.agenda);
    body["settings"] = json!({});
    Json(body).into_response()
}

/// `PATCH` and `DELETE` of one meeting.
async fn change_meeting(
    State(fake): State<FakeZoom>,
    Path(id): Path<String>,
    method: Method,
    body: axum::body::Bytes,
) -> Response {
    let mut zoom = fake.state.lock().unwrap();
    if !zoom.app_scopes.split(' ').any(|s| s == "meeting:write") {
        let message = "Invalid access token, does not contain scopes:[meeting:write].";
        return zoom_error(400, 4711, message);
    }
    let Some(key) = id
        .parse::<u64>()
        .ok()
        .filter(|k| zoom.meetings.get(k).is_some_and(|m| zoom.unexpired(m)))
    else {
        return zoom_error(404, 3001, &format!("Meeting does not exist: {id}."));
    };
    if method == Method::DELETE {
        zoom.meetings.remove(&key);
        return StatusCode::NO_CONTENT.into_response();
    }
    if zoom.updates_left_today == 0 {
        let message = "You have exceeded the daily rate limit (100) of Meeting Create/Update API requests permitted for this particular user. You may resume these requests at GMT 00:00:00.";
        return zoom_error(429, 429, message);
    }
    let Ok(Value::Object(changes)) = serde_json::from_slice::<Value>(&body) else {
        return zoom_error(400, 300, "Request Body should be a valid JSON object.");
    };
    let meeting = zoom.meetings[&key].clone();
    let mut changed = meeting.clone();
    for (field, value) in &changes {
        let ok = match (field.as_str(), value) {
            ("topic", Value::String(v)) => {
                changed.topic = v.clone();
                true
            }
            ("agenda", Value::String(v)) => {
                changed.agenda = v.clone();
                true
            }
            ("start_time", Value::String(v)) => match DateTime::parse_from_rfc3339(v) {
                Ok(t) => {
                    changed.start_time = t.with_timezone(&Utc);
                    true
                }
                Err(_) => false,
            },
            ("duration", Value::Number(n)) => match n.as_u64() {
                Some(minutes) => {
                    changed.duration = minutes as u32;
                    true
                }
                None => false,
            },
            ("timezone", Value::String(_)) => true,
            _ => false,
        };
        if !ok {
            let body = json!({"code": 300, "message": "Validation Failed.",
                              "errors": [{"field": field, "message": "Invalid field."}]});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    }
    zoom.updates_left_today -= 1;
    zoom.meetings.insert(key, changed);
    StatusCode::NO_CONTENT.into_response()
}

async fn list_recordings(
    State(fake): State<FakeZoom>,
    Path(user): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Some(answer) = unknown_user(&user) {
        return answer;
    }
    fake.state.lock().unwrap().list_recordings(&params)
}

/// An offset page of `rows`: the rows and the token of the next page (`p{offset}`, or empty
/// at the end), from the `next_page_token` asked for; `None` for a token it never issued.
fn offset_page(rows: Vec<Value>, params: &[(String, String)]) -> Option<(Vec<Value>, String)> {
    let start = match param(params, "next_page_token").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => match token
            .strip_prefix('p')
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n <= rows.len() => n,
            _ => return None,
        },
    };
    let end = (start + page_size(params)).min(rows.len());
    let next = if end < rows.len() {
        format!("p{end}")
    } else {
        String::new()
    };
    Some((rows[start..end].to_vec(), next))
}

/// `GET /report/users/{user}/meetings?from&to`: meetings that took place in a window of at most
/// a month, oldest first.
async fn report_meetings(
    State(fake): State<FakeZoom>,
    Path(user): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Some(answer) = unknown_user(&user) {
        return answer;
    }
    let day = |name: &str| {
        param(&params, name).and_then(|t| NaiveDate::parse_from_str(t, "%Y-%m-%d").ok())
    };
    let (Some(from), Some(to)) = (day("from"), day("to")) else {
        return validation_failed("from");
    };
    if to < from || to - from > TimeDelta::days(30) {
        return zoom_error(
            400,
            300,
            "The date range is invalid, it can only be within one month.",
        );
    }
    let zoom = fake.state.lock().unwrap();
    let mut meetings: Vec<&PastMeeting> = zoom
        .past_meetings
        .values()
        .filter(|m| (from..=to).contains(&m.start_time.date_naive()))
        .collect();
    meetings.sort_by(|a, b| (a.start_time, &a.uuid).cmp(&(b.start_time, &b.uuid)));
    let rows: Vec<Value> = meetings
        .iter()
        .map(|m| {
            json!({"uuid": m.uuid, "id": m.id, "host_id": HOST_ID, "type": 2, "topic": m.topic,
                   "start_time": seconds(m.start_time), "duration": 30,
                   "participants_count": m.participants.len()})
        })
        .collect();
    let total = rows.len();
    match offset_page(rows, &params) {
        Some((page, next)) => Json(json!({
            "from": date(from), "to": date(to), "page_size": page_size(&params),
            "total_records": total, "next_page_token": next, "meetings": page
        }))
        .into_response(),
        None => invalid_page_token(),
    }
}

/// `GET /meetings/{meetingId}/recordings`: a meeting instance's recording, by its uuid. A uuid
/// that begins with `/` or holds `//` must come double-encoded: sent once-encoded, the gateway
/// reads its slashes as the path's and finds nothing. One in the trash is not found.
async fn get_recording(State(fake): State<FakeZoom>, Path(meeting): Path<String>) -> Response {
    let once_encoded = !meeting.contains('%');
    let uuid = if once_encoded {
        meeting
    } else {
        percent_decode(&meeting)
    };
    let zoom = fake.state.lock().unwrap();
    let read_as_path = once_encoded && (uuid.starts_with('/') || uuid.contains("//"));
    match zoom.recordings.get(&uuid).filter(|_| !read_as_path) {
        Some(recording) => Json(recording_json(recording)).into_response(),
        None => zoom_error(404, 3301, "This recording does not exist."),
    }
}

/// `GET /report/meetings/{meetingId}/participants`: who attended a past meeting. A uuid that
/// begins with `/` or holds `//` comes double-encoded, as Zoom requires.
async fn report_participants(
    State(fake): State<FakeZoom>,
    Path(meeting): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let uuid = if meeting.contains('%') {
        percent_decode(&meeting)
    } else {
        meeting
    };
    let zoom = fake.state.lock().unwrap();
    let Some(past) = zoom.past_meetings.get(&uuid) else {
        return zoom_error(404, 3001, &format!("Meeting does not exist: {uuid}."));
    };
    let total = past.participants.len();
    match offset_page(past.participants.clone(), &params) {
        Some((page, next)) => Json(json!({
            "page_count": 1, "page_size": page_size(&params), "total_records": total,
            "next_page_token": next, "participants": page
        }))
        .into_response(),
        None => invalid_page_token(),
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                match u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn unknown() -> Response {
    zoom_error(404, 404, "The requested resource was not found.")
}

impl FakeZoom {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Self {
            url: url.clone(),
            state: Arc::new(Mutex::new(Zoom::new(url))),
            client: reqwest::Client::new(),
        };
        let router = Router::new()
            .route("/v2/users/{user}", get(get_user))
            .route("/v2/users/{user}/meetings", get(list_meetings))
            .route(
                "/v2/meetings/{id}",
                get(get_meeting)
                    .patch(change_meeting)
                    .delete(change_meeting),
            )
            .route("/v2/users/{user}/recordings", get(list_recordings))
            .route("/v2/meetings/{meeting}/recordings", get(get_recording))
            .route("/v2/report/users/{user}/meetings", get(report_meetings))
            .route(
                "/v2/report/meetings/{meeting}/participants",
                get(report_participants),
            )
            // Only the routes above are data routes: not the token endpoint below.
            .route_layer(middleware::from_fn_with_state(fake.clone(), admit))
            .route("/oauth/token", post(token))
            .fallback(unknown)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for a user-authorized (refresh-token) connection.
    pub fn credentials(&self) -> Value {
        json!({
            "refresh_token": REFRESH_TOKEN,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "webhook_secret_token": WEBHOOK_SECRET
        })
    }

    /// The credentials an operator stores for a Server-to-Server connection.
    pub fn account_credentials(&self) -> Value {
        json!({
            "account_id": ACCOUNT_ID,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "webhook_secret_token": WEBHOOK_SECRET
        })
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.url)
    }

    pub fn api_base(&self) -> String {
        format!("{}/v2", self.url)
    }

    /// Schedules a meeting for this time tomorrow and returns its id.
    pub fn add_meeting(&self, topic: &str) -> String {
        let mut zoom = self.state.lock().unwrap();
        let meeting = zoom.new_meeting(topic, now());
        let id = meeting.id;
        zoom.meetings.insert(id, meeting);
        id.to_string()
    }

    /// Schedules a meeting a colleague of the account hosts; returns its id.
    pub fn add_colleague_meeting(&self, topic: &str) -> String {
        let mut zoom = self.state.lock().unwrap();
        let mut meeting = zoom.new_meeting(topic, now());
        meeting.host_id = "colleague-0000000000001".into();
        let id = meeting.id;
        zoom.meetings.insert(id, meeting);
        id.to_string()
    }

    /// Schedules a meeting for `start` (in the past: one that was held) and returns its id.
    pub fn schedule_meeting(&self, topic: &str, start: DateTime<Utc>) -> String {
        let mut zoom = self.state.lock().unwrap();
        let meeting = zoom.new_meeting(topic, start - TimeDelta::days(1));
        let id = meeting.id;
        zoom.meetings.insert(id, meeting);
        id.to_string()
    }

    /// Moves Zoom's calendar on by `days`: meetings whose time is up expire.
    pub fn let_days_pass(&self, days: i64) {
        self.state.lock().unwrap().days_passed += days;
    }

    /// Records that meeting `topic` took place at `start`; returns its uuid.
    pub fn add_past_meeting(&self, topic: &str, start: DateTime<Utc>) -> String {
        let mut zoom = self.state.lock().unwrap();
        let meeting = zoom.new_meeting(topic, start);
        let uuid = meeting.uuid.clone();
        zoom.past_meetings.insert(
            uuid.clone(),
            PastMeeting {
                uuid: uuid.clone(),
                id: meeting.id,
                topic: topic.to_string(),
                start_time: DateTime::from_timestamp(start.timestamp(), 0).unwrap(),
                participants: Vec::new(),
            },
        );
        uuid
    }

    /// Adds someone who attended past meeting `uuid`; returns their participant id.
    pub fn add_participant(&self, uuid: &str, name: &str, email: &str) -> String {
        let mut zoom = self.state.lock().unwrap();
        let past = zoom
            .past_meetings
            .get_mut(uuid)
            .unwrap_or_else(|| panic!("no past meeting {uuid}"));
        let id = format!("p{:06}", past.participants.len() + 1);
        let join = past.start_time;
        past.participants.push(json!({
            "id": id, "user_id": format!("16778240{}", past.participants.len()), "name": name,
            "user_email": email, "join_time": seconds(join),
            "leave_time": seconds(join + TimeDelta::minutes(30)), "duration": 1800,
            "status": "in_meeting"
        }));
        id
    }

    /// Schedules `n` meetings named `Meeting 00001` onwards under one lock.
    pub fn load_meetings(&self, n: usize) {
        let mut zoom = self.state.lock().unwrap();
        let created = now();
        for i in 1..=n {
            let meeting = zoom.new_meeting(&format!("Meeting {i:05}"), created);
            zoom.meetings.insert(meeting.id, meeting);
        }
    }

    /// A live meeting as the fake holds it.
    pub fn meeting(&self, id: &str) -> Option<Meeting> {
        let zoom = self.state.lock().unwrap();
        let key = id.parse::<u64>().ok()?;
        zoom.meetings.get(&key).cloned()
    }

    pub fn rename_meeting(&self, id: &str, topic: &str) {
        self.state.lock().unwrap().meeting_mut(id).topic = topic.to_string();
    }

    /// Deletes a meeting: it just stops being listed, and `GET /meetings/{id}` answers 404.
    pub fn delete_meeting(&self, id: &str) {
        let mut zoom = self.state.lock().unwrap();
        let key = zoom.meeting_mut(id).id;
        zoom.meetings.remove(&key);
    }

    /// Adds the cloud recording of a meeting instance held at `start` (one MP4 of 30 minutes)
    /// and returns the instance's uuid.
    pub fn add_recording(&self, topic: &str, start: DateTime<Utc>) -> String {
        let mut zoom = self.state.lock().unwrap();
        let start = DateTime::from_timestamp(start.timestamp(), 0).unwrap();
        let meeting = zoom.new_meeting(topic, start);
        let recording = Recording {
            uuid: meeting.uuid.clone(),
            meeting_id: meeting.id,
            topic: topic.to_string(),
            start_time: start,
            files: vec![recording_file(&meeting.uuid, start)],
        };
        zoom.recordings.insert(meeting.uuid.clone(), recording);
        meeting.uuid
    }

    /// Moves the recording of meeting instance `uuid` to the trash.
    pub fn trash_recording(&self, uuid: &str) {
        let mut zoom = self.state.lock().unwrap();
        let recording = zoom.recordings.remove(uuid).expect("no such recording");
        zoom.trash.insert(uuid.to_string(), recording);
    }

    /// Takes the recording of meeting instance `uuid` back from the trash.
    pub fn recover_recording(&self, uuid: &str) {
        let mut zoom = self.state.lock().unwrap();
        let recording = zoom.trash.remove(uuid).expect("not in the trash");
        zoom.recordings.insert(uuid.to_string(), recording);
    }

    /// Renames the recording of meeting instance `uuid`.
    pub fn rename_recording(&self, uuid: &str, topic: &str) {
        let mut zoom = self.state.lock().unwrap();
        zoom.recordings
            .get_mut(uuid)
            .expect("no such recording")
            .topic = topic.to_string();
    }

    /// A webhook delivery as Zoom signs it: (headers, body) with `x-zm-request-timestamp` =
    /// `at` in seconds and `x-zm-signature` = `v0=` + hex(HMAC-SHA256(WEBHOOK_SECRET,
    /// `v0:{ts}:{body}`)) over exactly the body returned. `event` is e.g. `meeting.updated`,
    /// `object` the payload's object.
    pub fn webhook_at(
        &self,
        event: &str,
        object: Value,
        at: DateTime<Utc>,
    ) -> (Vec<(String, String)>, String) {
        let body = json!({
            "event": event,
            "event_ts": at.timestamp_millis(),
            "payload": {"account_id": ACCOUNT_ID, "object": object}
        })
        .to_string();
        (signed_headers(&body, at), body)
    }

    /// A webhook delivery sent now.
    pub fn webhook(&self, event: &str, object: Value) -> (Vec<(String, String)>, String) {
        self.webhook_at(event, object, Utc::now())
    }

    /// The URL validation challenge Zoom sends when a webhook URL is saved (and every 72 hours
    /// after), signed like any event, and the answer it expects:
    /// `{"plainToken", "encryptedToken": hex(HMAC-SHA256(WEBHOOK_SECRET, plainToken))}`.
    pub fn url_validation(&self) -> ((Vec<(String, String)>, String), Value) {
        let at = Utc::now();
        let plain_token = URL_SAFE_NO_PAD.encode(Uuid::new_v4().as_bytes());
        let body = json!({
            "event": "endpoint.url_validation",
            "payload": {"plainToken": plain_token},
            "event_ts": at.timestamp_millis()
        })
        .to_string();
        let expected = json!({
            "plainToken": plain_token,
            "encryptedToken": hmac_hex(WEBHOOK_SECRET, &plain_token)
        });
        ((signed_headers(&body, at), body), expected)
    }

    /// POSTs a delivery from `webhook` or `url_validation` to `url` as Zoom does. Returns
    /// (status, body) of the receiver's answer; status 0 when it could not be reached or took
    /// longer than the 3 seconds Zoom waits before counting the delivery failed.
    pub async fn deliver(
        &self,
        url: &str,
        delivery: &(Vec<(String, String)>, String),
    ) -> (u16, String) {
        let (headers, body) = delivery;
        let mut request = self
            .client
            .post(url)
            .body(body.clone())
            .timeout(ACK_TIMEOUT);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        match request.send().await {
            Ok(answer) => (
                answer.status().as_u16(),
                answer.text().await.unwrap_or_default(),
            ),
            Err(e) => (0, e.to_string()),
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn token_refreshes(&self) -> usize {
        self.state.lock().unwrap().token_refreshes
    }
}
