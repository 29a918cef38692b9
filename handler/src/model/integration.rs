//! `c_integration`: one tenant's connection to one external system, and when it syncs.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::conflict::{ConflictPolicy, Side, Strategy};
use super::history::EntitySyncStats;
use super::listing::ListingProgress;
use super::mapping::EntityMapping;
use crate::ncrontab::Ncrontab;

/// The `structuredData` of a `c_integration` shard. Configuration the engine does not read is
/// kept verbatim in `rest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Integration {
    pub provider_name: String,
    #[serde(default)]
    pub status: IntegrationStatus,
    /// Why the integration is in `error`, for the people who must act.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(default)]
    pub sync_frequency: SyncFrequency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_at: Option<DateTime<Utc>>,
    /// When the scheduler next enqueues a sync; absent for manual integrations.
    #[serde(
        default,
        with = "super::timestamp::fixed_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_sync_at: Option<DateTime<Utc>>,
    /// The due time a crowded tick first moved `next_sync_at` on from: the one its job serves
    /// and claims, whichever tick sends it, so that the queue drops a copy.
    #[serde(
        default,
        with = "super::timestamp::fixed_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub passed_over_from: Option<DateTime<Utc>>,
    /// When the stored OAuth access token expires, so TokenRefresher can find it without reading
    /// the secret.
    #[serde(
        default,
        with = "super::timestamp::fixed_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub credentials_expire_at: Option<DateTime<Utc>>,
    /// Provider connection settings (login host, organization id, import folder, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub connection: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entity_mappings: Vec<EntityMapping>,
    /// Provider-syntax filters applied to every entity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_filters: Vec<String>,
    /// Per entity: where the next incremental sync starts, as the adapter wrote it when the
    /// last sync of the entity ended (a timestamp, a delta link, a page token). The engine
    /// never reads it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cursors: BTreeMap<String, String>,
    /// Per entity with a cursor: a time no later than when the read that left it began (see
    /// `FetchRequest::cursor_read_at`). A read spans jobs, and chains of jobs, from its
    /// checkpoint; the pages after one are still the answer of the query first sent, so it is
    /// that query's time, not when the chain that finished the read began, that tells what
    /// could still have been uncommitted. Without one, the last sync's start stands for it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cursors_read_at: BTreeMap<String, DateTime<Utc>>,
    /// Per entity of a provider that reports deletions apart from records (Salesforce): how
    /// far its log of deletions has been read, by the provider's clock. The next check
    /// starts there, whether or not the entity's records changed since.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deletions_checked: BTreeMap<String, DateTime<Utc>>,
    /// Entities whose deletions the provider no longer remembered as far back as asked: their
    /// next sync, full or not, lists them whole, and of the records the listing left out
    /// soft-deletes the shards of those the provider says are gone (`Pull::gone`). An entity
    /// leaves the list once the listing is compared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_deletions: Vec<String>,
    /// Per entity: where an unfinished sync stopped, so the next job resumes there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checkpoints: BTreeMap<String, Checkpoint>,
    /// The sync under way, if any: no other job of this integration runs until it ends or its
    /// lease lapses, and it counts against the tenant's concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<RunningSync>,
    /// The chain whose hold ended last. The scheduler sends a job before it claims the
    /// integration for it; a job that ran to its end in between needs no claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_chain: Option<String>,
    /// Provider-side subscriptions delivering this integration's webhooks (Microsoft Graph).
    /// Each one's secret `clientState` is kept with the credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<WebhookSubscription>,
    /// Per entity: the catch-up a webhook sent that no job has begun yet. A notification that
    /// says only that something changed (a Drive change message, a Graph notification without
    /// data) is caught up by that job, which reads whatever changed before it begins, and
    /// sends none of its own: a burst of them makes one sync, not one each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub catch_ups: BTreeMap<String, CatchUps>,
    /// Who is refreshing the credentials: one refresh at a time, whatever asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_lease: Option<Lease>,
    /// Whether Castiel's changes to the shards of bidirectional mappings go back to the
    /// provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_back: Option<WriteBackSettings>,
    /// How conflicts between Castiel's and the provider's changes are settled.
    #[serde(default)]
    pub conflict_resolution: Strategy,
    /// A strategy of its own for some fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_strategies: BTreeMap<String, Strategy>,
    /// For `field_priority`: the side that owns each field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_owners: BTreeMap<String, Side>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `writeBack` of an integration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteBackSettings {
    pub enabled: bool,
}

/// How an entity's sync ended, for its state ([`Integration::end_entity`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntityEnd {
    /// How far the provider's log of deletions was read, if it was.
    pub deletions_covered: Option<DateTime<Utc>>,
    /// A listing from the start was compared with the entity's shards.
    pub listing_compared: bool,
    /// Deletions since the last check were lost, and no listing made up for them.
    pub deletions_lost: bool,
    /// The cursor the run's pages left, if any.
    pub cursor: Option<String>,
    /// When the read that left it began, if known.
    pub read_began: Option<DateTime<Utc>>,
}

impl Integration {
    /// The deletions of `entity` since the last check are older than the provider remembers:
    /// its cursor, how far its deletions were read and its checkpoint are forgotten, and it is
    /// marked lost, so that the next run lists it whole.
    pub fn lose_deletions(&mut self, entity: &str) {
        self.forget_cursor(entity);
        self.deletions_checked.remove(entity);
        self.checkpoints.remove(entity);
        self.mark_deletions_lost(entity);
    }

    /// `entity`'s sync ended as `end` says: how far its deletions were read, whether it is
    /// still marked lost (a compared listing clears the mark), its cursor (of the stored one
    /// and the run's, the one `newer` picks), and no checkpoint.
    pub fn end_entity(
        &mut self,
        entity: &str,
        end: EntityEnd,
        newer: impl FnOnce(String, String) -> String,
    ) {
        if let Some(covered) = end.deletions_covered {
            self.deletions_checked.insert(entity.to_string(), covered);
        }
        if end.listing_compared {
            self.lost_deletions.retain(|e| e != entity);
        } else if end.deletions_lost {
            self.mark_deletions_lost(entity);
        }
        if let Some(read) = end.cursor {
            let kept = match self.cursors.remove(entity) {
                Some(stored) => newer(stored, read.clone()),
                None => read.clone(),
            };
            if kept == read {
                // Of a read whose start was not kept (a checkpoint from before it was), the
                // start of the last chain that ran to its end, which began before it.
                match end.read_began.or(self.last_sync_at) {
                    Some(at) => self.cursors_read_at.insert(entity.to_string(), at),
                    None => self.cursors_read_at.remove(entity),
                };
            }
            self.cursors.insert(entity.to_string(), kept);
        }
        self.checkpoints.remove(entity);
    }

    /// Forgets `entity`'s cursor: its next read starts from the beginning.
    pub fn forget_cursor(&mut self, entity: &str) -> bool {
        self.cursors_read_at.remove(entity);
        self.cursors.remove(entity).is_some()
    }

    /// Marks `entity`'s deletions lost (once), so that the next run lists it whole.
    pub fn mark_deletions_lost(&mut self, entity: &str) {
        if !self.lost_deletions.iter().any(|e| e == entity) {
            self.lost_deletions.push(entity.to_string());
        }
    }

    /// Whether changes to shards of `mapping` go back to the provider.
    pub fn writes_back(&self, mapping: &EntityMapping) -> bool {
        mapping.bidirectional && self.write_back.as_ref().is_some_and(|w| w.enabled)
    }

    /// Whether any of its mappings writes back: its connections then ask for tokens that may
    /// write.
    pub fn writes_back_any(&self) -> bool {
        self.entity_mappings.iter().any(|m| self.writes_back(m))
    }

    /// Refuses two mappings that write one shard type back: a change would go to the first
    /// one's entity whichever record the shard came from, and a shard made in Castiel could
    /// be either.
    pub fn check_write_back(&self) -> Result<(), String> {
        let writing: Vec<&EntityMapping> = self
            .entity_mappings
            .iter()
            .filter(|m| self.writes_back(m))
            .collect();
        for (i, m) in writing.iter().enumerate() {
            if let Some(other) = writing[i + 1..]
                .iter()
                .find(|o| o.shard_type_id == m.shard_type_id)
            {
                return Err(format!(
                    "`{}` and `{}` both write `{}` shards back: make one of them one-way \
                     (bidirectional: false)",
                    m.external_entity, other.external_entity, m.shard_type_id
                ));
            }
        }
        Ok(())
    }

    /// Refuses two mappings of one entity: the engine keeps one cursor, checkpoint and set of
    /// synced shards per entity, so only the first would ever run. One entity made into two
    /// shard types is one mapping with `derivedShards`.
    pub fn check_entities_distinct(&self) -> Result<(), String> {
        for (i, m) in self.entity_mappings.iter().enumerate() {
            if let Some(other) = self.entity_mappings[i + 1..]
                .iter()
                .find(|o| o.external_entity.eq_ignore_ascii_case(&m.external_entity))
            {
                return Err(format!(
                    "`{}` is mapped twice (to `{}` and `{}`): map it once, and make the other shards from it with `derivedShards`",
                    m.external_entity, m.shard_type_id, other.shard_type_id
                ));
            }
        }
        Ok(())
    }

    /// The mapping of a two-way shard type, if one writes back.
    pub fn write_back_mapping(&self, shard_type_id: &str) -> Option<&EntityMapping> {
        self.entity_mappings
            .iter()
            .find(|m| m.shard_type_id == shard_type_id && self.writes_back(m))
    }

    pub fn conflict_policy(&self) -> ConflictPolicy {
        ConflictPolicy {
            strategy: self.conflict_resolution,
            field_strategies: self.field_strategies.clone(),
            field_owners: self.field_owners.clone(),
        }
    }
}

/// Where a sync of one entity stopped: after the page that returned `page_token`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub job_id: String,
    pub page_token: String,
    /// The cursor the sync started from, so the resumed query is the same query. (Kept as
    /// `since` before cursors were the adapters' own strings.)
    #[serde(default, alias = "since", skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The cursor the pages synced so far returned: where the next sync starts if the entity
    /// ends now. (Kept as `maxModified` before.)
    #[serde(
        default,
        alias = "maxModified",
        skip_serializing_if = "Option::is_none"
    )]
    pub pending_cursor: Option<String>,
    /// When the entity is being listed whole: which listing, and its pages stored so far (see
    /// [`super::listing`]), which the job that reads the listing's end reads back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing: Option<ListingProgress>,
    /// A time no later than when the query whose pages the checkpoint goes on with was sent:
    /// what the cursor it leaves was read at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_began: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The catch-ups of one entity: the last one sent, and those that began lately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CatchUps {
    /// The last catch-up job sent; until it begins, it reads whatever a later notification
    /// tells of.
    pub job_id: String,
    pub sent_at: DateTime<Utc>,
    /// Catch-ups that began within [`CATCH_UP_STANDS_FOR`]: a redelivery of a notification
    /// one of them was sent for is a change it read, and its job id one the queue would drop
    /// as a duplicate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub begun: Vec<BegunCatchUp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BegunCatchUp {
    pub job_id: String,
    pub at: DateTime<Utc>,
}

impl CatchUps {
    fn has_begun(&self, job_id: &str) -> bool {
        self.begun.iter().any(|b| b.job_id == job_id)
    }
}

/// How long a catch-up sent and not begun stands for later notifications, and a begun one is
/// remembered (the queue's duplicate detection window). A job that waits this long (behind
/// another sync of the integration, or lost with its queue) is not waited for: the next
/// notification sends one more.
pub const CATCH_UP_STANDS_FOR: chrono::Duration = chrono::Duration::minutes(10);

impl Integration {
    /// Whether a catch-up of `entity` is on its way and not begun, at `now`: a notification
    /// that something changed in it needs no job of its own.
    pub fn catching_up(&self, entity: &str, now: DateTime<Utc>) -> bool {
        self.catch_ups
            .get(entity)
            .is_some_and(|c| !c.has_begun(&c.job_id) && now - c.sent_at < CATCH_UP_STANDS_FOR)
    }

    /// Marks the catch-up `job_id` of `entity` sent at `now`; false if it is not to be sent:
    /// another stands for it, or it began already (a redelivery of its notification, which
    /// that job read). The last one, not begun, is sent again (a redelivery after its send
    /// failed and could not be forgotten).
    pub fn send_catch_up(&mut self, entity: &str, job_id: &str, now: DateTime<Utc>) -> bool {
        let standing = self.catching_up(entity, now);
        if let Some(c) = self.catch_ups.get_mut(entity) {
            c.begun.retain(|b| now - b.at < CATCH_UP_STANDS_FOR);
            if c.has_begun(job_id) {
                return false;
            }
            if c.job_id == job_id {
                // Forgotten after a failed send, it stands again once sent.
                if !standing {
                    c.sent_at = now;
                }
                return true;
            }
            if standing {
                return false;
            }
            c.job_id = job_id.to_string();
            c.sent_at = now;
            return true;
        }
        self.catch_ups.insert(
            entity.to_string(),
            CatchUps {
                job_id: job_id.to_string(),
                sent_at: now,
                begun: Vec::new(),
            },
        );
        true
    }

    /// The catch-up `job_id` could not be sent after all: the provider's redelivery of its
    /// notification sends it, and it stands for nothing meanwhile. Whether anything changed.
    pub fn forget_catch_up(&mut self, job_id: &str) -> bool {
        let mut changed = false;
        self.catch_ups.retain(|_, c| {
            if c.job_id != job_id || c.has_begun(job_id) {
                return true;
            }
            changed = true;
            c.sent_at = DateTime::<Utc>::UNIX_EPOCH;
            !c.begun.is_empty()
        });
        changed
    }

    /// The catch-up `job_id` begins at `now` (or is set aside, or found finished): the
    /// entities it stood for take a job of their own again. Whether anything changed.
    pub fn begin_catch_up(&mut self, job_id: &str, now: DateTime<Utc>) -> bool {
        let mut changed = false;
        for c in self.catch_ups.values_mut() {
            if c.job_id == job_id && !c.has_begun(job_id) {
                c.begun.push(BegunCatchUp {
                    job_id: job_id.to_string(),
                    at: now,
                });
                changed = true;
            }
        }
        changed
    }
}

/// A subscription the provider holds for this integration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscription {
    /// The provider's id for it; deliveries name it.
    pub id: String,
    pub resource: String,
    #[serde(with = "super::timestamp::fixed")]
    pub expires_at: DateTime<Utc>,
    /// What the provider also needs to stop it (a Drive channel's `resourceId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// [`WebhookSubscription::address_digest`] of the URL it delivers to, function key and
    /// all: a subscription made before the app's URL or key changed delivers where the host no
    /// longer answers, and is made again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl WebhookSubscription {
    /// The digest a subscription's notification URL is kept as: the URL holds the function
    /// key, which the integration's document must not.
    pub fn address_digest(url: &str) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(url.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// What the keys of subscriptions' `clientState`s among an integration's credentials begin
    /// with.
    pub const CLIENT_STATE_PREFIX: &str = "clientState:";

    /// Where the subscription's `clientState` is kept among the integration's credentials.
    pub fn client_state_key(id: &str) -> String {
        format!("{}{id}", Self::CLIENT_STATE_PREFIX)
    }
}

/// A chain of jobs (a job, its retries and its continuations) holding an integration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningSync {
    /// The chain: the first job's id.
    pub chain: String,
    /// The chain's job now holding it (a continuation or a retry has its own).
    pub job_id: String,
    #[serde(with = "super::timestamp::fixed")]
    pub since: DateTime<Utc>,
    /// The lease lapses then unless the job renews it (each page does): a job that died
    /// without ending its chain stops holding the integration.
    #[serde(with = "super::timestamp::fixed")]
    pub until: DateTime<Utc>,
    /// What `job_id` has done up to its last checkpoint, so a job resumed after a crash reports
    /// the whole of its work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// Entities earlier jobs of the chain finished: a continuation does not sync them again
    /// (a full sync's would otherwise read them from the start, once for every continuation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished_in_chain: Vec<String>,
}

/// A job's counts up to its last checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobProgress {
    /// Entities the job finished, with their counts and errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<EntitySyncStats>,
    /// The entity under way, counted up to its checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<EntitySyncStats>,
    #[serde(default)]
    pub pages: u64,
}

/// An exclusive hold on something of an integration, until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub holder: String,
    #[serde(with = "super::timestamp::fixed")]
    pub until: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationStatus {
    #[default]
    Active,
    Paused,
    Error,
}

impl IntegrationStatus {
    /// What the status says, as in "the integration is …".
    pub fn as_phrase(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Paused => "paused",
            Self::Error => "in error until new credentials are stored",
        }
    }
}

/// How often an integration syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum SyncFrequency {
    #[serde(rename_all = "camelCase")]
    Interval { interval_minutes: u32 },
    #[serde(rename_all = "camelCase")]
    Cron { cron_expression: String },
    #[default]
    Manual,
}

/// The longest interval between syncs: a year of minutes.
pub const MAX_INTERVAL_MINUTES: u32 = 366 * 24 * 60;

impl SyncFrequency {
    /// Checks the frequency can be scheduled from `now`: an interval of a minute to a year, a
    /// valid cron that fires. (A schedule that never fires would leave the integration manual
    /// without a word, and a time past year 9999 is written in a form that sorts before every
    /// other, so the integration would be due at every tick.)
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), String> {
        match self {
            Self::Interval { interval_minutes } if *interval_minutes == 0 => {
                Err("syncFrequency.intervalMinutes must be at least 1".into())
            }
            Self::Interval { interval_minutes } if *interval_minutes > MAX_INTERVAL_MINUTES => {
                Err(format!(
                    "syncFrequency.intervalMinutes must be at most {MAX_INTERVAL_MINUTES} (a year); use {{\"type\": \"manual\"}} for an integration synced only when asked"
                ))
            }
            Self::Cron { cron_expression } => {
                let schedule = cron_expression
                    .parse::<Ncrontab>()
                    .map_err(|e| format!("syncFrequency.cronExpression: {e}"))?;
                match schedule.next_after(now) {
                    Some(_) => Ok(()),
                    None => Err(format!(
                        "syncFrequency.cronExpression `{cron_expression}` never fires"
                    )),
                }
            }
            _ => Ok(()),
        }
    }

    /// The shortest time between two syncs this frequency asks for, if it is a fixed interval.
    pub fn interval(&self) -> Option<Duration> {
        match self {
            Self::Interval { interval_minutes } => {
                Some(Duration::minutes(i64::from(*interval_minutes)))
            }
            _ => None,
        }
    }

    /// The next time a sync is due after one was due (or started) at `from`; `None` for manual.
    pub fn next_after(&self, from: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Interval { interval_minutes } => {
                Some(from + Duration::minutes(i64::from(*interval_minutes)))
            }
            Self::Cron { cron_expression } => {
                cron_expression.parse::<Ncrontab>().ok()?.next_after(from)
            }
            Self::Manual => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn synced_once() -> Integration {
        serde_json::from_value(serde_json::json!({
            "providerName": "salesforce", "syncFrequency": {"type": "manual"},
            "cursors": {"Account": "2026-11-22T10:00:00.000Z"},
            "deletionsChecked": {"Account": "2026-11-22T10:00:00Z"},
            "checkpoints": {"Account": {"jobId": "job-1", "pageToken": "/next",
                                        "updatedAt": "2026-11-22T10:00:00Z"}}
        }))
        .unwrap()
    }

    #[test]
    fn an_entity_mapped_twice_is_refused_in_any_case() {
        let with = |entities: &[(&str, &str)]| -> Integration {
            let mappings: Vec<serde_json::Value> = entities
                .iter()
                .map(|(e, t)| serde_json::json!({"externalEntity": e, "shardTypeId": t}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "providerName": "salesforce", "syncFrequency": {"type": "manual"},
                "entityMappings": mappings
            }))
            .unwrap()
        };
        assert!(
            with(&[("Account", "c_company"), ("Contact", "c_contact")])
                .check_entities_distinct()
                .is_ok()
        );
        let refused = with(&[("Account", "c_company"), ("account", "c_summary")])
            .check_entities_distinct()
            .unwrap_err();
        assert!(refused.contains("derivedShards"), "{refused}");
    }

    #[test]
    fn a_catch_up_stands_for_later_notifications_until_its_job_begins() {
        let at = |minute| Utc.with_ymd_and_hms(2026, 11, 23, 9, minute, 0).unwrap();
        let mut integration = synced_once();
        assert!(integration.send_catch_up("files", "wh-1", at(0)));
        assert!(
            !integration.send_catch_up("files", "wh-2", at(1)),
            "wh-1 reads it"
        );
        assert!(
            integration.send_catch_up("files", "wh-1", at(1)),
            "sent again, after its send failed"
        );
        assert!(
            integration.send_catch_up("folders", "wh-3", at(1)),
            "another entity"
        );

        assert!(!integration.begin_catch_up("wh-2", at(2)), "never sent");
        assert!(integration.begin_catch_up("wh-1", at(2)));
        assert!(
            !integration.send_catch_up("files", "wh-1", at(3)),
            "a redelivery of what wh-1 read"
        );
        assert!(
            integration.send_catch_up("files", "wh-4", at(3)),
            "wh-1 began: too late"
        );
        assert!(integration.begin_catch_up("wh-4", at(4)));
        assert!(
            !integration.send_catch_up("files", "wh-1", at(5)),
            "a redelivery of an older one is read too"
        );

        // A send that failed is forgotten: its redelivery sends it, and it stands for nothing.
        assert!(integration.send_catch_up("files", "wh-5", at(5)));
        assert!(integration.forget_catch_up("wh-5"));
        assert!(!integration.catching_up("files", at(5)));
        assert!(integration.send_catch_up("files", "wh-5", at(6)));
        assert!(
            !integration.send_catch_up("files", "wh-7", at(7)),
            "sent again, it stands again"
        );

        // A job not begun within ten minutes is not waited for.
        assert!(integration.send_catch_up("files", "wh-6", at(17)));
    }

    #[test]
    fn lost_deletions_forget_the_cursor_and_mark_the_entity_once() {
        let mut integration = synced_once();
        integration.lose_deletions("Account");
        integration.lose_deletions("Account");
        assert!(integration.cursors.is_empty());
        assert!(integration.deletions_checked.is_empty());
        assert!(integration.checkpoints.is_empty());
        assert_eq!(integration.lost_deletions, ["Account"]);
    }

    #[test]
    fn a_cursor_keeps_when_the_read_that_left_it_began() {
        let at = |hour| Utc.with_ymd_and_hms(2026, 11, 23, hour, 0, 0).unwrap();
        let newer = |a: String, b: String| a.max(b);
        let mut integration = synced_once();
        let ended = |cursor: &str, hour| EntityEnd {
            cursor: Some(cursor.into()),
            read_began: Some(at(hour)),
            ..EntityEnd::default()
        };
        integration.end_entity("Account", ended("2026-11-23T08:00:00.000Z", 8), newer);
        assert_eq!(integration.cursors_read_at["Account"], at(8));

        // A read that left an older cursor than the one kept leaves the kept one's time.
        integration.end_entity("Account", ended("2026-11-23T07:00:00.000Z", 9), newer);
        assert_eq!(integration.cursors["Account"], "2026-11-23T08:00:00.000Z");
        assert_eq!(integration.cursors_read_at["Account"], at(8));

        // Of a read whose start is not known, the last finished chain's start stands in.
        let unknown = EntityEnd {
            cursor: Some("2026-11-23T09:00:00.000Z".into()),
            ..EntityEnd::default()
        };
        integration.last_sync_at = Some(at(6));
        integration.end_entity("Account", unknown, newer);
        assert_eq!(integration.cursors_read_at["Account"], at(6));

        integration.end_entity("Account", ended("2026-11-23T10:00:00.000Z", 10), newer);
        integration.lose_deletions("Account");
        assert!(integration.cursors_read_at.is_empty());
    }

    #[test]
    fn an_entity_that_ends_keeps_the_newer_cursor_and_is_unmarked_only_by_a_compared_listing() {
        let covered = Utc.with_ymd_and_hms(2026, 11, 23, 9, 0, 0).unwrap();
        let newer = |a: String, b: String| a.max(b);
        let mut integration = synced_once();
        integration.lost_deletions = vec!["Account".into()];
        integration.end_entity(
            "Account",
            EntityEnd {
                deletions_covered: Some(covered),
                cursor: Some("2026-11-21T00:00:00.000Z".into()),
                ..EntityEnd::default()
            },
            newer,
        );
        assert_eq!(integration.cursors["Account"], "2026-11-22T10:00:00.000Z");
        assert_eq!(integration.deletions_checked["Account"], covered);
        assert!(integration.checkpoints.is_empty());
        assert_eq!(integration.lost_deletions, ["Account"], "not compared");

        integration.end_entity(
            "Account",
            EntityEnd {
                listing_compared: true,
                deletions_lost: true,
                ..EntityEnd::default()
            },
            newer,
        );
        assert!(
            integration.lost_deletions.is_empty(),
            "the listing made up for them"
        );

        integration.end_entity(
            "Account",
            EntityEnd {
                deletions_lost: true,
                ..EntityEnd::default()
            },
            newer,
        );
        assert_eq!(integration.lost_deletions, ["Account"]);
    }

    #[test]
    fn two_mappings_may_not_write_one_shard_type_back() {
        let integration = |lead_two_way: bool| -> Integration {
            serde_json::from_value(serde_json::json!({
                "providerName": "salesforce", "syncFrequency": {"type": "manual"},
                "writeBack": {"enabled": true},
                "entityMappings": [
                    {"externalEntity": "Contact", "shardTypeId": "c_contact", "bidirectional": true},
                    {"externalEntity": "Lead", "shardTypeId": "c_contact", "bidirectional": lead_two_way}
                ]
            }))
            .unwrap()
        };
        assert!(integration(false).check_write_back().is_ok());
        let refused = integration(true).check_write_back().unwrap_err();
        assert!(
            refused.contains("`Contact` and `Lead` both write `c_contact` shards back"),
            "{refused}"
        );
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, 0).unwrap()
    }

    #[test]
    fn cursors_and_checkpoints_stored_as_timestamps_are_read_as_cursors() {
        // What an integration looked like when cursors were timestamps the engine compared.
        let stored = serde_json::json!({
            "providerName": "salesforce",
            "cursors": {"Account": "2026-01-01T10:00:00Z"},
            "checkpoints": {"Contact": {
                "jobId": "job_1", "pageToken": "/services/data/v62.0/query/01g-2000",
                "since": "2026-01-01T09:00:00Z", "maxModified": "2026-01-01T09:30:00.250Z",
                "updatedAt": "2026-01-01T10:05:00Z"
            }}
        });
        let integration: Integration = serde_json::from_value(stored).unwrap();
        assert_eq!(integration.cursors["Account"], "2026-01-01T10:00:00Z");
        let checkpoint = &integration.checkpoints["Contact"];
        assert_eq!(checkpoint.cursor.as_deref(), Some("2026-01-01T09:00:00Z"));
        assert_eq!(
            checkpoint.pending_cursor.as_deref(),
            Some("2026-01-01T09:30:00.250Z")
        );
        let written = serde_json::to_value(&integration).unwrap();
        assert_eq!(
            written["checkpoints"]["Contact"]["pendingCursor"],
            "2026-01-01T09:30:00.250Z"
        );
    }

    #[test]
    fn next_sync_follows_the_frequency() {
        let every_15 = SyncFrequency::Interval {
            interval_minutes: 15,
        };
        assert_eq!(every_15.next_after(at(10, 0)), Some(at(10, 15)));
        let hourly = SyncFrequency::Cron {
            cron_expression: "0 0 * * * *".into(),
        };
        assert_eq!(hourly.next_after(at(10, 20)), Some(at(11, 0)));
        assert_eq!(SyncFrequency::Manual.next_after(at(10, 0)), None);
    }

    #[test]
    fn frequencies_are_validated() {
        assert!(
            SyncFrequency::Interval {
                interval_minutes: 0
            }
            .validate(at(10, 0))
            .is_err()
        );
        assert!(
            SyncFrequency::Cron {
                cron_expression: "*/5 * * * *".into()
            }
            .validate(at(10, 0))
            .is_err()
        );
        assert!(
            SyncFrequency::Cron {
                cron_expression: "0 */5 * * * *".into()
            }
            .validate(at(10, 0))
            .is_ok()
        );
        // Frequencies the scheduler cannot follow.
        let frequency =
            |value: serde_json::Value| -> SyncFrequency { serde_json::from_value(value).unwrap() };
        let never =
            frequency(serde_json::json!({"type": "cron", "cronExpression": "0 0 0 30 2 *"}));
        assert!(
            never
                .validate(at(10, 0))
                .unwrap_err()
                .contains("never fires")
        );
        let forever =
            frequency(serde_json::json!({"type": "interval", "intervalMinutes": 4294967295u32}));
        assert!(forever.validate(at(10, 0)).unwrap_err().contains("at most"));
        let yearly = frequency(serde_json::json!({"type": "interval", "intervalMinutes": 525600}));
        assert!(yearly.validate(at(10, 0)).is_ok());
    }

    #[test]
    fn unknown_configuration_is_kept() {
        let json = serde_json::json!({
            "providerName": "salesforce",
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "entityMappings": [{"externalEntity": "Account", "shardTypeId": "c_company"}]
        });
        let integration: Integration = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(integration.status, IntegrationStatus::Active);
        let back = serde_json::to_value(&integration).unwrap();
        assert_eq!(back["entityMappings"][0]["externalEntity"], "Account");
        assert_eq!(back["syncFrequency"], json["syncFrequency"]);
    }
}
