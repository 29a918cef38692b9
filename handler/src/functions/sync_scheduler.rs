//! SyncScheduler: each tick, enqueues a sync job for every integration that is due.

use chrono::Utc;

use super::InvocationError;
use crate::app::App;
use crate::engine::scheduler;
use crate::protocol::{InvocationResponse, TimerInfo};

pub async fn run(app: &App, timer: TimerInfo) -> Result<InvocationResponse, InvocationError> {
    if timer.is_past_due {
        tracing::info!("SyncScheduler is running late; catching up in one tick");
    }
    let summary = scheduler::tick(app, Utc::now()).await?;
    Ok(InvocationResponse::new().log(format!(
        "{} integrations due, {} sync jobs enqueued",
        summary.due, summary.enqueued
    )))
}
