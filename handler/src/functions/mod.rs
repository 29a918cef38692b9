//! The six functions: one module each, named as the function folders are.
//!
//! A function gets the typed trigger value, does its work through the [`App`]'s backends and
//! answers with an [`InvocationResponse`]. It fails the invocation ([`InvocationError`]) only
//! where the host's retry can help: the host then abandons a Service Bus message for
//! redelivery, or answers 500 to an HTTP caller. Bad input is never a failed invocation: a
//! malformed webhook gets a 4xx with a reason, a poison message is dead-lettered with one.

pub mod sync_inbound_scheduled;
pub mod sync_inbound_webhook;
pub mod sync_outbound;
pub mod sync_scheduler;
pub mod token_refresher;
pub mod webhook_receiver;

use crate::app::App;
use crate::definition::{AppDefinition, FunctionName, Trigger};
use crate::engine::Transient;
use crate::protocol::{EnvelopeError, InvocationRequest, InvocationResponse};

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
            sync_inbound_webhook::run(app, request.service_bus_message(binding)?).await
        }
        (FunctionName::SyncInboundScheduled, _) => {
            sync_inbound_scheduled::run(app, request.service_bus_message(binding)?).await
        }
        (FunctionName::SyncOutbound, _) => {
            sync_outbound::run(app, request.service_bus_message(binding)?).await
        }
        (FunctionName::TokenRefresher, _) => {
            token_refresher::run(app, request.timer(binding)?).await
        }
    }
}
