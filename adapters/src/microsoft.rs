//! What Dataverse (Dynamics 365) and Microsoft Graph (Teams, OneDrive) share: the Microsoft
//! identity platform's tokens and one way of sending a request.
//!
//! * Tokens come from `POST {tokenUrl}` (default
//!   `https://login.microsoftonline.com/{tenantId}/oauth2/v2.0/token`): the refresh-token grant
//!   for delegated access (every refresh returns a new refresh token, stored before use) or
//!   the client-credentials grant for app-only access, with the scope the service needs. They
//!   expire in about an hour (`expires_in`), so a connection refreshes a token about to
//!   expire before using it, and the token refresher refreshes them ahead of time.
//! * [`Api::send`] paces requests per integration, refreshes once on a 401, retries 429 and 5xx
//!   in place after `Retry-After`, and turns `{"error": {"code", "message"}}` into a
//!   [`ProviderError`] that keeps the service's code.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value};

use crate::credentials::Refreshed;
use crate::http::{self, Retries};
use crate::oauth::{self, Grant};
use crate::{Connection, ErrorCode, ProviderError, RateLimiter};

/// The identity platform's token endpoint for `tenant`.
pub fn default_token_url(tenant: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
}

/// Checks the settings every Microsoft connection has: a `tenantId` (or a `tokenUrl`).
pub fn check_identity(settings: &mut Map<String, Value>) -> Result<(), String> {
    if let Some(url) = http::check_url(settings, "tokenUrl")? {
        settings.insert("tokenUrl".into(), Value::String(url));
    }
    match settings.get("tenantId") {
        Some(Value::String(t))
            if !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)) =>
        {
            Ok(())
        }
        Some(_) => Err("connection.tenantId must be a directory (tenant) id or domain".into()),
        None if settings.contains_key("tokenUrl") => Ok(()),
        None => Err(
            "connection.tenantId is required (the Entra tenant the app is registered in)".into(),
        ),
    }
}

/// The error a Microsoft service answered, with its own code kept in the message.
pub fn answer_error(status: StatusCode, body: &Value) -> ProviderError {
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    let mut text = format!("{status}");
    if !code.is_empty() {
        text.push_str(&format!(" {code}"));
    }
    if !message.is_empty() {
        text.push_str(&format!(": {message}"));
    }
    ProviderError::new(http::status_code(status), text)
}

/// An answer that succeeded.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

/// One Microsoft service as an adapter talks to it.
pub struct Api {
    /// What errors call the service ("Dataverse", "Microsoft Graph").
    service: &'static str,
    http: OnceLock<reqwest::Client>,
    limiter: RateLimiter,
}

impl Api {
    pub fn new(service: &'static str, limiter: RateLimiter) -> Self {
        Self {
            service,
            http: OnceLock::new(),
            limiter,
        }
    }

    fn http(&self) -> &reqwest::Client {
        // Built on first use: a cold start that has no work for this service pays nothing.
        self.http.get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client with default TLS builds")
        })
    }

    /// Refreshes `conn`'s access token for `scope` (one refresh per integration at a time,
    /// stored before use) and returns when it expires.
    pub async fn refresh(
        &self,
        conn: &mut Connection,
        scope: &str,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        let url = match conn.setting("tokenUrl") {
            Some(url) => url.to_string(),
            None => default_token_url(conn.setting("tenantId").unwrap_or("common")),
        };
        let retry = conn.retry;
        let http = self.http();
        let mut expires_at = None;
        crate::credentials::refresh(conn, |credentials| {
            let grant = Grant::for_credentials(&credentials);
            let mut scope = scope.to_string();
            if grant == Grant::RefreshToken && !scope.ends_with("/.default") {
                scope.push_str(" offline_access");
            }
            let url = url.clone();
            async move {
                let extra = [("scope", scope)];
                let refreshed: Refreshed =
                    oauth::exchange(http, &url, grant, &extra, credentials, retry).await?;
                Ok(refreshed)
            }
        })
        .await?;
        if let Some(at) = conn
            .credentials
            .get(oauth::EXPIRES_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        {
            expires_at = Some(at.with_timezone(&Utc));
        }
        Ok(expires_at)
    }

    /// Sends a request with `conn`'s token (refreshed first if it is missing or about to
    /// expire, and once more on a 401), retrying in place what waiting can fix.
    pub async fn send(
        &self,
        conn: &mut Connection,
        scope: &str,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Answer, ProviderError> {
        if !oauth::has_live_token(&conn.credentials, Utc::now()) {
            self.refresh(conn, scope).await?;
        }
        let mut refreshed = false;
        let mut retries = Retries::new(conn.retry);
        loop {
            let token = conn
                .credentials
                .get(oauth::ACCESS_TOKEN)
                .unwrap_or_default();
            let mut request = self
                .http()
                .request(method.clone(), url)
                .bearer_auth(token)
                .header("Accept", "application/json");
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            self.limiter.acquire(&conn.integration_id).await;
            let (error, retry_after) = match request.send().await {
                Err(e) => (http::transport_error(self.service, &e), None),
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let retry_after = http::retry_after(&headers, Utc::now());
                    let text = response.text().await.unwrap_or_default();
                    let body: Value = if text.is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_str(&text).unwrap_or(Value::Null)
                    };
                    if status.is_success() {
                        return Ok(Answer {
                            status,
                            headers,
                            body,
                        });
                    }
                    if status == StatusCode::UNAUTHORIZED && !refreshed {
                        refreshed = true;
                        self.refresh(conn, scope).await?;
                        continue;
                    }
                    let mut error = answer_error(status, &body);
                    error.message = format!("{}: {}", self.service, error.message);
                    (error, retry_after)
                }
            };
            retries.wait_or_fail(error, retry_after).await?;
        }
    }
}

/// An id that is safe to put in a URL path segment: letters, digits, `-`, `_`, `.`, `:`,
/// `@`, `!` (Graph drive and channel ids use the last three).
pub fn check_id(kind: &str, id: &str) -> Result<(), ProviderError> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@!".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("`{id}` is not a {kind} id"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_microsoft_error_keeps_the_services_code() {
        let e = answer_error(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}),
        );
        assert_eq!(e.code, ErrorCode::RateLimit);
        assert!(e.message.contains("0x80072322"), "{e}");
        let e = answer_error(StatusCode::UNAUTHORIZED, &Value::Null);
        assert_eq!(
            (e.code, e.message.as_str()),
            (ErrorCode::AuthenticationFailed, "401 Unauthorized")
        );
    }

    #[test]
    fn identity_settings_name_what_is_missing() {
        let mut none = Map::new();
        assert!(check_identity(&mut none).unwrap_err().contains("tenantId"));
        let mut ok = json!({"tenantId": "contoso.onmicrosoft.com"})
            .as_object()
            .unwrap()
            .clone();
        assert!(check_identity(&mut ok).is_ok());
        let mut bad = json!({"tenantId": "a/b"}).as_object().unwrap().clone();
        assert!(check_identity(&mut bad).is_err());
    }
}
