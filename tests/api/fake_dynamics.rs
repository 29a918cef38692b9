//! The Dataverse Web API (Dynamics 365) on loopback, reproducing the wire facts the adapter
//! depends on: the Microsoft identity token endpoint (shared with the Graph fake), entity sets
//! under `/api/data/v9.2` read in primary-key order, `Prefer: odata.maxpagesize` (at most 5,000,
//! echoed in `Preference-Applied`) with an opaque `$skiptoken` paging cookie in
//! `@odata.nextLink`, change tracking (`Prefer: odata.track-changes` ends a full read with an
//! `@odata.deltaLink` whose token is the version when the read began; a delta lists changed rows
//! and `$deletedEntity` entries keyed by `id`), the 400s for `$skip`, for `$filter` with change
//! tracking and for an expired version stamp, weak etags and `modifiedon` on every row,
//! `modifiedon gt` and `ge`, `Microsoft.Dynamics.CRM.In` and `column eq 'value'` filters (and
//! two of them joined by `and`), writes (POST 204 with `OData-EntityId`, PATCH as an upsert
//! under `If-Match`/`If-None-Match`, DELETE), errors in the
//! `{"error":{"code","message"}}` envelope, 401 with an empty body and a `WWW-Authenticate`
//! challenge, 429 with `Retry-After` and 503. `webhook()` builds a delivery as a registered step
//! sends it: the `x-ms-dynamics-*` headers and a `RemoteExecutionContext` body.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::fake_entra::{Entra, TENANT, delegated_credentials};

pub const API: &str = "/api/data/v9.2";
pub const ORGANIZATION_ID: &str = "4ef5b371-5a8b-4c3e-9d1f-2a6b7c8d9e0f";
const BUSINESS_UNIT_ID: &str = "9b2c4d6e-8f0a-4b1c-8d3e-5f7a9b1c3d5e";
const USER_ID: &str = "1a3b5c7d-9e0f-4a2b-8c4d-6e8f0a2b4c6d";
/// The most rows a page holds, and what it holds when the client asks for none or for more.
const MAX_PAGE: usize = 5000;

/// A row, or the tombstone of a deleted one, with the change-tracking version of its last change.
pub struct Row {
    pub version: u64,
    pub fields: Option<Map<String, Value>>,
}

#[derive(Default)]
pub struct Dataverse {
    pub entra: Entra,
    /// Rows per entity set by primary key, so reads come out in key order. Deleted rows stay as
    /// tombstones: a delta must still report them.
    pub tables: HashMap<String, BTreeMap<String, Row>>,
    /// The change-tracking version: every write bumps it and stamps it on the row written.
    pub version: u64,
    /// The next N data requests answer 429 with `Retry-After` of this many seconds.
    pub throttle: Option<(usize, u64)>,
    /// The throttle starts only after this many more data requests (a sync stopped mid-way).
    pub throttle_after: Option<usize>,
    /// The next N data requests answer 503.
    pub unavailable: usize,
    /// Any request with a `$deltatoken` answers the expired-version-stamp error.
    pub expire_delta_tokens: bool,
    /// Entity sets the application user's security role may not read: their requests answer
    /// 403 PrivilegeDenied.
    pub forbidden: Vec<String>,
    /// The next write is made, then its answer waits until the test releases it.
    pub hold_next_write: bool,
    /// The next token request waits, unanswered, until the test releases it (`held` is
    /// notified when it comes): a token endpoint that hangs.
    pub hold_next_token: bool,
    /// The next write is made, and its answer lost on the way back: the gateway in front of
    /// the environment answers 504 instead.
    pub lose_next_write_answer: bool,
    /// Every data request's method, path and decoded query, in order.
    pub requests: Vec<String>,
    url: String,
}

#[derive(Clone)]
pub struct FakeDynamics {
    /// The environment URL, the host a client composes `{url}/api/data/v9.2/...` from.
    pub url: String,
    pub state: Arc<Mutex<Dataverse>>,
    /// With `hold_next_write`, the next write is made and its answer waits: `held` is notified
    /// once it is made, and the answer goes when `release` is.
    pub held: Arc<tokio::sync::Notify>,
    pub release: Arc<tokio::sync::Notify>,
}

/// `accounts` → `account`: one trailing `s` is enough for the tables tests use.
fn logical_name(set: &str) -> &str {
    set.strip_suffix('s').unwrap_or(set)
}

/// An activity table's key is `activityid`, as for every table that holds activities.
fn primary_key(set: &str) -> String {
    match logical_name(set) {
        "email" | "task" | "phonecall" | "appointment" => "activityid".into(),
        logical => format!("{logical}id"),
    }
}

fn timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap();
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn not_found(set: &str, id: &str) -> Response {
    let message = format!("{} With Id = {id} Does Not Exist", logical_name(set));
    error(404, "0x80040217", &message)
}

fn expired() -> Response {
    error(
        400,
        "0x80044352",
        "Version stamp associated with the client has expired. Please perform a full sync.",
    )
}

/// Percent-encodes all but unreserved characters, in the lowercase hex of Dataverse's tokens.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `accounts(49b0…)` → (`accounts`, Some(`49b0…`)): axum cannot route on the parentheses.
fn split(segment: &str) -> (&str, Option<&str>) {
    match segment.strip_suffix(')').and_then(|s| s.split_once('(')) {
        Some((set, key)) => (set, Some(key.trim_matches('\''))),
        None => (segment, None),
    }
}

/// A row as the API returns it: its etag, the selected columns (all without `$select`) and the
/// primary key, which Dataverse always adds.
fn render(
    set: &str,
    version: u64,
    fields: &Map<String, Value>,
    select: Option<&str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("@odata.etag".into(), json!(format!("W/\"{version}\"")));
    let Some(select) = select else {
        out.extend(fields.clone());
        return out;
    };
    let pk = primary_key(set);
    for column in select.split(',').map(str::trim).chain([pk.as_str()]) {
        out.insert(
            column.into(),
            fields.get(column).cloned().unwrap_or(Value::Null),
        );
    }
    out
}

/// Dataverse serializes the execution context with the WCF data-contract serializer, which
/// writes dates as `/Date(ms)/`.
fn wcf_value(value: &Value) -> Value {
    match value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    {
        Some(t) => json!(format!("/Date({})/", t.timestamp_millis())),
        None => value.clone(),
    }
}

/// A write's body: a JSON object without annotations or `modifiedon`, which the server owns.
fn payload(body: &[u8]) -> Option<Map<String, Value>> {
    let Ok(Value::Object(mut fields)) = serde_json::from_slice(body) else {
        return None;
    };
    fields.retain(|k, _| !k.starts_with('@') && k != "modifiedon");
    Some(fields)
}

fn bad_payload() -> Response {
    let message = "Error identified in Payload provided by the user for Entity";
    error(400, "0x80048d19", message)
}

/// The preferences of a request; several may share one `Prefer` header, comma-separated.
#[derive(Default)]
struct Prefer {
    /// The page size asked for, when it is one Dataverse honours.
    page_size: Option<usize>,
    track_changes: bool,
    representation: bool,
}

fn prefer(headers: &HeaderMap) -> Prefer {
    let mut prefer = Prefer::default();
    let values = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok());
    for preference in values.flat_map(|v| v.split(',')).map(str::trim) {
        match preference.split_once('=') {
            Some(("odata.maxpagesize", n)) => {
                prefer.page_size = n.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n));
            }
            Some(("return", "representation")) => prefer.representation = true,
            None if preference == "odata.track-changes" => prefer.track_changes = true,
            _ => {}
        }
    }
    prefer
}

/// Where an enumeration stands, carried from page to page in the `$skiptoken` paging cookie:
/// the page number, the last key served, the version when the enumeration began (the next delta
/// token, so writes made while paging show up in the next delta), the base version of a delta,
/// and whether change tracking was asked for.
struct Cursor {
    page: u64,
    last: Option<String>,
    start: u64,
    since: Option<u64>,
    tracking: bool,
}

impl Cursor {
    fn parse(cookie: &str) -> Option<Self> {
        let attr = |name: &str| {
            cookie
                .split_once(&format!(" {name}=\""))?
                .1
                .split('"')
                .next()
        };
        let number = |name: &str| attr(name)?.parse().ok();
        Some(Self {
            page: number("pagenumber")?,
            last: attr("lastid").map(str::to_string),
            start: number("start")?,
            since: number("since"),
            tracking: attr("istracking") == Some("True"),
        })
    }

    /// The cookie for the page after the one that ended at `last`.
    fn next(&self, last: &str) -> String {
        let since = self
            .since
            .map(|t| format!(" since=\"{t}\""))
            .unwrap_or_default();
        let tracking = if self.tracking { "True" } else { "False" };
        format!(
            "<cookie pagenumber=\"{}\" lastid=\"{last}\" start=\"{}\"{since} istracking=\"{tracking}\" />",
            self.page + 1,
            self.start
        )
    }
}

/// The `$filter` forms the adapter sends without change tracking; any other matches every row.
enum Filter {
    All,
    ModifiedAfter(DateTime<Utc>),
    ModifiedSince(DateTime<Utc>),
    In(String, Vec<String>),
    Eq(String, String),
    /// `a and (b)`: a poll's time with the integration's filters.
    Both(Box<Filter>, Box<Filter>),
}

impl Filter {
    fn parse(filter: &str) -> Self {
        let filter = match filter.trim().strip_prefix('(') {
            Some(inner) if !filter.contains(" and ") => inner.strip_suffix(')').unwrap_or(inner),
            _ => filter,
        };
        if let Some((first, rest)) = filter.split_once(" and ") {
            let part = |p: &str| {
                Box::new(Self::parse(
                    p.trim().trim_start_matches('(').trim_end_matches(')'),
                ))
            };
            return Self::Both(part(first), part(rest));
        }
        if let Some(t) = filter.trim().strip_prefix("modifiedon gt ")
            && let Ok(t) = DateTime::parse_from_rfc3339(t.trim())
        {
            return Self::ModifiedAfter(t.to_utc());
        }
        if let Some(t) = filter.trim().strip_prefix("modifiedon ge ")
            && let Ok(t) = DateTime::parse_from_rfc3339(t.trim())
        {
            return Self::ModifiedSince(t.to_utc());
        }
        // Microsoft.Dynamics.CRM.In(PropertyName='accountid',PropertyValues=['…','…'])
        if let Some(args) = filter.trim().strip_prefix("Microsoft.Dynamics.CRM.In(")
            && let Some((_, property)) = args.split_once("PropertyName='")
            && let Some((property, _)) = property.split_once('\'')
            && let Some((_, values)) = args.split_once("PropertyValues=[")
            && let Some((values, _)) = values.split_once(']')
        {
            let values = values
                .split(',')
                .map(|v| v.trim().trim_matches('\'').to_string());
            return Self::In(property.to_string(), values.collect());
        }
        // castiel_id eq 'shard-1' (a quote inside the literal doubled)
        if let Some((property, literal)) = filter.trim().split_once(" eq '")
            && let Some(literal) = literal.strip_suffix('\'')
            && !property.contains(' ')
        {
            return Self::Eq(property.to_string(), literal.replace("''", "'"));
        }
        Self::All
    }

    fn matches(&self, fields: &Map<String, Value>) -> bool {
        let text = |name: &str| fields.get(name).and_then(Value::as_str);
        match self {
            Self::All => true,
            Self::ModifiedAfter(after) => text("modifiedon")
                .and_then(|m| DateTime::parse_from_rfc3339(m).ok())
                .is_some_and(|m| m.to_utc() > *after),
            Self::ModifiedSince(since) => text("modifiedon")
                .and_then(|m| DateTime::parse_from_rfc3339(m).ok())
                .is_some_and(|m| m.to_utc() >= *since),
            Self::Both(a, b) => a.matches(fields) && b.matches(fields),
            // Guids compare without regard to case, as they do in Dataverse.
            Self::In(property, values) => {
                text(property).is_some_and(|v| values.iter().any(|w| w.eq_ignore_ascii_case(v)))
            }
            Self::Eq(property, value) => text(property) == Some(value.as_str()),
        }
    }
}

impl Dataverse {
    /// Writes `fields` over the row, creating it, and stamps a new version and `modifiedon`
    /// (kept when the fields carry one, so tests can date rows).
    fn write(&mut self, set: &str, id: &str, mut fields: Map<String, Value>) {
        self.version += 1;
        let modified = fields
            .remove("modifiedon")
            .unwrap_or_else(|| json!(timestamp(Utc::now())));
        fields.insert("modifiedon".into(), modified);
        fields.insert(primary_key(set), json!(id));
        let table = self.tables.entry(set.to_string()).or_default();
        let row = table.entry(id.to_string()).or_insert(Row {
            version: 0,
            fields: None,
        });
        row.version = self.version;
        row.fields.get_or_insert_with(Map::new).extend(fields);
    }

    /// Adds a row from a test, with a new guid when it carries no primary key.
    fn insert(&mut self, set: &str, fields: Value) -> String {
        let Value::Object(fields) = fields else {
            panic!("a row is a JSON object")
        };
        let id = match fields.get(&primary_key(set)).and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => Uuid::new_v4().to_string(),
        };
        self.write(set, &id, fields);
        id
    }

    /// Turns a live row into a tombstone; false when there was none.
    fn remove(&mut self, set: &str, id: &str) -> bool {
        let row = self.tables.get_mut(set).and_then(|t| t.get_mut(id));
        let Some(row) = row.filter(|r| r.fields.is_some()) else {
            return false;
        };
        self.version += 1;
        row.version = self.version;
        row.fields = None;
        true
    }

    fn live(&self, set: &str, id: &str) -> Option<(u64, &Map<String, Value>)> {
        let row = self.tables.get(set)?.get(id)?;
        Some((row.version, row.fields.as_ref()?))
    }

    /// Logs a data request, then answers it instead of the route when the token is not admitted
    /// or a knob says so, checked in that order.
    fn refuse(
        &mut self,
        method: &str,
        segment: &str,
        params: &[(String, String)],
        headers: &HeaderMap,
    ) -> Option<Response> {
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        self.requests
            .push(format!("{method} {API}/{segment}{query}"));
        if !self.entra.admits(headers) {
            let challenge = format!(
                "Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/authorize, resource_id={}",
                self.url
            );
            return Some(
                (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response(),
            );
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
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.";
            let mut response = error(429, "0x80072322", message);
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
            return Some(response);
        }
        if self.unavailable > 0 {
            self.unavailable -= 1;
            return Some(error(503, "0x80040216", "An unexpected error occurred."));
        }
        if let Some(set) = self
            .forbidden
            .iter()
            .find(|f| split(segment).0 == f.as_str())
        {
            let message = format!(
                "Principal user (Id={USER_ID}, type=8) is missing prvRead privilege on {set}"
            );
            return Some(error(403, "0x80040220", &message));
        }
        if headers.get("odata-version").is_some_and(|v| v != "4.0") {
            return Some(error(400, "", "The OData-Version header must be 4.0."));
        }
        None
    }

    /// A page of an entity set, or of its changes since a delta token, in primary-key order. A
    /// row created and deleted since the token shows only as deleted, like any tombstone.
    fn list(&mut self, set: &str, params: &[(String, String)], prefer: &Prefer) -> Response {
        let (select, filter) = (param(params, "$select"), param(params, "$filter"));
        if param(params, "$skip").is_some() {
            return error(
                400,
                "0x80060888",
                "The query parameter $skip is not supported",
            );
        }
        let delta_token = param(params, "$deltatoken");
        if delta_token.is_some() && self.expire_delta_tokens {
            return expired();
        }
        let mut cursor = match param(params, "$skiptoken") {
            Some(cookie) => match Cursor::parse(cookie) {
                Some(cursor) => cursor,
                None => return error(400, "0x80060888", "The $skiptoken is not valid."),
            },
            None => Cursor {
                page: 1,
                last: None,
                start: self.version,
                // The token reads `919042!08/22/2026 08:10:44`: the version, then when it was cut.
                since: match delta_token.map(|t| t.split('!').next().unwrap_or_default().parse()) {
                    None => None,
                    Some(Ok(version)) => Some(version),
                    Some(Err(_)) => return expired(),
                },
                tracking: false,
            },
        };
        cursor.tracking |= prefer.track_changes || cursor.since.is_some();
        if filter.is_some() && cursor.tracking {
            let message =
                "The \"$filter\" query parameter isn't supported when Change Tracking is enabled.";
            return error(400, "0x80060888", message);
        }
        let wanted = filter.map_or(Filter::All, Filter::parse);
        let url = &self.url;
        let table = self.tables.entry(set.to_string()).or_default();
        let from = cursor
            .last
            .clone()
            .map_or(Bound::Unbounded, Bound::Excluded);
        let mut matching = table
            .range::<String, _>((from, Bound::Unbounded))
            .filter(|(_, row)| match cursor.since {
                Some(since) => row.version > since,
                None => row.fields.as_ref().is_some_and(|f| wanted.matches(f)),
            });
        let size = prefer.page_size.unwrap_or(MAX_PAGE);
        let page: Vec<(&String, &Row)> = matching.by_ref().take(size).collect();
        let more = matching.next().is_some();
        let value: Vec<Value> = page
            .iter()
            .map(|(id, row)| match &row.fields {
                Some(fields) => Value::Object(render(set, row.version, fields, select)),
                None => json!({
                    "@odata.context": format!("{url}{API}/$metadata#{set}/$deletedEntity"),
                    "id": id, "reason": "deleted"
                }),
            })
            .collect();
        let columns = select.map(|s| format!("({s})")).unwrap_or_default();
        let delta = if cursor.since.is_some() {
            "/$delta"
        } else {
            ""
        };
        let context = format!("{url}{API}/$metadata#{set}{columns}{delta}");
        let mut body = json!({"@odata.context": context, "value": value});
        let select = select.map(|s| format!("$select={s}&")).unwrap_or_default();
        let link = format!("{url}{API}/{set}?{select}");
        if let (true, Some((last, _))) = (more, page.last()) {
            let filter = filter
                .map(|f| format!("$filter={}&", encode(f)))
                .unwrap_or_default();
            let skiptoken = encode(&cursor.next(last));
            body["@odata.nextLink"] = json!(format!("{link}{filter}$skiptoken={skiptoken}"));
        } else if cursor.tracking {
            let token = format!(
                "{}!{}",
                cursor.start,
                Utc::now().format("%m/%d/%Y %H:%M:%S")
            );
            body["@odata.deltaLink"] = json!(format!("{link}$deltatoken={}", encode(&token)));
        }
        let mut response = Json(body).into_response();
        let page_size = prefer.page_size.map(|n| format!("odata.maxpagesize={n}"));
        let tracks = prefer
            .track_changes
            .then(|| "odata.track-changes".to_string());
        for applied in page_size.into_iter().chain(tracks) {
            let applied = applied.parse().unwrap();
            response.headers_mut().append("preference-applied", applied);
        }
        response
    }

    fn point_read(&self, set: &str, id: &str, select: Option<&str>) -> Response {
        let Some((version, fields)) = self.live(set, id) else {
            return not_found(set, id);
        };
        let mut row = render(set, version, fields, select);
        let columns = select.map(|s| format!("({s})")).unwrap_or_default();
        let context = format!("{}{API}/$metadata#{set}{columns}/$entity", self.url);
        row.insert("@odata.context".into(), json!(context));
        Json(row).into_response()
    }

    fn create(&mut self, set: &str, body: &[u8], prefer: &Prefer) -> Response {
        let Some(fields) = payload(body) else {
            return bad_payload();
        };
        let id = match fields.get(&primary_key(set)).and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => Uuid::new_v4().to_string(),
        };
        if self.live(set, &id).is_some() {
            return duplicate();
        }
        self.write(set, &id, fields);
        self.written(set, &id, StatusCode::CREATED, prefer)
    }

    /// PATCH creates a missing row unless `If-Match` says it must exist.
    fn upsert(
        &mut self,
        set: &str,
        id: &str,
        headers: &HeaderMap,
        body: &[u8],
        prefer: &Prefer,
    ) -> Response {
        let current = self.live(set, id).map(|(version, _)| version);
        if let Some(answer) = if_match(headers, set, id, current) {
            return answer;
        }
        if current.is_some() && headers.get("if-none-match").is_some_and(|v| v == "*") {
            return duplicate();
        }
        let Some(fields) = payload(body) else {
            return bad_payload();
        };
        self.write(set, id, fields);
        self.written(set, id, StatusCode::OK, prefer)
    }

    fn delete(&mut self, set: &str, id: &str, headers: &HeaderMap) -> Response {
        let current = self.live(set, id).map(|(version, _)| version);
        if let Some(answer) = if_match(headers, set, id, current) {
            return answer;
        }
        if !self.remove(set, id) {
            return not_found(set, id);
        }
        StatusCode::NO_CONTENT.into_response()
    }

    /// The answer to a successful create or update: 204 with `OData-EntityId`, or the row itself
    /// under `Prefer: return=representation`.
    fn written(&self, set: &str, id: &str, status: StatusCode, prefer: &Prefer) -> Response {
        let mut response = match self.live(set, id) {
            Some((version, fields)) if prefer.representation => {
                let mut row = render(set, version, fields, None);
                let context = format!("{}{API}/$metadata#{set}/$entity", self.url);
                row.insert("@odata.context".into(), json!(context));
                (status, Json(row)).into_response()
            }
            _ => StatusCode::NO_CONTENT.into_response(),
        };
        let entity_id = format!("{}{API}/{set}({id})", self.url);
        response
            .headers_mut()
            .insert("odata-entityid", entity_id.parse().unwrap());
        response
    }
}

/// `If-Match`: `*` forbids creating, an etag forbids overwriting any other version.
fn if_match(headers: &HeaderMap, set: &str, id: &str, current: Option<u64>) -> Option<Response> {
    let tag = headers.get("if-match")?.to_str().ok()?.trim();
    match current {
        None => Some(not_found(set, id)),
        Some(version) if tag != "*" && tag != format!("W/\"{version}\"") => Some(error(
            412,
            "0x80060882",
            "The version of the existing record doesn't match the RowVersion property provided.",
        )),
        Some(_) => None,
    }
}

fn duplicate() -> Response {
    error(
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    )
}

async fn token(
    State(fake): State<FakeDynamics>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let hold = std::mem::take(&mut fake.state.lock().unwrap().hold_next_token);
    if hold {
        let released = fake.release.notified();
        fake.held.notify_one();
        released.await;
    }
    fake.state.lock().unwrap().entra.token(&tenant, &form)
}

/// Every data route: `{API}/{set}` and `{API}/{set}({id})`, under any method.
async fn data(
    State(fake): State<FakeDynamics>,
    method: Method,
    Path(segment): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (answer, hold) = {
        let mut dv = fake.state.lock().unwrap();
        if let Some(answer) = dv.refuse(method.as_str(), &segment, &params, &headers) {
            return answer;
        }
        let prefer = prefer(&headers);
        let writes = method != Method::GET;
        let answer = match (method, split(&segment)) {
            (Method::GET, (set, None)) => dv.list(set, &params, &prefer),
            (Method::GET, (set, Some(id))) => dv.point_read(set, id, param(&params, "$select")),
            (Method::POST, (set, None)) => dv.create(set, &body, &prefer),
            (Method::PATCH, (set, Some(id))) => dv.upsert(set, id, &headers, &body, &prefer),
            (Method::DELETE, (set, Some(id))) => dv.delete(set, id, &headers),
            _ => error(
                405,
                "0x80060888",
                "The requested method is not supported on this resource.",
            ),
        };
        if writes && std::mem::take(&mut dv.lose_next_write_answer) {
            return (StatusCode::GATEWAY_TIMEOUT, "Gateway Timeout").into_response();
        }
        (answer, writes && std::mem::take(&mut dv.hold_next_write))
    };
    if hold {
        fake.held.notify_one();
        fake.release.notified().await;
    }
    answer
}

impl FakeDynamics {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let dataverse = Dataverse {
            url: url.clone(),
            ..Dataverse::default()
        };
        let fake = Self {
            url,
            state: Arc::new(Mutex::new(dataverse)),
            held: Arc::new(tokio::sync::Notify::new()),
            release: Arc::new(tokio::sync::Notify::new()),
        };
        let router = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route(&format!("{API}/{{segment}}"), any(data))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        fake
    }

    /// The credentials an operator stores for a delegated connection to this environment.
    pub fn credentials(&self) -> Value {
        delegated_credentials()
    }

    pub fn token_url(&self) -> String {
        format!("{}/{TENANT}/oauth2/v2.0/token", self.url)
    }

    /// Adds (or overwrites field by field) a row and returns its id.
    pub fn add(&self, entity_set: &str, fields: Value) -> String {
        self.state.lock().unwrap().insert(entity_set, fields)
    }

    /// Adds many rows under one lock.
    pub fn load(&self, entity_set: &str, rows: impl IntoIterator<Item = Value>) {
        let mut dv = self.state.lock().unwrap();
        for row in rows {
            dv.insert(entity_set, row);
        }
    }

    /// Changes a row as a user would, creating it if missing.
    pub fn update(&self, entity_set: &str, id: &str, fields: Value) {
        let Value::Object(fields) = fields else {
            panic!("fields are a JSON object")
        };
        self.state.lock().unwrap().write(entity_set, id, fields);
    }

    pub fn delete(&self, entity_set: &str, id: &str) {
        self.state.lock().unwrap().remove(entity_set, id);
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The rows of `entity_set` that exist (not deleted), with their columns.
    pub fn rows(&self, entity_set: &str) -> Vec<Map<String, Value>> {
        self.state
            .lock()
            .unwrap()
            .tables
            .get(entity_set)
            .map(|t| t.values().filter_map(|r| r.fields.clone()).collect())
            .unwrap_or_default()
    }

    pub fn token_refreshes(&self) -> usize {
        self.state.lock().unwrap().entra.token_refreshes
    }

    /// A webhook delivery as Dataverse sends it for a registered step: (headers, body). The body
    /// is a `RemoteExecutionContext`; Create and Update carry the row's current attributes, Delete
    /// an `EntityReference`. The endpoint's key is left for the test to add.
    pub fn webhook(
        &self,
        message: &str,
        entity_logical_name: &str,
        id: &str,
    ) -> (Vec<(String, String)>, String) {
        let request_id = Uuid::new_v4().to_string();
        self.webhook_in_request(message, entity_logical_name, id, &request_id)
    }

    /// [`Self::webhook`] of one row of the request `request_id`: a request that changes many
    /// rows (`UpdateMultiple`, a cascade) runs the step once a row, each with its id.
    pub fn webhook_in_request(
        &self,
        message: &str,
        entity_logical_name: &str,
        id: &str,
        request_id: &str,
    ) -> (Vec<(String, String)>, String) {
        let set = format!("{entity_logical_name}s");
        let target = if message == "Delete" {
            json!({"__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
                   "Id": id, "KeyAttributes": [], "LogicalName": entity_logical_name, "Name": null, "RowVersion": null})
        } else {
            let dv = self.state.lock().unwrap();
            let (version, attributes): (Value, Vec<Value>) = match dv.live(&set, id) {
                Some((version, fields)) => (
                    json!(version.to_string()),
                    fields
                        .iter()
                        .map(|(k, v)| json!({"key": k, "value": wcf_value(v)}))
                        .collect(),
                ),
                None => (Value::Null, Vec::new()),
            };
            json!({"__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
                   "Attributes": attributes, "EntityState": null, "FormattedValues": [], "Id": id,
                   "KeyAttributes": [], "LogicalName": entity_logical_name, "RelatedEntities": [],
                   "RowVersion": version})
        };
        let outputs = if message == "Create" {
            json!([{"key": "id", "value": id}])
        } else {
            json!([])
        };
        let request_id = request_id.to_string();
        let correlation_id = Uuid::new_v4().to_string();
        let body = json!({
            "BusinessUnitId": BUSINESS_UNIT_ID, "CorrelationId": correlation_id, "Depth": 1,
            "InitiatingUserId": USER_ID, "InputParameters": [{"key": "Target", "value": target}],
            "IsExecutingOffline": false, "IsInTransaction": false, "IsOfflinePlayback": false,
            "IsolationMode": 1, "MessageName": message, "Mode": 1,
            "OperationCreatedOn": format!("/Date({})/", Utc::now().timestamp_millis()),
            "OperationId": Uuid::new_v4().to_string(), "OrganizationId": ORGANIZATION_ID,
            "OrganizationName": "fake", "OutputParameters": outputs, "ParentContext": null,
            "PostEntityImages": [], "PreEntityImages": [], "PrimaryEntityId": id,
            "PrimaryEntityName": entity_logical_name, "RequestId": request_id,
            "SecondaryEntityName": "none", "SharedVariables": [], "Stage": 40, "UserId": USER_ID
        });
        let host = self.url.trim_start_matches("http://").to_string();
        let headers = [
            ("x-request-id", request_id),
            ("x-ms-dynamics-organization", host),
            ("x-ms-dynamics-entity-name", entity_logical_name.to_string()),
            ("x-ms-dynamics-request-name", message.to_string()),
            ("x-ms-correlation-request-id", correlation_id),
            ("content-type", "application/json".to_string()),
        ];
        let headers = headers.into_iter().map(|(k, v)| (k.to_string(), v));
        (headers.collect(), body.to_string())
    }
}
