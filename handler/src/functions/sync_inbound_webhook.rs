//! SyncInboundWebhook: runs the webhook-triggered sync jobs of `sync-inbound-webhook`.

use chrono::Utc;

use super::InvocationError;
use crate::app::App;
use crate::engine::inbound;
use crate::protocol::{InvocationResponse, ServiceBusMessage};
use crate::queue::SYNC_INBOUND_WEBHOOK;

pub async fn run(
    app: &App,
    message: &ServiceBusMessage,
) -> Result<InvocationResponse, InvocationError> {
    inbound::process(app, SYNC_INBOUND_WEBHOOK, message, Utc::now()).await?;
    Ok(InvocationResponse::new())
}
