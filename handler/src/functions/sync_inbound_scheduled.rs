//! SyncInboundScheduled: runs the scheduled, manual and retried sync jobs of
//! `sync-inbound-scheduled`.

use chrono::Utc;

use super::InvocationError;
use crate::app::App;
use crate::engine::inbound;
use crate::protocol::{InvocationResponse, ServiceBusMessage};
use crate::queue::SYNC_INBOUND_SCHEDULED;

pub async fn run(
    app: &App,
    message: &ServiceBusMessage,
) -> Result<InvocationResponse, InvocationError> {
    inbound::process(app, SYNC_INBOUND_SCHEDULED, message, Utc::now()).await?;
    Ok(InvocationResponse::new())
}
