//! The inbound pipeline: pages of provider records in, shards out.
//!
//! For each entity mapping of the integration the pipeline fetches pages (cursor pagination),
//! and for each page transforms the records while it reads their shards' fingerprints in one
//! batch, skips the records their shards already hold, reads the shards the rest map to in one
//! batch, deduplicates them, skips the ones whose content has not changed, and writes the rest
//! in one batch. The batch is begun while the page lands: its records land in parts, and each
//! part's changed shards go to the store while the next part lands (planning and writing each
//! keep a core busy), the write finishing once the last part is handed over. Records the
//! provider reports deleted soft-delete their shards. While one page is processed the next is
//! already being fetched and parsed on another task (after an entity's last page, the next
//! entity's first, unless the entity's end asks the provider for deletions or about a listing's
//! leftovers), and it is mapped
//! while this one is written (its store reads wait until the write is done, so they see it);
//! the page before is freed on a blocking thread: memory holds at most those pages.
//!
//! After each page the integration gets a checkpoint (the next page token, and the cursor the
//! pages so far returned), so a job that dies (kill -9, function timeout, redelivery) resumes
//! where it stopped; an entity that finished moves its cursor to the one its pages returned and
//! drops its checkpoint. Cursors are the adapter's own strings: the pipeline stores and hands
//! them back, and asks the adapter which of two is newer, but never reads one. Adapters keep
//! them inclusive, so a record modified at exactly the cursor is fetched again and, being
//! unchanged, skipped without a write. A cursor the provider no longer honours (an expired
//! delta token) is dropped and the entity read from the beginning.
//!
//! A record that fails alone (its mapping, its write) is listed in the run's errors and the
//! batch goes on; listed again later in the run, it is what that listing says. A failure of
//! the provider or the store as a whole ends the run with that error; the caller decides
//! between retry, dead letter and "resume next run".

use super::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::oneshot;

use adapters::{
    Connection, Deleted, ErrorCode, FetchRequest, Page, Provider, ProviderError, Record,
};

use super::failure::{Failure, FailureCode, mends_later};
use super::lease;
use super::listed::ListedIds;
use super::plan;
pub use super::plan::{content_hash, synced_shard_id};
use super::state::update_integration;
use super::two_way;
use crate::app::App;
use crate::model::conflict::ConflictPolicy;
use crate::model::history::{Direction, EntitySyncStats, SyncDetails};
use crate::model::integration::{Checkpoint, EntityEnd, JobProgress};
use crate::model::listing::{ListedPage, ListingProgress};
use crate::model::mapping::EntityMapping;
use crate::model::messages::{WriteBackMessage, WriteBackOperation};
use crate::model::shard::RelationshipStatus;
use crate::model::{Integration, Shard, SyncError, SyncStats};
use crate::queue::{OutgoingMessage, SYNC_OUTBOUND};
use crate::store::{
    Op, ShardFingerprint, ShardQuery, StoreError, Upsert, Upserts, Versioned, Written,
};

/// Records asked for per page (Salesforce's maximum batch).
pub const PAGE_SIZE: usize = 2000;

/// Records landed at a time: a page's shards are written part by part, each part while the
/// next one lands. Small enough that the store's writer starts early and finishes soon after
/// the last part, large enough that a part costs nothing of note beyond its records (parts of
/// 100, 500 and 1,000 measured the same).
const LANDING_PART: usize = 250;

/// Shards whose links a reconciliation reads at a time.
const RECONCILE_PAGE: usize = 1000;
/// Stored pages of a listing read back at a time (each up to a page of ids).
const LISTED_PAGES_AT_ONCE: usize = 8;

/// Records or deletions looked up at a time among the links of shards not their own.
const LINKED_LOOKUP: usize = 500;

/// Deleted records soft-deleted at a time: a page of shards read and written.
const TOMBSTONES_AT_A_TIME: usize = 2000;

/// Some of a page's records landed, written and counted ([`EntityRun::land_records`]): the
/// landing and the changes are left to be freed with the page.
struct LandedRecords {
    landed: plan::Landed,
    changes: plan::Changes,
    /// The shards written by something else since they were read: their records are not
    /// counted, and land again.
    raced: Vec<String>,
}

/// A write of `shard`, guarded by the etag it was read at if it was read (`etags`).
fn guarded<'s>(shard: &'s Shard, etags: &'s HashMap<String, String>) -> Upsert<'s> {
    Upsert {
        shard,
        if_match: etags.get(&shard.id).map(String::as_str),
    }
}

/// Whether a deleted record whose own shard does not exist is looked for among the links of
/// other shards: those a merge or a write-back put it in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Links {
    Searched,
    NotSearched,
}

/// What the pipeline is asked to do.
pub struct Job<'a> {
    pub tenant_id: &'a str,
    pub integration_id: &'a str,
    pub job_id: &'a str,
    /// Ignore cursors and fetch everything.
    pub full: bool,
    /// Only these entities (all mapped entities when empty).
    pub entities: &'a [String],
    /// Entities earlier jobs of the chain finished: not synced again, nor counted.
    pub finished_in_chain: &'a [String],
    /// Stop after this many records; the rest is left to a continuation job.
    pub max_records: u64,
    /// Delay before the first retry of a failed write (then doubled, ±20%).
    pub retry_base: Duration,
}

/// Why a run stopped before the end.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The job's record limit was reached; a continuation job picks up from the checkpoints.
    RecordLimit,
    /// The provider's allocation is used up; the next scheduled run resumes.
    Quota(Failure),
    /// Another job took the integration over; it carries on ([`FailureCode::Superseded`]).
    Superseded(Failure),
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub stats: SyncStats,
    pub entity_stats: Vec<EntitySyncStats>,
    pub errors: Vec<SyncError>,
    pub details: SyncDetails,
    pub stopped: Option<Stop>,
}

/// What a job had done by its last checkpoint (`progress`): its counts, its entities and their
/// errors, for the record of a job that then failed for good.
pub fn checkpointed(progress: JobProgress) -> Outcome {
    let mut outcome = Outcome::default();
    for entity in progress.finished.into_iter().chain(progress.current) {
        outcome.count_in(entity);
    }
    outcome
}

impl Outcome {
    /// Adds what a run did with one entity: its counts, its stats and their errors.
    fn count_in(&mut self, entity: EntitySyncStats) {
        Counters::of(&entity).add_to(&mut self.stats);
        self.errors.extend(entity.errors.iter().flatten().cloned());
        self.entity_stats.push(entity);
    }
}

/// Runs a scheduled, manual or retried job over every mapped entity. `progress` is what the
/// job did before it was interrupted (entities it finished are not synced again, and its counts
/// carry on), so the outcome describes the whole job.
pub async fn run(
    app: &App,
    provider: Arc<dyn Provider>,
    conn: &mut Connection,
    job: &Job<'_>,
    integration: &Integration,
    progress: Option<JobProgress>,
    now: DateTime<Utc>,
) -> Result<Outcome, Failure> {
    let progress = progress.unwrap_or_default();
    let mut outcome = Outcome::default();
    outcome.details.sync_to_date = Some(now);
    if progress.pages > 0 {
        outcome.details.pages_processed = Some(progress.pages);
    }
    for finished in progress.finished {
        outcome.count_in(finished);
    }
    if !integration.pull_filters.is_empty() {
        outcome.details.filters_applied = Some(integration.pull_filters.clone());
    }
    // An entity runs once, by its first mapping, unless the job finished it before.
    let mut to_run: Vec<&EntityMapping> = Vec::new();
    for mapping in &integration.entity_mappings {
        let name = &mapping.external_entity;
        let done = outcome
            .entity_stats
            .iter()
            .any(|e| &e.external_entity == name)
            || to_run.iter().any(|m| &m.external_entity == name)
            || job.finished_in_chain.contains(name);
        if !done && (job.entities.is_empty() || job.entities.contains(name)) {
            to_run.push(mapping);
        }
    }
    // The first page of the next entity, fetched while the last page of one is processed.
    let mut first_page: Option<Fetching> = None;
    for (i, mapping) in to_run.iter().enumerate() {
        let name = &mapping.external_entity;
        let older_versions = provider.serves_older_versions();
        let mut entity = EntityRun::new(app, job, integration, mapping, older_versions, now);
        entity.first_page = first_page.take();
        entity.next_entity = to_run
            .get(i + 1)
            .map(|next| first_request(job, integration, next));
        if let Some(current) = progress
            .current
            .as_ref()
            .filter(|c| &c.external_entity == name)
        {
            entity.counters = Counters::of(current);
            entity.errors = current.errors.clone().unwrap_or_default();
        }
        entity.finished = outcome.entity_stats.clone();
        let result = entity.run(&provider, conn, integration, &mut outcome).await;
        first_page = entity.next_first_page.take();
        // A first page fetched for an entity that will not run: its connection comes back.
        for unused in [
            entity.first_page.take(),
            first_page.take_if(|_| result.is_err() || outcome.stopped.is_some()),
        ]
        .into_iter()
        .flatten()
        {
            if let Ok((owned, _)) = unused.await {
                *conn = owned;
            }
        }
        entity.counters.add_to(&mut outcome.stats);
        outcome.entity_stats.push(entity.stats());
        outcome.errors.append(&mut entity.errors);
        match result {
            // What the job did before another took over, or before the provider's allocation
            // ran out as the entity ended (its deletions, a listing's leftovers), is still its
            // record's to tell.
            Err(failure) if failure.code == FailureCode::Superseded => {
                outcome.stopped = Some(Stop::Superseded(failure));
            }
            Err(failure) if failure.resume_next_run => {
                outcome.stopped = Some(Stop::Quota(failure));
            }
            other => other?,
        }
        if outcome.stopped.is_some() {
            break;
        }
    }
    Ok(outcome)
}

/// Runs a webhook job: the records of one entity that a notification said changed, read from
/// the provider as they are now (a notification may carry any subset of a record's fields, or
/// none). Ids the provider does not know create nothing.
#[allow(clippy::too_many_arguments)]
pub async fn run_notified(
    app: &App,
    provider: &dyn Provider,
    conn: &mut Connection,
    job: &Job<'_>,
    integration: &Integration,
    entity_name: &str,
    ids: &[String],
    now: DateTime<Utc>,
) -> Result<Outcome, Failure> {
    let mapping = mapping_of(integration, entity_name)?;
    let mut filters = integration.pull_filters.clone();
    filters.extend(mapping.filters.iter().cloned());
    let request = FetchRequest {
        entity: entity_name.to_string(),
        fields: mapping.source_fields(),
        cursor: None,
        page_token: None,
        filters,
        page_size: PAGE_SIZE,
        cursor_read_at: None,
    };
    let records = provider.fetch_by_ids(conn, &request, ids).await?;
    let older_versions = provider.serves_older_versions();
    let mut entity = EntityRun::new(app, job, integration, mapping, older_versions, now);
    let result = entity.process_page(records).await;
    let mut outcome = entity.outcome(result)?;
    outcome.details.pages_processed = Some(1);
    Ok(outcome)
}

/// Runs a webhook job about records the provider says were deleted: their shards are
/// soft-deleted, as a sync that read the deletions would.
pub async fn run_deleted(
    app: &App,
    job: &Job<'_>,
    integration: &Integration,
    entity_name: &str,
    ids: &[String],
    now: DateTime<Utc>,
) -> Result<Outcome, Failure> {
    let mapping = mapping_of(integration, entity_name)?;
    // A delete notification says nothing of when: no version of the record is older.
    let mut entity = EntityRun::new(app, job, integration, mapping, false, now);
    let tombstones: Vec<Record> = ids.iter().cloned().map(Record::gone).collect();
    let result = entity.soft_delete(&tombstones, Links::Searched).await;
    entity.outcome(result)
}

/// The mapping of `entity_name`, which a webhook job names.
fn mapping_of<'a>(
    integration: &'a Integration,
    entity_name: &str,
) -> Result<&'a EntityMapping, Failure> {
    integration
        .entity_mappings
        .iter()
        .find(|m| m.external_entity == entity_name)
        .ok_or_else(|| {
            Failure::new(
                ErrorCode::ValidationError,
                format!("the integration maps no entity `{entity_name}`"),
            )
        })
        .and_then(|mapping| usable(mapping).map(|()| mapping))
}

/// Whether `mapping` can be run. A mapping is checked when its integration is registered,
/// but Castiel may write an integration's document itself: a transform the checks refuse
/// (a split with no targets) is never run on records.
fn usable(mapping: &EntityMapping) -> Result<(), Failure> {
    let reason = match mapping.validate() {
        Err(reason) => reason,
        Ok(())
            if mapping
                .deduplication
                .as_ref()
                .is_some_and(|d| d.rules.is_empty()) =>
        {
            "deduplication without rules".into()
        }
        Ok(()) => return Ok(()),
    };
    Err(Failure::new(ErrorCode::ValidationError, reason))
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    fetched: u64,
    created: u64,
    updated: u64,
    skipped: u64,
    failed: u64,
}

impl Counters {
    /// The counts an entity's stats recorded.
    fn of(stats: &EntitySyncStats) -> Self {
        Self {
            fetched: stats.fetched.unwrap_or(0),
            created: stats.created.unwrap_or(0),
            updated: stats.updated.unwrap_or(0),
            skipped: stats.skipped.unwrap_or(0),
            failed: stats.failed.unwrap_or(0),
        }
    }

    fn add_to(self, stats: &mut SyncStats) {
        stats.records_fetched += self.fetched;
        stats.shards_created += self.created;
        stats.shards_updated += self.updated;
        stats.shards_skipped += self.skipped;
        stats.shards_failed += self.failed;
    }
}

/// Errors listed of an entity's run, in its history record and its checkpoints; more are
/// counted (`shardsFailed`), not listed, so that neither document outgrows what the store
/// takes (Cosmos DB: 2 MB), whatever a mapping refuses.
const MAX_ERRORS_LISTED: usize = 200;
/// Errors told of an entity as a whole (not of one record) listed of a run.
const MAX_ERRORS_OF_ENTITY: usize = 50;
/// How the error that says more records failed than are listed begins.
const UNLISTED: &str = "more records failed";

struct EntityRun<'a> {
    app: &'a App,
    job: &'a Job<'a>,
    mapping: &'a EntityMapping,
    /// For a mapping that writes back: how conflicts with Castiel's changes are settled.
    two_way: Option<ConflictPolicy>,
    provider_name: String,
    /// The provider may serve a record's older versions after newer ones: they are skipped
    /// (`Pull::serves_older_versions`).
    skips_older_versions: bool,
    now: DateTime<Utc>,
    counters: Counters,
    errors: Vec<SyncError>,
    /// The cursor the pages synced so far returned.
    pending_cursor: Option<String>,
    /// When the query whose pages this run reads was sent, at the latest: this job's start,
    /// or, for pages resumed from a checkpoint, the start of the job that sent it.
    read_began: Option<DateTime<Utc>>,
    /// The complete listing this run reads part or all of (see `Pull::lists_everything`):
    /// what it leaves out is reconciled as deleted.
    listing: Option<Listing>,
    /// The entity's deletions were lost: a read from the start is a listing.
    relist: bool,
    /// The entity has a cursor, and a read of it from the start lists every record
    /// (`Pull::lists_everything_from_start`): such a read (a full sync, a cursor given up) is a
    /// listing. An entity's first sync, which has nothing to compare, is none.
    complete_from_start: bool,
    /// A listing this run began could not be compared (a record the provider could not name,
    /// a page of it gone): if its cursor replaces the stored one, the entity is marked lost, so
    /// that the next run lists it again.
    listing_dropped: bool,
    /// Records with no shard of their own are looked for among other shards' links (see
    /// [`plan::link_lookups`]): the mapping may land a record elsewhere, and the integration
    /// has synced before, so a shard may link one. An integration's first sync, whose records
    /// are all new, costs no search.
    searches_links: bool,
    /// Entities the job finished before this one, for its progress.
    finished: Vec<EntitySyncStats>,
    /// This entity's first page, when it was fetched while the entity before was processed.
    first_page: Option<Fetching>,
    /// The first request of the entity the job runs next, if any.
    next_entity: Option<FetchRequest>,
    /// That request sent while this entity's last page was processed.
    next_first_page: Option<Fetching>,
}

/// A listing of an entity read whole, from the start, by this job and the jobs before it
/// (see [`crate::model::listing`]).
struct Listing {
    /// Which listing: its stored pages carry it.
    id: String,
    /// The external ids this job listed, and at the listing's end those the jobs before it
    /// listed.
    ids: ListedIds,
    /// The pages the jobs before this one stored, read back at the listing's end.
    stored_before: u64,
    /// The pages stored so far, by this job and those before it: the next one stored is
    /// page `stored`.
    stored: u64,
}

impl Listing {
    fn new() -> Self {
        Self::resumed(&ListingProgress {
            id: uuid::Uuid::new_v4().simple().to_string(),
            pages: 0,
        })
    }

    fn resumed(progress: &ListingProgress) -> Self {
        Self {
            id: progress.id.clone(),
            ids: ListedIds::new(),
            stored_before: progress.pages,
            stored: progress.pages,
        }
    }
}

/// A page's records mapped, with the fingerprints of the shards they map to (where the
/// mapping skips unchanged records by them): what is deduplicated and written.
struct Mapped {
    transformed: plan::Transformed,
    fingerprints: Option<HashMap<String, Option<ShardFingerprint>>>,
}

/// The next page of a listing, fetched and mapped while the one before it was written.
struct Ahead {
    /// The page, its records taken out and mapped.
    page: Page,
    transformed: plan::Transformed,
    /// How many records it had.
    fetched: usize,
    /// Its records that are not deletions, when the listing is read whole.
    listed: Vec<String>,
}

/// A fetch of the next page, on its task: the connection comes back with the page.
type Fetching = tokio::task::JoinHandle<(Connection, Result<Page, ProviderError>)>;

/// A fetch whose task ended without its page (it panicked or the runtime is stopping).
fn fetch_stopped(e: tokio::task::JoinError) -> Failure {
    Failure::new(
        ErrorCode::ServiceUnavailable,
        format!("fetching a page stopped: {e}"),
    )
}

/// Sends `request` on a task of its own, which takes the connection along (credentials
/// refreshed on the way included) and gives it back with the page.
fn spawn_fetch(
    provider: &Arc<dyn Provider>,
    conn: &mut Connection,
    request: FetchRequest,
) -> Fetching {
    let provider = provider.clone();
    let mut owned = std::mem::replace(conn, detached(&conn.integration_id));
    tokio::spawn(async move {
        let page = provider.fetch_page(&mut owned, &request).await;
        (owned, page)
    })
}

/// The first request of a job for an entity: where its checkpoint says it stopped, or from its
/// cursor (none for a full sync), with the integration's and the mapping's filters.
fn first_request(
    job: &Job<'_>,
    integration: &Integration,
    mapping: &EntityMapping,
) -> FetchRequest {
    let entity = &mapping.external_entity;
    let checkpoint = integration.checkpoints.get(entity);
    let cursor = match checkpoint {
        Some(c) => c.cursor.clone(),
        None if job.full => None,
        // Deletions lost since the last check: the entity is listed whole, and what the listing
        // leaves out is reconciled.
        None if integration.lost_deletions.contains(entity) => None,
        None => integration.cursors.get(entity).cloned(),
    };
    let mut filters = integration.pull_filters.clone();
    filters.extend(mapping.filters.iter().cloned());
    FetchRequest {
        entity: entity.clone(),
        fields: mapping.source_fields(),
        cursor,
        page_token: checkpoint.map(|c| c.page_token.clone()),
        filters,
        page_size: PAGE_SIZE,
        // When the read that left the cursor began; where that is not kept, the last sync
        // that ran to its end began then, at the latest before it read.
        cursor_read_at: integration
            .cursors_read_at
            .get(entity)
            .copied()
            .or(integration.last_sync_at),
    }
}

/// How the next page of an entity is mapped.
#[derive(Clone, Copy)]
struct Mapper<'a> {
    integration_id: &'a str,
    mapping: &'a EntityMapping,
    by_fingerprint: bool,
    /// Whether the listing is read whole (its ids are kept).
    listing: bool,
}

/// The next page, once `fetching` has it: the shards it asks about go to `ids`, and it is
/// mapped once `written` says the page before has begun its write (mapping before would hold
/// back the encoding that feeds the writer, which runs on this task too). `None` when there is
/// no next page to fetch.
async fn map_ahead(
    fetching: Option<Fetching>,
    mapper: Mapper<'_>,
    ids: oneshot::Sender<Vec<String>>,
    written: oneshot::Receiver<()>,
) -> Option<Result<(Connection, Result<Ahead, ProviderError>), tokio::task::JoinError>> {
    let (owned, page) = match fetching?.await {
        Ok(fetched) => fetched,
        Err(e) => return Some(Err(e)),
    };
    let mut page = match page {
        Ok(page) => page,
        Err(e) => return Some(Ok((owned, Err(e)))),
    };
    let records = std::mem::take(&mut page.records);
    let _ = ids.send(fingerprinted(
        mapper.integration_id,
        mapper.mapping,
        mapper.by_fingerprint,
        &records,
    ));
    let _ = written.await;
    // The fingerprint read starts before this task is taken up with mapping.
    tokio::task::yield_now().await;
    let ahead = Ahead {
        fetched: records.len(),
        listed: if mapper.listing {
            listed_ids(&records)
        } else {
            Vec::new()
        },
        transformed: plan::transform_page(mapper.integration_id, mapper.mapping, records),
        page,
    };
    Some(Ok((owned, Ok(ahead))))
}

/// The shards whose fingerprints a page asks for: those its records map to, each once (a
/// record listed twice, a file appended to, is asked about once); none when the mapping
/// does not skip by fingerprint, or for deletions.
fn fingerprinted(
    integration_id: &str,
    mapping: &EntityMapping,
    by_fingerprint: bool,
    records: &[Record],
) -> Vec<String> {
    if !by_fingerprint {
        return Vec::new();
    }
    let mut asked = HashSet::default();
    records
        .iter()
        .filter(|r| !r.deleted)
        .map(|r| synced_shard_id(integration_id, &mapping.external_entity, &r.id))
        .filter(|id| asked.insert(id.clone()))
        .collect()
}

/// The external ids of a page's records that are not deletions.
fn listed_ids(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter(|r| !r.deleted)
        .map(|r| r.id.clone())
        .collect()
}

/// The MessageId of the write-back a sync sends when it finds Castiel ahead of a record: one
/// per state of the shard and integration, so that a sync finding the same again sends none,
/// while a shard two-way with two integrations is written to both (the queue's duplicate
/// detection spans its sessions).
fn write_back_id(shard_id: &str, content_hash: &str, integration_id: &str) -> String {
    format!("{shard_id}:{content_hash}:{integration_id}")
}

/// A stand-in for a connection that is away with a fetch on another task.
fn detached(integration_id: &str) -> Connection {
    Connection::new(
        integration_id,
        serde_json::Map::new(),
        adapters::Credentials::new(serde_json::Map::new()),
    )
}

/// Why a job stops when it finds, at a checkpoint, that another job holds its integration:
/// what it would checkpoint now would overwrite that job's.
fn superseded() -> Failure {
    Failure::new(
        FailureCode::Superseded,
        "another job took over the integration while this one ran (its hold had lapsed); \
         that job carries on from the last checkpoint",
    )
}

/// How long a page written shard by shard waits out the store's throttling in all.
const THROTTLED_PAGE_WAIT: Duration = Duration::from_secs(30);

fn store_error(e: StoreError) -> Failure {
    Failure::from(e)
}

/// A deterministic ±20% jitter from a fresh random id.
fn jitter(delay: Duration) -> Duration {
    let byte = uuid::Uuid::new_v4().as_bytes()[0];
    let factor = 0.8 + 0.4 * (f64::from(byte) / 255.0);
    delay.mul_f64(factor)
}

impl<'a> EntityRun<'a> {
    fn new(
        app: &'a App,
        job: &'a Job<'a>,
        integration: &Integration,
        mapping: &'a EntityMapping,
        skips_older_versions: bool,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            app,
            job,
            mapping,
            two_way: integration
                .writes_back(mapping)
                .then(|| integration.conflict_policy()),
            provider_name: integration.provider_name.clone(),
            skips_older_versions,
            now,
            counters: Counters::default(),
            errors: Vec::new(),
            pending_cursor: None,
            read_began: None,
            listing: None,
            relist: integration
                .lost_deletions
                .contains(&mapping.external_entity),
            complete_from_start: false,
            listing_dropped: false,
            searches_links: mapping.lands_elsewhere()
                && (integration.last_sync_at.is_some()
                    || integration.cursors.contains_key(&mapping.external_entity)
                    || integration
                        .lost_deletions
                        .contains(&mapping.external_entity)),
            finished: Vec::new(),
            first_page: None,
            next_entity: None,
            next_first_page: None,
        }
    }

    /// A listing that `request` begins, if it reads from the start (no cursor, no page token)
    /// what the provider says is complete: an entity it lists whole every sync
    /// (`Pull::lists_everything`), one whose deletions were lost (`relist`), or one it lists
    /// whole from the start and that has a cursor (`complete_from_start`: a full sync, or a
    /// cursor the provider no longer honours, gives up the deletions only that cursor would
    /// have told).
    fn listing_from_start(
        &self,
        provider: &dyn Provider,
        request: &FetchRequest,
    ) -> Option<Listing> {
        let complete =
            self.relist || self.complete_from_start || provider.lists_everything(&request.entity);
        (request.cursor.is_none() && request.page_token.is_none() && complete).then(Listing::new)
    }

    fn totals(&self) -> SyncStats {
        SyncStats {
            records_fetched: self.counters.fetched,
            shards_created: self.counters.created,
            shards_updated: self.counters.updated,
            shards_skipped: self.counters.skipped,
            shards_failed: self.counters.failed,
            ..SyncStats::default()
        }
    }

    /// The outcome of a run of this one entity that ended with `result`.
    fn outcome(&mut self, result: Result<(), Failure>) -> Result<Outcome, Failure> {
        let mut outcome = Outcome {
            stats: self.totals(),
            ..Outcome::default()
        };
        outcome.entity_stats.push(self.stats());
        outcome.errors.append(&mut self.errors);
        result.map(|_| outcome)
    }

    fn stats(&self) -> EntitySyncStats {
        let c = self.counters;
        EntitySyncStats {
            external_entity: self.mapping.external_entity.clone(),
            shard_type_id: self.mapping.shard_type_id.clone(),
            direction: Direction::Inbound,
            fetched: Some(c.fetched),
            created: Some(c.created),
            updated: Some(c.updated),
            skipped: Some(c.skipped),
            failed: Some(c.failed),
            errors: (!self.errors.is_empty()).then(|| self.errors.clone()),
        }
    }

    /// Applies `change` to this run's integration under its etag.
    async fn update_state(
        &self,
        change: impl FnMut(&mut Integration) -> bool,
    ) -> Result<(), Failure> {
        update_integration(
            self.app,
            self.job.tenant_id,
            self.job.integration_id,
            self.now,
            change,
        )
        .await
        .map(drop)
        .map_err(store_error)
    }

    fn record_error(
        &mut self,
        code: impl Into<FailureCode>,
        message: String,
        record_id: Option<&str>,
        field: Option<&str>,
    ) {
        self.counters.failed += 1;
        self.tell(code, message, record_id, field);
    }

    /// Lists an error in the history without counting a record failed.
    fn tell(
        &mut self,
        code: impl Into<FailureCode>,
        message: String,
        record_id: Option<&str>,
        field: Option<&str>,
    ) {
        self.list(code.into(), message, record_id, None, field);
    }

    /// Counts a record failed because its shard `shard_id` could not be written, and lists why.
    fn shard_error(&mut self, code: impl Into<FailureCode>, message: String, shard_id: &str) {
        self.counters.failed += 1;
        self.list(code.into(), message, None, Some(shard_id), None);
    }

    /// Lists an error of a record or a shard (up to [`MAX_ERRORS_LISTED`], then once that more
    /// were counted), or of the entity as a whole (each once, up to [`MAX_ERRORS_OF_ENTITY`]).
    fn list(
        &mut self,
        code: FailureCode,
        message: String,
        record_id: Option<&str>,
        shard_id: Option<&str>,
        field: Option<&str>,
    ) {
        let of_a_record = |e: &SyncError| e.record_id.is_some() || e.shard_id.is_some();
        if record_id.is_none() && shard_id.is_none() {
            let told = self.errors.iter().filter(|e| !of_a_record(e));
            if told.clone().any(|e| e.message == message) || told.count() >= MAX_ERRORS_OF_ENTITY {
                return;
            }
        } else if self.errors.iter().filter(|e| of_a_record(e)).count() >= MAX_ERRORS_LISTED {
            if !self.errors.iter().any(|e| e.message.starts_with(UNLISTED)) {
                self.errors.push(SyncError {
                    code: code.as_str().into(),
                    message: format!(
                        "{UNLISTED} than the {MAX_ERRORS_LISTED} listed; the counts include them all"
                    ),
                    entity: Some(self.mapping.external_entity.clone()),
                    record_id: None,
                    shard_id: None,
                    field: None,
                    timestamp: self.now,
                    retryable: false,
                });
            }
            return;
        }
        self.errors.push(SyncError {
            code: code.as_str().into(),
            message,
            entity: Some(self.mapping.external_entity.clone()),
            record_id: record_id.map(str::to_string),
            shard_id: shard_id.map(str::to_string),
            field: field.map(str::to_string),
            timestamp: self.now,
            retryable: code.is_retryable(),
        });
    }

    async fn run(
        &mut self,
        provider: &Arc<dyn Provider>,
        conn: &mut Connection,
        integration: &Integration,
        outcome: &mut Outcome,
    ) -> Result<(), Failure> {
        usable(self.mapping)?;
        let entity = self.mapping.external_entity.clone();
        let checkpoint = integration.checkpoints.get(&entity);
        let mut request = first_request(self.job, integration, self.mapping);
        let mut cursor = request.cursor.clone();
        self.pending_cursor = checkpoint.and_then(|c| c.pending_cursor.clone());
        // A checkpoint from before its query's time was kept tells none.
        self.read_began = match checkpoint {
            Some(c) => c.read_began,
            None => Some(self.now),
        };
        self.complete_from_start = integration.cursors.contains_key(&entity)
            && provider.lists_everything_from_start(&integration.connection, &request);
        // Only a listing read whole from the start, by this job or by it and the jobs before it,
        // can tell what is gone.
        self.listing = match checkpoint {
            Some(checkpoint) => checkpoint.listing.as_ref().map(Listing::resumed),
            None => self.listing_from_start(provider.as_ref(), &request),
        };
        if outcome.details.sync_from_date.is_none()
            && let Some(cursor) = &cursor
        {
            outcome.details.sync_from_date =
                provider.cursor_time(cursor).or(integration.last_sync_at);
        }

        let mut page = match self
            .fetch(provider.as_ref(), conn, &mut request, outcome)
            .await?
        {
            Some(page) => page,
            None => return Ok(()),
        };
        // The first page may have restarted the entity without its cursor.
        cursor.clone_from(&request.cursor);
        let deletions_since = integration
            .deletions_checked
            .get(&entity)
            .copied()
            .or_else(|| cursor.as_deref().and_then(|c| provider.cursor_time(c)));
        let by_fingerprint = plan::skips_by_fingerprint(self.mapping, self.two_way.is_some());
        let mapper = Mapper {
            integration_id: self.job.integration_id,
            mapping: self.mapping,
            by_fingerprint,
            listing: self.listing.is_some(),
        };
        let mut fetched = page.records.len();
        // The page's listed ids, added to the listing's once the page is processed.
        let mut listed = match self.listing {
            Some(_) => listed_ids(&page.records),
            None => Vec::new(),
        };
        // The page's records mapped, with their shards' fingerprints: the first page's are
        // mapped as it is processed, every later one's while the page before it is written.
        let mut mapped: Option<Mapped> = None;
        loop {
            if let Some(newer) = page.cursor.take() {
                self.pending_cursor = Some(match self.pending_cursor.take() {
                    Some(earlier) => provider.newer_cursor(earlier, newer),
                    None => newer,
                });
            }
            let next_token = page.next_page.clone();
            let stop_after = page.stop_after.clone();
            // Rows the provider gave that could not be read fail alone; the page goes on. In a
            // listing, one named is still held; one the provider could not even name (a search
            // it says came back incomplete) leaves the listing unable to tell what is gone.
            for unread in std::mem::take(&mut page.unreadable) {
                if self.listing.is_some() {
                    match &unread.record_id {
                        Some(id) => listed.push(id.clone()),
                        None => {
                            tracing::warn!(entity = %self.mapping.external_entity, "the listing is incomplete; nothing it leaves out is reconciled");
                            self.listing = None;
                            self.listing_dropped = true;
                        }
                    }
                }
                self.counters.fetched += 1;
                self.record_error(
                    ErrorCode::ValidationError,
                    unread.message,
                    unread.record_id.as_deref(),
                    None,
                );
            }
            let fetched_so_far =
                outcome.stats.records_fetched + self.counters.fetched + fetched as u64;
            self.counters.fetched += fetched as u64;
            let limit_reached = fetched_so_far >= self.job.max_records && next_token.is_some();
            let prefetch = next_token.is_some() && stop_after.is_none() && !limit_reached;
            if prefetch {
                request.page_token = next_token.clone();
                request.page_size = PAGE_SIZE
                    .min((self.job.max_records.saturating_sub(fetched_so_far)).max(1) as usize);
            }
            // Fetching (and parsing) the next page runs on another thread while this one is
            // processed and checkpointed. The connection goes with the fetch and comes back
            // with its page, credentials refreshed on the way included.
            let fetching = prefetch.then(|| spawn_fetch(provider, conn, request.clone()));
            // The last page of an entity whose end needs no provider (no deletions to ask
            // for): the next entity's first page is fetched meanwhile.
            let last = next_token.is_none() && stop_after.is_none();
            if last
                && self.listing.is_none()
                && !provider.reports_deletions_apart(&self.mapping.external_entity)
                && let Some(next) = self.next_entity.take()
            {
                self.next_first_page = Some(spawn_fetch(provider, conn, next));
            }
            if fetching.is_some() || self.next_first_page.is_some() {
                // A task spawned by a running one waits in its worker's next-to-run slot,
                // which no other worker takes: without stepping aside, the fetch would not
                // begin until this page's first wait for I/O.
                tokio::task::yield_now().await;
            }
            let records = std::mem::take(&mut page.records);
            let current = mapped.take();
            // This page is written while the next is mapped: the next one's store reads wait
            // for this one's write (`writing` tells when it has started, `ids` which shards
            // the next page asks about), so they see what it wrote.
            let (writing, written) = oneshot::channel();
            let (ids, asked) = oneshot::channel();
            let pages = outcome.details.pages_processed.unwrap_or(0) + 1;
            let (processed, next) = tokio::join!(
                async {
                    let current = match current {
                        Some(mapped) => mapped,
                        None => self.map(records).await?,
                    };
                    self.write_page(current, writing).await?;
                    let (checkpointed, fingerprints) = tokio::join!(
                        self.checkpoint(next_token.as_deref(), cursor.as_deref(), pages, &listed),
                        async {
                            match asked.await {
                                Ok(own) => self.fingerprints(own).await,
                                Err(_) => Ok(HashMap::default()),
                            }
                        }
                    );
                    Ok::<_, Failure>((checkpointed?, fingerprints?))
                },
                map_ahead(fetching, mapper, ids, written)
            );
            let next = match next {
                Some(Ok((owned, ahead))) => {
                    *conn = owned;
                    Some(ahead)
                }
                Some(Err(e)) => return Err(fetch_stopped(e)),
                None => None,
            };
            let (stored_page, fingerprints) = processed?;
            outcome.details.pages_processed = Some(pages);
            if let Some(listing) = self.listing.as_mut() {
                listing.ids.extend(std::mem::take(&mut listed));
                listing.stored += u64::from(stored_page);
            }
            if let Some(stop) = stop_after {
                outcome.stopped = Some(Stop::Quota(stop.into()));
                break;
            }
            if limit_reached {
                outcome.stopped = Some(Stop::RecordLimit);
                break;
            }
            match next {
                None => {
                    let read_from_start = cursor.is_none();
                    self.finish_entity(provider, conn, deletions_since, read_from_start, pages)
                        .await?;
                    break;
                }
                Some(Ok(ahead)) => {
                    page = ahead.page;
                    fetched = ahead.fetched;
                    listed = ahead.listed;
                    mapped = Some(Mapped {
                        transformed: ahead.transformed,
                        fingerprints: by_fingerprint.then_some(fingerprints),
                    });
                }
                Some(Err(e)) if e.resume_next_run => {
                    outcome.stopped = Some(Stop::Quota(e.into()));
                    break;
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The first page of the entity. A stale checkpoint token (expired query locator, removed
    /// file) restarts the entity's query instead of failing the job; a cursor or page the
    /// provider no longer honours restarts it from the beginning.
    async fn fetch(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        request: &mut FetchRequest,
        outcome: &mut Outcome,
    ) -> Result<Option<Page>, Failure> {
        let mut page = match self.first_page.take() {
            Some(fetching) => match fetching.await {
                Ok((owned, page)) => {
                    *conn = owned;
                    page
                }
                Err(e) => return Err(fetch_stopped(e)),
            },
            None => provider.fetch_page(conn, request).await,
        };
        if let Err(e) = &page
            && request.page_token.is_some()
            && !e.resync
            && matches!(e.code, ErrorCode::NotFound | ErrorCode::ValidationError)
        {
            tracing::warn!(entity = %request.entity, error = %e, "checkpoint no longer valid; restarting the entity");
            request.page_token = None;
            self.read_began = Some(self.now);
            // And a listing with it, which does not count the pages of the one before.
            self.listing = self.listing_from_start(provider, request);
            page = provider.fetch_page(conn, request).await;
        }
        // A first read that spans jobs has a page token and no cursor: a token the provider
        // no longer honours restarts it too, or every later run would fail on it.
        if let Err(e) = &page
            && e.resync
            && (request.cursor.is_some() || request.page_token.is_some())
        {
            tracing::warn!(entity = %request.entity, error = %e, "the provider no longer honours the cursor or page; reading the entity from the beginning");
            request.page_token = None;
            request.cursor = None;
            self.pending_cursor = None;
            self.read_began = Some(self.now);
            self.listing = self.listing_from_start(provider, request);
            // Forgotten at once: whatever this read ends with, a later run must not start from
            // it again (an entity whose pages return no cursor would otherwise keep it). What
            // the cursor alone would have told of deletions is then lost until a listing from
            // the start is compared: should this job die first, the next one lists again.
            let entity = &request.entity;
            let job_id = self.job.job_id;
            let lost = self.complete_from_start;
            let mut holds = true;
            self.update_state(|i| {
                holds = lease::holds(i.running.as_ref(), job_id);
                if !holds {
                    return false;
                }
                let forgot = i.forget_cursor(entity);
                let marked = lost && !i.lost_deletions.contains(entity);
                if marked {
                    i.mark_deletions_lost(entity);
                }
                forgot || marked
            })
            .await?;
            if !holds {
                return Err(superseded());
            }
            page = provider.fetch_page(conn, request).await;
        }
        match page {
            Ok(page) => {
                if outcome.details.query.is_none() {
                    outcome.details.query = page.query.clone();
                }
                Ok(Some(page))
            }
            Err(e) if e.resume_next_run => {
                outcome.stopped = Some(Stop::Quota(e.into()));
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What the job has done with this entity counted: its progress for a checkpoint.
    fn progress(&self, pages: u64, entity_done: bool) -> JobProgress {
        let current = self.stats();
        let mut finished = self.finished.clone();
        let current = if entity_done {
            finished.push(current);
            None
        } else {
            Some(current)
        };
        JobProgress {
            finished,
            current,
            pages,
        }
    }

    /// Records where the entity stands after a page, with the job's counts so far, and renews
    /// the job's hold on the integration. A page of a complete listing (`listed`, its ids) is
    /// stored first, so that the checkpoint never counts a page that is not there. Returns
    /// whether it stored one (the last page of an entity is not checkpointed).
    async fn checkpoint(
        &self,
        next_token: Option<&str>,
        cursor: Option<&str>,
        pages: u64,
        listed: &[String],
    ) -> Result<bool, Failure> {
        let Some(token) = next_token else {
            return Ok(false);
        };
        let listing = match &self.listing {
            Some(listing) => {
                self.store_listed_page(listing, listed).await?;
                Some(ListingProgress {
                    id: listing.id.clone(),
                    pages: listing.stored + 1,
                })
            }
            None => None,
        };
        let stored_page = listing.is_some();
        let progress = self.progress(pages, false);
        let job_id = self.job.job_id;
        let checkpoint = Checkpoint {
            job_id: self.job.job_id.to_string(),
            page_token: token.to_string(),
            cursor: cursor.map(str::to_string),
            pending_cursor: self.pending_cursor.clone(),
            listing,
            read_began: self.read_began,
            updated_at: self.now,
        };
        let entity = &self.mapping.external_entity;
        let mut holds = true;
        self.update_state(|i| {
            holds = lease::checkpoint(&mut i.running, job_id, progress.clone(), Utc::now());
            if holds {
                i.checkpoints.insert(entity.clone(), checkpoint.clone());
            }
            holds
        })
        .await?;
        if !holds {
            return Err(superseded());
        }
        Ok(stored_page)
    }

    /// Deletions since `deletions_since` (or as far back as the provider remembers), then the
    /// entity's new cursor.
    async fn finish_entity(
        &mut self,
        provider: &Arc<dyn Provider>,
        conn: &mut Connection,
        deletions_since: Option<DateTime<Utc>>,
        read_from_start: bool,
        pages: u64,
    ) -> Result<(), Failure> {
        let entity = &self.mapping.external_entity;
        let mut deleted = if provider.reports_deletions_apart(entity) {
            provider
                .fetch_deleted(conn, entity, deletions_since)
                .await?
        } else {
            Deleted::default()
        };
        let mut deletions_since = deletions_since;
        // Deletions lost that this run, which lists nothing, cannot make up for: the next run
        // lists the entity whole.
        let mut lost = false;
        if deleted.full_resync_required && read_from_start {
            // This job has just read every record: the deletions it could not read since the
            // last check are read for as far back as the provider remembers instead.
            deletions_since = None;
            deleted = provider.fetch_deleted(conn, entity, None).await?;
            lost = self.listing.is_none();
        }
        // The provider is done with, unless a listing's leftovers are to be checked with it:
        // the next entity's first page is fetched while this one applies what it read.
        if self.next_first_page.is_none()
            && self.listing.is_none()
            && let Some(next) = self.next_entity.take()
        {
            self.next_first_page = Some(spawn_fetch(provider, conn, next));
        }
        if deleted.full_resync_required {
            // Deletions older than the provider remembers: the entity is marked lost, so the
            // next run lists it whole and compares.
            tracing::warn!(%entity, "deletions no longer available since the last check; the next run lists the entity whole");
            let job_id = self.job.job_id;
            let mut holds = true;
            self.update_state(|i| {
                holds = lease::holds(i.running.as_ref(), job_id);
                if holds {
                    i.lose_deletions(entity);
                }
                holds
            })
            .await?;
            if !holds {
                return Err(superseded());
            }
            return Ok(());
        }
        // Told in the history, but no record of this run failed.
        for unread in std::mem::take(&mut deleted.unread) {
            self.tell(ErrorCode::ValidationError, unread, None, None);
        }
        let tombstones: Vec<Record> = deleted.ids.into_iter().map(Record::gone).collect();
        // Deleting is what a job another took over must not do: it checks first.
        let listed = self.listing.is_some();
        if (!tombstones.is_empty() || listed) && !self.still_holds().await? {
            return Err(superseded());
        }
        // The whole window a first sync reads holds the deletions of records never synced, as
        // many as the provider had: they are not looked for among the links, a query each. An
        // entity whose deletions were lost has synced all the same, and records merged into
        // other records' shards are among them.
        let links = if deletions_since.is_some() || self.relist {
            Links::Searched
        } else {
            Links::NotSearched
        };
        // The provider's log of deletions is not records this run read: one whose shard is
        // already gone, or never was, is not a record skipped.
        let skipped = self.counters.skipped;
        self.soft_delete(&tombstones, links).await?;
        self.counters.skipped = skipped;
        let mut reconciled = false;
        if let Some(mut listing) = self.listing.take() {
            if self.read_listed_before(&mut listing).await? {
                listing.ids.seal();
                self.reconcile(provider.as_ref(), conn, &listing.ids)
                    .await?;
                reconciled = true;
            } else {
                self.listing_dropped = true;
            }
        }
        let entity = &self.mapping.external_entity;
        let end = EntityEnd {
            deletions_covered: deleted.covered_until,
            listing_compared: reconciled,
            // A listing that could not be compared loses deletions only if the cursor it
            // read from the start replaces the one stored; kept, that one still tells them.
            deletions_lost: lost || (self.listing_dropped && self.pending_cursor.is_some()),
            cursor: self.pending_cursor.clone(),
            read_began: self.read_began,
        };
        let progress = self.progress(pages, true);
        let job_id = self.job.job_id;
        let mut holds = true;
        self.update_state(|i| {
            holds = lease::checkpoint(&mut i.running, job_id, progress.clone(), Utc::now());
            if holds {
                i.end_entity(entity, end.clone(), |stored, newer| {
                    provider.newer_cursor(stored, newer)
                });
            }
            holds
        })
        .await?;
        if !holds {
            return Err(superseded());
        }
        Ok(())
    }

    /// Whether this job still holds its integration (another may have taken it over after
    /// this job stalled past its lease).
    async fn still_holds(&self) -> Result<bool, Failure> {
        let (tenant, id) = (self.job.tenant_id, self.job.integration_id);
        let stored = self
            .with_retries(|| self.app.store.get(tenant, id))
            .await?
            .ok_or_else(|| {
                Failure::new(FailureCode::Store, format!("integration `{id}` is gone"))
            })?;
        let integration: Integration = stored
            .value
            .data()
            .map_err(|e| Failure::new(FailureCode::Store, e.to_string()))?;
        Ok(lease::holds(integration.running.as_ref(), self.job.job_id))
    }

    /// Stores the next page of `listing`: the external ids `listed`.
    async fn store_listed_page(&self, listing: &Listing, listed: &[String]) -> Result<(), Failure> {
        let page = ListedPage {
            integration_id: self.job.integration_id.to_string(),
            entity: self.mapping.external_entity.clone(),
            listing: listing.id.clone(),
            page: listing.stored,
            ids: listed.to_vec(),
        };
        let id = ListedPage::id_for(&self.synced_prefix(), listing.stored);
        let shard = page.to_shard(id, self.job.tenant_id, self.now);
        self.with_retries(|| self.app.store.upsert(&shard))
            .await
            .map(drop)
    }

    /// Adds what the jobs before this one listed to `listing`: the pages they stored. Whether
    /// they are all there: one that is not (it expired with a listing left for a week, or a
    /// listing begun since wrote over it) leaves the listing incomplete, and then nothing is
    /// reconciled.
    async fn read_listed_before(&self, listing: &mut Listing) -> Result<bool, Failure> {
        if listing.stored_before == 0 {
            return Ok(true);
        }
        let prefix = self.synced_prefix();
        // A few pages at a time: a listing of millions of records is not read into memory at
        // once, only its ids' hashes kept.
        let mut pages = (0..listing.stored_before).peekable();
        while pages.peek().is_some() {
            let chunk: Vec<u64> = pages.by_ref().take(LISTED_PAGES_AT_ONCE).collect();
            let ids: Vec<String> = chunk
                .iter()
                .map(|&page| ListedPage::id_for(&prefix, page))
                .collect();
            let found = self
                .with_retries(|| self.app.store.get_many(self.job.tenant_id, &ids))
                .await?;
            for (page, shard) in chunk.into_iter().zip(found) {
                let listed = shard.and_then(|s| {
                    ListedPage::ids_from(
                        &s.value,
                        self.job.integration_id,
                        &self.mapping.external_entity,
                        &listing.id,
                        page,
                    )
                });
                match listed {
                    Some(listed) => listing.ids.extend(listed),
                    None => {
                        tracing::warn!(entity = %self.mapping.external_entity, page, "a page of the listing is gone or was written over by a later listing; nothing is reconciled this time, and the next run lists the entity again");
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// The beginning of the ids of the shards this integration syncs from the entity.
    fn synced_prefix(&self) -> String {
        synced_shard_id(self.job.integration_id, &self.mapping.external_entity, "")
    }

    /// Soft-deletes the shards this integration synced from the entity whose own records a
    /// complete listing (`listed`) no longer has, and the provider says are gone (`Pull::gone`).
    /// A record merged into such a shard is left to its own entity's deletions: the listing of
    /// this one says nothing of it.
    /// A record the provider lists only until a time (its link's `listed_until`: an expired
    /// Zoom meeting) is not asked about once that time has passed. The entity's shards are read a page of fingerprints at a time, in id order, so that an
    /// entity of any size costs a page of memory. What the provider cannot decide stays, and
    /// the history counts it; an error asking it that trying again or new credentials could
    /// mend fails the job, and any other leaves the rest of the shards and is told (the listing
    /// counts as compared: listing again would fail the same way, at the cost of a full read).
    async fn reconcile(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        listed: &ListedIds,
    ) -> Result<(), Failure> {
        // Shards already soft-deleted are not records this run skipped, however it ends.
        let before = self.counters.skipped;
        let reconciled = self.reconcile_pages(provider, conn, listed).await;
        self.counters.skipped = before;
        reconciled
    }

    async fn reconcile_pages(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        listed: &ListedIds,
    ) -> Result<(), Failure> {
        let integration_id = self.job.integration_id;
        let prefix = self.synced_prefix();
        let mut after: Option<String> = None;
        let mut reconciled = 0;
        let mut undecided = 0;
        let mut used_up = None;
        // A link from before the provider said how long it lists its record may be to one that
        // aged out unseen.
        let listed_for_a_time = provider.lists_for_a_time(&self.mapping.external_entity);
        loop {
            let synced = self
                .with_retries(|| {
                    self.app.store.fingerprints_by_prefix(
                        self.job.tenant_id,
                        &self.mapping.shard_type_id,
                        &prefix,
                        after.as_deref(),
                        RECONCILE_PAGE,
                    )
                })
                .await?;
            let more = synced.len() == RECONCILE_PAGE;
            after = synced.last().map(|(id, _)| id.clone());
            // Each shard's own record only: another linked to it was merged in, maybe from
            // another entity, which this listing does not list.
            let entity = &self.mapping.external_entity;
            let left_out: Vec<String> = synced
                .into_iter()
                .flat_map(|(id, fingerprint)| {
                    fingerprint.links.into_iter().filter(move |r| {
                        r.integration_id == integration_id
                            && synced_shard_id(integration_id, entity, &r.external_id) == id
                    })
                })
                .filter(|r| {
                    r.sync_status == RelationshipStatus::Synced
                        && r.listed_until
                            .map_or(!listed_for_a_time, |until| until > self.now)
                        && !listed.contains(&r.external_id)
                })
                .map(|r| r.external_id)
                .collect();
            let asked = !left_out.is_empty();
            // The share was used up by a page before, whose questions were all answered: it
            // stops the comparison only if there is more to ask.
            if asked && let Some(stop) = used_up.take() {
                return Err(Failure::from(stop));
            }
            // The share used up with this page's questions left.
            let mut stopped = None;
            let gone: Vec<Record> = if !asked {
                Vec::new()
            } else {
                match provider
                    .gone(conn, &self.mapping.external_entity, left_out)
                    .await
                {
                    Ok(left) => {
                        undecided += left.undecided;
                        match left.stopped {
                            Some(stop) if left.unasked > 0 => stopped = Some(stop),
                            Some(stop) => used_up = Some(stop),
                            None => {}
                        }
                        left.gone.into_iter().map(Record::gone).collect()
                    }
                    Err(e) if mends_later(&e) => return Err(e.into()),
                    // Asking again would fail again (an object the API will not describe):
                    // the shards not compared yet stay, and the history says so.
                    Err(e) => {
                        let message = format!(
                            "the records the listing left out could not all be checked, so the rest of their shards stay: {}",
                            e.message
                        );
                        self.tell(e.code, message, None, None);
                        break;
                    }
                }
            };
            if asked {
                // Asking about many pages of shards outlasts a hold taken once: it is renewed
                // after each page's questions, before its deletions, and a job another took
                // over meanwhile stops.
                let job_id = self.job.job_id;
                let mut holds = true;
                self.update_state(|i| {
                    holds = lease::renew(&mut i.running, job_id, Utc::now());
                    holds
                })
                .await?;
                if !holds {
                    return Err(superseded());
                }
            }
            reconciled += gone.len();
            self.soft_delete(&gone, Links::Searched).await?;
            // What was answered before the questions stopped is applied; the entity stays
            // to be listed again.
            if let Some(stop) = stopped {
                return Err(stop.into());
            }
            if !more {
                break;
            }
        }
        if reconciled > 0 {
            tracing::info!(entity = %self.mapping.external_entity, count = reconciled, listed = listed.len(), "records no longer listed are reconciled as deleted");
        }
        if undecided > 0 {
            self.tell(
                ErrorCode::ValidationError,
                format!(
                    "of the records the listing left out, {undecided} may be deleted for good or out of the integration user's sight, which the provider does not tell apart, or were too many to ask about one by one: their shards stay"
                ),
                None,
                None,
            );
        }
        Ok(())
    }

    /// Maps, deduplicates and writes one page read on its own (not as part of a listing).
    async fn process_page(&mut self, records: Vec<Record>) -> Result<(), Failure> {
        self.counters.fetched += records.len() as u64;
        let mapped = self.map(records).await?;
        let (writing, _) = oneshot::channel();
        self.write_page(mapped, writing).await
    }

    /// Maps a page's records while the fingerprints of their shards are read.
    async fn map(&self, records: Vec<Record>) -> Result<Mapped, Failure> {
        let by_fingerprint = plan::skips_by_fingerprint(self.mapping, self.two_way.is_some());
        let own = fingerprinted(
            self.job.integration_id,
            self.mapping,
            by_fingerprint,
            &records,
        );
        let (fingerprints, transformed) = tokio::join!(self.fingerprints(own), async {
            plan::transform_page(self.job.integration_id, self.mapping, records)
        });
        Ok(Mapped {
            transformed,
            fingerprints: by_fingerprint.then_some(fingerprints?),
        })
    }

    /// The fingerprints of the shards `ids`, by id (`None` for a shard that does not exist).
    async fn fingerprints(
        &self,
        ids: Vec<String>,
    ) -> Result<HashMap<String, Option<ShardFingerprint>>, Failure> {
        if ids.is_empty() {
            return Ok(HashMap::default());
        }
        let found = self
            .with_retries(|| self.app.store.fingerprints(self.job.tenant_id, &ids))
            .await?;
        Ok(ids.into_iter().zip(found).collect())
    }

    /// Deduplicates and writes a mapped page: the planner decides (`plan`), this reads what it
    /// needs and writes what it decided. `writing` is told when the last of the page's shards
    /// has gone to the store.
    async fn write_page(
        &mut self,
        mapped: Mapped,
        writing: oneshot::Sender<()>,
    ) -> Result<(), Failure> {
        let Mapped {
            transformed: mut page,
            fingerprints,
        } = mapped;
        // An earlier listing's failure gives way to this listing, and counts as a listing a
        // later one superseded within a page does: skipped.
        let forgotten = plan::forget_relisted(&mut self.errors, &page);
        self.counters.failed = self.counters.failed.saturating_sub(forgotten);
        self.counters.skipped += forgotten;
        self.record_failures(std::mem::take(&mut page.failed));
        self.counters.skipped += page.superseded;
        // Records that are what their shards already say are skipped on the shards'
        // fingerprints; a record whose shard does not exist needs no read of it.
        let mut existing: Option<HashSet<String>> = None;
        if let Some(mut found) = fingerprints {
            existing = Some(
                found
                    .iter()
                    .filter(|(_, f)| f.is_some())
                    .map(|(id, _)| id.clone())
                    .collect(),
            );
            // In the order of the mapped records; a shard's second record in the page has
            // none, and lands.
            let stored: Vec<Option<ShardFingerprint>> = page
                .records
                .iter()
                .map(|r| found.remove(&r.shard_id).flatten())
                .collect();
            let unchanged = plan::unchanged(self.job.integration_id, &page.records, &stored);
            let before = page.records.len();
            let mut skip = unchanged.into_iter();
            page.records.retain(|_| !skip.next().unwrap_or(false));
            self.counters.skipped += (before - page.records.len()) as u64;
        }

        let mut records = std::mem::take(&mut page.records);
        let mut writing = Some(writing);
        let mut landed_pages = Vec::new();
        for round in 1..=plan::LANDING_ROUNDS {
            let LandedRecords {
                landed,
                changes,
                raced,
            } = self
                .land_records(
                    &mut records,
                    existing.take(),
                    writing.take(),
                    round == plan::LANDING_ROUNDS,
                )
                .await?;
            // The records that landed in shards written meanwhile land again, as they were
            // mapped: landing moved data only into shards it created, which are never raced.
            let again: Vec<plan::PageRecord> = if raced.is_empty() {
                Vec::new()
            } else {
                let records_raced = landed.records_in(&raced);
                records
                    .extract_if(.., |r| records_raced.contains(r.record.id.as_str()))
                    .collect()
            };
            landed_pages.push((std::mem::replace(&mut records, again), landed, changes));
            if records.is_empty() {
                break;
            }
        }

        let deleted = self.soft_delete(&page.deleted, Links::Searched).await;
        // Freeing a page's records and shards is milliseconds of walking their maps: a
        // blocking thread does it while this one goes on to the next page.
        tokio::task::spawn_blocking(move || drop((page, landed_pages)));
        deleted
    }

    /// Reads the shards `records` land in, lands them and writes what changed, then counts
    /// them. `existing`, if known, are the records' own shards that exist (no other is read);
    /// `writing` is told when the last shard has gone to the store. Records whose shards were
    /// written by something else meanwhile are left uncounted for another round
    /// ([`LandedRecords::raced`]), or fail if this is the `last`.
    async fn land_records(
        &mut self,
        records: &mut [plan::PageRecord],
        existing: Option<HashSet<String>>,
        writing: Option<oneshot::Sender<()>>,
        last: bool,
    ) -> Result<LandedRecords, Failure> {
        let tenant = self.job.tenant_id;
        // The shards these records map to, read in one batch, and for deduplication the
        // shards of other records that share a match key with them; each with the etag it was
        // first read at, which its write must still find.
        let ids: Vec<String> = records
            .iter()
            .flat_map(|r| {
                let own = (existing.as_ref().is_none_or(|e| e.contains(&r.shard_id)))
                    .then_some(&r.shard_id);
                own.into_iter().chain(r.created_from.iter()).cloned()
            })
            .collect();
        let mut loaded = plan::Loaded::default();
        let mut etags: HashMap<String, String> = HashMap::default();
        for found in self
            .with_retries(|| self.app.store.get_many(tenant, &ids))
            .await?
            .into_iter()
            .flatten()
        {
            etags.entry(found.value.id.clone()).or_insert(found.etag);
            loaded.insert(found.value);
        }
        if let Some(rules) = &self.mapping.deduplication {
            for (rule, keys) in plan::key_lookups(rules, records, &loaded) {
                let keys = keys.into_iter().map(Value::String).collect();
                let query = ShardQuery::of_type(&self.mapping.shard_type_id)
                    .in_tenant(tenant)
                    .filter(&format!("dedupKeys.{rule}"), Op::In, Value::Array(keys));
                for found in self.with_retries(|| self.app.store.query(&query)).await? {
                    etags.entry(found.value.id.clone()).or_insert(found.etag);
                    loaded.insert_found(&rule, found.value);
                }
            }
        }
        if self.searches_links {
            let unheld =
                plan::link_lookups(self.job.integration_id, self.mapping, records, &loaded);
            if !unheld.is_empty() {
                for found in self.linked_elsewhere(unheld).await? {
                    etags.entry(found.value.id.clone()).or_insert(found.etag);
                    loaded.insert(found.value);
                }
            }
        }

        let context = plan::PageContext {
            tenant_id: tenant,
            integration_id: self.job.integration_id,
            mapping: self.mapping,
            now: self.now,
            skips_older_versions: self.skips_older_versions,
        };
        let mut landing = plan::Landing::new(context, records, loaded, self.two_way.as_ref());
        // Derived shards are compared with what is stored, which is read once the page has
        // landed; a page without them is handed to the store part by part as it lands.
        let streamed = if self.mapping.derived_shards.is_empty() {
            Some(self.land_and_send(&mut landing, records, &etags).await)
        } else {
            landing.land(records);
            None
        };
        let mut landed = landing.finish(records);
        self.counters.skipped += landed.skipped;
        if let Some(writing) = writing {
            let _ = writing.send(());
        }
        let (changes, written) = match streamed {
            Some((upserts, sent)) => {
                let finished = match sent {
                    Ok(()) => upserts.finish().await,
                    Err(e) => Err(e),
                };
                match finished {
                    Ok(written) => (plan::changes_written(&mut landed), written),
                    // The page is written again, this failure its first try.
                    Err(e) => {
                        let changes = plan::changes(&mut landed, Vec::new(), self.now);
                        let written = self.write(&changes.writes, &etags, Some(e)).await?;
                        (changes, written)
                    }
                }
            }
            None => {
                let derived_ids: Vec<String> = landed
                    .derived
                    .iter()
                    .map(|d| d.id.clone())
                    .chain(landed.retired.iter().cloned())
                    .collect();
                let stored_derived = if derived_ids.is_empty() {
                    Vec::new()
                } else {
                    self.with_retries(|| self.app.store.get_many(tenant, &derived_ids))
                        .await?
                        .into_iter()
                        .map(|found| found.map(|v| v.value))
                        .collect()
                };
                let changes = plan::changes(&mut landed, stored_derived, self.now);
                let written = self.write(&changes.writes, &etags, None).await?;
                (changes, written)
            }
        };
        if !written.raced.is_empty() {
            tracing::info!(
                entity = %self.mapping.external_entity,
                shards = written.raced.len(),
                "shards were written by something else while this sync wrote them; their records land again"
            );
        }
        let unwritten: Vec<String> = written
            .refused
            .iter()
            .chain(&written.raced)
            .cloned()
            .collect();
        self.follow_two_way(&landed, &changes.writes, &unwritten)
            .await?;
        // The failures of records that land again are theirs to tell then.
        let mut failed = std::mem::take(&mut landed.failed);
        if !last && !written.raced.is_empty() {
            let again = landed.records_in(&written.raced);
            failed.retain(|f| f.record_id.as_deref().is_none_or(|id| !again.contains(id)));
        }
        self.record_failures(failed);
        let tally = plan::tally(&landed.landed, &changes, &written, last);
        self.counters.created += tally.created;
        self.counters.updated += tally.updated;
        self.counters.skipped += tally.skipped;
        self.record_failures(tally.failed);
        let raced = if last { Vec::new() } else { written.raced };
        Ok(LandedRecords {
            landed,
            changes,
            raced,
        })
    }

    /// Lands a page part by part, handing each part's changed shards to the store while the
    /// next part lands, so that planning and writing overlap; each shard that existed is
    /// written only if it still has the etag it was read at (`etags`). Returns the write, left
    /// for the caller to finish, and whether handing the shards over failed (the page has
    /// landed whole all the same).
    async fn land_and_send(
        &self,
        landing: &mut plan::Landing<'_>,
        records: &mut [plan::PageRecord],
        etags: &HashMap<String, String>,
    ) -> (Box<dyn Upserts + 'a>, Result<(), StoreError>) {
        let app: &'a App = self.app;
        let mut upserts = app.store.upserts();
        let mut sent = Ok(());
        for part in records.chunks_mut(LANDING_PART) {
            let changed = landing.land(part);
            if sent.is_ok() {
                let writes: Vec<Upsert<'_>> = changed
                    .into_iter()
                    .map(|shard| guarded(shard, etags))
                    .collect();
                sent = upserts.send(&writes).await;
            }
        }
        (upserts, sent)
    }

    /// After a two-way page is written: conflicts are announced (fields and who won, never
    /// the values) and those left for an operator are recorded with both values; Castiel's
    /// values the provider should take are sent to `sync-outbound`. Shards that were not
    /// written (refused, or written by something else meanwhile) announce and send nothing:
    /// their records land again in a later round or a later sync.
    async fn follow_two_way(
        &self,
        landed: &plan::Landed,
        written: &[Shard],
        unwritten: &[String],
    ) -> Result<(), Failure> {
        let tenant = self.job.tenant_id;
        let integration_id = self.job.integration_id;
        let mut events = Vec::new();
        for found in landed
            .conflicts
            .iter()
            .filter(|c| !unwritten.contains(&c.shard_id))
        {
            events.extend(two_way::conflict_events(
                tenant,
                integration_id,
                &self.mapping.external_entity,
                found,
                two_way::Found::Inbound,
                self.now,
            ));
            self.with_retries(|| {
                two_way::keep_open(
                    self.app,
                    tenant,
                    integration_id,
                    self.mapping,
                    found,
                    self.now,
                )
            })
            .await?;
        }
        let written: HashMap<&str, &Shard> = if landed.to_provider.is_empty() {
            HashMap::default()
        } else {
            written.iter().map(|s| (s.id.as_str(), s)).collect()
        };
        for (shard_id, fields) in landed
            .to_provider
            .iter()
            .filter(|(id, _)| !unwritten.contains(id))
        {
            let Some(shard) = written
                .get(shard_id.as_str())
                .copied()
                .or_else(|| landed.shards.get(shard_id))
            else {
                continue;
            };
            let external_id = shard
                .write_back_link(integration_id)
                .map(|i| shard.external_relationships[i].external_id.clone());
            let message = WriteBackMessage {
                shard_id: shard_id.clone(),
                tenant_id: tenant.to_string(),
                operation: WriteBackOperation::Update,
                changed_fields: Some(fields.clone()),
                external_system: self.provider_name.clone(),
                external_id,
                triggered_at: self.now,
                triggered_by: "system".into(),
                integration_id: Some(integration_id.to_string()),
                attempt: 1,
                holds: 0,
            };
            let message_id = write_back_id(
                shard_id,
                shard.content_hash.as_deref().unwrap_or_default(),
                integration_id,
            );
            self.app
                .queue
                .send(
                    OutgoingMessage::json(SYNC_OUTBOUND, message_id, &message)
                        .in_session(integration_id),
                )
                .await
                .map_err(|e| Failure::new(FailureCode::Store, e.to_string()))?;
        }
        super::publish(self.app, &events).await;
        Ok(())
    }

    fn record_failures(&mut self, failures: Vec<plan::RecordFailure>) {
        for f in failures {
            self.record_error(
                f.code,
                f.message,
                f.record_id.as_deref(),
                f.field.as_deref(),
            );
        }
    }

    /// Soft-deletes the shards of records the provider reports deleted (`tombstones`), or
    /// marks their links deleted where another record still holds a shard. A tombstone whose
    /// own shard does not exist is looked for among other shards' links if `links` says so.
    async fn soft_delete(&mut self, tombstones: &[Record], links: Links) -> Result<(), Failure> {
        // A page of them at a time: a provider may report deletions by the hundred thousand.
        for chunk in tombstones.chunks(TOMBSTONES_AT_A_TIME) {
            let mut left: Vec<&Record> = chunk.iter().collect();
            for round in 1..=plan::LANDING_ROUNDS {
                left = self
                    .soft_delete_some(&left, links, round == plan::LANDING_ROUNDS)
                    .await?;
                if left.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One round of [`Self::soft_delete`]: returns the tombstones whose shards were written by
    /// something else since they were read, to be applied again to the shards as they are now
    /// (on the `last` round, their shards fail instead).
    async fn soft_delete_some<'r>(
        &mut self,
        tombstones: &[&'r Record],
        links: Links,
        last: bool,
    ) -> Result<Vec<&'r Record>, Failure> {
        let integration_id = self.job.integration_id;
        let ids: Vec<String> = tombstones
            .iter()
            .map(|t| synced_shard_id(integration_id, &self.mapping.external_entity, &t.id))
            .collect();
        let found = self
            .with_retries(|| self.app.store.get_many(self.job.tenant_id, &ids))
            .await?;
        // Each tombstone's shard: its own, else one a merge or a write-back linked it to.
        let mut holders: Vec<Option<String>> = Vec::with_capacity(tombstones.len());
        let mut shards: HashMap<String, Shard> = HashMap::default();
        let mut etags: HashMap<String, String> = HashMap::default();
        for stored in found {
            holders.push(stored.as_ref().map(|v| v.value.id.clone()));
            if let Some(v) = stored {
                etags.insert(v.value.id.clone(), v.etag);
                shards.insert(v.value.id.clone(), v.value);
            }
        }
        let unheld: Vec<String> = tombstones
            .iter()
            .zip(&holders)
            .filter(|(_, holder)| holder.is_none())
            .map(|(t, _)| t.id.clone())
            .collect();
        if links == Links::Searched && self.mapping.lands_elsewhere() && !unheld.is_empty() {
            let mut linking: Vec<Shard> = Vec::new();
            for found in self.linked_elsewhere(unheld).await? {
                etags.entry(found.value.id.clone()).or_insert(found.etag);
                linking.push(found.value);
            }
            let holder_of = plan::linked_records(integration_id, self.mapping, linking.iter());
            for (tombstone, holder) in tombstones.iter().zip(&mut holders) {
                if holder.is_none() {
                    *holder = holder_of.get(tombstone.id.as_str()).map(|s| s.to_string());
                }
            }
            for shard in linking {
                shards.entry(shard.id.clone()).or_insert(shard);
            }
        }
        // A shard two of the tombstones hold is written once, with both links marked; each
        // tombstone counts.
        let mut changed: Vec<String> = Vec::new();
        let mut counted: HashSet<String> = HashSet::default();
        let mut held: Vec<(&'r Record, String)> = Vec::with_capacity(tombstones.len());
        for (&tombstone, holder) in tombstones.iter().zip(holders) {
            let modified_at = tombstone.modified_at.filter(|_| self.skips_older_versions);
            let now = self.now;
            let Some(shard) = holder.and_then(|id| shards.remove(&id)) else {
                self.counters.skipped += 1;
                continue;
            };
            let id = shard.id.clone();
            match plan::soft_deleted(
                shard.clone(),
                integration_id,
                &tombstone.id,
                modified_at,
                now,
            ) {
                Some(updated) => {
                    if counted.insert(id.clone()) {
                        changed.push(id.clone());
                    }
                    self.counters.updated += 1;
                    held.push((tombstone, id.clone()));
                    shards.insert(id, updated);
                }
                None => {
                    self.counters.skipped += 1;
                    shards.insert(id, shard);
                }
            }
        }
        let writes: Vec<Shard> = changed.iter().filter_map(|id| shards.remove(id)).collect();
        let written = self.write(&writes, &etags, None).await?;
        // A shard lives while one of its records does; so do the shards derived from it.
        let gone: Vec<&str> = writes
            .iter()
            .filter(|s| s.deleted_at.is_some())
            .map(|s| s.id.as_str())
            .filter(|id| {
                !written
                    .refused
                    .iter()
                    .chain(&written.raced)
                    .any(|w| w == id)
            })
            .collect();
        self.retire_derived(&gone).await?;
        let tombstones_of = |id: &str| held.iter().filter(|(_, holder)| holder == id).count();
        for id in written.refused {
            // Each tombstone it holds was counted updated; each fails with it.
            let tombstones = tombstones_of(&id) as u64;
            self.counters.updated -= tombstones;
            self.counters.failed += tombstones.saturating_sub(1);
            let message = format!("the shard `{id}` could not be soft-deleted");
            self.shard_error(FailureCode::Store, message, &id);
        }
        for id in &written.raced {
            self.counters.updated -= tombstones_of(id) as u64;
        }
        if last {
            for id in written.raced {
                self.counters.failed += (tombstones_of(&id) as u64).saturating_sub(1);
                let message = format!(
                    "the shard `{id}` was not soft-deleted: something else wrote it each of the {} times this sync did",
                    plan::LANDING_ROUNDS
                );
                self.shard_error(FailureCode::Store, message, &id);
            }
            return Ok(Vec::new());
        }
        let raced: HashSet<&str> = written.raced.iter().map(String::as_str).collect();
        Ok(held
            .into_iter()
            .filter(|(_, holder)| raced.contains(holder.as_str()))
            .map(|(tombstone, _)| tombstone)
            .collect())
    }

    /// Soft-deletes the shards derived from `primaries`, which were just soft-deleted.
    async fn retire_derived(&mut self, primaries: &[&str]) -> Result<(), Failure> {
        let ids = plan::derived_ids(self.mapping, primaries.iter().copied());
        if ids.is_empty() {
            return Ok(());
        }
        let tenant = self.job.tenant_id;
        let found = self
            .with_retries(|| self.app.store.get_many(tenant, &ids))
            .await?;
        let now = self.now;
        let retired: Vec<Shard> = found
            .into_iter()
            .flatten()
            .filter_map(|v| plan::retired(v.value, now))
            .collect();
        let written = self.write(&retired, &HashMap::default(), None).await?;
        for id in written.refused.iter().chain(&written.raced) {
            let message = format!("the derived shard `{id}` was not soft-deleted with its primary");
            self.shard_error(FailureCode::Store, message, id);
        }
        Ok(())
    }

    /// The live shards of the mapping's type linked to any of these records of this
    /// integration, where the shard is not the record's own.
    async fn linked_elsewhere(
        &self,
        external_ids: Vec<String>,
    ) -> Result<Vec<Versioned<Shard>>, Failure> {
        let mut linked = Vec::new();
        for chunk in external_ids.chunks(LINKED_LOOKUP) {
            let query = ShardQuery::of_type(&self.mapping.shard_type_id)
                .in_tenant(self.job.tenant_id)
                .with_external_ids(chunk.to_vec());
            let asked: HashSet<&String> = chunk.iter().collect();
            for found in self.with_retries(|| self.app.store.query(&query)).await? {
                let ours = found.value.external_relationships.iter().any(|r| {
                    r.integration_id == self.job.integration_id && asked.contains(&r.external_id)
                });
                if ours {
                    linked.push(found);
                }
            }
        }
        Ok(linked)
    }

    /// Writes a page's shards in batches, each that was read guarded by the etag it was read
    /// at (`etags`); retries them with backoff, then shard by shard. `first_failure` is why
    /// writing them as the page landed failed, which was the first try. Returns the shards not
    /// written: those the store refused for what they are, and those written by something
    /// else since they were read. Fails the run if a shard the store cannot take for now still
    /// cannot be written alone, or every shard was refused (the store itself is failing).
    async fn write(
        &self,
        shards: &[Shard],
        etags: &HashMap<String, String>,
        first_failure: Option<StoreError>,
    ) -> Result<Written, Failure> {
        let mut written = self.write_tries(shards, etags, first_failure).await?;
        if !written.raced.is_empty() {
            self.keep_own_writes(&mut written, shards).await?;
        }
        Ok(written)
    }

    /// Takes out of `written.raced` the shards that hold what this sync sent them
    /// (`shards`): a try that failed part way (Cosmos batches written before one was
    /// throttled) wrote them, and the next try, finding them no longer at the etag they were
    /// read at, took them for raced. A shard's content hash, taken again from what is stored,
    /// says what it holds, whenever it was written.
    async fn keep_own_writes(
        &self,
        written: &mut Written,
        shards: &[Shard],
    ) -> Result<(), Failure> {
        let raced = std::mem::take(&mut written.raced);
        let stored = self
            .with_retries(|| self.app.store.get_many(self.job.tenant_id, &raced))
            .await?;
        let sent: HashMap<&str, Option<&str>> = shards
            .iter()
            .map(|s| (s.id.as_str(), s.content_hash.as_deref()))
            .collect();
        // Hashed again: a writer other than the sync leaves the stored hash as it was.
        written.raced = raced
            .into_iter()
            .zip(stored)
            .filter(|(id, stored)| {
                let holds = stored.as_ref().map(|v| content_hash(&v.value));
                holds.is_none() || holds.as_deref() != sent.get(id.as_str()).copied().flatten()
            })
            .map(|(id, _)| id)
            .collect();
        Ok(())
    }

    /// [`Self::write`]'s tries: in batches with backoff, then shard by shard.
    async fn write_tries(
        &self,
        shards: &[Shard],
        etags: &HashMap<String, String>,
        first_failure: Option<StoreError>,
    ) -> Result<Written, Failure> {
        if shards.is_empty() {
            return Ok(Written::default());
        }
        let writes: Vec<Upsert<'_>> = shards.iter().map(|s| guarded(s, etags)).collect();
        if let Ok(written) = self
            .retried(first_failure, || self.app.store.upsert_many(&writes))
            .await
        {
            return Ok(written);
        }
        let mut left = Written::default();
        // A shard the store cannot take for now (throttled) is not one it refused: listed as
        // failed, its record would be passed by the cursor and never read again. It is tried
        // again with backoff while the page has waited less than THROTTLED_PAGE_WAIT (a
        // page's shards waited out one by one would outlast the invocation); past that, or if
        // it still cannot be written, the job fails, and its retry reads the page again from
        // its checkpoint.
        let mut waiting_since: Option<std::time::Instant> = None;
        for write in &writes {
            let write_one = || async {
                match self.app.store.write_one(write).await {
                    Ok(_) => Ok(None),
                    Err(e @ (StoreError::Unavailable(_) | StoreError::NotProvisioned(_))) => Err(e),
                    Err(refused) => Ok(Some(refused)),
                }
            };
            let refused = match write_one().await {
                Err(busy @ StoreError::Unavailable(_))
                    if waiting_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        < THROTTLED_PAGE_WAIT =>
                {
                    self.retried(Some(busy), write_one).await?
                }
                Err(e) => return Err(store_error(e)),
                Ok(refused) => refused,
            };
            match refused {
                None => {}
                Some(StoreError::PreconditionFailed) => left.raced.push(write.shard.id.clone()),
                Some(_) => left.refused.push(write.shard.id.clone()),
            }
        }
        if left.refused.len() == shards.len() {
            return Err(Failure::new(
                FailureCode::Store,
                format!(
                    "the shard store refused all {} writes of a page",
                    shards.len()
                ),
            ));
        }
        Ok(left)
    }

    /// Runs a store operation up to four times: at once, then after 1 s, 2 s and 4 s (±20%).
    async fn with_retries<T, F, Fut>(&self, op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retried(None, op).await
    }

    /// [`Self::with_retries`] of an operation whose first try, made another way, failed with
    /// `first_failure` (if it did).
    async fn retried<T, F, Fut>(
        &self,
        mut first_failure: Option<StoreError>,
        mut op: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = self.job.retry_base;
        let mut attempt = 0;
        loop {
            let tried = match first_failure.take() {
                Some(e) => Err(e),
                None => op().await,
            };
            match tried {
                Ok(v) => return Ok(v),
                Err(StoreError::Unavailable(message)) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!(attempt, %message, "shard store unavailable; retrying");
                    tokio::time::sleep(jitter(delay)).await;
                    delay *= 2;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::write_back_id;

    #[test]
    fn a_shard_ahead_of_two_integrations_is_written_back_to_each() {
        let salesforce = write_back_id("shard-ann", "00ab", "int-sf");
        assert_eq!(salesforce, write_back_id("shard-ann", "00ab", "int-sf"));
        assert_ne!(
            salesforce,
            write_back_id("shard-ann", "00ab", "int-dynamics")
        );
        assert_ne!(salesforce, write_back_id("shard-ann", "00ac", "int-sf"));
    }
}
