//! Gong on loopback for the Gong adapter, reproducing the wire facts it depends on: the OAuth
//! token endpoint (`POST /oauth2/generate-customer-token`) with the grant in the query string
//! (a form body is read too) and the app's id and secret in HTTP Basic auth, single-use refresh
//! tokens (every refresh returns a new one and the one used dies, so spending one twice gets
//! 400 `invalid_grant`), and `api_base_url_for_customer`, the customer's own API host, in every
//! token answer; the REST API v2 under `/v2`, which takes either an access key and secret in
//! HTTP Basic auth (they never expire) or an OAuth bearer token, and answers errors as
//! `{"requestId","errors":["..."]}`: 401 for bad credentials, 429 with `Retry-After` both for
//! the per-second limit and for the daily one (until midnight UTC), 503; calls listed by a
//! `fromDateTime`/`toDateTime` window of start times (`toDateTime` exclusive) with `GET
//! /v2/calls`, or with their parties and topics by window and/or `callIds` with `POST
//! /v2/calls/extensive`, 100 a page, the next page named by an opaque `records.cursor` that is
//! present only while more remain and must come back with the same query (in the query string
//! for a GET, in the JSON body for a POST), 400 otherwise; 404 when no call matches at all,
//! which Gong answers instead of an empty list; users by `GET /v2/users`. Gong has no
//! modified-since filter and no delete signal: an enrichment changes a call in place (a new
//! title here) and a deleted call just stops being listed. Automation-rule webhooks are built as
//! Gong sends them: the call as `callData` and an RS256 JWT, raw, in `Authorization`, whose
//! claims name the webhook URL and the SHA-256 of the body, checked with the rule's public key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use axum::body::{Body, Bytes};
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Timelike, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// An API access key as Gong's admin page shows them; its secret is the password half of Basic.
pub const ACCESS_KEY: &str = "UQ4SK2LPUI5BFPHIHO4GXZMJEVFKXQ5E";
pub const ACCESS_KEY_SECRET: &str =
    "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjIwNTQxNTU4OTcsImFjY2Vzc0tleSI6IlVRNFNLMiJ9.kx2Fq9yXb0sW";
pub const CLIENT_ID: &str = "castiel-sync-7fd2a1";
pub const CLIENT_SECRET: &str = "mK8vQ2xR5tZ9wL3nB6yH1pJ4cF7dG0sA";
pub const REFRESH_TOKEN: &str = "gong-rt-initial";
/// The first seeded user, the host of every call.
pub const USER_ID: &str = "234599484848423";
const USER_EMAIL: &str = "robin.kline@example.com";
const USER_NAME: &str = "Robin Kline";
const USER_TITLE: &str = "Account Executive";
const WORKSPACE_ID: &str = "5562739194953732039";
/// The first call id; later ones count up from it. Gong's ids have 19 digits, more than a
/// double holds exactly, which is why the API sends them as strings.
const FIRST_CALL_ID: u64 = 7_782_342_274_025_937_895;
const FIRST_PARTY_ID: u64 = 5_481_039_237_716_021_118;
const PAGE: usize = 100;
const EXPIRES_IN: u64 = 86_400;
const SCOPE: &str = "api:calls:read:basic api:calls:read:extensive api:users:read";
/// How long a webhook's JWT is good for after it is issued.
const WEBHOOK_LIFETIME_SECONDS: i64 = 300;
const CALL_SECONDS: u64 = 1800;

#[derive(Clone, Debug)]
pub struct Call {
    /// 19 digits.
    pub id: String,
    pub title: String,
    /// Whole seconds, the precision the API shows.
    pub started: DateTime<Utc>,
    /// Seconds.
    pub duration: u64,
    pub parties: Vec<Value>,
    /// `{"name", "duration"}` each, as `content.topics` lists them.
    pub topics: Vec<Value>,
}

/// Where a cursor continues a listing.
#[derive(Clone)]
enum After {
    /// After this (started, id), in start order.
    Call(DateTime<Utc>, String),
    /// After this many users.
    User(usize),
}

/// What a cursor stands for. Cursors are kept in a table, as opaque to a client as Gong's:
/// one cannot be made up, and one is good only with the query that produced it.
struct Cursor {
    query: String,
    after: After,
    page: usize,
}

pub struct Gong {
    /// Refresh tokens that work. Gong's are single-use: a refresh issues a new one and the one
    /// used dies.
    pub refresh_tokens: HashSet<String>,
    pub access_tokens: HashSet<String>,
    /// The current access tokens stop working after this many more data requests. Access keys
    /// are unaffected: they do not expire.
    pub expire_token_after: Option<usize>,
    pub token_refreshes: usize,
    /// Live calls by id; a deleted one is simply gone.
    pub calls: BTreeMap<String, Call>,
    /// What `/v2/users` lists, in order.
    pub users: Vec<Value>,
    /// The next N data requests answer 429 with `Retry-After` of this many seconds.
    pub throttle: Option<(usize, u64)>,
    /// The throttle starts only after this many more data requests (a sync stopped mid-way).
    pub throttle_after: Option<usize>,
    /// The next N data requests answer 503.
    pub unavailable: usize,
    /// Data requests left today. At 0 every data request answers 429 with `Retry-After` until
    /// midnight UTC; a request that gets past this check counts, even if it is then throttled.
    pub daily_limit: Option<usize>,
    /// Every data request's method, path and decoded query, and for a POST its body, in order.
    pub requests: Vec<String>,
    url: String,
    issued: usize,
    next_call_id: u64,
    next_party_id: u64,
    cursors: HashMap<String, Cursor>,
}

#[derive(Clone)]
pub struct FakeGong {
    /// `http://127.0.0.1:port`: the OAuth host and the customer's API host.
    pub url: String,
    pub state: Arc<Mutex<Gong>>,
    /// The automation rule's signing key, made on first use: RSA key generation takes a
    /// noticeable while in an unoptimized build, and only webhook tests need one.
    key: Arc<OnceLock<KeyPair>>,
}

/// A request id as Gong makes them: 19 lowercase letters and digits.
fn request_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Uuid::new_v4().as_bytes()[..16]
        .iter()
        .chain(&Uuid::new_v4().as_bytes()[..3])
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// Every API error, whatever the status: `{"requestId","errors":[message]}`.
fn gong_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"requestId": request_id(), "errors": [message]});
    (status, Json(body)).into_response()
}

fn invalid_cursor() -> Response {
    gong_error(StatusCode::BAD_REQUEST, "cursor is invalid")
}

fn no_calls() -> Response {
    let message = "No calls found corresponding to the provided filters";
    gong_error(StatusCode::NOT_FOUND, message)
}

fn too_many_requests(retry_after: u64) -> Response {
    let mut answer = gong_error(StatusCode::TOO_MANY_REQUESTS, "Too many requests");
    let value = HeaderValue::from_str(&retry_after.to_string()).unwrap();
    answer.headers_mut().insert("retry-after", value);
    answer
}

/// The token endpoint's own error shape, the OAuth one, unlike the API's.
fn oauth_error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// The time in whole seconds, the precision Gong reports times in: what a test stores is then
/// exactly what the API shows.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap()
}

fn stamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The first `size` of `rows`, and whether more follow.
fn take_page<T>(rows: impl Iterator<Item = T>, size: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = rows.take(size + 1).collect();
    let more = page.len() > size;
    page.truncate(size);
    (page, more)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut hex, b| {
        hex.push_str(&format!("{b:02x}"));
        hex
    })
}

/// A user name and password from an HTTP Basic `Authorization` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn user(id: &str, email: &str, first: &str, last: &str, title: &str, created: &str) -> Value {
    json!({
        "id": id,
        "emailAddress": email,
        "firstName": first,
        "lastName": last,
        "title": title,
        "active": true,
        "created": created
    })
}

/// A call's metadata, as `/v2/calls` lists it and as `metaData` elsewhere.
fn meta_json(call: &Call) -> Value {
    json!({
        "id": call.id,
        "url": format!("https://app.gong.io/call?id={}", call.id),
        "title": call.title,
        // The same as `started`: Gong windows web conferences by scheduled time and others by
        // start time, and equal times keep a test from depending on which.
        "scheduled": stamp(call.started),
        "started": stamp(call.started),
        "duration": call.duration,
        "primaryUserId": USER_ID,
        "direction": "Conference",
        "system": "Zoom",
        "scope": "External",
        "media": "Video",
        "language": "eng",
        "workspaceId": WORKSPACE_ID,
        "isPrivate": false,
        "meetingUrl": "https://zoom.us/j/1"
    })
}

/// A call as `/v2/calls/extensive` and webhooks carry it.
fn extensive_json(call: &Call) -> Value {
    json!({
        "metaData": meta_json(call),
        "parties": call.parties,
        "content": {"topics": call.topics},
        "context": []
    })
}

/// A call window and id filter, read from the query string or from an extensive `filter`.
struct CallQuery {
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    ids: Option<Vec<String>>,
}

impl CallQuery {
    /// The query, or the message of the 400 that refuses it.
    fn read(
        from: Option<&str>,
        to: Option<&str>,
        ids: Option<Vec<String>>,
    ) -> Result<Self, String> {
        let time = |name: &str, text: Option<&str>| match text {
            None => Ok(None),
            Some(text) => DateTime::parse_from_rfc3339(text)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| format!("{name}: '{text}' is not an ISO-8601 date-time")),
        };
        let mut ids = ids;
        // The same ids in another order are the same query.
        if let Some(ids) = &mut ids {
            ids.sort();
            ids.dedup();
        }
        Ok(Self {
            from: time("fromDateTime", from)?,
            to: time("toDateTime", to)?,
            ids,
        })
    }

    /// What a cursor must have been issued for to continue this query on `route`. Times are
    /// compared as instants, so `Z` and `+00:00` spell the same query.
    fn key(&self, route: &str) -> String {
        format!("{route} {:?} {:?} {:?}", self.from, self.to, self.ids)
    }

    fn matches(&self, call: &Call) -> bool {
        self.from.is_none_or(|from| call.started >= from)
            && self.to.is_none_or(|to| call.started < to)
            && self
                .ids
                .as_ref()
                .is_none_or(|ids| ids.binary_search(&call.id).is_ok())
    }
}

impl Gong {
    fn new(url: String) -> Self {
        Self {
            refresh_tokens: HashSet::from([REFRESH_TOKEN.to_string()]),
            access_tokens: HashSet::new(),
            expire_token_after: None,
            token_refreshes: 0,
            calls: BTreeMap::new(),
            users: vec![
                user(
                    USER_ID,
                    USER_EMAIL,
                    "Robin",
                    "Kline",
                    USER_TITLE,
                    "2023-03-14T09:12:44Z",
                ),
                user(
                    "234599484848424",
                    "sam.ortiz@example.com",
                    "Sam",
                    "Ortiz",
                    "Sales Manager",
                    "2022-11-02T16:40:05Z",
                ),
            ],
            throttle: None,
            throttle_after: None,
            unavailable: 0,
            daily_limit: None,
            requests: Vec::new(),
            url,
            issued: 0,
            next_call_id: FIRST_CALL_ID,
            next_party_id: FIRST_PARTY_ID,
            cursors: HashMap::new(),
        }
    }

    fn next_party_id(&mut self) -> String {
        self.next_party_id += 1;
        self.next_party_id.to_string()
    }

    /// A call with its host and one external party, and two topics.
    fn new_call(&mut self, title: &str, started: DateTime<Utc>) -> Call {
        let id = self.next_call_id.to_string();
        self.next_call_id += 1;
        let parties = vec![
            json!({
                "id": self.next_party_id(),
                "emailAddress": USER_EMAIL,
                "name": USER_NAME,
                "title": USER_TITLE,
                "userId": USER_ID,
                "speakerId": "6432345678555530067",
                "context": [],
                "affiliation": "Internal",
                "methods": ["Invitee"]
            }),
            json!({
                "id": self.next_party_id(),
                "emailAddress": "jordan.lee@acme.example",
                "name": "Jordan Lee",
                "title": "VP Operations",
                "speakerId": "6432345678555530068",
                "context": [],
                "affiliation": "External",
                "methods": ["Invitee"]
            }),
        ];
        Call {
            id,
            title: title.to_string(),
            started: whole_seconds(started),
            duration: CALL_SECONDS,
            parties,
            topics: vec![
                json!({"name": "Pricing", "duration": 312.0}),
                json!({"name": "Next Steps", "duration": 95.0}),
            ],
        }
    }

    fn call_mut(&mut self, id: &str) -> &mut Call {
        self.calls
            .get_mut(id)
            .unwrap_or_else(|| panic!("no call {id}"))
    }

    /// Answers a token request: `params` are the query string and the form body together.
    fn token(&mut self, headers: &HeaderMap, params: &[(String, String)]) -> Response {
        if basic_credentials(headers) != Some((CLIENT_ID.to_string(), CLIENT_SECRET.to_string())) {
            return oauth_error(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
        }
        if param(params, "grant_type") != Some("refresh_token") {
            let body = json!({"error": "unsupported_grant_type"});
            return oauth_error(StatusCode::BAD_REQUEST, body);
        }
        let used = param(params, "refresh_token").unwrap_or_default();
        if !self.refresh_tokens.remove(used) {
            let body = json!({
                "error": "invalid_grant",
                "error_description": "Refresh token code is invalid"
            });
            return oauth_error(StatusCode::BAD_REQUEST, body);
        }
        self.token_refreshes += 1;
        self.issued += 1;
        let access_token = format!("gong-at-{}", self.issued);
        let refresh_token = format!("gong-rt-{}", self.issued);
        self.access_tokens.insert(access_token.clone());
        self.refresh_tokens.insert(refresh_token.clone());
        Json(json!({
            "access_token": access_token,
            "refresh_token": refresh_token,
            "scope": SCOPE,
            "token_type": "bearer",
            "expires_in": EXPIRES_IN,
            "api_base_url_for_customer": self.url
        }))
        .into_response()
    }

    /// Whether a data request carries the access key or a bearer token issued here and still
    /// honoured; counts the request against `expire_token_after`.
    fn admits(&mut self, headers: &HeaderMap) -> bool {
        if let Some(n) = self.expire_token_after {
            if n == 0 {
                self.access_tokens.clear();
                self.expire_token_after = None;
            } else {
                self.expire_token_after = Some(n - 1);
            }
        }
        if basic_credentials(headers)
            == Some((ACCESS_KEY.to_string(), ACCESS_KEY_SECRET.to_string()))
        {
            return true;
        }
        headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.access_tokens.contains(token))
    }

    /// Logs a data request, then answers it instead of the route when its credentials are not
    /// admitted or a limit or knob says so, checked in that order.
    fn refuse(&mut self, line: String, headers: &HeaderMap) -> Option<Response> {
        self.requests.push(line);
        if !self.admits(headers) {
            return Some(gong_error(StatusCode::UNAUTHORIZED, "Invalid access token"));
        }
        if let Some(left) = self.daily_limit {
            if left == 0 {
                let until_midnight = 86_400 - u64::from(Utc::now().num_seconds_from_midnight());
                return Some(too_many_requests(until_midnight));
            }
            self.daily_limit = Some(left - 1);
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
            return Some(too_many_requests(seconds));
        }
        if self.unavailable > 0 {
            self.unavailable -= 1;
            return Some(gong_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service unavailable",
            ));
        }
        None
    }

    /// Issues a cursor for the rest of a listing. A cursor can be used again: a client
    /// retrying a throttled page sends the same one.
    fn issue_cursor(&mut self, query: String, after: After, page: usize) -> String {
        // Gong's cursors look like signed JWTs; only the look is kept here.
        let token = format!(
            "eyJhbGciOiJIUzI1NiJ9.{}.{}",
            URL_SAFE_NO_PAD.encode(Uuid::new_v4().as_bytes()),
            URL_SAFE_NO_PAD.encode(Uuid::new_v4().as_bytes())
        );
        let cursor = Cursor { query, after, page };
        self.cursors.insert(token.clone(), cursor);
        token
    }

    /// Where `cursor`, if any, continues `query`, and the number of the page it starts; `None`
    /// when the cursor is unknown or was issued for another query.
    fn resume(&self, query: &str, cursor: Option<&str>) -> Option<(Option<After>, usize)> {
        let Some(token) = cursor else {
            return Some((None, 0));
        };
        let c = self.cursors.get(token).filter(|c| c.query == query)?;
        Some((Some(c.after.clone()), c.page))
    }

    /// One page of the calls `query` matches, in start order, as metadata (`/v2/calls`) or
    /// with parties and topics (`/v2/calls/extensive`).
    fn calls_page(
        &mut self,
        route: &str,
        query: &CallQuery,
        cursor: Option<&str>,
        extensive: bool,
    ) -> Response {
        let key = query.key(route);
        let (after, number) = match self.resume(&key, cursor) {
            Some((Some(After::Call(started, id)), number)) => (Some((started, id)), number),
            Some((None, number)) => (None, number),
            Some((Some(After::User(_)), _)) | None => return invalid_cursor(),
        };
        let mut rows: Vec<&Call> = self.calls.values().filter(|c| query.matches(c)).collect();
        rows.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
        let total = rows.len();
        let rest = rows.into_iter().filter(|c| match &after {
            None => true,
            Some((started, id)) => (c.started, &c.id) > (*started, id),
        });
        let (page, more) = take_page(rest, PAGE);
        // Gong answers a query that matches nothing with 404, not an empty page; so does a page
        // whose calls were all deleted since the cursor was issued.
        if page.is_empty() {
            return no_calls();
        }
        let calls: Vec<Value> = page
            .iter()
            .map(|c| {
                if extensive {
                    extensive_json(c)
                } else {
                    meta_json(c)
                }
            })
            .collect();
        let last = page
            .last()
            .filter(|_| more)
            .map(|c| After::Call(c.started, c.id.clone()));
        let mut records = json!({
            "totalRecords": total,
            "currentPageSize": calls.len(),
            "currentPageNumber": number
        });
        if let Some(after) = last {
            records["cursor"] = json!(self.issue_cursor(key, after, number + 1));
        }
        Json(json!({"requestId": request_id(), "records": records, "calls": calls})).into_response()
    }

    fn users_page(&mut self, cursor: Option<&str>) -> Response {
        let key = "GET /v2/users".to_string();
        let (skip, number) = match self.resume(&key, cursor) {
            Some((Some(After::User(skip)), number)) => (skip, number),
            Some((None, number)) => (0, number),
            Some((Some(After::Call(..)), _)) | None => return invalid_cursor(),
        };
        let (page, more) = take_page(self.users.iter().skip(skip).cloned(), PAGE);
        let mut records = json!({
            "totalRecords": self.users.len(),
            "currentPageSize": page.len(),
            "currentPageNumber": number
        });
        if more {
            let after = After::User(skip + page.len());
            records["cursor"] = json!(self.issue_cursor(key, after, number + 1));
        }
        Json(json!({"requestId": request_id(), "records": records, "users": page})).into_response()
    }
}

async fn token(
    State(fake): State<FakeGong>,
    headers: HeaderMap,
    Query(mut params): Query<Vec<(String, String)>>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    // Gong documents the grant in the query string, with no body; a form is read as well.
    if let Ok(Form(fields)) = form {
        params.extend(fields);
    }
    fake.state.lock().unwrap().token(&headers, &params)
}

/// Every `/v2` route: logs the request (with its body: a POST's cursor travels there), and
/// answers instead of the route when the credentials are not admitted or a knob says so.
async fn admit(State(fake): State<FakeGong>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let params =
        Query::<Vec<(String, String)>>::try_from_uri(&parts.uri).map_or(Vec::new(), |q| q.0);
    let mut line = format!("{} {}", parts.method, parts.uri.path());
    if !params.is_empty() {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(&format!("?{}", query.join("&")));
    }
    let text = String::from_utf8_lossy(&body);
    if !text.trim().is_empty() {
        line.push_str(&format!(" {}", text.trim()));
    }
    let refusal = fake.state.lock().unwrap().refuse(line, &parts.headers);
    if let Some(answer) = refusal {
        return answer;
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// A non-empty cursor: clients commonly send an empty one on the first page.
fn given_cursor(cursor: Option<&str>) -> Option<String> {
    cursor.filter(|c| !c.is_empty()).map(str::to_string)
}

async fn list_calls(
    State(fake): State<FakeGong>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let from = param(&params, "fromDateTime");
    let to = param(&params, "toDateTime");
    let query = match CallQuery::read(from, to, None) {
        Ok(query) => query,
        Err(message) => return gong_error(StatusCode::BAD_REQUEST, &message),
    };
    let cursor = given_cursor(param(&params, "cursor"));
    let mut gong = fake.state.lock().unwrap();
    gong.calls_page("GET /v2/calls", &query, cursor.as_deref(), false)
}

/// `POST /v2/calls/extensive`. `contentSelector` is accepted and not read: every call comes
/// with its parties and topics.
async fn extensive_calls(State(fake): State<FakeGong>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return gong_error(StatusCode::BAD_REQUEST, "Request body is not valid JSON");
    };
    let filter = &body["filter"];
    // Ids are strings; a number is read too, though one this long loses digits in many clients.
    let ids = filter["callIds"].as_array().map(|ids| {
        ids.iter()
            .filter_map(|id| {
                id.as_str()
                    .map(str::to_string)
                    .or(id.as_u64().map(|n| n.to_string()))
            })
            .collect()
    });
    let from = filter["fromDateTime"].as_str();
    let to = filter["toDateTime"].as_str();
    let query = match CallQuery::read(from, to, ids) {
        Ok(query) => query,
        Err(message) => return gong_error(StatusCode::BAD_REQUEST, &message),
    };
    let cursor = given_cursor(body["cursor"].as_str());
    let mut gong = fake.state.lock().unwrap();
    gong.calls_page("POST /v2/calls/extensive", &query, cursor.as_deref(), true)
}

async fn list_users(
    State(fake): State<FakeGong>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let cursor = given_cursor(param(&params, "cursor"));
    fake.state.lock().unwrap().users_page(cursor.as_deref())
}

async fn unknown() -> Response {
    gong_error(StatusCode::NOT_FOUND, "Not found")
}

impl FakeGong {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Self {
            url: url.clone(),
            state: Arc::new(Mutex::new(Gong::new(url))),
            key: Arc::new(OnceLock::new()),
        };
        let router = Router::new()
            .route("/v2/calls", get(list_calls))
            .route("/v2/calls/extensive", post(extensive_calls))
            .route("/v2/users", get(list_users))
            // Only the routes above are data routes: not the token endpoint below.
            .route_layer(middleware::from_fn_with_state(fake.clone(), admit))
            .route("/oauth2/generate-customer-token", post(token))
            .fallback(unknown)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for an OAuth (refresh-token) connection.
    pub fn oauth_credentials(&self) -> Value {
        json!({
            "refresh_token": REFRESH_TOKEN,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET
        })
    }

    /// The credentials an operator stores for an access-key connection.
    pub fn key_credentials(&self) -> Value {
        json!({"access_key": ACCESS_KEY, "access_key_secret": ACCESS_KEY_SECRET})
    }

    pub fn token_url(&self) -> String {
        format!("{}/oauth2/generate-customer-token", self.url)
    }

    /// The customer's API host, also named at token time; paths under it start with `/v2`.
    pub fn api_base(&self) -> String {
        self.url.clone()
    }

    /// Adds a call that started at `started` (kept to whole seconds), of 30 minutes, with its
    /// host and one external party, and returns its id.
    pub fn add_call(&self, title: &str, started: DateTime<Utc>) -> String {
        let mut gong = self.state.lock().unwrap();
        let call = gong.new_call(title, started);
        let id = call.id.clone();
        gong.calls.insert(id.clone(), call);
        id
    }

    /// Adds `n` calls named `Call 00001` onwards under one lock, started a second apart from
    /// `started`.
    pub fn load_calls(&self, n: usize, started: DateTime<Utc>) {
        let mut gong = self.state.lock().unwrap();
        for i in 0..n {
            let at = started + TimeDelta::seconds(i as i64);
            let call = gong.new_call(&format!("Call {:05}", i + 1), at);
            gong.calls.insert(call.id.clone(), call);
        }
    }

    /// Retitles a call, as Gong's enrichment does hours after a call ends: nothing else about
    /// it changes, so only a client that reads the window again sees it.
    pub fn rename_call(&self, id: &str, title: &str) {
        self.state.lock().unwrap().call_mut(id).title = title.to_string();
    }

    /// Deletes a call: it just stops being listed. Gong sends no signal for it.
    pub fn delete_call(&self, id: &str) {
        let mut gong = self.state.lock().unwrap();
        let key = gong.call_mut(id).id.clone();
        gong.calls.remove(&key);
    }

    fn key(&self) -> &KeyPair {
        self.key
            .get_or_init(|| KeyPair::generate(KeySize::Rsa2048).expect("an RSA key is generated"))
    }

    /// The rule's public key as PEM (`-----BEGIN PUBLIC KEY-----`, DER SubjectPublicKeyInfo in
    /// base64 lines of 64), what an admin copies from the automation rule.
    pub fn public_key_pem(&self) -> String {
        let der: PublicKeyX509Der = self
            .key()
            .public_key()
            .as_der()
            .expect("the public key encodes");
        let encoded = STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// `header.claims.signature`, base64url without padding, signed RS256 with the rule's key.
    fn jwt(&self, claims: &Value) -> String {
        let header = json!({"alg": "RS256", "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = self.key();
        let mut signature = vec![0; key.public_modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signed.as_bytes(),
            &mut signature,
        )
        .expect("the JWT is signed");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// A delivery of call `id` to `webhook_url` whose JWT was issued at `issued`.
    fn delivery(
        &self,
        id: &str,
        webhook_url: &str,
        issued: DateTime<Utc>,
    ) -> (Vec<(String, String)>, String) {
        let call = self.state.lock().unwrap().call_mut(id).clone();
        let body = json!({"callData": extensive_json(&call), "isTest": false}).to_string();
        let claims = json!({
            "webhook_url": webhook_url,
            "body_sha256": hex(&Sha256::digest(body.as_bytes())),
            "iat": issued.timestamp(),
            "exp": issued.timestamp() + WEBHOOK_LIFETIME_SECONDS
        });
        let headers = vec![
            ("Authorization".to_string(), self.jwt(&claims)),
            ("Content-Type".to_string(), "application/json".to_string()),
        ];
        (headers, body)
    }

    /// A webhook delivery for call `id` to `webhook_url` as an automation rule sends it:
    /// (headers, body). `Authorization` is the raw JWT, no `Bearer`; its header is
    /// `{"alg":"RS256","typ":"JWT"}` and its claims `{"webhook_url", "body_sha256": hex
    /// SHA-256 of exactly the body returned, "iat": now, "exp": now + 300}`. The body is
    /// `{"callData":{"metaData","parties","content":{"topics"},"context":[]},"isTest":false}`.
    pub fn webhook(&self, id: &str, webhook_url: &str) -> (Vec<(String, String)>, String) {
        self.delivery(id, webhook_url, Utc::now())
    }

    /// The same, issued ten minutes ago: `exp` is five minutes past.
    pub fn expired_webhook(&self, id: &str, webhook_url: &str) -> (Vec<(String, String)>, String) {
        let issued = Utc::now() - TimeDelta::seconds(2 * WEBHOOK_LIFETIME_SECONDS);
        self.delivery(id, webhook_url, issued)
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn token_refreshes(&self) -> usize {
        self.state.lock().unwrap().token_refreshes
    }
}
