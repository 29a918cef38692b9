//! Finding due integrations and enqueuing one sync job each.
//!
//! Two timer ticks, or two scaled-out instances, may see the same integration due at once.
//! Each job's MessageId is derived from the integration and the due time it was scheduled for,
//! so the queue's duplicate detection drops the second send; and `nextSyncAt` is advanced under
//! the etag it was read at, so only one instance claims the due time.
//!
//! Limits: an integration is never due sooner than the minimum interval after the minute of
//! the tick that claimed it (ticks count in whole minutes), and a tenant never has more syncs
//! under way than its concurrency limit. Work over a limit is left due for a later tick, never
//! dropped; when more is due than a tick reads, what waits for its tenant's limit moves behind
//! what comes due by the next tick (still serving the due time it was moved from), so that a
//! tenant's backlog does not fill every tick's read.

use std::collections::HashMap;

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde_json::json;

use super::lease;
use super::state::update_integration;
use super::{Transient, publish};
use crate::app::App;
use crate::model::event::types as events;
use crate::model::history::SyncTrigger;
use crate::model::messages::JobType;
use crate::model::shard::types as shard_types;
use crate::model::{Event, Integration, Shard, SyncJobMessage, timestamp};
use crate::queue::{OutgoingMessage, SYNC_INBOUND_SCHEDULED};
use crate::store::{Op, ShardQuery};

/// Integrations read per tick, longest due first; the rest are read by the next ticks.
const MAX_PER_TICK: usize = 500;

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickSummary {
    pub due: usize,
    pub enqueued: usize,
    /// Due, but left for a later tick by the tenant's concurrency limit.
    pub deferred: usize,
}

/// The job for an integration that became due at `due_at`, with its deterministic id.
pub fn scheduled_job(
    shard: &Shard,
    integration: &Integration,
    due_at: DateTime<Utc>,
) -> SyncJobMessage {
    SyncJobMessage {
        integration_id: shard.id.clone(),
        tenant_id: shard.tenant_id.clone(),
        job_type: if integration.last_sync_at.is_some() {
            JobType::Incremental
        } else {
            JobType::FullSync
        },
        provider: integration.provider_name.clone(),
        // Integration ids are a tenant's own: two tenants' integrations may share one, and
        // their cron schedules come due together.
        job_id: format!(
            "job_{}_{}_{}",
            shard.tenant_id,
            shard.id,
            due_at.format("%Y%m%dT%H%M%S%.3fZ")
        ),
        trigger: SyncTrigger::Scheduled,
        triggered_by: None,
        webhook_payload: None,
        entities: None,
        scheduled_at: due_at,
        attempt: 1,
        deferrals: 0,
    }
}

/// What a tick's claim of a due time came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The job's chain holds the integration (or its job has run already).
    Holds,
    /// Another sync took the integration since the tick looked: the job, sent already, waits
    /// for it to end (as any job that finds another running does), and serves the due time.
    Waits,
    /// Another tick claimed this due time first (or another instance's crowded tick passed it
    /// over and the next due time is claimed by then).
    Lost,
}

/// Claims `integration`, due at `due_at`, for `job_id`, which was just sent: its next due time
/// moves on and the job's chain holds it, unless another sync took it meanwhile. The job may
/// have started already (it was sent before the claim), or even ended: its own hold, or none,
/// is the claim. The due time moves on whenever the job serves it: left due, the next tick
/// would send the job again, and once the duplicate window had passed both copies would run.
pub fn claim_due(
    integration: &mut Integration,
    due_at: DateTime<Utc>,
    job_id: &str,
    now: DateTime<Utc>,
    min_interval: Duration,
) -> Claimed {
    // The due time a crowded tick moved it on from, if one did, is the one jobs serve: a tick
    // that sent its job a moment before another moved it still claims it.
    if integration.passed_over_from.or(integration.next_sync_at) != Some(due_at) {
        return Claimed::Lost;
    }
    integration.passed_over_from = None;
    integration.next_sync_at = next_due(&integration.sync_frequency, now, min_interval);
    let running = integration.running.as_ref();
    let started = lease::is_held_by_chain(running, job_id, now)
        || integration.ended_chain.as_deref() == Some(lease::chain_of(job_id));
    if started {
        Claimed::Holds
    } else if lease::is_held(running, now) {
        Claimed::Waits
    } else {
        integration.running = Some(lease::queued(job_id, now));
        Claimed::Holds
    }
}

/// A job asked for by a person (`handler sync`), due now.
pub fn manual_job(
    shard: &Shard,
    integration: &Integration,
    full: bool,
    now: DateTime<Utc>,
    user: &str,
) -> SyncJobMessage {
    SyncJobMessage {
        // Only a person's `--full` reads what already has a cursor from the start: an
        // integration whose first sync stopped part way goes on from where it stopped.
        job_type: if full || (integration.last_sync_at.is_none() && integration.cursors.is_empty())
        {
            JobType::FullSync
        } else {
            JobType::Incremental
        },
        job_id: format!("job_{}_{}", shard.id, uuid::Uuid::new_v4().simple()),
        trigger: SyncTrigger::Manual,
        triggered_by: Some(user.to_string()),
        ..scheduled_job(shard, integration, now)
    }
}

/// The query for integrations due at `now`.
pub fn due_query(now: DateTime<Utc>) -> ShardQuery {
    ShardQuery::of_type(shard_types::INTEGRATION)
        .filter("structuredData.status", Op::Eq, json!("active"))
        .filter(
            "structuredData.nextSyncAt",
            Op::Le,
            timestamp::query_value(&now),
        )
        .order_by("structuredData.nextSyncAt", false)
        // One more than a tick reads, to tell whether more are due.
        .limit(MAX_PER_TICK + 1)
}

/// When an integration claimed at `now` is next due: its frequency's next time, but never
/// sooner than the minimum interval. Both count from the minute the tick stands for. A tick
/// runs a few milliseconds into its minute, and a due time that far past a minute would wait
/// for the next tick: a five-minute schedule would run every six minutes half the time.
pub fn next_due(
    frequency: &crate::model::SyncFrequency,
    now: DateTime<Utc>,
    min_interval: Duration,
) -> Option<DateTime<Utc>> {
    let tick = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
    frequency
        .next_after(tick)
        .map(|next| next.max(tick + min_interval))
}

/// Integrations of the tenant whose sync is under way: held by a chain of jobs from the claim
/// to the chain's last job, whatever started it (the scheduler, an operator, a webhook).
async fn syncs_in_progress(
    app: &App,
    tenant_id: &str,
    now: DateTime<Utc>,
) -> Result<usize, Transient> {
    let query = ShardQuery::of_type(shard_types::INTEGRATION)
        .in_tenant(tenant_id)
        .filter(
            "structuredData.running.until",
            Op::Ge,
            timestamp::query_value(&now),
        );
    Ok(app.store.query(&query).await?.len())
}

/// Integrations with a job queued or running, per tenant: the queue depth the scheduler sees.
async fn pending_by_tenant(
    app: &App,
    now: DateTime<Utc>,
) -> Result<std::collections::BTreeMap<String, u64>, Transient> {
    let query = ShardQuery::of_type(shard_types::INTEGRATION).filter(
        "structuredData.running.until",
        Op::Ge,
        timestamp::query_value(&now),
    );
    let mut by_tenant = std::collections::BTreeMap::new();
    for stored in app.store.query(&query).await? {
        *by_tenant.entry(stored.value.tenant_id).or_default() += 1;
    }
    Ok(by_tenant)
}

/// When an integration due at `due_at`, which the tick at `now` passes over for its tenant's
/// limit, is due: as it was, unless the tick is `crowded` (it found more due than it reads),
/// when it waits behind what comes due by the next tick.
pub fn due_after_passing_over(
    due_at: DateTime<Utc>,
    crowded: bool,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    if !crowded {
        return due_at;
    }
    let tick = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
    due_at.max(tick + Duration::minutes(1))
}

/// Moves the due time of an integration the tick passes over (read as `read_due`), where
/// [`due_after_passing_over`] says so, unless something claimed it meanwhile; the due time
/// its job serves stays the first one passed over (`passedOverFrom`).
async fn pass_over(
    app: &App,
    shard: &Shard,
    read_due: DateTime<Utc>,
    crowded: bool,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let later = due_after_passing_over(read_due, crowded, now);
    if later == read_due {
        return Ok(());
    }
    update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
        let still = i.next_sync_at == Some(read_due);
        if still {
            i.next_sync_at = Some(later);
            // The first due time passed over stays the one its job serves.
            i.passed_over_from.get_or_insert(read_due);
        }
        still
    })
    .await?;
    Ok(())
}

/// One SyncScheduler tick at `now`.
pub async fn tick(app: &App, now: DateTime<Utc>) -> Result<TickSummary, Transient> {
    let mut due = app.store.query(&due_query(now)).await?;
    // More due than a tick reads: what waits for its tenant's limit moves behind what comes
    // due by the next tick, so that a tenant with hundreds waiting does not fill every tick's
    // read and hold back other tenants' for good.
    let crowded = due.len() > MAX_PER_TICK;
    due.truncate(MAX_PER_TICK);
    let mut summary = TickSummary {
        due: due.len(),
        ..TickSummary::default()
    };
    let min_interval = Duration::from_std(app.settings.min_sync_interval).unwrap_or_default();
    let max_per_tenant = app.settings.max_concurrent_syncs_per_tenant;
    let mut in_progress: HashMap<String, usize> = HashMap::new();
    for stored in due {
        let shard = stored.value;
        let integration: Integration = match shard.data() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(tenant_id = %shard.tenant_id, integration_id = %shard.id, error = %e, "skipping an integration whose configuration is invalid");
                continue;
            }
        };
        let Some(read_due) = integration.next_sync_at else {
            continue;
        };
        // The due time its job serves: the one a crowded tick moved it on from, if one did,
        // so that every tick sends that due time the same job (the queue drops a copy).
        let due_at = integration.passed_over_from.unwrap_or(read_due);
        if lease::is_held(integration.running.as_ref(), now) {
            // Left due: its own sync is still under way (a manual or webhook job, a chain
            // still continuing); the tick after it ends enqueues the next one.
            summary.deferred += 1;
            continue;
        }
        let running = match in_progress.get(&shard.tenant_id) {
            Some(n) => *n,
            None => {
                let n = syncs_in_progress(app, &shard.tenant_id, now).await?;
                in_progress.insert(shard.tenant_id.clone(), n);
                n
            }
        };
        if running >= max_per_tenant {
            // Left due: a later tick enqueues it once a sync of the tenant finishes.
            summary.deferred += 1;
            tracing::info!(tenant_id = %shard.tenant_id, integration_id = %shard.id, running, "sync deferred: the tenant is at its concurrency limit");
            pass_over(app, &shard, read_due, crowded, now).await?;
            continue;
        }
        let job = scheduled_job(&shard, &integration, due_at);
        app.queue
            .send(OutgoingMessage::json(
                SYNC_INBOUND_SCHEDULED,
                job.job_id.clone(),
                &job,
            ))
            .await?;

        let mut claimed = Claimed::Lost;
        update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
            claimed = claim_due(i, due_at, &job.job_id, now, min_interval);
            claimed != Claimed::Lost
        })
        .await?;
        match claimed {
            Claimed::Holds => {
                summary.enqueued += 1;
                *in_progress.entry(shard.tenant_id.clone()).or_default() += 1;
                tracing::info!(tenant_id = %shard.tenant_id, integration_id = %shard.id, job_id = %job.job_id, "sync job enqueued");
            }
            Claimed::Waits => {
                summary.enqueued += 1;
                tracing::info!(tenant_id = %shard.tenant_id, integration_id = %shard.id, job_id = %job.job_id, "sync job enqueued; it waits for the sync that took the integration meanwhile");
            }
            Claimed::Lost => {}
        }
    }
    app.metrics.pending_jobs(pending_by_tenant(app, now).await?);
    publish(
        app,
        &[Event::new(
            events::SYNC_CHECK_DUE,
            "/integrations",
            &timestamp::format(&now),
            now,
            json!({"timestamp": now, "due": summary.due, "enqueued": summary.enqueued,
                   "deferred": summary.deferred}),
        )],
    )
    .await;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn integration_shard() -> (Shard, Integration) {
        let shard: Shard = serde_json::from_value(json!({
            "id": "int-1", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Acme",
            "structuredData": {"providerName": "salesforce",
                               "syncFrequency": {"type": "interval", "intervalMinutes": 15}}
        }))
        .unwrap();
        let integration = shard.data().unwrap();
        (shard, integration)
    }

    #[test]
    fn a_due_time_is_claimed_once_and_a_job_already_running_keeps_its_own_hold() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 5).unwrap();
        let due = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).unwrap();
        let (_, mut free) = integration_shard();
        free.next_sync_at = Some(due);
        let interval = Duration::minutes(5);

        let mut claimed = free.clone();
        assert_eq!(
            claim_due(&mut claimed, due, "job_1", now, interval),
            Claimed::Holds
        );
        assert_eq!(claimed.next_sync_at, Some(due + Duration::minutes(15)));
        assert_eq!(claimed.running, Some(lease::queued("job_1", now)));
        assert_eq!(
            claim_due(&mut claimed, due, "job_1", now, interval),
            Claimed::Lost,
            "a second tick finds the due time moved on"
        );

        // The job ran before the claim: the schedule moves on, the job's hold stays.
        let mut started = free.clone();
        started.running = Some(lease::hold(None, "job_1", now));
        assert_eq!(
            claim_due(&mut started, due, "job_1", now, interval),
            Claimed::Holds
        );
        assert_eq!(started.next_sync_at, Some(due + Duration::minutes(15)));
        assert_eq!(started.running, Some(lease::hold(None, "job_1", now)));

        // The job ran to its end before the claim: nothing to hold.
        let mut ended = free.clone();
        ended.ended_chain = Some("job_1".into());
        assert_eq!(
            claim_due(&mut ended, due, "job_1", now, interval),
            Claimed::Holds
        );
        assert_eq!(ended.next_sync_at, Some(due + Duration::minutes(15)));
        assert_eq!(ended.running, None);

        // A webhook's job took the integration between the tick's look and its claim: the
        // job sent waits for it, and no tick sends it again.
        let mut busy = free.clone();
        busy.running = Some(lease::hold(None, "job_webhook", now));
        assert_eq!(
            claim_due(&mut busy, due, "job_1", now, interval),
            Claimed::Waits
        );
        assert_eq!(busy.next_sync_at, Some(due + Duration::minutes(15)));
        assert_eq!(busy.running, Some(lease::hold(None, "job_webhook", now)));
    }

    #[test]
    fn a_due_time_always_gives_the_same_job_id() {
        let (shard, integration) = integration_shard();
        let due = Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap();
        let a = scheduled_job(&shard, &integration, due);
        let b = scheduled_job(&shard, &integration, due);
        assert_eq!(a.job_id, b.job_id);
        assert_eq!(a.job_id, "job_t1_int-1_20260101T100000.000Z");
        assert_eq!(a.job_type, JobType::FullSync, "never synced: full");
        let later = scheduled_job(&shard, &integration, due + chrono::Duration::minutes(15));
        assert_ne!(a.job_id, later.job_id);
    }

    #[test]
    fn the_minimum_interval_holds_back_frequent_schedules() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap();
        let five = Duration::minutes(5);
        let every_minute = crate::model::SyncFrequency::Interval {
            interval_minutes: 1,
        };
        assert_eq!(next_due(&every_minute, now, five), Some(now + five));
        let hourly = crate::model::SyncFrequency::Interval {
            interval_minutes: 60,
        };
        assert_eq!(
            next_due(&hourly, now, five),
            Some(now + Duration::minutes(60))
        );
        assert_eq!(
            next_due(&crate::model::SyncFrequency::Manual, now, five),
            None
        );
    }

    #[test]
    fn a_schedule_claimed_into_its_minute_is_due_at_the_tick_of_its_next_time() {
        let claimed =
            Utc.with_ymd_and_hms(2026, 1, 1, 10, 5, 0).unwrap() + Duration::milliseconds(300);
        let five = Duration::minutes(5);
        let every_five = crate::model::SyncFrequency::Cron {
            cron_expression: "0 */5 * * * *".into(),
        };
        // Not 10:10:00.300, which the tick at 10:10:00.200 would leave for the one at 10:11.
        assert_eq!(
            next_due(&every_five, claimed, five),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 10, 10, 0).unwrap())
        );
        let quarterly = crate::model::SyncFrequency::Interval {
            interval_minutes: 15,
        };
        assert_eq!(
            next_due(&quarterly, claimed, five),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 10, 20, 0).unwrap())
        );
    }

    #[test]
    fn a_due_time_another_instance_passed_over_is_still_claimed_by_the_job_sent_for_it() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 5).unwrap();
        let due = Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap();
        let (_, mut integration) = integration_shard();
        // Another instance's crowded tick moved it on, after this tick sent job_1 for 9:00.
        let moved_to = Utc.with_ymd_and_hms(2026, 11, 22, 10, 1, 0).unwrap();
        integration.next_sync_at = Some(moved_to);
        integration.passed_over_from = Some(due);
        assert_eq!(
            claim_due(
                &mut integration.clone(),
                moved_to,
                "job_2",
                now,
                Duration::minutes(5)
            ),
            Claimed::Lost,
            "every tick sends the job of the due time it was moved from"
        );
        assert_eq!(
            claim_due(&mut integration, due, "job_1", now, Duration::minutes(5)),
            Claimed::Holds
        );
        assert_eq!(integration.passed_over_from, None);
        assert_eq!(
            integration.next_sync_at,
            Some(Utc.with_ymd_and_hms(2026, 11, 22, 10, 15, 0).unwrap())
        );
    }

    #[test]
    fn what_a_crowded_tick_passes_over_waits_behind_what_comes_due_by_the_next() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 10, 5, 0).unwrap() + Duration::seconds(1);
        let due = Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap();
        assert_eq!(
            due_after_passing_over(due, false, now),
            due,
            "left as it was"
        );
        assert_eq!(
            due_after_passing_over(due, true, now),
            Utc.with_ymd_and_hms(2026, 1, 1, 10, 6, 0).unwrap()
        );
    }

    #[test]
    fn a_manual_job_is_new_each_time() {
        let (shard, mut integration) = integration_shard();
        integration.last_sync_at = Some(Utc::now());
        let now = Utc::now();
        let a = manual_job(&shard, &integration, false, now, "ops");
        let b = manual_job(&shard, &integration, false, now, "ops");
        assert_ne!(a.job_id, b.job_id);
        assert_eq!(a.job_type, JobType::Incremental);
        assert_eq!(a.trigger, SyncTrigger::Manual);
        assert_eq!(
            manual_job(&shard, &integration, true, now, "ops").job_type,
            JobType::FullSync
        );
        // Never synced to its end: a sync goes on from what an earlier try finished.
        integration.last_sync_at = None;
        assert_eq!(
            manual_job(&shard, &integration, false, now, "ops").job_type,
            JobType::FullSync,
            "nothing finished yet"
        );
        integration
            .cursors
            .insert("Account".into(), "2026-01-01T00:00:00Z".into());
        assert_eq!(
            manual_job(&shard, &integration, false, now, "ops").job_type,
            JobType::Incremental
        );
    }
}
