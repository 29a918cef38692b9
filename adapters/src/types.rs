//! The data that crosses between the engine and the adapters.

use std::collections::BTreeMap;
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
    /// Whether the integration writes records back: a provider whose tokens are scoped asks
    /// for one that may write.
    pub writes: bool,
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
            writes: false,
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

    pub fn remove(&mut self, name: &str) {
        self.0.remove(name);
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
    /// Where an incremental sync starts: the cursor a previous sync of the entity ended with,
    /// as the adapter wrote it; `None` for everything. Adapters keep it inclusive, so a record
    /// modified at exactly the cursor is read again rather than missed.
    pub cursor: Option<String>,
    /// Continues after the page that returned it.
    pub page_token: Option<String>,
    /// Provider-syntax filters (`Type = 'Customer'`).
    pub filters: Vec<String>,
    /// Records wanted per page; adapters may return fewer.
    pub page_size: usize,
    /// A time no later than when the read that left `cursor` began. An adapter whose records are stamped as a save
    /// begins, and seen only once it commits, reads a few minutes before the cursor for those
    /// committed late; once a read began that long after the cursor, nothing stamped before it
    /// can still be uncommitted, and it reads from the cursor itself.
    pub cursor_read_at: Option<DateTime<Utc>>,
}

impl FetchRequest {
    /// Where a read stamped by when a save began starts: `lookback` before `cursor`, unless
    /// the read that left the cursor began `lookback` after it or later, when nothing stamped
    /// before the cursor can still have been uncommitted.
    pub fn read_from(&self, cursor: DateTime<Utc>, lookback: chrono::Duration) -> DateTime<Utc> {
        match self.cursor_read_at {
            Some(read) if read >= cursor + lookback => cursor,
            _ => cursor - lookback,
        }
    }

    /// Refuses a cursor for an entity listed whole on every sync (see
    /// `Pull::lists_everything`), which the provider never gives one for: a cursor stored for
    /// it came from elsewhere, and reading "since" it would not be a whole listing. The engine
    /// then drops it and reads the entity from the start.
    pub fn listed_whole(&self) -> Result<(), ProviderError> {
        match self.cursor {
            Some(_) if self.page_token.is_none() => Err(ProviderError::resync_required(format!(
                "`{}` is listed whole and takes no cursor",
                self.entity
            ))),
            _ => Ok(()),
        }
    }
}

/// A record as the provider has it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    pub id: String,
    /// When the record last changed at the provider, where it says (a `SystemModstamp`,
    /// Dataverse's `modifiedon`, an export's modified column).
    pub modified_at: Option<DateTime<Utc>>,
    /// The provider says the record is gone (tombstone, `IsDeleted`).
    pub deleted: bool,
    pub fields: Map<String, Value>,
    /// Until when a complete listing of its entity ([`crate::Pull::lists_everything`]) lists
    /// the record while the provider holds it, where the provider stops listing records that
    /// age (Zoom lists a meeting only until it expires). A listing that leaves the record out
    /// after this time says nothing of its deletion. `None`: listed for as long as it is held.
    pub listed_until: Option<DateTime<Utc>>,
}

impl Record {
    /// The tombstone of a record the provider reports deleted without saying when (a delete
    /// notification, a list of deleted ids).
    pub fn gone(id: String) -> Self {
        Self {
            id,
            deleted: true,
            ..Self::default()
        }
    }
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
    /// Where the next sync starts if the entity ends after this page (see
    /// [`crate::Pull::newer_cursor`]).
    pub cursor: Option<String>,
    /// Records the provider gave that could not be read (an export's malformed row), or could
    /// not give (a Drive search it says came back incomplete): each is listed in the sync's
    /// history as a failed record, and the page goes on.
    pub unreadable: Vec<Unreadable>,
}

/// A record that could not be read, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    /// Its id, when that much could be read.
    pub record_id: Option<String>,
    /// Where it is and what is wrong with it.
    pub message: String,
}

use crate::ProviderError;

/// Records deleted in the provider since a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deleted {
    pub ids: Vec<String>,
    /// The provider no longer knows deletions as far back as asked: only a listing of the
    /// entity whole, its leftovers checked with [`crate::Pull::gone`], can find them.
    pub full_resync_required: bool,
    /// How far the provider's log of deletions was read, by its own clock: the next check
    /// starts there. It moves on whether or not the entity's records changed, so an entity
    /// nobody edits keeps within the time the provider remembers deletions.
    pub covered_until: Option<DateTime<Utc>>,
    /// Spans of the log the provider would not list (more deletions in one minute than it
    /// lists at once), described for the sync's history: their deletions are not known.
    pub unread: Vec<String>,
}

/// What the provider says of the records a listing from the start left out ([`crate::Pull::gone`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeftOut {
    /// No longer held: deleted, or purged since.
    pub gone: Vec<String>,
    /// How many the provider answered nothing of, where that may mean out of the integration
    /// user's sight as well as purged: their shards stay.
    pub undecided: usize,
    /// The integration's share of the allocation is used up: the questions stopped there.
    /// What was answered is above; the `unasked` ids, and anything after, wait for a later run.
    pub stopped: Option<crate::ProviderError>,
    /// How many ids were not asked about, the questions having stopped.
    pub unasked: usize,
}

/// A webhook delivery as the receiver got it.
#[derive(Debug, Clone)]
pub struct WebhookRequest<'a> {
    /// The URL the delivery was posted to, as the receiver saw it.
    pub url: &'a str,
    pub headers: &'a [(String, Vec<String>)],
    /// The URL's query parameters, decoded.
    pub query: &'a BTreeMap<String, String>,
    pub body: Option<&'a str>,
}

impl WebhookRequest<'_> {
    /// The first value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, values)| values.first())
            .map(String::as_str)
    }
}

/// What a delivery is, before anything in it is trusted.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookRoute {
    /// A handshake the provider makes when a subscription is created (Microsoft Graph's
    /// `validationToken`), answered at once without an integration.
    Handshake(WebhookAnswer),
    /// Notifications for the integrations these keys name, one or more.
    To(Vec<RouteKey>),
}

/// How a delivery names the one integration it is for; the provider chooses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKey {
    /// The integration whose connection setting `name` has this value (Salesforce's and
    /// Dataverse's `organizationId`).
    Setting { name: &'static str, value: String },
    /// The integration holding this provider-side subscription (a Graph subscriptionId, a
    /// Drive channel id).
    Subscription(String),
    /// The integration with this id, named in the URL the operator gave the provider (Zoom,
    /// whose app-level deliveries carry no account a URL could not).
    Integration(String),
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setting { name, value } => write!(f, "{name} `{value}`"),
            Self::Subscription(id) => write!(f, "subscription `{id}`"),
            Self::Integration(id) => write!(f, "integration `{id}`"),
        }
    }
}

/// The answer to a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl WebhookAnswer {
    pub fn new(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: content_type.to_string(),
            body: body.into(),
        }
    }
}

/// A verified delivery: what it says, and what to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    pub notifications: Vec<WebhookNotification>,
    pub answer: WebhookAnswer,
}

/// One notification of a delivery. Each has an id, unique per notification and repeated by the
/// provider's redeliveries.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookNotification {
    /// These records changed. Only which ones: whatever fields a notification carries may be a
    /// subset or stale, so the engine reads the records itself.
    Records {
        id: String,
        entity: String,
        record_ids: Vec<String>,
    },
    /// These records were deleted at the provider.
    Deleted {
        id: String,
        entity: String,
        record_ids: Vec<String>,
    },
    /// Something of the entity changed (the notification does not say what): an incremental
    /// sync of it catches up.
    CatchUp { id: String, entity: String },
    /// The provider asks for something about a subscription.
    Subscription {
        id: String,
        subscription_id: String,
        action: SubscriptionAction,
    },
}

impl WebhookNotification {
    pub fn id(&self) -> &str {
        match self {
            Self::Records { id, .. }
            | Self::Deleted { id, .. }
            | Self::CatchUp { id, .. }
            | Self::Subscription { id, .. } => id,
        }
    }
}

/// What a provider asks of a subscription (Graph lifecycle notifications).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionAction {
    /// Renew it now (`reauthorizationRequired`).
    Renew,
    /// It is gone: create it again and catch up (`subscriptionRemoved`).
    Recreate,
    /// Notifications were lost: catch up (`missed`).
    CatchUp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// This provider delivers no webhooks.
    #[error("{0}")]
    Unsupported(String),
    /// The delivery cannot be read.
    #[error("{0}")]
    Malformed(String),
    /// The delivery is not from whom it claims (a wrong key, signature or clientState).
    #[error("{0}")]
    Forged(String),
    /// The credentials keep no secret for the subscription or channel the delivery names.
    /// Unverified, but not yet a forgery: the subscription may be newer than the credentials
    /// the delivery was checked with.
    #[error("{0}")]
    NotKept(String),
}

/// A subscription to create.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRequest {
    pub resource: String,
    pub notification_url: String,
    pub lifecycle_url: String,
    /// The secret every notification of the subscription carries back.
    pub client_state: String,
    pub expires_at: DateTime<Utc>,
}

/// A subscription the provider created.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionInfo {
    pub id: String,
    pub resource: String,
    pub expires_at: DateTime<Utc>,
    /// What the provider also needs to stop it (a Drive channel's `resourceId`).
    pub resource_id: Option<String>,
}

/// A write to one record at the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordWrite {
    pub entity: String,
    /// The record written to; `None` for a create.
    pub external_id: Option<String>,
    pub fields: Map<String, Value>,
    /// The version the write is based on (a SystemModstamp, an `@odata.etag`); the provider
    /// refuses the write if the record has moved on.
    pub expected_version: Option<String>,
    /// The same for every attempt of one write.
    pub idempotency_key: String,
    /// For a create: the provider field the idempotency key is kept in (an External ID field,
    /// a column), so that a retried create finds the record a first attempt made instead of
    /// making another. A create without one is refused.
    pub key_field: Option<String>,
}

#[cfg(test)]
impl RecordWrite {
    /// A delete of a shard no record is linked to, whose mapping names a key field: what a
    /// writer that creates records looks the record up by.
    pub(crate) fn unlinked_delete(entity: &str) -> Self {
        Self {
            entity: entity.into(),
            external_id: None,
            fields: Map::new(),
            expected_version: None,
            idempotency_key: "shard-1".into(),
            key_field: Some("castiel_id".into()),
        }
    }
}

impl RecordWrite {
    /// The field a create keys its record by, or why it cannot be created safely.
    pub fn create_key(&self) -> Result<&str, crate::ProviderError> {
        self.key_field.as_deref().ok_or_else(|| {
            crate::ProviderError::new(
                crate::ErrorCode::ValidationError,
                format!(
                    "creating `{}` records needs a field to keep the idempotency key in \
                     (the mapping's idempotencyField), or a retried create could make a second record",
                    self.entity
                ),
            )
        })
    }

    /// Refuses, before any request, a write of a field the provider sets itself (a size, a
    /// link, a time): the error names it and what `what` (a OneDrive item, a Drive file) takes.
    pub fn check_writable(
        &self,
        writable: &[&str],
        what: &str,
    ) -> Result<(), crate::ProviderError> {
        match self.fields.keys().find(|f| !writable.contains(&f.as_str())) {
            None => Ok(()),
            Some(field) => Err(crate::ProviderError::new(
                crate::ErrorCode::ValidationError,
                format!(
                    "`{field}` of {what} cannot be written: the provider sets it (writable: {})",
                    writable.join(", ")
                ),
            )),
        }
    }
}

/// What a write left at the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub external_id: String,
    /// The record's version after the write, when the provider says.
    pub version: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_goes_back_before_its_cursor_until_a_read_began_long_enough_after_it() {
        let at = |minute: u32| {
            chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 7, 10, minute, 0).unwrap()
        };
        let lookback = chrono::Duration::minutes(5);
        let request = |read| FetchRequest {
            entity: "Account".into(),
            fields: vec![],
            cursor: Some("2026-12-07T10:00:00.000Z".into()),
            page_token: None,
            filters: vec![],
            page_size: 2000,
            cursor_read_at: read,
        };
        let cursor = at(30);
        assert_eq!(request(None).read_from(cursor, lookback), at(25));
        assert_eq!(
            request(Some(at(31))).read_from(cursor, lookback),
            at(25),
            "a record stamped at 10:27 may have committed after 10:31"
        );
        assert_eq!(
            request(Some(at(35))).read_from(cursor, lookback),
            at(30),
            "by 10:35 everything stamped before 10:30 had committed"
        );
    }

    #[test]
    fn an_entity_listed_whole_refuses_a_cursor_for_a_resync_but_not_a_listing_under_way() {
        let mut request = FetchRequest {
            entity: "meetings".into(),
            fields: vec![],
            cursor: None,
            page_token: None,
            filters: vec![],
            page_size: 300,
            cursor_read_at: None,
        };
        assert!(request.listed_whole().is_ok());
        request.cursor = Some("2026-01-01".into());
        let refused = request.listed_whole().unwrap_err();
        assert!(refused.resync, "{refused}");
        assert!(refused.message.contains("`meetings`"), "{refused}");
        request.page_token = Some("next".into());
        assert!(request.listed_whole().is_ok());
    }
}
