//! What Dataverse (Dynamics 365) and Microsoft Graph (Teams, OneDrive) share: the Microsoft
//! identity platform's tokens and one way of sending a request.
//!
//! * Tokens come from `POST {tokenUrl}` (default
//!   `https://login.microsoftonline.com/{tenantId}/oauth2/v2.0/token`): the refresh-token grant
//!   for delegated access (every refresh returns a new refresh token, stored before use) or
//!   the client-credentials grant for app-only access, with the scope the service needs. They
//!   expire in about an hour (`expires_in`), so a connection refreshes a token about to
//!   expire before using it, and the token refresher refreshes them ahead of time.
//! * Errors come as `{"error": {"code", "message"}}`; [`answer_error`] keeps the service's
//!   code in the message. The adapters send through [`crate::api::Api`] with their dialect.

use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::api::TokenRequest;
use crate::http;
use crate::oauth::{ClientAuth, Grant};
use crate::{Connection, ErrorCode, ProviderError};

/// The identity platform's token endpoint for `tenant`.
pub fn default_token_url(tenant: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
}

/// Checks the settings every Microsoft connection has: a `tenantId` (or a `tokenUrl`).
pub fn check_identity(settings: &mut Map<String, Value>) -> Result<(), String> {
    http::check_url(settings, "tokenUrl")?;
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

/// The token request of a Microsoft connection for `scope`: the identity platform's endpoint
/// for its tenant (or its `tokenUrl`); a delegated connection also asks for `offline_access`,
/// which is what returns the next refresh token.
pub fn token_request(conn: &Connection, scope: &str) -> TokenRequest {
    let url = match conn.setting("tokenUrl") {
        Some(url) => url.to_string(),
        None => default_token_url(conn.setting("tenantId").unwrap_or("common")),
    };
    let mut scope = scope.to_string();
    if Grant::for_credentials(&conn.credentials) == Grant::RefreshToken
        && !scope.ends_with("/.default")
    {
        scope.push_str(" offline_access");
    }
    TokenRequest {
        url,
        extra: vec![("scope", scope)],
        client_auth: ClientAuth::Form,
        grant: None,
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
