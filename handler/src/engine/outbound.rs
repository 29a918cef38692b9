//! Writing one Castiel change back to the provider: a `WriteBackMessage` from `sync-outbound`
//! becomes a create, update or delete through the adapter's `WriteBack`, and a
//! `c_integrationSync` record with outbound stats.
//!
//! The rules:
//!
//! * The shard is read when the message is handled, not when it was sent: a write-back whose
//!   shard changed again since writes the latest state, and the later message finds nothing
//!   left to write. Sessions (one per integration) keep an integration's write-backs in order.
//! * A shard with no link to the provider yet is created there, keyed by its own id in the
//!   mapping's idempotency field: a redelivered or retried create, or one whose answer was
//!   lost in a crash, finds the record the first attempt made instead of making another.
//! * An update reads the provider's record first and writes only the fields Castiel changed
//!   since the two last agreed; fields the provider changed too are settled by the
//!   integration's strategy ([`crate::model::conflict`]), as an inbound sync would settle
//!   them. Fields that cannot be mapped back are named in the history and not written.
//! * After the write the link records what both sides now hold, so the next inbound sync reads
//!   the record back as unchanged: no shard write, no write-back.
//! * A failure a retry can fix (including the provider refusing a write because its record
//!   moved on, which the next attempt reads again) is re-sent to the session after the retry
//!   delay; any other is dead-lettered with its reason.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use adapters::{ErrorCode, FetchRequest, RecordWrite};

use super::credentials;
use super::failure::{Failure, FailureCode};
use super::plan::{ConflictFound, content_hash, derived_ids, retired};
use super::retry::{AfterFailure, MAX_ATTEMPTS, after_failure, backoff};
use super::two_way;
use super::{Transient, history_slot, publish};
use crate::app::App;
use crate::model::conflict::{Modified, reconcile_record, value_hash};
use crate::model::history::{Direction, EntitySyncStats, SyncJobType, SyncTrigger};
use crate::model::integration::IntegrationStatus;
use crate::model::mapping::{EntityMapping, reverse, transform};
use crate::model::messages::{WriteBackMessage, WriteBackOperation, parse_body};
use crate::model::shard::{
    ExternalRelationship, RelationshipStatus, SyncDirection, types as shard_types,
};
use crate::model::{Integration, IntegrationSync, Shard, SyncError, SyncStats, SyncStatus};
use crate::queue::properties::REPLAYED_FROM;
use crate::queue::{OutgoingMessage, SYNC_OUTBOUND, ServiceBusMessage, dead_letter, property};
use crate::store::{Op, ShardQuery, StoreError, Versioned};
use crate::telemetry::Dimensions;

/// How long a write-back the provider's allocation refused (a daily cap) waits before it is
/// tried again, where the provider does not say when the allocation comes back; and the
/// longest it waits where it does, to look again.
const ALLOCATION_HOLD: Duration = Duration::hours(1);
const LONGEST_ALLOCATION_HOLD: Duration = Duration::days(1);
/// How long after Castiel made a change its write-back may be held for an allocation: a
/// provider that refuses longer is not coming back by itself.
const LONGEST_HOLD: Duration = super::plan::DELETION_WRITE_BACK_WAIT;

/// What to do after attempt `attempt` of a write-back triggered at `triggered_at` failed.
///
/// - A write the provider refused because its record changed since it was read is tried
///   again: the next attempt reads the record anew and settles what changed.
/// - A write refused because the provider's allocation is used up (Zoom's 100 meeting updates
///   a day, Salesforce's daily API requests) is held without spending an attempt until the
///   allocation comes back (where the provider says; else an hour at a time), for up to a week
///   from the change: ten quick attempts would all meet the same cap and dead-letter a write
///   that only had to wait.
pub fn after_write_failure(
    failure: &Failure,
    attempt: u32,
    triggered_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> AfterFailure {
    let code = failure.code;
    let back = failure
        .resume_at
        .filter(|at| *at > now)
        .map_or(now + ALLOCATION_HOLD, |at| {
            at.min(now + LONGEST_ALLOCATION_HOLD)
        });
    // The last hold ends with the week, however much later the provider says it is back.
    let deadline = triggered_at
        .checked_add_signed(LONGEST_HOLD)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if failure.resume_next_run && deadline > now {
        AfterFailure::RetryAt {
            attempt,
            at: back.min(deadline),
        }
    } else if code == FailureCode::Provider(ErrorCode::Conflict) && attempt < MAX_ATTEMPTS {
        AfterFailure::RetryAt {
            attempt: attempt + 1,
            at: now + backoff(attempt),
        }
    } else {
        after_failure(code, attempt, failure.resume_at, now)
    }
}

/// The MessageId of a write-back's next try, `retry`: the first message's id and which try
/// it is (its attempt, or its hold), so that a redelivery which sends it again is dropped as a
/// duplicate, and ids do not grow with each try (Service Bus takes 128 characters).
fn retry_id(message_id: &str, retry: &WriteBackMessage, held: bool) -> String {
    let first = [":attempt-", ":held-"]
        .iter()
        .filter_map(|tag| message_id.find(tag))
        .min()
        .map_or(message_id, |end| &message_id[..end]);
    if held {
        format!("{first}:held-{}", retry.holds)
    } else {
        format!("{first}:attempt-{}", retry.attempt)
    }
}

/// The shard, the integration and the mapping a write-back goes through.
struct Target {
    shard: Versioned<Shard>,
    integration_id: String,
    integration_name: String,
    integration: Integration,
    mapping: EntityMapping,
}

/// What one write-back did.
#[derive(Debug, Default)]
struct Pushed {
    created: u64,
    updated: u64,
    deleted: u64,
    skipped: u64,
    /// Fields that could not be mapped back, with why.
    irreversible: Vec<(String, String)>,
    note: Option<String>,
}

/// Handles the write-back in `message`. `Ok` means the message is settled (written, re-sent
/// for a retry, or dead-lettered); `Err` means fail the invocation.
pub async fn process(
    app: &App,
    message: &ServiceBusMessage,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let write_back: WriteBackMessage = match parse_body(&message.body) {
        Ok(w) => w,
        Err(reason) => {
            tracing::warn!(message_id = ?message.message_id, %reason, "dead-lettering an unreadable write-back");
            return send_dead_letter(app, message, FailureCode::InvalidMessage, &reason).await;
        }
    };
    let target = match find_target(app, &write_back).await? {
        Ok(target) => target,
        Err(failure) => {
            tracing::warn!(shard_id = %write_back.shard_id, error = %failure, "dead-lettering a write-back");
            return send_dead_letter(app, message, failure.code, &failure.message).await;
        }
    };
    let span = tracing::info_span!(
        "write_back",
        correlationId = %message.message_id.clone().unwrap_or_default(),
        integrationId = %target.integration_id,
        tenantId = %write_back.tenant_id,
        provider = %target.integration.provider_name,
        syncType = "write_back",
        attempt = write_back.attempt,
    );
    handle(app, message, write_back, target, now)
        .instrument(span)
        .await
}

async fn handle(
    app: &App,
    message: &ServiceBusMessage,
    write_back: WriteBackMessage,
    target: Target,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    // A write-back is idempotent by its message: one whose record says it finished is not
    // carried out again, unless an operator replays it from the dead letters.
    let (record_id, previous) = history_slot(
        app,
        &write_back.tenant_id,
        &job_id(&write_back, message),
        write_back.triggered_at,
    )
    .await?;
    let replayed = property(&message.application_properties, REPLAYED_FROM).is_some();
    if !replayed && previous.is_some_and(|r| r.is_finished()) {
        tracing::info!("write-back already carried out; redelivery ignored");
        return Ok(());
    }
    // A paused integration writes nothing back, nor one in error until someone sets new
    // credentials: the write-back waits, dead-lettered, to be replayed once it is active (it
    // writes the shard as it is then).
    if target.integration.status != IntegrationStatus::Active {
        let reason = format!(
            "integration `{}` is {}: the write-back waits here, to be replayed once it is active again",
            target.integration_id,
            target.integration.status.as_phrase()
        );
        tracing::info!(shard_id = %write_back.shard_id, %reason, "dead-lettering a write-back");
        return send_dead_letter(app, message, FailureCode::IntegrationNotActive, &reason).await;
    }
    let started = Utc::now();
    let result = write(app, &write_back, &target, now).await;
    let completed = Utc::now().max(started);
    let duration_ms = (completed - started).num_milliseconds().max(0) as u64;
    app.metrics.writeback_finished(
        Dimensions {
            integration_id: &target.integration_id,
            tenant_id: &write_back.tenant_id,
            provider: &target.integration.provider_name,
        },
        duration_ms,
    );
    let mut record = history(&write_back, &target, message, started);
    record.completed_at = Some(completed);
    record.duration_ms = Some(duration_ms);
    match result {
        Ok(pushed) => {
            record.status = if pushed.irreversible.is_empty() {
                SyncStatus::Success
            } else {
                SyncStatus::Partial
            };
            record.status_message = Some(pushed.note.clone().unwrap_or_else(|| {
                format!(
                    "written back: {} created, {} updated, {} deleted",
                    pushed.created, pushed.updated, pushed.deleted
                )
            }));
            let errors: Vec<SyncError> = pushed
                .irreversible
                .iter()
                .map(|(field, why)| SyncError {
                    code: ErrorCode::ValidationError.as_str().into(),
                    message: format!("not written back: {why}"),
                    entity: Some(target.mapping.external_entity.clone()),
                    record_id: None,
                    shard_id: Some(write_back.shard_id.clone()),
                    field: Some(field.clone()),
                    timestamp: completed,
                    retryable: false,
                })
                .collect();
            record.stats = outbound_stats(&pushed, 0);
            record.entity_stats = Some(vec![entity_stats(&target.mapping, &pushed, 0, &errors)]);
            record.errors = (!errors.is_empty()).then_some(errors);
            tracing::info!(status = ?record.status, stats = %json!(record.stats), duration_ms, "write-back finished");
            save(app, &write_back.tenant_id, &record_id, &record, completed).await
        }
        Err(failure) => {
            let error = SyncError {
                code: failure.code.as_str().into(),
                message: failure.message.clone(),
                entity: Some(target.mapping.external_entity.clone()),
                record_id: None,
                shard_id: Some(write_back.shard_id.clone()),
                field: None,
                timestamp: completed,
                retryable: failure.is_retryable(),
            };
            record.stats = outbound_stats(&Pushed::default(), 1);
            record.entity_stats = Some(vec![entity_stats(
                &target.mapping,
                &Pushed::default(),
                1,
                std::slice::from_ref(&error),
            )]);
            record.errors = Some(vec![error]);
            let after = after_write_failure(
                &failure,
                write_back.attempt,
                write_back.triggered_at,
                completed,
            );
            match after {
                AfterFailure::RetryAt { attempt, at } => {
                    let held = attempt == write_back.attempt;
                    let retry = WriteBackMessage {
                        attempt,
                        holds: write_back.holds + u32::from(held),
                        ..write_back.clone()
                    };
                    let first = message.message_id.as_deref();
                    let id = retry_id(first.unwrap_or(&write_back.shard_id), &retry, held);
                    app.queue
                        .send(
                            OutgoingMessage::json(SYNC_OUTBOUND, id, &retry)
                                .in_session(target.integration_id.as_str())
                                .scheduled_at(at),
                        )
                        .await?;
                    record.status = SyncStatus::Failed;
                    record.status_message = Some(if held {
                        format!(
                            "the provider's allocation is used up ({}); held until {}",
                            failure.message,
                            at.to_rfc3339()
                        )
                    } else {
                        format!(
                            "attempt {} of {MAX_ATTEMPTS} failed ({}); retrying at {}",
                            write_back.attempt,
                            failure.code,
                            at.to_rfc3339()
                        )
                    });
                    tracing::warn!(error = %failure, retry_at = %at, "write-back failed; retry scheduled");
                    save(app, &write_back.tenant_id, &record_id, &record, completed).await
                }
                AfterFailure::DeadLetter { exhausted } => {
                    let reason = if exhausted {
                        format!(
                            "{} (gave up after {MAX_ATTEMPTS} attempts)",
                            failure.message
                        )
                    } else {
                        failure.message.clone()
                    };
                    // The dead letter before the record that says the write-back is over: a
                    // redelivery finds it unfinished and sends the dead letter again (the same
                    // message id), rather than finding it over and losing the change.
                    send_dead_letter(app, message, failure.code, &reason).await?;
                    record.status = SyncStatus::Failed;
                    record.status_message = Some(reason);
                    tracing::error!(error = %failure, exhausted, "write-back failed");
                    save(app, &write_back.tenant_id, &record_id, &record, completed).await
                }
            }
        }
    }
}

/// Why no integration was chosen to write a change back.
#[derive(Debug, PartialEq, Eq)]
enum Unchosen {
    /// None writes the shard's type back.
    None,
    /// Several do, and the shard is linked to none of them or to more than one: which one was
    /// meant is unknown.
    Several,
}

/// Which of the integrations that write a shard's type back (`writers`, by id) writes this
/// shard: the one it is linked to (`linked`, the integrations of its links), or the only one.
fn choose_writer(writers: &[&str], linked: &[&str]) -> Result<usize, Unchosen> {
    let mut linked_writers = (0..writers.len()).filter(|&i| linked.contains(&writers[i]));
    match (linked_writers.next(), linked_writers.next()) {
        (Some(only), None) => return Ok(only),
        (Some(_), Some(_)) => return Err(Unchosen::Several),
        (None, _) => {}
    }
    match writers.len() {
        0 => Err(Unchosen::None),
        1 => Ok(0),
        _ => Err(Unchosen::Several),
    }
}

/// Finds what the write-back is about; `Err` names why it cannot be carried out at all.
async fn find_target(
    app: &App,
    write_back: &WriteBackMessage,
) -> Result<Result<Target, Failure>, Transient> {
    let tenant = &write_back.tenant_id;
    let Some(shard) = app.store.get(tenant, &write_back.shard_id).await? else {
        return Ok(Err(Failure::new(
            ErrorCode::NotFound,
            format!(
                "shard `{}` of tenant `{tenant}` does not exist",
                write_back.shard_id
            ),
        )));
    };
    let shard_type = shard.value.shard_type_id.clone();
    let candidates: Vec<Shard> = match &write_back.integration_id {
        Some(id) => app
            .store
            .get(tenant, id)
            .await?
            .map(|v| v.value)
            .into_iter()
            .collect(),
        None => {
            let query = ShardQuery::of_type(shard_types::INTEGRATION)
                .in_tenant(tenant)
                .filter(
                    "structuredData.providerName",
                    Op::Eq,
                    json!(write_back.external_system),
                );
            app.store
                .query(&query)
                .await?
                .into_iter()
                .map(|v| v.value)
                .collect()
        }
    };
    let writers: Vec<(Shard, Integration)> = candidates
        .into_iter()
        .filter_map(|s| {
            let integration: Integration = s.data().ok()?;
            integration.write_back_mapping(&shard_type)?;
            Some((s, integration))
        })
        .collect();
    let linked: Vec<&str> = shard
        .value
        .external_relationships
        .iter()
        .map(|r| r.integration_id.as_str())
        .collect();
    let ids: Vec<&str> = writers.iter().map(|(s, _)| s.id.as_str()).collect();
    let chosen = match choose_writer(&ids, &linked) {
        Ok(index) => index,
        Err(Unchosen::None) => {
            return Ok(Err(Failure::new(
                ErrorCode::ValidationError,
                format!(
                    "no integration of tenant `{tenant}` with `{}` writes `{shard_type}` shards \
                     back (writeBack.enabled and a bidirectional mapping)",
                    write_back.external_system
                ),
            )));
        }
        Err(Unchosen::Several) => {
            return Ok(Err(Failure::new(
                ErrorCode::ValidationError,
                format!(
                    "integrations {} of tenant `{tenant}` all write `{shard_type}` shards back to \
                     `{}`, and shard `{}` is not linked to exactly one of them: the write-back \
                     must name its integrationId",
                    ids.join(", "),
                    write_back.external_system,
                    write_back.shard_id
                ),
            )));
        }
    };
    let (integration_shard, integration) = writers.into_iter().nth(chosen).expect("chosen");
    let mapping = integration
        .write_back_mapping(&shard_type)
        .expect("a writer writes the type back")
        .clone();
    Ok(Ok(Target {
        shard,
        integration_id: integration_shard.id,
        integration_name: integration_shard.name,
        integration,
        mapping,
    }))
}

/// Carries the write-back out at the provider and records what both sides now hold.
async fn write(
    app: &App,
    write_back: &WriteBackMessage,
    target: &Target,
    now: DateTime<Utc>,
) -> Result<Pushed, Failure> {
    let Target {
        integration,
        integration_id,
        mapping,
        ..
    } = target;
    let name = &integration.provider_name;
    let provider = app.providers.get(name).ok_or_else(|| {
        Failure::new(
            FailureCode::ProviderNotSupported,
            format!("this build has no adapter for provider `{name}`"),
        )
    })?;
    let writer = provider.write_back().ok_or_else(|| {
        Failure::new(
            FailureCode::ProviderNotSupported,
            format!("`{name}` records cannot be written back"),
        )
    })?;
    let mut conn =
        credentials::connect(app, &write_back.tenant_id, integration_id, integration).await?;
    let mut shard = target.shard.value.clone();
    let mut data = shard
        .structured_data
        .as_object()
        .cloned()
        .unwrap_or_default();
    let link = shard.write_back_link(integration_id);
    let mut pushed = Pushed::default();
    let mut events = Vec::new();

    if write_back.operation == WriteBackOperation::Delete && shard.deleted_at.is_none() {
        // Changed since the delete was asked for: restored, and the shard is read when the
        // message is handled. Otherwise the deletion is not visible yet, and is waited for.
        // A shard a sync of another record brought back (one merged into it, through another
        // integration) with an older time reads the same: once the deletion has had long
        // enough to show, it is taken as restored too.
        if shard
            .updated_at
            .is_some_and(|t| t > write_back.triggered_at)
            || now - write_back.triggered_at > NOT_DELETED_WAIT
        {
            pushed.skipped = 1;
            pushed.note = Some("the shard was restored since its deletion; not deleted".into());
            return Ok(pushed);
        }
        return Err(Failure::new(
            FailureCode::Store,
            "the shard is not deleted yet, though its deletion was asked for",
        ));
    }
    if shard.deleted_at.is_some() {
        let Some(i) = link else {
            let gone = shard.lost_record_at(integration_id);
            pushed.skipped = 1;
            pushed.note = Some("nothing to delete: the shard is not linked to a record".into());
            if gone {
                // Deleted with its record by an earlier try, which may have stopped before
                // the shards derived from it went.
                retire_derived(app, &write_back.tenant_id, &shard.id, mapping, now).await?;
            }
            if let Some(key_field) = mapping.idempotency_field.clone().filter(|_| !gone) {
                // A create whose answer was lost may have made the record all the same: it is
                // found by the shard's id in its key field, and goes too.
                let write = RecordWrite {
                    entity: mapping.external_entity.clone(),
                    external_id: None,
                    fields: Map::new(),
                    expected_version: None,
                    idempotency_key: shard.id.clone(),
                    key_field: Some(key_field),
                };
                writer.may_write(&conn)?;
                writer.delete(&mut conn, &write).await?;
                pushed.note = Some(
                    "not linked to a record: any record a create of this shard may have made is deleted"
                        .into(),
                );
            }
            return Ok(pushed);
        };
        // Every record of the integration the shard holds both ways goes: duplicates merged
        // into it are the same person or thing, and one left would bring the shard back. A
        // record merged in from a one-way mapping (a lead into a contact) is not Castiel's to
        // delete, nor of the entity written back.
        let linked: Vec<usize> = (i..shard.external_relationships.len())
            .filter(|&j| {
                let r = &shard.external_relationships[j];
                j == i
                    || (r.integration_id == *integration_id
                        && r.sync_status == RelationshipStatus::Synced
                        && r.sync_direction == SyncDirection::Bidirectional)
            })
            .collect();
        for j in linked {
            let write = RecordWrite {
                entity: mapping.external_entity.clone(),
                external_id: Some(shard.external_relationships[j].external_id.clone()),
                fields: Map::new(),
                expected_version: None,
                idempotency_key: shard.id.clone(),
                key_field: None,
            };
            writer.may_write(&conn)?;
            writer.delete(&mut conn, &write).await?;
            let r = &mut shard.external_relationships[j];
            r.sync_status = RelationshipStatus::Deleted;
            r.last_synced_at = Some(now);
            pushed.deleted += 1;
        }
    } else if let Some(i) = link {
        let external_id = shard.external_relationships[i].external_id.clone();
        let request = FetchRequest {
            entity: mapping.external_entity.clone(),
            fields: mapping.source_fields(),
            cursor: None,
            page_token: None,
            filters: Vec::new(),
            page_size: 1,
            cursor_read_at: None,
        };
        // A provider whose allocation is known to be used up holds the write before its read,
        // so that a held write-back spends nothing; so before every request below.
        writer.may_write(&conn)?;
        let records = provider
            .fetch_by_ids(&mut conn, &request, std::slice::from_ref(&external_id))
            .await?;
        let answered = records.iter().any(|r| r.id == external_id);
        let Some(record) = records
            .into_iter()
            .find(|r| r.id == external_id && !r.deleted)
        else {
            // Not read back: deleted, or out of the integration user's sight, which a provider
            // may tell apart (Salesforce's recycle bin). A record that may still be there is
            // not taken for gone: its link would be dropped, and the next edit create it again.
            if !answered {
                // A record the provider stops serving some time before it is deleted (an
                // expired Zoom meeting) is past writing, not gone.
                if shard.external_relationships[i]
                    .listed_until
                    .is_some_and(|until| until <= now)
                {
                    return Err(Failure::new(
                        ErrorCode::ValidationError,
                        format!(
                            "`{external_id}` is no longer served by the provider, which stops serving such records some time after they end (an expired meeting): not written"
                        ),
                    ));
                }
                let left = provider
                    .gone(
                        &mut conn,
                        &mapping.external_entity,
                        vec![external_id.clone()],
                    )
                    .await?;
                if !left.gone.contains(&external_id) {
                    return Err(Failure::new(
                        ErrorCode::ValidationError,
                        format!(
                            "`{external_id}` cannot be read at the provider, and may still be there (out of the integration user's sight, or archived): not written"
                        ),
                    ));
                }
            }
            // Deleted at the provider: the shard goes too unless another record holds it, as
            // the next inbound sync would have it. Left live with its link marked deleted, its
            // next edit would make the record again.
            let r = &mut shard.external_relationships[i];
            r.sync_status = RelationshipStatus::Deleted;
            r.last_synced_at = Some(now);
            if !shard.held_by_a_record() {
                shard.deleted_at = Some(now);
                shard.updated_at = Some(now);
            }
            pushed.skipped = 1;
            let and_the_shard = if shard.deleted_at.is_some() {
                ", and the shard is deleted"
            } else {
                ""
            };
            pushed.note = Some(format!(
                "`{external_id}` is gone at the provider; not written{and_the_shard}"
            ));
            let saved = save_shard(app, shard, &target.shard, integration_id).await?;
            if let Some(saved) = saved.filter(|s| s.deleted_at.is_some()) {
                retire_derived(app, &write_back.tenant_id, &saved.id, mapping, now).await?;
            }
            return Ok(pushed);
        };
        let theirs = transform(&mapping.field_mappings, &record.fields).map_err(|e| {
            Failure::new(
                ErrorCode::ValidationError,
                format!("the provider's record does not map: {}", e.message),
            )
        })?;
        let bases = shard.external_relationships[i].field_hashes.clone();
        let modified = Modified {
            castiel: shard.updated_at,
            provider: record.modified_at,
        };
        let decided = reconcile_record(
            &bases,
            &data,
            &theirs,
            write_back.changed_fields.as_deref().unwrap_or_default(),
            &integration.conflict_policy(),
            modified,
        );
        // The provider's changes first: a field written back from several (a split's parts
        // joined) takes their part of it, not Castiel's older one.
        for field in &decided.to_castiel {
            data.insert(
                field.clone(),
                theirs.get(field).cloned().unwrap_or(Value::Null),
            );
        }
        let mut reversed = reverse(&mapping.field_mappings, &data, Some(&decided.to_provider));
        let mut left_out = Vec::new();
        if !reversed.fields.is_empty() {
            writer.may_write(&conn)?;
            let read_only = writer
                .read_only_fields(&mut conn, &mapping.external_entity, false)
                .await?;
            let writable = writer.writable_fields(&mapping.external_entity);
            left_out = reversed.leave_out(&mapping.field_mappings, &read_only, writable, false);
        }
        // What the provider will not let be written goes back to what it holds: kept apart,
        // the edit would be sent again after every sync, and never land.
        for (target, _) in &left_out {
            let theirs = theirs.get(target).cloned().unwrap_or(Value::Null);
            // The shard's name, where it is this field, goes back with it.
            if mapping.name_field.as_deref() == Some(target.as_str())
                && let Some(name) = theirs.as_str()
            {
                shard.name = name.to_string();
            }
            data.insert(target.clone(), theirs);
            shard.updated_at = Some(now);
        }
        pushed.irreversible = reversed.irreversible.clone();
        pushed
            .irreversible
            .extend(left_out.into_iter().map(|(target, why)| {
                (
                    target,
                    format!("{why}; Castiel's value went back to the provider's"),
                )
            }));
        if reversed.fields.is_empty() {
            pushed.skipped = 1;
        } else {
            let write = RecordWrite {
                entity: mapping.external_entity.clone(),
                external_id: Some(external_id.clone()),
                fields: reversed.fields,
                // The version just read: if the record changes before this write lands, the
                // provider refuses it and the retry reads it again.
                expected_version: provider.version_of(&record),
                idempotency_key: shard.id.clone(),
                key_field: None,
            };
            let written = writer.update(&mut conn, &write).await?;
            shard.external_relationships[i].version = written.version;
            pushed.updated = 1;
        }
        // What both sides hold now, except fields still apart.
        let apart: Vec<&String> = decided
            .unresolved()
            .map(|c| &c.field)
            .chain(reversed.irreversible.iter().map(|(f, _)| f))
            .collect();
        let r = &mut shard.external_relationships[i];
        for field in theirs.keys().filter(|f| !apart.contains(f)) {
            r.field_hashes
                .insert(field.clone(), value_hash(data.get(field)));
        }
        r.last_synced_at = Some(now);
        r.sync_direction = SyncDirection::Bidirectional;
        if !decided.conflicts.is_empty() {
            let found = ConflictFound {
                shard_id: shard.id.clone(),
                external_id,
                fields: decided.conflicts.clone(),
                castiel: pick(&shard.structured_data, &decided.conflicts),
                provider: pick(&Value::Object(theirs.clone()), &decided.conflicts),
            };
            events.extend(two_way::conflict_events(
                &write_back.tenant_id,
                integration_id,
                &mapping.external_entity,
                &found,
                two_way::Found::WriteBack,
                now,
            ));
            two_way::keep_open(
                app,
                &write_back.tenant_id,
                integration_id,
                mapping,
                &found,
                now,
            )
            .await?;
        }
        if !decided.to_castiel.is_empty() {
            shard.updated_at = Some(now);
        }
    } else if shard.outlived_record_at(integration_id) {
        pushed.skipped = 1;
        pushed.note =
            Some("the shard's record was deleted at the provider; not created again".into());
        return Ok(pushed);
    } else {
        let mut reversed = reverse(&mapping.field_mappings, &data, None);
        writer.may_write(&conn)?;
        let read_only = writer
            .read_only_fields(&mut conn, &mapping.external_entity, true)
            .await?;
        let writable = writer.writable_fields(&mapping.external_entity);
        let left_out = reversed.leave_out(&mapping.field_mappings, &read_only, writable, true);
        let unsent: Vec<String> = left_out.iter().map(|(target, _)| target.clone()).collect();
        pushed.irreversible = reversed.irreversible.clone();
        pushed.irreversible.extend(left_out);
        let write = RecordWrite {
            entity: mapping.external_entity.clone(),
            external_id: None,
            fields: reversed.fields,
            expected_version: None,
            idempotency_key: shard.id.clone(),
            key_field: mapping.idempotency_field.clone(),
        };
        writer.may_write(&conn)?;
        // A create refused for a field it lacks may lack it for what was left out.
        let written = writer.create(&mut conn, &write).await.map_err(|mut e| {
            if !unsent.is_empty() && e.code == ErrorCode::ValidationError {
                e.message = format!(
                    "{} (left out, as the provider does not let them be written: {})",
                    e.message,
                    unsent.join(", ")
                );
            }
            e
        })?;
        let mut link = ExternalRelationship::synced(
            integration_id,
            &written.external_id,
            SyncDirection::Bidirectional,
            now,
        );
        link.version = written.version;
        link.field_hashes = agreed_on_create(mapping, &data, &pushed.irreversible);
        shard.external_relationships.push(link);
        pushed.created = 1;
    }
    shard.structured_data = Value::Object(data);
    let saved = save_shard(app, shard, &target.shard, integration_id).await?;
    if pushed.deleted > 0
        && let Some(saved) = saved.filter(|s| s.deleted_at.is_some())
    {
        retire_derived(app, &write_back.tenant_id, &saved.id, mapping, now).await?;
    }
    publish(app, &events).await;
    Ok(pushed)
}

/// Soft-deletes the shards `mapping` derives from `primary`, deleted with its record, as a
/// sync does: derived shards live only while their primary does.
async fn retire_derived(
    app: &App,
    tenant_id: &str,
    primary: &str,
    mapping: &EntityMapping,
    now: DateTime<Utc>,
) -> Result<(), Failure> {
    let ids = derived_ids(mapping, [primary]);
    if ids.is_empty() {
        return Ok(());
    }
    let failed = |e: StoreError| {
        Failure::new(
            FailureCode::Store,
            format!("the shards derived from `{primary}` could not be deleted with it: {e}"),
        )
    };
    let found = app.store.get_many(tenant_id, &ids).await.map_err(failed)?;
    for derived in found.into_iter().flatten() {
        if let Some(retired) = retired(derived.value, now) {
            app.store.upsert(&retired).await.map_err(failed)?;
        }
    }
    Ok(())
}

/// The fingerprints a record just created holds: every mapped field the create wrote.
fn agreed_on_create(
    mapping: &EntityMapping,
    data: &Map<String, Value>,
    irreversible: &[(String, String)],
) -> BTreeMap<String, String> {
    let targets: Vec<String> = if mapping.field_mappings.is_empty() {
        data.keys().cloned().collect()
    } else {
        mapping
            .field_mappings
            .iter()
            .flat_map(|m| m.target.iter().chain(m.targets.iter()).cloned())
            .collect()
    };
    targets
        .into_iter()
        .filter(|t| !irreversible.iter().any(|(f, _)| f == t))
        .map(|t| {
            let hash = value_hash(data.get(&t));
            (t, hash)
        })
        .collect()
}

fn pick(from: &Value, conflicts: &[crate::model::conflict::FieldConflict]) -> Map<String, Value> {
    conflicts
        .iter()
        .map(|c| {
            (
                c.field.clone(),
                from.get(&c.field).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Saves what a write left the shard holding (`written`, from the shard as `read`), under the
/// etag it was read with. If the shard changed meanwhile, the write's outcome is put on the
/// shard as it now is ([`after_write`]) rather than failing: the provider has the write, and a
/// shard left with the old agreed values would take the next edit for a conflict. Where the
/// two cannot be joined, the save fails and the retry starts over from the latest state.
async fn save_shard(
    app: &App,
    mut written: Shard,
    read: &Versioned<Shard>,
    integration_id: &str,
) -> Result<Option<Shard>, Failure> {
    let failed = |e: StoreError| {
        Failure::new(
            FailureCode::Store,
            format!("the shard could not be updated after the write: {e}"),
        )
    };
    written.content_hash = Some(content_hash(&written));
    let mut etag = read.etag.clone();
    let mut shard = written.clone();
    for _ in 0..MERGE_ATTEMPTS {
        match app.store.replace(&shard, &etag).await {
            Ok(_) => return Ok(Some(shard)),
            Err(StoreError::PreconditionFailed) => {}
            Err(e) => return Err(failed(e)),
        }
        let Some(current) = app
            .store
            .get(&written.tenant_id, &written.id)
            .await
            .map_err(failed)?
        else {
            return Ok(None);
        };
        let Some(joined) = after_write(&read.value, &written, current.value, integration_id) else {
            return Err(failed(StoreError::PreconditionFailed));
        };
        shard = joined;
        shard.content_hash = Some(content_hash(&shard));
        etag = current.etag;
    }
    Err(failed(StoreError::PreconditionFailed))
}

/// How long after a delete was asked for its shard may still not read as deleted before it is
/// taken as restored.
const NOT_DELETED_WAIT: chrono::Duration = chrono::Duration::minutes(5);

/// Tries at saving a write's outcome over a shard Castiel keeps changing.
const MERGE_ATTEMPTS: usize = 5;

/// The shard as it changed meanwhile (`current`), with what a write left (`written`, from the
/// shard as it was `read`): the links the write made or changed (version, agreed
/// fingerprints, a link made or marked deleted), and the fields the write took from the
/// provider where nobody has changed them since. A link the write marked deleted is taken
/// whatever happened meanwhile: the record is gone at the provider. `None` where the two
/// cannot be joined: the shard was deleted or restored meanwhile by a write that made or
/// changed a live link (what to write is decided again), or another sync changed such a link.
fn after_write(
    read: &Shard,
    written: &Shard,
    mut current: Shard,
    integration_id: &str,
) -> Option<Shard> {
    let live_link_written = written.external_relationships.iter().any(|r| {
        r.integration_id == integration_id
            && r.sync_status == RelationshipStatus::Synced
            && !read.external_relationships.contains(r)
    });
    if live_link_written && current.deleted_at.is_some() != read.deleted_at.is_some() {
        return None;
    }
    let link_in = |shard: &Shard, external_id: &str| {
        shard
            .external_relationships
            .iter()
            .position(|r| r.is_to(integration_id, external_id))
    };
    for link in written
        .external_relationships
        .iter()
        .filter(|r| r.integration_id == integration_id)
    {
        let before = link_in(read, &link.external_id).map(|i| &read.external_relationships[i]);
        if before == Some(link) {
            continue;
        }
        let now_at = link_in(&current, &link.external_id);
        let now = now_at.map(|i| &current.external_relationships[i]);
        if now != before && link.sync_status == RelationshipStatus::Synced {
            return None;
        }
        match now_at {
            Some(i) => current.external_relationships[i] = link.clone(),
            None => current.external_relationships.push(link.clone()),
        }
    }
    // A deletion the write found at the provider takes the shard with it, unless a record
    // linked meanwhile holds it.
    if written.deleted_at.is_some()
        && read.deleted_at.is_none()
        && current.deleted_at.is_none()
        && !current.held_by_a_record()
    {
        current.deleted_at = written.deleted_at;
        current.updated_at = written.updated_at;
    }
    if let (Some(before), Some(taken), Some(data)) = (
        read.structured_data.as_object(),
        written.structured_data.as_object(),
        current.structured_data.as_object_mut(),
    ) {
        for (f, value) in taken {
            let took = before.get(f) != Some(value);
            let untouched = data.get(f) == before.get(f);
            if took && untouched {
                data.insert(f.clone(), value.clone());
            }
        }
    }
    Some(current)
}

fn outbound_stats(pushed: &Pushed, failed: u64) -> SyncStats {
    SyncStats {
        records_pushed: Some(pushed.created + pushed.updated + pushed.deleted),
        records_created: Some(pushed.created),
        records_updated: Some(pushed.updated),
        records_deleted: Some(pushed.deleted),
        records_failed: Some(failed),
        ..SyncStats::default()
    }
}

fn entity_stats(
    mapping: &EntityMapping,
    pushed: &Pushed,
    failed: u64,
    errors: &[SyncError],
) -> EntitySyncStats {
    EntitySyncStats {
        external_entity: mapping.external_entity.clone(),
        shard_type_id: mapping.shard_type_id.clone(),
        direction: Direction::Outbound,
        fetched: None,
        created: Some(pushed.created),
        updated: Some(pushed.updated + pushed.deleted),
        skipped: Some(pushed.skipped),
        failed: Some(failed),
        errors: (!errors.is_empty()).then(|| errors.to_vec()),
    }
}

/// The history record of a write-back: a single record, pushed by whoever changed the shard.
fn history(
    write_back: &WriteBackMessage,
    target: &Target,
    message: &ServiceBusMessage,
    started: DateTime<Utc>,
) -> IntegrationSync {
    IntegrationSync {
        integration_id: target.integration_id.clone(),
        integration_name: target.integration_name.clone(),
        provider_name: target.integration.provider_name.clone(),
        job_id: job_id(write_back, message),
        job_type: SyncJobType::Manual,
        trigger: if write_back.attempt > 1 {
            SyncTrigger::Retry
        } else {
            SyncTrigger::Manual
        },
        triggered_by: Some(write_back.triggered_by.clone()),
        started_at: started,
        completed_at: None,
        duration_ms: None,
        status: SyncStatus::Running,
        status_message: None,
        stats: SyncStats::default(),
        entity_stats: None,
        errors: None,
        sync_details: None,
    }
}

/// One id per write-back and attempt: a redelivery rewrites its record.
fn job_id(write_back: &WriteBackMessage, message: &ServiceBusMessage) -> String {
    let base = message.message_id.clone().unwrap_or_else(|| {
        format!(
            "{}:{}",
            write_back.shard_id,
            write_back.triggered_at.timestamp_millis()
        )
    });
    format!("writeback:{base}")
}

async fn save(
    app: &App,
    tenant_id: &str,
    record_id: &str,
    record: &IntegrationSync,
    now: DateTime<Utc>,
) -> Result<(), Transient> {
    let mut shard = record
        .clone()
        .into_shard(record_id.to_string(), tenant_id, now);
    shard.ttl = Some(app.settings.history_retention.ttl_seconds(tenant_id));
    app.store.upsert(&shard).await?;
    Ok(())
}

async fn send_dead_letter(
    app: &App,
    message: &ServiceBusMessage,
    code: FailureCode,
    reason: &str,
) -> Result<(), Transient> {
    app.queue
        .send(dead_letter(SYNC_OUTBOUND, message, code.as_str(), reason))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_writes_outcome_goes_onto_the_shard_as_castiel_changed_it_meanwhile() {
        let shard = |data: Value, version: &str| {
            let mut s: Shard = serde_json::from_value(json!({
                "id": "shard-ann", "tenantId": "t1", "shardTypeId": "c_contact",
                "structuredData": data
            }))
            .unwrap();
            let mut link = ExternalRelationship::synced(
                "int-sf",
                "003A",
                SyncDirection::Bidirectional,
                "2026-12-07T10:00:00Z".parse().unwrap(),
            );
            link.version = Some(version.into());
            link.field_hashes = [("email".to_string(), version.to_string())].into();
            s.external_relationships.push(link);
            s
        };
        let read = shard(json!({"email": "ann@one.test", "title": "CTO"}), "v1");
        // The write sent the email and took Salesforce's new title.
        let written = shard(json!({"email": "ann@one.test", "title": "CEO"}), "v2");
        // Meanwhile Ann's email was changed again in Castiel.
        let current = shard(json!({"email": "ann@two.test", "title": "CTO"}), "v1");

        let saved = after_write(&read, &written, current.clone(), "int-sf").unwrap();
        assert_eq!(
            saved.structured_data,
            json!({"email": "ann@two.test", "title": "CEO"}),
            "Castiel's later edit stays; the provider's title is taken"
        );
        let link = &saved.external_relationships[0];
        assert_eq!(link.version.as_deref(), Some("v2"));
        assert_eq!(
            link.field_hashes["email"], "v2",
            "what both sides agreed on at the write"
        );
        assert_eq!(saved.external_relationships.len(), 1);

        let mut deleted = current.clone();
        deleted.deleted_at = Some(Utc::now());
        assert!(
            after_write(&read, &written, deleted, "int-sf").is_none(),
            "deleted meanwhile: what to write is decided again"
        );
        let mut synced_again = current.clone();
        synced_again.external_relationships[0].version = Some("v3".into());
        assert!(
            after_write(&read, &written, synced_again, "int-sf").is_none(),
            "a sync moved the link on meanwhile"
        );

        // A delete carried out while the shard was restored: the record is gone all the same.
        let mut deleted_read = read.clone();
        deleted_read.deleted_at = Some(Utc::now());
        let mut unlinked = deleted_read.clone();
        unlinked.external_relationships[0].sync_status = RelationshipStatus::Deleted;
        let saved = after_write(&deleted_read, &unlinked, current, "int-sf").unwrap();
        assert_eq!(saved.deleted_at, None, "restored");
        assert_eq!(
            saved.external_relationships[0].sync_status,
            RelationshipStatus::Deleted
        );
    }

    #[test]
    fn a_change_is_written_through_the_integration_its_shard_is_linked_to_or_the_only_one() {
        let both = ["int-sandbox", "int-production"];
        assert_eq!(choose_writer(&both, &["int-production"]), Ok(1));
        assert_eq!(choose_writer(&both, &["int-other", "int-sandbox"]), Ok(0));
        assert_eq!(choose_writer(&both, &[]), Err(Unchosen::Several));
        assert_eq!(
            choose_writer(&both, &["int-production", "int-sandbox"]),
            Err(Unchosen::Several),
            "linked to both: which one is meant is unknown"
        );
        assert_eq!(choose_writer(&["int-production"], &[]), Ok(0));
        assert_eq!(choose_writer(&[], &["int-production"]), Err(Unchosen::None));
    }

    #[test]
    fn a_write_refused_because_the_record_moved_on_is_read_again_and_retried() {
        let now = Utc::now();
        let conflict = Failure::new(ErrorCode::Conflict, "412");
        assert_eq!(
            after_write_failure(&conflict, 1, now, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + backoff(1)
            }
        );
        assert_eq!(
            after_write_failure(&conflict, MAX_ATTEMPTS, now, now),
            AfterFailure::DeadLetter { exhausted: false }
        );
        let invalid = Failure::new(ErrorCode::ValidationError, "400");
        assert_eq!(
            after_write_failure(&invalid, 1, now, now),
            AfterFailure::DeadLetter { exhausted: false }
        );
    }

    #[test]
    fn the_ids_of_later_tries_stay_short_and_the_same_for_a_redelivery() {
        let message: WriteBackMessage = serde_json::from_value(serde_json::json!({
            "shardId": "s1", "tenantId": "t1", "operation": "update", "externalSystem": "zoom",
            "triggeredAt": "2026-12-06T10:00:00Z", "triggeredBy": "u1"
        }))
        .unwrap();
        let attempt = |attempt| WriteBackMessage {
            attempt,
            ..message.clone()
        };
        let hold = |holds| WriteBackMessage {
            holds,
            ..message.clone()
        };
        assert_eq!(retry_id("wb-1", &attempt(2), false), "wb-1:attempt-2");
        assert_eq!(
            retry_id("wb-1:attempt-2", &attempt(3), false),
            "wb-1:attempt-3"
        );
        assert_eq!(retry_id("wb-1:attempt-3", &hold(1), true), "wb-1:held-1");
        assert_eq!(retry_id("wb-1:held-1", &hold(2), true), "wb-1:held-2");
    }

    #[test]
    fn a_write_refused_by_a_used_up_allocation_waits_for_it_without_spending_attempts() {
        let now = Utc::now();
        let cap: Failure = adapters::ProviderError::quota("429: daily rate limit").into();
        let held = AfterFailure::RetryAt {
            attempt: 3,
            at: now + Duration::hours(1),
        };
        assert_eq!(after_write_failure(&cap, 3, now, now), held);
        let six_days_ago = now - Duration::days(6);
        assert_eq!(after_write_failure(&cap, 3, six_days_ago, now), held);
        // A week after the change, the hold ends like any rate limit: the remaining attempts
        // back off, then the write is dead-lettered with its reason.
        let week_ago = now - Duration::days(7);
        assert_eq!(
            after_write_failure(&cap, 3, week_ago, now),
            AfterFailure::RetryAt {
                attempt: 4,
                at: now + backoff(3)
            }
        );
        assert_eq!(
            after_write_failure(&cap, MAX_ATTEMPTS, week_ago, now),
            AfterFailure::DeadLetter { exhausted: true }
        );
        // A change dated past the last date there is (a message written by hand) is held too.
        assert_eq!(
            after_write_failure(&cap, 3, DateTime::<Utc>::MAX_UTC, now),
            held
        );
    }

    #[test]
    fn a_write_refused_until_a_time_the_provider_names_waits_until_then() {
        let now = Utc::now();
        let until =
            |at| -> Failure { adapters::ProviderError::quota("cap").resuming_at(at).into() };
        let midnight = now + Duration::hours(5);
        assert_eq!(
            after_write_failure(&until(midnight), 2, now, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: midnight
            }
        );
        // A time already past says nothing; one days away is looked at again in a day.
        assert_eq!(
            after_write_failure(&until(now - Duration::minutes(1)), 2, now, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + Duration::hours(1)
            }
        );
        // Near the end of the week, the hold ends with it.
        let nearly_a_week_ago = now - Duration::days(7) + Duration::hours(4);
        assert_eq!(
            after_write_failure(&until(now + Duration::hours(20)), 2, nearly_a_week_ago, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + Duration::hours(4)
            }
        );
        assert_eq!(
            after_write_failure(&until(now + Duration::days(3)), 2, now, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + Duration::days(1)
            }
        );
    }
}
