//! The shard store: where Castiel's documents live.
//!
//! In Azure that is a Cosmos DB container partitioned by `/tenantId`; on one machine it is
//! [`SqliteStore`]. The trait is shaped by what Cosmos does well: point reads and writes by
//! (tenant, id), optimistic concurrency through etags, and a small family of parameterized
//! queries. Anything the engine needs must be expressible that way.

mod cosmos;
mod document;
mod sqlite;

pub(crate) use sqlite::open_database as sqlite_open;

pub use cosmos::{CosmosStore, Provisioning, cosmos_sql};
pub use sqlite::{SqliteStore, restrict_to_owner};

use std::collections::HashMap;

use async_trait::async_trait;
use serde_json::Value;

use crate::model::Shard;
use crate::model::shard::ExternalRelationship;

/// A document with the etag it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub etag: String,
}

/// One shard of a write of many, with the etag it was read at if it existed then. A sync
/// decides a shard from what it read: if something else wrote the shard since (a Castiel
/// user, another integration's sync, a write-back's outcome), writing the decision over it
/// would undo that write. So the store leaves such a shard as it is and says so
/// ([`Written::raced`]), for the sync to read it again and decide anew. A shard that did not
/// exist when read has no etag and is written whatever is there: its id is the record's own,
/// which only this integration's syncs write. So is a derived shard, which is its record's
/// alone and rewritten whole.
#[derive(Debug, Clone, Copy)]
pub struct Upsert<'a> {
    pub shard: &'a Shard,
    pub if_match: Option<&'a str>,
}

impl<'a> Upsert<'a> {
    /// A write of `shard` whatever is stored.
    pub fn any(shard: &'a Shard) -> Self {
        Self {
            shard,
            if_match: None,
        }
    }

    /// Writes of each of `shards` whatever is stored.
    pub fn every(shards: &'a [Shard]) -> Vec<Self> {
        shards.iter().map(Self::any).collect()
    }
}

/// The shards a write of many left unwritten, by id; the others are written.
#[derive(Debug, Default, PartialEq)]
pub struct Written {
    /// Refused for what they are (too large, malformed): trying again cannot help.
    pub refused: Vec<String>,
    /// No longer at the etag they were read at ([`Upsert::if_match`]): written by something
    /// else since, or by an earlier try of this same write. Left as they are.
    pub raced: Vec<String>,
}

impl Written {
    /// Whether every shard was written.
    pub fn is_empty(&self) -> bool {
        self.refused.is_empty() && self.raced.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `create` of an id that exists.
    #[error("a shard with this id already exists")]
    Conflict,
    /// `replace` with an etag that is no longer current: someone else wrote first.
    #[error("the shard changed since it was read")]
    PreconditionFailed,
    /// The store could not be reached or was busy; trying again later can help.
    #[error("shard store unavailable: {0}")]
    Unavailable(String),
    /// The database or container the store was pointed at does not exist, and this app may
    /// not create it (it reaches Cosmos DB through Entra, whose data-plane roles cannot).
    #[error("{0}")]
    NotProvisioned(String),
    /// The store refused this one document (too large, malformed); trying again cannot help.
    #[error("the shard store refused the document: {0}")]
    Refused(String),
    /// A stored document could not be read back.
    #[error("stored shard is unreadable: {0}")]
    Corrupt(String),
}

/// What a sync needs of a stored shard to tell that a record would not change it: when it
/// was last written, whether it is deleted, and its links to external records. Read without
/// the shard's data, which is most of its size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardFingerprint {
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    pub deleted: bool,
    pub links: Vec<ExternalRelationship>,
}

impl ShardFingerprint {
    pub fn of(shard: &Shard) -> Self {
        Self {
            updated_at: shard.updated_at,
            deleted: shard.deleted_at.is_some(),
            links: shard.external_relationships.clone(),
        }
    }
}

/// The ids one page of [`ShardStore::fingerprints_by_prefix`] reads: from the prefix, or above
/// the id the page follows, to where the prefix ends, so that a store reads a range of its
/// index of ids. A prefix may have no end ([`prefix_end`]): a store then stops at the first id
/// that does not begin with it, as it may anyway.
pub struct IdRange {
    pub from: String,
    /// `>=` when the range starts at the prefix, `>` when it starts above the id a page follows.
    pub from_op: &'static str,
    pub end: Option<String>,
}

impl IdRange {
    pub fn of(prefix: &str, after: Option<&str>) -> Self {
        let (from, from_op) = match after {
            Some(after) if after >= prefix => (after, ">"),
            _ => (prefix, ">="),
        };
        Self {
            from: from.to_string(),
            from_op,
            end: prefix_end(prefix),
        }
    }
}

/// The least string above every string that begins with `prefix` (its last character moved
/// one up), so that `prefix <= id < end` is a range scan of an index of ids. `None` when there
/// is none: an empty prefix, or one ending in the last character.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut end = prefix.to_string();
    let last = end.pop()?;
    // Code points, and so their UTF-8 bytes, sort alike; the surrogates are not characters.
    let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32)?;
    end.push(next);
    Some(end)
}

/// A query over one shard type, optionally within one tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardQuery {
    pub tenant_id: Option<String>,
    pub shard_type_id: String,
    pub filters: Vec<Filter>,
    pub order_by: Option<OrderBy>,
    pub limit: Option<usize>,
    /// Only shards with an array element matching this (a shard synced from an external id, an
    /// integration holding a subscription).
    pub element: Option<ElementFilter>,
    /// Soft-deleted shards are left out unless asked for.
    pub include_deleted: bool,
}

/// `path op value`, where `path` is a dotted field path such as `structuredData.nextSyncAt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub path: FieldPath,
    pub op: Op,
    pub value: Value,
}

/// An array at `array` holding an object whose `field` equals one of `values`.
#[derive(Debug, Clone, PartialEq)]
pub struct ElementFilter {
    pub array: FieldPath,
    pub field: FieldPath,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Le,
    Ge,
    /// `value` is an array; the field equals one of its items.
    In,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderBy {
    pub path: FieldPath,
    pub descending: bool,
}

/// A dotted path of plain identifiers; the only thing a query may name, so paths can be
/// spliced into SQL and Cosmos SQL without injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(String);

impl FieldPath {
    pub fn new(path: &str) -> Result<Self, String> {
        let valid = !path.is_empty()
            && path.split('.').all(|segment| {
                let mut chars = segment.chars();
                chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
        if valid {
            Ok(Self(path.to_string()))
        } else {
            Err(format!("`{path}` is not a field path"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ShardQuery {
    pub fn of_type(shard_type_id: &str) -> Self {
        Self {
            shard_type_id: shard_type_id.to_string(),
            ..Self::default()
        }
    }

    pub fn in_tenant(mut self, tenant_id: &str) -> Self {
        self.tenant_id = Some(tenant_id.to_string());
        self
    }

    /// Adds a filter. Paths are written in code, so a bad one is a programming error.
    pub fn filter(mut self, path: &str, op: Op, value: Value) -> Self {
        let path = FieldPath::new(path).expect("query paths are valid identifiers");
        self.filters.push(Filter { path, op, value });
        self
    }

    pub fn order_by(mut self, path: &str, descending: bool) -> Self {
        let path = FieldPath::new(path).expect("query paths are valid identifiers");
        self.order_by = Some(OrderBy { path, descending });
        self
    }

    /// Only shards synced from this external id (by any integration).
    pub fn with_external_id(self, external_id: &str) -> Self {
        self.with_element("external_relationships", "externalId", external_id)
    }

    /// Only shards synced from one of these external ids (by any integration).
    pub fn with_external_ids(self, external_ids: Vec<String>) -> Self {
        self.with_element_in("external_relationships", "externalId", external_ids)
    }

    /// Only shards whose array at `array` holds an object whose `field` is `value`.
    pub fn with_element(self, array: &str, field: &str, value: &str) -> Self {
        self.with_element_in(array, field, vec![value.to_string()])
    }

    /// Only shards whose array at `array` holds an object whose `field` is one of `values`.
    pub fn with_element_in(mut self, array: &str, field: &str, values: Vec<String>) -> Self {
        let path = |p: &str| FieldPath::new(p).expect("query paths are valid identifiers");
        self.element = Some(ElementFilter {
            array: path(array),
            field: path(field),
            values,
        });
        self
    }

    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }
}

#[async_trait]
pub trait ShardStore: Send + Sync {
    /// Point read.
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError>;
    /// Creates the shard; [`StoreError::Conflict`] if its id exists.
    async fn create(&self, shard: &Shard) -> Result<String, StoreError>;
    /// Writes the shard whatever is there; returns the new etag.
    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError>;
    /// Writes the shard only if its current etag is `if_match`.
    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError>;
    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError>;

    /// Point reads of many ids of one tenant, in the order asked.
    async fn get_many(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Versioned<Shard>>>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.get(tenant_id, id).await?);
        }
        Ok(out)
    }

    /// The fingerprints of many shards of one tenant, in the order asked: one request, and
    /// none of the shards' data read.
    async fn fingerprints(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<ShardFingerprint>>, StoreError> {
        Ok(self
            .get_many(tenant_id, ids)
            .await?
            .into_iter()
            .map(|found| found.map(|v| ShardFingerprint::of(&v.value)))
            .collect())
    }

    /// The fingerprints of a tenant's live shards of one type whose ids begin with `prefix`
    /// (the shards synced from one entity), in id order: the first `limit` after the id
    /// `after`. What a reconciliation compares a complete listing with, a page at a time and
    /// none of the shards' data read, so that it holds a page of them however many there are.
    ///
    /// By default the shards of the type are read whole and picked here.
    async fn fingerprints_by_prefix(
        &self,
        tenant_id: &str,
        shard_type_id: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ShardFingerprint)>, StoreError> {
        let query = ShardQuery::of_type(shard_type_id).in_tenant(tenant_id);
        let mut found: Vec<(String, ShardFingerprint)> = self
            .query(&query)
            .await?
            .into_iter()
            .filter(|v| v.value.id.starts_with(prefix))
            .filter(|v| after.is_none_or(|after| v.value.id.as_str() > after))
            .map(|v| (v.value.id.clone(), ShardFingerprint::of(&v.value)))
            .collect();
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        found.truncate(limit);
        Ok(found)
    }

    /// A write of many shards handed over in parts, as they are decided: what
    /// [`ShardStore::upsert_many`] does with all of them, begun before the last is known. A
    /// shard handed over twice is written as it was the second time; it comes with the same
    /// etag to match each time (the one it was read at), and is left whole if that no longer
    /// matches. Nothing is promised written until [`Upserts::finish`]; dropped unfinished, the
    /// write may be abandoned.
    ///
    /// By default the parts are collected and written by `upsert_many` when the write
    /// finishes. A store whose writer can take rows while they are decided (the embedded
    /// store) writes each part as it comes, so a sync's planning and its writes overlap.
    fn upserts(&self) -> Box<dyn Upserts + '_> {
        Box::new(Collected {
            store: self,
            shards: Vec::new(),
            at: HashMap::default(),
        })
    }

    /// One shard of a write of many, alone: replaced under its etag if it has one, else
    /// upserted.
    async fn write_one(&self, write: &Upsert<'_>) -> Result<String, StoreError> {
        match write.if_match {
            Some(etag) => self.replace(write.shard, etag).await,
            None => self.upsert(write.shard).await,
        }
    }

    /// Writes many shards in as few requests as the store allows, each only if it still has
    /// the etag it was read at ([`Upsert`]). Returns the shards it did not write: those the
    /// store refused for what they are, each refused alone, and those written by someone else
    /// since they were read. Fails as a whole only when the store itself is failing, and then
    /// may have written some of them (the caller retries all: a shard it wrote no longer has
    /// its old etag, and comes back raced, to be read again).
    async fn upsert_many(&self, writes: &[Upsert<'_>]) -> Result<Written, StoreError> {
        let mut written = Written::default();
        for write in writes {
            match self.write_one(write).await {
                Ok(_) => {}
                Err(StoreError::Refused(_)) => written.refused.push(write.shard.id.clone()),
                Err(StoreError::PreconditionFailed) => written.raced.push(write.shard.id.clone()),
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}

/// A write of many shards begun before they are all known: see [`ShardStore::upserts`].
#[async_trait]
pub trait Upserts: Send {
    /// Hands over more shards to write. Fails when the store has stopped writing, and then the
    /// write has failed as a whole.
    async fn send(&mut self, writes: &[Upsert<'_>]) -> Result<(), StoreError>;

    /// Writes whatever is left and waits until every shard handed over is written or left
    /// ([`Written::raced`]). Returns, as
    /// [`ShardStore::upsert_many`] does, the shards it did not write; fails as a whole when the
    /// store itself is failing.
    async fn finish(self: Box<Self>) -> Result<Written, StoreError>;
}

/// The parts of a write collected, each shard once in its last version with the etag it was
/// first handed over with, for one [`ShardStore::upsert_many`] at the end.
struct Collected<'a, S: ?Sized> {
    store: &'a S,
    shards: Vec<(Shard, Option<String>)>,
    /// Where each shard handed over is in `shards`.
    at: HashMap<String, usize>,
}

#[async_trait]
impl<S: ShardStore + ?Sized> Upserts for Collected<'_, S> {
    async fn send(&mut self, writes: &[Upsert<'_>]) -> Result<(), StoreError> {
        for write in writes {
            match self.at.get(&write.shard.id) {
                Some(&i) => self.shards[i].0 = write.shard.clone(),
                None => {
                    self.at.insert(write.shard.id.clone(), self.shards.len());
                    self.shards
                        .push((write.shard.clone(), write.if_match.map(str::to_string)));
                }
            }
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<Written, StoreError> {
        if self.shards.is_empty() {
            return Ok(Written::default());
        }
        let writes: Vec<Upsert<'_>> = self
            .shards
            .iter()
            .map(|(shard, if_match)| Upsert {
                shard,
                if_match: if_match.as_deref(),
            })
            .collect();
        self.store.upsert_many(&writes).await
    }
}

#[cfg(test)]
mod tests {
    use super::{FieldPath, IdRange, prefix_end};

    #[test]
    fn a_prefix_ends_where_its_last_character_moves_one_up() {
        let end = prefix_end("int-1~Meeting~").unwrap();
        assert_eq!(end, "int-1~Meeting\u{7f}");
        for id in [
            "int-1~Meeting~",
            "int-1~Meeting~9",
            "int-1~Meeting~\u{10ffff}",
        ] {
            assert!("int-1~Meeting~" <= id && id < end.as_str(), "{id}");
        }
        for id in [
            "int-1~Meeting}",
            "int-1~Meeting\u{7f}",
            "int-1~Meetinh",
            "int-1~Meeting",
        ] {
            assert!(!("int-1~Meeting~" <= id && id < end.as_str()), "{id}");
        }
        assert_eq!(prefix_end("a\u{d7ff}").unwrap(), "a\u{e000}");
        assert_eq!(prefix_end(""), None);
        let page = IdRange::of("int-1~Meeting~", Some("int-1~Meeting~7"));
        assert_eq!((page.from.as_str(), page.from_op), ("int-1~Meeting~7", ">"));
        let first = IdRange::of("int-1~Meeting~", None);
        assert_eq!(
            (first.from.as_str(), first.from_op),
            ("int-1~Meeting~", ">=")
        );
        assert_eq!(first.end.as_deref(), Some("int-1~Meeting\u{7f}"));
        assert_eq!(prefix_end("a\u{10ffff}"), None);
    }

    #[test]
    fn field_paths_are_plain_identifiers() {
        assert!(FieldPath::new("structuredData.nextSyncAt").is_ok());
        assert!(FieldPath::new("a.b_c.d1").is_ok());
        for bad in ["", "a..b", "a.1b", "a'); drop", "a b", "$.a"] {
            assert!(FieldPath::new(bad).is_err(), "{bad}");
        }
    }
}
