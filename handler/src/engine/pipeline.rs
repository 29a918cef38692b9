//! The inbound pipeline: pages of provider records in, shards out.
//!
//! For each entity mapping of the integration the pipeline fetches pages (cursor pagination),
//! and for each page transforms the records, deduplicates them, reads the shards they map to in
//! one batch, skips the ones whose content has not changed, and writes the rest in one batch.
//! Records the provider reports deleted soft-delete their shards. While one page is processed
//! the next is already being fetched, and memory holds at most those two pages.
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
//! batch goes on. A failure of the provider or the store as a whole ends the run with that
//! error; the caller decides between retry, dead letter and "resume next run".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use adapters::{Connection, ErrorCode, FetchRequest, Page, Provider, Record};

use super::failure::{Failure, FailureCode};
use super::lease;
use super::state::update_integration;
use crate::app::App;
use crate::model::dedup::{DedupRules, merge};
use crate::model::history::{Direction, EntitySyncStats, SyncDetails};
use crate::model::integration::{Checkpoint, JobProgress};
use crate::model::mapping::{EntityMapping, transform};
use crate::model::shard::{ExternalRelationship, Relationship, RelationshipStatus, SyncDirection};
use crate::model::{Integration, Shard, SyncError, SyncStats};
use crate::store::{Op, ShardQuery, StoreError};

/// Records asked for per page (Salesforce's maximum batch).
pub const PAGE_SIZE: usize = 2000;

/// What the pipeline is asked to do.
pub struct Job<'a> {
    pub tenant_id: &'a str,
    pub integration_id: &'a str,
    pub job_id: &'a str,
    /// Ignore cursors and fetch everything.
    pub full: bool,
    /// Only these entities (all mapped entities when empty).
    pub entities: &'a [String],
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
        Counters::of(&finished).add_to(&mut outcome.stats);
        outcome
            .errors
            .extend(finished.errors.iter().flatten().cloned());
        outcome.entity_stats.push(finished);
    }
    if !integration.pull_filters.is_empty() {
        outcome.details.filters_applied = Some(integration.pull_filters.clone());
    }
    for mapping in &integration.entity_mappings {
        let name = &mapping.external_entity;
        let done = outcome
            .entity_stats
            .iter()
            .any(|e| &e.external_entity == name);
        if done || (!job.entities.is_empty() && !job.entities.contains(name)) {
            continue;
        }
        let mut entity = EntityRun::new(app, job, mapping, now);
        if let Some(current) = progress
            .current
            .as_ref()
            .filter(|c| &c.external_entity == name)
        {
            entity.counters = Counters::of(current);
            entity.errors = current.errors.clone().unwrap_or_default();
        }
        entity.finished = outcome.entity_stats.clone();
        let result = entity
            .run(provider.as_ref(), conn, integration, &mut outcome)
            .await;
        entity.counters.add_to(&mut outcome.stats);
        outcome.entity_stats.push(entity.stats());
        outcome.errors.append(&mut entity.errors);
        result?;
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
    };
    let records = provider.fetch_by_ids(conn, &request, ids).await?;
    let mut entity = EntityRun::new(app, job, mapping, now);
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
    let mut entity = EntityRun::new(app, job, mapping, now);
    let result = entity.soft_delete(ids).await;
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

/// Errors a checkpoint keeps of a job's progress; more are counted, not listed, so that the
/// integration document stays small.
const MAX_ERRORS_IN_PROGRESS: usize = 1000;

struct EntityRun<'a> {
    app: &'a App,
    job: &'a Job<'a>,
    mapping: &'a EntityMapping,
    now: DateTime<Utc>,
    counters: Counters,
    errors: Vec<SyncError>,
    /// The cursor the pages synced so far returned.
    pending_cursor: Option<String>,
    /// The records a complete listing has returned so far, when this run is one from the start
    /// (see `Pull::lists_everything`): what it leaves out is reconciled as deleted.
    listed: Option<HashSet<String>>,
    /// Entities the job finished before this one, for its progress.
    finished: Vec<EntitySyncStats>,
}

/// The id of the shard synced from one external record: derived, so an upsert needs no query.
/// Cosmos DB ids may not contain `/ \ ? #`; those (and `%`) are percent-escaped.
pub fn synced_shard_id(integration_id: &str, entity: &str, external_id: &str) -> String {
    let mut id = String::with_capacity(integration_id.len() + entity.len() + external_id.len() + 2);
    for (i, part) in [integration_id, entity, external_id]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            id.push('~');
        }
        for c in part.chars() {
            match c {
                '/' | '\\' | '?' | '#' | '%' => id.push_str(&format!("%{:02X}", c as u32)),
                c => id.push(c),
            }
        }
    }
    id
}

/// A stable fingerprint of what a shard says (not when it was written).
pub fn content_hash(shard: &Shard) -> String {
    let external: Vec<(&str, &str, &str)> = shard
        .external_relationships
        .iter()
        .map(|r| {
            (
                r.integration_id.as_str(),
                r.external_id.as_str(),
                r.sync_status.as_str(),
            )
        })
        .collect();
    let canonical = json!([
        shard.shard_type_id,
        shard.name,
        shard.structured_data,
        shard.relationships,
        external,
        shard.deleted_at.is_some()
    ]);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.to_string().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn stored_hash(shard: &Shard) -> Option<&str> {
    shard.content_hash.as_deref()
}

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
    fn new(app: &'a App, job: &'a Job<'a>, mapping: &'a EntityMapping, now: DateTime<Utc>) -> Self {
        Self {
            app,
            job,
            mapping,
            now,
            counters: Counters::default(),
            errors: Vec::new(),
            pending_cursor: None,
            listed: None,
            finished: Vec::new(),
        }
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
        let code = code.into();
        self.counters.failed += 1;
        self.errors.push(SyncError {
            code: code.as_str().into(),
            message,
            entity: Some(self.mapping.external_entity.clone()),
            record_id: record_id.map(str::to_string),
            shard_id: None,
            field: field.map(str::to_string),
            timestamp: self.now,
            retryable: code.is_retryable(),
        });
    }

    async fn run(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        integration: &Integration,
        outcome: &mut Outcome,
    ) -> Result<(), Failure> {
        if self.mapping.validate().is_err()
            || self
                .mapping
                .deduplication
                .as_ref()
                .is_some_and(|d| d.rules.is_empty())
        {
            return Err(Failure::new(
                ErrorCode::ValidationError,
                self.mapping
                    .validate()
                    .err()
                    .unwrap_or_else(|| "deduplication without rules".into()),
            ));
        }
        let entity = self.mapping.external_entity.clone();
        let checkpoint = integration.checkpoints.get(&entity).cloned();
        let mut cursor = match &checkpoint {
            Some(c) => c.cursor.clone(),
            None if self.job.full => None,
            None => integration.cursors.get(&entity).cloned(),
        };
        self.pending_cursor = checkpoint.as_ref().and_then(|c| c.pending_cursor.clone());
        // Only a listing read whole by this run can tell what is gone.
        if checkpoint.is_none() && cursor.is_none() && provider.lists_everything(&entity) {
            self.listed = Some(HashSet::new());
        }
        let mut filters = integration.pull_filters.clone();
        filters.extend(self.mapping.filters.iter().cloned());
        let mut request = FetchRequest {
            entity: entity.clone(),
            fields: self.mapping.source_fields(),
            cursor: cursor.clone(),
            page_token: checkpoint.as_ref().map(|c| c.page_token.clone()),
            filters,
            page_size: PAGE_SIZE,
        };
        if outcome.details.sync_from_date.is_none()
            && let Some(cursor) = &cursor
        {
            outcome.details.sync_from_date =
                provider.cursor_time(cursor).or(integration.last_sync_at);
        }

        let mut page = match self.fetch(provider, conn, &mut request, outcome).await? {
            Some(page) => page,
            None => return Ok(()),
        };
        // The first page may have restarted the entity without its cursor.
        cursor.clone_from(&request.cursor);
        loop {
            if let Some(newer) = page.cursor.take() {
                self.pending_cursor = Some(match self.pending_cursor.take() {
                    Some(earlier) => provider.newer_cursor(earlier, newer),
                    None => newer,
                });
            }
            let next_token = page.next_page.clone();
            let stop_after = page.stop_after.clone();
            let records = std::mem::take(&mut page.records);
            let fetched_so_far =
                outcome.stats.records_fetched + self.counters.fetched + records.len() as u64;
            let limit_reached = fetched_so_far >= self.job.max_records && next_token.is_some();
            let prefetch = next_token.is_some() && stop_after.is_none() && !limit_reached;
            if prefetch {
                request.page_token = next_token.clone();
                request.page_size = PAGE_SIZE
                    .min((self.job.max_records.saturating_sub(fetched_so_far)).max(1) as usize);
            }
            // Fetching the next page overlaps processing and checkpointing this one.
            let (processed, next) = tokio::join!(
                async {
                    self.process_page(records).await?;
                    let pages = outcome.details.pages_processed.unwrap_or(0) + 1;
                    self.checkpoint(next_token.as_deref(), cursor.as_deref(), pages)
                        .await
                },
                async {
                    if prefetch {
                        Some(provider.fetch_page(conn, &request).await)
                    } else {
                        None
                    }
                }
            );
            processed?;
            outcome.details.pages_processed =
                Some(outcome.details.pages_processed.unwrap_or(0) + 1);
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
                    let pages = outcome.details.pages_processed.unwrap_or(0);
                    self.finish_entity(provider, conn, cursor.as_deref(), pages)
                        .await?;
                    break;
                }
                Some(Ok(p)) => page = p,
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
    /// file) restarts the entity's query instead of failing the job; a cursor the provider no
    /// longer honours restarts it from the beginning.
    async fn fetch(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        request: &mut FetchRequest,
        outcome: &mut Outcome,
    ) -> Result<Option<Page>, Failure> {
        let mut page = provider.fetch_page(conn, request).await;
        if let Err(e) = &page
            && request.page_token.is_some()
            && !e.resync
            && matches!(e.code, ErrorCode::NotFound | ErrorCode::ValidationError)
        {
            tracing::warn!(entity = %request.entity, error = %e, "checkpoint no longer valid; restarting the entity");
            request.page_token = None;
            page = provider.fetch_page(conn, request).await;
        }
        if let Err(e) = &page
            && e.resync
            && request.cursor.is_some()
        {
            tracing::warn!(entity = %request.entity, error = %e, "the provider no longer honours the cursor; reading the entity from the beginning");
            request.page_token = None;
            request.cursor = None;
            self.pending_cursor = None;
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
        let mut current = self.stats();
        if let Some(errors) = current.errors.as_mut() {
            errors.truncate(MAX_ERRORS_IN_PROGRESS);
        }
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
    /// the job's hold on the integration.
    async fn checkpoint(
        &self,
        next_token: Option<&str>,
        cursor: Option<&str>,
        pages: u64,
    ) -> Result<(), Failure> {
        let Some(token) = next_token else {
            return Ok(());
        };
        let progress = self.progress(pages, false);
        let job_id = self.job.job_id;
        let checkpoint = Checkpoint {
            job_id: self.job.job_id.to_string(),
            page_token: token.to_string(),
            cursor: cursor.map(str::to_string),
            pending_cursor: self.pending_cursor.clone(),
            updated_at: self.now,
        };
        let entity = &self.mapping.external_entity;
        self.update_state(|i| {
            i.checkpoints.insert(entity.clone(), checkpoint.clone());
            lease::checkpoint(&mut i.running, job_id, progress.clone(), Utc::now());
            true
        })
        .await?;
        Ok(())
    }

    /// Deletions since the cursor, then the entity's new cursor.
    async fn finish_entity(
        &mut self,
        provider: &dyn Provider,
        conn: &mut Connection,
        cursor: Option<&str>,
        pages: u64,
    ) -> Result<(), Failure> {
        if let Some(cursor) = cursor {
            let deleted = provider
                .fetch_deleted(conn, &self.mapping.external_entity, cursor)
                .await?;
            if deleted.full_resync_required {
                // Deletions older than the provider remembers: forget the cursor, so the next
                // run is a full one that sees every record there is.
                tracing::warn!(entity = %self.mapping.external_entity, "deletions no longer available since the cursor; next run resyncs in full");
                let entity = &self.mapping.external_entity;
                self.update_state(|i| {
                    i.cursors.remove(entity);
                    i.checkpoints.remove(entity);
                    true
                })
                .await?;
                return Ok(());
            }
            self.soft_delete(&deleted.ids).await?;
        }
        if let Some(listed) = self.listed.take() {
            self.reconcile(&listed).await?;
        }
        let entity = &self.mapping.external_entity;
        let pending = self.pending_cursor.clone();
        let progress = self.progress(pages, true);
        let job_id = self.job.job_id;
        self.update_state(|i| {
            lease::checkpoint(&mut i.running, job_id, progress.clone(), Utc::now());
            if let Some(newer) = pending.clone() {
                let cursor = match i.cursors.remove(entity) {
                    Some(stored) => provider.newer_cursor(stored, newer),
                    None => newer,
                };
                i.cursors.insert(entity.clone(), cursor);
            }
            i.checkpoints.remove(entity);
            true
        })
        .await?;
        Ok(())
    }

    /// Soft-deletes the shards this integration synced from the entity that a complete listing
    /// (`listed`) no longer has.
    async fn reconcile(&mut self, listed: &HashSet<String>) -> Result<(), Failure> {
        let integration_id = self.job.integration_id;
        let prefix = synced_shard_id(integration_id, &self.mapping.external_entity, "");
        let query = ShardQuery::of_type(&self.mapping.shard_type_id)
            .in_tenant(self.job.tenant_id)
            .with_element("external_relationships", "integrationId", integration_id);
        let synced = self.with_retries(|| self.app.store.query(&query)).await?;
        let gone: Vec<String> = synced
            .into_iter()
            .filter(|v| v.value.id.starts_with(&prefix))
            .flat_map(|v| v.value.external_relationships)
            .filter(|r| r.integration_id == integration_id && !listed.contains(&r.external_id))
            .map(|r| r.external_id)
            .collect();
        if !gone.is_empty() {
            tracing::info!(entity = %self.mapping.external_entity, count = gone.len(), "records no longer listed are reconciled as deleted");
        }
        let before = self.counters.skipped;
        self.soft_delete(&gone).await?;
        // Shards already soft-deleted are not records this run skipped.
        self.counters.skipped = before;
        Ok(())
    }

    /// Transforms, deduplicates and writes one page.
    async fn process_page(&mut self, records: Vec<Record>) -> Result<(), Failure> {
        let mapping = self.mapping;
        let tenant = self.job.tenant_id;
        let integration_id = self.job.integration_id;
        let entity = &mapping.external_entity;

        let mut deleted_ids = Vec::new();
        let mut items: Vec<(Record, Map<String, Value>)> = Vec::with_capacity(records.len());
        for record in records {
            self.counters.fetched += 1;
            if let Some(listed) = self.listed.as_mut()
                && !record.deleted
            {
                listed.insert(record.id.clone());
            }
            if record.deleted {
                deleted_ids.push(record.id);
                continue;
            }
            match transform(&mapping.field_mappings, &record.fields) {
                Ok(data) => items.push((record, data)),
                Err(e) => {
                    let id = record.id.clone();
                    self.record_error(
                        ErrorCode::ValidationError,
                        e.message,
                        Some(&id),
                        Some(&e.field),
                    );
                }
            }
        }

        // The shards these records map to, read in one batch.
        let ids: Vec<String> = items
            .iter()
            .map(|(r, _)| synced_shard_id(integration_id, entity, &r.id))
            .collect();
        let existing = self
            .with_retries(|| self.app.store.get_many(tenant, &ids))
            .await?;
        let mut originals: HashMap<String, Option<String>> = HashMap::new();
        let mut shards: BTreeMap<String, Shard> = BTreeMap::new();
        for found in existing.into_iter().flatten() {
            originals.insert(
                found.value.id.clone(),
                stored_hash(&found.value).map(str::to_string),
            );
            shards.insert(found.value.id.clone(), found.value);
        }

        // Duplicates among shards from other records, by their match keys.
        let rules = mapping.deduplication.as_ref();
        let mut by_key: HashMap<String, String> = HashMap::new();
        if let Some(rules) = rules {
            self.find_duplicates(
                rules,
                &items,
                &ids,
                &mut shards,
                &mut originals,
                &mut by_key,
            )
            .await?;
            for shard in shards.values() {
                for (name, key) in &shard.dedup_keys {
                    by_key
                        .entry(format!("{name}={key}"))
                        .or_insert_with(|| shard.id.clone());
                }
            }
        }

        // Each record lands in its own shard, a duplicate's, or a new one.
        let mut landed: Vec<(String, String)> = Vec::with_capacity(items.len());
        for ((record, data), own_id) in items.iter().zip(&ids) {
            let keys = rules.map(|r| r.keys(data)).unwrap_or_default();
            let target = if shards.contains_key(own_id) {
                Some(own_id.clone())
            } else {
                keys.iter()
                    .filter_map(|(name, key)| by_key.get(&format!("{name}={key}")))
                    .next()
                    .cloned()
            };
            let shard = match target {
                Some(id) => {
                    let shard = shards.get_mut(&id).expect("targets are loaded");
                    let base = shard
                        .structured_data
                        .as_object()
                        .cloned()
                        .unwrap_or_default();
                    shard.structured_data = Value::Object(land(rules, &id == own_id, base, data));
                    shard
                }
                None if mapping.create_new => {
                    shards.entry(own_id.clone()).or_insert_with(|| Shard {
                        id: own_id.clone(),
                        tenant_id: tenant.to_string(),
                        shard_type_id: mapping.shard_type_id.clone(),
                        name: String::new(),
                        structured_data: Value::Object(data.clone()),
                        relationships: Vec::new(),
                        external_relationships: Vec::new(),
                        created_at: Some(self.now),
                        created_by: Some("system".into()),
                        updated_at: Some(self.now),
                        deleted_at: None,
                        content_hash: None,
                        dedup_keys: BTreeMap::new(),
                        ttl: None,
                        extra: Map::new(),
                    })
                }
                None => {
                    self.counters.skipped += 1;
                    continue;
                }
            };
            shard.deleted_at = None;
            shard.name = mapping
                .name_field
                .as_ref()
                .and_then(|f| shard.structured_data.get(f))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| {
                    if shard.name.is_empty() {
                        record.id.clone()
                    } else {
                        shard.name.clone()
                    }
                });
            link_external(shard, integration_id, &record.id, self.now);
            if let Some(rules) = rules {
                let keys = rules.keys(
                    shard
                        .structured_data
                        .as_object()
                        .expect("data is an object"),
                );
                for (name, key) in &keys {
                    by_key
                        .entry(format!("{name}={key}"))
                        .or_insert_with(|| shard.id.clone());
                }
                shard.dedup_keys = keys;
            }
            landed.push((record.id.clone(), shard.id.clone()));
        }

        // Derived shards follow their primary.
        let mut derived: Vec<Shard> = Vec::new();
        let primaries: HashMap<&str, &str> = if mapping.derived_shards.is_empty() {
            HashMap::new()
        } else {
            landed
                .iter()
                .map(|(r, s)| (r.as_str(), s.as_str()))
                .collect()
        };
        for (record, _) in &items {
            let Some(primary) = primaries
                .get(record.id.as_str())
                .and_then(|s| shards.get(*s))
            else {
                continue;
            };
            for def in &mapping.derived_shards {
                if def.when.as_ref().is_some_and(|c| !c.holds(&record.fields)) {
                    continue;
                }
                match transform(&def.field_mappings, &record.fields) {
                    Ok(data) => derived.push(Shard {
                        id: format!("{}~{}", primary.id, def.shard_type_id),
                        tenant_id: tenant.to_string(),
                        shard_type_id: def.shard_type_id.clone(),
                        name: def
                            .name_field
                            .as_ref()
                            .and_then(|f| data.get(f))
                            .and_then(Value::as_str)
                            .map_or_else(|| primary.name.clone(), str::to_string),
                        structured_data: Value::Object(data),
                        relationships: vec![Relationship {
                            kind: "derived_from".into(),
                            target_id: primary.id.clone(),
                            target_type: primary.shard_type_id.clone(),
                        }],
                        external_relationships: Vec::new(),
                        created_at: Some(self.now),
                        created_by: Some("system".into()),
                        updated_at: Some(self.now),
                        deleted_at: None,
                        content_hash: None,
                        dedup_keys: BTreeMap::new(),
                        ttl: None,
                        extra: Map::new(),
                    }),
                    Err(e) => {
                        let id = record.id.clone();
                        self.record_error(
                            ErrorCode::ValidationError,
                            e.message,
                            Some(&id),
                            Some(&e.field),
                        );
                    }
                }
            }
        }

        // Only what changed is written.
        let mut writes: Vec<Shard> = Vec::new();
        let mut changed: HashMap<String, bool> = HashMap::new();
        for shard in shards.values_mut() {
            let hash = content_hash(shard);
            let original = originals.get(&shard.id);
            let is_changed = original.is_none_or(|old| old.as_deref() != Some(hash.as_str()));
            changed.insert(shard.id.clone(), is_changed);
            if is_changed {
                shard.updated_at = Some(self.now);
                shard.content_hash = Some(hash);
                writes.push(shard.clone());
            }
        }
        if !derived.is_empty() {
            let derived_ids: Vec<String> = derived.iter().map(|d| d.id.clone()).collect();
            let stored = self
                .with_retries(|| self.app.store.get_many(tenant, &derived_ids))
                .await?;
            for (mut shard, stored) in derived.into_iter().zip(stored) {
                let hash = content_hash(&shard);
                if let Some(stored) = &stored {
                    if stored_hash(&stored.value) == Some(hash.as_str()) {
                        continue;
                    }
                    shard.created_at = stored.value.created_at;
                }
                shard.content_hash = Some(hash);
                writes.push(shard);
            }
        }
        let failed_ids = self.write(writes).await?;

        let mut counted: HashMap<&str, bool> = HashMap::new();
        for (record_id, shard_id) in &landed {
            if failed_ids.contains(shard_id) {
                let message = format!("the shard `{shard_id}` could not be written");
                self.record_error(FailureCode::Store, message, Some(record_id), None);
                continue;
            }
            let first_for_shard = counted.insert(shard_id.as_str(), true).is_none();
            match (
                originals.contains_key(shard_id),
                changed.get(shard_id).copied().unwrap_or(false),
            ) {
                (false, _) if first_for_shard => self.counters.created += 1,
                (_, true) => self.counters.updated += 1,
                _ => self.counters.skipped += 1,
            }
        }

        self.soft_delete(&deleted_ids).await
    }

    /// Loads shards of other records that share a match key with this page's records.
    async fn find_duplicates(
        &self,
        rules: &DedupRules,
        items: &[(Record, Map<String, Value>)],
        ids: &[String],
        shards: &mut BTreeMap<String, Shard>,
        originals: &mut HashMap<String, Option<String>>,
        by_key: &mut HashMap<String, String>,
    ) -> Result<(), Failure> {
        for rule in &rules.rules {
            let name = rule.key_name();
            let keys: Vec<Value> = items
                .iter()
                .zip(ids)
                .filter(|(_, id)| !shards.contains_key(*id))
                .filter_map(|((_, data), _)| rule.key(data).map(Value::String))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let query = ShardQuery::of_type(&self.mapping.shard_type_id)
                .in_tenant(self.job.tenant_id)
                .filter(&format!("dedupKeys.{name}"), Op::In, Value::Array(keys));
            let found = self.with_retries(|| self.app.store.query(&query)).await?;
            for v in found {
                let shard = v.value;
                if let Some(key) = shard.dedup_keys.get(&name) {
                    by_key
                        .entry(format!("{name}={key}"))
                        .or_insert_with(|| shard.id.clone());
                }
                originals
                    .entry(shard.id.clone())
                    .or_insert_with(|| stored_hash(&shard).map(str::to_string));
                shards.entry(shard.id.clone()).or_insert(shard);
            }
        }
        Ok(())
    }

    /// Soft-deletes the shards of records the provider reports deleted.
    async fn soft_delete(&mut self, external_ids: &[String]) -> Result<(), Failure> {
        if external_ids.is_empty() {
            return Ok(());
        }
        let integration_id = self.job.integration_id;
        let ids: Vec<String> = external_ids
            .iter()
            .map(|e| synced_shard_id(integration_id, &self.mapping.external_entity, e))
            .collect();
        let found = self
            .with_retries(|| self.app.store.get_many(self.job.tenant_id, &ids))
            .await?;
        let mut writes = Vec::new();
        for (external_id, stored) in external_ids.iter().zip(found) {
            match stored {
                Some(v) if v.value.deleted_at.is_none() => {
                    let mut shard = v.value;
                    shard.deleted_at = Some(self.now);
                    shard.updated_at = Some(self.now);
                    for r in &mut shard.external_relationships {
                        if r.integration_id == integration_id && &r.external_id == external_id {
                            r.sync_status = RelationshipStatus::Deleted;
                            r.last_synced_at = Some(self.now);
                        }
                    }
                    let hash = content_hash(&shard);
                    shard.content_hash = Some(hash);
                    writes.push(shard);
                    self.counters.updated += 1;
                }
                _ => self.counters.skipped += 1,
            }
        }
        let failed = self.write(writes).await?;
        for id in failed {
            self.counters.updated -= 1;
            self.record_error(
                FailureCode::Store,
                format!("the shard `{id}` could not be soft-deleted"),
                None,
                None,
            );
        }
        Ok(())
    }

    /// Writes a batch; retries it with backoff, then shard by shard. Returns the ids that could
    /// not be written; fails the run only if none could.
    async fn write(&self, shards: Vec<Shard>) -> Result<Vec<String>, Failure> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        if self
            .with_retries(|| self.app.store.upsert_many(&shards))
            .await
            .is_ok()
        {
            return Ok(Vec::new());
        }
        let mut failed = Vec::new();
        for shard in &shards {
            if self.app.store.upsert(shard).await.is_err() {
                failed.push(shard.id.clone());
            }
        }
        if failed.len() == shards.len() {
            return Err(Failure::new(
                FailureCode::Store,
                format!(
                    "the shard store refused all {} writes of a page",
                    shards.len()
                ),
            ));
        }
        Ok(failed)
    }

    /// Runs a store operation up to four times: at once, then after 1 s, 2 s and 4 s (±20%).
    async fn with_retries<T, F, Fut>(&self, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = self.job.retry_base;
        let mut attempt = 0;
        loop {
            match op().await {
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

/// The data of a shard after a record lands in it. A record's own shard takes the source's
/// current values for every mapped field, blanks included: merging is for a *different*
/// record's shard, which the deduplication rules matched, and merging a record into its own
/// shard would keep stale values forever.
fn land(
    rules: Option<&DedupRules>,
    own_shard: bool,
    mut stored: Map<String, Value>,
    record: &Map<String, Value>,
) -> Map<String, Value> {
    match rules {
        Some(rules) if !own_shard => merge(rules.merge, &stored, record),
        _ => {
            stored.extend(record.iter().map(|(k, v)| (k.clone(), v.clone())));
            stored
        }
    }
}

fn link_external(shard: &mut Shard, integration_id: &str, external_id: &str, now: DateTime<Utc>) {
    match shard
        .external_relationships
        .iter_mut()
        .find(|r| r.integration_id == integration_id && r.external_id == external_id)
    {
        Some(r) => {
            r.sync_status = RelationshipStatus::Synced;
            r.last_synced_at = Some(now);
        }
        None => shard.external_relationships.push(ExternalRelationship {
            integration_id: integration_id.to_string(),
            external_id: external_id.to_string(),
            sync_status: RelationshipStatus::Synced,
            last_synced_at: Some(now),
            sync_direction: SyncDirection::Inbound,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_own_shard_takes_the_sources_values_whatever_the_merge_strategy() {
        use crate::model::dedup::{DedupRule, Matching, MergeStrategy};
        let stored =
            json!({"name": "Old Name", "email": "a@x.test", "phone": "555", "note": "kept"});
        let record = json!({"name": "New Name", "email": "a@x.test", "phone": null});
        let stored = stored.as_object().unwrap().clone();
        let record = record.as_object().unwrap();
        for merge in [
            MergeStrategy::KeepFirst,
            MergeStrategy::KeepMostComplete,
            MergeStrategy::MergeFields,
        ] {
            let rules = DedupRules {
                rules: vec![DedupRule {
                    field: "email".into(),
                    matching: Matching::Exact,
                }],
                merge,
            };
            let own = land(Some(&rules), true, stored.clone(), record);
            assert_eq!(
                Value::Object(own),
                json!({"name": "New Name", "email": "a@x.test", "phone": null, "note": "kept"}),
                "{merge:?}"
            );
            let other = land(Some(&rules), false, stored.clone(), record);
            assert_eq!(
                other["name"],
                if merge == MergeStrategy::MergeFields {
                    "New Name"
                } else {
                    "Old Name"
                },
                "a duplicate merges by {merge:?}"
            );
        }
    }

    #[test]
    fn synced_ids_are_derived_and_cosmos_safe() {
        assert_eq!(
            synced_shard_id("int-1", "Account", "001A"),
            "int-1~Account~001A"
        );
        assert_eq!(
            synced_shard_id("int-1", "files", "a/b?c#d%"),
            "int-1~files~a%2Fb%3Fc%23d%25"
        );
    }

    #[test]
    fn the_content_hash_ignores_write_times_but_not_content() {
        let mut a: Shard = serde_json::from_value(json!({
            "id": "s", "tenantId": "t", "shardTypeId": "c_contact", "name": "Ann",
            "structuredData": {"email": "ann@x.test"}
        }))
        .unwrap();
        let before = content_hash(&a);
        a.updated_at = Some(Utc::now());
        a.external_relationships.push(ExternalRelationship {
            integration_id: "i".into(),
            external_id: "1".into(),
            sync_status: RelationshipStatus::Synced,
            last_synced_at: Some(Utc::now()),
            sync_direction: SyncDirection::Inbound,
        });
        let with_link = content_hash(&a);
        assert_ne!(before, with_link);
        a.external_relationships[0].last_synced_at = None;
        assert_eq!(content_hash(&a), with_link, "sync times are not content");
        a.structured_data["email"] = json!("ann@y.test");
        assert_ne!(content_hash(&a), with_link);
    }
}
