//! The OAuth 2.0 token request (RFC 6749 §4.4 client credentials, §6 refresh token), as every
//! OAuth provider answers it: `access_token`, maybe a new `refresh_token`, `expires_in`
//! seconds, and errors as `{"error": "invalid_grant", "error_description": ...}`.
//!
//! [`exchange`] sends one grant and turns the answer into [`Refreshed`] credentials. It is the
//! `exchange` an adapter hands to [`crate::credentials::refresh`], which stores the result
//! before anyone uses it. `invalid_grant` (a revoked or spent refresh token) and
//! `invalid_client` are not retried; 429, 5xx and `temporarily_unavailable` are, in place.

use chrono::{DateTime, Duration, Utc};
use reqwest::StatusCode;
use serde_json::Value;

use crate::credentials::Refreshed;
use crate::http::{self, Retries, RetryPolicy};
use crate::{Credentials, ErrorCode, ProviderError};

/// Which grant to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// With the stored `refresh_token` (delegated access).
    RefreshToken,
    /// With the client's own id and secret (app-only access).
    ClientCredentials,
    /// Zoom's Server-to-Server OAuth: the client's id and secret for one account.
    AccountCredentials,
}

impl Grant {
    /// The grant `credentials` allow: a refresh token if they hold one.
    pub fn for_credentials(credentials: &Credentials) -> Self {
        if credentials.get("refresh_token").is_some() {
            Self::RefreshToken
        } else {
            Self::ClientCredentials
        }
    }
}

/// How the client proves who it is: its id and secret in the form (most providers), or as
/// HTTP Basic authentication (Zoom, Gong).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Form,
    Basic,
}

/// One token request to make.
pub struct Exchange<'a> {
    pub url: &'a str,
    pub grant: Grant,
    /// More form fields (a scope, an account id).
    pub extra: &'a [(&'static str, String)],
    pub client_auth: ClientAuth,
}

/// Credentials keys the token request reads and writes.
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";
/// When the access token expires, as RFC 3339, so a connection refreshes before using a dead
/// token instead of after a 401.
pub const EXPIRES_AT: &str = "access_token_expires_at";
/// The scope the access token was asked for, so that a connection that now needs another (an
/// integration that started writing back) gets a new token rather than one that may only read.
pub const TOKEN_SCOPE: &str = "access_token_scope";

/// Whether the access token in `credentials` was asked for with the scope among `extra`, the
/// form fields a token request would send now; always, where the request names no scope.
pub fn has_scope(credentials: &Credentials, extra: &[(&'static str, String)]) -> bool {
    extra
        .iter()
        .find(|(name, _)| *name == "scope")
        .is_none_or(|(_, scope)| credentials.get(TOKEN_SCOPE) == Some(scope.as_str()))
}

/// Whether `credentials` hold an access token that is still good at `now` (with a minute to
/// spare for the request on its way).
pub fn has_live_token(credentials: &Credentials, now: DateTime<Utc>) -> bool {
    credentials.get(ACCESS_TOKEN).is_some()
        && credentials
            .get(EXPIRES_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_none_or(|t| t.with_timezone(&Utc) > now + Duration::minutes(1))
}

/// Keeps the scope a new access token was asked for, and forgets an earlier token's where
/// this one was asked for none (the provider grants what was consented).
fn remember_scope(credentials: &mut Credentials, extra: &[(&'static str, String)]) {
    match extra.iter().find(|(name, _)| *name == "scope") {
        Some((_, scope)) => credentials.set(TOKEN_SCOPE, scope),
        None => credentials.remove(TOKEN_SCOPE),
    }
}

/// Sends `request` with the client's `client_id` and `client_secret` from `credentials`, and
/// returns the credentials updated with what the provider answered.
pub async fn exchange(
    http: &reqwest::Client,
    request: &Exchange<'_>,
    mut credentials: Credentials,
    retry: RetryPolicy,
) -> Result<Refreshed, ProviderError> {
    let missing = |name: &str| {
        ProviderError::new(
            ErrorCode::InvalidCredentials,
            format!("the credentials have no {name}"),
        )
    };
    let client_id = credentials
        .get("client_id")
        .ok_or_else(|| missing("client_id"))?
        .to_string();
    let client_secret = credentials.get("client_secret").map(str::to_string);
    let mut form: Vec<(&str, String)> = Vec::new();
    if request.client_auth == ClientAuth::Form {
        form.push(("client_id", client_id.clone()));
        if let Some(secret) = &client_secret {
            form.push(("client_secret", secret.clone()));
        }
    }
    match request.grant {
        Grant::RefreshToken => {
            let token = credentials
                .get(REFRESH_TOKEN)
                .ok_or_else(|| missing(REFRESH_TOKEN))?;
            form.push(("grant_type", "refresh_token".into()));
            form.push((REFRESH_TOKEN, token.to_string()));
        }
        Grant::ClientCredentials => {
            if client_secret.is_none() {
                return Err(missing("client_secret"));
            }
            form.push(("grant_type", "client_credentials".into()));
        }
        Grant::AccountCredentials => {
            if client_secret.is_none() {
                return Err(missing("client_secret"));
            }
            form.push(("grant_type", "account_credentials".into()));
        }
    }
    form.extend(request.extra.iter().cloned());
    let url = request.url;

    let mut retries = Retries::new(retry);
    let (access_token, body) = loop {
        let mut post = http
            .post(url)
            .form(&form)
            .header("Accept", "application/json");
        if request.client_auth == ClientAuth::Basic {
            post = post.basic_auth(&client_id, client_secret.as_deref());
        }
        let (error, retry_after) = match post.send().await {
            Err(e) => (http::transport_error("the token endpoint", &e), None),
            Ok(response) => {
                let status = response.status();
                let retry_after = http::retry_after(response.headers(), Utc::now());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if status.is_success()
                    && let Some(token) = body[ACCESS_TOKEN].as_str()
                {
                    break (token.to_string(), body);
                }
                if status.is_success() && !body["error"].is_string() {
                    // A body cut short, or a proxy's page: no answer, not a refusal of the
                    // credentials, which may well be good.
                    (
                        ProviderError::new(
                            ErrorCode::ServiceUnavailable,
                            "the token endpoint answered success without a token",
                        ),
                        retry_after,
                    )
                } else {
                    (refusal(status, &body), retry_after)
                }
            }
        };
        retries.wait_or_fail(error, retry_after).await?;
    };

    credentials.set(ACCESS_TOKEN, access_token);
    if let Some(rotated) = body[REFRESH_TOKEN].as_str() {
        credentials.set(REFRESH_TOKEN, rotated);
    }
    // Where this customer's API lives, when the provider says at token time (Salesforce's
    // instance, Gong's customer host).
    if let Some(instance) = body["instance_url"].as_str() {
        credentials.set("instance_url", instance);
    }
    if let Some(base) = body["api_base_url_for_customer"].as_str() {
        credentials.set("api_base_url", base.trim_end_matches('/'));
    }
    remember_scope(&mut credentials, request.extra);
    let expires_at = expires_at(&body, Utc::now());
    match expires_at {
        Some(at) => credentials.set(EXPIRES_AT, at.to_rfc3339()),
        None => credentials.remove(EXPIRES_AT),
    }
    Ok(Refreshed {
        credentials,
        expires_at,
    })
}

/// When the token expires, from `expires_in` (which some providers send as a string). A time
/// past any date is as good as none said: the token is used until refused. The refresh token
/// the same answer rotated must still be stored.
fn expires_at(body: &Value, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let seconds = match &body["expires_in"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }?;
    Duration::try_seconds(seconds).and_then(|d| now.checked_add_signed(d))
}

/// A refused token request, without anything of the request in it. Refused credentials stop the
/// integration until someone replaces them, so a timeout, or a proxy's or firewall's page in
/// place of the token endpoint's answer, is not taken for them: it may pass.
fn refusal(status: StatusCode, body: &Value) -> ProviderError {
    let oauth_error = body["error"].as_str();
    let error = oauth_error.unwrap_or("unknown_error");
    // Microsoft's descriptions start with an AADSTS code that says the most.
    let description = body["error_description"]
        .as_str()
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("");
    let code = match (status, error) {
        (_, "invalid_grant" | "interaction_required") => ErrorCode::AuthenticationFailed,
        (_, "temporarily_unavailable") => ErrorCode::ServiceUnavailable,
        (StatusCode::TOO_MANY_REQUESTS, _) | (_, "slow_down") => ErrorCode::RateLimit,
        (StatusCode::REQUEST_TIMEOUT, _) => ErrorCode::Timeout,
        (s, _) if s.is_server_error() => ErrorCode::ServiceUnavailable,
        // A page in the way (a proxy's, a firewall's) may be gone next time; a token URL that
        // names nothing there (404, 405) is the integration's to fix.
        (StatusCode::FORBIDDEN | StatusCode::PROXY_AUTHENTICATION_REQUIRED, _)
            if oauth_error.is_none() =>
        {
            ErrorCode::ServiceUnavailable
        }
        _ => ErrorCode::InvalidCredentials,
    };
    let message = format!("token request refused ({status}): {error} {description}");
    ProviderError::new(code, message.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_token_asked_for_another_scope_is_not_the_one_a_connection_needs() {
        let mut credentials = Credentials::new(Default::default());
        let read = [("scope", "Files.Read.All offline_access".to_string())];
        let write = [("scope", "Files.ReadWrite.All offline_access".to_string())];
        assert!(
            has_scope(&credentials, &[]),
            "a request that names no scope"
        );
        assert!(!has_scope(&credentials, &read), "a token of unknown scope");
        credentials.set(TOKEN_SCOPE, "Files.Read.All offline_access");
        assert!(has_scope(&credentials, &read));
        assert!(!has_scope(&credentials, &write));
        remember_scope(&mut credentials, &write);
        assert!(has_scope(&credentials, &write));
        remember_scope(&mut credentials, &[]);
        assert_eq!(credentials.get(TOKEN_SCOPE), None);
    }

    #[test]
    fn refusals_say_whether_new_credentials_or_patience_can_help() {
        let cases = [
            (
                400,
                json!({"error": "invalid_grant", "error_description": "AADSTS700082: The refresh token has expired due to inactivity.\r\nTrace ID: x"}),
                ErrorCode::AuthenticationFailed,
            ),
            (
                401,
                json!({"error": "invalid_client"}),
                ErrorCode::InvalidCredentials,
            ),
            (
                400,
                json!({"error": "temporarily_unavailable"}),
                ErrorCode::ServiceUnavailable,
            ),
            (429, json!({}), ErrorCode::RateLimit),
            (503, Value::Null, ErrorCode::ServiceUnavailable),
            (400, json!({"error": "slow_down"}), ErrorCode::RateLimit),
            (408, Value::Null, ErrorCode::Timeout),
            // A firewall's page, not the token endpoint's answer.
            (403, Value::Null, ErrorCode::ServiceUnavailable),
            (
                403,
                json!({"error": "unauthorized_client"}),
                ErrorCode::InvalidCredentials,
            ),
            (400, Value::Null, ErrorCode::InvalidCredentials),
            (404, Value::Null, ErrorCode::InvalidCredentials),
        ];
        for (status, body, code) in cases {
            let e = refusal(StatusCode::from_u16(status).unwrap(), &body);
            assert_eq!(e.code, code, "{e}");
        }
        let e = refusal(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_grant", "error_description": "AADSTS700082: expired.\r\nTrace ID: 1"}),
        );
        assert_eq!(
            e.message,
            "token request refused (400 Bad Request): invalid_grant AADSTS700082: expired."
        );
    }

    #[test]
    fn a_token_is_live_until_a_minute_before_it_expires() {
        let now = Utc::now();
        let mut credentials = Credentials::default();
        assert!(!has_live_token(&credentials, now));
        credentials.set(ACCESS_TOKEN, "t");
        assert!(has_live_token(&credentials, now), "no expiry known: use it");
        credentials.set(EXPIRES_AT, (now + Duration::minutes(5)).to_rfc3339());
        assert!(has_live_token(&credentials, now));
        credentials.set(EXPIRES_AT, (now + Duration::seconds(30)).to_rfc3339());
        assert!(!has_live_token(&credentials, now));
    }

    #[test]
    fn expires_in_is_read_as_a_number_or_a_string_and_an_absurd_one_as_none() {
        let now = Utc::now();
        let hour = Some(now + Duration::seconds(3599));
        assert_eq!(expires_at(&json!({"expires_in": "3599"}), now), hour);
        assert_eq!(expires_at(&json!({"expires_in": 3599}), now), hour);
        for absurd in [json!(9_000_000_000_000_i64), json!(i64::MAX.to_string())] {
            assert_eq!(expires_at(&json!({"expires_in": absurd}), now), None);
        }
        assert_eq!(expires_at(&json!({"expires_in": "soon"}), now), None);
    }
}
