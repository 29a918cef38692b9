//! The shard: Castiel's one document shape.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::dedup::DedupKeys;
use super::timestamp;

/// A Castiel document. Fields the engine does not interpret are kept in `extra` so that
/// reading and writing a shard never drops what another service put there.
///
/// Reading is written by hand (see the `Deserialize` impl below): a derived reader with a
/// flattened `extra` would buffer every field of every document before reading it, and a
/// sync reads a page of stored shards for every page it fetches.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt"
    )]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt"
    )]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt"
    )]
    pub deleted_at: Option<DateTime<Utc>>,
    /// The engine's fingerprint of what the shard says ([`content_hash`](crate::engine)): a
    /// record that reads the same is not written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// The match keys of the mapping's deduplication rules, by rule name, so that a later
    /// record with the same key finds this shard with one indexed query.
    #[serde(default, skip_serializing_if = "DedupKeys::is_empty")]
    pub dedup_keys: DedupKeys,
    /// Seconds from the last write until the document expires (Cosmos DB's per-item time to
    /// live; the embedded store honours it too). Set on sync history records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// Everything else another service put on the shard, kept as it was.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ShardVisitor)
    }
}

struct ShardVisitor;

impl<'de> serde::de::Visitor<'de> for ShardVisitor {
    type Value = Shard;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a shard document")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Shard, A::Error> {
        use serde::de::Error;
        let mut shard = Shard::default();
        let (mut id, mut tenant, mut shard_type) = (false, false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "id" => (shard.id, id) = (map.next_value()?, true),
                "tenantId" => (shard.tenant_id, tenant) = (map.next_value()?, true),
                "shardTypeId" => (shard.shard_type_id, shard_type) = (map.next_value()?, true),
                "name" => shard.name = map.next_value()?,
                "structuredData" => shard.structured_data = map.next_value()?,
                "relationships" => shard.relationships = map.next_value()?,
                "external_relationships" => shard.external_relationships = map.next_value()?,
                "createdAt" => shard.created_at = map.next_value::<timestamp::Read>()?.0,
                "createdBy" => shard.created_by = map.next_value()?,
                "updatedAt" => shard.updated_at = map.next_value::<timestamp::Read>()?.0,
                "deletedAt" => shard.deleted_at = map.next_value::<timestamp::Read>()?.0,
                "contentHash" => shard.content_hash = map.next_value()?,
                "dedupKeys" => shard.dedup_keys = map.next_value()?,
                "ttl" => shard.ttl = map.next_value()?,
                _ => {
                    let value = map.next_value()?;
                    shard.extra.insert(key.into_owned(), value);
                }
            }
        }
        for (present, name) in [
            (id, "id"),
            (tenant, "tenantId"),
            (shard_type, "shardTypeId"),
        ] {
            if !present {
                return Err(A::Error::missing_field(name));
            }
        }
        Ok(shard)
    }
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt",
        deserialize_with = "timestamp::read_opt"
    )]
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
    /// For a one-way link, the fingerprint of the record's mapped data when the shard was last
    /// written from it: a record that reads the same, into a shard nobody wrote since, is
    /// skipped without reading the shard whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_hash: Option<String>,
    /// For a one-way link, when the record was last modified at the provider, as of the version
    /// the shard was last written from (or deleted by), if the provider says: a record read
    /// again that is older than that (an earlier export re-read, a page served late) is not
    /// applied over it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt",
        deserialize_with = "timestamp::read_opt"
    )]
    pub record_modified_at: Option<DateTime<Utc>>,
    /// Until when the provider's complete listings list the record while it holds it
    /// (`Record::listed_until`: a Zoom meeting, until it expires). A listing that leaves the
    /// record out after then says nothing of its deletion, so the shard is not reconciled away.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "timestamp::auto_opt",
        deserialize_with = "timestamp::read_opt"
    )]
    pub listed_until: Option<DateTime<Utc>>,
}

impl ExternalRelationship {
    /// Whether this is the link to record `external_id` of integration `integration_id`.
    pub fn is_to(&self, integration_id: &str, external_id: &str) -> bool {
        self.integration_id == integration_id && self.external_id == external_id
    }

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
            record_hash: None,
            record_modified_at: None,
            listed_until: None,
        }
    }
}

/// Where a shard stands with one external record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationshipStatus {
    /// The shard holds what the record held at the last sync.
    Synced,
    /// The record is gone at the provider. The shard is soft-deleted once none of the records
    /// it is linked to remains.
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

impl SyncDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
            Self::Bidirectional => "bidirectional",
        }
    }
}

impl Shard {
    /// Reads `structuredData` as `T`.
    pub fn data<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.structured_data)
    }

    /// The link Castiel's changes to the shard go back to `integration_id` through: the first
    /// synced link that syncs both ways (a record merged in one way, a lead into a contact, is
    /// another entity's), else the first synced one (a link from before the mapping wrote
    /// back, one-way until the record's next sync).
    pub fn write_back_link(&self, integration_id: &str) -> Option<usize> {
        let synced = |r: &ExternalRelationship| {
            r.integration_id == integration_id && r.sync_status == RelationshipStatus::Synced
        };
        self.external_relationships
            .iter()
            .position(|r| synced(r) && r.sync_direction == SyncDirection::Bidirectional)
            .or_else(|| self.external_relationships.iter().position(synced))
    }

    /// Whether the shard's record at `integration_id` was deleted at the provider (its link
    /// says so).
    pub fn lost_record_at(&self, integration_id: &str) -> bool {
        self.external_relationships.iter().any(|r| {
            r.integration_id == integration_id && r.sync_status == RelationshipStatus::Deleted
        })
    }

    /// Whether the shard outlived its record at `integration_id`: the record was deleted at
    /// the provider, and the shard lives on through another record merged into it. Writing it
    /// back would make the deleted record again.
    pub fn outlived_record_at(&self, integration_id: &str) -> bool {
        self.lost_record_at(integration_id) && self.held_by_a_record()
    }

    /// Whether a record of any integration still holds the shard (a `synced` link): it lives
    /// while one does.
    pub fn held_by_a_record(&self) -> bool {
        self.external_relationships
            .iter()
            .any(|r| r.sync_status == RelationshipStatus::Synced)
    }
}

/// Shard type ids the engine reads and writes.
pub mod types {
    pub const INTEGRATION: &str = "c_integration";
    pub const INTEGRATION_SYNC: &str = "c_integrationSync";
    pub const SYNC_CONFLICT: &str = "c_syncConflict";
    pub const SYNC_LISTING: &str = "c_syncListing";

    /// Whether shards of `shard_type` are the engine's own records, which only the engine and
    /// its own commands write: never a shard edit's, nor written back to a provider.
    pub fn is_the_engines(shard_type: &str) -> bool {
        [INTEGRATION, INTEGRATION_SYNC, SYNC_CONFLICT, SYNC_LISTING].contains(&shard_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn changes_go_back_through_the_first_record_synced_both_ways() {
        let now = Utc::now();
        let mut shard: Shard = serde_json::from_value(json!({
            "id": "s-1", "tenantId": "t1", "shardTypeId": "c_contact", "name": "Ann",
            "structuredData": {}
        }))
        .unwrap();
        let link = |id: &str, direction| ExternalRelationship::synced("i-1", id, direction, now);
        shard.external_relationships = vec![
            link("lead-1", SyncDirection::Inbound),
            link("contact-1", SyncDirection::Bidirectional),
        ];
        assert_eq!(
            shard.write_back_link("i-1"),
            Some(1),
            "not the one-way lead"
        );
        shard.external_relationships[1].sync_status = RelationshipStatus::Deleted;
        assert_eq!(
            shard.write_back_link("i-1"),
            Some(0),
            "a link from before the mapping wrote back, where there is no other"
        );
        assert_eq!(shard.write_back_link("i-2"), None);
    }

    #[test]
    fn a_shard_reads_back_as_written_with_what_others_put_on_it() {
        let doc = json!({
            "id": "s1", "tenantId": "t1", "shardTypeId": "c_contact", "name": "Ann",
            "structuredData": {"email": "ann@x.test"},
            "relationships": [{"type": "derived_from", "targetId": "p", "targetType": "c_company"}],
            "external_relationships": [{"integrationId": "i", "externalId": "1", "syncStatus": "synced",
                                        "syncDirection": "inbound", "fieldHashes": {"email": "ab"}}],
            "createdAt": "2026-11-01T00:00:00Z", "createdBy": null, "contentHash": "00ff",
            "dedupKeys": {"email_exact": "ann@x.test"}, "ttl": 60,
            "acl": [{"user": "u1"}], "_rid": "kept by the caller's choice"
        });
        let shard: Shard = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(shard.name, "Ann");
        assert_eq!(shard.relationships[0].target_id, "p");
        assert_eq!(shard.external_relationships[0].field_hashes["email"], "ab");
        assert_eq!(shard.created_by, None);
        assert_eq!(shard.extra["acl"], json!([{"user": "u1"}]));
        let mut expected = doc;
        expected.as_object_mut().unwrap().remove("createdBy");
        assert_eq!(serde_json::to_value(&shard).unwrap(), expected);
        let text = serde_json::to_string(&shard).unwrap();
        assert_eq!(serde_json::from_str::<Shard>(&text).unwrap(), shard);
    }

    #[test]
    fn a_document_without_its_identity_is_not_a_shard() {
        for missing in ["id", "tenantId", "shardTypeId"] {
            let mut doc = json!({"id": "s1", "tenantId": "t1", "shardTypeId": "c_contact"});
            doc.as_object_mut().unwrap().remove(missing);
            let e = serde_json::from_value::<Shard>(doc).unwrap_err();
            assert!(e.to_string().contains(missing), "{e}");
        }
    }
}
