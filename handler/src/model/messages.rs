//! The bodies of the messages on the sync queues.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::history::{SyncJobType, SyncTrigger};

/// A sync job on `sync-inbound-scheduled` or `sync-inbound-webhook`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncJobMessage {
    pub integration_id: String,
    pub tenant_id: String,
    pub job_type: JobType,
    pub provider: String,
    /// Stable across redeliveries and retries of the same job; names its history record.
    pub job_id: String,
    #[serde(default = "default_trigger")]
    pub trigger: SyncTrigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    pub scheduled_at: DateTime<Utc>,
    /// 1 for the first try; each re-enqueued retry adds one.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// How many times the job was put back to wait for another job of its integration.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferrals: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_trigger() -> SyncTrigger {
    SyncTrigger::Scheduled
}

fn first_attempt() -> u32 {
    1
}

/// The job types as the queue messages spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobType {
    #[serde(alias = "full")]
    FullSync,
    Incremental,
    Webhook,
}

impl SyncJobMessage {
    /// The job type as the history records it: what the job fetched. Who asked for it is the
    /// record's `trigger` (a user-triggered incremental sync is `incremental` + `manual`).
    pub fn history_job_type(&self) -> SyncJobType {
        match self.job_type {
            JobType::FullSync => SyncJobType::Full,
            JobType::Incremental => SyncJobType::Incremental,
            JobType::Webhook => SyncJobType::Webhook,
        }
    }
}

/// A change in Castiel to write back to the external system, on `sync-outbound`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WriteBackMessage {
    pub shard_id: String,
    pub tenant_id: String,
    pub operation: WriteBackOperation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_fields: Option<Vec<String>>,
    pub external_system: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    pub triggered_at: DateTime<Utc>,
    pub triggered_by: String,
    /// The integration to write through, when the sender knows it; otherwise the tenant's
    /// integration with `externalSystem` that writes the shard's type back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<String>,
    /// 1 for the first try; a retry re-sent after a failure counts on.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// How many times the write has been held for the provider's used-up allocation, which
    /// spends no attempt.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub holds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteBackOperation {
    Create,
    Update,
    Delete,
}

/// Parses a message body, naming the first problem so the dead-letter reason is useful.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text".to_string())?;
    serde_json::from_str(text).map_err(|e| format!("the body is not a valid message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_job_parses_with_defaults() {
        let job: SyncJobMessage = parse_body(
            br#"{"integrationId":"int-1","tenantId":"t1","jobType":"incremental",
                 "provider":"salesforce","jobId":"job-1","scheduledAt":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(job.attempt, 1);
        assert_eq!(job.trigger, SyncTrigger::Scheduled);
        assert_eq!(job.history_job_type(), SyncJobType::Incremental);
    }

    #[test]
    fn a_bad_body_names_the_problem() {
        let e = parse_body::<SyncJobMessage>(br#"{"tenantId":"t1"}"#).unwrap_err();
        assert!(e.contains("missing field `integrationId`"), "{e}");
        let e = parse_body::<WriteBackMessage>(&[0xff, 0xfe]).unwrap_err();
        assert_eq!(e, "the body is not UTF-8 text");
        let e = parse_body::<WriteBackMessage>(
            br#"{"shardId":"s","tenantId":"t","operation":"upsert","externalSystem":"x",
                 "triggeredAt":"2026-01-01T00:00:00Z","triggeredBy":"u"}"#,
        )
        .unwrap_err();
        assert!(e.contains("unknown variant `upsert`"), "{e}");
    }
}
