//! Running one inbound sync job, from its queue message to its `c_integrationSync` record.
//!
//! A job is idempotent by its job id: its history record's id is derived from it, a job whose
//! record says it finished is not run again, and every message it sends has a MessageId
//! derived from it, so a redelivery (after a crash or a failed settlement) repeats nothing.
//! Only an operator's replay of a dead-lettered job runs a finished job again.

use chrono::{DateTime, Utc};
use serde_json::json;

use adapters::{ErrorCode, ProviderError};

use super::retry::{AfterFailure, MAX_ATTEMPTS, after_failure};
use super::{Transient, publish};
use crate::app::App;
use crate::model::event::types as events;
use crate::model::history::{SyncTrigger, history_shard_id};
use crate::model::messages::parse_body;
use crate::model::shard::types as shard_types;
use crate::model::{
    Event, Integration, IntegrationSync, SyncError, SyncJobMessage, SyncStats, SyncStatus,
};
use crate::protocol::ServiceBusMessage;
use crate::queue::properties::REPLAYED_FROM;
use crate::queue::{OutgoingMessage, dead_letter};

/// Processes the job in `message`, delivered from `queue`. `Ok` means the message is settled
/// (done, re-enqueued for a retry, or dead-lettered); `Err` means fail the invocation.
pub async fn process(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let job: SyncJobMessage = match parse_body(&message.body) {
        Ok(job) => job,
        Err(reason) => {
            tracing::warn!(queue, message_id = ?message.message_id, %reason, "dead-lettering an unreadable sync job");
            return send_dead_letter(
                app,
                queue,
                message,
                ErrorCode::InvalidMessage.as_str(),
                &reason,
            )
            .await;
        }
    };
    let Some(stored) = app.store.get(&job.tenant_id, &job.integration_id).await? else {
        let reason = format!(
            "integration `{}` of tenant `{}` does not exist",
            job.integration_id, job.tenant_id
        );
        tracing::warn!(queue, job_id = %job.job_id, %reason, "dead-lettering a sync job");
        return send_dead_letter(app, queue, message, ErrorCode::NotFound.as_str(), &reason).await;
    };
    let shard = stored.value;

    let record_id = history_shard_id(&job.job_id, job.scheduled_at);
    let previous = app.store.get(&job.tenant_id, &record_id).await?;
    let previous: Option<IntegrationSync> = previous.and_then(|v| v.value.data().ok());
    let replayed = message.application_properties.contains_key(REPLAYED_FROM);
    if previous.as_ref().is_some_and(IntegrationSync::is_finished) && !replayed {
        tracing::info!(job_id = %job.job_id, "job already finished; redelivery ignored");
        return Ok(());
    }

    let mut record = IntegrationSync {
        integration_id: job.integration_id.clone(),
        integration_name: shard.name.clone(),
        provider_name: job.provider.clone(),
        job_id: job.job_id.clone(),
        job_type: job.history_job_type(),
        trigger: job.trigger,
        triggered_by: job.triggered_by.clone(),
        started_at: previous.as_ref().map_or(now, |p| p.started_at),
        completed_at: None,
        duration_ms: None,
        status: SyncStatus::Running,
        status_message: None,
        stats: SyncStats::default(),
        entity_stats: None,
        errors: previous.and_then(|p| p.errors),
        sync_details: None,
    };
    save(app, &job, &record_id, &record, now).await?;
    publish(
        app,
        &[Event::new(
            events::SYNC_STARTED,
            subject(&job),
            now,
            json!({
                "integrationId": job.integration_id, "tenantId": job.tenant_id,
                "jobId": job.job_id, "jobType": record.job_type, "trigger": record.trigger,
                "attempt": job.attempt,
            }),
        )],
    )
    .await;

    let result = if shard.shard_type_id != shard_types::INTEGRATION {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!(
                "`{}` is a `{}` shard, not an integration",
                shard.id, shard.shard_type_id
            ),
        ))
    } else {
        match shard.data::<Integration>() {
            Ok(integration) => run(app, &integration),
            Err(e) => Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("the integration's structuredData is invalid: {e}"),
            )),
        }
    };
    match result {
        Ok(stats) => {
            record.stats = stats;
            finish(
                &mut record,
                SyncStatus::Success,
                "Sync completed successfully".into(),
                now,
            );
            save(app, &job, &record_id, &record, now).await?;
            Ok(())
        }
        Err(failure) => fail(app, queue, message, &job, &record_id, record, failure, now).await,
    }
}

/// Runs the job against the integration's provider.
fn run(app: &App, integration: &Integration) -> Result<SyncStats, ProviderError> {
    let provider = &integration.provider_name;
    let reason = match app.providers.get(provider) {
        None => format!("this build has no adapter for provider `{provider}`"),
        Some(_) => format!("provider `{provider}` has no inbound sync in this build"),
    };
    Err(ProviderError::new(ErrorCode::ProviderNotSupported, reason))
}

#[allow(clippy::too_many_arguments)]
async fn fail(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    job: &SyncJobMessage,
    record_id: &str,
    mut record: IntegrationSync,
    failure: ProviderError,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    record.errors.get_or_insert_with(Vec::new).push(SyncError {
        code: failure.code.as_str().into(),
        message: failure.message.clone(),
        entity: None,
        record_id: None,
        shard_id: None,
        field: None,
        timestamp: now,
        retryable: failure.is_retryable(),
    });
    match after_failure(failure.code, job.attempt, now) {
        AfterFailure::RetryAt { attempt, at } => {
            let retry = SyncJobMessage {
                attempt,
                trigger: SyncTrigger::Retry,
                ..job.clone()
            };
            let message_id = format!("{}:attempt-{attempt}", job.job_id);
            app.queue
                .send(OutgoingMessage::json(queue, message_id, &retry).scheduled_at(at))
                .await?;
            record.status_message = Some(format!(
                "attempt {} of {MAX_ATTEMPTS} failed ({}); retrying at {}",
                job.attempt,
                failure.code,
                at.to_rfc3339()
            ));
            tracing::warn!(job_id = %job.job_id, attempt = job.attempt, error = %failure, retry_at = %at, "sync job failed; retry scheduled");
            save(app, job, record_id, &record, now).await
        }
        AfterFailure::DeadLetter { exhausted } => {
            let summary = if exhausted {
                format!(
                    "{} (gave up after {MAX_ATTEMPTS} attempts)",
                    failure.message
                )
            } else {
                failure.message.clone()
            };
            finish(&mut record, SyncStatus::Failed, summary.clone(), now);
            save(app, job, record_id, &record, now).await?;
            send_dead_letter(app, queue, message, failure.code.as_str(), &summary).await?;
            tracing::error!(job_id = %job.job_id, error = %failure, exhausted, "sync job failed");
            publish(
                app,
                &[Event::new(
                    events::SYNC_FAILED,
                    subject(job),
                    now,
                    json!({
                        "integrationId": job.integration_id, "tenantId": job.tenant_id,
                        "jobId": job.job_id, "code": failure.code, "error": summary,
                    }),
                )],
            )
            .await;
            Ok(())
        }
    }
}

fn finish(record: &mut IntegrationSync, status: SyncStatus, message: String, now: DateTime<Utc>) {
    record.status = status;
    record.status_message = Some(message);
    record.completed_at = Some(now);
    record.duration_ms = Some((now - record.started_at).num_milliseconds().max(0) as u64);
}

async fn save(
    app: &App,
    job: &SyncJobMessage,
    record_id: &str,
    record: &IntegrationSync,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let shard = record
        .clone()
        .into_shard(record_id.to_string(), &job.tenant_id, now);
    app.store.upsert(&shard).await?;
    Ok(())
}

async fn send_dead_letter(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    reason: &str,
    description: &str,
) -> Result<(), Transient> {
    app.queue
        .send(dead_letter(queue, message, reason, description))
        .await?;
    Ok(())
}

fn subject(job: &SyncJobMessage) -> String {
    format!(
        "/tenants/{}/integrations/{}",
        job.tenant_id, job.integration_id
    )
}
