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
    /// A new event about `subject`. `occurrence` names what happened, once: a job's id and
    /// attempt, a conflict's content. The id derives from the type, the subject and it, so an
    /// event published again (a job delivered twice, a function retried after a crash) has the
    /// id it had, and a subscriber keeping CloudEvents' rule (the same source and id is the
    /// same event) takes it once.
    pub fn new(
        kind: &str,
        subject: impl Into<String>,
        occurrence: &str,
        time: DateTime<Utc>,
        data: Value,
    ) -> Self {
        let subject = subject.into();
        Self {
            specversion: "1.0".into(),
            id: event_id(kind, &subject, occurrence),
            kind: kind.into(),
            source: "/castiel/func-sync".into(),
            subject,
            time,
            datacontenttype: "application/json".into(),
            data,
        }
    }
}

/// A UUID (version 8, RFC 9562's for hashes other than its own) of the SHA-256 of the parts.
fn event_id(kind: &str, subject: &str, occurrence: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [kind, subject, occurrence] {
        // Lengths first, so that no two lists of parts hash the same text.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_occurrence_published_again_keeps_its_id() {
        let at = Utc::now();
        let started = |occurrence: &str| {
            Event::new(
                types::SYNC_STARTED,
                "/tenants/t1/integrations/i1",
                occurrence,
                at,
                Value::Null,
            )
            .id
        };
        assert_eq!(started("job-1#1"), started("job-1#1"));
        assert_ne!(started("job-1#1"), started("job-1#2"));
        let other = Event::new(
            types::SYNC_COMPLETED,
            "/tenants/t1/integrations/i1",
            "job-1#1",
            at,
            Value::Null,
        );
        assert_ne!(other.id, started("job-1#1"));
        let id = uuid::Uuid::parse_str(&started("job-1#1")).unwrap();
        assert_eq!(id.get_version_num(), 8);
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
