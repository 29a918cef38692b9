//! The Microsoft identity platform's v2 token endpoint
//! (`POST /{tenant}/oauth2/v2.0/token`), shared by the Dataverse and Graph fakes: the
//! refresh-token grant that returns a new refresh token every time (optionally invalidating the
//! one used, the strictest rotation a provider does), the client-credentials grant, `expires_in`,
//! and errors in the platform's envelope (`invalid_grant` with an AADSTS code, `invalid_client`).
//! Access tokens it issued are checked by the fakes' data routes, and a knob expires the current
//! one after a number of data requests.

use std::collections::{HashMap, HashSet};

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub const TENANT: &str = "8f1d5c3a-6a4e-4b0f-9c2d-3e5f7a9b1c2d";
pub const CLIENT_ID: &str = "5c1e7f2a-0b3d-4e6f-8a9b-c0d1e2f3a4b5";
pub const CLIENT_SECRET: &str = "entra-client-s3cr3t";
pub const INITIAL_REFRESH_TOKEN: &str = "0.AAAA-rt-initial";

pub struct Entra {
    /// Refresh tokens that work.
    pub refresh_tokens: HashSet<String>,
    /// A refresh invalidates the refresh token it used (Microsoft only discards it; Zoom and
    /// Gong revoke it): the strict mode catches a client that spends one twice.
    pub invalidate_used_refresh_tokens: bool,
    pub access_tokens: HashSet<String>,
    /// The scope each access token was asked for.
    pub scopes: HashMap<String, String>,
    /// The current access tokens stop working after this many more data requests.
    pub expire_token_after: Option<usize>,
    /// Seconds reported in `expires_in`.
    pub expires_in: u64,
    pub token_refreshes: usize,
    pub client_credentials_grants: usize,
    issued: usize,
}

impl Default for Entra {
    fn default() -> Self {
        Self {
            refresh_tokens: HashSet::from([INITIAL_REFRESH_TOKEN.to_string()]),
            invalidate_used_refresh_tokens: true,
            access_tokens: HashSet::new(),
            scopes: HashMap::new(),
            expire_token_after: None,
            expires_in: 3599,
            token_refreshes: 0,
            client_credentials_grants: 0,
            issued: 0,
        }
    }
}

/// The credentials an operator stores for a delegated (refresh-token) connection.
pub fn delegated_credentials() -> Value {
    json!({"refresh_token": INITIAL_REFRESH_TOKEN, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
}

/// The credentials an operator stores for an app-only (client-credentials) connection.
pub fn app_credentials() -> Value {
    json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET})
}

fn oauth_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    (
        status,
        Json(json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}"),
            "error_codes": [code],
            "timestamp": "2026-11-22 07:00:00Z",
            "trace_id": "00000000-0000-0000-0000-000000000000",
            "correlation_id": "00000000-0000-0000-0000-000000000000"
        })),
    )
        .into_response()
}

impl Entra {
    /// Answers a token request for `tenant` with this form.
    pub fn token(&mut self, tenant: &str, form: &HashMap<String, String>) -> Response {
        if tenant != TENANT {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                90002,
                "Tenant not found.",
            );
        }
        let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
        if field("client_id") != CLIENT_ID || field("client_secret") != CLIENT_SECRET {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            );
        }
        if field("scope").is_empty() {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
            );
        }
        self.issued += 1;
        let access_token = format!("eyJ0eXAi.access-{}", self.issued);
        self.access_tokens.insert(access_token.clone());
        self.scopes
            .insert(access_token.clone(), field("scope").to_string());
        match field("grant_type") {
            "client_credentials" => {
                self.client_credentials_grants += 1;
                Json(json!({
                    "token_type": "Bearer",
                    "expires_in": self.expires_in,
                    "ext_expires_in": self.expires_in,
                    "access_token": access_token
                }))
                .into_response()
            }
            "refresh_token" => {
                let used = field("refresh_token").to_string();
                if !self.refresh_tokens.contains(&used) {
                    self.access_tokens.remove(&access_token);
                    return oauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        700082,
                        "The refresh token has expired due to inactivity.",
                    );
                }
                self.token_refreshes += 1;
                if self.invalidate_used_refresh_tokens {
                    self.refresh_tokens.remove(&used);
                }
                let refresh_token = format!("0.AAAA-rt-{}", self.issued);
                self.refresh_tokens.insert(refresh_token.clone());
                Json(json!({
                    "token_type": "Bearer",
                    "scope": field("scope"),
                    "expires_in": self.expires_in,
                    "ext_expires_in": self.expires_in,
                    "access_token": access_token,
                    "refresh_token": refresh_token
                }))
                .into_response()
            }
            _ => oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            ),
        }
    }

    /// Whether a request's bearer token was asked for with a scope that grants `permission`:
    /// the permission itself, or `.default` (an app's granted permissions).
    pub fn grants(&self, headers: &HeaderMap, permission: &str) -> bool {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|token| self.scopes.get(token))
            .is_some_and(|scope| {
                scope
                    .split(' ')
                    .any(|s| s.ends_with("/.default") || s.rsplit('/').next() == Some(permission))
            })
    }

    /// Whether a data request's bearer token is one this endpoint issued and still honours;
    /// counts the request against `expire_token_after`.
    pub fn admits(&mut self, headers: &HeaderMap) -> bool {
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
}
