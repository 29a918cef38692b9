//! The shard: Castiel's one document shape.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A Castiel document. Fields the engine does not interpret are kept in `extra` so that
/// reading and writing a shard never drops what another service put there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub sync_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<DateTime<Utc>>,
    pub sync_direction: String,
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
}
