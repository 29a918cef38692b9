//! Planning a page: what a page of provider records does to the shards, decided without I/O.
//!
//! The pipeline reads, the planner decides, the pipeline writes:
//!
//! 1. [`transform_page`]: the records become mapped data, each with the id of its own shard;
//!    deletions are set aside, and a record its mapping refuses fails alone;
//! 2. the pipeline reads the records' own shards and, for deduplication, the shards that share
//!    a match key with them ([`key_lookups`] says which keys) or that link a record merged into
//!    them ([`link_lookups`]), into [`Loaded`];
//! 3. [`Landing`]: each record lands in its own shard, the shard that links it, a duplicate's,
//!    or a new one, and is linked to its external record; the shards whose content hash changed come out stamped,
//!    part by part ([`land_page`] lands a page whole); derived shards follow their primary;
//! 4. the pipeline writes each part's changed shards as they come, or, for a page with
//!    derived shards, reads those as stored and [`changes`] keeps the ones that differ, and
//!    soft-deletes those whose record no longer meets their condition;
//! 5. [`tally`] counts each record created, updated, skipped or failed (a shard that could not
//!    be written fails the records that landed in it).
//!
//! Everything here is a plain function over data, so every rule of landing and counting is
//! unit-tested without a store or a provider.

use std::collections::BTreeMap;
use std::collections::hash_map::Entry;

use super::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use adapters::{ErrorCode, Record};

use super::failure::FailureCode;
use crate::model::conflict::{
    ConflictPolicy, FieldConflict, Modified, reconcile_record, value_hash,
};
use crate::model::dedup::{DedupKeys, DedupRules, merge};
use crate::model::digest::Fnv1a;
use crate::model::mapping::{EntityMapping, transform, transform_owned};
use crate::model::shard::{ExternalRelationship, Relationship, RelationshipStatus, SyncDirection};
use crate::model::{Shard, SyncError};
use crate::store::{ShardFingerprint, Written};

/// Whose page is planned.
#[derive(Debug, Clone, Copy)]
pub struct PageContext<'a> {
    pub tenant_id: &'a str,
    pub integration_id: &'a str,
    pub mapping: &'a EntityMapping,
    pub now: DateTime<Utc>,
    /// The provider may serve a record's older versions after newer ones
    /// (`Pull::serves_older_versions`): links keep the modified time of the version their
    /// shard was written from, and older versions are skipped ([`is_stale`]).
    pub skips_older_versions: bool,
}

/// A record that failed alone, for the run's errors.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordFailure {
    pub code: FailureCode,
    pub message: String,
    pub record_id: Option<String>,
    pub field: Option<String>,
}

/// A record, mapped, with the id of the shard synced from it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRecord {
    /// The record; its fields moved into `data`, but where the mapping derives shards.
    pub record: Record,
    pub data: Map<String, Value>,
    pub shard_id: String,
    /// The shard the record says it was created from by write-back (its idempotency field):
    /// it lands there if that shard exists and is of the mapping's type.
    pub created_from: Option<String>,
}

impl PageRecord {
    /// The shard ids to read for this record.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.shard_id).chain(self.created_from.iter())
    }
}

/// Times a page's records, or a chunk of tombstones, are applied at most: a shard written by
/// something else between a sync's read of it and its write (a Castiel user, another
/// integration's sync) is read again and its records landed anew, and only a shard that
/// changed under every try fails its records.
pub const LANDING_ROUNDS: usize = 3;

/// A page after its mapping.
#[derive(Debug, Default)]
pub struct Transformed {
    pub records: Vec<PageRecord>,
    /// The records the provider reports deleted (their tombstones).
    pub deleted: Vec<Record>,
    pub failed: Vec<RecordFailure>,
    /// Listings of a record that a later listing of it in the page supersedes: skipped.
    pub superseded: u64,
}

/// Maps a page's records through the entity mapping.
///
/// A record listed more than once in a page (an export, then a later export of the same
/// record or its tombstone; a Graph delta, which may repeat an item) is what its last listing
/// says (or its newest, where the listings say when the record was modified): live with that
/// listing's fields, or deleted. Only that listing counts, so a shard is
/// not written back to life and deleted again within one page, nor deleted after a later
/// listing brought its record back, and a listing the record has since outgrown (a name since
/// filled in) neither lands nor fails.
pub fn transform_page(
    integration_id: &str,
    mapping: &EntityMapping,
    records: Vec<Record>,
) -> Transformed {
    let superseded = superseded_listings(&records);
    let mut page = Transformed {
        records: Vec::with_capacity(records.len()),
        ..Transformed::default()
    };
    for (i, mut record) in records.into_iter().enumerate() {
        if superseded.get(i).copied().unwrap_or(false) {
            page.superseded += 1;
            continue;
        }
        if record.deleted {
            page.deleted.push(record);
            continue;
        }
        let created_from = mapping
            .idempotency_field
            .as_ref()
            .and_then(|f| record.fields.get(f))
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string);
        // Derived shards map the record's fields again once its shard has landed; otherwise
        // they are not read after this, and move into the shard's data.
        let data = if mapping.derived_shards.is_empty() {
            transform_owned(&mapping.field_mappings, std::mem::take(&mut record.fields))
        } else {
            transform(&mapping.field_mappings, &record.fields)
        };
        match data {
            Ok(data) => page.records.push(PageRecord {
                shard_id: synced_shard_id(integration_id, &mapping.external_entity, &record.id),
                created_from,
                record,
                data,
            }),
            Err(e) => page.failed.push(RecordFailure {
                code: ErrorCode::ValidationError.into(),
                message: e.message,
                record_id: Some(record.id),
                field: Some(e.field),
            }),
        }
    }
    page
}

/// For each record of a page, whether another listing of the same record in the page
/// supersedes it: the later listing, unless both say when the record was modified and the
/// later one is older (an export of older versions read after a newer one). Empty for a page
/// that lists each record once (most pages).
fn superseded_listings(records: &[Record]) -> Vec<bool> {
    let mut kept: HashMap<&str, usize> =
        HashMap::with_capacity_and_hasher(records.len(), Default::default());
    let mut repeated = false;
    for (i, record) in records.iter().enumerate() {
        match kept.entry(record.id.as_str()) {
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
            Entry::Occupied(mut slot) => {
                repeated = true;
                let older = matches!(
                    (record.modified_at, records[*slot.get()].modified_at),
                    (Some(this), Some(kept)) if this < kept
                );
                if !older {
                    slot.insert(i);
                }
            }
        }
    }
    if !repeated {
        return Vec::new();
    }
    records
        .iter()
        .enumerate()
        .map(|(i, record)| kept[record.id.as_str()] != i)
        .collect()
}

/// Drops from a run's errors the failures of records this page lists again, and returns how
/// many it dropped. A provider may list a record more than once in one run (a Graph delta lists
/// again an item that changed while it was paged through): as within a page, the record is
/// what its last listing says, so this listing lands, is deleted or fails anew, and the
/// earlier failure no longer stands.
pub fn forget_relisted(errors: &mut Vec<SyncError>, page: &Transformed) -> u64 {
    if errors.iter().all(|e| e.record_id.is_none()) {
        return 0;
    }
    let listed: HashSet<&str> = page
        .records
        .iter()
        .map(|r| r.record.id.as_str())
        .chain(page.deleted.iter().map(|r| r.id.as_str()))
        .chain(page.failed.iter().filter_map(|f| f.record_id.as_deref()))
        .collect();
    let before = errors.len();
    errors.retain(|e| e.record_id.as_deref().is_none_or(|id| !listed.contains(id)));
    (before - errors.len()) as u64
}

/// Whether a mapping's records may be found unchanged from their shards' fingerprints alone
/// ([`unchanged`]). Not for two-way mappings, whose landing weighs Castiel's edits against the
/// provider's, nor for mappings with derived shards, which are compared whole.
pub fn skips_by_fingerprint(mapping: &EntityMapping, two_way: bool) -> bool {
    !two_way && mapping.derived_shards.is_empty()
}

/// Which records of a page already are what their own shards say, told from the shards'
/// fingerprints (`stored`, in the order of `records`): the shard was last written from this
/// very data (its link's `recordHash`, and its `listedUntil`), nothing wrote it since (its
/// `updatedAt` is the time that link was last synced), and it is not deleted. Such a record would land as it did last
/// time and change nothing, so it is skipped without its shard being read whole. A record
/// that names the shard write-back created it from always lands. Nor does a record older than
/// the version its shard was last written from ([`is_stale`]) change anything: it is skipped
/// too.
pub fn unchanged(
    integration_id: &str,
    records: &[PageRecord],
    stored: &[Option<ShardFingerprint>],
) -> Vec<bool> {
    records
        .iter()
        .zip(stored)
        .map(|(record, stored)| {
            let Some(stored) = stored else { return false };
            if record.created_from.is_some() {
                return false;
            }
            let own_link = stored
                .links
                .iter()
                .find(|link| link.is_to(integration_id, &record.record.id));
            if own_link.is_some_and(|link| is_stale(link, record.record.modified_at)) {
                return true;
            }
            if stored.deleted {
                return false;
            }
            own_link.is_some_and(|link| {
                link.sync_status == RelationshipStatus::Synced
                    && link.sync_direction == SyncDirection::Inbound
                    && link.last_synced_at.is_some()
                    && link.last_synced_at == stored.updated_at
                    && link.listed_until == record.record.listed_until
                    && link.record_hash.as_deref() == Some(record_hash(&record.data).as_str())
            })
        })
        .collect()
}

/// Whether a version of a record modified at `modified_at` is older than the one its one-way
/// `link` says the shard was last written from or deleted by: an earlier export read again after
/// a later one, a backfill of older versions. Landing it would put older values over newer ones
/// (or bring a deleted record back, or delete a record that lives again), so it is skipped.
/// Links keep that time only where the provider may serve older versions
/// ([`PageContext::skips_older_versions`]); a version with no time, or a link without one, is
/// never stale, and a two-way link is weighed by its own rules.
pub fn is_stale(link: &ExternalRelationship, modified_at: Option<DateTime<Utc>>) -> bool {
    link.sync_direction == SyncDirection::Inbound
        && matches!(
            (modified_at, link.record_modified_at),
            (Some(read), Some(written)) if read < written
        )
}

/// How long a two-way shard deleted in Castiel stays deleted while its record is still read
/// from the provider: the longest a write-back is held for the provider's allocation.
pub const DELETION_WRITE_BACK_WAIT: chrono::Duration = chrono::Duration::days(7);

/// The fingerprint of a record's mapped data: FNV-1a of its JSON text (keys sorted).
pub fn record_hash(data: &Map<String, Value>) -> String {
    let mut hash = Fnv1a::new();
    serde_json::to_writer(&mut hash, data).expect("hashing does not fail");
    hash.hex()
}

/// The shards a page may land in, as the store returned them.
#[derive(Debug, Default)]
pub struct Loaded {
    shards: HashMap<String, Shard>,
    /// The content hash each shard had when it was read: what decides whether it changed.
    read_hashes: HashMap<String, Option<String>>,
    /// Match key (`rule=key`) → the shard that has it.
    by_key: HashMap<String, String>,
}

impl Loaded {
    /// Adds a shard read by id; a shard read twice keeps its first reading.
    pub fn insert(&mut self, shard: Shard) {
        self.read_hashes
            .entry(shard.id.clone())
            .or_insert_with(|| shard.content_hash.clone());
        self.shards.entry(shard.id.clone()).or_insert(shard);
    }

    /// Adds a shard found by its key of `rule`: the first shard found with a key owns it.
    pub fn insert_found(&mut self, rule: &str, shard: Shard) {
        if let Some(key) = shard.dedup_keys.get(rule) {
            self.by_key
                .entry(format!("{rule}={key}"))
                .or_insert_with(|| shard.id.clone());
        }
        self.insert(shard);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.shards.contains_key(id)
    }
}

/// The match keys to look up, by rule name: those of records whose own shard was not found
/// (a record with its own shard lands there whatever its keys).
pub fn key_lookups(
    rules: &DedupRules,
    records: &[PageRecord],
    loaded: &Loaded,
) -> Vec<(String, Vec<String>)> {
    rules
        .rules
        .iter()
        .map(|rule| {
            let keys = records
                .iter()
                .filter(|r| !r.ids().any(|id| loaded.contains(id)))
                .filter_map(|r| rule.key(&r.data))
                .collect::<Vec<_>>();
            (rule.key_name(), keys)
        })
        .filter(|(_, keys)| !keys.is_empty())
        .collect()
}

/// The external ids of records to look for among the links of shards not their own: records
/// with no shard of their own that no shard read for the page links to. A record merged into
/// another record's shard is found there by its match key while that key still matches; once
/// either record's key changes, only its link says where it lives.
pub fn link_lookups(
    integration_id: &str,
    mapping: &EntityMapping,
    records: &[PageRecord],
    loaded: &Loaded,
) -> Vec<String> {
    let unheld: Vec<&PageRecord> = records
        .iter()
        .filter(|r| !r.ids().any(|id| loaded.contains(id)))
        .collect();
    if unheld.is_empty() {
        return Vec::new();
    }
    let linked = linked_records(integration_id, mapping, loaded.shards.values());
    unheld
        .into_iter()
        .filter(|r| !linked.contains_key(r.record.id.as_str()))
        .map(|r| r.record.id.clone())
        .collect()
}

/// Each external record of the integration that `shards` of the mapping's type link to, and
/// the shard linking it. Of two shards linking one record (one whose link was marked deleted
/// before the record, restored, matched another), the one whose link is `synced` holds it, or
/// else the first by id: the same shard every time, for its listings and its deletion alike.
/// A link on another entity's own shard of the same id is that entity's record's.
pub fn linked_records<'s>(
    integration_id: &str,
    mapping: &EntityMapping,
    shards: impl Iterator<Item = &'s Shard>,
) -> HashMap<&'s str, &'s str> {
    let mut linked: HashMap<&str, (&str, bool)> = HashMap::default();
    let others = AnothersOwn::new(integration_id, &mapping.external_entity);
    for shard in shards.filter(|s| s.shard_type_id == mapping.shard_type_id) {
        for link in &shard.external_relationships {
            if link.integration_id != integration_id || others.holds(&shard.id, &link.external_id) {
                continue;
            }
            let synced = link.sync_status == RelationshipStatus::Synced;
            let holder = (shard.id.as_str(), synced);
            linked
                .entry(link.external_id.as_str())
                .and_modify(|held| {
                    if (synced, std::cmp::Reverse(holder.0)) > (held.1, std::cmp::Reverse(held.0)) {
                        *held = holder;
                    }
                })
                .or_insert(holder);
        }
    }
    linked
        .into_iter()
        .map(|(record, (shard, _))| (record, shard))
        .collect()
}

/// A page landed in its shards.
#[derive(Debug, Default)]
pub struct Landed {
    /// Every shard read or created, as it is after the page landed.
    pub shards: HashMap<String, Shard>,
    read_hashes: HashMap<String, Option<String>>,
    /// Whether each shard a record landed in changed (those that did are stamped).
    changed: HashMap<String, bool>,
    /// Each landed record's external id and the shard it landed in, in page order.
    pub landed: Vec<(String, String)>,
    /// Shards derived from the landed records, not yet compared with what is stored.
    pub derived: Vec<Shard>,
    /// Derived shards whose condition (`when`) their record no longer meets: soft-deleted if
    /// they are stored live.
    pub retired: Vec<String>,
    /// Records with no shard to land in (no duplicate found, and the mapping creates none).
    pub skipped: u64,
    pub failed: Vec<RecordFailure>,
    /// Two-way shards whose fields were changed on both sides.
    pub conflicts: Vec<ConflictFound>,
    /// Two-way shards whose Castiel values the provider should take, and which fields.
    pub to_provider: Vec<(String, Vec<String>)>,
}

impl Landed {
    /// The external ids of the records that landed in any of `shards`.
    pub fn records_in(&self, shards: &[String]) -> HashSet<&str> {
        let shards: HashSet<&str> = shards.iter().map(String::as_str).collect();
        self.landed
            .iter()
            .filter(|(_, shard)| shards.contains(shard.as_str()))
            .map(|(record, _)| record.as_str())
            .collect()
    }
}

/// A record whose fields were changed both in Castiel and at the provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictFound {
    pub shard_id: String,
    pub external_id: String,
    pub fields: Vec<FieldConflict>,
    /// Both sides' values of the conflicting fields, for the conflict record an operator
    /// resolves (never for events or logs: they may be personal data).
    pub castiel: Map<String, Value>,
    pub provider: Map<String, Value>,
}

/// Lands each record in its own shard, a duplicate's (found by match key), or a new one if the
/// mapping creates shards, and derives the mapping's derived shards from each landed record:
/// the page landed whole (see [`Landing`]).
pub fn land_page(
    ctx: &PageContext<'_>,
    records: &mut [PageRecord],
    loaded: Loaded,
    two_way: Option<&ConflictPolicy>,
) -> Landed {
    let mut landing = Landing::new(*ctx, records, loaded, two_way);
    landing.land(records);
    landing.finish(records)
}

/// A page landing in its shards, part by part: each part's records land in order, and the
/// shards they changed come out stamped with their new content hash and write time. A page
/// may be landed whole ([`land_page`]); a one-way page without derived shards is landed in
/// parts, each part's changes written while the next part lands.
///
/// A shard a later part lands in again (a duplicate by match key, a record listed twice) comes
/// out again when that part changes it: its last version is the one written.
pub struct Landing<'a> {
    ctx: PageContext<'a>,
    two_way: Option<&'a ConflictPolicy>,
    shards: HashMap<String, Shard>,
    /// Match key (`rule=key`) → the shard that has it, when the page matches by key at all.
    by_key: HashMap<String, String>,
    match_by_key: bool,
    /// External id → the shard that links it, for records with no shard of their own.
    by_link: HashMap<String, String>,
    landed: Landed,
}

impl<'a> Landing<'a> {
    /// Prepares the landing of `records` (the whole page) in the shards read for them.
    pub fn new(
        ctx: PageContext<'a>,
        records: &[PageRecord],
        loaded: Loaded,
        two_way: Option<&'a ConflictPolicy>,
    ) -> Self {
        let mapping = ctx.mapping;
        let Loaded {
            mut shards,
            read_hashes,
            mut by_key,
        } = loaded;
        // Room for a new shard per record: growing the map as they come moves every shard in
        // it.
        shards.reserve(records.len());
        // Links and match keys are only looked up for a record with no shard of its own; a
        // page whose records all have one (every re-run) builds no index of them.
        let lacks_own = records.iter().any(|r| {
            let own = own_shard_id(&r.shard_id, r.created_from.as_ref(), &shards, mapping);
            !shards.contains_key(own)
        });
        let match_by_key = mapping.deduplication.is_some() && lacks_own;
        let by_link = if lacks_own && mapping.lands_elsewhere() {
            linked_records(ctx.integration_id, mapping, shards.values())
                .into_iter()
                .map(|(record, shard)| (record.to_string(), shard.to_string()))
                .collect()
        } else {
            HashMap::default()
        };
        if match_by_key {
            for shard in shards.values() {
                for (name, key) in &shard.dedup_keys {
                    by_key
                        .entry(format!("{name}={key}"))
                        .or_insert_with(|| shard.id.clone());
                }
            }
        }
        Self {
            ctx,
            two_way,
            shards,
            by_key,
            match_by_key,
            by_link,
            landed: Landed {
                read_hashes,
                ..Landed::default()
            },
        }
    }

    /// Lands a part of the page, in order. Returns the shards whose content it changed (from
    /// what was read, or from how an earlier part left them), in id order, stamped with their
    /// new hash and write time. A one-way record's mapped data moves into the new shard it
    /// creates (its page has no more use for it).
    pub fn land(&mut self, records: &mut [PageRecord]) -> Vec<&Shard> {
        let ctx = &self.ctx;
        let mapping = ctx.mapping;
        let rules = mapping.deduplication.as_ref();
        let two_way = self.two_way;
        let shards = &mut self.shards;
        let by_key = &mut self.by_key;
        let match_by_key = self.match_by_key;
        let by_link = &self.by_link;
        let landed = &mut self.landed;
        let from = landed.landed.len();
        for PageRecord {
            record,
            data,
            shard_id,
            created_from,
        } in records.iter_mut()
        {
            let own_id = own_shard_id(shard_id, created_from.as_ref(), shards, mapping);
            // The match keys of a record with no shard of its own, which looks for a duplicate by
            // them: a new shard made of its data takes these very keys.
            let mut record_keys = None;
            // A record linked to a shard lands there whatever its keys say now: the link is
            // what it was merged by, and its keys may since have changed.
            let target = if shards.contains_key(own_id) {
                Some(own_id.clone())
            } else if let Some(holder) = by_link.get(&record.id) {
                Some(holder.clone())
            } else {
                let keys = rules.map(|r| r.keys(data)).unwrap_or_default();
                let found = keys
                    .iter()
                    .find_map(|(name, key)| by_key.get(&format!("{name}={key}")))
                    .cloned();
                record_keys = Some(keys);
                found
            };
            let mut new_shard_keys = None;
            if let Some(id) = &target
                && two_way.is_none()
                && shards[id].external_relationships.iter().any(|r| {
                    r.is_to(ctx.integration_id, &record.id) && is_stale(r, record.modified_at)
                })
            {
                landed.skipped += 1;
                continue;
            }
            // A shard written back that Castiel deleted while its record lives on stays
            // deleted: the deletion is Castiel's latest change, and its write-back deletes the
            // record. Brought back here, the write-back would take it for restored, and the
            // deletion would be lost on both sides. For as long as a write-back may wait: a
            // deletion the provider never took (refused, or dead-lettered) gives way to the
            // record after that.
            if let Some(id) = &target
                && two_way.is_some()
                && shards[id]
                    .deleted_at
                    .is_some_and(|at| ctx.now - at < DELETION_WRITE_BACK_WAIT)
                && shards[id].external_relationships.iter().any(|r| {
                    r.is_to(ctx.integration_id, &record.id)
                        && r.sync_status == RelationshipStatus::Synced
                })
            {
                landed.skipped += 1;
                continue;
            }
            let hash = two_way.is_none().then(|| record_hash(data));
            let shard = match target {
                Some(id) => {
                    let shard = shards.get_mut(&id).expect("targets are loaded");
                    let own = &id == own_id;
                    match two_way {
                        Some(policy) if own => {
                            let decided = two_way_landing(ctx, shard, record, data, policy);
                            if let Some(found) = decided.conflict {
                                landed.conflicts.push(found);
                            }
                            if !decided.to_provider.is_empty() {
                                landed.to_provider.push((id.clone(), decided.to_provider));
                            }
                        }
                        _ => {
                            let stored = match std::mem::take(&mut shard.structured_data) {
                                Value::Object(stored) => stored,
                                _ => Map::new(),
                            };
                            shard.structured_data =
                                Value::Object(landed_data(rules, own, stored, data));
                        }
                    }
                    shard
                }
                None if mapping.create_new => shards.entry(own_id.clone()).or_insert_with(|| {
                    new_shard_keys = record_keys.take();
                    let data = match two_way {
                        Some(_) => data.clone(),
                        None => std::mem::take(data),
                    };
                    new_shard(ctx, own_id, &mapping.shard_type_id, data)
                }),
                None => {
                    landed.skipped += 1;
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
            let direction = if two_way.is_some() {
                SyncDirection::Bidirectional
            } else {
                SyncDirection::Inbound
            };
            link_external(shard, ctx.integration_id, record, direction, ctx.now);
            if two_way.is_none()
                && let Some(link) = shard
                    .external_relationships
                    .iter_mut()
                    .find(|r| r.is_to(ctx.integration_id, &record.id))
            {
                link.record_hash = hash;
                link.record_modified_at = record.modified_at.filter(|_| ctx.skips_older_versions);
            }
            if two_way.is_some() {
                agree(
                    shard,
                    ctx.integration_id,
                    &record.id,
                    data,
                    &landed.to_provider,
                    &landed.conflicts,
                );
            }
            if let Some(rules) = rules {
                let keys = new_shard_keys.unwrap_or_else(|| {
                    rules.keys(
                        shard
                            .structured_data
                            .as_object()
                            .expect("data is an object"),
                    )
                });
                if match_by_key {
                    // A key the shard no longer has finds it no more: a later record of the
                    // page that has it (a new contact given the email this one gave up) is
                    // not merged into it.
                    for (name, old) in &shard.dedup_keys {
                        let entry = format!("{name}={old}");
                        if keys.get(name) != Some(old.as_str())
                            && by_key.get(&entry) == Some(&shard.id)
                        {
                            by_key.remove(&entry);
                        }
                    }
                    for (name, key) in &keys {
                        by_key
                            .entry(format!("{name}={key}"))
                            .or_insert_with(|| shard.id.clone());
                    }
                }
                shard.dedup_keys = keys;
            }
            landed.landed.push((record.id.clone(), shard.id.clone()));
        }

        // A shard is hashed once per part, however many of the part's records landed in it.
        let mut touched: Vec<&String> = landed.landed[from..].iter().map(|(_, id)| id).collect();
        touched.sort_unstable();
        touched.dedup();
        let mut changed = Vec::new();
        for id in touched {
            let shard = shards.get_mut(id).expect("landed shards are kept");
            let hash = content_hash(shard);
            let is_changed = shard.content_hash.as_deref() != Some(hash.as_str());
            if is_changed {
                shard.updated_at = Some(ctx.now);
                shard.content_hash = Some(hash);
                changed.push(id);
            }
            *landed.changed.entry(id.clone()).or_default() |= is_changed;
        }
        changed.into_iter().map(|id| &shards[id]).collect()
    }

    /// The page as landed, with the shards derived from its records (`records`, the whole
    /// page).
    pub fn finish(self, records: &[PageRecord]) -> Landed {
        let Self {
            ctx,
            shards,
            mut landed,
            ..
        } = self;
        let ctx = &ctx;
        let mapping = ctx.mapping;
        if !mapping.derived_shards.is_empty() {
            // Records that land in one shard (duplicates by match key) derive from the last of
            // them, as the shard lands it last: the earlier version is replaced, never written
            // over the later one.
            let mut derived_at: HashMap<String, usize> = HashMap::default();
            let primaries: HashMap<&str, &str> = landed
                .landed
                .iter()
                .map(|(r, s)| (r.as_str(), s.as_str()))
                .collect();
            for PageRecord { record, .. } in records.iter() {
                let Some(primary) = primaries
                    .get(record.id.as_str())
                    .and_then(|s| shards.get(*s))
                else {
                    continue;
                };
                // Another record (merged in, or another integration's) may derive the same
                // shard and still meet the condition: only a primary's one record retires it.
                let alone = primary
                    .external_relationships
                    .iter()
                    .filter(|r| r.sync_status == RelationshipStatus::Synced)
                    .count()
                    <= 1;
                for def in &mapping.derived_shards {
                    if def.when.as_ref().is_some_and(|c| !c.holds(&record.fields)) {
                        if alone {
                            landed
                                .retired
                                .push(derived_shard_id(&primary.id, &def.shard_type_id));
                        }
                        continue;
                    }
                    match transform(&def.field_mappings, &record.fields) {
                        Ok(data) => {
                            let mut shard = new_shard(
                                ctx,
                                &derived_shard_id(&primary.id, &def.shard_type_id),
                                &def.shard_type_id,
                                Map::new(),
                            );
                            shard.name = def
                                .name_field
                                .as_ref()
                                .and_then(|f| data.get(f))
                                .and_then(Value::as_str)
                                .map_or_else(|| primary.name.clone(), str::to_string);
                            shard.structured_data = Value::Object(data);
                            shard.relationships = vec![Relationship {
                                kind: "derived_from".into(),
                                target_id: primary.id.clone(),
                                target_type: primary.shard_type_id.clone(),
                            }];
                            match derived_at.get(&shard.id) {
                                Some(&at) => landed.derived[at] = shard,
                                None => {
                                    derived_at.insert(shard.id.clone(), landed.derived.len());
                                    landed.derived.push(shard);
                                }
                            }
                        }
                        Err(e) => landed.failed.push(RecordFailure {
                            code: ErrorCode::ValidationError.into(),
                            message: e.message,
                            record_id: Some(record.id.clone()),
                            field: Some(e.field),
                        }),
                    }
                }
            }
        }
        // A derived shard another record of its primary (a duplicate landing after it) still
        // derives stays.
        if !landed.retired.is_empty() {
            let derived: HashSet<&str> = landed.derived.iter().map(|d| d.id.as_str()).collect();
            landed.retired.retain(|id| !derived.contains(id.as_str()));
            landed.retired.sort_unstable();
            landed.retired.dedup();
        }
        landed.shards = shards;
        landed
    }
}

/// The id of the shard of type `shard_type_id` derived from the shard `primary`.
pub fn derived_shard_id(primary: &str, shard_type_id: &str) -> String {
    format!("{primary}~{shard_type_id}")
}

/// The ids of every shard `mapping` derives from each of `primaries`.
pub fn derived_ids<'a>(
    mapping: &EntityMapping,
    primaries: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    primaries
        .into_iter()
        .flat_map(|primary| {
            mapping
                .derived_shards
                .iter()
                .map(move |def| derived_shard_id(primary, &def.shard_type_id))
        })
        .collect()
}

/// `shard`, a derived shard whose primary or condition is gone, soft-deleted at `now`; `None`
/// if it is already.
pub fn retired(mut shard: Shard, now: DateTime<Utc>) -> Option<Shard> {
    if shard.deleted_at.is_some() {
        return None;
    }
    shard.deleted_at = Some(now);
    shard.updated_at = Some(now);
    shard.content_hash = Some(content_hash(&shard));
    Some(shard)
}

/// The shard a record lands in if it exists: the one write-back created it from, if that is
/// one of the mapping's shards (a claim on any other shard is not taken), else its own.
fn own_shard_id<'a>(
    shard_id: &'a String,
    created_from: Option<&'a String>,
    shards: &HashMap<String, Shard>,
    mapping: &EntityMapping,
) -> &'a String {
    created_from
        .filter(|id| {
            shards
                .get(*id)
                .is_some_and(|s| s.shard_type_id == mapping.shard_type_id)
        })
        .unwrap_or(shard_id)
}

/// What landing a record in its two-way shard decided.
struct TwoWay {
    conflict: Option<ConflictFound>,
    to_provider: Vec<String>,
}

/// Lands a record in the two-way shard it belongs to: each field the provider changed is
/// taken, each field changed in Castiel is kept (and is for the provider to take), and fields
/// changed on both sides are settled by `policy` (see [`crate::model::conflict`]).
fn two_way_landing(
    ctx: &PageContext<'_>,
    shard: &mut Shard,
    record: &Record,
    data: &Map<String, Value>,
    policy: &ConflictPolicy,
) -> TwoWay {
    let stored = shard
        .structured_data
        .as_object()
        .cloned()
        .unwrap_or_default();
    let bases: BTreeMap<String, String> = shard
        .external_relationships
        .iter()
        .find(|r| r.is_to(ctx.integration_id, &record.id))
        .map(|r| r.field_hashes.clone())
        .unwrap_or_default();
    let modified = Modified {
        castiel: shard.updated_at,
        provider: record.modified_at,
    };
    let decided = reconcile_record(&bases, &stored, data, &[], policy, modified);
    let mut merged = stored.clone();
    for f in &decided.to_castiel {
        merged.insert(f.clone(), data.get(f).cloned().unwrap_or(Value::Null));
    }
    shard.structured_data = Value::Object(merged);
    let conflict = (!decided.conflicts.is_empty()).then(|| {
        let pick = |from: &Map<String, Value>| -> Map<String, Value> {
            decided
                .conflicts
                .iter()
                .map(|c| {
                    (
                        c.field.clone(),
                        from.get(&c.field).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect()
        };
        ConflictFound {
            shard_id: shard.id.clone(),
            external_id: record.id.clone(),
            fields: decided.conflicts.clone(),
            castiel: pick(&stored),
            provider: pick(data),
        }
    });
    TwoWay {
        conflict,
        to_provider: decided.to_provider,
    }
}

/// Records, after a two-way landing, the value both sides now agree on for each mapped field;
/// a field still to be written to the provider, or waiting for an operator, keeps the value
/// they last agreed on.
fn agree(
    shard: &mut Shard,
    integration_id: &str,
    external_id: &str,
    data: &Map<String, Value>,
    to_provider: &[(String, Vec<String>)],
    conflicts: &[ConflictFound],
) {
    let pending: Vec<&String> = to_provider
        .iter()
        .filter(|(id, _)| *id == shard.id)
        .flat_map(|(_, fields)| fields)
        .chain(
            conflicts
                .iter()
                .filter(|c| c.shard_id == shard.id)
                .flat_map(|c| {
                    c.fields
                        .iter()
                        .filter(|f| f.winner.is_none())
                        .map(|f| &f.field)
                }),
        )
        .collect();
    let values = shard.structured_data.clone();
    if let Some(r) = shard
        .external_relationships
        .iter_mut()
        .find(|r| r.is_to(integration_id, external_id))
    {
        for field in data.keys() {
            if !pending.contains(&field) {
                r.field_hashes
                    .insert(field.clone(), value_hash(values.get(field)));
            }
        }
    }
}

fn new_shard(
    ctx: &PageContext<'_>,
    id: &str,
    shard_type_id: &str,
    data: Map<String, Value>,
) -> Shard {
    Shard {
        id: id.to_string(),
        tenant_id: ctx.tenant_id.to_string(),
        shard_type_id: shard_type_id.to_string(),
        name: String::new(),
        structured_data: Value::Object(data),
        relationships: Vec::new(),
        external_relationships: Vec::new(),
        created_at: Some(ctx.now),
        created_by: Some("system".into()),
        updated_at: Some(ctx.now),
        deleted_at: None,
        content_hash: None,
        dedup_keys: DedupKeys::default(),
        ttl: None,
        extra: Map::new(),
    }
}

/// What a landed page writes.
#[derive(Debug, Default)]
pub struct Changes {
    /// The shards whose content changed, stamped with their new hash and write time (moved
    /// out of [`Landed::shards`], which keeps the unchanged ones).
    pub writes: Vec<Shard>,
    /// Whether each landed shard changed.
    pub changed: HashMap<String, bool>,
    read_hashes: HashMap<String, Option<String>>,
}

/// The changes of a page whose changed shards were written part by part as it landed: they
/// stay in `landed.shards`.
pub fn changes_written(landed: &mut Landed) -> Changes {
    Changes {
        writes: Vec::new(),
        changed: std::mem::take(&mut landed.changed),
        read_hashes: std::mem::take(&mut landed.read_hashes),
    }
}

/// Takes out the shards whose content landing changed, and keeps the derived shards whose
/// content hash differs from what is stored; `stored` is each derived shard as stored (in the
/// order of `landed.derived`, then of `landed.retired`), if it is. A retired one stored live
/// is soft-deleted at `now`.
pub fn changes(landed: &mut Landed, mut stored: Vec<Option<Shard>>, now: DateTime<Utc>) -> Changes {
    let retired_stored = stored.split_off(stored.len().min(landed.derived.len()));
    let mut out = Changes {
        changed: std::mem::take(&mut landed.changed),
        read_hashes: std::mem::take(&mut landed.read_hashes),
        ..Changes::default()
    };
    out.writes = out
        .changed
        .iter()
        .filter(|(_, changed)| **changed)
        .filter_map(|(id, _)| landed.shards.remove(id))
        .collect();
    // In id order, so that a page is written the same way every time.
    out.writes.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    for (mut shard, stored) in std::mem::take(&mut landed.derived).into_iter().zip(stored) {
        let hash = content_hash(&shard);
        if let Some(stored) = &stored {
            if stored.content_hash.as_deref() == Some(hash.as_str()) {
                continue;
            }
            shard.created_at = stored.created_at;
        }
        shard.content_hash = Some(hash);
        out.writes.push(shard);
    }
    landed.retired.clear();
    out.writes.extend(
        retired_stored
            .into_iter()
            .flatten()
            .filter_map(|s| retired(s, now)),
    );
    out
}

/// How a page's records came out.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub created: u64,
    pub updated: u64,
    pub skipped: u64,
    pub failed: Vec<RecordFailure>,
}

/// Counts each landed record once: created (the first record of a new shard), updated (its
/// shard changed), or skipped. A record whose shard the store refused fails; one whose shard
/// something else wrote since it was read is left uncounted to land again, or fails if this
/// was the `last` try.
pub fn tally(
    landed: &[(String, String)],
    changes: &Changes,
    written: &Written,
    last: bool,
) -> Tally {
    let mut tally = Tally::default();
    let mut counted: HashMap<&str, bool> =
        HashMap::with_capacity_and_hasher(landed.len(), Default::default());
    for (record_id, shard_id) in landed {
        let mut fail = |message: String| {
            tally.failed.push(RecordFailure {
                code: FailureCode::Store,
                message,
                record_id: Some(record_id.clone()),
                field: None,
            })
        };
        if written.refused.contains(shard_id) {
            fail(format!("the shard `{shard_id}` could not be written"));
            continue;
        }
        if written.raced.contains(shard_id) {
            if last {
                fail(format!(
                    "the shard `{shard_id}` was not written: something else wrote it each of the {LANDING_ROUNDS} times this sync did"
                ));
            }
            continue;
        }
        let first_for_shard = counted.insert(shard_id.as_str(), true).is_none();
        match (
            changes.read_hashes.contains_key(shard_id),
            changes.changed.get(shard_id).copied().unwrap_or(false),
        ) {
            (false, _) if first_for_shard => tally.created += 1,
            (_, true) => tally.updated += 1,
            _ => tally.skipped += 1,
        }
    }
    tally
}

/// The shard as it stands once its external record is gone, or `None` if nothing changes: the
/// link to the record is marked deleted, and the shard is soft-deleted once no record it is
/// linked to remains. A shard that deduplication merged records into (of this integration or
/// another) lives on while one of them does: deleting a duplicate at the provider, as a CRM's
/// merge does, must not take the surviving person out of Castiel.
///
/// `None` too if the shard is already deleted, or if the tombstone is older than the version
/// the shard was last written from ([`is_stale`]). `modified_at` is the tombstone's time where
/// links keep one ([`PageContext::skips_older_versions`]).
pub fn soft_deleted(
    mut shard: Shard,
    integration_id: &str,
    external_id: &str,
    modified_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Shard> {
    if shard.deleted_at.is_some()
        || shard
            .external_relationships
            .iter()
            .any(|r| r.is_to(integration_id, external_id) && is_stale(r, modified_at))
    {
        return None;
    }
    let mut unlinked = false;
    for r in &mut shard.external_relationships {
        if r.is_to(integration_id, external_id) && r.sync_status != RelationshipStatus::Deleted {
            r.sync_status = RelationshipStatus::Deleted;
            r.last_synced_at = Some(now);
            // A tombstone that says nothing of when leaves the last version's time standing.
            if r.sync_direction == SyncDirection::Inbound && modified_at.is_some() {
                r.record_modified_at = modified_at;
            }
            unlinked = true;
        }
    }
    let survivors = shard.held_by_a_record();
    if survivors && !unlinked {
        return None;
    }
    if !survivors {
        shard.deleted_at = Some(now);
    }
    shard.updated_at = Some(now);
    shard.content_hash = Some(content_hash(&shard));
    Some(shard)
}

/// Whether `byte` is one of the characters Cosmos DB does not allow in an id, or `%`, which
/// escapes them; all are ASCII, so an id's bytes tell whether it has one.
fn reserved_in_ids(byte: u8) -> bool {
    matches!(byte, b'/' | b'\\' | b'?' | b'#' | b'%')
}

/// Tells the shards synced from records of entities other than one. An entity's ids may be its
/// own alone (a bulk import numbers each file's rows from 1): a link to the same id on such a
/// shard is the other entity's record's, not this one's. The parts every id shares are
/// escaped once; an id of a page's link is escaped only if it holds a reserved character.
struct AnothersOwn {
    /// `{integration}~`, escaped.
    head: String,
    /// The entity's own name, escaped.
    entity: String,
}

impl AnothersOwn {
    fn new(integration_id: &str, entity: &str) -> Self {
        let mut head = synced_shard_id(integration_id, "", "");
        head.pop();
        let escaped = synced_shard_id("", entity, "");
        Self {
            head,
            entity: escaped[1..escaped.len() - 1].to_string(),
        }
    }

    /// Whether `shard_id` is the shard synced from record `external_id` of another entity.
    fn holds(&self, shard_id: &str, external_id: &str) -> bool {
        let escaped;
        let id = if external_id.bytes().any(reserved_in_ids) {
            escaped = synced_shard_id("", "", external_id);
            &escaped[2..]
        } else {
            external_id
        };
        shard_id
            .strip_prefix(self.head.as_str())
            .and_then(|rest| rest.strip_suffix(id))
            .and_then(|rest| rest.strip_suffix('~'))
            // An entity's name, between the two: not a record id of its own with a `~` in it
            // (`int~contacts~ACME~2`, record `ACME~2`'s shard, may hold record `2` merged in).
            .is_some_and(|entity| {
                !entity.is_empty() && !entity.contains('~') && entity != self.entity
            })
    }
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
        if !part.bytes().any(reserved_in_ids) {
            id.push_str(part);
            continue;
        }
        for c in part.chars() {
            match c {
                c if c.is_ascii() && reserved_in_ids(c as u8) => {
                    id.push_str(&format!("%{:02X}", c as u32))
                }
                c => id.push(c),
            }
        }
    }
    id
}

/// A stable fingerprint of what a shard says (not when it was written).
///
/// The fingerprint is FNV-1a over a canonical JSON text: `[type, name, data, relationships,
/// links, deleted]`, objects with sorted keys. The text is streamed into the hash as it is
/// serialized, never built: hashing a page of shards allocates nothing per shard beyond the
/// relationships (rare: derived shards) and the answer.
pub fn content_hash(shard: &Shard) -> String {
    /// A link to an external record, with its agreed values when the link is two-way, the
    /// fingerprint of the record it was written from when one-way, and how long the provider
    /// lists the record where it says (they are content too: they decide what the next sync
    /// does).
    struct Link<'a>(&'a ExternalRelationship);

    impl serde::Serialize for Link<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let r = self.0;
            let status = r.sync_status.as_str();
            match (&r.record_hash, r.field_hashes.is_empty(), &r.listed_until) {
                (None, true, None) => (&r.integration_id, &r.external_id, status).serialize(s),
                (None, false, None) => {
                    (&r.integration_id, &r.external_id, status, &r.field_hashes).serialize(s)
                }
                (Some(record), _, None) => (
                    &r.integration_id,
                    &r.external_id,
                    status,
                    &r.field_hashes,
                    record,
                )
                    .serialize(s),
                (record, _, Some(until)) => (
                    &r.integration_id,
                    &r.external_id,
                    status,
                    &r.field_hashes,
                    record,
                    until,
                )
                    .serialize(s),
            }
        }
    }

    // Relationships as a JSON value, so their keys are sorted like the data's.
    let relationships = if shard.relationships.is_empty() {
        Value::Array(Vec::new())
    } else {
        serde_json::to_value(&shard.relationships).unwrap_or(Value::Null)
    };
    let links: Vec<Link<'_>> = shard.external_relationships.iter().map(Link).collect();
    let canonical = (
        &shard.shard_type_id,
        &shard.name,
        &shard.structured_data,
        &relationships,
        &links,
        shard.deleted_at.is_some(),
    );
    let mut hash = Fnv1a::new();
    serde_json::to_writer(&mut hash, &canonical).expect("hashing does not fail");
    hash.hex()
}

/// The data of a shard after a record lands in it. A record's own shard takes the source's
/// current values for every mapped field, blanks included: merging is for a *different*
/// record's shard, which the deduplication rules matched, and merging a record into its own
/// shard would keep stale values forever.
fn landed_data(
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

fn link_external(
    shard: &mut Shard,
    integration_id: &str,
    record: &Record,
    direction: SyncDirection,
    now: DateTime<Utc>,
) {
    match shard
        .external_relationships
        .iter_mut()
        .find(|r| r.is_to(integration_id, &record.id))
    {
        Some(r) => {
            r.sync_status = RelationshipStatus::Synced;
            r.sync_direction = direction;
            r.last_synced_at = Some(now);
            r.listed_until = record.listed_until;
        }
        None => {
            // Most shards have one link: room for four (what a first push makes) is 600 bytes
            // a shard, thousands of times a page.
            shard.external_relationships.reserve_exact(1);
            let mut link = ExternalRelationship::synced(integration_id, &record.id, direction, now);
            link.listed_until = record.listed_until;
            shard.external_relationships.push(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contacts(dedup: bool, create_new: bool) -> EntityMapping {
        let mut mapping = json!({
            "externalEntity": "Contact", "shardTypeId": "c_contact", "createNew": create_new,
            "nameField": "name",
            "fieldMappings": [{"source": "Name", "target": "name"},
                              {"source": "Email", "target": "email"}]
        });
        if dedup {
            mapping["deduplication"] = json!({"rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"});
        }
        serde_json::from_value(mapping).unwrap()
    }

    #[test]
    fn a_derived_shard_is_retired_by_its_primarys_one_record_alone() {
        // Contacts with a profile while they have a title.
        let mut mapping = contacts(true, true);
        mapping.derived_shards = serde_json::from_value(json!([{
            "shardTypeId": "c_contact_profile", "when": {"field": "Title"},
            "fieldMappings": [{"source": "Title", "target": "title"}]
        }]))
        .unwrap();
        let titled = |id: &str, title: Option<&str>| {
            let mut r = record(id, "Ann", Some("ann@x.test"));
            if let Some(title) = title {
                r.fields.insert("Title".into(), json!(title));
            }
            r
        };
        // Record 1, alone in its shard, loses its title: its profile goes.
        let mut page = transform_page("int-1", &mapping, vec![titled("1", None)]);
        let landed = land_page(
            &context(&mapping),
            &mut page.records,
            Loaded::default(),
            None,
        );
        assert_eq!(landed.retired, ["int-1~Contact~1~c_contact_profile"]);

        // Record 1 merged into record 2's shard, whose profile record 2 derives: it stays.
        let (stored, _) = plan(
            &mapping,
            vec![titled("2", Some("CFO")), titled("1", Some("CFO"))],
            &[],
        );
        let mut page = transform_page("int-1", &mapping, vec![titled("1", None)]);
        let rules = mapping.deduplication.as_ref().unwrap();
        let mut loaded = Loaded::default();
        for (rule, keys) in key_lookups(rules, &page.records, &loaded) {
            for shard in stored.iter().filter(|s| s.shard_type_id == "c_contact") {
                if shard
                    .dedup_keys
                    .get(&rule)
                    .is_some_and(|k| keys.iter().any(|key| key == k))
                {
                    loaded.insert_found(&rule, shard.clone());
                }
            }
        }
        let landed = land_page(&context(&mapping), &mut page.records, loaded, None);
        assert_eq!(
            landed.landed,
            [("1".to_string(), "int-1~Contact~2".to_string())]
        );
        assert!(landed.retired.is_empty(), "{:?}", landed.retired);
    }

    fn record(id: &str, name: &str, email: Option<&str>) -> Record {
        let mut fields = json!({"Name": name});
        if let Some(email) = email {
            fields["Email"] = json!(email);
        }
        Record {
            id: id.into(),
            fields: fields.as_object().unwrap().clone(),
            ..Record::default()
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    /// Tenant `t1`'s page of integration `int-1` under `mapping`.
    fn context(mapping: &EntityMapping) -> PageContext<'_> {
        PageContext {
            tenant_id: "t1",
            integration_id: "int-1",
            mapping,
            now: now(),
            skips_older_versions: true,
        }
    }

    /// Plans a page over `stored` shards as the pipeline would, with no write failing.
    fn plan(
        mapping: &EntityMapping,
        records: Vec<Record>,
        stored: &[Shard],
    ) -> (Vec<Shard>, Tally) {
        plan_in(context(mapping), records, stored)
    }

    /// [`plan`] in `context`.
    fn plan_in(
        context: PageContext<'_>,
        records: Vec<Record>,
        stored: &[Shard],
    ) -> (Vec<Shard>, Tally) {
        let mapping = context.mapping;
        let mut page = transform_page("int-1", mapping, records);
        let mut loaded = Loaded::default();
        for shard in stored
            .iter()
            .filter(|s| page.records.iter().any(|r| r.shard_id == s.id))
        {
            loaded.insert(shard.clone());
        }
        if let Some(rules) = &mapping.deduplication {
            for (rule, keys) in key_lookups(rules, &page.records, &loaded) {
                for shard in stored {
                    if shard
                        .dedup_keys
                        .get(&rule)
                        .is_some_and(|k| keys.iter().any(|key| key == k))
                    {
                        loaded.insert_found(&rule, shard.clone());
                    }
                }
            }
        }
        let unheld = link_lookups("int-1", mapping, &page.records, &loaded);
        for shard in stored {
            if shard
                .external_relationships
                .iter()
                .any(|r| r.integration_id == "int-1" && unheld.contains(&r.external_id))
            {
                loaded.insert(shard.clone());
            }
        }
        let mut landed = land_page(&context, &mut page.records, loaded, None);
        let stored_derived = landed.derived.iter().map(|_| None).collect();
        let mut changes = changes(&mut landed, stored_derived, now());
        let writes = std::mem::take(&mut changes.writes);
        let mut tally = tally(&landed.landed, &changes, &Written::default(), true);
        tally.skipped += landed.skipped;
        tally.failed.extend(page.failed);
        (writes, tally)
    }

    #[test]
    fn a_record_listed_twice_in_a_page_derives_from_its_later_listing() {
        let mapping: EntityMapping = serde_json::from_value(json!({
            "externalEntity": "Account", "shardTypeId": "c_company", "nameField": "name",
            "fieldMappings": [{"source": "Name", "target": "name"}],
            "derivedShards": [{"shardTypeId": "c_company_profile",
                               "fieldMappings": [{"source": "Industry", "target": "industry"}]}]
        }))
        .unwrap();
        let account = |industry: &str| Record {
            id: "001".into(),
            fields: json!({"Name": "Acme", "Industry": industry})
                .as_object()
                .unwrap()
                .clone(),
            ..Record::default()
        };
        let context = context(&mapping);
        let mut page = transform_page("int-1", &mapping, vec![account("Tech"), account("Retail")]);
        let landed = land_page(&context, &mut page.records, Loaded::default(), None);
        assert_eq!(landed.derived.len(), 1);
        assert_eq!(landed.derived[0].id, "int-1~Account~001~c_company_profile");
        assert_eq!(landed.derived[0].structured_data["industry"], "Retail");
    }

    #[test]
    fn new_records_create_shards_and_the_same_page_again_writes_nothing() {
        let mapping = contacts(false, true);
        let page = || {
            vec![
                record("1", "Ann", Some("ann@x.test")),
                record("2", "Bob", None),
            ]
        };
        let (writes, tally) = plan(&mapping, page(), &[]);
        assert_eq!((tally.created, tally.updated, tally.skipped), (2, 0, 0));
        assert_eq!(writes.len(), 2);
        let ann = &writes[0];
        assert_eq!(ann.id, "int-1~Contact~1");
        assert_eq!(ann.name, "Ann");
        assert_eq!(ann.external_relationships[0].external_id, "1");
        assert_eq!(
            ann.content_hash.as_deref(),
            Some(content_hash(ann).as_str())
        );

        let (writes, tally) = plan(&mapping, page(), &writes);
        assert!(writes.is_empty(), "unchanged records are not written");
        assert_eq!((tally.created, tally.updated, tally.skipped), (0, 0, 2));
    }

    #[test]
    fn a_changed_record_updates_its_own_shard_only() {
        let mapping = contacts(false, true);
        let (stored, _) = plan(
            &mapping,
            vec![record("1", "Ann", None), record("2", "Bob", None)],
            &[],
        );
        let (writes, tally) = plan(
            &mapping,
            vec![record("1", "Ann Smith", None), record("2", "Bob", None)],
            &stored,
        );
        assert_eq!((tally.created, tally.updated, tally.skipped), (0, 1, 1));
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].structured_data["name"], "Ann Smith");
        assert_eq!(writes[0].created_at, stored[0].created_at);
    }

    #[test]
    fn a_duplicate_by_match_key_merges_into_the_shard_that_has_the_key() {
        let mapping = contacts(true, true);
        let (stored, _) = plan(&mapping, vec![record("1", "Ann", Some("ann@x.test"))], &[]);
        assert_eq!(stored[0].dedup_keys.get("email_exact"), Some("ann@x.test"));
        // Another record with the same email, in a later page, and one in the same page.
        let (writes, tally) = plan(
            &mapping,
            vec![
                record("9", "Ann S.", Some("ann@x.test")),
                record("3", "Cy", Some("cy@x.test")),
                record("4", "Cy Twice", Some("cy@x.test")),
            ],
            &stored,
        );
        // Cy's shard is created by the first Cy and updated by the second.
        assert_eq!(
            (tally.created, tally.updated, tally.skipped),
            (1, 2, 0),
            "{tally:?}"
        );
        let merged = writes.iter().find(|s| s.id == "int-1~Contact~1").unwrap();
        assert_eq!(
            merged.structured_data["name"], "Ann S.",
            "merge_fields takes the newer values"
        );
        let ids: Vec<&str> = merged
            .external_relationships
            .iter()
            .map(|r| r.external_id.as_str())
            .collect();
        assert_eq!(ids, ["1", "9"]);
        assert!(
            writes.iter().all(|s| s.id != "int-1~Contact~4"),
            "the second Cy joined the first"
        );
    }

    #[test]
    fn a_record_of_another_entity_with_the_same_id_lands_apart_not_in_that_records_shard() {
        // Two exports numbering their rows from 1, both into contacts.
        let contacts = contacts(true, true);
        let mut leads = contacts.clone();
        leads.external_entity = "Lead".into();
        let (stored, _) = plan(&contacts, vec![record("2", "Bob", Some("bob@x.test"))], &[]);

        let (writes, tally) = plan(
            &leads,
            vec![record("2", "Dave", Some("dave@x.test"))],
            &stored,
        );

        assert_eq!(tally.created, 1, "{tally:?}");
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].id, "int-1~Lead~2");
        assert_eq!(writes[0].name, "Dave");
        let leads = AnothersOwn::new("int-1", "Lead");
        assert!(leads.holds("int-1~Contact~2", "2"));
        assert!(!leads.holds("int-1~Lead~2", "2"));
        assert!(!leads.holds("int-1~Contact~7", "2"));
        assert!(!leads.holds("castiel-made-shard", "2"));
        assert!(
            leads.holds("int-1~Contact~a%2Fb", "a/b"),
            "ids escaped alike"
        );
        assert!(
            !AnothersOwn::new("int-1", "Contact").holds("int-1~Contact~ACME~2", "2"),
            "record `ACME~2`'s shard, holding record 2 merged in"
        );
    }

    #[test]
    fn a_merged_record_whose_key_changed_lands_in_the_shard_that_links_it() {
        let mapping = contacts(true, true);
        let (stored, _) = plan(
            &mapping,
            vec![
                record("1", "Ann", Some("ann@x.test")),
                record("9", "Ann S.", Some("ann@x.test")),
            ],
            &[],
        );
        assert_eq!(stored.len(), 1);
        // Only the merged record is listed, with an email no shard has; and a new one.
        let page = transform_page(
            "int-1",
            &mapping,
            vec![
                record("9", "Ann S.", Some("ann@home.test")),
                record("5", "Eve", Some("eve@x.test")),
            ],
        );
        assert_eq!(
            link_lookups("int-1", &mapping, &page.records, &Loaded::default()),
            ["9", "5"]
        );
        let mut loaded = Loaded::default();
        loaded.insert(stored[0].clone());
        assert_eq!(
            link_lookups("int-1", &mapping, &page.records, &loaded),
            ["5"],
            "a record a shard read links to is not looked for"
        );
        assert_eq!(
            link_lookups("int-2", &mapping, &page.records, &loaded),
            ["9", "5"],
            "only the integration's own links count"
        );

        let (writes, tally) = plan(
            &mapping,
            vec![record("9", "Ann S.", Some("ann@home.test"))],
            &stored,
        );
        assert_eq!((tally.created, tally.updated), (0, 1), "{tally:?}");
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].id, "int-1~Contact~1");
        assert_eq!(writes[0].structured_data["email"], "ann@home.test");
    }

    #[test]
    fn a_key_a_shard_gave_up_earlier_in_the_page_merges_no_later_record_into_it() {
        let mapping = contacts(true, true);
        let (stored, _) = plan(&mapping, vec![record("1", "Ann", Some("ann@x.test"))], &[]);
        // Ann took a new email, and Bo was given her old one.
        let (writes, tally) = plan(
            &mapping,
            vec![
                record("1", "Ann", Some("ann@y.test")),
                record("2", "Bo", Some("ann@x.test")),
            ],
            &stored,
        );
        assert_eq!((tally.created, tally.updated), (1, 1), "{tally:?}");
        let bo = writes
            .iter()
            .find(|s| s.name == "Bo")
            .expect("a shard of his own");
        assert_eq!(bo.id, "int-1~Contact~2");
    }

    #[test]
    fn of_two_shards_linking_a_record_the_one_whose_link_is_synced_holds_it() {
        let mapping = contacts(true, true);
        let (made, _) = plan(&mapping, vec![record("7", "Old", Some("a@x.test"))], &[]);
        // Two shards link record 7: the one whose link is synced holds it, whatever their ids.
        let mut left = made[0].clone();
        left.id = "castiel-0".into();
        left.external_relationships[0].sync_status = RelationshipStatus::Deleted;
        let mut other = made[0].clone();
        other.id = "castiel-2".into();
        for stored in [
            vec![left.clone(), other.clone()],
            vec![other.clone(), left.clone()],
        ] {
            let (writes, _) = plan(
                &mapping,
                vec![record("7", "New", Some("b@x.test"))],
                &stored,
            );
            assert_eq!(writes[0].id, "castiel-2");
        }
        // Both synced: the first by id.
        let mut first = other.clone();
        first.id = "castiel-1".into();
        let (writes, _) = plan(
            &mapping,
            vec![record("7", "New", Some("b@x.test"))],
            &[other, first],
        );
        assert_eq!(writes[0].id, "castiel-1");
    }

    #[test]
    fn a_page_landed_in_parts_writes_what_the_whole_page_writes_and_counts_the_same() {
        let mapping = contacts(true, true);
        let records = vec![
            record("1", "Ann", Some("ann@x.test")),
            record("2", "Bo", Some("bo@x.test")),
            // The second part: a duplicate of Ann, and Cy.
            record("3", "Ann S.", Some("ann@x.test")),
            record("4", "Cy", Some("cy@x.test")),
        ];
        let (whole, whole_tally) = plan(&mapping, records.clone(), &[]);

        let context = context(&mapping);
        let mut page = transform_page("int-1", &mapping, records);
        let mut landing = Landing::new(context, &page.records, Loaded::default(), None);
        let (first, second) = page.records.split_at_mut(2);
        let mut written: Vec<Shard> = landing.land(first).into_iter().cloned().collect();
        let again: Vec<Shard> = landing.land(second).into_iter().cloned().collect();
        let ids = |shards: &[Shard]| shards.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&written), ["int-1~Contact~1", "int-1~Contact~2"]);
        assert_eq!(
            ids(&again),
            ["int-1~Contact~1", "int-1~Contact~4"],
            "Ann's shard again, as the duplicate changed it"
        );
        written.retain(|s| !again.iter().any(|a| a.id == s.id));
        written.extend(again);
        written.sort_by(|a, b| a.id.cmp(&b.id));
        assert_eq!(
            written, whole,
            "each shard's last version is the whole page's"
        );

        let mut landed = landing.finish(&page.records);
        let changes = changes_written(&mut landed);
        let mut tally = tally(&landed.landed, &changes, &Written::default(), true);
        tally.skipped += landed.skipped;
        assert_eq!(tally, whole_tally);
        assert_eq!((tally.created, tally.updated), (3, 1));
    }

    #[test]
    fn without_create_new_an_unmatched_record_is_skipped_and_a_bad_one_fails_alone() {
        let mapping: EntityMapping = serde_json::from_value(json!({
            "externalEntity": "Contact", "shardTypeId": "c_contact", "createNew": false,
            "fieldMappings": [{"source": "Email", "target": "email", "required": true}]
        }))
        .unwrap();
        let (writes, tally) = plan(
            &mapping,
            vec![
                record("1", "Ann", Some("ann@x.test")),
                record("2", "Bob", None),
            ],
            &[],
        );
        assert!(writes.is_empty());
        assert_eq!(tally.skipped, 1);
        assert_eq!(tally.failed.len(), 1);
        assert_eq!(tally.failed[0].record_id.as_deref(), Some("2"));
        assert_eq!(tally.failed[0].field.as_deref(), Some("Email"));
    }

    /// A page of two new contacts, landed, and what it writes.
    fn two_new_contacts() -> (Landed, Changes) {
        let mapping = contacts(false, true);
        let context = context(&mapping);
        let mut page = transform_page(
            "int-1",
            &mapping,
            vec![record("1", "Ann", None), record("2", "Bob", None)],
        );
        let mut landed = land_page(&context, &mut page.records, Loaded::default(), None);
        let changes = changes(&mut landed, Vec::new(), now());
        (landed, changes)
    }

    #[test]
    fn a_record_whose_shard_was_not_written_fails_with_the_store() {
        let (landed, changes) = two_new_contacts();
        let refused = Written {
            refused: vec!["int-1~Contact~2".to_string()],
            raced: Vec::new(),
        };
        let tally = tally(&landed.landed, &changes, &refused, false);
        assert_eq!(tally.created, 1);
        assert_eq!(tally.failed[0].code, FailureCode::Store);
        assert_eq!(tally.failed[0].record_id.as_deref(), Some("2"));
    }

    #[test]
    fn a_record_whose_shard_was_written_meanwhile_is_left_to_land_again_and_fails_on_the_last_try()
    {
        let (landed, changes) = two_new_contacts();
        let raced = Written {
            refused: Vec::new(),
            raced: vec!["int-1~Contact~2".to_string()],
        };

        let again = tally(&landed.landed, &changes, &raced, false);
        assert_eq!((again.created, again.updated, again.skipped), (1, 0, 0));
        assert!(
            again.failed.is_empty(),
            "it lands again: {:?}",
            again.failed
        );

        let last = tally(&landed.landed, &changes, &raced, true);
        assert_eq!(last.created, 1);
        assert_eq!(last.failed[0].record_id.as_deref(), Some("2"));
        assert!(
            last.failed[0].message.contains("something else wrote it"),
            "{}",
            last.failed[0].message
        );
    }

    /// Lands `records` in the two-way shards `stored` under `policy`.
    fn land_two_way(records: Vec<Record>, stored: &[Shard], policy: &ConflictPolicy) -> Landed {
        let mapping = contacts(false, true);
        let context = context(&mapping);
        let mut page = transform_page("int-1", &mapping, records);
        let mut loaded = Loaded::default();
        for shard in stored {
            loaded.insert(shard.clone());
        }
        land_page(&context, &mut page.records, loaded, Some(policy))
    }

    fn modified(mut r: Record, at: &str) -> Record {
        r.modified_at = Some(at.parse().unwrap());
        r
    }

    #[test]
    fn a_two_way_shard_keeps_castiel_edits_takes_provider_edits_and_settles_conflicts() {
        let policy = ConflictPolicy {
            strategy: crate::model::conflict::Strategy::Manual,
            ..ConflictPolicy::default()
        };
        let first = land_two_way(vec![record("1", "Ann", Some("ann@x.test"))], &[], &policy);
        let mut shard = first.shards.values().next().unwrap().clone();
        let r = &shard.external_relationships[0];
        assert_eq!(r.sync_direction, SyncDirection::Bidirectional);
        assert_eq!(r.field_hashes["name"], value_hash(Some(&json!("Ann"))));

        // Castiel renames her; Salesforce changes her email.
        shard.structured_data["name"] = json!("Ann Lee");
        shard.updated_at = Some("2026-11-22T09:00:00Z".parse().unwrap());
        let landed = land_two_way(
            vec![modified(
                record("1", "Ann", Some("ann@lee.test")),
                "2026-11-22T09:30:00Z",
            )],
            std::slice::from_ref(&shard),
            &policy,
        );
        let after = &landed.shards[&shard.id];
        assert_eq!(
            after.structured_data["name"], "Ann Lee",
            "Castiel's edit is kept"
        );
        assert_eq!(
            after.structured_data["email"], "ann@lee.test",
            "the provider's is taken"
        );
        assert!(landed.conflicts.is_empty());
        assert_eq!(
            landed.to_provider,
            [(shard.id.clone(), vec!["name".to_string()])]
        );
        let bases = &after.external_relationships[0].field_hashes;
        assert_eq!(bases["email"], value_hash(Some(&json!("ann@lee.test"))));
        assert_eq!(
            bases["name"],
            value_hash(Some(&json!("Ann"))),
            "not agreed until written"
        );

        // Both sides change the name: under `manual` neither value is overwritten.
        let landed = land_two_way(
            vec![modified(
                record("1", "Annie", Some("ann@lee.test")),
                "2026-11-22T10:00:00Z",
            )],
            std::slice::from_ref(after),
            &policy,
        );
        let conflicted = &landed.shards[&shard.id];
        assert_eq!(conflicted.structured_data["name"], "Ann Lee");
        let found = &landed.conflicts[0];
        assert_eq!(found.fields[0].field, "name");
        assert_eq!(found.fields[0].winner, None);
        assert_eq!(
            (&found.castiel["name"], &found.provider["name"]),
            (&json!("Ann Lee"), &json!("Annie"))
        );
        assert!(landed.to_provider.is_empty());
        assert_eq!(
            conflicted.external_relationships[0].field_hashes["name"],
            value_hash(Some(&json!("Ann"))),
            "a conflict waiting for an operator keeps the last agreed value"
        );
    }

    #[test]
    fn a_record_created_by_write_back_lands_in_the_shard_it_came_from_and_nowhere_else() {
        let mut mapping = contacts(false, true);
        mapping.idempotency_field = Some("Castiel_Id__c".into());
        let context = context(&mapping);
        let mut castiel_made: Shard = serde_json::from_value(json!({
            "id": "shard-ann", "tenantId": "t1", "shardTypeId": "c_contact", "name": "Ann",
            "structuredData": {"name": "Ann", "email": "ann@x.test"}
        }))
        .unwrap();
        castiel_made.content_hash = Some(content_hash(&castiel_made));
        let mut claimed = record("003A", "Ann", Some("ann@x.test"));
        claimed
            .fields
            .insert("Castiel_Id__c".into(), json!("shard-ann"));
        let mut forged = record("003B", "Mallory", None);
        forged.fields.insert("Castiel_Id__c".into(), json!("int-1"));
        let mut page = transform_page("int-1", &mapping, vec![claimed, forged]);
        let mut loaded = Loaded::default();
        loaded.insert(castiel_made);
        loaded.insert(
            serde_json::from_value(json!({
                "id": "int-1", "tenantId": "t1", "shardTypeId": "c_integration",
                "structuredData": {"providerName": "salesforce"}
            }))
            .unwrap(),
        );
        let landed = land_page(&context, &mut page.records, loaded, None);
        assert_eq!(
            landed.landed,
            [
                ("003A".to_string(), "shard-ann".to_string()),
                ("003B".to_string(), "int-1~Contact~003B".to_string())
            ],
            "a record cannot claim a shard of another type"
        );
        assert_eq!(
            landed.shards["int-1"].structured_data,
            json!({"providerName": "salesforce"})
        );
    }

    #[test]
    fn a_deleted_record_soft_deletes_its_shard_once() {
        let mapping = contacts(false, true);
        let (stored, _) = plan(&mapping, vec![record("1", "Ann", None)], &[]);
        let deleted = soft_deleted(stored[0].clone(), "int-1", "1", None, now()).unwrap();
        assert_eq!(deleted.deleted_at, Some(now()));
        assert_eq!(
            deleted.external_relationships[0].sync_status,
            RelationshipStatus::Deleted
        );
        assert_ne!(deleted.content_hash, stored[0].content_hash);
        assert!(soft_deleted(deleted, "int-1", "1", None, now()).is_none());
    }

    #[test]
    fn a_merged_shard_lives_until_the_last_of_its_records_is_deleted() {
        let mapping = contacts(true, true);
        let (stored, _) = plan(
            &mapping,
            vec![
                record("1", "Ann", Some("ann@x.test")),
                record("2", "Ann Smith", Some("ann@x.test")),
            ],
            &[],
        );
        assert_eq!(stored.len(), 1, "merged into one shard");

        let first_gone = soft_deleted(stored[0].clone(), "int-1", "1", None, now()).unwrap();
        assert_eq!(first_gone.deleted_at, None, "record 2 still lives");
        let statuses = |shard: &Shard| -> Vec<RelationshipStatus> {
            shard
                .external_relationships
                .iter()
                .map(|r| r.sync_status)
                .collect()
        };
        assert_eq!(
            statuses(&first_gone),
            [RelationshipStatus::Deleted, RelationshipStatus::Synced]
        );
        assert_ne!(first_gone.content_hash, stored[0].content_hash);
        assert!(
            soft_deleted(first_gone.clone(), "int-1", "1", None, now()).is_none(),
            "told twice, the shard is written once"
        );

        let both_gone = soft_deleted(first_gone, "int-1", "2", None, now()).unwrap();
        assert_eq!(both_gone.deleted_at, Some(now()));
        assert_eq!(statuses(&both_gone), [RelationshipStatus::Deleted; 2]);
    }

    fn at(time: &str) -> Option<DateTime<Utc>> {
        Some(time.parse().unwrap())
    }

    #[test]
    fn a_record_older_than_the_version_its_shard_was_written_from_is_skipped() {
        let mapping = contacts(false, true);
        let ann = |name: &str, modified_at: Option<DateTime<Utc>>| Record {
            modified_at,
            ..record("1", name, None)
        };
        let (written, _) = plan(
            &mapping,
            vec![ann("Ann B", at("2026-11-21T00:00:00Z"))],
            &[],
        );
        assert_eq!(
            written[0].external_relationships[0].record_modified_at,
            at("2026-11-21T00:00:00Z")
        );

        // An earlier export read again: its older values do not overwrite the newer ones.
        let older = || vec![ann("Ann A", at("2026-11-20T00:00:00Z"))];
        let (writes, tally) = plan(&mapping, older(), &written);
        assert!(writes.is_empty(), "{writes:?}");
        assert_eq!((tally.updated, tally.skipped), (0, 1));
        assert_eq!(
            unchanged_of(&mapping, older(), &written),
            [true],
            "told from the fingerprint, without reading the shard"
        );

        // The same time, a later one, or none at all: the record lands.
        for modified_at in [at("2026-11-21T00:00:00Z"), at("2026-11-22T00:00:00Z"), None] {
            let (writes, tally) = plan(&mapping, vec![ann("Ann C", modified_at)], &written);
            assert_eq!((writes.len(), tally.updated), (1, 1), "{modified_at:?}");
            assert_eq!(writes[0].name, "Ann C");
        }

        // A two-way link weighs provider and Castiel edits by its own rules.
        let mut two_way = written[0].external_relationships[0].clone();
        two_way.sync_direction = SyncDirection::Bidirectional;
        assert!(!is_stale(&two_way, at("2026-11-20T00:00:00Z")));

        // A provider that serves each record as it is now: its time, gone back (an environment
        // restored from a backup), is still what the provider holds.
        let api = PageContext {
            skips_older_versions: false,
            ..context(&mapping)
        };
        let (written, _) = plan_in(api, vec![ann("Ann B", at("2026-11-21T00:00:00Z"))], &[]);
        assert_eq!(
            written[0].external_relationships[0].record_modified_at,
            None
        );
        let (writes, _) = plan_in(api, older(), &written);
        assert_eq!(writes[0].name, "Ann A");
    }

    #[test]
    fn an_older_tombstone_deletes_nothing_and_an_older_record_does_not_revive_a_deleted_shard() {
        let mapping = contacts(false, true);
        let live = |modified_at: Option<DateTime<Utc>>| Record {
            modified_at,
            ..record("1", "Ann", None)
        };
        let (written, _) = plan(&mapping, vec![live(at("2026-11-21T00:00:00Z"))], &[]);
        let tombstone =
            |modified_at| soft_deleted(written[0].clone(), "int-1", "1", modified_at, now());
        assert!(
            tombstone(at("2026-11-20T00:00:00Z")).is_none(),
            "a tombstone older than the record the shard holds"
        );
        let deleted = tombstone(at("2026-11-22T00:00:00Z")).unwrap();
        assert_eq!(
            deleted.external_relationships[0].record_modified_at,
            at("2026-11-22T00:00:00Z")
        );
        assert_eq!(
            tombstone(None).unwrap().external_relationships[0].record_modified_at,
            at("2026-11-21T00:00:00Z"),
            "a tombstone that says nothing of when keeps the last version's time"
        );

        let deleted = [deleted];
        let (writes, tally) = plan(&mapping, vec![live(at("2026-11-21T00:00:00Z"))], &deleted);
        assert!(writes.is_empty(), "{writes:?}");
        assert_eq!(tally.skipped, 1);
        assert_eq!(
            unchanged_of(&mapping, vec![live(at("2026-11-21T00:00:00Z"))], &deleted),
            [true]
        );
        let (writes, _) = plan(&mapping, vec![live(at("2026-11-23T00:00:00Z"))], &deleted);
        assert_eq!(writes.len(), 1);
        assert_eq!(
            writes[0].deleted_at, None,
            "a record newer than its tombstone lives again"
        );
    }

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
            let own = landed_data(Some(&rules), true, stored.clone(), record);
            assert_eq!(
                Value::Object(own),
                json!({"name": "New Name", "email": "a@x.test", "phone": null, "note": "kept"}),
                "{merge:?}"
            );
            let other = landed_data(Some(&rules), false, stored.clone(), record);
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
        a.external_relationships.push(ExternalRelationship::synced(
            "i",
            "1",
            SyncDirection::Inbound,
            Utc::now(),
        ));
        let with_link = content_hash(&a);
        assert_ne!(before, with_link);
        a.external_relationships[0].last_synced_at = None;
        assert_eq!(content_hash(&a), with_link, "sync times are not content");
        a.structured_data["email"] = json!("ann@y.test");
        assert_ne!(content_hash(&a), with_link);
    }

    /// Fingerprints are stored on every synced shard: the streamed hash must be the one the
    /// canonical text has always had, or an upgrade would rewrite every shard once.
    #[test]
    fn the_content_hash_is_fnv_1a_of_the_canonical_text() {
        let mut shard: Shard = serde_json::from_value(json!({
            "id": "s", "tenantId": "t", "shardTypeId": "c_contact", "name": "Ann \"A\" Ó",
            "structuredData": {"z": [1, 2.5, null], "email": "ann@x.test", "nested": {"b": true, "a": "\n"}},
            "relationships": [{"type": "derived_from", "targetId": "p", "targetType": "c_company"}]
        }))
        .unwrap();
        let mut link = ExternalRelationship::synced("i", "1", SyncDirection::Bidirectional, now());
        link.field_hashes.insert("email".into(), "abc".into());
        shard.external_relationships.push(link);
        shard
            .external_relationships
            .push(ExternalRelationship::synced(
                "j",
                "2",
                SyncDirection::Inbound,
                now(),
            ));
        shard.deleted_at = Some(now());
        let text = json!([
            "c_contact",
            "Ann \"A\" Ó",
            shard.structured_data,
            [{"targetId": "p", "targetType": "c_company", "type": "derived_from"}],
            [["i", "1", "synced", {"email": "abc"}], ["j", "2", "synced"]],
            true
        ])
        .to_string();
        let mut expected: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            expected ^= u64::from(byte);
            expected = expected.wrapping_mul(0x0000_0100_0000_01b3);
        }
        assert_eq!(content_hash(&shard), format!("{expected:016x}"));
    }

    /// Which records of `records` the fingerprints of `stored` (the shards as written) say
    /// are unchanged.
    fn unchanged_of(mapping: &EntityMapping, records: Vec<Record>, stored: &[Shard]) -> Vec<bool> {
        let page = transform_page("int-1", mapping, records);
        let fingerprints: Vec<Option<ShardFingerprint>> = page
            .records
            .iter()
            .map(|r| {
                stored
                    .iter()
                    .find(|s| s.id == r.shard_id)
                    .map(ShardFingerprint::of)
            })
            .collect();
        unchanged("int-1", &page.records, &fingerprints)
    }

    #[test]
    fn a_record_that_reads_as_its_shard_was_written_is_known_unchanged_from_its_fingerprint() {
        let mapping = contacts(false, true);
        let ann = || record("1", "Ann", Some("ann@x.test"));
        let (written, _) = plan(&mapping, vec![ann(), record("2", "Bo", None)], &[]);
        let link = &written[0].external_relationships[0];
        assert!(
            link.record_hash.is_some(),
            "a one-way landing keeps the record's fingerprint"
        );
        assert_eq!(link.last_synced_at, written[0].updated_at);

        assert_eq!(
            unchanged_of(
                &mapping,
                vec![ann(), record("2", "Bo", Some("bo@x.test"))],
                &written
            ),
            [true, false],
            "the same data again, then a changed email"
        );
        assert_eq!(
            unchanged_of(&mapping, vec![record("3", "Cy", None)], &written),
            [false]
        );

        // Written since by someone else, deleted, or synced before records had fingerprints:
        // the record lands whole.
        let mut touched = written.clone();
        touched[0].updated_at = Some(now() + chrono::Duration::seconds(1));
        assert_eq!(unchanged_of(&mapping, vec![ann()], &touched), [false]);
        let mut deleted = written.clone();
        deleted[0].deleted_at = Some(now());
        assert_eq!(unchanged_of(&mapping, vec![ann()], &deleted), [false]);
        let mut older = written.clone();
        older[0].external_relationships[0].record_hash = None;
        older[0].content_hash = Some(content_hash(&older[0]));
        assert_eq!(unchanged_of(&mapping, vec![ann()], &older), [false]);
        let (rewritten, tally) = plan(&mapping, vec![ann()], &older);
        assert_eq!(
            (rewritten.len(), tally.updated),
            (1, 1),
            "a shard synced before fingerprints were kept is written once more, with one"
        );
    }

    #[test]
    fn how_long_a_record_is_listed_goes_on_its_link_and_a_change_of_it_is_written() {
        let mapping = contacts(false, true);
        let until = |days: i64| Some(now() + chrono::Duration::days(days));
        let ann = |listed_until| Record {
            listed_until,
            ..record("1", "Ann", Some("ann@x.test"))
        };
        let (written, _) = plan(&mapping, vec![ann(until(3))], &[]);
        assert_eq!(written[0].external_relationships[0].listed_until, until(3));
        assert_eq!(
            unchanged_of(&mapping, vec![ann(until(3))], &written),
            [true]
        );

        // A shard written before the provider said, or a meeting moved: the same data, a new time.
        assert_eq!(
            unchanged_of(&mapping, vec![ann(until(5))], &written),
            [false]
        );
        let (rewritten, tally) = plan(&mapping, vec![ann(until(5))], &written);
        assert_eq!((rewritten.len(), tally.updated), (1, 1));
        assert_eq!(
            rewritten[0].external_relationships[0].listed_until,
            until(5)
        );
    }

    #[test]
    fn a_record_listed_and_deleted_in_one_page_is_what_its_last_listing_says() {
        let mapping = contacts(false, true);
        let gone = |id: &str| Record {
            deleted: true,
            fields: Map::new(),
            ..record(id, "", None)
        };
        let page = transform_page(
            "int-1",
            &mapping,
            vec![
                record("1", "Ann", None),
                gone("2"),
                gone("1"),
                record("2", "Bo", None),
                record("3", "Cy", None),
                gone("4"),
            ],
        );
        let live: Vec<&str> = page.records.iter().map(|r| r.record.id.as_str()).collect();
        assert_eq!(live, ["2", "3"], "listed again after its tombstone: live");
        let deleted: Vec<&str> = page.deleted.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            deleted,
            ["1", "4"],
            "a tombstone after its listing: deleted"
        );
    }

    #[test]
    fn of_two_listings_of_a_record_in_a_page_the_newer_counts_whatever_their_order() {
        let mapping = contacts(false, true);
        let listing = |name: &str, time: &str| Record {
            modified_at: at(time),
            ..record("1", name, None)
        };
        let newer = || listing("Ann B", "2026-11-21T00:00:00Z");
        let older = || listing("Ann A", "2026-11-20T00:00:00Z");
        for records in [vec![newer(), older()], vec![older(), newer()]] {
            let page = transform_page("int-1", &mapping, records);
            assert_eq!(page.records.len(), 1);
            assert_eq!(page.records[0].data["name"], "Ann B");
            assert_eq!(page.superseded, 1);
        }

        let tombstone = Record {
            modified_at: at("2026-11-20T00:00:00Z"),
            ..Record::gone("1".into())
        };
        let page = transform_page("int-1", &mapping, vec![newer(), tombstone.clone()]);
        assert!(
            page.deleted.is_empty(),
            "an older tombstone after the record"
        );
        assert_eq!(page.records.len(), 1);
        let page = transform_page("int-1", &mapping, vec![older(), tombstone]);
        assert!(
            page.records.is_empty(),
            "a tombstone as new as the record, after it"
        );
        assert_eq!(page.deleted.len(), 1);
    }

    /// Contacts whose one mapped field, their name, is required.
    fn name_required() -> EntityMapping {
        serde_json::from_value(json!({
            "externalEntity": "Contact", "shardTypeId": "c_contact", "nameField": "name",
            "fieldMappings": [{"source": "Name", "target": "name", "required": true}]
        }))
        .unwrap()
    }

    #[test]
    fn a_listing_a_later_one_supersedes_neither_lands_nor_fails() {
        let mapping = name_required();
        let page = transform_page(
            "int-1",
            &mapping,
            vec![
                record("1", "Ann", None),
                record("2", "", None),
                record("3", "Cy", None),
                record("2", "Bo", None),
                record("1", "Ann Lee", None),
            ],
        );
        let landing: Vec<(&str, &Value)> = page
            .records
            .iter()
            .map(|r| (r.record.id.as_str(), &r.data["name"]))
            .collect();
        assert_eq!(
            landing,
            [
                ("3", &json!("Cy")),
                ("2", &json!("Bo")),
                ("1", &json!("Ann Lee"))
            ]
        );
        assert!(page.failed.is_empty(), "{:?}", page.failed);
        assert_eq!(page.superseded, 2);
    }

    #[test]
    fn a_record_listed_again_later_in_the_run_drops_its_earlier_failure() {
        let mapping = name_required();
        let failure = |record_id: Option<&str>| SyncError {
            code: "VALIDATION_ERROR".into(),
            message: "`Name` is required".into(),
            entity: Some("Contact".into()),
            record_id: record_id.map(str::to_string),
            shard_id: None,
            field: Some("Name".into()),
            timestamp: Utc::now(),
            retryable: false,
        };
        // Failed on earlier pages: 1 (now mended), 2 (now deleted), 3 (failing again), 4 (not
        // listed again), and a failure of no one record.
        let mut errors = vec![
            failure(Some("1")),
            failure(Some("2")),
            failure(Some("3")),
            failure(Some("4")),
            failure(None),
        ];
        let mut deleted = record("2", "", None);
        deleted.deleted = true;
        let page = transform_page(
            "int-1",
            &mapping,
            vec![record("1", "Ann", None), deleted, record("3", "", None)],
        );
        assert_eq!(page.failed.len(), 1);

        assert_eq!(forget_relisted(&mut errors, &page), 3);
        let left: Vec<Option<&str>> = errors.iter().map(|e| e.record_id.as_deref()).collect();
        assert_eq!(left, [Some("4"), None]);

        // A page that lists none of the failed records leaves the errors be.
        let page = transform_page("int-1", &mapping, vec![record("5", "Eve", None)]);
        assert_eq!(forget_relisted(&mut errors, &page), 0);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn only_one_way_mappings_without_derived_shards_skip_on_fingerprints() {
        let mapping = contacts(true, true);
        assert!(skips_by_fingerprint(&mapping, false));
        assert!(!skips_by_fingerprint(&mapping, true));
        let mut derived: serde_json::Value = serde_json::to_value(&mapping).unwrap();
        derived["derivedShards"] = json!([{"shardTypeId": "c_profile",
            "fieldMappings": [{"source": "Name", "target": "name"}]}]);
        let derived: EntityMapping = serde_json::from_value(derived).unwrap();
        assert!(!skips_by_fingerprint(&derived, false));
    }
}
