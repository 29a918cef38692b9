//! TokenRefresher: each hour, refreshes the OAuth tokens that would expire before the next
//! tick, so that no sync starts with a dead token, and keeps provider-side webhook
//! subscriptions alive (see [`crate::engine::subscriptions`]).
//!
//! It refreshes through the adapter's [`adapters::TokenRefresh`] and the engine's credential
//! keeper, the same path a job takes, so a rotated refresh token is stored before it is used
//! and a refresh here never overlaps one in a job. Credentials the provider refuses for good
//! (`invalid_grant`) put the integration in `error`: its syncs stop until someone sets new
//! credentials. Providers whose tokens carry no expiry (Salesforce) are refreshed by their
//! jobs when a request answers 401 and never show up here.
//!
//! Refreshes run several at once, and a run begins none after a budget well inside the host's
//! timeout: what it leaves is refreshed at the next tick, or by its syncs meanwhile.

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use futures_util::stream::{self, StreamExt};
use serde_json::json;

use super::InvocationError;
use crate::app::App;
use crate::engine::failure::{Failure, FailureCode};
use crate::engine::state::update_integration;
use crate::engine::subscriptions::{self, Maintained};
use crate::engine::{Transient, credentials, publish};
use crate::model::event::types as events;
use crate::model::integration::IntegrationStatus;
use crate::model::shard::types as shard_types;
use crate::model::{Event, Integration, Shard, timestamp};
use crate::protocol::{InvocationResponse, TimerInfo};
use crate::store::{Op, ShardQuery};
use crate::telemetry::Dimensions;

/// Refreshes under way at once.
const REFRESHES_AT_ONCE: usize = 8;

/// No refresh is begun after this much of a run: one begun just before may take its exchange
/// and its wait for the integration's lease, a little over two minutes, and the subscriptions
/// come after.
const REFRESH_BUDGET: std::time::Duration = std::time::Duration::from_secs(4 * 60);

/// No subscription is maintained after this much of a run: the host's `functionTimeout` is
/// ten minutes.
const RUN_BUDGET: std::time::Duration = std::time::Duration::from_secs(8 * 60);

pub async fn run(app: &App, _timer: TimerInfo) -> Result<InvocationResponse, InvocationError> {
    if !app.settings.token_refresh_enabled {
        return Ok(InvocationResponse::new().log("token refresh is disabled"));
    }
    let now = Utc::now();
    let threshold = Duration::from_std(app.settings.token_refresh_threshold)
        .ok()
        .and_then(|ahead| now.checked_add_signed(ahead))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let expiring = app
        .store
        .query(
            &ShardQuery::of_type(shard_types::INTEGRATION)
                .filter("structuredData.status", Op::Eq, json!("active"))
                .filter(
                    "structuredData.credentialsExpireAt",
                    Op::Le,
                    timestamp::query_value(&threshold),
                )
                // The soonest first: a run out of budget leaves the tokens that keep longest.
                .order_by("structuredData.credentialsExpireAt", false),
        )
        .await
        .map_err(Transient::from)?;
    let tick = timestamp::format(&now);
    let mut batch = vec![Event::new(
        events::TOKEN_CHECK_EXPIRING,
        "/integrations",
        &tick,
        now,
        json!({"timestamp": now, "thresholdTime": threshold}),
    )];
    // Several at once, so that a token endpoint that hangs holds up no other provider's
    // integrations; and none begun past the budget, so that the run ends well inside the
    // host's timeout (which would restart the handler, and every job on it, mid-refresh).
    let started = Instant::now();
    // By index: a closure over borrowed shards would not be `Send` to the compiler.
    let shards: Vec<&Shard> = expiring.iter().map(|stored| &stored.value).collect();
    let mut results: Vec<(usize, Option<Refreshed>)> = stream::iter(0..shards.len())
        .map(|i| refresh_within_budget(app, &shards, i, started))
        .buffer_unordered(REFRESHES_AT_ONCE)
        .collect()
        .await;
    // Told in the query's order, whichever finished first.
    results.sort_unstable_by_key(|(i, _)| *i);
    let (mut refreshed, mut failed, mut left) = (0, 0, 0);
    let mut unmarked = None;
    for (i, result) in results {
        let shard = shards[i];
        let Some(result) = result else {
            left += 1;
            continue;
        };
        let provider = shard
            .data::<Integration>()
            .map(|i| i.provider_name)
            .unwrap_or_default();
        app.metrics.token_refreshed(
            Dimensions {
                integration_id: &shard.id,
                tenant_id: &shard.tenant_id,
                provider: &provider,
            },
            result.is_err(),
        );
        let event = match result {
            Ok(expires_at) => {
                refreshed += 1;
                tracing::info!(tenant_id = %shard.tenant_id, integration_id = %shard.id, expires_at = ?expires_at, "token refreshed");
                Event::new(
                    events::TOKEN_REFRESHED,
                    subject(shard),
                    // The token it got; a token without an expiry, by the tick.
                    &expires_at.map_or_else(|| tick.clone(), |t| timestamp::format(&t)),
                    now,
                    json!({"connectionId": shard.id, "integrationId": shard.id,
                           "tenantId": shard.tenant_id, "expiresAt": expires_at, "refreshedAt": now}),
                )
            }
            Err(failure) => {
                failed += 1;
                tracing::warn!(tenant_id = %shard.tenant_id, integration_id = %shard.id, error = %failure, "token refresh failed");
                if failure.code.needs_new_credentials() {
                    // Syncing cannot help until someone sets new credentials.
                    let message = format!("token refresh failed: {}", failure.message);
                    let refused = shard
                        .data::<Integration>()
                        .ok()
                        .and_then(|i| i.credentials_expire_at);
                    // Only as the run found it: an operator may have paused it, or set new
                    // credentials, while the refreshes ran.
                    let marked = update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
                        let as_found = i.status == IntegrationStatus::Active
                            && i.credentials_expire_at == refused;
                        if as_found {
                            i.status = IntegrationStatus::Error;
                            i.status_message = Some(message.clone());
                        }
                        as_found
                    })
                    .await;
                    if let Err(e) = marked {
                        // The run fails once every refresh it made is told: those
                        // integrations are not expiring at the next tick, which would not
                        // tell them again.
                        unmarked.get_or_insert(e);
                    }
                }
                Event::new(
                    events::TOKEN_REFRESH_FAILED,
                    subject(shard),
                    &tick,
                    now,
                    json!({"connectionId": shard.id, "integrationId": shard.id,
                           "tenantId": shard.tenant_id, "code": failure.code,
                           "error": failure.message, "failedAt": now}),
                )
            }
        };
        batch.push(event);
    }
    publish(app, &batch).await;
    if let Some(e) = unmarked {
        return Err(Transient::from(e).into());
    }
    if left > 0 {
        tracing::warn!(
            left,
            "token refreshes left to the next tick: the run is out of time"
        );
    }
    let maintained = maintain_subscriptions(app, now, started).await?;
    let left_over = if left > 0 {
        format!(", {left} left to the next tick")
    } else {
        String::new()
    };
    Ok(InvocationResponse::new().log(format!(
        "{} integrations had credentials expiring: {refreshed} refreshed, {failed} failed{left_over}; \
         subscriptions: {} created, {} renewed, {} deleted, {} integrations failed",
        expiring.len(),
        maintained.0.created,
        maintained.0.renewed,
        maintained.0.deleted,
        maintained.1
    )))
}

/// Creates, renews and deletes the webhook subscriptions of every active integration whose
/// provider keeps them. One integration's failure is logged and does not stop the others; none
/// is begun once the run, `started` then, has used its whole budget.
async fn maintain_subscriptions(
    app: &App,
    now: DateTime<Utc>,
    started: Instant,
) -> Result<(Maintained, usize), Transient> {
    let providers: Vec<&str> = app
        .providers
        .names()
        .filter(|name| {
            app.providers
                .get(name)
                .is_some_and(|p| p.subscriptions().is_some())
        })
        .collect();
    let mut total = Maintained::default();
    let mut failed = 0;
    if providers.is_empty() {
        return Ok((total, failed));
    }
    let integrations = app
        .store
        .query(
            &ShardQuery::of_type(shard_types::INTEGRATION)
                .filter("structuredData.status", Op::Eq, json!("active"))
                .filter("structuredData.providerName", Op::In, json!(providers)),
        )
        .await?;
    for (i, stored) in integrations.iter().enumerate() {
        if started.elapsed() >= RUN_BUDGET {
            tracing::warn!(
                left = integrations.len() - i,
                "webhook subscriptions left to the next tick: the run is out of time"
            );
            break;
        }
        // Read again: the listing may be minutes old by now, and an operator's `subscribe`
        // (or a pause) may have come since; maintenance planned from the listing would make a
        // second subscription for a resource.
        let shard = match app
            .store
            .get(&stored.value.tenant_id, &stored.value.id)
            .await
        {
            Ok(Some(fresh)) => fresh.value,
            Ok(None) => continue,
            Err(e) => {
                failed += 1;
                tracing::warn!(tenant_id = %stored.value.tenant_id, integration_id = %stored.value.id, error = %e, "webhook subscriptions not maintained");
                continue;
            }
        };
        let shard = &shard;
        let Ok(integration) = shard.data::<Integration>() else {
            continue;
        };
        if integration.status != IntegrationStatus::Active {
            continue;
        }
        let Some(provider) = app.providers.get(&integration.provider_name) else {
            continue;
        };
        match subscriptions::maintain(app, shard, &integration, provider.as_ref(), now).await {
            Ok(done) => {
                total.created += done.created;
                total.renewed += done.renewed;
                total.deleted += done.deleted;
                for refused in &done.refused {
                    tracing::warn!(tenant_id = %shard.tenant_id, integration_id = %shard.id, resource = %refused.resource, error = %refused.failure, "the provider refused a webhook subscription");
                }
                if !done.refused.is_empty() {
                    failed += 1;
                }
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(tenant_id = %shard.tenant_id, integration_id = %shard.id, error = %e, "webhook subscriptions not maintained");
            }
        }
    }
    Ok((total, failed))
}

fn subject(shard: &Shard) -> String {
    format!("/tenants/{}/integrations/{}", shard.tenant_id, shard.id)
}

/// What a refresh came to: when the new token expires, if it says.
type Refreshed = Result<Option<DateTime<Utc>>, Failure>;

/// [`refresh`] of `shards[i]`, unless the run has used its refresh budget (`None`).
async fn refresh_within_budget(
    app: &App,
    shards: &[&Shard],
    i: usize,
    started: Instant,
) -> (usize, Option<Refreshed>) {
    if started.elapsed() >= REFRESH_BUDGET {
        return (i, None);
    }
    (i, Some(refresh(app, shards[i]).await))
}

/// Refreshes one integration's token; returns when the new one expires.
async fn refresh(app: &App, shard: &Shard) -> Refreshed {
    let integration: Integration = shard.data().map_err(|e| {
        Failure::new(
            adapters::ErrorCode::ValidationError,
            format!("the integration is invalid: {e}"),
        )
    })?;
    let name = &integration.provider_name;
    let provider = app.providers.get(name).ok_or_else(|| {
        Failure::new(
            FailureCode::ProviderNotSupported,
            format!("this build has no adapter for provider `{name}`"),
        )
    })?;
    let refresher = provider.token_refresh().ok_or_else(|| {
        Failure::new(
            FailureCode::ProviderNotSupported,
            format!("provider `{name}` refreshes its tokens when they are refused, not ahead"),
        )
    })?;
    let mut conn = credentials::connect(app, &shard.tenant_id, &shard.id, &integration).await?;
    Ok(refresher.refresh_token(&mut conn).await?)
}
