//! WebhookReceiver: `POST /api/webhooks/{provider}`, validates a provider's webhook delivery
//! and turns it into sync work.
//!
//! The tenant is never taken from the request: it comes from the integration the verified
//! delivery belongs to (for Salesforce, the one connected to the delivery's OrganizationId).
//! A caller that also sends `x-tenant-id` and names another tenant is refused. Each
//! notification becomes one job on `sync-inbound-webhook` whose MessageId is the notification's
//! id, so a provider's redelivery is dropped by duplicate detection.

use chrono::Utc;
use serde_json::json;

use adapters::{WebhookError, WebhookRequest};

use super::InvocationError;
use crate::app::App;
use crate::engine::{Transient, publish};
use crate::model::event::types as events;
use crate::model::history::SyncTrigger;
use crate::model::messages::JobType;
use crate::model::shard::types as shard_types;
use crate::model::{Event, SyncJobMessage};
use crate::protocol::{HttpRequest, HttpResponse, InvocationResponse};
use crate::queue::{OutgoingMessage, SYNC_INBOUND_WEBHOOK};
use crate::store::{Op, ShardQuery};

pub async fn run(
    app: &App,
    output: &str,
    req: HttpRequest,
) -> Result<InvocationResponse, InvocationError> {
    let respond =
        |response: HttpResponse| Ok(InvocationResponse::new().with_http(output, response));
    if req.method != "POST" {
        return respond(HttpResponse::error(
            405,
            format!("webhooks are delivered with POST, not {}", req.method),
        ));
    }
    let Some(provider_name) = req.params.get("provider").filter(|p| !p.is_empty()) else {
        return respond(HttpResponse::error(
            400,
            "the URL names no provider: expected /api/webhooks/{provider}",
        ));
    };
    let Some(provider) = app.providers.get(provider_name) else {
        return respond(HttpResponse::error(
            404,
            format!("no webhook receiver for provider `{provider_name}`"),
        ));
    };
    let delivery = match provider.parse_webhook(&WebhookRequest {
        headers: &req.headers,
        body: req.body.as_deref(),
    }) {
        Ok(delivery) => delivery,
        Err(WebhookError::Unsupported(reason)) => return respond(HttpResponse::error(404, reason)),
        Err(WebhookError::Malformed(reason)) => {
            tracing::info!(provider = %provider_name, %reason, "malformed webhook refused");
            return respond(HttpResponse::error(400, reason));
        }
    };

    let connected = app
        .store
        .query(
            &ShardQuery::of_type(shard_types::INTEGRATION)
                .filter("structuredData.providerName", Op::Eq, json!(provider_name))
                .filter(
                    "structuredData.connection.organizationId",
                    Op::Eq,
                    json!(delivery.account_id),
                ),
        )
        .await
        .map_err(Transient::from)?;
    let integration = match connected.as_slice() {
        [one] => &one.value,
        [] => {
            return respond(HttpResponse::error(
                403,
                format!(
                    "no {provider_name} integration is connected to account `{}`",
                    delivery.account_id
                ),
            ));
        }
        _ => {
            return respond(HttpResponse::error(
                409,
                format!(
                    "{} integrations are connected to account `{}`; a webhook cannot tell which",
                    connected.len(),
                    delivery.account_id
                ),
            ));
        }
    };
    if let Some(claimed) = req.header("x-tenant-id")
        && claimed != integration.tenant_id
    {
        tracing::warn!(provider = %provider_name, account = %delivery.account_id, "webhook refused: x-tenant-id disagrees with the delivery");
        return respond(HttpResponse::error(
            403,
            "x-tenant-id does not match the tenant of the delivering account",
        ));
    }

    let now = Utc::now();
    for notification in &delivery.notifications {
        let job = SyncJobMessage {
            integration_id: integration.id.clone(),
            tenant_id: integration.tenant_id.clone(),
            job_type: JobType::Webhook,
            provider: provider_name.clone(),
            job_id: format!("wh_{}_{}", integration.id, notification.id),
            trigger: SyncTrigger::Webhook,
            triggered_by: None,
            // The notification says which record changed; the job reads what it holds now.
            webhook_payload: Some(json!({
                "entity": notification.entity,
                "ids": [notification.record_id],
            })),
            entities: Some(vec![notification.entity.clone()]),
            scheduled_at: now,
            attempt: 1,
            deferrals: 0,
        };
        app.queue
            .send(OutgoingMessage::json(
                SYNC_INBOUND_WEBHOOK,
                notification.id.clone(),
                &job,
            ))
            .await
            .map_err(Transient::from)?;
    }
    publish(
        app,
        &[Event::new(
            events::WEBHOOK_RECEIVED,
            format!(
                "/tenants/{}/integrations/{}",
                integration.tenant_id, integration.id
            ),
            now,
            json!({"integrationId": integration.id, "tenantId": integration.tenant_id,
                   "provider": provider_name, "notifications": delivery.notifications.len()}),
        )],
    )
    .await;
    tracing::info!(provider = %provider_name, integration_id = %integration.id, notifications = delivery.notifications.len(), "webhook accepted");
    let (content_type, body) = delivery.ack;
    respond(HttpResponse::with_content_type(200, &content_type, body))
}
