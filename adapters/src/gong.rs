//! Gong over its REST API v2. Read-only: Gong's API has no update or delete of calls.
//!
//! * Entities: `calls` (`POST /v2/calls/extensive`: each call's metadata with its parties and
//!   topics) and `users` (`GET /v2/users`). Pages follow `records.cursor` (in the body for POST
//!   requests), 100 records each; a query that matches nothing answers 404, read as an empty
//!   page.
//! * Gong has no modified-since filter and no delete feed, and enriches calls hours after they
//!   end. Calls are read by start time (`fromDateTime`): a full sync from `callsSince` (default
//!   90 days back), and each next one from `trailingDays` (default 7) before the last sync
//!   ended, so late enrichments are read again; unchanged calls cost no write, by content hash.
//!   A call deleted at Gong stays in Castiel.
//! * Auth: an access key and secret (HTTP Basic on every request, nothing to refresh), or OAuth
//!   with single-use refresh tokens (stored before use) and the customer's own API host, which
//!   Gong returns at token time (`api_base_url_for_customer`).
//! * Limits: 3 requests a second per integration; 429 with `Retry-After` is waited out, and a
//!   `Retry-After` of an hour or more (the 10,000-a-day limit) stops the job until the next run.
//! * Webhooks from automation rules, at `/api/webhooks/gong?integration={id}`, verified as Gong
//!   signs them: an RS256 JWT in `Authorization`, checked against the rule's public key
//!   (`webhookPublicKey`), unexpired, naming this webhook's URL (`webhookUrl`, or the URL the
//!   delivery came to) and the SHA-256 of the body; or, for rules that put a key in the URL, that
//!   key (`webhook_url_key`) compared in constant time. Anything else is refused.
//!
//! Connection settings: `tokenUrl` (default `https://app.gong.io/oauth2/generate-customer-token`),
//! `apiBaseUrl` (default `https://api.gong.io`), `callsSince` (a date), `trailingDays`,
//! `webhookPublicKey` (PEM), `webhookUrl`. Credentials: `access_key` and `access_key_secret`, or
//! `client_id`, `client_secret` and `refresh_token`; `webhook_url_key` for key-in-URL rules.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, NaiveDate, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::OrGone;
use crate::api::{Api, Dialect, TokenRequest, endpoint};
use crate::oauth::{ClientAuth, Grant};
use crate::{
    Connection, ErrorCode, FetchRequest, Page, Provider, ProviderError, Pull, RateLimiter, Record,
    RouteKey, TokenRefresh, WebhookAnswer, WebhookDelivery, WebhookError, WebhookNotification,
    WebhookRequest, WebhookRoute, Webhooks,
};

pub const CALLS: &str = "calls";
pub const USERS: &str = "users";
const DEFAULT_TOKEN_URL: &str = "https://app.gong.io/oauth2/generate-customer-token";
const DEFAULT_API_BASE: &str = "https://api.gong.io";
const DEFAULT_TRAILING_DAYS: i64 = 7;
const DEFAULT_CALLS_DAYS: i64 = 90;

pub struct Gong {
    api: Api<GongApi>,
}

impl Default for Gong {
    fn default() -> Self {
        Self::new()
    }
}

struct GongApi;

impl Dialect for GongApi {
    fn service(&self) -> &'static str {
        "Gong"
    }

    fn token_request(&self, conn: &Connection) -> TokenRequest {
        TokenRequest {
            url: conn
                .setting("tokenUrl")
                .unwrap_or(DEFAULT_TOKEN_URL)
                .to_string(),
            extra: Vec::new(),
            client_auth: ClientAuth::Basic,
            grant: Some(Grant::RefreshToken),
        }
    }

    fn static_authorization(&self, conn: &Connection) -> Option<String> {
        let key = conn.credentials.get("access_key")?;
        let secret = conn.credentials.get("access_key_secret")?;
        Some(format!(
            "Basic {}",
            STANDARD.encode(format!("{key}:{secret}"))
        ))
    }

    /// Gong's errors are `{"requestId", "errors": ["..."]}`.
    fn error(&self, status: StatusCode, body: &Value) -> ProviderError {
        let message = body["errors"][0].as_str().unwrap_or_default();
        ProviderError::new(
            crate::http::status_code(status),
            format!("{status}: {message}"),
        )
    }
}

/// Where a calls sync stands: its window and the page in it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Window {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
}

impl Gong {
    pub fn new() -> Self {
        Self {
            api: Api::new(GongApi, RateLimiter::new(3)),
        }
    }

    /// The customer's API host: the one Gong named at token time, else the setting.
    fn base(conn: &Connection) -> String {
        conn.credentials
            .get("api_base_url")
            .filter(|_| conn.credentials.get("access_key").is_none())
            .or_else(|| conn.setting("apiBaseUrl"))
            .unwrap_or(DEFAULT_API_BASE)
            .trim_end_matches('/')
            .to_string()
    }

    /// Sends a request; a query that matches nothing (Gong's 404) is `None`.
    async fn send(
        &self,
        conn: &mut Connection,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Option<Value>, ProviderError> {
        if conn.credentials.get("access_key").is_none()
            && !crate::oauth::has_live_token(&conn.credentials, Utc::now())
        {
            // The customer's host comes with the token.
            self.api.refresh(conn).await?;
        }
        let url = endpoint(&Self::base(conn), path, params)?;
        Ok(self
            .api
            .send(conn, method, &url, &[], body)
            .await
            .or_gone()?
            .map(|answer| answer.body))
    }

    async fn calls(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: Option<&[String]>,
    ) -> Result<Page, ProviderError> {
        let now = Utc::now();
        let window = match (&request.page_token, &request.cursor) {
            (Some(token), _) => serde_json::from_str(token).map_err(|_| {
                ProviderError::new(ErrorCode::ValidationError, "unreadable Gong page token")
            })?,
            (None, Some(cursor)) => Window {
                from: DateTime::parse_from_rfc3339(cursor)
                    .map_err(|_| {
                        ProviderError::resync_required(format!("`{cursor}` is not a Gong cursor"))
                    })?
                    .with_timezone(&Utc),
                to: now,
                cursor: None,
            },
            (None, None) => Window {
                from: calls_since(conn, now),
                to: now,
                cursor: None,
            },
        };
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut filter =
            json!({"fromDateTime": stamp(window.from), "toDateTime": stamp(window.to)});
        if let Some(ids) = ids {
            filter = json!({"callIds": ids});
        }
        let mut body = json!({
            "filter": filter,
            "contentSelector": {"exposedFields": {"parties": true, "content": {"topics": true}}}
        });
        if let Some(cursor) = &window.cursor {
            body["cursor"] = json!(cursor);
        }
        let answer = self
            .send(conn, Method::POST, "/v2/calls/extensive", &[], Some(&body))
            .await?
            .unwrap_or(Value::Null);
        let records = answer["calls"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(call_record)
            .collect();
        let next = answer["records"]["cursor"].as_str().map(|c| Window {
            cursor: Some(c.to_string()),
            ..window
        });
        let trailing = trailing_window(conn.setting_f64("trailingDays"));
        Ok(Page {
            unreadable: Vec::new(),
            records,
            next_page: next.as_ref().map(|w| json!(w).to_string()),
            query: Some("POST /v2/calls/extensive by fromDateTime".into()),
            stop_after: None,
            cursor: next
                .is_none()
                .then(|| stamp(cursor_after(&window, trailing))),
        })
    }

    async fn users(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        request.listed_whole()?;
        let params: Vec<(&str, String)> = request
            .page_token
            .iter()
            .map(|cursor| ("cursor", cursor.clone()))
            .collect();
        // The users are listed whole, and a user the listing leaves out is taken for gone: a
        // 404 (Gong's "nothing matches" for calls) is no listing of them.
        let answer = self
            .send(conn, Method::GET, "/v2/users", &params, None)
            .await?
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorCode::ServiceUnavailable,
                    "Gong answered 404 for its users; not read as a workspace without users",
                )
            })?;
        let records = answer["users"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|user| {
                let user = user.as_object()?;
                Some(Record {
                    id: user.get("id")?.as_str()?.to_string(),
                    modified_at: None,
                    deleted: false,
                    fields: user.clone(),
                    listed_until: None,
                })
            })
            .collect();
        Ok(Page {
            unreadable: Vec::new(),
            records,
            next_page: answer["records"]["cursor"].as_str().map(str::to_string),
            query: Some("GET /v2/users".into()),
            stop_after: None,
            cursor: None,
        })
    }
}

fn calls_since(conn: &Connection, now: DateTime<Utc>) -> DateTime<Utc> {
    conn.setting("callsSince")
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .unwrap_or(now - Duration::days(DEFAULT_CALLS_DAYS))
}

/// A call of `/v2/calls/extensive` as a record: its metadata, with its parties and topics.
fn call_record(call: &Value) -> Option<Record> {
    let mut fields = call["metaData"].as_object()?.clone();
    let id = fields.get("id")?.as_str()?.to_string();
    fields.insert("parties".into(), call["parties"].clone());
    fields.insert("topics".into(), call["content"]["topics"].clone());
    Some(Record {
        id,
        modified_at: None,
        deleted: false,
        fields,
        listed_until: None,
    })
}

#[async_trait]
impl Pull for Gong {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        match request.entity.as_str() {
            CALLS => self.calls(conn, request, None).await,
            USERS => self.users(conn, request).await,
            other => Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("Gong syncs `{CALLS}` and `{USERS}`, not `{other}`"),
            )),
        }
    }

    /// Users are listed whole every sync: one that is no longer listed was removed.
    fn lists_everything(&self, entity: &str) -> bool {
        entity == USERS
    }

    fn cursor_time(&self, cursor: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(cursor)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        if request.entity != CALLS {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("Gong reads `{CALLS}` by id, not `{}`", request.entity),
            ));
        }
        let ids: Vec<String> = ids
            .iter()
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
            .cloned()
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut records = Vec::new();
        let mut request = FetchRequest {
            page_token: None,
            cursor: None,
            ..request.clone()
        };
        loop {
            let page = self.calls(conn, &request, Some(&ids)).await?;
            records.extend(page.records);
            match page.next_page {
                Some(next) => request.page_token = Some(next),
                None => return Ok(records),
            }
        }
    }
}

#[async_trait]
impl TokenRefresh for Gong {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        if conn.credentials.get("access_key").is_some() {
            return Ok(None);
        }
        self.api.refresh(conn).await
    }
}

/// The DER bytes of a PEM public key.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    STANDARD.decode(body).ok()
}

/// Checks a Gong JWT (`header.claims.signature`, RS256) against `public_key_pem`, at `now`,
/// for a delivery of `body` to `url`.
fn check_jwt(
    token: &str,
    public_key_pem: &str,
    url: &str,
    body: &str,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the Authorization header is not a JWT".into());
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part.trim_end_matches('='));
    let header: Value = decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or("the JWT header is unreadable")?;
    if header["alg"] != "RS256" {
        return Err("the JWT is not signed with RS256".into());
    }
    let key = pem_der(public_key_pem).ok_or("connection.webhookPublicKey is not a PEM key")?;
    let signature = decode(signature).map_err(|_| "the JWT signature is unreadable")?;
    let signed = &token[..token.rfind('.').unwrap_or(0)];
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        key,
    )
    .verify(signed.as_bytes(), &signature)
    .map_err(|_| "the JWT signature does not verify with the rule's public key")?;
    let claims: Value = decode(claims)
        .ok()
        .and_then(|c| serde_json::from_slice(&c).ok())
        .ok_or("the JWT claims are unreadable")?;
    if claims["exp"]
        .as_i64()
        .is_none_or(|exp| exp < now.timestamp())
    {
        return Err("the JWT has expired".into());
    }
    if claims["webhook_url"].as_str() != Some(url) {
        return Err("the JWT was issued for another webhook URL".into());
    }
    let digest: String = Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if claims["body_sha256"]
        .as_str()
        .is_none_or(|claimed| !claimed.eq_ignore_ascii_case(&digest))
    {
        return Err("the body is not the one the JWT signed".into());
    }
    Ok(())
}

#[async_trait]
impl Webhooks for Gong {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        let id = request.query.get("integration").ok_or_else(|| {
            WebhookError::Malformed(
                "a Gong webhook URL names its integration: /api/webhooks/gong?integration={id}"
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
        let body = request.body.unwrap_or_default();
        if let Some(public_key) = conn.setting("webhookPublicKey") {
            let token = request
                .header("Authorization")
                .map(|t| t.strip_prefix("Bearer ").unwrap_or(t))
                .ok_or_else(|| {
                    WebhookError::Forged(
                        "the Gong delivery is not signed (no Authorization)".into(),
                    )
                })?;
            let url = conn.setting("webhookUrl").unwrap_or(request.url);
            check_jwt(token, public_key, url, body, Utc::now()).map_err(WebhookError::Forged)?;
        } else if let Some(kept) = conn.credentials.get("webhook_url_key") {
            let given = request
                .query
                .get("key")
                .map(String::as_str)
                .unwrap_or_default();
            if !crate::same_secret(given, kept) {
                return Err(WebhookError::Forged("the URL's key is wrong".into()));
            }
        } else {
            return Err(WebhookError::Forged(
                "the integration has no webhookPublicKey or webhook_url_key to check deliveries with"
                    .into(),
            ));
        }
        let payload: Value = serde_json::from_str(body)
            .map_err(|_| WebhookError::Malformed("a Gong delivery is JSON".into()))?;
        let call = payload["callData"]["metaData"]["id"]
            .as_str()
            .ok_or_else(|| WebhookError::Malformed("the delivery names no call".into()))?;
        let digest: String = Sha256::digest(body.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let notifications = if payload["isTest"] == true {
            Vec::new()
        } else {
            vec![WebhookNotification::Records {
                id: format!("gong-{call}-{digest}"),
                entity: CALLS.into(),
                record_ids: vec![call.to_string()],
            }]
        };
        Ok(WebhookDelivery {
            notifications,
            answer: WebhookAnswer::new(200, "application/json", "{}"),
        })
    }
}

impl Provider for Gong {
    fn name(&self) -> &'static str {
        "gong"
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        for name in ["tokenUrl", "apiBaseUrl", "webhookUrl"] {
            crate::http::check_url(settings, name)?;
        }
        if let Some(since) = settings.get("callsSince")
            && since
                .as_str()
                .is_none_or(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err())
        {
            return Err("connection.callsSince must be a date (2026-01-31)".into());
        }
        if settings
            .get("trailingDays")
            .is_some_and(|d| d.as_f64().is_none_or(|d| !(0.0..=90.0).contains(&d)))
        {
            return Err("connection.trailingDays must be a number of days from 0 to 90".into());
        }
        if let Some(key) = settings.get("webhookPublicKey")
            && key.as_str().and_then(pem_der).is_none()
        {
            return Err("connection.webhookPublicKey must be the rule's PEM public key".into());
        }
        Ok(())
    }

    fn token_refresh(&self) -> Option<&dyn TokenRefresh> {
        Some(self)
    }

    fn webhooks(&self) -> Option<&dyn Webhooks> {
        Some(self)
    }
}

/// Where the sync after a window read to its end begins: where the window ended, not when its
/// last page came (a read may wait a day for the daily limit, and calls started meanwhile are in
/// no window before the next), less the trailing days read again since calls are enriched late.
fn cursor_after(window: &Window, trailing: Duration) -> DateTime<Utc> {
    window.to - trailing
}

/// How far back each sync reads calls again, from the `trailingDays` setting: a part of a
/// day counts (half a day is twelve hours, not none).
fn trailing_window(days: Option<f64>) -> Duration {
    days.map_or(Duration::days(DEFAULT_TRAILING_DAYS), |d| {
        Duration::seconds((d * 86_400.0).round() as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_sync_reads_on_from_where_the_window_ended() {
        let to = Utc::now() - Duration::hours(20);
        let window = Window {
            from: to - Duration::days(1),
            to,
            cursor: None,
        };
        assert_eq!(cursor_after(&window, Duration::zero()), to);
        assert_eq!(
            cursor_after(&window, trailing_window(Some(0.5))),
            to - Duration::hours(12)
        );
    }

    #[test]
    fn a_trailing_window_of_part_of_a_day_is_kept_not_cut_to_none() {
        assert_eq!(trailing_window(Some(0.5)), Duration::hours(12));
        assert_eq!(trailing_window(Some(2.0)), Duration::days(2));
        assert_eq!(trailing_window(Some(0.0)), Duration::zero());
        assert_eq!(trailing_window(None), Duration::days(7));
    }

    #[test]
    fn anything_but_a_well_formed_rs256_jwt_is_refused_with_a_reason() {
        let now = Utc::now();
        let pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----";
        for (token, reason) in [
            ("not-a-jwt", "not a JWT"),
            ("a.b.c.d", "not a JWT"),
            (
                &format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
                    URL_SAFE_NO_PAD.encode(b"{}"),
                    ""
                ),
                "RS256",
            ),
            (
                &format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
                    URL_SAFE_NO_PAD.encode(b"{}"),
                    URL_SAFE_NO_PAD.encode(b"sig")
                ),
                "does not verify",
            ),
        ] {
            let err = check_jwt(token, pem, "https://x/api/webhooks/gong", "{}", now).unwrap_err();
            assert!(err.contains(reason), "{token}: {err}");
        }
    }

    #[test]
    fn extensive_calls_become_records_with_their_parties_and_topics() {
        let call = json!({"metaData": {"id": "7782342274025937895", "title": "Discovery"},
                          "parties": [{"name": "Ann"}], "content": {"topics": [{"name": "Pricing"}]}});
        let record = call_record(&call).unwrap();
        assert_eq!(record.id, "7782342274025937895");
        assert_eq!(record.fields["title"], "Discovery");
        assert_eq!(record.fields["topics"][0]["name"], "Pricing");
    }
}
