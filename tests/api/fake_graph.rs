//! Microsoft Graph on loopback for the OneDrive and Teams adapters, reproducing the wire facts
//! they depend on: the Microsoft identity token endpoint (shared with the Dataverse fake);
//! OneDrive `driveItem` delta (`/drives/{id}/root/delta`, `/me/drive/root/delta`) whose first
//! enumeration includes the root, pages by `@odata.nextLink` with an opaque `token`, ends with an
//! `@odata.deltaLink` whose token is the version when the round began, lists again on a later page
//! an item that changed after an earlier page of the round listed it (Graph: "the same item may
//! appear more than once in a delta feed"), reports deletions as items with a `deleted` facet and
//! no name, answers `token=latest` with nothing but a deltaLink, and answers a delta token it no
//! longer keeps with 410 `resyncRequired` and a `Location` to start over; Teams channel-message
//! delta with `$top` at most 50, `$skiptoken`/`$deltatoken` links, root posts only
//! (`$expand=replies` nests the replies), soft-deleted messages with `deletedDateTime` and an
//! emptied body, and 400 `syncStateNotFound` for an expired token;
//! one item by id (`GET`, and for tokens asked for `Files.ReadWrite.All`, `PATCH` renames, moves
//! and descriptions, refused onto a name the folder holds with 409 `nameAlreadyExists`, and
//! `DELETE`), under `If-Match` answered 412 `resourceModified` for an `eTag` the item no
//! longer has, 404 `itemNotFound` for an item gone, and 403 `accessDenied` for a token that
//! may only read;
//! change-notification subscriptions, created only after the `validationToken` handshake with
//! both notification URLs (a form-encoded token with spaces, `+` and `:`, to be echoed decoded as
//! `text/plain` within 10 seconds), with the lifetime caps (4,320 minutes for chat messages, which
//! need a lifecycle URL beyond an hour; 42,300 for drives, which allow only `updated`), renewal,
//! deletion and reauthorization; notifications and lifecycle events as Graph POSTs them, with
//! `clientState`; and errors in the `{"error":{"code","message","innerError"}}` envelope: 401
//! `InvalidAuthenticationToken` with its `WWW-Authenticate` challenge, 429 `activityLimitReached`
//! and 503 `serviceNotAvailable` with `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::fake_entra::{CLIENT_ID, Entra, TENANT, delegated_credentials};

pub const ROOT: &str = "/v1.0";
/// The signed-in user: the author of every message and the creator of every subscription.
pub const USER_ID: &str = "8ea0e38b-efb3-4757-924a-5f94061cf8c2";
const USER_NAME: &str = "Robin Kline";
/// The first Teams message id; later ones count up from it.
const FIRST_MESSAGE_ID: u64 = 1_606_515_483_514;
const DRIVE_PAGE: usize = 200;
const DRIVE_MAX_PAGE: usize = 1000;
const TEAMS_PAGE: usize = 20;
const TEAMS_MAX_PAGE: usize = 50;
const DRIVE_MAX_MINUTES: i64 = 42_300;
const MESSAGES_MAX_MINUTES: i64 = 4_320;

/// A drive item, or the tombstone of a deleted one: a delta must still report it.
#[derive(Clone, Debug)]
pub struct DriveItem {
    pub id: String,
    pub name: String,
    pub folder: bool,
    /// None for the drive's root.
    pub parent: Option<String>,
    /// The global version of the item's last change.
    pub version: u64,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    pub deleted: bool,
    /// Live children, for a folder's `childCount`.
    pub children: usize,
    pub description: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Drive {
    pub root: String,
    /// Items by id, the root among them, so pages come out in id order.
    pub items: BTreeMap<String, DriveItem>,
}

/// A channel message or a reply. Deleted ones stay, as Teams soft-deletes.
#[derive(Clone, Debug)]
pub struct Message {
    pub id: String,
    pub team: String,
    pub channel: String,
    pub reply_to: Option<String>,
    pub text: String,
    pub version: u64,
    pub created: DateTime<Utc>,
    pub modified: DateTime<Utc>,
    pub edited: Option<DateTime<Utc>>,
    pub deleted: Option<DateTime<Utc>>,
    /// A root post's replies, oldest first.
    pub replies: Vec<Message>,
}

#[derive(Clone, Debug)]
pub struct Subscription {
    pub id: String,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_notification_url: Option<String>,
    pub client_state: Option<String>,
    pub expiration: DateTime<Utc>,
}

#[derive(Default)]
pub struct Graph {
    pub entra: Entra,
    /// Drives by the id in the URL (`me` for `/me/drive`), made on first use.
    pub drives: BTreeMap<String, Drive>,
    /// Root posts of every channel by numeric id, with their replies.
    pub messages: BTreeMap<u64, Message>,
    /// In creation order.
    pub subscriptions: Vec<Subscription>,
    /// Bumped by every change to an item or message; delta tokens are versions.
    pub version: u64,
    /// The next N data requests answer 429 with `Retry-After` of this many seconds.
    pub throttle: Option<(usize, u64)>,
    /// The throttle starts only after this many more data requests (a sync stopped mid-way).
    pub throttle_after: Option<usize>,
    /// The next N data requests answer 503.
    pub unavailable: usize,
    /// A delta token answers 410 `resyncRequired` (drive) or 400 `syncStateNotFound` (Teams).
    pub expire_delta_tokens: bool,
    /// Channels deleted from their team: their messages answer 404.
    pub deleted_channels: Vec<String>,
    /// Another subscription (one replaced meanwhile, or another integration's) whose
    /// notification rides in every batch delivered.
    pub extra_subscription_in_batches: Option<String>,
    /// Change notifications go without their `id`, as OneDrive's own do: every one of a drive
    /// reads the same.
    pub notifications_without_id: bool,
    /// The next drive token of any kind (a page of the first enumeration too) answers 410
    /// `resyncRequired`, once: it was kept too long.
    pub expire_next_token: bool,
    /// Renames made once a number of drive delta pages has been served.
    renames_after_pages: Vec<PendingRename>,
    /// How long a validation handshake may take (Graph allows 10 seconds).
    pub validation_timeout: Duration,
    /// Every data request's method, path and decoded query, in order.
    pub requests: Vec<String>,
    url: String,
    /// The last timestamp handed out: changes get strictly increasing times, and Teams etags
    /// (the modification time in milliseconds) differ for every change.
    clock: DateTime<Utc>,
    next_item: u64,
    next_message: u64,
    /// The last POST to a receiver (URL, body), for `redeliver_last`.
    last_delivery: Option<(String, String)>,
}

/// A rename of a drive item made once `pages` more drive delta pages have been served.
struct PendingRename {
    pages: usize,
    drive: String,
    id: String,
    name: String,
}

#[derive(Clone)]
pub struct FakeGraph {
    /// `http://127.0.0.1:port`; the Graph API base is `{url}/v1.0`.
    pub url: String,
    pub state: Arc<Mutex<Graph>>,
    client: reqwest::Client,
}

fn error_with(status: u16, code: &str, message: &str, inner_code: Option<&str>) -> Response {
    let mut inner = json!({
        "date": Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
        "request-id": Uuid::new_v4().to_string(),
        "client-request-id": Uuid::new_v4().to_string()
    });
    if let Some(code) = inner_code {
        inner["code"] = json!(code);
    }
    let body = json!({"error": {"code": code, "message": message, "innerError": inner}});
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    error_with(status, code, message, None)
}

fn invalid(message: &str) -> Response {
    error(400, "InvalidRequest", message)
}

fn not_found() -> Response {
    error(404, "ResourceNotFound", "The object was not found.")
}

fn item_not_found() -> Response {
    error(404, "itemNotFound", "The resource could not be found.")
}

fn sync_state_not_found() -> Response {
    let message = "The sync state generation is not found. The delta token is expired and data must be synchronized again.";
    error(400, "syncStateNotFound", message)
}

/// `Z`-suffixed time with whole seconds, as OneDrive for Business reports item times.
fn seconds(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Milliseconds, as Teams reports message times.
fn millis(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Seven fractional digits, as Graph echoes a subscription's expiry.
fn ticks(t: DateTime<Utc>) -> String {
    let fraction = t.timestamp_subsec_nanos() / 100;
    format!("{}.{fraction:07}Z", t.format("%Y-%m-%dT%H:%M:%S"))
}

fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    let value = HeaderValue::from_str(value).unwrap();
    response.headers_mut().insert(name, value);
    response
}

/// The first `top` of `rows`, and whether more follow.
fn take_page<T>(rows: impl Iterator<Item = T>, top: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = rows.take(top + 1).collect();
    let more = page.len() > top;
    page.truncate(top);
    (page, more)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Form-encodes a query value the way Graph's validation request does: a space becomes `+`, so
/// a literal `+` must be `%2b`, and other reserved characters get lowercase hex escapes.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

/// What a page or delta token stands for. Clients see it base64url-encoded: opaque, and safe
/// in a query string as it is. Query options of the first request ride in it, as in Graph.
#[derive(Clone)]
struct Cursor {
    /// A delta token (what a deltaLink carries) rather than a page token.
    delta: bool,
    /// Changes after this version are listed; 0 enumerates everything.
    since: u64,
    /// The version when this round of pages began: the delta token at its end.
    start: u64,
    top: usize,
    replies: bool,
    /// The last id already served in this round.
    after: String,
}

impl Cursor {
    fn fresh(version: u64, top: usize, replies: bool) -> Self {
        let after = String::new();
        let (delta, since, start) = (false, 0, version);
        Self {
            delta,
            since,
            start,
            top,
            replies,
            after,
        }
    }

    fn encode(&self) -> String {
        let kind = if self.delta { "d" } else { "p" };
        let text = format!(
            "{kind}.{}.{}.{}.{}.{}",
            self.since,
            self.start,
            self.top,
            u8::from(self.replies),
            self.after
        );
        URL_SAFE_NO_PAD.encode(text)
    }

    fn decode(token: &str) -> Option<Self> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
        let mut parts = text.splitn(6, '.');
        let delta = match parts.next()? {
            "d" => true,
            "p" => false,
            _ => return None,
        };
        Some(Self {
            delta,
            since: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
            top: parts.next()?.parse().ok()?,
            replies: parts.next()? == "1",
            after: parts.next()?.to_string(),
        })
    }

    /// The first page of the changes since this delta token.
    fn resume(&self, version: u64) -> Self {
        Self {
            since: self.since,
            ..Self::fresh(version, self.top, self.replies)
        }
    }

    /// The page after the one ending with `last`.
    fn next_page(&self, last: &str) -> String {
        Self {
            after: last.to_string(),
            ..self.clone()
        }
        .encode()
    }

    /// The delta token for the changes after this round began.
    fn delta_token(&self) -> String {
        let fresh = Self::fresh(self.start, self.top, self.replies);
        Self {
            delta: true,
            since: self.start,
            ..fresh
        }
        .encode()
    }
}

/// The subscribable resources this fake serves, and their lifetime caps.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Drive,
    Messages,
}

impl Kind {
    fn of(resource: &str) -> Option<Self> {
        let path = resource.trim_start_matches('/');
        if path.to_ascii_lowercase().contains("messages") {
            Some(Self::Messages)
        } else if path == "me/drive/root"
            || path.ends_with("/drive/root")
            || (path.starts_with("drives/") && path.ends_with("/root"))
        {
            Some(Self::Drive)
        } else {
            None
        }
    }

    fn max_minutes(self) -> i64 {
        match self {
            Self::Drive => DRIVE_MAX_MINUTES,
            Self::Messages => MESSAGES_MAX_MINUTES,
        }
    }
}

/// Refuses an expiry outside the resource's window, or a long one without a lifecycle URL on
/// a resource that needs it.
fn check_expiration(kind: Kind, expiration: DateTime<Utc>, lifecycle: bool) -> Option<Response> {
    let ahead = expiration - Utc::now();
    if ahead <= TimeDelta::zero() {
        return Some(invalid("Subscription expiration must be in the future."));
    }
    if ahead > TimeDelta::minutes(kind.max_minutes()) {
        let message = format!(
            "Subscription expiration can only be {} minutes in the future.",
            kind.max_minutes()
        );
        return Some(invalid(&message));
    }
    if kind == Kind::Messages && ahead > TimeDelta::hours(1) && !lifecycle {
        return Some(invalid(
            "lifecycleNotificationUrl is a required property for subscription creation on this resource when the expirationDateTime value is set to greater than 1 hour.",
        ));
    }
    None
}

/// Graph calls only https endpoints; plain http is allowed here for loopback receivers.
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

fn parse_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    let text = value?.as_str()?;
    Some(DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc))
}

fn subscription_json(s: &Subscription) -> Value {
    json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
        "id": s.id,
        "resource": s.resource,
        "applicationId": CLIENT_ID,
        "changeType": s.change_type,
        "clientState": s.client_state,
        "notificationUrl": s.notification_url,
        "notificationQueryOptions": null,
        "lifecycleNotificationUrl": s.lifecycle_notification_url,
        "expirationDateTime": ticks(s.expiration),
        "creatorId": USER_ID,
        "includeResourceData": null,
        "latestSupportedTlsVersion": "v1_2",
        "encryptionCertificate": null,
        "encryptionCertificateId": null,
        "notificationUrlAppId": null
    })
}

/// A notification's id: the same for the same change, so a redelivery is recognisable.
fn notification_id(subscription: &str, change: &str, resource: &str, version: u64) -> String {
    let digest = Sha256::digest(format!("{subscription}|{change}|{resource}|{version}"));
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

/// Answers the validation handshake Graph sends before creating a subscription: a POST with
/// the token in the query and an empty text body, answered 200 with the decoded token as
/// `text/plain` in time.
async fn validate(client: &reqwest::Client, url: &str, timeout: Duration) -> bool {
    let nonce = Uuid::new_v4().simple().to_string();
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {} {}+{}",
        Uuid::new_v4(),
        &nonce[..8],
        &nonce[8..16]
    );
    let separator = if url.contains('?') { '&' } else { '?' };
    let target = format!("{url}{separator}validationToken={}", form_encode(&token));
    let sent = client
        .post(target)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Vec::new())
        .timeout(timeout)
        .send()
        .await;
    let Ok(answer) = sent else { return false };
    let text_plain = answer
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("text/plain"));
    answer.status() == StatusCode::OK && text_plain && answer.text().await.is_ok_and(|b| b == token)
}

impl Graph {
    /// A new version and a timestamp later than any before it, by at least `step`.
    fn tick_by(&mut self, step: TimeDelta) -> (u64, DateTime<Utc>) {
        self.version += 1;
        self.clock = Utc::now().max(self.clock + step);
        (self.version, self.clock)
    }

    /// For drive items: a microsecond apart keeps a bulk load from running ahead of the wall
    /// clock.
    fn tick(&mut self) -> (u64, DateTime<Utc>) {
        self.tick_by(TimeDelta::microseconds(1))
    }

    /// For messages: a millisecond apart, so every change gets its own etag.
    fn tick_message(&mut self) -> (u64, DateTime<Utc>) {
        self.tick_by(TimeDelta::milliseconds(1))
    }

    fn new_item(&mut self, name: &str, folder: bool, parent: Option<String>) -> DriveItem {
        self.next_item += 1;
        let (version, now) = self.tick();
        DriveItem {
            id: format!("01ITEM{:010}", self.next_item),
            name: name.to_string(),
            folder,
            parent,
            version,
            created: now,
            modified: now,
            deleted: false,
            children: 0,
            description: None,
        }
    }

    /// The drive, made with its root on first use: any drive id names a drive here.
    fn drive(&mut self, key: &str) -> &mut Drive {
        if !self.drives.contains_key(key) {
            let root = self.new_item("root", true, None);
            let drive = Drive {
                root: root.id.clone(),
                items: BTreeMap::from([(root.id.clone(), root)]),
            };
            self.drives.insert(key.to_string(), drive);
        }
        self.drives.get_mut(key).unwrap()
    }

    /// Adds live children to the root (negative: removes), which changes the root too.
    fn touch_root(&mut self, key: &str, added: isize) {
        let (version, now) = self.tick();
        let drive = self.drive(key);
        let root = drive.items.get_mut(&drive.root).unwrap();
        root.children = root.children.saturating_add_signed(added);
        (root.version, root.modified) = (version, now);
    }

    fn item_mut(&mut self, key: &str, id: &str) -> &mut DriveItem {
        let drive = self.drives.get_mut(key);
        let item = drive
            .and_then(|d| d.items.get_mut(id))
            .filter(|i| !i.deleted);
        item.unwrap_or_else(|| panic!("no live item {id} in drive {key}"))
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
        if !self.entra.admits(headers) {
            let message = "Access token has expired or is not yet valid.";
            let answer = error(401, "InvalidAuthenticationToken", message);
            let challenge = r#"Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000""#;
            return Some(with_header(answer, "www-authenticate", challenge));
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
            let message = "The request has been throttled";
            let answer = error_with(
                429,
                "activityLimitReached",
                message,
                Some("throttledRequest"),
            );
            return Some(with_header(answer, "retry-after", &seconds.to_string()));
        }
        if self.unavailable > 0 {
            self.unavailable -= 1;
            let message = "The service is temporarily unavailable.";
            let answer = error(503, "serviceNotAvailable", message);
            return Some(with_header(answer, "retry-after", "1"));
        }
        None
    }

    /// A page of a drive's delta. `path` is how the request named the drive (`/drives/{id}` or
    /// `/me/drive`): links come back in the same form.
    fn drive_delta(&mut self, path: &str, key: &str, params: &[(String, String)]) -> Response {
        let base = format!("{}{ROOT}{path}/root/delta", self.url);
        let top = param(params, "$top")
            .and_then(|t| t.parse::<usize>().ok())
            .map(|n| n.clamp(1, DRIVE_MAX_PAGE));
        self.drive(key);
        let version = self.version;
        let cursor = match param(params, "token") {
            None => Cursor::fresh(version, top.unwrap_or(DRIVE_PAGE), false),
            Some("latest") => Cursor {
                since: version,
                ..Cursor::fresh(version, top.unwrap_or(DRIVE_PAGE), false)
            },
            Some(token) => match Cursor::decode(token) {
                Some(_) if std::mem::take(&mut self.expire_next_token) => {
                    let message = "Resync required. Replace any local items with the server's version (including deletes) if you're sure that the service was up to date with your local changes when you last sync'd. Upload any local changes that the server doesn't know about.";
                    let inner = Some("resyncChangesApplyDifferences");
                    let answer = error_with(410, "resyncRequired", message, inner);
                    return with_header(answer, "location", &base);
                }
                Some(c) if !c.delta => c,
                Some(c) if !self.expire_delta_tokens && c.since <= version => c.resume(version),
                _ => {
                    let message = "Resync required. Replace any local items with the server's version (including deletes) if you're sure that the service was up to date with your local changes when you last sync'd. Upload any local changes that the server doesn't know about.";
                    let inner = Some("resyncChangesApplyDifferences");
                    let answer = error_with(410, "resyncRequired", message, inner);
                    return with_header(answer, "location", &base);
                }
            },
        };
        let top = top.unwrap_or(cursor.top);
        let drive = &self.drives[key];
        // What changed behind the round's position since its last page is listed again, first;
        // the round then counts from now.
        let relisted: Vec<&DriveItem> = drive
            .items
            .range::<str, _>((Unbounded, Included(cursor.after.as_str())))
            .map(|(_, item)| item)
            .filter(|i| i.version > cursor.start)
            .collect();
        let cursor = Cursor {
            start: version,
            ..cursor
        };
        // An enumeration lists what exists; a delta also lists what went away since.
        let items = drive
            .items
            .range::<str, _>((Excluded(cursor.after.as_str()), Unbounded))
            .map(|(_, item)| item)
            .filter(|i| i.version > cursor.since && !(cursor.since == 0 && i.deleted));
        let (page, more) = take_page(items, top);
        let value: Vec<Value> = relisted
            .into_iter()
            .chain(page.iter().copied())
            .map(|i| in_delta(item_json(key, drive, i)))
            .collect();
        let mut body = json!({
            "@odata.context": format!("{}{ROOT}/$metadata#Collection(driveItem)", self.url),
            "value": value
        });
        match page.last().filter(|_| more) {
            Some(last) => {
                let token = cursor.next_page(&last.id);
                body["@odata.nextLink"] = json!(format!("{base}?token={token}"));
            }
            None => {
                body["@odata.deltaLink"] = json!(format!("{base}?token={}", cursor.delta_token()))
            }
        }
        self.page_served();
        Json(body).into_response()
    }

    /// A live item of a drive.
    fn live_item(&self, key: &str, id: &str) -> Option<&DriveItem> {
        self.drives
            .get(key)
            .and_then(|d| d.items.get(id))
            .filter(|i| !i.deleted)
    }

    fn item_request(
        &mut self,
        key: &str,
        id: &str,
        method: &Method,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        match *method {
            Method::GET => self.get_item(key, id),
            Method::PATCH => self.patch_item(key, id, headers, body),
            _ => self.delete_item_request(key, id, headers),
        }
    }

    fn get_item(&mut self, key: &str, id: &str) -> Response {
        self.drive(key);
        match self.live_item(key, id) {
            Some(item) => Json(item_json(key, &self.drives[key], item)).into_response(),
            None => item_not_found(),
        }
    }

    /// What a write needs before it may change an item: a token that may write, the item,
    /// and, with `If-Match`, its current `eTag`.
    fn writable(&mut self, key: &str, id: &str, headers: &HeaderMap) -> Option<Response> {
        if !self.entra.grants(headers, "Files.ReadWrite.All") {
            return Some(error(403, "accessDenied", "Access denied"));
        }
        self.drive(key);
        let Some(item) = self.live_item(key, id) else {
            return Some(item_not_found());
        };
        let etag = format!("\"{},{}\"", item.id, item.version);
        let if_match = headers.get("if-match").and_then(|v| v.to_str().ok());
        if if_match.is_some_and(|given| given != "*" && given != etag) {
            let message = "ETag does not match current item's value";
            return Some(error_with(
                412,
                "resourceModified",
                message,
                Some("entityTagDoesNotMatch"),
            ));
        }
        None
    }

    /// `PATCH` of an item: a rename (refused onto a name its folder holds), a move into
    /// another folder, a description; anything else is Graph's to set.
    fn patch_item(&mut self, key: &str, id: &str, headers: &HeaderMap, body: &[u8]) -> Response {
        if let Some(refusal) = self.writable(key, id, headers) {
            return refusal;
        }
        let Ok(Value::Object(changes)) = serde_json::from_slice::<Value>(body) else {
            return error(400, "invalidRequest", "Invalid request");
        };
        let drive = &self.drives[key];
        let item = &drive.items[id];
        let mut name = item.name.clone();
        let mut parent = item.parent.clone();
        let mut description = item.description.clone();
        for (field, value) in &changes {
            match (field.as_str(), value) {
                ("name", Value::String(new))
                    if !new.is_empty() && !new.contains(['/', '\\', ':']) =>
                {
                    name = new.clone()
                }
                ("description", Value::String(new)) => description = Some(new.clone()),
                ("parentReference", Value::Object(to)) => {
                    let folder = to.get("id").and_then(Value::as_str);
                    match folder.and_then(|f| drive.items.get(f)) {
                        Some(f) if f.folder && !f.deleted && f.id != id => {
                            parent = Some(f.id.clone())
                        }
                        _ => return error(400, "invalidRequest", "Invalid parentReference"),
                    }
                }
                (field, _) => {
                    let message =
                        format!("Property '{field}' is read-only or has an invalid value");
                    return error(400, "invalidRequest", &message);
                }
            }
        }
        let clash = drive.items.values().any(|other| {
            other.id != id && !other.deleted && other.parent == parent && other.name == name
        });
        if clash {
            return error(409, "nameAlreadyExists", "Name already exists");
        }
        let moved_from = (item.parent != parent)
            .then(|| item.parent.clone())
            .flatten();
        let (version, now) = self.tick();
        let drive = self.drives.get_mut(key).unwrap();
        let item = drive.items.get_mut(id).unwrap();
        (item.name, item.parent, item.description) = (name, parent.clone(), description);
        (item.version, item.modified) = (version, now);
        if let (Some(from), Some(to)) = (moved_from, parent) {
            for (folder, added) in [(from, -1), (to, 1)] {
                let folder = drive.items.get_mut(&folder).unwrap();
                folder.children = folder.children.saturating_add_signed(added);
                (folder.version, folder.modified) = (version, now);
            }
        }
        let drive = &self.drives[key];
        Json(item_json(key, drive, &drive.items[id])).into_response()
    }

    fn delete_item_request(&mut self, key: &str, id: &str, headers: &HeaderMap) -> Response {
        if let Some(refusal) = self.writable(key, id, headers) {
            return refusal;
        }
        if self.drives[key].items[id].parent.is_none() {
            return error(
                400,
                "invalidRequest",
                "The root of a drive cannot be deleted",
            );
        }
        self.remove_item(key, id);
        StatusCode::NO_CONTENT.into_response()
    }

    /// Deletes an item: its tombstone stays for deltas.
    fn remove_item(&mut self, key: &str, id: &str) {
        let (version, now) = self.tick();
        let item = self.item_mut(key, id);
        item.deleted = true;
        (item.version, item.modified) = (version, now);
        let parent = item.parent.clone().unwrap_or_default();
        let drive = self.drives.get_mut(key).unwrap();
        if let Some(folder) = drive.items.get_mut(&parent) {
            folder.children = folder.children.saturating_sub(1);
            (folder.version, folder.modified) = (version, now);
        }
    }

    /// Counts a drive delta page served, and makes the renames now due.
    fn page_served(&mut self) {
        for rename in &mut self.renames_after_pages {
            rename.pages -= 1;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.renames_after_pages)
            .into_iter()
            .partition(|r| r.pages == 0);
        self.renames_after_pages = later;
        for r in due {
            self.rename(&r.drive, &r.id, &r.name);
        }
    }

    fn rename(&mut self, drive: &str, id: &str, name: &str) {
        let (version, now) = self.tick();
        let item = self.item_mut(drive, id);
        item.name = name.to_string();
        (item.version, item.modified) = (version, now);
    }

    /// A page of a channel's message delta: root posts changed since the token, in id order.
    fn teams_delta(&mut self, team: &str, channel: &str, params: &[(String, String)]) -> Response {
        if self.deleted_channels.iter().any(|c| c == channel) {
            return error(404, "NotFound", "Channel not found.");
        }
        let top = match param(params, "$top").map(str::parse::<usize>) {
            None => None,
            Some(Ok(n)) if (1..=TEAMS_MAX_PAGE).contains(&n) => Some(n),
            Some(_) => return error(400, "BadRequest", "$top must be between 1 and 50"),
        };
        let replies = param(params, "$expand")
            .is_some_and(|e| e.split(',').any(|option| option.trim() == "replies"));
        let version = self.version;
        let cursor = match (param(params, "$skiptoken"), param(params, "$deltatoken")) {
            (Some(token), _) => match Cursor::decode(token) {
                Some(c) if !c.delta => c,
                _ => return sync_state_not_found(),
            },
            (None, Some(token)) => match Cursor::decode(token) {
                Some(c) if c.delta && !self.expire_delta_tokens && c.since <= version => {
                    c.resume(version)
                }
                _ => return sync_state_not_found(),
            },
            (None, None) => Cursor::fresh(version, top.unwrap_or(TEAMS_PAGE), replies),
        };
        let top = top.unwrap_or(cursor.top);
        let after: u64 = cursor.after.parse().unwrap_or(0);
        let messages = self
            .messages
            .range((Excluded(after), Unbounded))
            .map(|(_, m)| m)
            .filter(|m| m.team == team && m.channel == channel && m.version > cursor.since);
        let (page, more) = take_page(messages, top);
        let value: Vec<Value> = page
            .iter()
            .map(|m| message_json(m, cursor.replies))
            .collect();
        let base = format!(
            "{}{ROOT}/teams/{team}/channels/{channel}/messages/delta",
            self.url
        );
        let mut body = json!({
            "@odata.context": format!("{}{ROOT}/$metadata#Collection(chatMessage)", self.url),
            "value": value
        });
        match page.last().filter(|_| more) {
            Some(last) => {
                let token = cursor.next_page(&last.id);
                body["@odata.nextLink"] = json!(format!("{base}?$skiptoken={token}"));
            }
            None => {
                let token = cursor.delta_token();
                body["@odata.deltaLink"] = json!(format!("{base}?$deltatoken={token}"));
            }
        }
        Json(body).into_response()
    }

    /// The root post `id` of a channel, mutably.
    fn root_mut(&mut self, team: &str, channel: &str, id: &str) -> &mut Message {
        let key: u64 = id
            .parse()
            .unwrap_or_else(|_| panic!("message id {id} is not numeric"));
        let root = self.messages.get_mut(&key);
        root.filter(|m| m.team == team && m.channel == channel)
            .unwrap_or_else(|| panic!("no message {id} in {team}/{channel}"))
    }

    /// Finds message `id`, a root post or a reply, anywhere: (root key, index among replies).
    fn locate(&self, id: &str) -> Option<(u64, Option<usize>)> {
        if let Some(key) = id.parse().ok().filter(|k| self.messages.contains_key(k)) {
            return Some((key, None));
        }
        self.messages.iter().find_map(|(key, root)| {
            let index = root.replies.iter().position(|r| r.id == id)?;
            Some((*key, Some(index)))
        })
    }

    fn find_message(&self, id: &str) -> Option<&Message> {
        let (key, reply) = self.locate(id)?;
        let root = &self.messages[&key];
        Some(reply.map_or(root, |i| &root.replies[i]))
    }

    /// Changes message `id` with `change`, stamping it; a changed reply changes its root post
    /// too, which is how the post comes back in a delta.
    fn change_message(
        &mut self,
        team: &str,
        channel: &str,
        id: &str,
        change: impl Fn(&mut Message, DateTime<Utc>),
    ) {
        let (key, reply) = self
            .locate(id)
            .unwrap_or_else(|| panic!("no message {id} in {team}/{channel}"));
        let (version, now) = self.tick_message();
        let root = self.messages.get_mut(&key).unwrap();
        assert!(
            root.team == team && root.channel == channel,
            "message {id} is in another channel"
        );
        if let Some(index) = reply {
            let reply = &mut root.replies[index];
            change(reply, now);
            (reply.version, reply.modified) = (version, now);
        } else {
            change(root, now);
        }
        (root.version, root.modified) = (version, now);
    }

    fn new_message(
        &mut self,
        team: &str,
        channel: &str,
        reply_to: Option<&str>,
        text: &str,
    ) -> Message {
        let (version, now) = self.tick_message();
        let id = self.next_message.to_string();
        self.next_message += 1;
        Message {
            id,
            team: team.to_string(),
            channel: channel.to_string(),
            reply_to: reply_to.map(str::to_string),
            text: text.to_string(),
            version,
            created: now,
            modified: now,
            edited: None,
            deleted: None,
            replies: Vec::new(),
        }
    }

    fn subscription(&self, id: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.id == id)
    }
}

/// Where an item lives, as `parentReference.path` names it: `/drive/root:` and the folders
/// down to its parent.
fn parent_path(drive: &Drive, item: &DriveItem) -> String {
    let mut folders = Vec::new();
    let mut at = item.parent.as_deref();
    while let Some(id) = at.filter(|id| *id != drive.root) {
        let folder = &drive.items[id];
        folders.push(folder.name.as_str());
        at = folder.parent.as_deref();
    }
    folders.reverse();
    std::iter::once("/drive/root:")
        .chain(folders)
        .collect::<Vec<_>>()
        .join("/")
}

/// An item as a delta lists it: its `parentReference` has no `path` (renaming a folder
/// lists none of the items under it, so no path a delta gave could be kept true), nor the
/// parent's `name`.
fn in_delta(mut item: Value) -> Value {
    if let Some(parent) = item["parentReference"].as_object_mut() {
        parent.remove("path");
        parent.remove("name");
    }
    item
}

fn item_json(key: &str, drive: &Drive, item: &DriveItem) -> Value {
    let parent_id = item.parent.as_deref().unwrap_or(&drive.root);
    let parent = json!({
        "driveId": key,
        "driveType": "business",
        "id": parent_id,
        "name": drive.items.get(parent_id).map_or("root", |p| p.name.as_str()),
        "path": parent_path(drive, item)
    });
    if item.deleted {
        return json!({"id": item.id, "deleted": {"state": "deleted"}, "parentReference": parent});
    }
    let content = format!("contents of {}\n", item.id);
    let mut out = json!({
        "id": item.id,
        "name": item.name,
        "eTag": format!("\"{},{}\"", item.id, item.version),
        "cTag": format!("\"c:{},{}\"", item.id, item.version),
        "createdDateTime": seconds(item.created),
        "lastModifiedDateTime": seconds(item.modified),
        "size": if item.folder { 0 } else { content.len() },
        "parentReference": parent
    });
    if let Some(description) = &item.description {
        out["description"] = json!(description);
    }
    if item.parent.is_none() {
        out["root"] = json!({});
        out["parentReference"] = json!({"driveId": key, "driveType": "business"});
    }
    if item.folder {
        out["folder"] = json!({"childCount": item.children});
    } else {
        // A quickXorHash is 20 bytes in base64; these stand in for one.
        let hash = STANDARD.encode(&Sha256::digest(content.as_bytes())[..20]);
        out["file"] = json!({"mimeType": "text/plain", "hashes": {"quickXorHash": hash}});
    }
    out
}

fn message_json(m: &Message, with_replies: bool) -> Value {
    let mut out = json!({
        "id": m.id,
        "etag": m.modified.timestamp_millis().to_string(),
        "messageType": "message",
        "replyToId": m.reply_to,
        "createdDateTime": millis(m.created),
        "lastModifiedDateTime": millis(m.modified),
        "lastEditedDateTime": m.edited.map(millis),
        "deletedDateTime": m.deleted.map(millis),
        "subject": null,
        "from": {"user": {"id": USER_ID, "displayName": USER_NAME, "userIdentityType": "aadUser"}},
        "body": {"contentType": "text", "content": if m.deleted.is_some() { "" } else { m.text.as_str() }},
        "channelIdentity": {"teamId": m.team, "channelId": m.channel},
        "attachments": [],
        "mentions": [],
        "reactions": []
    });
    if with_replies {
        let replies: Vec<Value> = m.replies.iter().map(|r| message_json(r, false)).collect();
        out["replies"] = json!(replies);
    }
    out
}

async fn token(
    State(fake): State<FakeGraph>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    fake.state.lock().unwrap().entra.token(&tenant, &form)
}

/// Every Graph route: logs the request, then answers instead of the route when the token is
/// not admitted or a knob says so.
async fn admit(State(fake): State<FakeGraph>, request: Request, next: Next) -> Response {
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

async fn drive_delta(
    State(fake): State<FakeGraph>,
    Path(drive): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let mut graph = fake.state.lock().unwrap();
    graph.drive_delta(&format!("/drives/{drive}"), &drive, &params)
}

/// `GET`, `PATCH` and `DELETE` of one item of a drive: `/drives/{drive}/items/{id}`, or
/// `/me/drive/items/{id}` for the signed-in user's.
async fn drive_item(
    State(fake): State<FakeGraph>,
    Path(segments): Path<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let drive = segments.get("drive").map_or("me", String::as_str);
    fake.state
        .lock()
        .unwrap()
        .item_request(drive, &segments["id"], &method, &headers, &body)
}

async fn my_drive_delta(
    State(fake): State<FakeGraph>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    fake.state
        .lock()
        .unwrap()
        .drive_delta("/me/drive", "me", &params)
}

async fn teams_delta(
    State(fake): State<FakeGraph>,
    Path((team, channel)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    fake.state
        .lock()
        .unwrap()
        .teams_delta(&team, &channel, &params)
}

async fn replies(
    State(fake): State<FakeGraph>,
    Path((team, channel, id)): Path<(String, String, String)>,
) -> Response {
    let graph = fake.state.lock().unwrap();
    let root = id
        .parse::<u64>()
        .ok()
        .and_then(|key| graph.messages.get(&key));
    let Some(root) = root.filter(|m| m.team == team && m.channel == channel) else {
        return error(404, "NotFound", "Resource not found");
    };
    let value: Vec<Value> = root
        .replies
        .iter()
        .map(|r| message_json(r, false))
        .collect();
    let context = format!("{}{ROOT}/$metadata#Collection(chatMessage)", fake.url);
    Json(json!({"@odata.context": context, "value": value})).into_response()
}

async fn create_subscription(State(fake): State<FakeGraph>, body: Bytes) -> Response {
    let Ok(Value::Object(request)) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "BadRequest", "Empty Payload. JSON content expected.");
    };
    let text = |name: &str| {
        request
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    for name in [
        "changeType",
        "notificationUrl",
        "resource",
        "expirationDateTime",
    ] {
        if text(name).is_none() {
            return invalid(&format!(
                "{name} is a required property for subscription creation."
            ));
        }
    }
    let (change_type, resource) = (text("changeType").unwrap(), text("resource").unwrap());
    let notification_url = text("notificationUrl").unwrap();
    let lifecycle_url = text("lifecycleNotificationUrl");
    let client_state = text("clientState");
    let Some(kind) = Kind::of(&resource) else {
        return invalid(&format!("Resource '{resource}' is not supported."));
    };
    let deleted_channel = {
        let graph = fake.state.lock().unwrap();
        graph
            .deleted_channels
            .iter()
            .any(|c| resource.contains(&format!("/channels/{c}/")))
    };
    if deleted_channel {
        return error(404, "NotFound", "Channel not found.");
    }
    let Some(expiration) = parse_time(request.get("expirationDateTime")) else {
        return invalid("expirationDateTime is not a valid date and time.");
    };
    let urls = std::iter::once(&notification_url).chain(lifecycle_url.iter());
    if let Some(url) = urls.clone().find(|u| !secure_enough(u)) {
        return invalid(&format!(
            "The notification URL '{url}' must use the https scheme."
        ));
    }
    let allowed = match kind {
        Kind::Drive => &["updated"][..],
        Kind::Messages => &["created", "updated", "deleted"][..],
    };
    if change_type.split(',').any(|c| !allowed.contains(&c.trim())) {
        let message =
            format!("changeType '{change_type}' is not supported for resource '{resource}'.");
        return invalid(&message);
    }
    if client_state
        .as_ref()
        .is_some_and(|s| s.chars().count() > 128)
    {
        return invalid("clientState must be at most 128 characters long.");
    }
    if let Some(refusal) = check_expiration(kind, expiration, lifecycle_url.is_some()) {
        return refusal;
    }
    // The handshakes run without the lock: a receiver may well call this fake meanwhile.
    let timeout = fake.state.lock().unwrap().validation_timeout;
    for url in urls {
        if !validate(&fake.client, url, timeout).await {
            return invalid(
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.",
            );
        }
    }
    let subscription = Subscription {
        id: Uuid::new_v4().to_string(),
        resource,
        change_type,
        notification_url,
        lifecycle_notification_url: lifecycle_url,
        client_state,
        expiration,
    };
    let answer = subscription_json(&subscription);
    fake.state.lock().unwrap().subscriptions.push(subscription);
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// GET, PATCH (renewal: only `expirationDateTime` changes) and DELETE of one subscription.
async fn subscription(
    State(fake): State<FakeGraph>,
    Path(id): Path<String>,
    method: Method,
    body: Bytes,
) -> Response {
    let mut graph = fake.state.lock().unwrap();
    let Some(index) = graph.subscriptions.iter().position(|s| s.id == id) else {
        return not_found();
    };
    if method == Method::DELETE {
        graph.subscriptions.remove(index);
        return StatusCode::NO_CONTENT.into_response();
    }
    let subscription = &mut graph.subscriptions[index];
    if method == Method::PATCH {
        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
        let Some(expiration) = parse_time(request.get("expirationDateTime")) else {
            return invalid("expirationDateTime is not a valid date and time.");
        };
        let kind = Kind::of(&subscription.resource).unwrap();
        let lifecycle = subscription.lifecycle_notification_url.is_some();
        if let Some(refusal) = check_expiration(kind, expiration, lifecycle) {
            return refusal;
        }
        subscription.expiration = expiration;
    }
    Json(subscription_json(subscription)).into_response()
}

async fn reauthorize(State(fake): State<FakeGraph>, Path(id): Path<String>) -> Response {
    match fake.state.lock().unwrap().subscription(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(),
    }
}

/// Any other path: Graph names the segment it could not resolve.
async fn unknown(uri: Uri) -> Response {
    let segment = uri.path().rsplit('/').next().unwrap_or_default();
    let message = format!("Resource not found for the segment '{segment}'.");
    error(400, "BadRequest", &message)
}

impl FakeGraph {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let graph = Graph {
            url: url.clone(),
            validation_timeout: Duration::from_secs(10),
            next_message: FIRST_MESSAGE_ID,
            ..Graph::default()
        };
        let fake = Self {
            url,
            state: Arc::new(Mutex::new(graph)),
            client: reqwest::Client::new(),
        };
        let one = get(subscription).patch(subscription).delete(subscription);
        let router = Router::new()
            .route(
                &format!("{ROOT}/drives/{{drive}}/root/delta"),
                get(drive_delta),
            )
            .route(&format!("{ROOT}/me/drive/root/delta"), get(my_drive_delta))
            .route(
                &format!("{ROOT}/drives/{{drive}}/items/{{id}}"),
                get(drive_item).patch(drive_item).delete(drive_item),
            )
            .route(
                &format!("{ROOT}/me/drive/items/{{id}}"),
                get(drive_item).patch(drive_item).delete(drive_item),
            )
            .route(
                &format!("{ROOT}/teams/{{team}}/channels/{{channel}}/messages/delta"),
                get(teams_delta),
            )
            .route(
                &format!("{ROOT}/teams/{{team}}/channels/{{channel}}/messages/{{id}}/replies"),
                get(replies),
            )
            .route(&format!("{ROOT}/subscriptions"), post(create_subscription))
            .route(&format!("{ROOT}/subscriptions/{{id}}"), one)
            .route(
                &format!("{ROOT}/subscriptions/{{id}}/reauthorize"),
                post(reauthorize),
            )
            // Only the routes above are Graph data routes: not the token endpoint below.
            .route_layer(middleware::from_fn_with_state(fake.clone(), admit))
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .fallback(unknown)
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for a delegated connection.
    pub fn credentials(&self) -> Value {
        delegated_credentials()
    }

    pub fn token_url(&self) -> String {
        format!("{}/{TENANT}/oauth2/v2.0/token", self.url)
    }

    pub fn api_base(&self) -> String {
        format!("{}{ROOT}", self.url)
    }

    /// Adds a file or folder under the drive's root and returns its id.
    pub fn add_item(&self, drive: &str, name: &str, folder: bool) -> String {
        let mut graph = self.state.lock().unwrap();
        let root = graph.drive(drive).root.clone();
        let item = graph.new_item(name, folder, Some(root));
        let id = item.id.clone();
        graph.drive(drive).items.insert(id.clone(), item);
        graph.touch_root(drive, 1);
        id
    }

    /// Adds `n` files named `file-00001.txt` onwards under one lock.
    pub fn load_items(&self, drive: &str, n: usize) {
        let mut graph = self.state.lock().unwrap();
        let root = graph.drive(drive).root.clone();
        let items: Vec<DriveItem> = (1..=n)
            .map(|i| graph.new_item(&format!("file-{i:05}.txt"), false, Some(root.clone())))
            .collect();
        let drive_items = &mut graph.drive(drive).items;
        drive_items.extend(items.into_iter().map(|item| (item.id.clone(), item)));
        graph.touch_root(drive, n as isize);
    }

    pub fn rename_item(&self, drive: &str, id: &str, name: &str) {
        self.state.lock().unwrap().rename(drive, id, name);
    }

    /// Renames an item once `pages` more pages of a drive delta have been served: a change
    /// made while a client pages through the drive.
    pub fn rename_item_after_pages(&self, drive: &str, id: &str, name: &str, pages: usize) {
        assert!(pages > 0);
        let rename = PendingRename {
            pages,
            drive: drive.into(),
            id: id.into(),
            name: name.into(),
        };
        self.state.lock().unwrap().renames_after_pages.push(rename);
    }

    pub fn delete_item(&self, drive: &str, id: &str) {
        let mut graph = self.state.lock().unwrap();
        assert!(
            graph.item_mut(drive, id).parent.is_some(),
            "the root of a drive cannot be deleted"
        );
        graph.remove_item(drive, id);
    }

    /// A live item as the fake holds it.
    pub fn item(&self, drive: &str, id: &str) -> Option<DriveItem> {
        let graph = self.state.lock().unwrap();
        graph.live_item(drive, id).cloned()
    }

    /// Posts a message to a channel and returns its id.
    pub fn post_message(&self, team: &str, channel: &str, text: &str) -> String {
        let mut graph = self.state.lock().unwrap();
        let message = graph.new_message(team, channel, None, text);
        let id = message.id.clone();
        graph.messages.insert(id.parse().unwrap(), message);
        id
    }

    /// Replies to a root post and returns the reply's id; the post counts as changed.
    pub fn reply(&self, team: &str, channel: &str, message_id: &str, text: &str) -> String {
        let mut graph = self.state.lock().unwrap();
        graph.root_mut(team, channel, message_id);
        let reply = graph.new_message(team, channel, Some(message_id), text);
        let (id, version, now) = (reply.id.clone(), reply.version, reply.modified);
        let root = graph.root_mut(team, channel, message_id);
        root.replies.push(reply);
        (root.version, root.modified) = (version, now);
        id
    }

    pub fn edit_message(&self, team: &str, channel: &str, id: &str, text: &str) {
        let mut graph = self.state.lock().unwrap();
        graph.change_message(team, channel, id, |m, now| {
            m.text = text.to_string();
            m.edited = Some(now);
        });
    }

    /// Soft-deletes a message: it stays, with `deletedDateTime` set and an empty body.
    pub fn delete_message(&self, team: &str, channel: &str, id: &str) {
        let mut graph = self.state.lock().unwrap();
        graph.change_message(team, channel, id, |m, now| m.deleted = Some(now));
    }

    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.state.lock().unwrap().subscriptions.clone()
    }

    /// Delivers a change notification for `subscription_id` to its notificationUrl as Graph
    /// does, with the subscription's clientState (or `forged_client_state` if Some). Returns
    /// (status, body) of the receiver's answer; status 0 when it could not be reached.
    pub async fn notify(
        &self,
        subscription_id: &str,
        change_type: &str,
        resource_id: &str,
        forged_client_state: Option<&str>,
    ) -> (u16, String) {
        let (url, body) = {
            let graph = self.state.lock().unwrap();
            let s = graph
                .subscription(subscription_id)
                .unwrap_or_else(|| panic!("no subscription {subscription_id}"));
            let (resource, data, version) = match Kind::of(&s.resource) {
                Some(Kind::Messages) => {
                    let message = graph.find_message(resource_id);
                    // A message unknown here is named after the subscribed channel.
                    let parts: Vec<&str> = s.resource.trim_start_matches('/').split('/').collect();
                    let named = |i: usize| parts.get(i).copied().unwrap_or_default();
                    let team = message.map_or(named(1), |m| m.team.as_str());
                    let channel = message.map_or(named(3), |m| m.channel.as_str());
                    let path =
                        format!("teams('{team}')/channels('{channel}')/messages('{resource_id}')");
                    let data = json!({
                        "@odata.type": "#Microsoft.Graph.chatMessage",
                        "@odata.id": path,
                        "@odata.etag": message.map(|m| m.modified.timestamp_millis().to_string()),
                        "id": resource_id
                    });
                    (path, data, message.map_or(0, |m| m.version))
                }
                _ => {
                    let item = graph.drives.values().find_map(|d| d.items.get(resource_id));
                    let drive_path = s.resource.trim_start_matches('/').trim_end_matches("/root");
                    let data = json!({
                        "@odata.type": "#Microsoft.Graph.DriveItem",
                        "@odata.id": format!("{drive_path}/items/{resource_id}"),
                        "id": resource_id
                    });
                    (s.resource.clone(), data, item.map_or(0, |i| i.version))
                }
            };
            let client_state = forged_client_state
                .map(str::to_string)
                .or(s.client_state.clone());
            let notification = json!({
                "id": notification_id(&s.id, change_type, resource_id, version),
                "subscriptionId": s.id,
                "subscriptionExpirationDateTime": ticks(s.expiration),
                "clientState": client_state,
                "changeType": change_type,
                "resource": resource,
                "tenantId": TENANT,
                "resourceData": data
            });
            let mut notification = notification;
            if graph.notifications_without_id {
                notification.as_object_mut().unwrap().remove("id");
            }
            let mut batch = vec![notification];
            if let Some(other) = &graph.extra_subscription_in_batches {
                // Graph batches the notifications of every subscription with one URL: one of
                // a subscription just replaced may still be on its way, or another's ride along.
                batch.push(json!({
                    "id": format!("{other}-last"), "subscriptionId": other,
                    "clientState": "the-other-subscriptions-state",
                    "changeType": change_type, "resource": s.resource, "tenantId": TENANT
                }));
            }
            let body = json!({ "value": batch });
            (s.notification_url.clone(), body.to_string())
        };
        self.deliver(url, body).await
    }

    /// Delivers a lifecycle notification (reauthorizationRequired | subscriptionRemoved |
    /// missed) to the lifecycleNotificationUrl. Returns (status, body). After
    /// `subscriptionRemoved` the subscription is gone, as it is in Graph.
    pub async fn lifecycle(&self, subscription_id: &str, event: &str) -> (u16, String) {
        let (url, body) = {
            let mut graph = self.state.lock().unwrap();
            let s = graph
                .subscription(subscription_id)
                .unwrap_or_else(|| panic!("no subscription {subscription_id}"))
                .clone();
            let url = s.lifecycle_notification_url.unwrap_or_else(|| {
                panic!("subscription {subscription_id} has no lifecycleNotificationUrl")
            });
            let body = json!({"value": [{
                "subscriptionId": s.id,
                "subscriptionExpirationDateTime": ticks(s.expiration),
                "tenantId": TENANT,
                "clientState": s.client_state,
                "lifecycleEvent": event
            }]});
            if event == "subscriptionRemoved" {
                graph.subscriptions.retain(|other| other.id != s.id);
            }
            (url, body.to_string())
        };
        self.deliver(url, body).await
    }

    /// POSTs the previous notification or lifecycle event again, byte for byte, as Graph does
    /// when it retries a delivery.
    pub async fn redeliver_last(&self) -> (u16, String) {
        let last = self.state.lock().unwrap().last_delivery.clone();
        let (url, body) = last.expect("nothing was delivered yet");
        self.deliver(url, body).await
    }

    async fn deliver(&self, url: String, body: String) -> (u16, String) {
        self.state.lock().unwrap().last_delivery = Some((url.clone(), body.clone()));
        let sent = self
            .client
            .post(&url)
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        match sent {
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
        self.state.lock().unwrap().entra.token_refreshes
    }
}
