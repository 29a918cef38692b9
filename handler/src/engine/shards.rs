//! Changing a shard the way Castiel's shard service does, and sending the write-backs the
//! change calls for: what `handler shards put` and `handler shards delete` do, so that two-way
//! sync can be used and tried without the platform. The platform's own producer sends the same
//! `WriteBackMessage` (see docs/data-model.md).
//!
//! A change goes to every integration of the tenant that writes the shard's type back: an
//! update to those the shard is linked to, a create to those it is not (if their mapping keys
//! creates by an idempotency field), a delete to those it is linked to. Each message is in the
//! integration's session, with a MessageId derived from the shard's new state, so sending the
//! same change twice writes it once.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::plan::content_hash;
use crate::app::App;
use crate::model::messages::{WriteBackMessage, WriteBackOperation};
use crate::model::shard::types as shard_types;
use crate::model::{Integration, Shard};
use crate::queue::{OutgoingMessage, QueueError, SYNC_OUTBOUND};
use crate::store::{Op, ShardQuery, StoreError};

/// Why a shard change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A write-back a change calls for, and the integration whose session it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub integration_id: String,
    pub message: WriteBackMessage,
    pub message_id: String,
}

/// The fields of `structuredData` whose values differ between two versions of a shard.
pub fn changed_fields(before: &Map<String, Value>, after: &Map<String, Value>) -> Vec<String> {
    let mut fields: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect();
    fields.sort();
    fields.dedup();
    fields
}

/// The write-backs a change of `shard` (to `after`; `None` for a deletion) calls for, given
/// the tenant's integrations.
pub fn write_backs(
    shard: &Shard,
    changed: &[String],
    deleted: bool,
    integrations: &[(String, Integration)],
    user: &str,
    now: DateTime<Utc>,
) -> Vec<Outgoing> {
    let state = content_hash(shard);
    integrations
        .iter()
        .filter_map(|(id, integration)| {
            let mapping = integration.write_back_mapping(&shard.shard_type_id)?;
            let link = shard
                .write_back_link(id)
                .map(|i| &shard.external_relationships[i]);
            // (A shard restored after Castiel deleted it, with no other record, is made again.)
            let gone = shard.outlived_record_at(id);
            let operation = match (deleted, link) {
                (true, Some(_)) => WriteBackOperation::Delete,
                (true, None) => return None,
                (false, Some(_)) if changed.is_empty() => return None,
                (false, Some(_)) => WriteBackOperation::Update,
                (false, None) if mapping.idempotency_field.is_some() && !gone => {
                    WriteBackOperation::Create
                }
                (false, None) => return None,
            };
            let message = WriteBackMessage {
                shard_id: shard.id.clone(),
                tenant_id: shard.tenant_id.clone(),
                operation,
                changed_fields: (operation == WriteBackOperation::Update).then(|| changed.to_vec()),
                external_system: integration.provider_name.clone(),
                external_id: link.map(|r| r.external_id.clone()),
                triggered_at: now,
                triggered_by: user.to_string(),
                integration_id: Some(id.clone()),
                attempt: 1,
                holds: 0,
            };
            // An update or a delete is the state it left and when: a value changed back and
            // forth, or a shard deleted, restored and deleted again, within the broker's
            // duplicate window is each time a write-back of its own. A create told twice is
            // one (the record it makes is keyed by the shard anyway).
            let message_id = match operation {
                WriteBackOperation::Create => format!("{}:{state}:{id}", shard.id),
                _ => {
                    let at = shard.updated_at.map_or(0, |t| t.timestamp_micros());
                    format!("{}:{state}:{at}:{id}", shard.id)
                }
            };
            Some(Outgoing {
                integration_id: id.clone(),
                message_id,
                message,
            })
        })
        .collect()
}

/// Writes `given` over the stored shard of the same id (or creates it), keeping what the sync
/// engine keeps on it (its links to external records, fingerprints and match keys), and sends
/// the write-backs the change calls for. Returns them.
pub async fn put(
    app: &App,
    given: Shard,
    user: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Outgoing>, ChangeError> {
    engines_own(&given.shard_type_id)?;
    let stored = app.store.get(&given.tenant_id, &given.id).await?;
    if let Some(stored) = &stored {
        // A stored shard of the engine's own type is refused here too: `given` passed above.
        if stored.value.shard_type_id != given.shard_type_id {
            return Err(ChangeError::Invalid(format!(
                "shard `{}` is a `{}`; a shard's type does not change",
                given.id, stored.value.shard_type_id
            )));
        }
    }
    let before = stored
        .as_ref()
        .and_then(|v| v.value.structured_data.as_object().cloned())
        .unwrap_or_default();
    let mut shard = match &stored {
        Some(v) => Shard {
            name: given.name.clone(),
            structured_data: given.structured_data.clone(),
            deleted_at: None,
            ..v.value.clone()
        },
        None => Shard {
            created_at: Some(now),
            created_by: Some(user.to_string()),
            ..given.clone()
        },
    };
    if !shard.structured_data.is_object() {
        return Err(ChangeError::Invalid(
            "structuredData must be a JSON object".into(),
        ));
    }
    let after = shard
        .structured_data
        .as_object()
        .cloned()
        .unwrap_or_default();
    let changed = changed_fields(&before, &after);
    shard.updated_at = Some(now);
    shard.content_hash = Some(content_hash(&shard));
    match &stored {
        Some(v) => app.store.replace(&shard, &v.etag).await?,
        None => app.store.create(&shard).await?,
    };
    let outgoing = write_backs(
        &shard,
        &changed,
        false,
        &integrations(app, &shard.tenant_id).await?,
        user,
        now,
    );
    send(app, &outgoing).await?;
    Ok(outgoing)
}

/// Refuses a change to a shard of the engine's own types.
fn engines_own(shard_type: &str) -> Result<(), ChangeError> {
    if !shard_types::is_the_engines(shard_type) {
        return Ok(());
    }
    let instead = match shard_type {
        shard_types::INTEGRATION => "; use `handler integrations put`",
        shard_types::SYNC_CONFLICT => "; use `handler conflicts resolve`",
        _ => "",
    };
    Err(ChangeError::Invalid(format!(
        "`{shard_type}` shards are the engine's own{instead}"
    )))
}

/// Soft-deletes the shard, as Castiel does, and sends the deletes the change calls for.
pub async fn delete(
    app: &App,
    tenant_id: &str,
    id: &str,
    user: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Outgoing>, ChangeError> {
    let stored =
        app.store.get(tenant_id, id).await?.ok_or_else(|| {
            ChangeError::Invalid(format!("no shard `{id}` in tenant `{tenant_id}`"))
        })?;
    let mut shard = stored.value;
    engines_own(&shard.shard_type_id)?;
    if shard.deleted_at.is_none() {
        shard.deleted_at = Some(now);
        shard.updated_at = Some(now);
        shard.content_hash = Some(content_hash(&shard));
        app.store.replace(&shard, &stored.etag).await?;
    }
    let outgoing = write_backs(
        &shard,
        &[],
        true,
        &integrations(app, tenant_id).await?,
        user,
        now,
    );
    send(app, &outgoing).await?;
    Ok(outgoing)
}

async fn integrations(
    app: &App,
    tenant_id: &str,
) -> Result<Vec<(String, Integration)>, StoreError> {
    let query = ShardQuery::of_type(shard_types::INTEGRATION)
        .in_tenant(tenant_id)
        .filter("structuredData.writeBack.enabled", Op::Eq, json!(true));
    Ok(app
        .store
        .query(&query)
        .await?
        .into_iter()
        .filter_map(|v| Some((v.value.id.clone(), v.value.data::<Integration>().ok()?)))
        .collect())
}

async fn send(app: &App, outgoing: &[Outgoing]) -> Result<(), QueueError> {
    for o in outgoing {
        app.queue
            .send(
                OutgoingMessage::json(SYNC_OUTBOUND, o.message_id.clone(), &o.message)
                    .in_session(o.integration_id.as_str()),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shard::{ExternalRelationship, RelationshipStatus, SyncDirection};

    fn integration(write_back: bool, idempotency_field: Option<&str>) -> Integration {
        serde_json::from_value(json!({
            "providerName": "salesforce",
            "writeBack": {"enabled": write_back},
            "entityMappings": [{"externalEntity": "Contact", "shardTypeId": "c_contact",
                                "bidirectional": true, "idempotencyField": idempotency_field}]
        }))
        .unwrap()
    }

    fn ann() -> Shard {
        serde_json::from_value(json!({
            "id": "shard-ann", "tenantId": "t1", "shardTypeId": "c_contact",
            "structuredData": {"name": "Ann"}
        }))
        .unwrap()
    }

    #[test]
    fn a_change_goes_to_every_integration_that_writes_the_type_back() {
        let now = Utc::now();
        let mut linked = ann();
        linked
            .external_relationships
            .push(ExternalRelationship::synced(
                "int-sf",
                "003A",
                SyncDirection::Bidirectional,
                now,
            ));
        let integrations = vec![
            (
                "int-sf".to_string(),
                integration(true, Some("Castiel_Id__c")),
            ),
            ("int-dyn".to_string(), integration(true, Some("castiel_id"))),
            ("int-off".to_string(), integration(false, Some("x"))),
            ("int-unkeyed".to_string(), integration(true, None)),
        ];
        let changed = vec!["name".to_string()];
        let out = write_backs(&linked, &changed, false, &integrations, "user-7", now);
        let ops: Vec<(&str, WriteBackOperation)> = out
            .iter()
            .map(|o| (o.integration_id.as_str(), o.message.operation))
            .collect();
        assert_eq!(
            ops,
            [
                ("int-sf", WriteBackOperation::Update),
                ("int-dyn", WriteBackOperation::Create)
            ],
            "linked: update; not linked but keyed: create; off or unkeyed: nothing"
        );
        assert_eq!(out[0].message.changed_fields, Some(changed.clone()));
        assert_eq!(out[0].message.external_id.as_deref(), Some("003A"));
        assert_eq!(
            out[0].message_id,
            write_backs(&linked, &changed, false, &integrations, "user-7", now)[0].message_id,
            "the same change has the same MessageId"
        );

        let deleted = write_backs(&linked, &[], true, &integrations, "user-7", now);
        assert_eq!(deleted.len(), 1);
        assert_eq!(deleted[0].message.operation, WriteBackOperation::Delete);
        assert!(
            write_backs(&linked, &[], false, &integrations, "user-7", now)
                .iter()
                .all(|o| o.message.operation != WriteBackOperation::Update),
            "no update without a changed field"
        );
    }

    #[test]
    fn a_record_deleted_at_the_provider_is_not_made_again() {
        let now = Utc::now();
        let mut merged = ann();
        let mut gone =
            ExternalRelationship::synced("int-sf", "003A", SyncDirection::Bidirectional, now);
        gone.sync_status = RelationshipStatus::Deleted;
        merged.external_relationships.push(gone);
        merged
            .external_relationships
            .push(ExternalRelationship::synced(
                "int-dyn",
                "c-1",
                SyncDirection::Inbound,
                now,
            ));
        let integrations = vec![(
            "int-sf".to_string(),
            integration(true, Some("Castiel_Id__c")),
        )];
        let changed = vec!["name".to_string()];
        assert!(write_backs(&merged, &changed, false, &integrations, "user-7", now).is_empty());

        // Deleted from Castiel, its record with it, then restored: it is made again.
        let mut restored = merged.clone();
        restored.external_relationships.truncate(1);
        let out = write_backs(&restored, &changed, false, &integrations, "user-7", now);
        assert_eq!(out[0].message.operation, WriteBackOperation::Create);
    }

    #[test]
    fn a_value_changed_back_and_forth_is_a_write_back_each_time() {
        let integrations = vec![(
            "int-sf".to_string(),
            integration(true, Some("Castiel_Id__c")),
        )];
        let changed = vec!["name".to_string()];
        let at = |seconds: i64| {
            let mut shard = ann();
            shard
                .external_relationships
                .push(ExternalRelationship::synced(
                    "int-sf",
                    "003A",
                    SyncDirection::Bidirectional,
                    Utc::now(),
                ));
            shard.updated_at = Some(DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap());
            write_backs(&shard, &changed, false, &integrations, "user-7", Utc::now())[0]
                .message_id
                .clone()
        };
        assert_ne!(at(0), at(60), "Ann, then Bob, then Ann again");
        assert_eq!(at(0), at(0));
    }

    #[test]
    fn changed_fields_are_the_ones_whose_values_differ() {
        let before = json!({"name": "Ann", "email": "a@x", "phone": "1"});
        let after = json!({"name": "Ann Lee", "email": "a@x", "title": "CTO"});
        assert_eq!(
            changed_fields(before.as_object().unwrap(), after.as_object().unwrap()),
            ["name", "phone", "title"]
        );
    }
}
