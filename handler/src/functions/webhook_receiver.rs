//! WebhookReceiver: `POST /api/webhooks/{provider}`, validates a provider's webhook delivery
//! and turns it into sync work.
//!
//! A delivery is trusted step by step. The adapter first reads whom it is for (a routing key
//! the provider chooses: Salesforce's OrganizationId, a Graph subscriptionId), or answers a
//! handshake that needs no integration (Graph's `validationToken`). Each key must name exactly
//! one integration of that provider, but for an integration's id (Zoom's and Gong's
//! `?integration=`), which tenants choose and may choose alike: of those it names, the one whose
//! secrets verify the delivery is it. The adapter then verifies the delivery with that
//! integration's connection and secrets (a shared key, a `clientState`). A delivery for one
//! integration is acted on only if it verifies; of a batch spanning several (Graph's), the
//! parts that verify are acted on and the rest passed over, and a batch nothing in verifies is
//! refused. The tenant is never taken from the request: a part whose tenant differs from the
//! caller's `x-tenant-id` is refused like one that does not verify.
//!
//! Each notification becomes one job on `sync-inbound-webhook` whose MessageId is the
//! notification's id, so a provider's redelivery is dropped by duplicate detection: a job that
//! reads the notified records back, or catches the entity up from its cursor when the
//! notification does not say which records changed. Such a catch-up is sent only if none sent
//! before has yet begun (`Integration::catch_ups`): that one reads this change too, so a burst
//! of notifications makes one sync. A notification of an entity the
//! integration does not map (the provider's subscription covers more than it syncs) becomes
//! none, and is logged.
//!
//! The provider's answer comes first. A delivery the queue, store or vault cannot take now is
//! answered 503 with `Retry-After`, not failed (the host would answer 500, which Dataverse never
//! delivers again), and the delivery's events wait at most a second before the answer goes,
//! their publishing going on behind it: Zoom and Graph give up on an answer after three seconds.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use adapters::{
    Provider, RouteKey, SubscriptionAction, WebhookDelivery, WebhookError, WebhookNotification,
    WebhookRequest, WebhookRoute, Webhooks,
};

use super::InvocationError;
use crate::app::App;
use crate::engine::state::update_integration;
use crate::engine::{Transient, credentials};
use crate::model::event::types as events;
use crate::model::history::SyncTrigger;
use crate::model::messages::JobType;
use crate::model::shard::types as shard_types;
use crate::model::{Event, Integration, Shard, SyncJobMessage};
use crate::protocol::{HttpRequest, HttpResponse, InvocationResponse};
use crate::queue::{OutgoingMessage, SYNC_INBOUND_WEBHOOK};
use crate::store::{Op, ShardQuery};

pub async fn run(
    app: &App,
    output: &str,
    req: HttpRequest,
) -> Result<InvocationResponse, InvocationError> {
    let response = match receive(app, &req).await {
        Ok(response) => response,
        // Answered rather than failed: the host turns a failed invocation into a 500, which
        // Dataverse never delivers again (it tries once more on 502, 503 and 504 only), and
        // every provider delivers again after a 503.
        Err(e) => {
            tracing::error!(error = %e, "webhook not taken for now; the provider is asked to deliver it again");
            let mut busy =
                HttpResponse::error(503, "the webhook cannot be taken now; deliver it again");
            busy.headers
                .insert("Retry-After".into(), RETRY_AFTER_SECONDS.to_string());
            busy
        }
    };
    Ok(InvocationResponse::new().with_http(output, response))
}

/// How long a provider is asked to wait before delivering a webhook not taken again.
const RETRY_AFTER_SECONDS: u32 = 10;

async fn receive(app: &App, req: &HttpRequest) -> Result<HttpResponse, Transient> {
    if req.method != "POST" {
        return Ok(HttpResponse::error(
            405,
            format!("webhooks are delivered with POST, not {}", req.method),
        ));
    }
    let Some(provider_name) = req.params.get("provider").filter(|p| !p.is_empty()) else {
        return Ok(HttpResponse::error(
            400,
            "the URL names no provider: expected /api/webhooks/{provider}",
        ));
    };
    let Some(provider) = app.providers.get(provider_name) else {
        return Ok(HttpResponse::error(
            404,
            format!("no webhook receiver for provider `{provider_name}`"),
        ));
    };
    let Some(webhooks) = provider.webhooks() else {
        return Ok(HttpResponse::error(
            404,
            format!("provider `{provider_name}` does not deliver webhooks"),
        ));
    };
    let request = WebhookRequest {
        url: &req.url,
        headers: &req.headers,
        query: &req.query,
        body: req.body.as_deref(),
    };
    let keys = match webhooks.route(&request) {
        Ok(WebhookRoute::Handshake(answer)) => {
            tracing::info!(provider = %provider_name, "webhook handshake answered");
            return Ok(HttpResponse::with_content_type(
                answer.status,
                &answer.content_type,
                answer.body,
            ));
        }
        Ok(WebhookRoute::To(keys)) => keys,
        Err(e) => return Ok(refusal(provider_name, e)),
    };

    // Every integration the delivery names, verified, before any work is enqueued. A batch
    // (Graph's) gathers the notifications of every subscription posted to one URL, across
    // integrations and tenants: one that names a subscription no integration has any more
    // (replaced, or removed while its last notifications were on their way), or an
    // integration that cannot verify its part, is passed over, so that the rest of the batch
    // is not refused and lost with it. A delivery nothing in verifies is refused.
    // A part that cannot be verified for now puts the whole delivery off, before any of it is
    // taken: taken parts delivered again would run again (Graph gives some notifications a
    // new id each delivery).
    let mut verified: Vec<(Shard, Integration, WebhookDelivery)> = Vec::new();
    let mut refused: Option<HttpResponse> = None;
    let delivery = Delivery {
        req,
        request: &request,
        webhooks,
        provider: provider.as_ref(),
    };
    for key in &keys {
        let checked = verified_part(app, &delivery, key).await?;
        match checked {
            Ok(found) => verified.push(found),
            Err(answer) if keys.len() > 1 => {
                tracing::warn!(provider = %provider_name, %key, status = answer.status_code, "webhook notifications passed over in a batch");
                refused.get_or_insert(answer);
            }
            Err(answer) => return Ok(answer),
        }
    }
    let Some(answer) = verified.last().map(|(_, _, d)| d.answer.clone()) else {
        return Ok(refused
            .unwrap_or_else(|| HttpResponse::error(400, "the delivery names no integration")));
    };

    let now = Utc::now();
    let mut received = Vec::new();
    for (shard, integration, delivery) in &verified {
        // The jobs first: a subscription marked gone before its catch-up job was sent would
        // leave the provider's redelivery (after a failed send) unroutable.
        let mut job_ids = Vec::new();
        // Entities a catch-up stands for already: the rest of the delivery told of changes
        // made before that catch-up was sent, so it reads them, and they cost no store round trip.
        let mut caught_up: Vec<String> = Vec::new();
        for notification in &delivery.notifications {
            let catch_up = matches!(notification, WebhookNotification::CatchUp { .. });
            for job in jobs_for(provider_name, shard, integration, notification, now) {
                // Notifications that name no change of their own (a Graph batch) make one job.
                if job_ids.contains(&job.job_id) {
                    continue;
                }
                job_ids.push(job.job_id.clone());
                if catch_up {
                    let entity = job
                        .entities
                        .iter()
                        .flatten()
                        .next()
                        .cloned()
                        .unwrap_or_default();
                    if caught_up.contains(&entity) {
                        continue;
                    }
                    caught_up.push(entity);
                    if !catch_up_on_its_way(app, shard, &job, now).await? {
                        tracing::debug!(integration_id = %shard.id, job_id = %job.job_id, "a catch-up not begun yet reads this change too");
                        continue;
                    }
                }
                let sent = app
                    .queue
                    .send(OutgoingMessage::json(
                        SYNC_INBOUND_WEBHOOK,
                        job.job_id.clone(),
                        &job,
                    ))
                    .await;
                if let Err(e) = sent {
                    if catch_up {
                        // Not on its way after all: the provider's redelivery sends it.
                        let forgotten =
                            update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
                                i.forget_catch_up(&job.job_id)
                            })
                            .await;
                        if let Err(e) = forgotten {
                            tracing::warn!(integration_id = %shard.id, error = %e, "a catch-up that could not be sent stands for later notifications until it lapses");
                        }
                    }
                    return Err(e.into());
                }
            }
        }
        subscription_requests(app, shard, &delivery.notifications, now).await?;
        received.push(Event::new(
            events::WEBHOOK_RECEIVED,
            format!("/tenants/{}/integrations/{}", shard.tenant_id, shard.id),
            // The jobs name what the delivery said, as a redelivery of it says it again.
            &occurrence(&job_ids, now),
            now,
            json!({"integrationId": shard.id, "tenantId": shard.tenant_id,
                   "provider": provider_name, "notifications": delivery.notifications.len()}),
        ));
        tracing::info!(provider = %provider_name, integration_id = %shard.id, notifications = delivery.notifications.len(), "webhook accepted");
    }
    // The provider's answer does not wait on a busy event topic: Zoom and Graph give up on an
    // answer after three seconds and deliver again, and the events are not worth that.
    let publisher = app.clone();
    let publishing =
        tokio::spawn(async move { crate::engine::publish(&publisher, &received).await });
    if tokio::time::timeout(EVENTS_BUDGET, publishing)
        .await
        .is_err()
    {
        tracing::info!(
            "the provider is answered while its delivery's events are still being published"
        );
    }
    Ok(HttpResponse::with_content_type(
        answer.status,
        &answer.content_type,
        answer.body,
    ))
}

/// A delivery as it is checked against the integrations its routing keys name.
struct Delivery<'a> {
    req: &'a HttpRequest,
    request: &'a WebhookRequest<'a>,
    webhooks: &'a dyn Webhooks,
    provider: &'a dyn Provider,
}

/// The integration `key` names, and its part of the delivery, verified with its credentials;
/// or the answer that refuses that part. Where `key` names several integrations (an id two
/// tenants chose alike), the one whose credentials verify the delivery is it.
async fn verified_part(
    app: &App,
    delivery: &Delivery<'_>,
    key: &RouteKey,
) -> Result<Result<(Shard, Integration, WebhookDelivery), HttpResponse>, Transient> {
    let candidates = match find_integrations(app, delivery.provider, key).await? {
        Ok(found) => found,
        Err(refused) => return Ok(Err(refused)),
    };
    let count = candidates.len();
    let mut verified = Vec::new();
    let mut refused = None;
    let mut unavailable = None;
    for candidate in candidates {
        // One candidate's store or vault failing for now leaves the others to verify.
        match verified_by(app, delivery, key, candidate).await {
            Ok(Ok(found)) => verified.push(found),
            Ok(Err(answer)) => {
                refused.get_or_insert(answer);
            }
            Err(transient) => unavailable = Some(transient),
        }
    }
    if verified.is_empty()
        && let Some(transient) = unavailable
    {
        return Err(transient);
    }
    Ok(match (verified.pop(), refused) {
        (Some(found), _) if verified.is_empty() => Ok(found),
        (Some(_), _) => Err(HttpResponse::error(
            409,
            format!(
                "{count} integrations are connected to {key} and verify the delivery; a webhook cannot tell which"
            ),
        )),
        (None, Some(answer)) => Err(answer),
        (None, None) => Err(HttpResponse::error(
            403,
            "no integration verifies the delivery",
        )),
    })
}

/// The `candidate` integration's part of the delivery, verified with its credentials; or the
/// answer that refuses it.
async fn verified_by(
    app: &App,
    delivery: &Delivery<'_>,
    key: &RouteKey,
    (shard, integration): (Shard, Integration),
) -> Result<Result<(Shard, Integration, WebhookDelivery), HttpResponse>, Transient> {
    let Delivery {
        req,
        request,
        webhooks,
        provider,
    } = *delivery;
    let name = provider.name();
    if let Some(claimed) = req.header("x-tenant-id")
        && claimed != shard.tenant_id
    {
        tracing::warn!(provider = %name, %key, "webhook refused: x-tenant-id disagrees with the delivery");
        return Ok(Err(HttpResponse::error(
            403,
            "x-tenant-id does not match the tenant of the delivering account",
        )));
    }
    let mut conn = match credentials::connect(app, &shard.tenant_id, &shard.id, &integration).await
    {
        Ok(conn) => conn,
        Err(e) if e.is_retryable() => return Err(Transient(e.to_string())),
        Err(e) => {
            tracing::warn!(provider = %name, integration_id = %shard.id, error = %e, "webhook refused: the integration's credentials are unusable");
            return Ok(Err(HttpResponse::error(
                403,
                "the integration's credentials cannot verify the delivery",
            )));
        }
    };
    let mut verdict = webhooks.verify(&conn, request, key).await;
    if let Err(WebhookError::Forged(_) | WebhookError::NotKept(_)) = verdict {
        // The secret may be newer than the cached credentials (a subscription created a
        // moment ago on another instance, a key the operator just rotated): check once more
        // against the store.
        let reader = format!("{}/{}", shard.tenant_id, shard.id);
        if may_read_fresh(&reader) {
            match conn.keeper.stored().await {
                Ok(fresh) => {
                    conn.credentials = fresh;
                    verdict = webhooks.verify(&conn, request, key).await;
                }
                // The vault cannot say for now whether the secret is newer: the delivery is
                // put off, and its redelivery may read the vault again.
                Err(e) if e.code.is_retryable() => {
                    may_read_fresh_again_soon(&reader);
                    return Err(Transient(e.message));
                }
                Err(_) => {}
            }
        } else if let Err(WebhookError::NotKept(reason)) = verdict {
            // The store was read for another delivery moments ago, perhaps before this
            // subscription was made. Refused, its notifications would be lost (neither Graph
            // nor Drive delivers again after a 4xx); put off, they come again once the
            // store may be read.
            return Err(Transient(format!("{name}: {reason} yet")));
        }
    }
    Ok(match verdict {
        Ok(delivery) => Ok((shard, integration, delivery)),
        Err(e) => Err(refusal(name, e)),
    })
}

/// The answer to a delivery that cannot be acted on.
fn refusal(provider: &str, error: WebhookError) -> HttpResponse {
    match error {
        WebhookError::Unsupported(reason) => HttpResponse::error(404, reason),
        WebhookError::Malformed(reason) => {
            tracing::info!(%provider, %reason, "malformed webhook refused");
            HttpResponse::error(400, reason)
        }
        WebhookError::Forged(reason) | WebhookError::NotKept(reason) => {
            tracing::warn!(%provider, %reason, "webhook refused: it does not verify");
            HttpResponse::error(403, reason)
        }
    }
}

/// The integrations `key` names: one, or for an integration's id, the integrations of every
/// tenant that chose that id; or the answer that says why there is none to verify with.
async fn find_integrations(
    app: &App,
    provider: &dyn Provider,
    key: &RouteKey,
) -> Result<Result<Vec<(Shard, Integration)>, HttpResponse>, Transient> {
    let name = provider.name();
    let query = ShardQuery::of_type(shard_types::INTEGRATION).filter(
        "structuredData.providerName",
        Op::Eq,
        json!(name),
    );
    let query = match key {
        RouteKey::Setting { name, value } => query.filter(
            &format!("structuredData.connection.{name}"),
            Op::Eq,
            json!(value),
        ),
        RouteKey::Subscription(id) => query.with_element("structuredData.subscriptions", "id", id),
        RouteKey::Integration(id) => query.filter("id", Op::Eq, json!(id)),
    };
    let found = app.store.query(&query).await?;
    if found.is_empty() {
        return Ok(Err(HttpResponse::error(
            403,
            format!("no {name} integration is connected to {key}"),
        )));
    }
    if found.len() > 1 && !matches!(key, RouteKey::Integration(_)) {
        return Ok(Err(HttpResponse::error(
            409,
            format!(
                "{} integrations are connected to {key}; a webhook cannot tell which",
                found.len()
            ),
        )));
    }
    let several = found.len() > 1;
    let mut candidates = Vec::with_capacity(found.len());
    for one in found {
        match one.value.data::<Integration>() {
            Ok(integration) => candidates.push((one.value, integration)),
            // Another tenant's integration of the id is no reason to refuse this one's.
            Err(e) if several => {
                tracing::warn!(tenant_id = %one.value.tenant_id, integration_id = %one.value.id, error = %e, "an invalid integration passed over for a webhook");
            }
            // Why it is invalid is the operator's to read, not the caller's: the delivery
            // has not been verified yet.
            Err(e) => {
                tracing::warn!(tenant_id = %one.value.tenant_id, integration_id = %one.value.id, error = %e, "a webhook for an invalid integration refused");
                return Ok(Err(HttpResponse::error(
                    409,
                    "the integration this delivery names cannot take deliveries now: its configuration is invalid",
                )));
            }
        }
    }
    Ok(Ok(candidates))
}

/// How often a delivery that fails verification may have an integration's credentials read
/// from the store rather than its cache.
const FRESH_READ_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The longest a delivery's answer waits for its events to be published.
const EVENTS_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

/// When each integration's credentials may next be read afresh for a delivery, by its
/// `tenant/id`.
static FRESH_READS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
> = std::sync::LazyLock::new(Default::default);

/// Whether a delivery that failed verification may read the credentials of `integration`
/// (`tenant/id`) afresh now: once per [`FRESH_READ_EVERY`]. Anyone who knows an integration's
/// routing key can post forgeries; without the limit each would cost a Key Vault read, and
/// enough of them would throttle the vault the token refreshes write to.
fn may_read_fresh(integration: &str) -> bool {
    let now = std::time::Instant::now();
    let mut next = FRESH_READS.lock().unwrap_or_else(|e| e.into_inner());
    match next.get(integration) {
        Some(at) if now < *at => false,
        _ => {
            next.insert(integration.to_string(), now + FRESH_READ_EVERY);
            true
        }
    }
}

/// Lets the fresh read of `integration`'s credentials that the vault did not answer be tried
/// again by the provider's redelivery, [`RETRY_AFTER_SECONDS`] on, rather than only
/// [`FRESH_READ_EVERY`] on; not sooner, so forgeries still cost a busy vault little.
fn may_read_fresh_again_soon(integration: &str) {
    let soon = std::time::Duration::from_secs(u64::from(RETRY_AFTER_SECONDS));
    FRESH_READS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(integration.to_string(), std::time::Instant::now() + soon);
}

/// Marks the subscriptions the provider asked about, so that the next maintenance renews
/// (`Renew`) or creates again (`Recreate`) them.
async fn subscription_requests(
    app: &App,
    shard: &Shard,
    notifications: &[WebhookNotification],
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let asked: Vec<(&str, SubscriptionAction)> = notifications
        .iter()
        .filter_map(|n| match n {
            WebhookNotification::Subscription {
                subscription_id,
                action,
                ..
            } => Some((subscription_id.as_str(), *action)),
            _ => None,
        })
        .collect();
    if asked.is_empty() {
        return Ok(());
    }
    update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
        let before = i.subscriptions.clone();
        for (id, action) in &asked {
            match action {
                SubscriptionAction::Renew => i
                    .subscriptions
                    .iter_mut()
                    .filter(|s| s.id == *id)
                    .for_each(|s| s.expires_at = now),
                SubscriptionAction::Recreate => i.subscriptions.retain(|s| s.id != *id),
                SubscriptionAction::CatchUp => {}
            }
        }
        i.subscriptions != before
    })
    .await?;
    Ok(())
}

/// Marks the catch-up `job` on its way, unless one not begun yet stands for it (and reads
/// what this notification says changed): whether to send it. Marked before it is sent, so that
/// a notification on another instance meanwhile finds it.
async fn catch_up_on_its_way(
    app: &App,
    shard: &Shard,
    job: &SyncJobMessage,
    now: DateTime<Utc>,
) -> Result<bool, Transient> {
    let Some(entity) = job.entities.as_ref().and_then(|e| e.first()) else {
        return Ok(true);
    };
    let mut send = true;
    update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
        send = i.send_catch_up(entity, &job.job_id, now);
        send
    })
    .await?;
    Ok(send)
}

/// What a delivery's event is about: the jobs it asked for (their ids derive from what it said),
/// or, for one asking for none, its time.
fn occurrence(job_ids: &[String], now: DateTime<Utc>) -> String {
    if job_ids.is_empty() {
        crate::model::timestamp::format(&now)
    } else {
        job_ids.join(",")
    }
}

/// The sync jobs a notification asks for. A job's id is also its MessageId: the integration's
/// and the notification's own id, so that the provider's redelivery is a duplicate while two
/// integrations told of one event get a job each; per entity when a notification asks for
/// several jobs. A notification of an entity the integration does not map (the provider's
/// subscription covers more than it syncs) asks for none.
fn jobs_for(
    provider: &str,
    shard: &Shard,
    integration: &Integration,
    notification: &WebhookNotification,
    now: DateTime<Utc>,
) -> Vec<SyncJobMessage> {
    let job = |entity: &str, payload: Value| SyncJobMessage {
        integration_id: shard.id.clone(),
        tenant_id: shard.tenant_id.clone(),
        job_type: JobType::Webhook,
        provider: provider.to_string(),
        job_id: format!("wh_{}_{}", shard.id, notification.id()),
        trigger: SyncTrigger::Webhook,
        triggered_by: None,
        webhook_payload: Some(payload),
        entities: Some(vec![entity.to_string()]),
        scheduled_at: now,
        attempt: 1,
        deferrals: 0,
    };
    // The mapping's own spelling of the entity: providers do not mind case (a Salesforce
    // mapping of `account` reads Accounts), and the job must name it as the mapping does.
    let mapped = |entity: &str| {
        let found = integration
            .entity_mappings
            .iter()
            .find(|m| m.external_entity.eq_ignore_ascii_case(entity))
            .map(|m| m.external_entity.clone());
        if found.is_none() {
            tracing::warn!(integration_id = %shard.id, entity, "a notification of an entity the integration does not map is passed over");
        }
        found
    };
    match notification {
        // The notification says which records changed; the job reads what they hold now.
        WebhookNotification::Records {
            entity, record_ids, ..
        } => mapped(entity)
            .map(|entity| job(&entity, json!({"entity": entity, "ids": record_ids})))
            .into_iter()
            .collect(),
        WebhookNotification::Deleted {
            entity, record_ids, ..
        } => mapped(entity)
            .map(|entity| job(&entity, json!({"entity": entity, "deletedIds": record_ids})))
            .into_iter()
            .collect(),
        WebhookNotification::CatchUp { entity, .. } => mapped(entity)
            .map(|entity| job(&entity, json!({"entity": entity})))
            .into_iter()
            .collect(),
        WebhookNotification::Subscription { action, .. } => match action {
            // Renewal happens on the token refresher's tick; nothing was lost.
            SubscriptionAction::Renew => Vec::new(),
            SubscriptionAction::Recreate | SubscriptionAction::CatchUp => integration
                .entity_mappings
                .iter()
                .map(|m| {
                    let mut job = job(&m.external_entity, json!({"entity": m.external_entity}));
                    job.job_id = format!("{}_{}", job.job_id, m.external_entity);
                    job
                })
                .collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgeries_cost_an_integration_one_fresh_read_of_its_credentials_at_a_time() {
        assert!(may_read_fresh("int-forged-1"));
        assert!(
            !may_read_fresh("int-forged-1"),
            "the next forgery reads the cache"
        );
        assert!(
            may_read_fresh("int-forged-2"),
            "another integration's own allowance"
        );
    }
}
