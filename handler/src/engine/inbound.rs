//! Running one inbound sync job, from its queue message to its `c_integrationSync` record.
//!
//! A job is idempotent by its job id: its history record's id is derived from it, a job whose
//! record says it finished is not run again, and every message it sends has a MessageId
//! derived from it, so a redelivery (after a crash or a failed settlement) repeats nothing.
//! Only an operator's replay of a dead-lettered job runs a finished job again. A job that died
//! mid-run resumes from the checkpoints the pipeline left.

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::Instrument;

use adapters::ErrorCode;

use super::credentials;
use super::failure::{Failure, FailureCode};
use super::lease::{self, Claim};
use super::pipeline::{self, Outcome, Stop};
use super::retry::{AfterFailure, MAX_ATTEMPTS, after_failure};
use super::state::update_integration;
use super::{Transient, history_slot, publish};
use crate::app::App;
use crate::model::event::types as events;
use crate::model::history::SyncTrigger;
use crate::model::integration::{IntegrationStatus, JobProgress};
use crate::model::messages::{JobType, parse_body};
use crate::model::shard::types as shard_types;
use crate::model::{
    Event, Integration, IntegrationSync, SyncError, SyncJobMessage, SyncStats, SyncStatus,
};
use crate::queue::properties::REPLAYED_FROM;
use crate::queue::{OutgoingMessage, ServiceBusMessage, dead_letter, property};
use crate::telemetry::Dimensions;

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
                FailureCode::InvalidMessage.as_str(),
                &reason,
            )
            .await;
        }
    };
    // Every line the job logs carries seed 003's fields, and the job id as the correlation id
    // that ties its retries, continuations and history record together.
    let span = tracing::info_span!(
        "sync_job",
        correlationId = %job.job_id,
        integrationId = %job.integration_id,
        tenantId = %job.tenant_id,
        provider = %job.provider,
        syncType = ?job.job_type,
        attempt = job.attempt,
    );
    run_job(app, queue, message, job, now)
        .instrument(span)
        .await
}

async fn run_job(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    job: SyncJobMessage,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let Some(stored) = app.store.get(&job.tenant_id, &job.integration_id).await? else {
        let reason = format!(
            "integration `{}` of tenant `{}` does not exist",
            job.integration_id, job.tenant_id
        );
        tracing::warn!(queue, job_id = %job.job_id, %reason, "dead-lettering a sync job");
        return send_dead_letter(app, queue, message, ErrorCode::NotFound.as_str(), &reason).await;
    };
    let shard = stored.value;

    let (record_id, previous) =
        history_slot(app, &job.tenant_id, &job.job_id, job.scheduled_at).await?;
    let replayed_from = property(&message.application_properties, REPLAYED_FROM);
    let replayed = replayed_from.is_some();
    // What this run is, for its events' ids: a replay runs the job anew.
    let this_run = match replayed_from {
        Some(from) => format!("{}#{}@replay-{from}", job.job_id, job.attempt),
        None => format!("{}#{}", job.job_id, job.attempt),
    };
    if previous.as_ref().is_some_and(IntegrationSync::is_finished) && !replayed {
        tracing::info!(job_id = %job.job_id, "job already finished; redelivery ignored");
        // A claim the scheduler wrote for it after it had run would hold the integration
        // until its lease lapsed.
        let released = update_integration(app, &job.tenant_id, &job.integration_id, now, |i| {
            let orphaned = i.running.as_ref().is_some_and(|r| r.job_id == job.job_id);
            if orphaned {
                end_chain(i, &job.job_id);
            }
            i.begin_catch_up(&job.job_id, now) || orphaned
        })
        .await;
        // The job is over either way; a hold that stays lapses by itself.
        if let Err(e) = released {
            tracing::warn!(job_id = %job.job_id, error = %e, "a finished job's hold could not be released");
        }
        return Ok(());
    }

    let integration = if shard.shard_type_id != shard_types::INTEGRATION {
        Err(Failure::new(
            ErrorCode::ValidationError,
            format!(
                "`{}` is a `{}` shard, not an integration",
                shard.id, shard.shard_type_id
            ),
        ))
    } else {
        shard.data::<Integration>().map_err(|e| {
            Failure::new(
                ErrorCode::ValidationError,
                format!("the integration's structuredData is invalid: {e}"),
            )
        })
    };
    // A paused integration, or one in error until someone sets new credentials, syncs only
    // when an operator asks (`handler sync`).
    if let Ok(integration) = &integration
        && integration.status != IntegrationStatus::Active
        // `triggered_by` marks an operator's job, and its retries keep it.
        && (job.job_type == JobType::Webhook || job.triggered_by.is_none())
    {
        let history = RunHistory {
            record_id: &record_id,
            run: &this_run,
            previous,
        };
        return set_aside(app, queue, message, &job, history, integration, now).await;
    }
    let resumed = match &integration {
        Ok(_) => match take_integration(app, &job, now).await? {
            Taken::Run(resumed) => resumed,
            Taken::Wait { holder, retry_in } => {
                return wait_for(app, queue, message, &job, &holder, retry_in, now).await;
            }
        },
        Err(_) => Resumed::default(),
    };

    let record = IntegrationSync {
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
            &this_run,
            now,
            json!({
                "integrationId": job.integration_id, "tenantId": job.tenant_id,
                "jobId": job.job_id, "jobType": record.job_type, "trigger": record.trigger,
                "attempt": job.attempt,
            }),
        )],
    )
    .await;

    let result = match &integration {
        Ok(integration) => run(app, &job, integration, resumed, now).await,
        Err(unreadable) => Err(unreadable.clone()),
    };
    let completed = Utc::now().max(now);
    match result {
        Ok(outcome) => {
            succeed(
                app, queue, message, &job, &this_run, &record_id, record, outcome, completed,
            )
            .await
        }
        Err(failure) if failure.resume_next_run => {
            let outcome = Outcome {
                stopped: Some(Stop::Quota(failure)),
                ..Outcome::default()
            };
            succeed(
                app, queue, message, &job, &this_run, &record_id, record, outcome, completed,
            )
            .await
        }
        Err(failure) if failure.code == FailureCode::Superseded => {
            tracing::warn!(job_id = %job.job_id, "sync job stopped: another job took over its integration");
            let outcome = Outcome {
                stopped: Some(Stop::Superseded(failure)),
                ..Outcome::default()
            };
            succeed(
                app, queue, message, &job, &this_run, &record_id, record, outcome, completed,
            )
            .await
        }
        Err(failure) => {
            let readable = integration.is_ok();
            fail(
                app, queue, message, &job, &this_run, &record_id, record, failure, readable,
                completed,
            )
            .await
        }
    }
}

/// What a job found when it claimed its integration.
enum Taken {
    /// It runs, resuming with what it did before it was interrupted, if anything.
    Run(Resumed),
    /// Another chain holds the integration.
    Wait {
        holder: String,
        retry_in: chrono::Duration,
    },
}

/// Where a job starts: what it did before it was interrupted, and the entities earlier jobs of
/// its chain finished.
#[derive(Default)]
struct Resumed {
    progress: Option<JobProgress>,
    finished_in_chain: Vec<String>,
}

/// Claims the integration for this job's chain, unless another chain holds it.
async fn take_integration(
    app: &App,
    job: &SyncJobMessage,
    now: DateTime<Utc>,
) -> Result<Taken, Transient> {
    let mut taken = Taken::Run(Resumed::default());
    update_integration(
        app,
        &job.tenant_id,
        &job.integration_id,
        now,
        |i| match lease::claim(i.running.as_ref(), &job.job_id, job.deferrals, now) {
            Claim::Run => {
                let held = lease::hold(i.running.as_ref(), &job.job_id, now);
                taken = Taken::Run(Resumed {
                    progress: held.progress.clone(),
                    finished_in_chain: held.finished_in_chain.clone(),
                });
                i.running = Some(held);
                // A catch-up begins: what changes from now on is a notification's of its own.
                i.begin_catch_up(&job.job_id, now);
                true
            }
            Claim::Wait { holder, retry_in } => {
                taken = Taken::Wait { holder, retry_in };
                false
            }
        },
    )
    .await?;
    Ok(taken)
}

/// Puts the job back on its queue to run once the integration's current sync is over. An
/// operator's replay stays one: its job may have finished before.
async fn wait_for(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    job: &SyncJobMessage,
    holder: &str,
    retry_in: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let later = SyncJobMessage {
        deferrals: job.deferrals + 1,
        ..job.clone()
    };
    let message_id = format!(
        "{}:attempt-{}:wait-{}",
        job.job_id, job.attempt, later.deferrals
    );
    let at = now + retry_in;
    let mut copy = OutgoingMessage::json(queue, message_id, &later).scheduled_at(at);
    if let Some(replayed) = property(&message.application_properties, REPLAYED_FROM) {
        copy = copy.property(REPLAYED_FROM, replayed.clone());
    }
    app.queue.send(copy).await?;
    tracing::info!(job_id = %job.job_id, integration_id = %job.integration_id, running = %holder, retry_at = %at, "another sync of the integration is running; the job waits");
    Ok(())
}

/// Runs the job against the integration's provider. Credentials refreshed on the way are
/// stored as they are refreshed (see [`StoredCredentials`]).
async fn run(
    app: &App,
    job: &SyncJobMessage,
    integration: &Integration,
    resumed: Resumed,
    now: DateTime<Utc>,
) -> Result<Outcome, Failure> {
    let name = &integration.provider_name;
    let provider = app.providers.get(name).ok_or_else(|| {
        Failure::new(
            FailureCode::ProviderNotSupported,
            format!("this build has no adapter for provider `{name}`"),
        )
    })?;
    if integration.entity_mappings.is_empty() {
        return Err(Failure::new(
            ErrorCode::ValidationError,
            "the integration maps no entity",
        ));
    }
    let mut conn =
        credentials::connect(app, &job.tenant_id, &job.integration_id, integration).await?;
    let entities = job.entities.clone().unwrap_or_default();
    let pipeline_job = pipeline::Job {
        tenant_id: &job.tenant_id,
        integration_id: &job.integration_id,
        job_id: &job.job_id,
        // A full sync reads every entity from the start, but for an integration that never
        // finished one, unless a person asked (`handler sync --full`): the entities an earlier
        // try finished (before the provider's quota or a failure stopped it) have their
        // cursors, and are not read again from the start by every scheduled try after it.
        full: job.job_type == JobType::FullSync
            && (integration.last_sync_at.is_some() || job.triggered_by.is_some()),
        entities: &entities,
        finished_in_chain: &resumed.finished_in_chain,
        max_records: app.settings.max_records_per_sync,
        retry_base: app.settings.record_retry_base,
    };
    match notified_ids(job)? {
        Some(Notified::Deleted(entity, ids)) => {
            pipeline::run_deleted(app, &pipeline_job, integration, &entity, &ids, now).await
        }
        Some(Notified::Changed(entity, ids)) => {
            pipeline::run_notified(
                app,
                provider.as_ref(),
                &mut conn,
                &pipeline_job,
                integration,
                &entity,
                &ids,
                now,
            )
            .await
        }
        None => {
            pipeline::run(
                app,
                provider,
                &mut conn,
                &pipeline_job,
                integration,
                resumed.progress,
                now,
            )
            .await
        }
    }
}

/// What a webhook job is about.
enum Notified {
    /// These records changed: read them back.
    Changed(String, Vec<String>),
    /// These records were deleted.
    Deleted(String, Vec<String>),
}

/// The records a webhook job is about, or `None` for a job that syncs its entities from their
/// cursors (every job but a webhook's, and a webhook's that says only that something changed).
/// A notification says which records changed, never what they hold now: the records are read
/// from the provider.
fn notified_ids(job: &SyncJobMessage) -> Result<Option<Notified>, Failure> {
    if job.job_type != JobType::Webhook {
        return Ok(None);
    }
    let invalid =
        |why: &str| Failure::new(FailureCode::InvalidMessage, format!("webhook job: {why}"));
    let payload = job
        .webhook_payload
        .as_ref()
        .ok_or_else(|| invalid("no webhookPayload"))?;
    let entity = payload["entity"]
        .as_str()
        .ok_or_else(|| invalid("no entity"))?
        .to_string();
    let deleted = payload.get("deletedIds").is_some();
    if payload.get("ids").is_none() && payload.get("records").is_none() && !deleted {
        return Ok(None);
    }
    // Jobs enqueued before notifications carried ids alone list whole records.
    let listed = payload["ids"]
        .as_array()
        .or_else(|| payload["records"].as_array())
        .or_else(|| payload["deletedIds"].as_array())
        .ok_or_else(|| invalid("no ids"))?;
    let ids = listed
        .iter()
        .map(|v| {
            v.as_str()
                .or_else(|| v["id"].as_str())
                .map(str::to_string)
                .ok_or_else(|| invalid("an id is not a string"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(if deleted {
        Notified::Deleted(entity, ids)
    } else {
        Notified::Changed(entity, ids)
    }))
}

/// The id of the job that continues `job_id` after a record limit: `<id>+1`, `<id>+2`, ...
pub fn continuation_id(job_id: &str) -> String {
    match numbered(job_id, "+") {
        Some((root, n)) => format!("{root}+{}", n + 1),
        None => format!("{job_id}+1"),
    }
}

/// The root and number of an id that ends in `<separator><number>`.
fn numbered<'a>(id: &'a str, separator: &str) -> Option<(&'a str, u32)> {
    let (root, n) = id.rsplit_once(separator)?;
    Some((root, n.parse().ok()?))
}

/// How long a webhook job stopped by the provider's allocation waits to read its records
/// again, when the provider does not say, and how many times it waits.
const WEBHOOK_HOLD: chrono::Duration = chrono::Duration::hours(1);
const MAX_WEBHOOK_HOLDS: u32 = 24;

/// What becomes of a webhook job that the provider's used-up allocation stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum WebhookHold {
    /// It is sent again for when the allocation is back.
    Again(SyncJobMessage),
    /// It has waited as often as it may: it is dead-lettered, for an operator to replay.
    GivenUp,
}

/// What becomes of `job`, which the provider's allocation stopped (`stop`). The records a
/// notification names are read by its job alone: the provider does not deliver it again, and
/// the integration may sync on no schedule. So such a job is held: sent again
/// (`<job>:held-<n>`) for when the provider says the allocation is back, else an hour on, up
/// to [`MAX_WEBHOOK_HOLDS`] times, then dead-lettered. None for a job that is not held: a
/// scheduled sync resumes from its checkpoints on its next run, and a catch-up (a notification
/// naming no records) is what any later sync or catch-up of the entity reads from the cursor.
pub fn held_webhook_job(
    job: &SyncJobMessage,
    stop: &Failure,
    replayed_from: Option<&serde_json::Value>,
    now: DateTime<Utc>,
) -> Option<WebhookHold> {
    if !matches!(notified_ids(job), Ok(Some(Notified::Changed(..)))) {
        return None;
    }
    // An operator's replay of a job given up holds anew, under a name of its own: the held
    // jobs before it have finished records, which a copy named alike would be taken for.
    let (root, holds) = match (replayed_from, numbered(&job.job_id, ":held-")) {
        (Some(sequence), _) => (format!("{}@replay-{sequence}", job.job_id), 0),
        (None, Some((root, n))) => (root.to_string(), n),
        (None, None) => (job.job_id.clone(), 0),
    };
    if holds >= MAX_WEBHOOK_HOLDS {
        return Some(WebhookHold::GivenUp);
    }
    let at = stop
        .resume_at
        .filter(|at| *at > now)
        .unwrap_or(now + WEBHOOK_HOLD)
        .min(now + chrono::Duration::days(1));
    Some(WebhookHold::Again(SyncJobMessage {
        job_id: format!("{root}:held-{}", holds + 1),
        scheduled_at: at,
        attempt: 1,
        deferrals: 0,
        ..job.clone()
    }))
}

#[allow(clippy::too_many_arguments)]
async fn succeed(
    app: &App,
    queue: &str,
    delivered: &ServiceBusMessage,
    job: &SyncJobMessage,
    run: &str,
    record_id: &str,
    mut record: IntegrationSync,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let stats = outcome.stats.clone();
    let held = match &outcome.stopped {
        Some(Stop::Quota(e)) => held_webhook_job(
            job,
            e,
            property(&delivered.application_properties, REPLAYED_FROM),
            now,
        ),
        _ => None,
    };
    let (status, message) = match &outcome.stopped {
        Some(Stop::Quota(e)) => match &held {
            Some(WebhookHold::Again(held)) => (
                SyncStatus::Partial,
                format!(
                    "stopped early, its records read again from {} in job {}: {}",
                    crate::model::timestamp::format(&held.scheduled_at),
                    held.job_id,
                    e.message
                ),
            ),
            Some(WebhookHold::GivenUp) => (
                SyncStatus::Failed,
                format!(
                    "stopped early, and dead-lettered for an operator to replay after waiting \
                     {MAX_WEBHOOK_HOLDS} times for the provider's allocation: {}",
                    e.message
                ),
            ),
            None => (
                SyncStatus::Partial,
                format!("stopped early, resuming on the next run: {}", e.message),
            ),
        },
        Some(Stop::Superseded(e)) => (SyncStatus::Partial, format!("stopped: {}", e.message)),
        // Nothing landed. (A record whose shard was written can still count a failure, of a
        // shard derived from it.)
        _ if stats.shards_failed > 0
            && stats.shards_created + stats.shards_updated + stats.shards_skipped == 0 =>
        {
            (
                SyncStatus::Failed,
                format!("all {} records failed", stats.shards_failed),
            )
        }
        _ if stats.shards_failed > 0 => (
            SyncStatus::Partial,
            format!("Sync completed with {} failures", stats.shards_failed),
        ),
        Some(Stop::RecordLimit) => (
            SyncStatus::Success,
            format!(
                "stopped at the limit of {} records per sync; continuing in job {}",
                app.settings.max_records_per_sync,
                continuation_id(&job.job_id)
            ),
        ),
        None => (
            SyncStatus::Success,
            "Sync completed successfully".to_string(),
        ),
    };
    if let Some(Stop::Quota(e) | Stop::Superseded(e)) = &outcome.stopped {
        record.errors.get_or_insert_with(Vec::new).push(SyncError {
            code: e.code.as_str().into(),
            message: e.message.clone(),
            entity: None,
            record_id: None,
            shard_id: None,
            field: None,
            timestamp: now,
            retryable: matches!(outcome.stopped, Some(Stop::Quota(_))),
        });
    }
    record.stats = stats;
    record.entity_stats = (!outcome.entity_stats.is_empty()).then_some(outcome.entity_stats);
    if !outcome.errors.is_empty() {
        record
            .errors
            .get_or_insert_with(Vec::new)
            .extend(outcome.errors);
    }
    record.sync_details = Some(outcome.details);
    finish(&mut record, status, message, now);

    let scheduled = job.job_type != JobType::Webhook;
    let started = record.started_at;
    let continuation =
        (outcome.stopped == Some(Stop::RecordLimit)).then(|| continuation_id(&job.job_id));
    // A job stops at its record limit inside its last entity; those before it are done.
    let finished: Vec<String> = record
        .entity_stats
        .as_deref()
        .and_then(<[_]>::split_last)
        .map(|(_, done)| done.iter().map(|e| e.external_entity.clone()).collect())
        .unwrap_or_default();
    // The record is written last: a crash before it leaves the job running, and its
    // redelivery repeats these idempotent steps. The hand-over comes before the continuation
    // is sent, so that the continuation finds the entities this job finished.
    // A job another took over leaves the integration to it.
    let superseded = matches!(outcome.stopped, Some(Stop::Superseded(_)));
    update_integration(app, &job.tenant_id, &job.integration_id, now, |i| {
        if superseded {
            return false;
        }
        if scheduled && outcome.stopped.is_none() {
            // The sync began with its chain's first job (or its claim), which read the
            // entities finished before this job.
            let chain_began = i
                .running
                .as_ref()
                .filter(|r| r.chain == lease::chain_of(&job.job_id))
                .map_or(started, |r| r.since.min(started));
            i.last_sync_at = Some(chain_began);
        }
        match &continuation {
            Some(next) => lease::hand_over(&mut i.running, &job.job_id, next, &finished, now),
            None => end_chain(i, &job.job_id),
        }
        true
    })
    .await?;
    match &held {
        Some(WebhookHold::Again(held)) => {
            let copy = OutgoingMessage::json(queue, held.job_id.clone(), held)
                .scheduled_at(held.scheduled_at);
            app.queue.send(copy).await?;
        }
        Some(WebhookHold::GivenUp) => {
            let reason = record.status_message.clone().unwrap_or_default();
            send_dead_letter(app, queue, delivered, "RATE_LIMIT", &reason).await?;
        }
        None => {}
    }
    if let Some(next_id) = &continuation {
        let next = SyncJobMessage {
            job_id: next_id.clone(),
            scheduled_at: now,
            attempt: 1,
            ..job.clone()
        };
        app.queue
            .send(OutgoingMessage::json(queue, next.job_id.clone(), &next))
            .await?;
    }
    save(app, job, record_id, &record, now).await?;
    tracing::info!(status = ?record.status, stats = %json!(record.stats), duration_ms = record.duration_ms, "sync job finished");
    let given_up = (held == Some(WebhookHold::GivenUp)).then(|| {
        (
            "RATE_LIMIT",
            record.status_message.as_deref().unwrap_or_default(),
        )
    });
    announce_end(app, job, run, &record, given_up, now).await;
    Ok(())
}

/// Counts a job that ended, in the metrics, and announces it: as failed with a code and why,
/// where the job itself failed (`failure`), else with its record's status and counts.
async fn announce_end(
    app: &App,
    job: &SyncJobMessage,
    run: &str,
    record: &IntegrationSync,
    failure: Option<(&str, &str)>,
    now: DateTime<Utc>,
) {
    let failed = record.status == SyncStatus::Failed;
    app.metrics.sync_finished(
        dimensions(job),
        &record.stats,
        record.duration_ms.unwrap_or_default(),
        failed,
    );
    let (kind, data) = match failure {
        Some((code, error)) => (
            events::SYNC_FAILED,
            json!({
                "integrationId": job.integration_id, "tenantId": job.tenant_id, "jobId": job.job_id,
                "code": code, "error": error,
            }),
        ),
        None => (
            if failed {
                events::SYNC_FAILED
            } else {
                events::SYNC_COMPLETED
            },
            json!({
                "integrationId": job.integration_id, "tenantId": job.tenant_id, "jobId": job.job_id,
                "status": record.status, "stats": record.stats, "durationMs": record.duration_ms,
            }),
        ),
    };
    publish(app, &[Event::new(kind, subject(job), run, now, data)]).await;
}

#[allow(clippy::too_many_arguments)]
async fn fail(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    job: &SyncJobMessage,
    run: &str,
    record_id: &str,
    mut record: IntegrationSync,
    failure: Failure,
    integration_readable: bool,
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
    match after_failure(failure.code, job.attempt, failure.resume_at, now) {
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
            // The chain keeps the integration through the wait: its retry resumes the work.
            update_integration(app, &job.tenant_id, &job.integration_id, now, |i| {
                lease::wait_for_retry(&mut i.running, &job.job_id, at)
            })
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
            // The record that says the job is over goes last: a redelivery after any earlier
            // step failed finds the job unfinished and takes the steps again (the dead letter
            // keeps its message id, so it is not listed twice).
            send_dead_letter(app, queue, message, failure.code.as_str(), &summary).await?;
            let needs_reauth = failure.code.needs_new_credentials();
            // An integration that cannot be read cannot be updated either; its failed record
            // and dead letter say why.
            // What the job did up to its last checkpoint is told in its record, not lost with
            // the chain's hold.
            let mut progress = None;
            if integration_readable {
                update_integration(app, &job.tenant_id, &job.integration_id, now, |i| {
                    progress = i
                        .running
                        .as_ref()
                        .filter(|_| lease::holds(i.running.as_ref(), &job.job_id))
                        .and_then(|r| r.progress.clone());
                    // Syncing again cannot help until someone sets new credentials; one an
                    // operator paused (and synced all the same) stays paused.
                    if needs_reauth && i.status == IntegrationStatus::Active {
                        i.status = IntegrationStatus::Error;
                        i.status_message = Some(summary.clone());
                    }
                    end_chain(i, &job.job_id);
                    true
                })
                .await?;
            }
            if let Some(progress) = progress {
                let done = pipeline::checkpointed(progress);
                record.stats = done.stats;
                record.entity_stats = (!done.entity_stats.is_empty()).then_some(done.entity_stats);
                let fatal = record.errors.take().unwrap_or_default();
                record.errors = Some(done.errors.into_iter().chain(fatal).collect());
            }
            finish(&mut record, SyncStatus::Failed, summary.clone(), now);
            save(app, job, record_id, &record, now).await?;
            tracing::error!(job_id = %job.job_id, error = %failure, exhausted, "sync job failed");
            if needs_reauth {
                // A token the job could not refresh: the alert on refreshes that fail sees it,
                // as it sees the token refresher's (a provider the refresher leaves to its
                // syncs, Salesforce, fails only here). Counted once the job's end is saved,
                // so that a delivery again does not count it twice.
                app.metrics.token_refreshed(dimensions(job), true);
            }
            let failed = Some((failure.code.as_str(), summary.as_str()));
            announce_end(app, job, run, &record, failed, now).await;
            Ok(())
        }
    }
}

/// A job of an integration that is not active, not run. A webhook's changes may be ones no
/// later sync reads (a deletion the provider reports only then): its job, a retry or
/// continuation of one too, is dead-lettered (`INTEGRATION_NOT_ACTIVE`) for an operator to
/// replay once the integration is active. A scheduled job stands down: the first sync once
/// it is active catches up from the cursors and checkpoints. Either way its chain lets go of
/// the integration, and a record an earlier delivery of it began says it ended there.
async fn set_aside(
    app: &App,
    queue: &str,
    message: &ServiceBusMessage,
    job: &SyncJobMessage,
    history: RunHistory<'_>,
    integration: &Integration,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let status = integration.status.as_phrase();
    let kept = job.job_type == JobType::Webhook;
    let code = FailureCode::IntegrationNotActive.as_str();
    let reason = if kept {
        format!(
            "the integration is {status}: its webhook's job waits here, to be replayed once it is active again"
        )
    } else {
        format!("stopped: the integration is {status}; the first sync once it is active catches up")
    };
    if kept {
        tracing::info!(queue, job_id = %job.job_id, %reason, "dead-lettering a sync job");
        send_dead_letter(app, queue, message, code, &reason).await?;
    } else {
        tracing::info!(queue, job_id = %job.job_id, %reason, "a sync job stands down");
    }
    update_integration(app, &job.tenant_id, &job.integration_id, now, |i| {
        let held = lease::is_held_by_chain(i.running.as_ref(), &job.job_id, now);
        if held {
            end_chain(i, &job.job_id);
        }
        // A catch-up set aside reads nothing: what it stood for takes a job of its own.
        i.begin_catch_up(&job.job_id, now) || held
    })
    .await?;
    if let Some(mut record) = history.previous.filter(|p| !p.is_finished()) {
        let status = if kept {
            SyncStatus::Failed
        } else {
            SyncStatus::Partial
        };
        finish(&mut record, status, reason.clone(), now);
        save(app, job, history.record_id, &record, now).await?;
        let failed = kept.then_some((code, reason.as_str()));
        announce_end(app, job, history.run, &record, failed, now).await;
    }
    Ok(())
}

/// A job's run as its history knows it: its record's id, the run's name in events, and what
/// an earlier delivery of the job recorded.
struct RunHistory<'a> {
    record_id: &'a str,
    run: &'a str,
    previous: Option<IntegrationSync>,
}

/// The job's chain lets go of the integration, which remembers it ended.
fn end_chain(integration: &mut Integration, job_id: &str) {
    if let Some(chain) = lease::release(&mut integration.running, job_id) {
        integration.ended_chain = Some(chain);
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
    let mut shard = record
        .clone()
        .into_shard(record_id.to_string(), &job.tenant_id, now);
    // Cosmos DB deletes the record when its `ttl` runs out; the embedded store does the same.
    let ttl = app.settings.history_retention.ttl_seconds(&job.tenant_id);
    shard.ttl = Some(ttl);
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

fn dimensions(job: &SyncJobMessage) -> Dimensions<'_> {
    Dimensions {
        integration_id: &job.integration_id,
        tenant_id: &job.tenant_id,
        provider: &job.provider,
    }
}

fn subject(job: &SyncJobMessage) -> String {
    format!(
        "/tenants/{}/integrations/{}",
        job.tenant_id, job.integration_id
    )
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, Utc};
    use serde_json::json;

    use super::*;

    #[test]
    fn continuations_number_themselves() {
        assert_eq!(continuation_id("job_1"), "job_1+1");
        assert_eq!(continuation_id("job_1+1"), "job_1+2");
        assert_eq!(continuation_id("job_a+b"), "job_a+b+1");
    }

    #[test]
    fn a_webhook_job_the_allocation_stopped_is_held_until_it_is_back_then_dead_lettered() {
        let now: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
        let job = |id: &str, job_type: &str, payload: serde_json::Value| -> SyncJobMessage {
            serde_json::from_value(json!({
                "integrationId": "int-1", "tenantId": "t1", "jobType": job_type,
                "provider": "salesforce", "jobId": id, "scheduledAt": now, "attempt": 3,
                "webhookPayload": payload
            }))
            .unwrap()
        };
        let named = json!({"entity": "Account", "ids": ["001"]});
        let quota = Failure::new(FailureCode::from(adapters::ErrorCode::RateLimit), "used up");

        let Some(WebhookHold::Again(held)) =
            held_webhook_job(&job("wh_1", "webhook", named.clone()), &quota, None, now)
        else {
            panic!("held");
        };
        assert_eq!(held.job_id, "wh_1:held-1");
        assert_eq!(held.scheduled_at, now + Duration::hours(1));
        assert_eq!(held.attempt, 1);
        assert_eq!(held.webhook_payload, Some(named.clone()));

        // Where the provider says when its allocation comes back, then.
        let midnight = Failure {
            resume_at: Some(now + Duration::hours(14)),
            ..quota.clone()
        };
        let Some(WebhookHold::Again(held)) = held_webhook_job(
            &job("wh_1:held-1", "webhook", named.clone()),
            &midnight,
            None,
            now,
        ) else {
            panic!("held again");
        };
        assert_eq!(held.job_id, "wh_1:held-2");
        assert_eq!(held.scheduled_at, now + Duration::hours(14));

        assert_eq!(
            held_webhook_job(
                &job("wh_1:held-24", "webhook", named.clone()),
                &quota,
                None,
                now
            ),
            Some(WebhookHold::GivenUp)
        );
        // An operator's replay of it holds anew, under its own name.
        let replayed = json!(4711);
        let Some(WebhookHold::Again(held)) = held_webhook_job(
            &job("wh_1:held-24", "webhook", named.clone()),
            &quota,
            Some(&replayed),
            now,
        ) else {
            panic!("a replay is held anew");
        };
        assert_eq!(held.job_id, "wh_1:held-24@replay-4711:held-1");
        assert!(
            held_webhook_job(
                &job("sync_1", "incremental", json!(null)),
                &quota,
                None,
                now
            )
            .is_none(),
            "a scheduled sync resumes from its checkpoints on the next run"
        );
        assert!(
            held_webhook_job(
                &job("wh_2", "webhook", json!({"entity": "Account"})),
                &quota,
                None,
                now
            )
            .is_none(),
            "a catch-up is any later sync's to read"
        );
    }
}
