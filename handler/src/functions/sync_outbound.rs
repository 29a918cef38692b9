//! SyncOutbound: writes Castiel changes back to the external system, one session per
//! integration so that changes arrive in the order they were made.

use super::InvocationError;
use crate::app::App;
use crate::engine::Transient;
use crate::engine::failure::FailureCode;
use crate::model::WriteBackMessage;
use crate::model::messages::parse_body;
use crate::protocol::{InvocationResponse, ServiceBusMessage};
use crate::queue::{SYNC_OUTBOUND, dead_letter};
use adapters::ErrorCode;

pub async fn run(
    app: &App,
    message: ServiceBusMessage,
) -> Result<InvocationResponse, InvocationError> {
    let rejection = match parse_body::<WriteBackMessage>(&message.body) {
        Err(reason) => Some((FailureCode::InvalidMessage, reason)),
        Ok(write_back) => check(app, &write_back).await?,
    };
    if let Some((code, reason)) = rejection {
        tracing::warn!(message_id = ?message.message_id, %code, %reason, "dead-lettering a write-back");
        app.queue
            .send(dead_letter(SYNC_OUTBOUND, &message, code.as_str(), &reason))
            .await
            .map_err(Transient::from)?;
        return Ok(InvocationResponse::new().log(format!("write-back dead-lettered: {reason}")));
    }
    Ok(InvocationResponse::new())
}

/// Why the write-back cannot be carried out, if it cannot.
async fn check(
    app: &App,
    write_back: &WriteBackMessage,
) -> Result<Option<(FailureCode, String)>, Transient> {
    if app
        .store
        .get(&write_back.tenant_id, &write_back.shard_id)
        .await?
        .is_none()
    {
        return Ok(Some((
            ErrorCode::NotFound.into(),
            format!(
                "shard `{}` of tenant `{}` does not exist",
                write_back.shard_id, write_back.tenant_id
            ),
        )));
    }
    let system = &write_back.external_system;
    let reason = match app.providers.get(system) {
        None => format!("this build has no adapter for `{system}`"),
        Some(_) => format!("`{system}` has no write-back in this build"),
    };
    Ok(Some((FailureCode::ProviderNotSupported, reason)))
}
