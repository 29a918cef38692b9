//! The six functions: one module each, named as the function folders are.
//!
//! A function gets the typed trigger value, does its work through the [`App`]'s backends and
//! answers with an [`InvocationResponse`]. It fails the invocation ([`InvocationError`]) only
//! where the host's retry can help: the host then abandons a Service Bus message for
//! redelivery, or answers 500 to an HTTP caller. Bad input is never a failed invocation: a
//! malformed webhook gets a 4xx with a reason, a poison message is dead-lettered with one.
//!
//! A message that still fails on the last delivery its queue allows is dead-lettered by the
//! handler too ([`dead_letter_if_last`]): the broker's own dead letter would say only
//! `MaxDeliveryCountExceeded`, and the failure that exhausted the deliveries would be lost.

pub mod sync_inbound_scheduled;
pub mod sync_inbound_webhook;
pub mod sync_outbound;
pub mod sync_scheduler;
pub mod token_refresher;
pub mod webhook_receiver;

use crate::app::App;
use crate::definition::{AppDefinition, FunctionName, Trigger};
use crate::engine::Transient;
use crate::protocol::{EnvelopeError, InvocationRequest, InvocationResponse, ServiceBusMessage};
use crate::queue::{
    MAX_DELIVERY_COUNT_EXCEEDED, SYNC_INBOUND_SCHEDULED, SYNC_INBOUND_WEBHOOK, SYNC_OUTBOUND,
    dead_letter, queue_settings,
};

#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    /// The envelope is not what the host sends for this function.
    #[error("malformed invocation: {0}")]
    BadEnvelope(#[from] EnvelopeError),
    /// A backend failed in a way a retry can fix.
    #[error("{0}")]
    Transient(#[from] Transient),
}

/// Runs `function` for one invocation request.
pub async fn invoke(
    app: &App,
    function: FunctionName,
    request: &InvocationRequest,
) -> Result<InvocationResponse, InvocationError> {
    let trigger = &AppDefinition::embedded().get(function).trigger;
    let binding = trigger.binding();
    match (function, trigger) {
        (FunctionName::WebhookReceiver, Trigger::Http { output, .. }) => {
            webhook_receiver::run(app, output, request.http_request(binding)?).await
        }
        (FunctionName::WebhookReceiver, _) => unreachable!("WebhookReceiver is HTTP-triggered"),
        (FunctionName::SyncScheduler, _) => sync_scheduler::run(app, request.timer(binding)?).await,
        (FunctionName::SyncInboundWebhook, _) => {
            let message = request.service_bus_message(binding)?;
            let result = sync_inbound_webhook::run(app, &message).await;
            dead_letter_if_last(app, SYNC_INBOUND_WEBHOOK, &message, result).await
        }
        (FunctionName::SyncInboundScheduled, _) => {
            let message = request.service_bus_message(binding)?;
            let result = sync_inbound_scheduled::run(app, &message).await;
            dead_letter_if_last(app, SYNC_INBOUND_SCHEDULED, &message, result).await
        }
        (FunctionName::SyncOutbound, _) => {
            let message = request.service_bus_message(binding)?;
            let result = sync_outbound::run(app, &message).await;
            dead_letter_if_last(app, SYNC_OUTBOUND, &message, result).await
        }
        (FunctionName::TokenRefresher, _) => {
            token_refresher::run(app, request.timer(binding)?).await
        }
    }
}

/// `result` of a Service Bus function, unless it failed on the last delivery `queue` allows:
/// the message is then dead-lettered with the failure as its description, and completed.
/// Should the dead letter not send, the invocation fails and the broker dead-letters the
/// message itself.
async fn dead_letter_if_last(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    result: Result<InvocationResponse, InvocationError>,
) -> Result<InvocationResponse, InvocationError> {
    let Err(InvocationError::Transient(failure)) = &result else {
        return result;
    };
    let last =
        queue_settings(queue).is_some_and(|q| message.delivery_count >= q.max_delivery_count);
    if !last {
        return result;
    }
    let description = format!(
        "Message could not be consumed after {} delivery attempts; last failure: {failure}",
        message.delivery_count
    );
    tracing::error!(queue, message_id = ?message.message_id, %description, "dead-lettering a message on its last delivery");
    app.queue
        .send(dead_letter(
            queue,
            message,
            MAX_DELIVERY_COUNT_EXCEEDED,
            &description,
        ))
        .await
        .map_err(Transient::from)?;
    Ok(InvocationResponse::new())
}
