//! The shard: Castiel's one document shape.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A Castiel document. Fields the engine does not interpret are kept in `extra` so that
/// reading and writing a shard never drops what another service put there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    pub id: String,
    pub tenant_id: String,
    pub shard_type_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub structured_data: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relationships: Vec<Relationship>,
    #[serde(
        default,
        rename = "external_relationships",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_relationships: Vec<ExternalRelationship>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
    /// The engine's fingerprint of what the shard says ([`content_hash`](crate::engine)): a
    /// record that reads the same is not written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// The match keys of the mapping's deduplication rules, by rule name, so that a later
    /// record with the same key finds this shard with one indexed query.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dedup_keys: BTreeMap<String, String>,
    /// Seconds from the last write until the document expires (Cosmos DB's per-item time to
    /// live; the embedded store honours it too). Set on sync history records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// Everything else another service put on the shard, kept as it was.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A link from one shard to another (`sync_of`, `derived_from`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Relationship {
    #[serde(rename = "type")]
    pub kind: String,
    pub target_id: String,
    pub target_type: String,
}

/// Where a synced shard came from in an external system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRelationship {
    pub integration_id: String,
    pub external_id: String,
    pub sync_status: RelationshipStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<DateTime<Utc>>,
    pub sync_direction: SyncDirection,
    /// The record's version at the provider when the two last agreed (a `SystemModstamp`, an
    /// `@odata.etag`), when the provider has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Per mapped field of a two-way shard, the fingerprint of the value both sides agreed on
    /// at the last sync ([`crate::model::conflict::value_hash`]): what tells a change made in
    /// Castiel from one made at the provider, and both from a conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_hashes: BTreeMap<String, String>,
}

impl ExternalRelationship {
    /// A link to a record just synced in from the provider.
    pub fn synced(
        integration_id: &str,
        external_id: &str,
        direction: SyncDirection,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            integration_id: integration_id.to_string(),
            external_id: external_id.to_string(),
            sync_status: RelationshipStatus::Synced,
            last_synced_at: Some(now),
            sync_direction: direction,
            version: None,
            field_hashes: BTreeMap::new(),
        }
    }
}

/// Where a shard stands with one external record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationshipStatus {
    /// The shard holds what the record held at the last sync.
    Synced,
    /// The record is gone at the provider; the shard is soft-deleted.
    Deleted,
}

impl RelationshipStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synced => "synced",
            Self::Deleted => "deleted",
        }
    }
}

/// Which way changes flow between a shard and its external record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncDirection {
    Inbound,
    Outbound,
    Bidirectional,
}

impl Shard {
    /// Reads `structuredData` as `T`.
    pub fn data<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.structured_data)
    }
}

/// Shard type ids the engine reads and writes.
pub mod types {
    pub const INTEGRATION: &str = "c_integration";
    pub const INTEGRATION_SYNC: &str = "c_integrationSync";
    pub const SYNC_CONFLICT: &str = "c_syncConflict";
}
