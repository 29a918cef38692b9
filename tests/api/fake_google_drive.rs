//! Google's OAuth token endpoint and the Drive API v3 on loopback for the `google_drive` adapter,
//! reproducing the wire facts it depends on: the refresh-token grant (`POST /token`, form
//! encoded) that answers `expires_in` 3599 and never a new refresh token, since Google does not
//! rotate them, with `invalid_grant` for a revoked one and 401 `invalid_client`; bearer tokens
//! checked on every Drive request, 401 `authError` when one is not honoured; errors in the
//! `{"error":{"code","message","errors":[{"domain","reason",..}]}}` envelope, where "slow down"
//! is a 403 `userRateLimitExceeded` or `rateLimitExceeded` as often as a 429, and a 503
//! `backendError`; `files.list` in id order with `pageSize` (default 100, at most 1,000), an
//! opaque `nextPageToken` that is absent on the last page, a loosely honoured `fields` mask,
//! `q=trashed = false`, and shared-drive files only with `includeItemsFromAllDrives=true`
//! (`corpora=drive` and `driveId` for one drive); `size` and `version` as strings and
//! millisecond `modifiedTime`s; `changes/startPageToken` and `changes.list` over a change log
//! whose page tokens are positions in it, answering only each file's latest change, with
//! `removed: true` and no file for a deletion but `removed: false` and `file.trashed` for the
//! trash, `nextPageToken` until `newStartPageToken` ends a round, and 400 `Invalid Value` for a
//! token it does not know (or no longer takes); a search of every drive that may come back
//! incomplete (`incompleteSearch`, the shared drives' files left out); `changes.watch` channels (HTTPS addresses, unique ids, an hour by
//! default, a week at most) that get a header-only `sync` message before the watch is answered
//! and `change` messages after, with `X-Goog-Channel-Token` when set and a message number that
//! counts up per channel; `channels.stop`, after which a channel gets nothing more; and one
//! file by id: `files.get` (404 `notFound`), and `files.update` (`PATCH`) of its name,
//! description and trash state, moves only through `addParents`/`removeParents` (`parents` in
//! the body is 403 `fieldNotWritable`, as is any field Drive sets), no condition on the file's
//! version (Drive v3 takes none), only the default fields in the answer unless `fields` asks,
//! and 403 `insufficientPermissions` for a token whose consent is `drive.readonly`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const CLIENT_ID: &str = "407408718192-f4k3dr1v3sync0c11ent.apps.googleusercontent.com";
pub const CLIENT_SECRET: &str = "GOCSPX-f4k3-dr1v3-c11ent-s3cr3t";
pub const REFRESH_TOKEN: &str = "1//0g-initial-refresh-token";
pub const ROOT: &str = "/drive/v3";
/// The id of My Drive's root folder: the parent of every My Drive file here.
pub const MY_DRIVE_ROOT: &str = "0AGf4k3MyDr1v3R00tUk9PVA";
/// The Cloud project the OAuth client belongs to, as Drive names it in errors.
const PROJECT: &str = "407408718192";
const SCOPE: &str = "https://www.googleapis.com/auth/drive.readonly";
/// The consent write-back needs.
pub const FULL_SCOPE: &str = "https://www.googleapis.com/auth/drive";
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// A changes channel lives a week at most, and an hour when the request names no expiry.
const MAX_CHANNEL_SECONDS: i64 = 604_800;
const DEFAULT_CHANNEL_SECONDS: i64 = 3_600;
/// What Google's push notifications say they are.
const PUSH_USER_AGENT: &str =
    "APIs-Google; (+https://developers.google.com/webmasters/APIs-Google.html)";

#[derive(Clone, Debug)]
pub struct File {
    pub id: String,
    pub name: String,
    pub mime_type: String,
    pub modified_time: DateTime<Utc>,
    pub trashed: bool,
    pub parents: Vec<String>,
    /// The shared drive holding the file; None in My Drive.
    pub drive_id: Option<String>,
    pub size: u64,
    pub version: u64,
    pub description: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Change {
    pub file_id: String,
    pub removed: bool,
    pub time: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct Channel {
    pub id: String,
    pub resource_id: String,
    /// What `X-Goog-Resource-URI` says: the watched changes feed with the watch's parameters.
    pub resource_uri: String,
    pub token: Option<String>,
    pub address: String,
    pub expiration: DateTime<Utc>,
    pub stopped: bool,
    /// Messages sent so far, the `sync` one included: the last `X-Goog-Message-Number`.
    pub messages: u64,
}

pub struct Drive {
    /// Refresh tokens that work. Google does not rotate them, so a refresh never changes this;
    /// removing one revokes it.
    pub refresh_tokens: HashSet<String>,
    pub access_tokens: HashSet<String>,
    /// What the refresh tokens were consented for: `drive.readonly` unless a test grants
    /// [`FULL_SCOPE`]. Tokens issued under read-only consent cannot write.
    pub consent: &'static str,
    read_only_tokens: HashSet<String>,
    /// The current access tokens stop working after this many more data requests.
    pub expire_token_after: Option<usize>,
    pub token_refreshes: usize,
    /// Live and trashed files by id; a deleted file is gone from here.
    pub files: BTreeMap<String, File>,
    /// The change log, oldest first. A page token is a position in it, counted from 1.
    pub changes: Vec<Change>,
    /// In creation order, stopped ones too.
    pub channels: Vec<Channel>,
    /// The next N data requests answer 403 with this reason (`userRateLimitExceeded` or
    /// `rateLimitExceeded`).
    pub rate_limited: Option<(usize, &'static str)>,
    /// The next N data requests answer 429 with `Retry-After` of this many seconds.
    pub throttle: Option<(usize, u64)>,
    /// The throttle starts only after this many more data requests (a sync stopped mid-way).
    pub throttle_after: Option<usize>,
    /// The next N data requests answer 503 `backendError`.
    pub unavailable: usize,
    /// A listing of every drive leaves the shared drives' files out and says its search was
    /// incomplete (`incompleteSearch`), as Drive may for `corpora=allDrives`.
    pub incomplete_search: bool,
    /// Every changes page token answers 400 `Invalid Value`, as for one Drive no longer takes.
    pub refuse_change_tokens: bool,
    /// Every listing of files or changes answers 400 `invalidParameter` at `fields`, as Drive
    /// does a field mask naming a field it does not know.
    pub refuse_field_masks: bool,
    /// `changes.watch` refuses every address, as Drive does one on a domain the Cloud project
    /// has not verified: 401 `push.webhookUrlUnauthorized`, saying the address back.
    pub refuse_addresses: bool,
    /// Every data request's method, path and decoded query, in order.
    pub requests: Vec<String>,
    issued: usize,
    /// Bumped by every change: file versions.
    version: u64,
    /// The last timestamp handed out, so changes get strictly increasing times.
    clock: DateTime<Utc>,
    next_file: u64,
    /// The shared drive (None: My Drive) each deleted file was in, so its removal is reported
    /// only to those who could see it.
    deleted_from: HashMap<String, Option<String>>,
}

impl Default for Drive {
    fn default() -> Self {
        Self {
            refresh_tokens: HashSet::from([REFRESH_TOKEN.to_string()]),
            access_tokens: HashSet::new(),
            consent: SCOPE,
            read_only_tokens: HashSet::new(),
            expire_token_after: None,
            token_refreshes: 0,
            files: BTreeMap::new(),
            changes: Vec::new(),
            channels: Vec::new(),
            rate_limited: None,
            throttle: None,
            throttle_after: None,
            unavailable: 0,
            incomplete_search: false,
            refuse_change_tokens: false,
            refuse_addresses: false,
            refuse_field_masks: false,
            requests: Vec::new(),
            issued: 0,
            version: 0,
            clock: DateTime::UNIX_EPOCH,
            next_file: 0,
            deleted_from: HashMap::new(),
        }
    }
}

#[derive(Clone)]
pub struct FakeGoogleDrive {
    /// `http://127.0.0.1:port`; the token endpoint is `{url}/token`, the API `{url}/drive/v3`.
    pub url: String,
    pub state: Arc<Mutex<Drive>>,
    client: reqwest::Client,
}

/// An answer in Drive's error envelope, with one entry in `errors`.
fn error(
    status: u16,
    message: &str,
    domain: &str,
    reason: &str,
    location: Option<&str>,
) -> Response {
    let mut detail = json!({"domain": domain, "reason": reason, "message": message});
    if let Some(location) = location {
        detail["locationType"] = json!("parameter");
        detail["location"] = json!(location);
    }
    let body = json!({"error": {"code": status, "message": message, "errors": [detail]}});
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

/// Drive's answer to a field mask naming a field it does not know (v2's `title`).
fn field_mask_refused() -> Response {
    error(
        400,
        "Invalid field selection title",
        "global",
        "invalidParameter",
        Some("fields"),
    )
}

fn invalid_value(parameter: &str) -> Response {
    error(400, "Invalid Value", "global", "invalid", Some(parameter))
}

fn required(parameter: &str) -> Response {
    let message = format!("Required parameter: {parameter}");
    error(400, &message, "global", "required", Some(parameter))
}

/// Drive's answers are large; boxed, they make a small `Err`.
fn refused<T>(response: Response) -> Result<T, Box<Response>> {
    Err(Box::new(response))
}

fn file_not_found(id: &str) -> Response {
    let message = format!("File not found: {id}.");
    error(404, &message, "global", "notFound", Some("fileId"))
}

/// The top-level fields a `files.get` or `files.update` mask names; None for every field.
fn fields_of(params: &[(String, String)]) -> Option<Vec<String>> {
    let fields = param(params, "fields").filter(|f| !f.contains('*'))?;
    Some(fields.split(',').map(|f| f.trim().to_string()).collect())
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    let value = HeaderValue::from_str(value).unwrap();
    response.headers_mut().insert(name, value);
    response
}

/// RFC 3339 with milliseconds and `Z`, as Drive writes every time.
fn millis(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// The RFC 1123 date of `X-Goog-Channel-Expiration`.
fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn flag(params: &[(String, String)], name: &str) -> bool {
    param(params, name) == Some("true")
}

/// `pageSize`: 100 when absent; outside 1..=1000 Drive refuses it rather than clamping.
fn page_size(params: &[(String, String)]) -> Result<usize, Box<Response>> {
    match param(params, "pageSize").map(str::parse::<usize>) {
        None => Ok(DEFAULT_PAGE),
        Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => {
            let given = param(params, "pageSize").unwrap_or_default();
            let message = format!(
                "Invalid value '{given}'. Values must be within the range: [1, {MAX_PAGE}]"
            );
            refused(error(400, &message, "global", "invalid", Some("pageSize")))
        }
    }
}

/// The first `size` of `rows`, and whether more follow.
fn take_page<T>(rows: impl Iterator<Item = T>, size: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = rows.take(size + 1).collect();
    let more = page.len() > size;
    page.truncate(size);
    (page, more)
}

/// A Google-like file id: 33 characters of base64url starting with `1`, fixed by the count so
/// runs are reproducible, and in no particular order relative to creation, as in Drive.
fn file_id(n: u64) -> String {
    let digest = Sha256::digest(format!("drive-file-{n}"));
    format!("1{}", &URL_SAFE_NO_PAD.encode(digest)[..32])
}

fn mime_type(name: &str) -> &'static str {
    match name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .as_deref()
    {
        Some("txt") => "text/plain",
        Some("csv") => "text/csv",
        Some("pdf") => "application/pdf",
        Some("json") => "application/json",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

/// The names a `fields` mask selects inside `key(...)`, sub-selections and paths cut to their
/// top level. None selects every field: no mask, a `*` anywhere, or no `key(...)` in it.
fn selection(fields: Option<&str>, key: &str) -> Option<Vec<String>> {
    let fields = fields?;
    if fields.contains('*') {
        return None;
    }
    let open = format!("{key}(");
    let at = fields.match_indices(&open).map(|(i, _)| i).find(|&i| {
        // `file(` must not match the end of some longer name.
        i == 0 || !fields.as_bytes()[i - 1].is_ascii_alphanumeric()
    })?;
    let (mut names, mut name, mut depth) = (Vec::new(), String::new(), 0);
    for c in fields[at + open.len()..].chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => break,
            ')' => depth -= 1,
            ',' if depth == 0 => names.push(std::mem::take(&mut name)),
            _ if depth == 0 => name.push(c),
            _ => {}
        }
    }
    names.push(name);
    let top = |n: &String| n.split('/').next().unwrap_or_default().trim().to_string();
    Some(names.iter().map(top).filter(|n| !n.is_empty()).collect())
}

fn file_json(f: &File, selection: Option<&[String]>) -> Value {
    let mut out = json!({
        "kind": "drive#file",
        "id": f.id,
        "name": f.name,
        "mimeType": f.mime_type,
        "modifiedTime": millis(f.modified_time),
        "trashed": f.trashed,
        "parents": f.parents,
        // Drive writes int64 values as strings.
        "size": f.size.to_string(),
        "version": f.version.to_string(),
        "webViewLink": format!("https://drive.google.com/file/d/{}/view", f.id)
    });
    if let Some(drive) = &f.drive_id {
        out["driveId"] = json!(drive);
    }
    if let Some(description) = &f.description {
        out["description"] = json!(description);
    }
    if let (Some(fields), Some(map)) = (selection, out.as_object_mut()) {
        map.retain(|k, _| k == "id" || fields.iter().any(|f| f == k));
    }
    out
}

/// `nextPageToken` of `files.list`: opaque to clients, the last id served to this fake.
fn files_token(last: &str) -> String {
    format!("~!!~{}", URL_SAFE_NO_PAD.encode(last))
}

fn files_after(token: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(token.strip_prefix("~!!~")?).ok()?;
    String::from_utf8(bytes).ok()
}

/// Which files a request covers: My Drive's unless it names a shared drive (`driveId`); shared
/// drives' only with `includeItemsFromAllDrives=true`, and not with `restrictToMyDrive=true`.
struct Scope {
    drive: Option<String>,
    shared: bool,
    my_drive_only: bool,
}

impl Scope {
    fn of(params: &[(String, String)]) -> Self {
        Self {
            drive: param(params, "driveId").map(str::to_string),
            shared: flag(params, "includeItemsFromAllDrives"),
            my_drive_only: flag(params, "restrictToMyDrive"),
        }
    }

    fn covers(&self, drive_id: Option<&str>) -> bool {
        match (self.drive.as_deref(), drive_id) {
            (Some(wanted), Some(drive)) => self.shared && wanted == drive,
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(_)) => self.shared && !self.my_drive_only,
        }
    }
}

/// Stable per watched resource, as Drive's `resourceId` is: the same feed watched twice gives
/// the same id.
fn resource_id(drive: Option<&str>) -> String {
    let digest = Sha256::digest(format!("changes|{}", drive.unwrap_or_default()));
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    digest[..14]
        .iter()
        .map(|b| alphabet[usize::from(*b) % alphabet.len()] as char)
        .collect()
}

/// The headers of a push message: no body, everything in these.
fn message_headers(c: &Channel, state: &str, token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![
        ("X-Goog-Channel-ID", c.id.clone()),
        ("X-Goog-Channel-Expiration", http_date(c.expiration)),
    ];
    if let Some(token) = token {
        headers.push(("X-Goog-Channel-Token", token.to_string()));
    }
    headers.extend([
        ("X-Goog-Message-Number", c.messages.to_string()),
        ("X-Goog-Resource-ID", c.resource_id.clone()),
        ("X-Goog-Resource-URI", c.resource_uri.clone()),
        ("X-Goog-Resource-State", state.to_string()),
    ]);
    if state == "change" {
        headers.push(("X-Goog-Changed", "content".to_string()));
    }
    headers
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

impl Drive {
    /// A new version and a timestamp later than any before it, by at least `step`.
    fn tick_by(&mut self, step: TimeDelta) -> (u64, DateTime<Utc>) {
        self.version += 1;
        self.clock = Utc::now().max(self.clock + step);
        (self.version, self.clock)
    }

    /// Adds a file and logs its change. A bulk load steps a microsecond a file, so it does not
    /// run ahead of the wall clock; single changes a millisecond, so their times differ as
    /// Drive writes them.
    fn new_file(&mut self, name: &str, drive_id: Option<&str>, step: TimeDelta) -> String {
        self.next_file += 1;
        let (version, now) = self.tick_by(step);
        let id = file_id(self.next_file);
        let file = File {
            id: id.clone(),
            name: name.to_string(),
            mime_type: mime_type(name).to_string(),
            modified_time: now,
            trashed: false,
            // A shared drive's root folder has the drive's id.
            parents: vec![drive_id.unwrap_or(MY_DRIVE_ROOT).to_string()],
            drive_id: drive_id.map(str::to_string),
            size: 512 + self.next_file * 37 % 4096,
            version,
            description: None,
        };
        self.files.insert(id.clone(), file);
        self.log(&id, false, now);
        id
    }

    fn change_file(&mut self, id: &str, change: impl FnOnce(&mut File)) {
        let (version, now) = self.tick_by(TimeDelta::milliseconds(1));
        let file = self
            .files
            .get_mut(id)
            .unwrap_or_else(|| panic!("no file {id}"));
        change(file);
        (file.version, file.modified_time) = (version, now);
        self.log(id, false, now);
    }

    fn log(&mut self, file_id: &str, removed: bool, time: DateTime<Utc>) {
        let file_id = file_id.to_string();
        self.changes.push(Change {
            file_id,
            removed,
            time,
        });
    }

    /// The token that reads changes from now on.
    fn start_token(&self) -> String {
        (self.changes.len() + 1).to_string()
    }

    /// Where in the log a page token points; None when Drive would not know it.
    fn change_index(&self, token: &str) -> Option<usize> {
        let n: usize = token.parse().ok()?;
        (1..=self.changes.len() + 1).contains(&n).then(|| n - 1)
    }

    fn token(&mut self, form: &HashMap<String, String>) -> Response {
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("client_id") != CLIENT_ID || field("client_secret") != CLIENT_SECRET {
            let description = "The OAuth client was not found.";
            return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
        }
        let grant = field("grant_type");
        if grant != "refresh_token" {
            let description = format!("Invalid grant_type: {grant}");
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &description,
            );
        }
        if field("refresh_token").is_empty() {
            let description = "Missing required parameter: refresh_token";
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description);
        }
        if !self.refresh_tokens.contains(field("refresh_token")) {
            let description = "Token has been expired or revoked.";
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description);
        }
        self.token_refreshes += 1;
        self.issued += 1;
        let access_token = format!("ya29.a0-{}", self.issued);
        self.access_tokens.insert(access_token.clone());
        if self.consent == SCOPE {
            self.read_only_tokens.insert(access_token.clone());
        }
        // No refresh_token: the client keeps the one it has.
        Json(json!({
            "access_token": access_token,
            "expires_in": 3599,
            "scope": self.consent,
            "token_type": "Bearer"
        }))
        .into_response()
    }

    /// Whether a data request's bearer token is honoured; counts it against
    /// `expire_token_after`.
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
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.access_tokens.contains(token))
    }

    /// Logs a data request, then answers it instead of the route when the token is not
    /// honoured or a knob says so, checked in that order.
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
            let body = json!({"error": {
                "code": 401,
                "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                "errors": [{
                    "message": "Invalid Credentials",
                    "domain": "global",
                    "reason": "authError",
                    "location": "Authorization",
                    "locationType": "header"
                }],
                "status": "UNAUTHENTICATED"
            }});
            let answer = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            let challenge = r#"Bearer realm="https://accounts.google.com/", error="invalid_token""#;
            return Some(with_header(answer, "www-authenticate", challenge));
        }
        if let Some((n, reason)) = self.rate_limited.filter(|(n, _)| *n > 0) {
            self.rate_limited = (n > 1).then_some((n - 1, reason));
            let message = match reason {
                "userRateLimitExceeded" => "User Rate Limit Exceeded",
                _ => "Rate Limit Exceeded",
            };
            return Some(error(403, message, "usageLimits", reason, None));
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
            let message = "Rate Limit Exceeded";
            let answer = error(429, message, "usageLimits", "rateLimitExceeded", None);
            return Some(with_header(answer, "retry-after", &seconds.to_string()));
        }
        if self.unavailable > 0 {
            self.unavailable -= 1;
            return Some(error(503, "Backend Error", "global", "backendError", None));
        }
        None
    }

    fn get_file(&self, id: &str, params: &[(String, String)]) -> Response {
        match self.files.get(id) {
            Some(file) => Json(file_json(file, fields_of(params).as_deref())).into_response(),
            None => file_not_found(id),
        }
    }

    /// `files.update`: the body's metadata, and moves by `addParents`/`removeParents`.
    fn update_file(
        &mut self,
        id: &str,
        params: &[(String, String)],
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if self.read_only_tokens.contains(token) {
            let message = "Request had insufficient authentication scopes.";
            return error(403, message, "global", "insufficientPermissions", None);
        }
        let Some(file) = self.files.get(id) else {
            return file_not_found(id);
        };
        let Ok(Value::Object(changes)) = serde_json::from_slice::<Value>(body) else {
            return error(
                400,
                "Invalid JSON payload received.",
                "global",
                "parseError",
                None,
            );
        };
        let (mut name, mut description, mut trashed) =
            (file.name.clone(), file.description.clone(), file.trashed);
        for (field, value) in &changes {
            match (field.as_str(), value) {
                ("name", Value::String(v)) => name = v.clone(),
                ("description", Value::String(v)) => description = Some(v.clone()),
                ("trashed", Value::Bool(v)) => trashed = *v,
                _ => {
                    let message =
                        "The resource body includes fields which are not directly writable.";
                    return error(403, message, "global", "fieldNotWritable", None);
                }
            }
        }
        let listed = |name: &str| {
            param(params, name)
                .map(|v| {
                    v.split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let (added, removed): (Vec<String>, Vec<String>) =
            (listed("addParents"), listed("removeParents"));
        self.change_file(id, |f| {
            (f.name, f.description, f.trashed) = (name, description, trashed);
            f.parents.retain(|p| !removed.contains(p));
            for parent in added {
                if !f.parents.contains(&parent) {
                    f.parents.push(parent);
                }
            }
        });
        // Without `fields`, Drive answers a file's default fields only.
        let fields = fields_of(params)
            .unwrap_or_else(|| ["kind", "name", "mimeType"].map(String::from).to_vec());
        Json(file_json(&self.files[id], Some(&fields))).into_response()
    }

    fn list_files(&self, params: &[(String, String)]) -> Response {
        if self.refuse_field_masks {
            return field_mask_refused();
        }
        let size = match page_size(params) {
            Ok(size) => size,
            Err(refusal) => return *refusal,
        };
        match param(params, "corpora") {
            None | Some("user" | "drive" | "allDrives" | "domain") => {}
            Some(_) => return invalid_value("corpora"),
        }
        if (param(params, "corpora") == Some("drive")) != param(params, "driveId").is_some() {
            let message =
                "The driveId parameter must be specified if and only if corpora is set to drive.";
            return error(400, message, "global", "badRequest", None);
        }
        let after = match param(params, "pageToken").map(files_after) {
            None => String::new(),
            Some(Some(after)) => after,
            Some(None) => return invalid_value("pageToken"),
        };
        // Only `trashed = false` is understood; any other query lists everything.
        let untrashed_only =
            param(params, "q").is_some_and(|q| q.replace(' ', "").contains("trashed=false"));
        let scope = Scope::of(params);
        let incomplete = self.incomplete_search && param(params, "corpora") == Some("allDrives");
        let files = self
            .files
            .range::<str, _>((Excluded(after.as_str()), Unbounded))
            .map(|(_, f)| f)
            .filter(|f| scope.covers(f.drive_id.as_deref()) && !(untrashed_only && f.trashed))
            .filter(|f| !(incomplete && f.drive_id.is_some()));
        let (page, more) = take_page(files, size);
        let selection = selection(param(params, "fields"), "files");
        let files: Vec<Value> = page
            .iter()
            .map(|f| file_json(f, selection.as_deref()))
            .collect();
        let mut body =
            json!({"kind": "drive#fileList", "incompleteSearch": incomplete, "files": files});
        if let Some(last) = page.last().filter(|_| more) {
            body["nextPageToken"] = json!(files_token(&last.id));
        }
        Json(body).into_response()
    }

    /// A page of the change log from the token on. Drive answers only each file's latest
    /// change since the token, so an entry some later entry supersedes is skipped: it is
    /// answered by that one, with the file as it is now.
    fn list_changes(&self, params: &[(String, String)]) -> Response {
        let Some(token) = param(params, "pageToken") else {
            return required("pageToken");
        };
        if self.refuse_field_masks {
            return field_mask_refused();
        }
        let Some(start) = self
            .change_index(token)
            .filter(|_| !self.refuse_change_tokens)
        else {
            return invalid_value("pageToken");
        };
        let size = match page_size(params) {
            Ok(size) => size,
            Err(refusal) => return *refusal,
        };
        let scope = Scope::of(params);
        let include_removed = param(params, "includeRemoved") != Some("false");
        let selection = selection(param(params, "fields"), "file");
        let latest: HashMap<&str, usize> = self.changes[start..]
            .iter()
            .enumerate()
            .map(|(i, c)| (c.file_id.as_str(), start + i))
            .collect();
        let (mut changes, mut next) = (Vec::new(), None);
        for (i, change) in self.changes.iter().enumerate().skip(start) {
            if latest[change.file_id.as_str()] != i {
                continue;
            }
            let file = self.files.get(&change.file_id).filter(|_| !change.removed);
            let drive = match file {
                Some(f) => f.drive_id.clone(),
                None => self.deleted_from.get(&change.file_id).cloned().flatten(),
            };
            if !scope.covers(drive.as_deref()) || (file.is_none() && !include_removed) {
                continue;
            }
            if changes.len() == size {
                next = Some(i + 1);
                break;
            }
            let mut out = json!({
                "kind": "drive#change",
                "changeType": "file",
                "time": millis(change.time),
                "removed": file.is_none(),
                "fileId": change.file_id
            });
            if let Some(f) = file {
                out["file"] = file_json(f, selection.as_deref());
            }
            changes.push(out);
        }
        let mut body = json!({"kind": "drive#changeList", "changes": changes});
        match next {
            Some(n) => body["nextPageToken"] = json!(n.to_string()),
            None => body["newStartPageToken"] = json!(self.start_token()),
        }
        Json(body).into_response()
    }

    /// Registers the channel a `changes.watch` asks for, with its `sync` message counted;
    /// returns it, or Drive's refusal.
    fn open_channel(
        &mut self,
        params: &[(String, String)],
        body: &[u8],
    ) -> Result<Channel, Box<Response>> {
        let Some(token) = param(params, "pageToken") else {
            return refused(required("pageToken"));
        };
        if self.change_index(token).is_none() {
            return refused(invalid_value("pageToken"));
        }
        let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(body) else {
            return refused(error(400, "Parse Error", "global", "parseError", None));
        };
        let text = |name: &str| {
            request
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let Some(id) = text("id") else {
            return refused(required("id"));
        };
        if !matches!(text("type"), Some("web_hook" | "webhook")) {
            return refused(invalid_value("type"));
        }
        let Some(address) = text("address") else {
            return refused(required("address"));
        };
        if self.refuse_addresses {
            let message = format!("Unauthorized WebHook callback channel: {address}");
            return refused(error(
                401,
                &message,
                "global",
                "push.webhookUrlUnauthorized",
                None,
            ));
        }
        if !secure_enough(address) {
            let message = format!("WebHook callback must be HTTPS: {address}");
            return refused(error(
                400,
                &message,
                "global",
                "push.webhookUrlNotHttps",
                None,
            ));
        }
        if self.channels.iter().any(|c| c.id == id && !c.stopped) {
            let message = format!("Channel id {id} not unique");
            return refused(error(400, &message, "global", "channelIdNotUnique", None));
        }
        let now = Utc::now();
        let requested = match request.get("expiration") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_i64()),
            Some(Value::String(s)) => Some(s.parse::<i64>().ok()),
            Some(_) => Some(None),
        };
        let expiration = match requested {
            None => now + TimeDelta::seconds(DEFAULT_CHANNEL_SECONDS),
            Some(ms) => match ms.and_then(DateTime::from_timestamp_millis) {
                // Drive shortens a longer lifetime to its maximum rather than refusing it.
                Some(t) => t.min(now + TimeDelta::seconds(MAX_CHANNEL_SECONDS)),
                None => return refused(invalid_value("expiration")),
            },
        };
        let watched = [("alt".to_string(), "json".to_string())];
        let mut uri_params: Vec<&(String, String)> = params.iter().collect();
        uri_params.sort();
        let uri = reqwest::Url::parse_with_params(
            "https://www.googleapis.com/drive/v3/changes",
            watched.iter().chain(uri_params).map(|(k, v)| (k, v)),
        )
        .unwrap();
        let channel = Channel {
            id: id.to_string(),
            resource_id: resource_id(param(params, "driveId")),
            resource_uri: uri.to_string(),
            token: text("token").map(str::to_string),
            address: address.to_string(),
            expiration,
            stopped: false,
            messages: 1,
        };
        self.channels.push(channel.clone());
        Ok(channel)
    }
}

/// Google calls only https addresses; plain http is allowed here for loopback receivers.
fn secure_enough(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    host == "127.0.0.1" || host == "localhost"
}

async fn token(
    State(fake): State<FakeGoogleDrive>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.state.lock().unwrap().token(&form)
}

/// Every Drive route: logs the request, then answers instead of the route when the token is
/// not honoured or a knob says so.
async fn admit(State(fake): State<FakeGoogleDrive>, request: Request, next: Next) -> Response {
    let refusal =
        fake.state
            .lock()
            .unwrap()
            .refuse(request.method(), request.uri(), request.headers());
    match refusal {
        Some(answer) => answer,
        None => next.run(request).await,
    }
}

/// `files.get` and `files.update` of one file.
async fn file(
    State(fake): State<FakeGoogleDrive>,
    Path(id): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut drive = fake.state.lock().unwrap();
    match method {
        Method::PATCH => drive.update_file(&id, &params, &headers, &body),
        _ => drive.get_file(&id, &params),
    }
}

async fn start_page_token(State(fake): State<FakeGoogleDrive>) -> Response {
    let token = fake.state.lock().unwrap().start_token();
    Json(json!({"kind": "drive#startPageToken", "startPageToken": token})).into_response()
}

async fn list_files(
    State(fake): State<FakeGoogleDrive>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    fake.state.lock().unwrap().list_files(&params)
}

async fn list_changes(
    State(fake): State<FakeGoogleDrive>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    fake.state.lock().unwrap().list_changes(&params)
}

/// `changes.watch`: the channel exists, and its `sync` message has been sent, before the
/// answer, as with Drive; what the receiver answers to `sync` changes nothing.
async fn watch(
    State(fake): State<FakeGoogleDrive>,
    Query(params): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let opened = fake.state.lock().unwrap().open_channel(&params, &body);
    let channel = match opened {
        Ok(channel) => channel,
        Err(refusal) => return *refusal,
    };
    let headers = message_headers(&channel, "sync", channel.token.as_deref());
    fake.deliver(&channel.address, &headers).await;
    let mut answer = json!({
        "kind": "api#channel",
        "id": channel.id,
        "resourceId": channel.resource_id,
        "resourceUri": channel.resource_uri,
        "expiration": channel.expiration.timestamp_millis().to_string()
    });
    if let Some(token) = &channel.token {
        answer["token"] = json!(token);
    }
    Json(answer).into_response()
}

async fn stop(State(fake): State<FakeGoogleDrive>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = request["id"].as_str().unwrap_or_default();
    let resource_id = request["resourceId"].as_str().unwrap_or_default();
    let mut drive = fake.state.lock().unwrap();
    // A stopped channel is forgotten: stopping it again finds nothing.
    let channel = drive
        .channels
        .iter_mut()
        .find(|c| c.id == id && c.resource_id == resource_id && !c.stopped);
    match channel {
        Some(channel) => {
            channel.stopped = true;
            StatusCode::NO_CONTENT.into_response()
        }
        None => {
            let message = format!("Channel '{id}' not found for project '{PROJECT}'");
            error(404, &message, "global", "notFound", None)
        }
    }
}

async fn unknown(uri: Uri) -> Response {
    let message = format!("Not Found: {}", uri.path());
    error(404, &message, "global", "notFound", None)
}

impl FakeGoogleDrive {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent(PUSH_USER_AGENT)
            .build()
            .unwrap();
        let fake = Self {
            url,
            state: Arc::new(Mutex::new(Drive::default())),
            client,
        };
        let router = Router::new()
            .route(&format!("{ROOT}/files"), get(list_files))
            .route(&format!("{ROOT}/files/{{id}}"), get(file).patch(file))
            .route(&format!("{ROOT}/changes"), get(list_changes))
            .route(
                &format!("{ROOT}/changes/startPageToken"),
                get(start_page_token),
            )
            .route(&format!("{ROOT}/changes/watch"), post(watch))
            .route(&format!("{ROOT}/channels/stop"), post(stop))
            // Only the routes above are Drive data routes: not the token endpoint below.
            .route_layer(middleware::from_fn_with_state(fake.clone(), admit))
            .route("/token", post(token))
            .fallback(unknown)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for the connection.
    pub fn credentials(&self) -> Value {
        json!({"refresh_token": REFRESH_TOKEN, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url)
    }

    pub fn api_base(&self) -> String {
        format!("{}{ROOT}", self.url)
    }

    /// Adds a file to My Drive and returns its id.
    pub fn add_file(&self, name: &str) -> String {
        let mut drive = self.state.lock().unwrap();
        drive.new_file(name, None, TimeDelta::milliseconds(1))
    }

    /// Adds a file to the root of shared drive `drive_id` and returns its id.
    pub fn add_shared_drive_file(&self, drive_id: &str, name: &str) -> String {
        let mut drive = self.state.lock().unwrap();
        drive.new_file(name, Some(drive_id), TimeDelta::milliseconds(1))
    }

    /// Adds `n` files named `file-00001.txt` onwards to My Drive under one lock.
    pub fn load_files(&self, n: usize) {
        let mut drive = self.state.lock().unwrap();
        for i in 1..=n {
            let name = format!("file-{i:05}.txt");
            drive.new_file(&name, None, TimeDelta::microseconds(1));
        }
    }

    /// A file as the fake holds it (trashed ones too).
    pub fn file(&self, id: &str) -> Option<File> {
        self.state.lock().unwrap().files.get(id).cloned()
    }

    pub fn rename_file(&self, id: &str, name: &str) {
        let mut drive = self.state.lock().unwrap();
        drive.change_file(id, |f| f.name = name.to_string());
    }

    /// Moves a file to the trash: it stays, and its change says `removed: false` with
    /// `file.trashed: true`.
    pub fn trash_file(&self, id: &str) {
        let mut drive = self.state.lock().unwrap();
        drive.change_file(id, |f| f.trashed = true);
    }

    /// Deletes a file for good: its change says `removed: true` and carries no file.
    pub fn delete_file(&self, id: &str) {
        let mut drive = self.state.lock().unwrap();
        let (_, now) = drive.tick_by(TimeDelta::milliseconds(1));
        let file = drive
            .files
            .remove(id)
            .unwrap_or_else(|| panic!("no file {id}"));
        drive.deleted_from.insert(id.to_string(), file.drive_id);
        drive.log(id, true, now);
    }

    pub fn channels(&self) -> Vec<Channel> {
        self.state.lock().unwrap().channels.clone()
    }

    /// Sends `X-Goog-Resource-State: change` to every live channel as Google does after a
    /// change; returns each (status) answered, 0 when a receiver could not be reached.
    pub async fn notify_change(&self) -> Vec<u16> {
        let messages: Vec<(String, Vec<(String, String)>)> = {
            let mut drive = self.state.lock().unwrap();
            let now = Utc::now();
            drive
                .channels
                .iter_mut()
                .filter(|c| !c.stopped && c.expiration > now)
                .map(|c| {
                    c.messages += 1;
                    (
                        c.address.clone(),
                        message_headers(c, "change", c.token.as_deref()),
                    )
                })
                .collect()
        };
        let mut statuses = Vec::new();
        for (address, headers) in messages {
            statuses.push(self.deliver(&address, &headers).await);
        }
        statuses
    }

    /// The headers Google would send to channel `channel_id` for a `change` message, with
    /// `token` instead of the channel's own when Some (a forgery). No body. The message counts:
    /// the next one has the next number.
    pub fn change_message(&self, channel_id: &str, token: Option<&str>) -> Vec<(String, String)> {
        let mut drive = self.state.lock().unwrap();
        let channel = drive
            .channels
            .iter_mut()
            .find(|c| c.id == channel_id)
            .unwrap_or_else(|| panic!("no channel {channel_id}"));
        channel.messages += 1;
        message_headers(channel, "change", token.or(channel.token.as_deref()))
    }

    /// POSTs a push message, an empty body with these headers; returns the receiver's status,
    /// 0 when it could not be reached.
    async fn deliver(&self, address: &str, headers: &[(String, String)]) -> u16 {
        let mut request = self.client.post(address).body(Vec::new());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        match request.send().await {
            Ok(answer) => answer.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn token_refreshes(&self) -> usize {
        self.state.lock().unwrap().token_refreshes
    }
}
