//! Salesforce over its REST API.
//!
//! * Records come from SOQL (`/query`), `SystemModstamp >= cursor` for incremental syncs,
//!   ordered by `SystemModstamp, Id`, paged by `nextRecordsUrl`.
//! * Deletions come from `/sobjects/{entity}/deleted/`; when the recycle bin no longer reaches
//!   back to the cursor (`earliestDateAvailable` is later), only a full resync can find them.
//! * Tokens: the access token expires silently (the token response has no `expires_in`), so a
//!   401 `INVALID_SESSION_ID` refreshes it and retries the request once. The latest
//!   `instance_url` and, with rotation enabled, the new refresh token are kept.
//! * Limits: at most 25 requests per second per integration; every answer carries
//!   `Sforce-Limit-Info: api-usage=used/allowed`, and the job stops (partial, resumed next run)
//!   once usage reaches the integration's share of the daily allocation; a 403
//!   `REQUEST_LIMIT_EXCEEDED` stops it the same way.
//! * Webhooks: Outbound Messages ([`outbound_messages`]), identified by OrganizationId.
//!
//! Connection settings (`structuredData.connection`): `loginHost` (`production`, `sandbox`, or
//! a My Domain URL), `apiVersion` (default `v62.0`), `organizationId`, `maxApiUsage` (share of
//! the daily allocation a sync may use, default 0.8). Credentials: `refresh_token`,
//! `client_id`, optional `client_secret`, and the engine-kept `access_token` and `instance_url`.

pub mod outbound_messages;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value};

use crate::{
    Connection, Deleted, ErrorCode, FetchRequest, Page, Provider, ProviderError, RateLimiter,
    Record, WebhookDelivery, WebhookError, WebhookRequest,
};

const DEFAULT_API_VERSION: &str = "v62.0";
const DEFAULT_MAX_API_USAGE: f64 = 0.8;
/// Salesforce keeps deletions for 15 days at most.
const DELETED_WINDOW_DAYS: i64 = 15;

pub struct Salesforce {
    /// Built on first use: loading the platform's root certificates costs milliseconds that a
    /// cold start of the handler should not pay before it has any Salesforce work.
    http: std::sync::OnceLock<reqwest::Client>,
    limiter: RateLimiter,
}

impl Default for Salesforce {
    fn default() -> Self {
        Self::new()
    }
}

impl Salesforce {
    pub fn new() -> Self {
        Self {
            http: std::sync::OnceLock::new(),
            limiter: RateLimiter::new(25),
        }
    }

    fn http(&self) -> &reqwest::Client {
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client with default TLS builds")
        })
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

    /// Exchanges the refresh token for a new access token.
    async fn refresh(&self, conn: &mut Connection) -> Result<(), ProviderError> {
        let refresh_token = conn.credentials.get("refresh_token").ok_or_else(|| {
            ProviderError::new(
                ErrorCode::InvalidCredentials,
                "the credentials have no refresh_token",
            )
        })?;
        let client_id = conn.credentials.get("client_id").ok_or_else(|| {
            ProviderError::new(
                ErrorCode::InvalidCredentials,
                "the credentials have no client_id",
            )
        })?;
        let mut form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", refresh_token.to_string()),
            ("client_id", client_id.to_string()),
        ];
        if let Some(secret) = conn.credentials.get("client_secret") {
            form.push(("client_secret", secret.to_string()));
        }
        let url = format!("{}/services/oauth2/token", Self::login_host(conn));
        self.limiter.acquire(&conn.integration_id).await;
        let response = self
            .http()
            .post(&url)
            .form(&form)
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let error = body["error"].as_str().unwrap_or("unknown_error");
            let description = body["error_description"].as_str().unwrap_or("");
            let code = match (status, error) {
                (_, "invalid_grant") => ErrorCode::AuthenticationFailed,
                (s, _) if s.is_server_error() => ErrorCode::ServiceUnavailable,
                _ => ErrorCode::InvalidCredentials,
            };
            return Err(ProviderError::new(
                code,
                format!("token refresh refused ({status}): {error} {description}")
                    .trim_end()
                    .to_string(),
            ));
        }
        let access_token = body["access_token"].as_str().ok_or_else(|| {
            ProviderError::new(
                ErrorCode::AuthenticationFailed,
                "the token response has no access_token",
            )
        })?;
        conn.credentials.set("access_token", access_token);
        if let Some(instance) = body["instance_url"].as_str() {
            conn.credentials.set("instance_url", instance);
        }
        if let Some(rotated) = body["refresh_token"].as_str() {
            conn.credentials.set("refresh_token", rotated);
        }
        if let Some(issued_at) = body["issued_at"].as_str() {
            conn.credentials.set("issued_at", issued_at);
        }
        conn.credentials_changed = true;
        Ok(())
    }

    /// Sends a GET to `path_and_query` on the instance, refreshing the token first if there is
    /// none and once more on a 401. Returns the body and the API usage the answer reported.
    async fn get(
        &self,
        conn: &mut Connection,
        path_and_query: &str,
        query: &[(&str, String)],
        batch_size: Option<usize>,
    ) -> Result<(Value, Option<(u64, u64)>), ProviderError> {
        if conn.credentials.get("access_token").is_none()
            || conn.credentials.get("instance_url").is_none()
        {
            self.refresh(conn).await?;
        }
        let mut refreshed = false;
        loop {
            let instance = conn
                .credentials
                .get("instance_url")
                .unwrap_or_default()
                .trim_end_matches('/');
            let token = conn.credentials.get("access_token").unwrap_or_default();
            let mut request = self
                .http()
                .request(Method::GET, format!("{instance}{path_and_query}"))
                .bearer_auth(token)
                .header("Accept", "application/json");
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(size) = batch_size {
                request = request.header("Sforce-Query-Options", format!("batchSize={size}"));
            }
            self.limiter.acquire(&conn.integration_id).await;
            let response = request.send().await.map_err(transport_error)?;
            let status = response.status();
            let usage = response
                .headers()
                .get("sforce-limit-info")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_api_usage);
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return Ok((body, usage));
            }
            let (error_code, message) = first_error(&body);
            match status {
                StatusCode::UNAUTHORIZED if !refreshed => {
                    refreshed = true;
                    self.refresh(conn).await?;
                }
                StatusCode::UNAUTHORIZED => {
                    return Err(ProviderError::new(
                        ErrorCode::AuthenticationFailed,
                        format!("{error_code}: {message} (after a token refresh)"),
                    ));
                }
                StatusCode::FORBIDDEN if error_code == "REQUEST_LIMIT_EXCEEDED" => {
                    return Err(ProviderError::quota(format!("{error_code}: {message}")));
                }
                StatusCode::FORBIDDEN => {
                    return Err(ProviderError::new(
                        ErrorCode::AuthenticationFailed,
                        format!("{error_code}: {message}"),
                    ));
                }
                StatusCode::NOT_FOUND => {
                    return Err(ProviderError::new(
                        ErrorCode::NotFound,
                        format!("{error_code}: {message}"),
                    ));
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    return Err(ProviderError::new(
                        ErrorCode::RateLimit,
                        format!("{error_code}: {message}"),
                    ));
                }
                s if s.is_server_error() => {
                    return Err(ProviderError::new(
                        ErrorCode::ServiceUnavailable,
                        format!("Salesforce answered {s}: {error_code}: {message}"),
                    ));
                }
                s => {
                    return Err(ProviderError::new(
                        ErrorCode::ValidationError,
                        format!("Salesforce answered {s}: {error_code}: {message}"),
                    ));
                }
            }
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

/// The SOQL for one entity.
pub fn soql(request: &FetchRequest) -> String {
    let mut fields = vec!["Id".to_string(), "SystemModstamp".to_string()];
    for field in &request.fields {
        if !fields.iter().any(|f| f.eq_ignore_ascii_case(field)) {
            fields.push(field.clone());
        }
    }
    let mut conditions = Vec::new();
    if let Some(since) = request.since {
        conditions.push(format!(
            "SystemModstamp >= {}",
            since.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
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

/// Reads `api-usage=10018/100000` from a `Sforce-Limit-Info` header.
fn parse_api_usage(header: &str) -> Option<(u64, u64)> {
    header.split(',').find_map(|part| {
        let value = part.trim().strip_prefix("api-usage=")?;
        let (used, allowed) = value.split_once('/')?;
        Some((used.trim().parse().ok()?, allowed.trim().parse().ok()?))
    })
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

fn transport_error(e: reqwest::Error) -> ProviderError {
    let code = if e.is_timeout() {
        ErrorCode::Timeout
    } else if e.is_connect() {
        ErrorCode::ServiceUnavailable
    } else {
        ErrorCode::ConnectionReset
    };
    // reqwest's message names the URL, never headers or bodies.
    ProviderError::new(code, format!("request to Salesforce failed: {e}"))
}

/// Salesforce timestamps: `2024-05-02T10:00:00.000+0000`.
pub fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| DateTime::parse_from_rfc3339(text))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A record of a query result, without its `attributes`.
pub fn record_from(mut fields: Map<String, Value>) -> Option<Record> {
    fields.remove("attributes");
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
    })
}

#[async_trait]
impl Provider for Salesforce {
    fn name(&self) -> &'static str {
        "salesforce"
    }

    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        let version = Self::api_version(conn);
        let (query, path, params) = match &request.page_token {
            Some(next) => (None, next.clone(), Vec::new()),
            None => {
                let soql = soql(request);
                (
                    Some(soql.clone()),
                    format!("/services/data/{version}/query"),
                    vec![("q", soql)],
                )
            }
        };
        let batch = request.page_size.clamp(200, 2000);
        let (body, usage) = self.get(conn, &path, &params, Some(batch)).await?;
        let records = body["records"]
            .as_array()
            .ok_or_else(|| {
                ProviderError::new(
                    ErrorCode::ServiceUnavailable,
                    "the query answer has no records",
                )
            })?
            .iter()
            .filter_map(|r| r.as_object().cloned().and_then(record_from))
            .collect();
        let done = body["done"].as_bool().unwrap_or(true);
        Ok(Page {
            records,
            next_page: if done {
                None
            } else {
                body["nextRecordsUrl"].as_str().map(str::to_string)
            },
            query,
            stop_after: Self::usage_stop(conn, usage),
        })
    }

    async fn fetch_deleted(
        &self,
        conn: &mut Connection,
        entity: &str,
        since: DateTime<Utc>,
    ) -> Result<Deleted, ProviderError> {
        let now = Utc::now();
        if now - since > chrono::Duration::days(DELETED_WINDOW_DAYS) {
            return Ok(Deleted {
                ids: Vec::new(),
                full_resync_required: true,
            });
        }
        let version = Self::api_version(conn);
        let format = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, false);
        let (body, _) = self
            .get(
                conn,
                &format!("/services/data/{version}/sobjects/{entity}/deleted/"),
                &[("start", format(since)), ("end", format(now))],
                None,
            )
            .await?;
        let earliest = body["earliestDateAvailable"]
            .as_str()
            .and_then(parse_timestamp);
        if earliest.is_some_and(|earliest| earliest > since) {
            return Ok(Deleted {
                ids: Vec::new(),
                full_resync_required: true,
            });
        }
        let ids = body["deletedRecords"]
            .as_array()
            .map(|records| {
                records
                    .iter()
                    .filter_map(|r| r["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Deleted {
            ids,
            full_resync_required: false,
        })
    }

    fn parse_webhook(&self, request: &WebhookRequest<'_>) -> Result<WebhookDelivery, WebhookError> {
        outbound_messages::parse(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_soql_is_inclusive_and_ordered() {
        let request = FetchRequest {
            entity: "Account".into(),
            fields: vec!["Name".into(), "Id".into()],
            since: Some(
                DateTime::parse_from_rfc3339("2026-01-01T10:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
            page_token: None,
            filters: vec!["Type = 'Customer'".into()],
            page_size: 2000,
        };
        assert_eq!(
            soql(&request),
            "SELECT Id, SystemModstamp, Name FROM Account WHERE SystemModstamp >= 2026-01-01T10:00:00Z \
             AND (Type = 'Customer') ORDER BY SystemModstamp ASC, Id ASC"
        );
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
    }
}
