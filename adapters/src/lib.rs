//! Provider clients: the only code that speaks an external system's API.
//!
//! The sync engine (`handler`) never talks HTTP to Salesforce, Dynamics or any other provider
//! itself. It asks a [`Provider`] found in the [`Registry`] by the integration's provider name
//! for pages of [`Record`]s, deletions and webhook parsing, and gets back data or a
//! [`ProviderError`] whose [`ErrorCode`] tells it whether retrying can help.
//!
//! The major components are:
//!
//! * [`Provider`]: what every provider client implements; [`Registry`]: name → client.
//! * [`Connection`]: one integration's settings and [`Credentials`] for the length of a job. An
//!   adapter that refreshes or rotates tokens updates them there and marks them changed; the
//!   engine persists them.
//! * [`ErrorCode`] / [`ProviderError`]: the error vocabulary shared with the engine, spelled as
//!   the sync history spells it.
//! * [`salesforce`] (REST API, SOQL, Outbound Messages) and [`bulk_import`] (CSV and JSON Lines
//!   exports in a folder).
//!
//! Adapters must not touch the shard store, the queues or the secret store, and must never put
//! a token, key or password in an error message.

pub mod bulk_import;
pub mod credentials;
pub mod http;
mod rate_limit;
pub mod salesforce;
mod types;

pub use rate_limit::RateLimiter;
pub use types::*;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// A client for one external system.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name as integrations spell it (`salesforce`, `bulk_import`, ...).
    fn name(&self) -> &'static str;

    /// One page of an entity's records. `request.page_token` continues a previous page.
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError>;

    /// Records of `entity` deleted since `since`.
    async fn fetch_deleted(
        &self,
        conn: &mut Connection,
        entity: &str,
        since: DateTime<Utc>,
    ) -> Result<Deleted, ProviderError>;

    /// Checks an integration's `connection` settings when the integration is registered, and
    /// puts them in the form the adapter keeps (an id in its canonical spelling). The error names
    /// the setting and what is wrong with it.
    fn check_connection(&self, _settings: &mut Map<String, Value>) -> Result<(), String> {
        Ok(())
    }

    /// The records of `entity` with these ids, as the provider has them now. Ids the provider
    /// does not know (deleted, never existed) are simply absent from the answer.
    async fn fetch_by_ids(
        &self,
        _conn: &mut Connection,
        request: &FetchRequest,
        _ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        Err(ProviderError::new(
            ErrorCode::ProviderNotSupported,
            format!(
                "provider `{}` cannot read `{}` records by id",
                self.name(),
                request.entity
            ),
        ))
    }

    /// Reads a webhook delivery addressed to this provider. Providers without webhooks refuse.
    fn parse_webhook(
        &self,
        _request: &WebhookRequest<'_>,
    ) -> Result<WebhookDelivery, WebhookError> {
        Err(WebhookError::Unsupported(format!(
            "provider `{}` does not deliver webhooks",
            self.name()
        )))
    }
}

/// The provider clients this build knows, by name.
#[derive(Clone, Default)]
pub struct Registry {
    providers: BTreeMap<&'static str, Arc<dyn Provider>>,
}

impl Registry {
    /// A registry with no providers.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Every provider client of this build, with default settings.
    pub fn standard() -> Self {
        Self::empty()
            .with(Arc::new(salesforce::Salesforce::new()))
            .with(Arc::new(bulk_import::BulkImport::new()))
    }

    /// Adds a provider client, replacing any with the same name.
    pub fn with(mut self, provider: Arc<dyn Provider>) -> Self {
        self.providers.insert(provider.name(), provider);
        self
    }

    /// The client for `name`, if this build has one.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(name).cloned()
    }

    /// Names of the registered providers, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.providers.keys().copied()
    }
}

/// Why an operation against an external system (or the engine around it) failed.
///
/// The first four are transient: the same request may succeed later. The rest are not, and
/// retrying them only burns the provider's API allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    RateLimit,
    Timeout,
    ServiceUnavailable,
    ConnectionReset,
    AuthenticationFailed,
    InvalidCredentials,
    NotFound,
    ValidationError,
    ProviderNotSupported,
    InvalidMessage,
    StoreError,
}

impl ErrorCode {
    /// Whether the operation may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimit
                | Self::Timeout
                | Self::ServiceUnavailable
                | Self::ConnectionReset
                | Self::StoreError
        )
    }

    /// The code as the sync history spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "RATE_LIMIT",
            Self::Timeout => "TIMEOUT",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::ConnectionReset => "CONNECTION_RESET",
            Self::AuthenticationFailed => "AUTHENTICATION_FAILED",
            Self::InvalidCredentials => "INVALID_CREDENTIALS",
            Self::NotFound => "NOT_FOUND",
            Self::ValidationError => "VALIDATION_ERROR",
            Self::ProviderNotSupported => "PROVIDER_NOT_SUPPORTED",
            Self::InvalidMessage => "INVALID_MESSAGE",
            Self::StoreError => "STORE_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed provider operation. The message is safe to log and to store in the sync history:
/// adapters never put tokens, keys or passwords in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProviderError {
    pub code: ErrorCode,
    pub message: String,
    /// The provider's allocation is used up for now: stop this job where it is, keep what was
    /// done, and resume on the next scheduled run instead of retrying soon.
    pub resume_next_run: bool,
}

impl ProviderError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            resume_next_run: false,
        }
    }

    /// An allocation that is used up until later (daily API limits).
    pub fn quota(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::RateLimit,
            message: message.into(),
            resume_next_run: true,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_codes_are_retryable() {
        let retryable: Vec<_> = [
            ErrorCode::RateLimit,
            ErrorCode::Timeout,
            ErrorCode::ServiceUnavailable,
            ErrorCode::ConnectionReset,
            ErrorCode::AuthenticationFailed,
            ErrorCode::InvalidCredentials,
            ErrorCode::NotFound,
            ErrorCode::ValidationError,
            ErrorCode::ProviderNotSupported,
            ErrorCode::InvalidMessage,
            ErrorCode::StoreError,
        ]
        .into_iter()
        .filter(|c| c.is_retryable())
        .collect();
        assert_eq!(
            retryable,
            [
                ErrorCode::RateLimit,
                ErrorCode::Timeout,
                ErrorCode::ServiceUnavailable,
                ErrorCode::ConnectionReset,
                ErrorCode::StoreError
            ]
        );
    }

    #[test]
    fn codes_serialize_as_the_history_spells_them() {
        let json = serde_json::to_string(&ErrorCode::AuthenticationFailed).unwrap();
        assert_eq!(json, "\"AUTHENTICATION_FAILED\"");
        assert_eq!(
            ErrorCode::AuthenticationFailed.as_str(),
            "AUTHENTICATION_FAILED"
        );
    }

    #[test]
    fn the_standard_registry_has_this_builds_providers() {
        let registry = Registry::standard();
        assert!(registry.get("salesforce").is_some());
        assert!(registry.get("zoom").is_none());
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            ["bulk_import", "salesforce"]
        );
    }
}
