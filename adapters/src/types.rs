//! The data that crosses between the engine and the adapters.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::credentials::{CredentialKeeper, InMemory};
use crate::http::RetryPolicy;

/// One integration's connection for the length of a job.
pub struct Connection {
    pub integration_id: String,
    /// The integration's `connection` settings (login host, instance, folder, limits, ...).
    pub settings: Map<String, Value>,
    pub credentials: Credentials,
    /// Where refreshed credentials are stored, and the lease that serialises refreshes; see
    /// [`crate::credentials`].
    pub keeper: Arc<dyn CredentialKeeper>,
    /// How a failed request is retried in place.
    pub retry: RetryPolicy,
}

impl Connection {
    /// A connection whose credentials live only as long as it does.
    pub fn new(
        integration_id: &str,
        settings: Map<String, Value>,
        credentials: Credentials,
    ) -> Self {
        let keeper = Arc::new(InMemory::new(credentials.clone()));
        Self::with_keeper(integration_id, settings, credentials, keeper)
    }

    /// A connection whose refreshed credentials are kept by `keeper`.
    pub fn with_keeper(
        integration_id: &str,
        settings: Map<String, Value>,
        credentials: Credentials,
        keeper: Arc<dyn CredentialKeeper>,
    ) -> Self {
        Self {
            integration_id: integration_id.to_string(),
            settings,
            credentials,
            keeper,
            retry: RetryPolicy::default(),
        }
    }

    /// A string setting.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings.get(name).and_then(Value::as_str)
    }

    /// A numeric setting.
    pub fn setting_f64(&self, name: &str) -> Option<f64> {
        self.settings.get(name).and_then(Value::as_f64)
    }
}

/// An integration's credentials: a JSON object of tokens and keys. Prints as `<redacted>`.
#[derive(Clone, Default, PartialEq)]
pub struct Credentials(Map<String, Value>);

impl Credentials {
    pub fn new(values: Map<String, Value>) -> Self {
        Self(values)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.0.insert(name.to_string(), Value::String(value.into()));
    }

    pub fn into_inner(self) -> Map<String, Value> {
        self.0
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// What to fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchRequest {
    /// The provider's entity (`Account`) or export name (`accounts`).
    pub entity: String,
    /// The source fields the mapping reads; adapters may return more.
    pub fields: Vec<String>,
    /// Only records modified at or after this instant (inclusive, so a record modified at
    /// exactly the cursor is never skipped); `None` for everything.
    pub since: Option<DateTime<Utc>>,
    /// Continues after the page that returned it.
    pub page_token: Option<String>,
    /// Provider-syntax filters (`Type = 'Customer'`).
    pub filters: Vec<String>,
    /// Records wanted per page; adapters may return fewer.
    pub page_size: usize,
}

/// A record as the provider has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub modified_at: Option<DateTime<Utc>>,
    /// The provider says the record is gone (tombstone, `IsDeleted`).
    pub deleted: bool,
    pub fields: Map<String, Value>,
}

/// One page of records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub records: Vec<Record>,
    /// `None` when the entity has no more records.
    pub next_page: Option<String>,
    /// The query the provider ran, for the history's `syncDetails`.
    pub query: Option<String>,
    /// Set when the provider's allocation ran low: the engine processes this page, then stops
    /// the job as partial and resumes on the next run.
    pub stop_after: Option<ProviderError>,
}

use crate::ProviderError;

/// Records deleted in the provider since a point in time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deleted {
    pub ids: Vec<String>,
    /// The provider no longer knows deletions as far back as asked: only a full resync can
    /// find them.
    pub full_resync_required: bool,
}

/// A webhook delivery as the receiver got it.
#[derive(Debug, Clone)]
pub struct WebhookRequest<'a> {
    pub headers: &'a [(String, Vec<String>)],
    pub body: Option<&'a str>,
}

/// A verified-to-parse webhook delivery: whom it is from and which records it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    /// Identifies the sending account (Salesforce OrganizationId); the receiver must match it
    /// to exactly one integration before trusting anything else in the delivery.
    pub account_id: String,
    pub notifications: Vec<WebhookNotification>,
    /// What to answer on success (content type, body).
    pub ack: (String, String),
}

/// One notification of a delivery: a record that changed. Only which one: whatever fields a
/// notification carries may be a subset or stale, so the engine reads the record itself.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookNotification {
    /// Unique per notification; redeliveries repeat it.
    pub id: String,
    pub entity: String,
    pub record_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Malformed(String),
}
