//! Registering an integration: checks made when it is put, so that a mistake is named at once
//! instead of failing its first sync (or, for webhooks, every delivery), and the merge with
//! what the engine keeps on an integration already registered.

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::app::App;
use crate::model::integration::IntegrationStatus;
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
/// with the state the engine keeps taken from `old` whatever `given` says (when it last synced
/// and next will, cursors and when they were read, how far deletions were read and which were
/// lost, checkpoints, the running lease and the chain that ended last, credential expiry and
/// refresh lease, webhook subscriptions, catch-ups on their way): a file made from an earlier
/// listing holds that state as it was then, and putting it back would hand the integration to a
/// chain that has moved on and forget subscriptions made since. The status too, but where
/// [`takes_status`] says the file's (`status_given`) is the operator's.
/// A changed frequency moves the next sync to the new frequency's next time. A new integration
/// takes `given` whole (one moved from another deployment keeps its cursors).
pub fn merged(
    mut given: Integration,
    old: Option<&Integration>,
    status_given: bool,
    now: DateTime<Utc>,
) -> Integration {
    match old {
        Some(old) => {
            if !takes_status(status_given.then_some(given.status), old.status) {
                given.status = old.status;
                given.status_message = old.status_message.clone();
            }
            given.next_sync_at = if old.sync_frequency != given.sync_frequency {
                given.sync_frequency.next_after(now)
            } else {
                old.next_sync_at
            };
            Integration {
                last_sync_at: old.last_sync_at,
                credentials_expire_at: old.credentials_expire_at,
                cursors: old.cursors.clone(),
                cursors_read_at: old.cursors_read_at.clone(),
                deletions_checked: old.deletions_checked.clone(),
                lost_deletions: old.lost_deletions.clone(),
                checkpoints: old.checkpoints.clone(),
                running: old.running.clone(),
                ended_chain: old.ended_chain.clone(),
                refresh_lease: old.refresh_lease.clone(),
                subscriptions: old.subscriptions.clone(),
                catch_ups: old.catch_ups.clone(),
                passed_over_from: old.passed_over_from,
                ..given
            }
        }
        None if given.sync_frequency != SyncFrequency::Manual && given.next_sync_at.is_none() => {
            // A new scheduled integration syncs at the scheduler's next tick.
            given.next_sync_at = Some(now);
            given
        }
        None => given,
    }
}

/// Whether a put takes the status its file `given` over the stored one. A file may pause an
/// integration and resume one it paused; `error` is the engine's, set when credentials stop
/// working and cleared when new ones are stored: a file neither sets nor clears it (one made
/// from an earlier listing says whatever the status was then).
fn takes_status(given: Option<IntegrationStatus>, stored: IntegrationStatus) -> bool {
    match given {
        Some(IntegrationStatus::Paused) => true,
        Some(IntegrationStatus::Active) => stored != IntegrationStatus::Error,
        Some(IntegrationStatus::Error) | None => false,
    }
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
    integration.sync_frequency.validate(now)?;
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
    let status_given = shard
        .structured_data
        .get("status")
        .is_some_and(|s| !s.is_null());
    let integration = merged(integration, old.as_ref(), status_given, now);
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
    if !provider.applies_filters() {
        let cannot = |field: String| {
            format!(
                "{field}: `{name}` reads no filters, so everything would be synced; \
                 leave the filters out, or narrow what the connection reads"
            )
        };
        if !integration.pull_filters.is_empty() {
            return Err(cannot("structuredData.pullFilters".into()));
        }
        if let Some(i) = integration
            .entity_mappings
            .iter()
            .position(|m| !m.filters.is_empty())
        {
            return Err(cannot(format!(
                "structuredData.entityMappings[{i}].filters"
            )));
        }
    }
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
    fn a_put_of_an_earlier_listing_hands_back_no_state_the_engine_has_moved_on_from() {
        let now: DateTime<Utc> = "2026-11-22T10:00:00Z".parse().unwrap();
        let listed = json!({
            "providerName": "graph",
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "cursors": {"drive": "token-1"},
            "running": {"chain": "job_a", "jobId": "job_a", "since": "2026-11-22T09:00:00.000Z",
                        "until": "2026-11-22T10:30:00.000Z"},
        });
        let mut stored = listed.clone();
        stored["status"] = json!("error");
        stored["statusMessage"] = json!("the refresh token was revoked");
        stored["cursors"] = json!({"drive": "token-2"});
        stored["running"]["jobId"] = json!("job_a+1");
        stored["subscriptions"] = json!([{"id": "sub-1", "resource": "drive",
                                          "expiresAt": "2026-11-25T10:00:00.000Z"}]);
        let (listed, stored) = (integration(listed), integration(stored));

        let kept = merged(listed.clone(), Some(&stored), false, now);
        assert_eq!(kept.running, stored.running, "the chain holds on");
        assert_eq!(kept.subscriptions, stored.subscriptions);
        assert_eq!(kept.cursors, stored.cursors);
        assert_eq!(
            kept.status,
            IntegrationStatus::Error,
            "no status in the file"
        );
        assert_eq!(kept.status_message, stored.status_message);

        let active = merged(listed.clone(), Some(&stored), true, now);
        assert_eq!(
            active.status,
            IntegrationStatus::Error,
            "new credentials resume it, not a file"
        );
        let mut pausing = listed;
        pausing.status = IntegrationStatus::Paused;
        let paused = merged(pausing, Some(&stored), true, now);
        assert_eq!(
            paused.status,
            IntegrationStatus::Paused,
            "the file pauses it"
        );
        let mut running = stored.clone();
        running.status = IntegrationStatus::Paused;
        let mut resuming = active.clone();
        resuming.status = IntegrationStatus::Active;
        assert_eq!(
            merged(resuming, Some(&running), true, now).status,
            IntegrationStatus::Active,
            "and resumes it"
        );
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
        let kept = merged(given.clone(), Some(&old), false, now);
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
        let moved = merged(hourly, Some(&old), false, now);
        assert_eq!(moved.next_sync_at, moved.sync_frequency.next_after(now));

        assert_eq!(
            merged(given, None, false, now).next_sync_at,
            Some(now),
            "new: due at once"
        );
    }
}
