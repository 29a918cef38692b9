//! Registering an integration: checks made when it is put, so that a mistake is named at once
//! instead of failing its first sync (or, for webhooks, every delivery), and the merge with
//! what the engine keeps on an integration already registered.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::app::App;
use crate::model::shard::types as shard_types;
use crate::model::{Integration, Shard, SyncFrequency};
use crate::secrets::{credential_secret_name, is_valid_secret_name};
use crate::store::{Op, ShardQuery, StoreError};

/// What `register` did.
#[derive(Debug)]
pub struct Registered {
    pub shard: Shard,
    pub integration: Integration,
    /// Whether an integration of that id was there before.
    pub updated: bool,
    /// What will not work yet.
    pub notes: Vec<String>,
}

/// The integration to store when `given` is put over `old`: the operator's configuration,
/// with the state the engine keeps (when it last synced and next will, cursors and when they
/// were read, how far
/// deletions were read and which were lost, checkpoints, the running lease and the chain that ended last,
/// credential expiry and refresh lease, webhook subscriptions, catch-ups on their way) carried over. A changed frequency moves the next sync to the new frequency's next time.
pub fn merged(
    mut given: Integration,
    old: Option<&Integration>,
    now: DateTime<Utc>,
) -> Integration {
    match old {
        Some(old) => {
            given.last_sync_at = given.last_sync_at.or(old.last_sync_at);
            given.credentials_expire_at = given.credentials_expire_at.or(old.credentials_expire_at);
            if given.cursors.is_empty() {
                given.cursors = old.cursors.clone();
                given.cursors_read_at = old.cursors_read_at.clone();
            }
            if given.deletions_checked.is_empty() {
                given.deletions_checked = old.deletions_checked.clone();
            }
            if given.lost_deletions.is_empty() {
                given.lost_deletions = old.lost_deletions.clone();
            }
            if given.checkpoints.is_empty() {
                given.checkpoints = old.checkpoints.clone();
            }
            given.running = given.running.or_else(|| old.running.clone());
            given.ended_chain = given.ended_chain.or_else(|| old.ended_chain.clone());
            given.refresh_lease = given.refresh_lease.or_else(|| old.refresh_lease.clone());
            if given.subscriptions.is_empty() {
                given.subscriptions = old.subscriptions.clone();
            }
            if given.catch_ups.is_empty() {
                given.catch_ups = old.catch_ups.clone();
            }
            given.next_sync_at = if old.sync_frequency != given.sync_frequency {
                given.sync_frequency.next_after(now)
            } else {
                given.passed_over_from = given.passed_over_from.or(old.passed_over_from);
                given.next_sync_at.or(old.next_sync_at)
            };
        }
        None if given.sync_frequency != SyncFrequency::Manual && given.next_sync_at.is_none() => {
            // A new scheduled integration syncs at the scheduler's next tick.
            given.next_sync_at = Some(now);
        }
        None => {}
    }
    given
}

/// Checks and stores `shard` as an integration, merged with the one of the same id if any.
pub async fn register(
    app: &App,
    mut shard: Shard,
    now: DateTime<Utc>,
) -> Result<Registered, String> {
    if shard.id.is_empty() || shard.tenant_id.is_empty() {
        return Err("an integration needs a non-empty `id` and `tenantId`".into());
    }
    let mut integration: Integration = shard
        .data()
        .map_err(|e| format!("structuredData is not a valid integration: {e}"))?;
    integration.sync_frequency.validate()?;
    for mapping in &integration.entity_mappings {
        mapping.validate()?;
        mapping.check_deduplication()?;
    }
    integration.check_entities_distinct()?;
    integration.check_write_back()?;
    let notes = check(app, &shard, &mut integration).await?;
    let existing = app
        .store
        .get(&shard.tenant_id, &shard.id)
        .await
        .map_err(|e| e.to_string())?;
    // Checked when the integration is made: one registered before keeps its name.
    if existing.is_none() {
        check_secret_name(app, &shard).await?;
    }
    let old = match &existing {
        Some(v) if v.value.shard_type_id != shard_types::INTEGRATION => {
            return Err(format!(
                "`{}` exists and is a `{}` shard",
                shard.id, v.value.shard_type_id
            ));
        }
        Some(v) => Some(v.value.data::<Integration>().map_err(|e| e.to_string())?),
        None => None,
    };
    let integration = merged(integration, old.as_ref(), now);
    match &existing {
        Some(v) => {
            shard.created_at = v.value.created_at;
            shard.created_by = v.value.created_by.clone();
        }
        None => {
            shard.created_at = Some(now);
            shard.created_by.get_or_insert_with(|| "operator".into());
        }
    }
    shard.updated_at = Some(now);
    shard.structured_data = serde_json::to_value(&integration).map_err(|e| e.to_string())?;
    match &existing {
        Some(v) => app.store.replace(&shard, &v.etag).await,
        None => app.store.create(&shard).await,
    }
    .map_err(|e| match e {
        StoreError::PreconditionFailed | StoreError::Conflict => {
            "the integration changed while it was being written; run the command again".into()
        }
        other => other.to_string(),
    })?;
    Ok(Registered {
        shard,
        integration,
        updated: existing.is_some(),
        notes,
    })
}

/// Checks `integration` (the `structuredData` of `shard`) against this build's providers and
/// the integrations already registered, putting its connection settings in their canonical
/// form. The error names the field at fault; what is returned are notes on what will not work
/// yet (webhook subscriptions without `WEBHOOK_BASE_URL`).
pub async fn check(
    app: &App,
    shard: &Shard,
    integration: &mut Integration,
) -> Result<Vec<String>, String> {
    let name = &integration.provider_name;
    let provider = app.providers.get(name).ok_or_else(|| {
        format!(
            "structuredData.providerName: this build has no provider `{name}` (it has: {})",
            app.providers.names().collect::<Vec<_>>().join(", ")
        )
    })?;
    provider
        .check_connection(&mut integration.connection)
        .map_err(|e| format!("structuredData.{e}"))?;
    let entities: Vec<&str> = integration
        .entity_mappings
        .iter()
        .map(|m| m.external_entity.as_str())
        .collect();
    provider
        .check_entities(&entities)
        .map_err(|e| format!("structuredData.entityMappings: {e}"))?;
    // A webhook names its sender by organization; two integrations on one organization would
    // leave every delivery unroutable.
    if let Some(org) = integration.connection.get("organizationId") {
        let query = ShardQuery::of_type(shard_types::INTEGRATION)
            .filter("structuredData.providerName", Op::Eq, json!(name))
            .filter(
                "structuredData.connection.organizationId",
                Op::Eq,
                org.clone(),
            );
        let found = app.store.query(&query).await.map_err(|e| e.to_string())?;
        if let Some(other) = found
            .iter()
            .find(|v| v.value.id != shard.id || v.value.tenant_id != shard.tenant_id)
        {
            return Err(format!(
                "structuredData.connection.organizationId: already connected to integration `{}` \
                 of tenant `{}`",
                other.value.id, other.value.tenant_id
            ));
        }
    }
    let mut notes = Vec::new();
    if provider.subscriptions().is_some() && app.settings.webhook_base_url.is_none() {
        notes.push(format!(
            "WEBHOOK_BASE_URL is not set: {name} change notifications cannot be subscribed to, \
             so this integration syncs on its schedule only"
        ));
    }
    Ok(notes)
}

/// The integration's credentials are kept under a secret named after its tenant and id
/// ([`credential_secret_name`]). Key Vault takes names of at most 127 characters, and does not
/// tell names apart by case: an id whose name is too long could never keep credentials, and
/// one whose name differs from another integration's only by case would share its secret.
async fn check_secret_name(app: &App, shard: &Shard) -> Result<(), String> {
    let name = credential_secret_name(&shard.tenant_id, &shard.id);
    if !is_valid_secret_name(&name) {
        return Err(format!(
            "id: with its tenant, names a credentials secret of {} characters, where Key Vault takes at most 127 (each character other than a letter or a digit counts three)",
            name.len()
        ));
    }
    let all = app
        .store
        .query(&ShardQuery::of_type(shard_types::INTEGRATION))
        .await
        .map_err(|e| e.to_string())?;
    let same_but_case = all.iter().find(|v| {
        (v.value.id != shard.id || v.value.tenant_id != shard.tenant_id)
            && credential_secret_name(&v.value.tenant_id, &v.value.id).eq_ignore_ascii_case(&name)
    });
    match same_but_case {
        Some(other) => Err(format!(
            "id: differs only in case from integration `{}` of tenant `{}`, and Key Vault, which does not tell names apart by case, would keep both one's credentials",
            other.value.id, other.value.tenant_id
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integration(value: serde_json::Value) -> Integration {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_put_keeps_the_engines_state_and_a_new_frequency_moves_the_next_sync() {
        let now: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
        let old = integration(json!({
            "providerName": "salesforce",
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "lastSyncAt": "2026-11-22T09:00:00Z", "nextSyncAt": "2026-11-22T09:15:00.000Z",
            "cursors": {"Account": "2026-11-22T08:59:00.000Z"},
            "deletionsChecked": {"Account": "2026-11-22T09:00:00Z"},
            "lostDeletions": ["Contact"],
            "endedChain": "job_int_1",
            "credentialsExpireAt": "2026-11-22T11:00:00.000Z"
        }));
        let given = integration(json!({
            "providerName": "salesforce",
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "entityMappings": [{"externalEntity": "Account", "shardTypeId": "c_company"}]
        }));
        let kept = merged(given.clone(), Some(&old), now);
        assert_eq!(kept.last_sync_at, old.last_sync_at);
        assert_eq!(kept.next_sync_at, old.next_sync_at);
        assert_eq!(kept.cursors, old.cursors);
        assert_eq!(kept.deletions_checked, old.deletions_checked);
        assert_eq!(kept.ended_chain, old.ended_chain);
        assert_eq!(kept.credentials_expire_at, old.credentials_expire_at);
        assert_eq!(kept.lost_deletions, old.lost_deletions);
        assert_eq!(
            kept.entity_mappings.len(),
            1,
            "the operator's configuration is taken"
        );

        let mut hourly = given.clone();
        hourly.sync_frequency = integration(json!({"providerName": "x",
            "syncFrequency": {"type": "interval", "intervalMinutes": 60}}))
        .sync_frequency;
        let moved = merged(hourly, Some(&old), now);
        assert_eq!(moved.next_sync_at, moved.sync_frequency.next_after(now));

        assert_eq!(
            merged(given, None, now).next_sync_at,
            Some(now),
            "new: due at once"
        );
    }
}
