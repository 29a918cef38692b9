//! Events the engine publishes (`integration.sync.started`, `integration.sync.check_due`, ...).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One event in CloudEvents 1.0 form. The same value is written to the local event log and, in
/// Azure, published to Event Grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub specversion: String,
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    pub data: Value,
}

impl Event {
    /// A new event with a fresh id.
    pub fn new(kind: &str, subject: impl Into<String>, time: DateTime<Utc>, data: Value) -> Self {
        Self {
            specversion: "1.0".into(),
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            source: "/castiel/func-sync".into(),
            subject: subject.into(),
            time,
            datacontenttype: "application/json".into(),
            data,
        }
    }
}

/// The event types, as the event catalogue names them.
pub mod types {
    pub const SYNC_CHECK_DUE: &str = "integration.sync.check_due";
    pub const SYNC_STARTED: &str = "integration.sync.started";
    pub const SYNC_COMPLETED: &str = "integration.sync.completed";
    pub const SYNC_FAILED: &str = "integration.sync.failed";
    pub const TOKEN_CHECK_EXPIRING: &str = "integration.token.check-expiring";
    pub const TOKEN_REFRESHED: &str = "integration.token.refreshed";
    pub const TOKEN_REFRESH_FAILED: &str = "integration.token.refresh.failed";
    pub const WEBHOOK_RECEIVED: &str = "integration.webhook.received";
    pub const CONFLICT_DETECTED: &str = "integration.conflict.detected";
    pub const CONFLICT_RESOLVED: &str = "integration.conflict.resolved";
}
