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

pub mod api;
pub mod bulk_import;
pub mod credentials;
pub mod dynamics;
pub mod gong;
pub mod google_drive;
pub mod graph;
pub mod http;
pub mod microsoft;
pub mod oauth;
mod rate_limit;
pub mod salesforce;
mod types;
pub mod zoom;

pub use rate_limit::RateLimiter;
pub use types::*;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// A client for one external system: its name, its connection settings, and the capabilities
/// it has. Each capability is a trait of its own, and a provider opts into the ones its API
/// allows, the way a pipeline separates sources from sinks: every provider pulls; only some
/// refresh tokens ahead of expiry, receive webhooks, keep provider-side subscriptions alive or
/// take writes.
pub trait Provider: Pull {
    /// The provider's name as integrations spell it (`salesforce`, `dynamics365`, ...).
    fn name(&self) -> &'static str;

    /// Checks an integration's `connection` settings when the integration is registered, and
    /// puts them in the form the adapter keeps (an id in its canonical spelling, a host without
    /// a trailing slash). The error names the setting and what is wrong with it.
    fn check_connection(&self, _settings: &mut Map<String, Value>) -> Result<(), String> {
        Ok(())
    }

    /// Checks the entities an integration maps, when it is registered: names the provider
    /// could not tell apart. The error names the entities and why.
    fn check_entities(&self, _entities: &[&str]) -> Result<(), String> {
        Ok(())
    }

    /// Whether the provider applies an integration's `pullFilters` and a mapping's `filters`
    /// (conditions in its own query language) to what it reads. Registration refuses filters
    /// for one that does not: it would sync what they were meant to leave out.
    fn applies_filters(&self) -> bool {
        false
    }

    /// Refreshing credentials before they expire, for providers whose tokens say when.
    fn token_refresh(&self) -> Option<&dyn TokenRefresh> {
        None
    }

    /// Receiving the provider's webhook deliveries.
    fn webhooks(&self) -> Option<&dyn Webhooks> {
        None
    }

    /// Creating and renewing provider-side subscriptions that deliver those webhooks.
    fn subscriptions(&self) -> Option<&dyn Subscriptions> {
        None
    }

    /// Writing records back to the provider.
    fn write_back(&self) -> Option<&dyn WriteBack> {
        None
    }
}

/// Reading records: pages of an entity under an opaque cursor, deletions, and records by id.
///
/// The cursor is the adapter's alone (a timestamp for Salesforce, a `@odata.deltaLink` for
/// Microsoft Graph and Dataverse, a page token for Google Drive): the engine stores it when an
/// entity finishes, checkpoints it, and hands it back in [`FetchRequest::cursor`], and never
/// reads it.
#[async_trait]
pub trait Pull: Send + Sync {
    /// One page of an entity's records. `request.page_token` continues a previous page;
    /// without one, the sync starts at `request.cursor` (or at the beginning without one).
    /// Records the provider reports deleted come with [`Record::deleted`]. A cursor the provider
    /// no longer honours fails with [`ProviderError::resync_required`].
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError>;

    /// Whether deletions of `entity` come from [`Pull::fetch_deleted`] rather than in its
    /// pages: the provider is then asked once more after the entity's last page.
    fn reports_deletions_apart(&self, _entity: &str) -> bool {
        false
    }

    /// Records of `entity` deleted since `since`, for providers whose pages do not carry
    /// deletions ([`Pull::reports_deletions_apart`]); asked once a sync of the entity has read
    /// its last page. `None` (a first
    /// sync, or one after a resync) asks for as far back as the provider remembers: a full
    /// sync lists no deleted record, but the shards of records deleted since the last sync
    /// are still there.
    async fn fetch_deleted(
        &self,
        _conn: &mut Connection,
        _entity: &str,
        _since: Option<DateTime<Utc>>,
    ) -> Result<Deleted, ProviderError> {
        Ok(Deleted::default())
    }

    /// Of two cursors pages of one sync returned, the one the next sync starts from. The later
    /// page's by default; an adapter whose cursor is a high-water mark over records that may
    /// come in any order keeps the greater.
    fn newer_cursor(&self, _earlier: String, later: String) -> String {
        later
    }

    /// Whether a sync of `entity` without a cursor lists every record the provider has, so that
    /// a record it did not list is gone (providers that report no deletions: Zoom meetings,
    /// Gong users). The engine then soft-deletes what a complete listing left out, but for a
    /// record listed only until a time that has passed ([`Record::listed_until`]). Such an
    /// entity takes no cursor: its adapter refuses one with [`FetchRequest::listed_whole`].
    fn lists_everything(&self, _entity: &str) -> bool {
        false
    }

    /// Whether complete listings of `entity` stop listing records some time before the
    /// provider deletes them (Zoom's expired meetings), each record saying until when
    /// ([`Record::listed_until`]). A shard synced before its record said is then not taken for
    /// deleted when a listing leaves the record out: it may have aged out unseen.
    fn lists_for_a_time(&self, _entity: &str) -> bool {
        false
    }

    /// Whether `request`, read from the start (no cursor, no page token), lists every record of
    /// its entity the provider holds, though the entity is read from a cursor after that: a
    /// delta query's first round (Dataverse change tracking, OneDrive), a listing before a
    /// changes feed (Google Drive). Once the entity was synced, such a read (a full sync, or a
    /// cursor the provider no longer honours read again from the start) is compared like a
    /// complete listing: the deletions since the last sync, which only the cursor given up
    /// would have told, are what it leaves out and [`Pull::gone`] confirms.
    fn lists_everything_from_start(
        &self,
        _settings: &Map<String, Value>,
        _request: &FetchRequest,
    ) -> bool {
        false
    }

    /// Of the records of `entity` that a listing from the start left out (`ids`, from the
    /// links of their shards), those the provider no longer holds: what the engine then
    /// soft-deletes. All of them by default, for a listing the provider says is complete
    /// ([`Pull::lists_everything`]). A provider relisted after it lost its deletions
    /// (Salesforce) checks them first, since its full read leaves out records it still holds
    /// (outside the mapping's filters, archived activities), and leaves undecided those it
    /// cannot tell purged from out of the integration user's sight.
    async fn gone(
        &self,
        _conn: &mut Connection,
        _entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        Ok(LeftOut {
            gone: ids,
            ..LeftOut::default()
        })
    }

    /// Whether a sync may be given an older version of a record after a newer one: exports read
    /// again, a backfill of last month's versions. The engine then keeps, for each shard, the
    /// modified time of the version it was written from, and skips older versions. An API that
    /// serves each record as it is now answers no: a record whose time went back (an
    /// environment restored from a backup) is still what the provider holds.
    fn serves_older_versions(&self) -> bool {
        false
    }

    /// The time a cursor stands for, when it stands for one, for the sync history's
    /// `syncFromDate`.
    fn cursor_time(&self, _cursor: &str) -> Option<DateTime<Utc>> {
        None
    }

    /// The version of a record as read, in the form a write-back's `expected_version` takes
    /// (a `SystemModstamp`, an `@odata.etag`), when the provider versions its records: an
    /// update based on it is refused if the record changed after it was read.
    fn version_of(&self, _record: &Record) -> Option<String> {
        None
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
            ErrorCode::ValidationError,
            format!("`{}` records cannot be read by id", request.entity),
        ))
    }
}

/// The most leftovers of one page of a listing's comparison (a thousand shards) asked about:
/// more is a change of the listing's scope (a drive no longer read, rows the integration user
/// may no longer see), not deletions, and their shards stay rather than go all at once.
pub(crate) const LOOKUPS_PER_PAGE: usize = 100;

/// Whether a lookup of a listing's leftovers that failed with `e` fails the comparison, to be
/// tried again, rather than leave its records undecided: it may succeed later, or with new
/// credentials (credentials the provider, or its token endpoint, no longer takes are not one
/// record's).
pub(crate) fn fails_the_comparison(e: &ProviderError) -> bool {
    e.code.is_retryable()
        || e.resume_next_run
        || matches!(
            e.code,
            ErrorCode::AuthenticationFailed | ErrorCode::InvalidCredentials
        )
}

/// Of `ids`, a listing's leftovers, those [`Pull::fetch_by_ids`] no longer finds, or finds
/// deleted: what a provider that reads records by id says is gone. A record still there (out
/// of the listing's scope since its settings changed, or moved across its pages while they
/// were read) keeps its shard. Ids are asked `at_once` to a request; a request refused for
/// good (a record the integration may no longer read) leaves its ids undecided, and one that
/// may succeed later, or with new credentials, fails the comparison, to be tried again.
pub(crate) async fn gone_unless_found<P: Pull + ?Sized>(
    provider: &P,
    conn: &mut Connection,
    entity: &str,
    ids: Vec<String>,
    at_once: usize,
) -> Result<LeftOut, ProviderError> {
    let mut left = LeftOut::default();
    if ids.len() > LOOKUPS_PER_PAGE {
        left.undecided = ids.len();
        return Ok(left);
    }
    let request = FetchRequest {
        entity: entity.to_string(),
        fields: Vec::new(),
        cursor: None,
        page_token: None,
        filters: Vec::new(),
        page_size: at_once.max(1),
        cursor_read_at: None,
    };
    for chunk in ids.chunks(at_once.max(1)) {
        let found: std::collections::HashSet<String> =
            match provider.fetch_by_ids(conn, &request, chunk).await {
                Ok(records) => records
                    .into_iter()
                    .filter(|r| !r.deleted)
                    .map(|r| r.id.to_ascii_lowercase())
                    .collect(),
                Err(e) if fails_the_comparison(&e) => return Err(e),
                Err(_) => {
                    left.undecided += chunk.len();
                    continue;
                }
            };
        left.gone.extend(
            chunk
                .iter()
                .filter(|id| !found.contains(&id.to_ascii_lowercase()))
                .cloned(),
        );
    }
    Ok(left)
}

/// A cursor kept with the scope it reads (`<scope> <cursor>`): the drive a delta link reads,
/// the drives a changes token covers. A cursor read under settings that name another scope
/// reads nothing of what the new one already held, so it is not followed. Scopes hold no space.
pub(crate) fn keep_scoped(scope: &str, cursor: &str) -> String {
    format!("{scope} {cursor}")
}

/// A cursor as [`keep_scoped`] kept it.
#[derive(Debug, PartialEq)]
pub(crate) enum Kept<'a> {
    /// Kept under the scope asked for.
    Scoped(&'a str),
    /// Kept before cursors named their scope: the adapter decides whether to follow it.
    Unscoped(&'a str),
}

/// The cursor `kept` under `scope`; one kept under another scope asks for the entity to be read
/// again (`what` names the cursor in the error).
pub(crate) fn kept_under<'a>(
    scope: &str,
    kept: &'a str,
    what: &str,
) -> Result<Kept<'a>, ProviderError> {
    match kept.split_once(' ') {
        Some((of, cursor)) if of == scope => Ok(Kept::Scoped(cursor)),
        Some((of, _)) => Err(ProviderError::resync_required(format!(
            "the {what} reads `{of}`; the integration now reads `{scope}`"
        ))),
        None => Ok(Kept::Unscoped(kept)),
    }
}

/// Refreshing an integration's access token before it expires.
#[async_trait]
pub trait TokenRefresh: Send + Sync {
    /// Refreshes `conn`'s credentials through [`credentials::refresh`] (stored before use, one
    /// refresh per integration at a time) and returns when the new access token expires.
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError>;
}

/// Receiving webhook deliveries.
///
/// A delivery is handled in two steps. [`Webhooks::route`] reads, without trusting anything,
/// whom the delivery is for (or answers a handshake that needs no integration); the engine maps
/// each [`RouteKey`] to exactly one integration. [`Webhooks::verify`] then checks the delivery
/// with that integration's connection and secrets (a shared key, a signature, a `clientState`)
/// and only then reads what it says.
#[async_trait]
pub trait Webhooks: Send + Sync {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError>;

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError>;
}

/// Provider-side subscriptions that deliver change notifications (Microsoft Graph), each with
/// an expiry the engine renews before it passes.
#[async_trait]
pub trait Subscriptions: Send + Sync {
    /// The resources an integration subscribes to, from its settings and mapped entities.
    fn resources(&self, settings: &Map<String, Value>, entities: &[String]) -> Vec<String>;

    /// The longest a subscription to `resource` may live.
    fn max_lifetime(&self, resource: &str) -> chrono::Duration;

    /// Creates a subscription to `request.resource`; the provider calls the notification URL to
    /// validate it before answering.
    async fn subscribe(
        &self,
        conn: &mut Connection,
        request: &SubscriptionRequest,
    ) -> Result<SubscriptionInfo, ProviderError>;

    /// Moves a subscription's expiry; `NotFound` when the provider no longer has it or cannot
    /// renew one (Drive channels), and the engine replaces it with a new one.
    async fn renew(
        &self,
        conn: &mut Connection,
        subscription: &SubscriptionInfo,
        expires_at: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ProviderError>;

    /// Deletes a subscription; one the provider no longer has counts as deleted.
    async fn unsubscribe(
        &self,
        conn: &mut Connection,
        subscription: &SubscriptionInfo,
    ) -> Result<(), ProviderError>;
}

/// Writing records back to the provider. Every call carries an idempotency key, the same for a
/// redelivered or retried write, so that a write that may have happened is not made twice.
#[async_trait]
pub trait WriteBack: Send + Sync {
    /// Whether the integration may write now, asked before a write-back reads or writes
    /// anything: an allocation known to be used up refuses it (a quota error, which holds the
    /// write-back), so that a held write spends no request. By default, always.
    fn may_write(&self, _conn: &Connection) -> Result<(), ProviderError> {
        Ok(())
    }

    /// The only fields of `entity` a write may set, where the provider lets few be written (a
    /// file's name, description and folder): the engine leaves the others out, as it does
    /// [`WriteBack::read_only_fields`]. None by default: any field may be.
    fn writable_fields(&self, _entity: &str) -> Option<&'static [&'static str]> {
        None
    }

    /// The fields of `entity` the provider does not let a create (`creating`) or an update
    /// set: the engine leaves them out of the write, which would otherwise be refused whole,
    /// and names them in the history. None by default: an adapter that knows its fields
    /// refuses the ones it cannot write itself.
    async fn read_only_fields(
        &self,
        _conn: &mut Connection,
        _entity: &str,
        _creating: bool,
    ) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }

    async fn create(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError>;

    /// Updates `write.external_id`; with `write.expected_version`, only if the provider's
    /// version is still that one ([`ErrorCode::Conflict`] otherwise).
    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError>;

    /// Deletes `write.external_id`, or without one the record a create keyed by the write's
    /// idempotency key in `write.key_field` made (a create whose answer was lost, then the
    /// shard deleted); a record already gone, or never made, counts as deleted.
    async fn delete(&self, conn: &mut Connection, write: &RecordWrite)
    -> Result<(), ProviderError>;
}

/// Whether a secret a delivery brought is the one kept, compared in time that does not depend
/// on where they differ (a timing side channel would reveal a key byte by byte).
pub fn same_secret(given: &str, kept: &str) -> bool {
    given.len() == kept.len()
        && given
            .bytes()
            .zip(kept.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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
            .with(Arc::new(dynamics::Dynamics365::new()))
            .with(Arc::new(graph::onedrive::OneDrive::new()))
            .with(Arc::new(graph::teams::Teams::new()))
            .with(Arc::new(google_drive::GoogleDrive::new()))
            .with(Arc::new(zoom::Zoom::new()))
            .with(Arc::new(gong::Gong::new()))
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

/// Why an operation against an external system failed.
///
/// The first four are transient: the same request may succeed later. The rest are not, and
/// retrying them only burns the provider's API allocation. Failures of the engine's own parts
/// (its store, a malformed queue message) are the engine's to name, not the adapters'.
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
    /// The record changed at the provider since the version a write expected.
    Conflict,
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
            Self::Conflict => "CONFLICT",
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
    /// When to try again, where the provider says: when a used-up allocation comes back (Zoom's
    /// daily cap lifts at midnight UTC), or a `Retry-After` longer than one waited out in place.
    pub resume_at: Option<DateTime<Utc>>,
    /// The provider no longer honours the cursor (an expired delta token): only reading the
    /// entity from the beginning can find what changed.
    pub resync: bool,
}

impl ProviderError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            resume_next_run: false,
            resume_at: None,
            resync: false,
        }
    }

    /// An allocation that is used up until later (daily API limits).
    pub fn quota(message: impl Into<String>) -> Self {
        Self {
            resume_next_run: true,
            ..Self::new(ErrorCode::RateLimit, message)
        }
    }

    /// The same error, saying when the allocation comes back.
    pub fn resuming_at(self, at: DateTime<Utc>) -> Self {
        Self {
            resume_at: Some(at),
            ..self
        }
    }

    /// A cursor the provider no longer honours.
    pub fn resync_required(message: impl Into<String>) -> Self {
        Self {
            resync: true,
            ..Self::new(ErrorCode::ValidationError, message)
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.code.is_retryable()
    }
}

/// A request about one record or resource, where the provider no longer having it is an
/// answer rather than a failure: a read finds nothing, a delete finds it already deleted.
pub trait OrGone<T> {
    /// `Ok(None)` for the provider's "not found", the answer otherwise.
    fn or_gone(self) -> Result<Option<T>, ProviderError>;
}

impl<T> OrGone<T> for Result<T, ProviderError> {
    fn or_gone(self) -> Result<Option<T>, ProviderError> {
        match self {
            Ok(answer) => Ok(Some(answer)),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_the_provider_no_longer_has_is_an_answer_and_other_failures_stay_failures() {
        let gone: Result<u8, ProviderError> = Err(ProviderError::new(ErrorCode::NotFound, "404"));
        assert_eq!(gone.or_gone(), Ok(None));
        assert_eq!(Ok::<u8, ProviderError>(7).or_gone(), Ok(Some(7)));
        let refused = ProviderError::new(ErrorCode::Conflict, "412");
        assert_eq!(Err::<u8, _>(refused.clone()).or_gone(), Err(refused));
    }

    /// A provider whose every read by id fails with one code.
    struct Refusing(ErrorCode);

    #[async_trait]
    impl Pull for Refusing {
        async fn fetch_page(
            &self,
            _conn: &mut Connection,
            _request: &FetchRequest,
        ) -> Result<Page, ProviderError> {
            Err(ProviderError::new(self.0, "no listing here"))
        }

        async fn fetch_by_ids(
            &self,
            _conn: &mut Connection,
            _request: &FetchRequest,
            _ids: &[String],
        ) -> Result<Vec<Record>, ProviderError> {
            Err(ProviderError::new(self.0, "refused"))
        }
    }

    #[tokio::test]
    async fn leftovers_a_record_refusal_leaves_undecided_but_refused_credentials_fail_the_comparison()
     {
        let mut conn = Connection::new("int-1", Map::new(), Credentials::default());
        let ids = || vec!["a".to_string(), "b".to_string()];
        let left = gone_unless_found(
            &Refusing(ErrorCode::ValidationError),
            &mut conn,
            "files",
            ids(),
            1,
        )
        .await
        .unwrap();
        assert_eq!((left.gone.len(), left.undecided), (0, 2));
        for code in [
            ErrorCode::AuthenticationFailed,
            ErrorCode::InvalidCredentials,
            ErrorCode::RateLimit,
        ] {
            let refused = gone_unless_found(&Refusing(code), &mut conn, "files", ids(), 1).await;
            assert_eq!(refused.map_err(|e| e.code), Err(code));
        }
    }

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
            ErrorCode::Conflict,
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
            ]
        );
    }

    #[test]
    fn secrets_are_compared_whole() {
        assert!(same_secret("k3y", "k3y"));
        assert!(!same_secret("k3y", "k3"));
        assert!(!same_secret("k3y", "k3z"));
        assert!(!same_secret("", "k3y"));
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
        assert!(registry.get("workday").is_none());
        assert_eq!(
            registry.names().collect::<Vec<_>>(),
            [
                "bulk_import",
                "dynamics365",
                "gong",
                "google_drive",
                "onedrive",
                "salesforce",
                "teams",
                "zoom"
            ]
        );
    }

    #[test]
    fn only_exports_serve_older_versions_of_a_record() {
        let registry = Registry::standard();
        let serving: Vec<&str> = registry
            .names()
            .filter(|name| registry.get(name).unwrap().serves_older_versions())
            .collect();
        assert_eq!(
            serving,
            ["bulk_import"],
            "an API serves each record as it is now"
        );
    }
}
