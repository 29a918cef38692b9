//! A JSON API behind OAuth bearer tokens: the request loop every OAuth adapter shares.
//!
//! [`Api::send`] paces requests per integration, gets a token first if the connection has no
//! live one (refreshed a minute before it expires), refreshes once more on a 401, retries in
//! place what waiting can fix (429, 5xx, timeouts, after `Retry-After`), and turns the
//! service's error body into a [`ProviderError`]. What differs between services is a
//! [`Dialect`]: where tokens come from and with which grant and scope, and how errors read.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::http::{self, Retries};
use crate::oauth::{self, ClientAuth, Grant};
use crate::{Connection, Credentials, ErrorCode, ProviderError, RateLimiter};

/// Which failed tries of a request [`Api`] sends again in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Any that waiting can fix: the request means the same however often it arrives.
    Safe,
    /// Only those the service cannot have carried out.
    IfNotCarriedOut,
}

/// A `Retry-After` at least this long means the allocation is used up until later.
const QUOTA_WAIT: Duration = Duration::from_secs(3600);

/// `error`, or a used-up allocation when the provider asks to wait an hour or more (a daily
/// limit): then the job stops where it is and the next scheduled run resumes it, instead of
/// spending its retries. A shorter wait than that, but longer than one waited out in place,
/// goes with the error (`resume_at`): the job's retry is not sent back before it.
fn allocation_or(error: ProviderError, retry_after: Option<Duration>) -> ProviderError {
    let Some(wait) = retry_after else {
        return error;
    };
    // A wait past any date there is names no time.
    let back = chrono::Duration::from_std(wait)
        .ok()
        .and_then(|wait| Utc::now().checked_add_signed(wait));
    let error = if wait >= QUOTA_WAIT {
        ProviderError::quota(error.message)
    } else {
        error
    };
    match back {
        Some(at) => error.resuming_at(at),
        None => error,
    }
}

/// One token request: where, with which extra form fields (a scope), and how the client
/// authenticates.
pub struct TokenRequest {
    pub url: String,
    pub extra: Vec<(&'static str, String)>,
    pub client_auth: ClientAuth,
    /// The grant; `None` picks the one the credentials allow.
    pub grant: Option<Grant>,
}

/// What makes one service's API different from another's.
pub trait Dialect: Send + Sync {
    /// What errors call the service ("Dataverse", "Zoom").
    fn service(&self) -> &'static str;

    /// How this connection gets a token.
    fn token_request(&self, conn: &Connection) -> TokenRequest;

    /// An `Authorization` header that needs no token (Gong's access keys, as HTTP Basic);
    /// `None` to use the connection's OAuth token.
    fn static_authorization(&self, _conn: &Connection) -> Option<String> {
        None
    }

    /// The error the service answered with `status` and `body`.
    fn error(&self, status: StatusCode, body: &Value) -> ProviderError {
        let message = body["error"]["message"]
            .as_str()
            .or_else(|| body["message"].as_str())
            .unwrap_or_default();
        ProviderError::new(http::status_code(status), format!("{status}: {message}"))
    }
}

/// An answer that succeeded.
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

/// `base` and `path` with `params` as the query: a request URL, encoded.
pub fn endpoint(
    base: &str,
    path: &str,
    params: &[(&str, String)],
) -> Result<String, ProviderError> {
    let mut url = reqwest::Url::parse(&format!("{base}{path}")).map_err(|_| {
        ProviderError::new(
            crate::ErrorCode::ValidationError,
            "connection.apiBaseUrl is not a URL",
        )
    })?;
    if !params.is_empty() {
        url.query_pairs_mut().extend_pairs(params);
    }
    Ok(url.into())
}

/// One service as an adapter talks to it.
pub struct Api<D> {
    dialect: D,
    limiter: RateLimiter,
}

impl<D: Dialect> Api<D> {
    pub fn new(dialect: D, limiter: RateLimiter) -> Self {
        Self { dialect, limiter }
    }

    /// Refreshes `conn`'s access token (one refresh per integration at a time, stored before
    /// use) and returns when it expires.
    pub async fn refresh(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        let token = self.dialect.token_request(conn);
        let retry = conn.retry;
        let client = http::client();
        let serves = |credentials: &Credentials| oauth::has_scope(credentials, &token.extra);
        crate::credentials::refresh(conn, serves, |credentials| {
            let grant = token
                .grant
                .unwrap_or_else(|| Grant::for_credentials(&credentials));
            let request = oauth::Exchange {
                url: &token.url,
                grant,
                extra: &token.extra,
                client_auth: token.client_auth,
            };
            async move { oauth::exchange(client, &request, credentials, retry).await }
        })
        .await?;
        Ok(conn
            .credentials
            .get(oauth::EXPIRES_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)))
    }

    /// Sends a request with `conn`'s token, retrying in place what waiting can fix.
    pub async fn send(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Answer, ProviderError> {
        self.send_as(conn, method, url, headers, body, Repeat::Safe)
            .await
    }

    /// Sends a request that must not take effect twice (a `POST` that creates), retrying in
    /// place only what the service cannot have carried out: a connection never made, a 401
    /// before a token refresh, a 429. After a timeout, a dropped connection or a 5xx, the
    /// record may exist; the error goes back to the engine, whose retry looks for it first.
    pub async fn send_once(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Answer, ProviderError> {
        self.send_as(conn, method, url, headers, body, Repeat::IfNotCarriedOut)
            .await
    }

    async fn send_as(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
        repeat: Repeat,
    ) -> Result<Answer, ProviderError> {
        let fixed = self.dialect.static_authorization(conn);
        let stale = || {
            !oauth::has_live_token(&conn.credentials, Utc::now())
                || !oauth::has_scope(&conn.credentials, &self.dialect.token_request(conn).extra)
        };
        if fixed.is_none() && stale() {
            self.refresh(conn).await?;
        }
        let service = self.dialect.service();
        let mut refreshed = false;
        let mut retries = Retries::new(conn.retry);
        loop {
            let authorization = match &fixed {
                Some(header) => header.clone(),
                None => format!(
                    "Bearer {}",
                    conn.credentials
                        .get(oauth::ACCESS_TOKEN)
                        .unwrap_or_default()
                ),
            };
            let mut request = http::client()
                .request(method.clone(), url)
                .header("Authorization", authorization)
                .header("Accept", "application/json");
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            self.limiter.acquire(&conn.integration_id).await;
            let (error, retry_after, carried_out) = match request.send().await {
                Err(e) => (http::transport_error(service, &e), None, !e.is_connect()),
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let retry_after = http::retry_after(&headers, Utc::now());
                    let body = match response.text().await {
                        Ok(text) if text.is_empty() => Ok(Value::Null),
                        Ok(text) => serde_json::from_str::<Value>(&text).map_err(|_| None),
                        Err(e) => Err(Some(e)),
                    };
                    // A success whose body broke off or is not JSON (a proxy's page) is no
                    // answer: read as an empty page, it would end a listing early, and what it
                    // left out would be taken for deleted.
                    let body = match (body, status.is_success()) {
                        (Ok(body), true) => {
                            return Ok(Answer {
                                status,
                                headers,
                                body,
                            });
                        }
                        (Err(broken), true) => {
                            let error = match broken {
                                Some(e) => http::transport_error(service, &e),
                                None => ProviderError::new(
                                    ErrorCode::ServiceUnavailable,
                                    format!("{service}: a {status} answer whose body is not JSON"),
                                ),
                            };
                            // The provider did what was asked: a request that must not take
                            // effect twice is not sent again.
                            if repeat == Repeat::IfNotCarriedOut {
                                return Err(error);
                            }
                            retries.wait_or_fail(error, None).await?;
                            continue;
                        }
                        (body, false) => body.unwrap_or(Value::Null),
                    };
                    if status == StatusCode::UNAUTHORIZED && !refreshed && fixed.is_none() {
                        refreshed = true;
                        self.refresh(conn).await?;
                        continue;
                    }
                    let mut error = self.dialect.error(status, &body);
                    error.message = format!("{service}: {}", error.message);
                    let throttled = status == StatusCode::TOO_MANY_REQUESTS;
                    (allocation_or(error, retry_after), retry_after, !throttled)
                }
            };
            if repeat == Repeat::IfNotCarriedOut && carried_out {
                return Err(error);
            }
            retries.wait_or_fail(error, retry_after).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_of_minutes_goes_with_the_error_for_the_jobs_retry() {
        let throttled = ProviderError::new(ErrorCode::RateLimit, "429");
        let asked = Utc::now();
        let error = allocation_or(throttled, Some(Duration::from_secs(315)));
        assert!(!error.resume_next_run, "not a used-up allocation");
        let back = error.resume_at.expect("the wait asked for") - asked;
        assert!((315..320).contains(&back.num_seconds()), "{back}");
    }

    #[test]
    fn a_wait_of_an_hour_or_more_is_a_used_up_allocation_not_a_retry() {
        let throttled = || ProviderError::new(ErrorCode::RateLimit, "429");
        let soon = allocation_or(throttled(), Some(Duration::from_secs(30)));
        assert!(!soon.resume_next_run);
        let asked = Utc::now();
        let daily = allocation_or(throttled(), Some(Duration::from_secs(5 * 3600)));
        assert!(daily.resume_next_run && daily.code == ErrorCode::RateLimit);
        let back = daily.resume_at.expect("the provider said when") - asked;
        assert!(
            (5 * 3600..5 * 3600 + 5).contains(&back.num_seconds()),
            "{back}"
        );
        for absurd in [Duration::from_secs(10_000_000_000_000), Duration::MAX] {
            let refused = allocation_or(throttled(), Some(absurd));
            assert!(refused.resume_next_run && refused.resume_at.is_none());
        }
        assert!(!allocation_or(throttled(), None).resume_next_run);
    }

    #[test]
    fn endpoints_are_encoded_and_a_bad_base_is_named() {
        let url = endpoint(
            "http://127.0.0.1:1/v2",
            "/users",
            &[("cursor", "a b&c".into())],
        )
        .unwrap();
        assert_eq!(url, "http://127.0.0.1:1/v2/users?cursor=a+b%26c");
        let err = endpoint("not a url", "/x", &[]).unwrap_err();
        assert!(err.message.contains("apiBaseUrl"), "{err}");
    }
}
