//! Conflicts left for an operator (`manual`): listing them, and settling one by taking one
//! side's values.
//!
//! Taking the provider's values writes them into the shard and records them as agreed. Taking
//! Castiel's records the provider's values as the last agreed ones, so that Castiel's now read
//! as the newer change, and sends the write-back that carries them to the provider: the usual
//! path, with its retries, ordering and history.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::publish;
use super::shards::{ChangeError, Outgoing};
use crate::app::App;
use crate::model::conflict::{ConflictRecord, ConflictStatus, Side, value_hash};
use crate::model::event::types as events;
use crate::model::messages::{WriteBackMessage, WriteBackOperation};
use crate::model::shard::types as shard_types;
use crate::model::{Event, Integration};
use crate::queue::{OutgoingMessage, SYNC_OUTBOUND};
use crate::store::{Op, ShardQuery};

/// The tenant's open conflicts, with their ids, oldest first.
pub async fn open(
    app: &App,
    tenant_id: &str,
) -> Result<Vec<(String, ConflictRecord)>, ChangeError> {
    let query = ShardQuery::of_type(shard_types::SYNC_CONFLICT)
        .in_tenant(tenant_id)
        .filter("structuredData.status", Op::Eq, json!("open"));
    let mut open: Vec<(String, ConflictRecord)> = app
        .store
        .query(&query)
        .await?
        .into_iter()
        .filter_map(|v| Some((v.value.id.clone(), v.value.data().ok()?)))
        .collect();
    open.sort_by_key(|(_, c)| c.detected_at);
    Ok(open)
}

/// Settles conflict `id` by taking `side`'s values; returns the write-back it sent, if any.
pub async fn resolve(
    app: &App,
    tenant_id: &str,
    id: &str,
    side: Side,
    user: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Outgoing>, ChangeError> {
    let missing = || ChangeError::Invalid(format!("no conflict `{id}` in tenant `{tenant_id}`"));
    let stored = app.store.get(tenant_id, id).await?.ok_or_else(missing)?;
    let mut record: ConflictRecord = stored.value.data().map_err(|_| missing())?;
    if record.status != ConflictStatus::Open {
        return Err(ChangeError::Invalid(format!(
            "conflict `{id}` is resolved already"
        )));
    }
    let shard_stored = app
        .store
        .get(tenant_id, &record.shard_id)
        .await?
        .ok_or_else(|| ChangeError::Invalid(format!("shard `{}` is gone", record.shard_id)))?;
    let mut shard = shard_stored.value;
    let link = shard
        .external_relationships
        .iter_mut()
        .find(|r| r.is_to(&record.integration_id, &record.external_id))
        .ok_or_else(|| {
            ChangeError::Invalid(format!(
                "shard `{}` is no longer linked to `{}`",
                record.shard_id, record.external_id
            ))
        })?;
    for field in &record.fields {
        // Either way the provider's value is what the two last agreed on: taken, it is agreed
        // again; not taken, Castiel's value reads as the newer change and is written back.
        link.field_hashes
            .insert(field.field.clone(), value_hash(Some(&field.provider)));
    }
    if side == Side::Provider {
        if let Some(data) = shard.structured_data.as_object_mut() {
            for field in &record.fields {
                data.insert(field.field.clone(), field.provider.clone());
            }
        }
        shard.updated_at = Some(now);
    }
    shard.content_hash = Some(super::plan::content_hash(&shard));
    app.store.replace(&shard, &shard_stored.etag).await?;

    let mut sent = Vec::new();
    if side == Side::Castiel {
        let integration: Option<Integration> = app
            .store
            .get(tenant_id, &record.integration_id)
            .await?
            .and_then(|v| v.value.data().ok());
        if let Some(integration) = integration {
            let message = WriteBackMessage {
                shard_id: shard.id.clone(),
                tenant_id: tenant_id.to_string(),
                operation: WriteBackOperation::Update,
                changed_fields: Some(record.fields.iter().map(|f| f.field.clone()).collect()),
                external_system: integration.provider_name,
                external_id: Some(record.external_id.clone()),
                triggered_at: now,
                triggered_by: user.to_string(),
                integration_id: Some(record.integration_id.clone()),
                attempt: 1,
                holds: 0,
            };
            let message_id = format!("{id}:resolved:{}", now.timestamp_millis());
            app.queue
                .send(
                    OutgoingMessage::json(SYNC_OUTBOUND, message_id.clone(), &message)
                        .in_session(record.integration_id.as_str()),
                )
                .await?;
            sent.push(Outgoing {
                integration_id: record.integration_id.clone(),
                message,
                message_id,
            });
        }
    }

    record.status = ConflictStatus::Resolved;
    record.resolved_at = Some(now);
    record.resolved_by = Some(user.to_string());
    record.taken = Some(side);
    let mut conflict_shard = stored.value;
    conflict_shard.structured_data = serde_json::to_value(&record).unwrap_or(Value::Null);
    conflict_shard.updated_at = Some(now);
    app.store.replace(&conflict_shard, &stored.etag).await?;
    let fields: Vec<Value> = record
        .fields
        .iter()
        .map(|f| json!({"field": f.field, "strategy": "manual", "winner": side}))
        .collect();
    publish(
        app,
        &[Event::new(
            events::CONFLICT_RESOLVED,
            format!(
                "/tenants/{tenant_id}/integrations/{}",
                record.integration_id
            ),
            // The conflict as it was resolved from: the same resolution retried is one event.
            &format!("{}@{}", conflict_shard.id, stored.etag),
            now,
            json!({"integrationId": record.integration_id, "tenantId": tenant_id,
                   "shardId": record.shard_id, "externalId": record.external_id,
                   "fields": fields, "resolvedBy": user}),
        )],
    )
    .await;
    Ok(sent)
}
