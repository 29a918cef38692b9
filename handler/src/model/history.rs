//! `c_integrationSync`: the history record every sync job leaves behind.
//!
//! Field names, enum values, the id format (`sync_20251130_100000_abc`) and the name format
//! (`Sync 2025-11-30 10:00:00`) are the platform's. The id is derived from the job (its
//! scheduled time and id), so a redelivered or retried job rewrites its own record instead of
//! adding a second one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::shard::{Relationship, Shard, types};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationSync {
    pub integration_id: String,
    pub integration_name: String,
    pub provider_name: String,
    pub job_id: String,
    pub job_type: SyncJobType,
    pub trigger: SyncTrigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_by: Option<String>,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub status: SyncStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    pub stats: SyncStats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_stats: Option<Vec<EntitySyncStats>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<SyncError>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_details: Option<SyncDetails>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncJobType {
    Full,
    Incremental,
    Webhook,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncTrigger {
    Scheduled,
    Webhook,
    Manual,
    Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    Running,
    Success,
    Partial,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStats {
    pub records_fetched: u64,
    pub shards_created: u64,
    pub shards_updated: u64,
    pub shards_skipped: u64,
    pub shards_failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_pushed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_created: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_updated: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_deleted: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records_failed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntitySyncStats {
    pub external_entity: String,
    pub shard_type_id: String,
    pub direction: Direction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<SyncError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub timestamp: DateTime<Utc>,
    pub retryable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_processed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters_applied: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_from_date: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_to_date: Option<DateTime<Utc>>,
}

/// The history shard's id for a job: `sync_<scheduled date>_<scheduled time>_<job suffix>`.
pub fn history_shard_id(job_id: &str, scheduled_at: DateTime<Utc>) -> String {
    history_shard_id_candidate(job_id, scheduled_at, 0)
}

/// The `n`th id a job's record may take. The platform's three-character suffix leaves room
/// for two jobs of the same second to share one; the next candidates hash the job id again,
/// so that the second finds a free id of its own, the same one every time it looks.
pub fn history_shard_id_candidate(job_id: &str, scheduled_at: DateTime<Utc>, n: u32) -> String {
    let suffix = if n == 0 {
        short_hash(job_id)
    } else {
        short_hash(&format!("{job_id}#{n}"))
    };
    format!("sync_{}_{suffix}", scheduled_at.format("%Y%m%d_%H%M%S"))
}

impl IntegrationSync {
    /// Whether the job has finished, one way or another.
    pub fn is_finished(&self) -> bool {
        self.status != SyncStatus::Running
    }

    /// Wraps the record in its shard `id`, linked to its integration by `sync_of`.
    pub fn into_shard(self, id: String, tenant_id: &str, now: DateTime<Utc>) -> Shard {
        Shard {
            id,
            tenant_id: tenant_id.to_string(),
            shard_type_id: types::INTEGRATION_SYNC.to_string(),
            name: format!("Sync {}", self.started_at.format("%Y-%m-%d %H:%M:%S")),
            relationships: vec![Relationship {
                kind: "sync_of".into(),
                target_id: self.integration_id.clone(),
                target_type: types::INTEGRATION.into(),
            }],
            external_relationships: Vec::new(),
            created_at: Some(self.completed_at.unwrap_or(now)),
            created_by: Some("system".into()),
            updated_at: Some(now),
            deleted_at: None,
            content_hash: None,
            dedup_keys: Default::default(),
            ttl: None,
            extra: Default::default(),
            structured_data: serde_json::to_value(self).unwrap_or(Value::Null),
        }
    }
}

/// Three base-36 characters of a stable (FNV-1a) hash: enough to keep two jobs that start in
/// the same second of one tenant apart, and stable across builds, unlike std's hasher.
fn short_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..3)
        .map(|i| DIGITS[((hash >> (i * 12)) % 36) as usize] as char)
        .collect()
}

/// What one integration's finished syncs add up to: the figures a `sync-stats` view shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationSyncStats {
    pub integration_id: String,
    pub jobs: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Succeeded (partial counts as done) over jobs that ended.
    pub success_rate: f64,
    pub records_fetched: u64,
    pub shards_written: u64,
    pub p50_duration_ms: Option<u64>,
    pub p95_duration_ms: Option<u64>,
}

/// Aggregates finished sync records per integration, sorted by integration id. Records still
/// running are left out.
pub fn stats_per_integration(records: &[IntegrationSync]) -> Vec<IntegrationSyncStats> {
    let mut by_integration: std::collections::BTreeMap<&str, Vec<&IntegrationSync>> =
        Default::default();
    for record in records.iter().filter(|r| r.status != SyncStatus::Running) {
        by_integration
            .entry(&record.integration_id)
            .or_default()
            .push(record);
    }
    by_integration
        .into_iter()
        .map(|(id, records)| {
            let jobs = records.len() as u64;
            let succeeded = records
                .iter()
                .filter(|r| matches!(r.status, SyncStatus::Success | SyncStatus::Partial))
                .count() as u64;
            let failed = records
                .iter()
                .filter(|r| r.status == SyncStatus::Failed)
                .count() as u64;
            let mut durations: Vec<u64> = records.iter().filter_map(|r| r.duration_ms).collect();
            durations.sort_unstable();
            // Nearest rank: the smallest duration at least p% of jobs did not exceed.
            let percentile = |p: f64| -> Option<u64> {
                let rank = ((p * durations.len() as f64).ceil() as usize).max(1);
                durations.get(rank - 1).copied()
            };
            IntegrationSyncStats {
                integration_id: id.to_string(),
                jobs,
                succeeded,
                failed,
                success_rate: if jobs == 0 {
                    0.0
                } else {
                    succeeded as f64 / jobs as f64
                },
                records_fetched: records.iter().map(|r| r.stats.records_fetched).sum(),
                shards_written: records
                    .iter()
                    .map(|r| r.stats.shards_created + r.stats.shards_updated)
                    .sum(),
                p50_duration_ms: percentile(0.50),
                p95_duration_ms: percentile(0.95),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_syncs_add_up_per_integration_with_nearest_rank_percentiles() {
        let record =
            |integration: &str, status: SyncStatus, ms: u64, fetched: u64| IntegrationSync {
                integration_id: integration.into(),
                integration_name: String::new(),
                provider_name: "salesforce".into(),
                job_id: format!("job-{ms}"),
                job_type: SyncJobType::Incremental,
                trigger: SyncTrigger::Scheduled,
                triggered_by: None,
                started_at: Utc::now(),
                completed_at: None,
                duration_ms: Some(ms),
                status,
                status_message: None,
                stats: SyncStats {
                    records_fetched: fetched,
                    shards_created: 1,
                    shards_updated: 2,
                    ..SyncStats::default()
                },
                entity_stats: None,
                errors: None,
                sync_details: None,
            };
        let mut records: Vec<IntegrationSync> = (1..=20)
            .map(|i| record("int-a", SyncStatus::Success, i * 100, 10))
            .collect();
        records.push(record("int-a", SyncStatus::Failed, 50, 0));
        records.push(record("int-a", SyncStatus::Running, 1, 0));
        records.push(record("int-b", SyncStatus::Partial, 700, 5));

        let stats = stats_per_integration(&records);

        assert_eq!(stats.len(), 2);
        let a = &stats[0];
        assert_eq!(
            (a.jobs, a.succeeded, a.failed),
            (21, 20, 1),
            "running jobs are left out"
        );
        assert!((a.success_rate - 20.0 / 21.0).abs() < 1e-9);
        assert_eq!((a.records_fetched, a.shards_written), (200, 63));
        assert_eq!(
            (a.p50_duration_ms, a.p95_duration_ms),
            (Some(1000), Some(1900))
        );
        assert_eq!((stats[1].jobs, stats[1].p95_duration_ms), (1, Some(700)));
    }
    use chrono::TimeZone;
    use serde_json::json;

    fn failed_record() -> IntegrationSync {
        let t = Utc.with_ymd_and_hms(2025, 11, 30, 12, 0, 0).unwrap();
        IntegrationSync {
            integration_id: "int_acme_salesforce".into(),
            integration_name: "Acme Salesforce".into(),
            provider_name: "salesforce".into(),
            job_id: "job_def456".into(),
            job_type: SyncJobType::Incremental,
            trigger: SyncTrigger::Scheduled,
            triggered_by: None,
            started_at: t,
            completed_at: Some(t + chrono::Duration::seconds(5)),
            duration_ms: Some(5000),
            status: SyncStatus::Failed,
            status_message: Some("Authentication failed - token expired".into()),
            stats: SyncStats::default(),
            entity_stats: None,
            errors: Some(vec![SyncError {
                code: "AUTHENTICATION_FAILED".into(),
                message: "Invalid session ID. Session has expired or is invalid.".into(),
                entity: None,
                record_id: None,
                shard_id: None,
                field: None,
                timestamp: t + chrono::Duration::seconds(5),
                retryable: false,
            }]),
            sync_details: None,
        }
    }

    #[test]
    fn a_failed_sync_reads_like_the_platforms_example() {
        let now = Utc.with_ymd_and_hms(2025, 11, 30, 12, 0, 5).unwrap();
        let record = failed_record();
        let id = history_shard_id(&record.job_id, record.started_at);
        let shard = record.into_shard(id, "tenant_acme123", now);
        let json = serde_json::to_value(&shard).unwrap();
        assert!(
            shard.id.starts_with("sync_20251130_120000_"),
            "{}",
            shard.id
        );
        assert_eq!(shard.id.len(), "sync_20251130_120000_abc".len());
        assert_eq!(json["name"], "Sync 2025-11-30 12:00:00");
        assert_eq!(json["shardTypeId"], "c_integrationSync");
        assert_eq!(json["tenantId"], "tenant_acme123");
        assert_eq!(json["createdBy"], "system");
        assert_eq!(
            json["relationships"],
            json!([{"type": "sync_of", "targetId": "int_acme_salesforce", "targetType": "c_integration"}])
        );
        assert_eq!(
            json["structuredData"],
            json!({
                "integrationId": "int_acme_salesforce",
                "integrationName": "Acme Salesforce",
                "providerName": "salesforce",
                "jobId": "job_def456",
                "jobType": "incremental",
                "trigger": "scheduled",
                "startedAt": "2025-11-30T12:00:00Z",
                "completedAt": "2025-11-30T12:00:05Z",
                "durationMs": 5000,
                "status": "failed",
                "statusMessage": "Authentication failed - token expired",
                "stats": {"recordsFetched": 0, "shardsCreated": 0, "shardsUpdated": 0,
                          "shardsSkipped": 0, "shardsFailed": 0},
                "errors": [{"code": "AUTHENTICATION_FAILED",
                            "message": "Invalid session ID. Session has expired or is invalid.",
                            "timestamp": "2025-11-30T12:00:05Z", "retryable": false}]
            })
        );
    }

    #[test]
    fn the_same_job_always_gets_the_same_record_id() {
        let at = Utc.with_ymd_and_hms(2025, 11, 30, 10, 0, 0).unwrap();
        assert_eq!(history_shard_id("job_1", at), history_shard_id("job_1", at));
        assert_ne!(history_shard_id("job_1", at), history_shard_id("job_2", at));
    }
}
