//! The sync engine: what the functions do, over the I/O traits.
//!
//! The major components are:
//!
//! * [`scheduler`]: which integrations are due, and the job each gets.
//! * [`inbound`]: running one sync job from a queue message to its history record.
//! * [`pipeline`]: pages of provider records in, shards out, with checkpoints; [`listed`]: what
//!   a complete listing returned, to tell what it no longer has.
//! * [`retry`]: what happens to a job whose run failed; [`failure`]: why it failed.
//! * [`integrations`]: the checks an integration passes when it is registered.
//! * [`lease`]: one sync of an integration at a time; the chain of jobs that holds it.
//! * [`credentials`]: an integration's credentials, stored before use, refreshed one at a time.
//! * [`state`]: etag-guarded updates of an integration's state.
//! * [`subscriptions`]: provider-side webhook subscriptions, created, renewed and deleted.
//!
//! Decisions are plain functions over data, tested without a runtime; the `async` functions
//! around them only read, write and send.

pub mod conflicts;
pub mod credentials;
pub mod failure;
pub mod inbound;
pub mod integrations;
pub mod lease;
pub mod listed;
pub mod outbound;
pub mod pipeline;
pub mod plan;
pub mod retry;
pub mod scheduler;
pub mod shards;
pub mod state;
pub mod subscriptions;
pub mod two_way;

/// The maps and sets a page's planning fills by the thousand, keyed by ids and match keys:
/// hashed with foldhash rather than SipHash, which took more instructions than the maps'
/// own work. It is seeded per process all the same.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// A failure that a later delivery of the same message can fix (a backend was unreachable or
/// busy). The invocation fails, so the host abandons the message and the broker redelivers it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

impl From<crate::store::StoreError> for Transient {
    fn from(e: crate::store::StoreError) -> Self {
        Self(e.to_string())
    }
}

impl From<crate::queue::QueueError> for Transient {
    fn from(e: crate::queue::QueueError) -> Self {
        Self(e.to_string())
    }
}

/// Publishes events; a failure is logged, never fatal to the work that raised them.
pub(crate) async fn publish(app: &crate::app::App, events: &[crate::model::Event]) {
    if let Err(e) = app.events.publish(events).await {
        tracing::warn!(error = %e, count = events.len(), "could not publish events");
    }
}

/// Where a job's history record is, and the record as a previous delivery left it: the first
/// of the job's candidate ids that is free or already holds this job's record.
pub(crate) async fn history_slot(
    app: &crate::app::App,
    tenant_id: &str,
    job_id: &str,
    scheduled_at: chrono::DateTime<chrono::Utc>,
) -> Result<(String, Option<crate::model::IntegrationSync>), Transient> {
    use crate::model::history::history_shard_id_candidate;
    const CANDIDATES: u32 = 16;
    for n in 0..CANDIDATES {
        let id = history_shard_id_candidate(job_id, scheduled_at, n);
        let Some(stored) = app.store.get(tenant_id, &id).await? else {
            return Ok((id, None));
        };
        match stored.value.data::<crate::model::IntegrationSync>() {
            Ok(record) if record.job_id == job_id => return Ok((id, Some(record))),
            _ => continue,
        }
    }
    Err(Transient(format!(
        "no free history id for job `{job_id}` among {CANDIDATES} candidates"
    )))
}
