//! Provider clients: the only code that speaks an external system's API.
//!
//! The sync engine (`handler`) never talks HTTP to Salesforce, Dynamics or any other provider
//! itself. It asks a [`Provider`] found in the [`Registry`] by the integration's provider name,
//! and gets back data or a [`ProviderError`] whose [`ErrorCode`] tells it whether retrying can help.
//!
//! The major components are:
//!
//! * [`Provider`]: what every provider client implements.
//! * [`Registry`]: provider name → client, built once at start-up.
//! * [`ErrorCode`] / [`ProviderError`]: the error vocabulary shared with the engine; the codes
//!   are the ones the sync history records, so they are spelled as the history spells them.
//!
//! Adapters must not touch the shard store, the queues or the secret store: credentials come in
//! as arguments and refreshed credentials go back as return values, so the engine decides what
//! is persisted and when.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A client for one external system.
pub trait Provider: Send + Sync {
    /// The provider's name as integrations spell it (`salesforce`, `dynamics`, ...).
    fn name(&self) -> &'static str;
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
}

impl ErrorCode {
    /// Whether the operation may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimit | Self::Timeout | Self::ServiceUnavailable | Self::ConnectionReset
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
}

impl ProviderError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
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
                ErrorCode::ConnectionReset
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

    struct Named(&'static str);
    impl Provider for Named {
        fn name(&self) -> &'static str {
            self.0
        }
    }

    #[test]
    fn registry_finds_providers_by_name() {
        let registry = Registry::empty().with(Arc::new(Named("salesforce")));
        assert!(registry.get("salesforce").is_some());
        assert!(registry.get("zoom").is_none());
        assert_eq!(registry.names().collect::<Vec<_>>(), ["salesforce"]);
    }
}
