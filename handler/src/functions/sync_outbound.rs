//! SyncOutbound: writes Castiel changes back to the external system, one session per
//! integration so that changes arrive in the order they were made.

use chrono::Utc;

use super::InvocationError;
use crate::app::App;
use crate::engine::outbound;
use crate::protocol::{InvocationResponse, ServiceBusMessage};

pub async fn run(
    app: &App,
    message: &ServiceBusMessage,
) -> Result<InvocationResponse, InvocationError> {
    outbound::process(app, message, Utc::now()).await?;
    Ok(InvocationResponse::new())
}
