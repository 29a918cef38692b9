//! An integration's credentials as the engine keeps them: one secret in the secret store, and
//! a refresh lease on the integration document.
//!
//! [`StoredCredentials`] is the engine's [`CredentialKeeper`]: adapters refresh through it (see
//! `adapters::credentials`), so a refreshed or rotated token is in the secret store before the
//! adapter uses it, and two refreshes of one integration never overlap, whichever processes or
//! instances they run in. The lease is a field of the integration claimed under its etag, like
//! every other piece of integration state; it lapses after [`REFRESH_LEASE`] so a process that
//! died mid-refresh blocks nobody for long.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{Duration, Utc};
use serde_json::{Map, Value};

use adapters::credentials::{CredentialKeeper, Refreshed};
use adapters::http::RetryPolicy;
use adapters::{Connection, Credentials, ErrorCode, ProviderError};

use super::state::update_integration;
use crate::app::App;
use crate::model::Integration;
use crate::model::integration::{Lease, WebhookSubscription};
use crate::secrets::{Secret, credential_secret_name};

/// How long a refresh may hold the lease: two token exchanges at their deadline
/// ([`adapters::credentials::EXCHANGE_DEADLINE`]), with room to store what they got.
pub const REFRESH_LEASE: Duration = Duration::seconds(120);

/// How long a refresh waits for another one to finish before giving up (retryable).
const LOCK_WAIT: StdDuration = StdDuration::from_secs(90);

/// Stores `credentials` an operator gives for an integration (it exists: the caller has read
/// it), as a refresh does: under the refresh lease, so a refresh under way cannot overwrite
/// them afterwards. Then the integration records when they expire (`expiresAt`, if they say)
/// and, if it was in error, becomes active again: new credentials are what it waited for.
/// Returns the secret's name and the expiry.
pub async fn replace(
    app: &App,
    tenant_id: &str,
    integration_id: &str,
    credentials: Map<String, Value>,
) -> Result<(String, Option<chrono::DateTime<Utc>>), ProviderError> {
    let expires_at = credentials
        .get("expiresAt")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let keeper = StoredCredentials::new(app, tenant_id, integration_id);
    let stored = keeper.lock().await?;
    // The secrets of the integration's webhook subscriptions live with its credentials: they
    // are the engine's, not the operator's, and stay.
    let mut credentials = credentials;
    for (name, value) in stored.into_inner() {
        if name.starts_with(WebhookSubscription::CLIENT_STATE_PREFIX) {
            credentials.entry(name).or_insert(value);
        }
    }
    keeper
        .store_and_unlock(&Refreshed {
            credentials: Credentials::new(credentials),
            expires_at,
        })
        .await?;
    update_integration(app, tenant_id, integration_id, Utc::now(), |i| {
        use crate::model::integration::IntegrationStatus;
        // Only an integration stopped for its credentials is active again: one an operator
        // paused stays paused.
        let reactivate = i.status == IntegrationStatus::Error;
        let changed = i.credentials_expire_at != expires_at || reactivate;
        if reactivate {
            i.status = IntegrationStatus::Active;
            i.status_message = None;
        }
        i.credentials_expire_at = expires_at;
        changed
    })
    .await
    .map_err(|e| {
        ProviderError::new(
            ErrorCode::ServiceUnavailable,
            format!("integration state: {e}"),
        )
    })?;
    Ok((keeper.secret_name, expires_at))
}

/// A connection to `integration`'s provider with its stored credentials, refreshed through
/// them; request retries wait `retry_base` first.
pub async fn connect(
    app: &App,
    tenant_id: &str,
    integration_id: &str,
    integration: &Integration,
) -> Result<Connection, ProviderError> {
    let keeper = Arc::new(StoredCredentials::new(app, tenant_id, integration_id));
    let credentials = keeper.load().await?;
    let mut conn = Connection::with_keeper(
        integration_id,
        integration.connection.clone(),
        credentials,
        keeper,
    );
    conn.retry = RetryPolicy::with_base(app.settings.record_retry_base);
    conn.writes = integration.writes_back_any();
    Ok(conn)
}

/// One integration's stored credentials.
pub struct StoredCredentials {
    app: App,
    tenant_id: String,
    integration_id: String,
    secret_name: String,
    /// Who holds the lease when this keeper does: unique per keeper.
    holder: String,
}

impl StoredCredentials {
    pub fn new(app: &App, tenant_id: &str, integration_id: &str) -> Self {
        Self {
            app: app.clone(),
            tenant_id: tenant_id.to_string(),
            integration_id: integration_id.to_string(),
            secret_name: credential_secret_name(tenant_id, integration_id),
            holder: uuid::Uuid::new_v4().simple().to_string(),
        }
    }

    /// The credentials as stored, through the secret store's cache: what a job starts with.
    pub async fn load(&self) -> Result<Credentials, ProviderError> {
        let secret = self.app.secrets.get(&self.secret_name).await;
        self.parse(secret)
    }

    fn parse(
        &self,
        secret: Result<Option<Secret>, crate::secrets::SecretsError>,
    ) -> Result<Credentials, ProviderError> {
        match secret {
            Ok(Some(secret)) => serde_json::from_str::<Map<String, Value>>(secret.expose())
                .map(Credentials::new)
                .map_err(|_| {
                    ProviderError::new(
                        ErrorCode::InvalidCredentials,
                        format!("secret `{}` is not a JSON object", self.secret_name),
                    )
                }),
            Ok(None) => Ok(Credentials::default()),
            Err(e) => Err(ProviderError::new(
                ErrorCode::ServiceUnavailable,
                e.to_string(),
            )),
        }
    }

    /// Takes the lease if it is free, lapsed or ours. `Ok(false)`: somebody else holds it.
    async fn try_lock(&self) -> Result<bool, ProviderError> {
        let now = Utc::now();
        let mut taken = false;
        update_integration(&self.app, &self.tenant_id, &self.integration_id, now, |i| {
            taken = i
                .refresh_lease
                .as_ref()
                .is_none_or(|l| l.holder == self.holder || l.until <= now);
            if taken {
                i.refresh_lease = Some(Lease {
                    holder: self.holder.clone(),
                    until: now + REFRESH_LEASE,
                });
            }
            taken
        })
        .await
        .map_err(|e| {
            ProviderError::new(
                ErrorCode::ServiceUnavailable,
                format!("integration state: {e}"),
            )
        })?;
        Ok(taken)
    }

    /// Releases the lease if this keeper holds it, recording the new expiry if one is known.
    async fn release(&self, refreshed: Option<&Refreshed>) -> Result<(), ProviderError> {
        update_integration(
            &self.app,
            &self.tenant_id,
            &self.integration_id,
            Utc::now(),
            |i| {
                let mut changed = false;
                if i.refresh_lease
                    .as_ref()
                    .is_some_and(|l| l.holder == self.holder)
                {
                    i.refresh_lease = None;
                    changed = true;
                }
                if let Some(expires_at) = refreshed.and_then(|r| r.expires_at) {
                    i.credentials_expire_at = Some(expires_at);
                    changed = true;
                }
                changed
            },
        )
        .await
        .map(drop)
        .map_err(|e| {
            ProviderError::new(
                ErrorCode::ServiceUnavailable,
                format!("integration state: {e}"),
            )
        })
    }
}

#[async_trait]
impl CredentialKeeper for StoredCredentials {
    async fn lock(&self) -> Result<Credentials, ProviderError> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut pause = StdDuration::from_millis(25);
        while !self.try_lock().await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(ProviderError::new(
                    ErrorCode::ServiceUnavailable,
                    "another job has been refreshing this integration's credentials for too long",
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(StdDuration::from_secs(1));
        }
        match self.stored().await {
            Ok(credentials) => Ok(credentials),
            Err(e) => {
                self.unlock().await;
                Err(e)
            }
        }
    }

    async fn store_and_unlock(&self, refreshed: &Refreshed) -> Result<(), ProviderError> {
        let value = Value::Object(refreshed.credentials.clone().into_inner()).to_string();
        if let Err(e) = self
            .app
            .secrets
            .set(&self.secret_name, Secret::new(value))
            .await
        {
            // A rotated refresh token that is not stored is lost: say so loudly.
            tracing::error!(secret_name = %self.secret_name, error = %e, "refreshed credentials could not be stored");
            self.unlock().await;
            return Err(ProviderError::new(
                ErrorCode::ServiceUnavailable,
                format!("refreshed credentials could not be stored: {e}"),
            ));
        }
        self.release(Some(refreshed)).await
    }

    async fn unlock(&self) {
        if let Err(e) = self.release(None).await {
            tracing::warn!(integration_id = %self.integration_id, error = %e, "could not release the refresh lease; it lapses by itself");
        }
    }

    async fn stored(&self) -> Result<Credentials, ProviderError> {
        let secret = self.app.secrets.get_fresh(&self.secret_name).await;
        self.parse(secret)
    }
}
