//! Why a job, or one record of it, failed: in the sync history's words.
//!
//! Adapters report what went wrong at the provider as a [`ProviderError`] with an
//! [`ErrorCode`]. The engine's own parts fail in ways no adapter can: its shard store, a queue
//! message it cannot read, a provider this build has no adapter for. [`Failure`] covers both,
//! and [`FailureCode::as_str`] is the one place either becomes a history code.

use std::fmt;

use adapters::{ErrorCode, ProviderError};

use crate::store::StoreError;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCode {
    /// The provider, as its adapter said.
    Provider(ErrorCode),
    /// The shard store or the integration's state could not be read or written.
    Store,
    /// A queue message the engine cannot read.
    InvalidMessage,
    /// The integration names a provider this build has no adapter for.
    ProviderNotSupported,
    /// Another job holds the integration: this one's hold lapsed while it ran (it stalled for
    /// longer than the lease), and the other carries on from the last checkpoint.
    Superseded,
    /// The integration is paused, or in error until someone sets new credentials: a webhook's
    /// job or a write-back is kept, dead-lettered, for an operator to replay once it is active
    /// again.
    IntegrationNotActive,
}

impl FailureCode {
    /// Whether the same job may succeed if run again later.
    pub fn is_retryable(self) -> bool {
        match self {
            Self::Provider(code) => code.is_retryable(),
            Self::Store => true,
            Self::InvalidMessage
            | Self::ProviderNotSupported
            | Self::Superseded
            | Self::IntegrationNotActive => false,
        }
    }

    /// The code as the sync history spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider(code) => code.as_str(),
            Self::Store => "STORE_ERROR",
            Self::InvalidMessage => "INVALID_MESSAGE",
            Self::ProviderNotSupported => "PROVIDER_NOT_SUPPORTED",
            Self::Superseded => "SUPERSEDED",
            Self::IntegrationNotActive => "INTEGRATION_NOT_ACTIVE",
        }
    }

    /// The credentials were refused: only new ones can help.
    pub fn needs_new_credentials(self) -> bool {
        matches!(
            self,
            Self::Provider(ErrorCode::AuthenticationFailed | ErrorCode::InvalidCredentials)
        )
    }
}

impl From<ErrorCode> for FailureCode {
    fn from(code: ErrorCode) -> Self {
        Self::Provider(code)
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for FailureCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A failed job or record. The message is safe to log and to keep in the history.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
    /// The provider's allocation is used up for now: the job stops where it is and the next
    /// scheduled run resumes it.
    pub resume_next_run: bool,
    /// When that allocation comes back, where the provider says.
    pub resume_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Failure {
    pub fn new(code: impl Into<FailureCode>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            resume_next_run: false,
            resume_at: None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

/// Whether a provider error is one that waiting or new credentials can mend: throttling, an
/// outage, a used-up allocation, refused credentials. A job meeting one stops to be taken up
/// again, where it would otherwise go on without what the provider would not answer (the
/// leftovers of a listing left as they are).
pub fn mends_later(e: &ProviderError) -> bool {
    e.is_retryable() || e.resume_next_run || FailureCode::from(e.code).needs_new_credentials()
}

impl From<ProviderError> for Failure {
    fn from(e: ProviderError) -> Self {
        Self {
            resume_next_run: e.resume_next_run,
            resume_at: e.resume_at,
            ..Self::new(e.code, e.message)
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::new(FailureCode::Store, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_and_provider_failures_are_spelled_and_retried_as_the_history_expects() {
        let cases = [
            (FailureCode::Store, "STORE_ERROR", true),
            (FailureCode::InvalidMessage, "INVALID_MESSAGE", false),
            (
                FailureCode::ProviderNotSupported,
                "PROVIDER_NOT_SUPPORTED",
                false,
            ),
            (FailureCode::Superseded, "SUPERSEDED", false),
            (
                FailureCode::IntegrationNotActive,
                "INTEGRATION_NOT_ACTIVE",
                false,
            ),
            (ErrorCode::RateLimit.into(), "RATE_LIMIT", true),
            (
                ErrorCode::AuthenticationFailed.into(),
                "AUTHENTICATION_FAILED",
                false,
            ),
        ];
        for (code, spelled, retryable) in cases {
            assert_eq!((code.as_str(), code.is_retryable()), (spelled, retryable));
        }
        assert!(FailureCode::from(ErrorCode::InvalidCredentials).needs_new_credentials());
        assert!(!FailureCode::Store.needs_new_credentials());
    }

    #[test]
    fn waiting_or_new_credentials_mend_throttling_quotas_and_refused_credentials_only() {
        let mended = |code| mends_later(&ProviderError::new(code, "x"));
        assert!(mended(ErrorCode::RateLimit));
        assert!(mended(ErrorCode::AuthenticationFailed));
        assert!(mends_later(&ProviderError::quota("daily allocation")));
        assert!(!mended(ErrorCode::ValidationError));
        assert!(!mended(ErrorCode::NotFound));
    }
}
