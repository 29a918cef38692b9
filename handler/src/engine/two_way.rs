//! What a two-way sync leaves besides shards, whichever direction found the conflict: events
//! that announce it (the fields, strategies and winners, never the values, which may be
//! personal data), and the `c_syncConflict` record that keeps both values of the fields left
//! for an operator.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::plan::ConflictFound;
use crate::app::App;
use crate::model::conflict::{ConflictRecord, ConflictStatus, ConflictingField, value_hash};
use crate::model::event::types as events;
use crate::model::mapping::EntityMapping;
use crate::model::shard::{Relationship, types as shard_types};
use crate::model::{Event, Shard};
use crate::store::StoreError;

/// Times a conflict record is read again and rewritten when another writer changed it first.
const MAX_RECORD_CONFLICTS: usize = 20;

/// Which sync found a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Inbound,
    WriteBack,
}

/// `integration.conflict.detected`, and `.resolved` when the strategy settled some fields.
pub fn conflict_events(
    tenant_id: &str,
    integration_id: &str,
    entity: &str,
    found: &ConflictFound,
    by: Found,
    now: DateTime<Utc>,
) -> Vec<Event> {
    let fields: Vec<Value> = found
        .fields
        .iter()
        .map(|f| json!({"field": f.field, "strategy": f.strategy, "winner": f.winner}))
        .collect();
    let data = json!({
        "integrationId": integration_id, "tenantId": tenant_id, "shardId": found.shard_id,
        "externalId": found.external_id, "entity": entity, "fields": fields,
        "direction": match by { Found::Inbound => "inbound", Found::WriteBack => "outbound" },
    });
    let subject = format!("/tenants/{tenant_id}/integrations/{integration_id}");
    // The conflict is what it says and the values it is between (their fingerprints, as links
    // keep them): found again (a job delivered twice) it is the same one, and the same fields
    // conflicting again later over other values are another.
    let mut occurrence = data.to_string();
    for f in &found.fields {
        for side in [&found.castiel, &found.provider] {
            occurrence.push(' ');
            occurrence.push_str(&value_hash(side.get(&f.field)));
        }
    }
    let mut out = vec![Event::new(
        events::CONFLICT_DETECTED,
        &subject,
        &occurrence,
        now,
        data.clone(),
    )];
    if found.fields.iter().any(|f| f.winner.is_some()) {
        out.push(Event::new(
            events::CONFLICT_RESOLVED,
            &subject,
            &occurrence,
            now,
            data,
        ));
    }
    out
}

/// Keeps the fields of `found` left for an operator in the shard's conflict record, adding
/// them to an open record if the shard has one. Nothing is written when every field was
/// settled.
pub async fn keep_open(
    app: &App,
    tenant_id: &str,
    integration_id: &str,
    mapping: &EntityMapping,
    found: &ConflictFound,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let open: Vec<ConflictingField> = found
        .fields
        .iter()
        .filter(|f| f.winner.is_none())
        .map(|f| ConflictingField {
            field: f.field.clone(),
            castiel: found.castiel.get(&f.field).cloned().unwrap_or(Value::Null),
            provider: found.provider.get(&f.field).cloned().unwrap_or(Value::Null),
        })
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    let id = ConflictRecord::id_for(&found.shard_id, integration_id);
    // Under the record's etag, as an operator's resolution and another sync's conflicts are
    // written: neither is lost to this one's copy read before them.
    for _ in 0..MAX_RECORD_CONFLICTS {
        let stored = app.store.get(tenant_id, &id).await?;
        let etag = stored.as_ref().map(|v| v.etag.clone());
        let record = match stored.and_then(|v| v.value.data::<ConflictRecord>().ok()) {
            // What an operator settled, found again from the values read before they did
            // (this write met the resolution's), is not opened again; anything else is new.
            Some(mut record) if record.status == ConflictStatus::Resolved => {
                let fresh = record.unsettled(&open);
                if fresh.is_empty() {
                    return Ok(());
                }
                record.absorb(fresh, now);
                record
            }
            Some(mut record) => {
                record.absorb(open.clone(), now);
                record
            }
            None => ConflictRecord {
                integration_id: integration_id.to_string(),
                shard_id: found.shard_id.clone(),
                shard_type_id: mapping.shard_type_id.clone(),
                external_id: found.external_id.clone(),
                entity: mapping.external_entity.clone(),
                fields: open.clone(),
                detected_at: now,
                status: ConflictStatus::Open,
                resolved_at: None,
                resolved_by: None,
                taken: None,
            },
        };
        let shard = Shard {
            id: id.clone(),
            tenant_id: tenant_id.to_string(),
            shard_type_id: shard_types::SYNC_CONFLICT.into(),
            name: format!("Conflict on {}", found.shard_id),
            structured_data: serde_json::to_value(&record).unwrap_or(Value::Null),
            relationships: vec![Relationship {
                kind: "conflict_of".into(),
                target_id: found.shard_id.clone(),
                target_type: mapping.shard_type_id.clone(),
            }],
            created_by: Some("system".into()),
            created_at: Some(now),
            updated_at: Some(now),
            ..Shard::default()
        };
        let saved = match &etag {
            Some(etag) => app.store.replace(&shard, etag).await,
            None => app.store.create(&shard).await,
        };
        match saved {
            Ok(_) => return Ok(()),
            Err(StoreError::PreconditionFailed | StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable(format!(
        "conflict record `{id}` kept changing while being written"
    )))
}
