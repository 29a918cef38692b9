//! Two-way sync: Castiel's changes written back to the provider, against the loopback
//! Salesforce, Dataverse, Microsoft Graph (OneDrive), Google Drive and Zoom.

use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::{Value, json};

use adapters::{Connection, ErrorCode, RecordWrite};
use handler::engine::credentials::StoredCredentials;
use handler::model::shard::RelationshipStatus;
use handler::queue::{SYNC_DEADLETTER, SYNC_OUTBOUND};
use handler::store::ShardStore;

use crate::fake_dynamics::{FakeDynamics, ORGANIZATION_ID};
use crate::fake_google_drive::{FULL_SCOPE, FakeGoogleDrive, MY_DRIVE_ROOT};
use crate::fake_graph::FakeGraph;
use crate::fake_host::{HostedHandler, service_bus_message};
use crate::fake_salesforce::{DuplicateRule, FakeSalesforce, ORG_ID};
use crate::fake_zoom::FakeZoom;
use crate::helpers::TestApp;

const SF: &str = "int-acme-sf";

fn salesforce(fake: &FakeSalesforce) -> Value {
    two_way(fake, "manual")
}

/// The Salesforce integration with contacts synced both ways under `strategy`.
fn two_way(fake: &FakeSalesforce, strategy: &str) -> Value {
    json!({
        "id": SF, "tenantId": "t1", "name": "Acme Salesforce",
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "conflictResolution": strategy,
            "connection": {"loginHost": fake.url, "organizationId": ORG_ID},
            "entityMappings": [{
                "externalEntity": "Contact", "shardTypeId": "c_contact", "nameField": "name",
                "bidirectional": true, "idempotencyField": "Castiel_Id__c",
                "fieldMappings": [
                    {"source": "LastName", "target": "name"},
                    {"source": "Email", "target": "email"}
                ]
            }]
        }
    })
}

/// A connection to the fake org as the engine makes one.
async fn connect(test: &TestApp, fake: &FakeSalesforce) -> Connection {
    test.register_integration(salesforce(fake)).await;
    test.set_credentials(SF, &fake.credentials()).await;
    stored_connection(test, &salesforce(fake)).await
}

/// The engine's connection for `integration` (as registered), with the credentials stored for
/// it.
async fn stored_connection(test: &TestApp, integration: &Value) -> Connection {
    let id = integration["id"].as_str().unwrap();
    let settings = integration["structuredData"]["connection"]
        .as_object()
        .unwrap()
        .clone();
    let keeper = Arc::new(StoredCredentials::new(&test.app(&[]), "t1", id));
    let credentials = keeper.load().await.unwrap();
    Connection::with_keeper(id, settings, credentials, keeper)
}

/// An incremental sync of `integration_id` from `provider`, delivered as the host delivers a
/// scheduled job.
async fn sync_of(handler: &HostedHandler, integration_id: &str, provider: &str, job_id: &str) {
    handler
        .run_sync(integration_id, provider, job_id, "incremental")
        .await;
}

/// Changes synced shard `shard_id` as Castiel's shard service would, through `handler shards
/// put`: `changes` into its data, its name to `name`. Returns what the command sent.
async fn edit_in_castiel(test: &TestApp, shard_id: &str, name: &str, changes: Value) -> Value {
    let mut shard = test
        .store()
        .get("t1", shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    shard.name = name.into();
    for (field, value) in changes.as_object().unwrap() {
        shard.structured_data[field] = value.clone();
    }
    let file = test.data_dir().join("edited.json");
    std::fs::write(&file, serde_json::to_string(&shard).unwrap()).unwrap();
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await
}

fn write(id: Option<&str>, fields: Value, version: Option<&str>) -> RecordWrite {
    RecordWrite {
        entity: "Contact".into(),
        external_id: id.map(str::to_string),
        fields: fields.as_object().unwrap().clone(),
        expected_version: version.map(str::to_string),
        idempotency_key: "shard-ann".into(),
        key_field: Some("Castiel_Id__c".into()),
    }
}

#[tokio::test]
async fn salesforce_creates_by_external_id_updates_only_unmodified_records_and_deletes_once() {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    let mut conn = connect(&test, &fake).await;
    let salesforce = adapters::salesforce::Salesforce::new();
    let writer = adapters::Provider::write_back(&salesforce).unwrap();

    let ann = json!({"LastName": "Ann Lee", "Email": "ann@acme.test"});
    let created = writer
        .create(&mut conn, &write(None, ann.clone(), None))
        .await
        .unwrap();
    // The answer was lost and the create is tried again: the upsert on the External ID field
    // finds the record the first attempt made.
    let again = writer
        .create(&mut conn, &write(None, ann, None))
        .await
        .unwrap();
    assert_eq!(again.external_id, created.external_id);
    assert_eq!(fake.records("Contact").len(), 1);
    let record = fake.record("Contact", &created.external_id).unwrap();
    assert_eq!(record["Castiel_Id__c"], "shard-ann");
    assert_eq!(created.external_id.len(), 18);

    let read_at = record["SystemModstamp"].as_str().unwrap().to_string();
    let id = Some(created.external_id.as_str());
    writer
        .update(
            &mut conn,
            &write(id, json!({"Email": "ann@lee.test"}), Some(&read_at)),
        )
        .await
        .unwrap();
    assert_eq!(
        fake.record("Contact", &created.external_id).unwrap()["Email"],
        "ann@lee.test"
    );

    // Someone edits the record at Salesforce after the version the next write is based on.
    let stale = "2020-01-01T00:00:00.000+0000";
    let refused = writer
        .update(
            &mut conn,
            &write(id, json!({"Email": "old@lee.test"}), Some(stale)),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Conflict, "{refused}");
    assert_eq!(
        fake.record("Contact", &created.external_id).unwrap()["Email"],
        "ann@lee.test"
    );

    writer
        .delete(&mut conn, &write(id, json!({}), None))
        .await
        .unwrap();
    writer
        .delete(&mut conn, &write(id, json!({}), None))
        .await
        .unwrap();
    assert!(fake.records("Contact").is_empty());

    // A flow holds the record's row for a moment: the write waits its turn.
    fake.org.lock().unwrap().locked_writes = 2;
    conn.retry = adapters::http::RetryPolicy::with_base(std::time::Duration::from_millis(5));
    let locked = writer
        .create(
            &mut conn,
            &write(None, json!({"LastName": "Ann Lee"}), None),
        )
        .await
        .unwrap();
    assert_eq!(fake.records("Contact").len(), 1, "{locked:?}");

    let unkeyed = RecordWrite {
        key_field: None,
        ..write(None, json!({"LastName": "No Key"}), None)
    };
    let refused = writer.create(&mut conn, &unkeyed).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationError);
    assert!(refused.message.contains("idempotencyField"), "{refused}");
}

#[tokio::test]
async fn a_contact_a_duplicate_rule_alerts_on_is_written_and_one_a_rule_blocks_is_refused_with_the_reason()
 {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    let mut conn = connect(&test, &fake).await;
    let salesforce = adapters::salesforce::Salesforce::new();
    let writer = adapters::Provider::write_back(&salesforce).unwrap();
    fake.add(
        "Contact",
        json!({"Id": "003000000000000001", "LastName": "Ann Lee", "Email": "ann@acme.test"}),
        chrono::Utc::now(),
    );
    // The org's standard contact rule: a matching email alerts the user, who may save.
    fake.org.lock().unwrap().duplicate_rule = Some(DuplicateRule {
        field: "Email".into(),
        blocks: false,
    });

    let created = writer
        .create(
            &mut conn,
            &write(
                None,
                json!({"LastName": "Ann Leigh", "Email": "ann@acme.test"}),
                None,
            ),
        )
        .await
        .unwrap();
    let id = Some(created.external_id.as_str());
    writer
        .update(
            &mut conn,
            &write(id, json!({"LastName": "Annie Leigh"}), None),
        )
        .await
        .unwrap();
    assert_eq!(
        fake.record("Contact", &created.external_id).unwrap()["LastName"],
        "Annie Leigh"
    );

    fake.org.lock().unwrap().duplicate_rule = Some(DuplicateRule {
        field: "Email".into(),
        blocks: true,
    });
    let refused = writer
        .update(&mut conn, &write(id, json!({"LastName": "A. Leigh"}), None))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationError, "{refused}");
    assert!(refused.message.contains("DUPLICATES_DETECTED"), "{refused}");
}

async fn sync(handler: &HostedHandler, job_id: &str) {
    sync_of(handler, SF, "salesforce", job_id).await;
}

/// `integration` registered against `fake` with its credentials, and its first sync run by
/// a handler the host started.
async fn first_sync(test: &TestApp, fake: &FakeSalesforce, integration: Value) -> HostedHandler {
    test.register_integration(integration).await;
    test.set_credentials(SF, &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync(&handler, "job-1").await;
    handler
}

/// Ann, a contact at Salesforce, synced in under `strategy` by a handler with `settings`.
async fn ann_synced(
    strategy: &str,
    settings: &[(&str, &str)],
) -> (TestApp, FakeSalesforce, HostedHandler) {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    test.register_integration(two_way(&fake, strategy)).await;
    test.set_credentials(SF, &fake.credentials()).await;
    let handler = test.host_handler_with(settings).await;
    sync(&handler, "job-1").await;
    (test, fake, handler)
}

const ANN: &str = "int-acme-sf~Contact~003000000000001AAA";

#[tokio::test]
async fn an_edit_to_a_record_salesforce_no_longer_shows_is_kept_for_an_operator_not_taken_for_a_deletion()
 {
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;
    // Ann's record passes to an owner whose records the integration user may not see.
    let hidden = fake
        .org
        .lock()
        .unwrap()
        .records
        .get_mut("Contact")
        .unwrap()
        .remove(0);
    edit_in_castiel(&test, ANN, "Ann", json!({"email": "ann@new.test"})).await;

    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    let dead = test.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1, "kept for an operator to replay");
    let reason = dead[0].properties["DeadLetterErrorDescription"].to_string();
    assert!(reason.contains("may still be there"), "{reason}");
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(
        ann.external_relationships[0].sync_status,
        RelationshipStatus::Synced,
        "still linked: a later edit updates the record, never creates another"
    );

    // Seen again, and then deleted into the recycle bin: an edit finds it gone.
    fake.org
        .lock()
        .unwrap()
        .records
        .get_mut("Contact")
        .unwrap()
        .push(hidden);
    fake.delete("Contact", "003000000000001AAA", Utc::now());
    edit_in_castiel(&test, ANN, "Ann", json!({"email": "ann@newer.test"})).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(
        ann.external_relationships[0].sync_status,
        RelationshipStatus::Deleted
    );
    assert!(
        ann.deleted_at.is_some(),
        "the shard goes with its only record, as the next sync would have it"
    );
    assert!(fake.records("Contact").is_empty(), "nothing created again");
}

#[tokio::test]
async fn an_edit_waits_while_salesforce_usage_is_at_the_integrations_share_without_spending_an_attempt()
 {
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;
    // The org has used the 80% of its daily allocation this integration may use.
    fake.org.lock().unwrap().api_usage = (80_000, 100_000);
    edit_in_castiel(&test, ANN, "Ann", json!({"email": "ann@new.test"})).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    held_write_back(&test);
    assert!(
        !fake.requests().iter().any(|r| r.starts_with("PATCH")),
        "nothing written: {:?}",
        fake.requests()
    );
    let said: Vec<String> = test
        .history()
        .await
        .iter()
        .filter_map(|r| {
            r["structuredData"]["statusMessage"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(
        said.iter().any(|m| m.contains("reached the 80%")),
        "{said:?}"
    );

    // Delivered again while usage is known to be at the share, it is held at no cost.
    let requests = fake.requests().len();
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(fake.requests().len(), requests, "no request spent");
    assert_eq!(test.broker().peek(SYNC_OUTBOUND).unwrap().len(), 1);

    // Usage falls as the day's requests age out of Salesforce's 24 hours, and a sync's answers
    // say so (the sync, finding Castiel's edit newer, sends it too): the held edit is written.
    fake.org.lock().unwrap().api_usage = (40_000, 100_000);
    sync(&handler, "job-2").await;
    assert!(deliver_write_backs(&test, &handler).await >= 1);
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@new.test"
    );
    assert!(test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty());
}

#[tokio::test]
async fn an_edit_made_while_the_integration_is_paused_waits_to_be_replayed_and_is_then_written() {
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;
    test.set_integration_status(SF, "paused").await;
    edit_in_castiel(&test, ANN, "Ann", json!({"email": "ann@paused.test"})).await;

    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@acme.test",
        "nothing written while paused"
    );
    let dead = test.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties["DeadLetterReason"],
        "INTEGRATION_NOT_ACTIVE"
    );

    test.set_integration_status(SF, "active").await;
    let replayed = test.cli_json(&["dead-letters", "replay", "--all"]).await;
    assert!(replayed[0]["error"].is_null(), "{replayed}");
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@paused.test"
    );

    // A write-back carried out, delivered again once the integration is paused, is done.
    let envelope = write_back(ANN, "update", Some(&["email"]), "wb-done", 1);
    push(&handler, &envelope).await;
    test.set_integration_status(SF, "paused").await;
    push(&handler, &envelope).await;
    assert_eq!(
        test.broker().peek(SYNC_DEADLETTER).unwrap().len(),
        0,
        "not set aside to be written again"
    );
}

#[tokio::test]
async fn an_edit_made_while_the_one_before_was_written_back_is_written_too_not_taken_for_a_conflict()
 {
    let (test, fake, handler) = ann_synced("manual", &[]).await;
    let store = test.store();
    let edit = |email: &'static str| {
        let store = store.clone();
        async move {
            let mut ann = store.get("t1", ANN).await.unwrap().unwrap().value;
            ann.structured_data["email"] = json!(email);
            ann.updated_at = Some(Utc::now());
            store.upsert(&ann).await.unwrap();
        }
    };
    edit("ann@one.test").await;
    // Salesforce takes the first edit; before the handler has recorded it, Ann's email is
    // changed again in Castiel.
    fake.org.lock().unwrap().hold_next_write = true;
    let first = handler.invoke_in_background(
        "SyncOutbound",
        &write_back(ANN, "update", Some(&["email"]), "wb-1", 1),
    );
    fake.held.notified().await;
    edit("ann@two.test").await;
    fake.release.notify_one();
    assert!(first.await.unwrap().host_accepts());

    push(
        &handler,
        &write_back(ANN, "update", Some(&["email"]), "wb-2", 1),
    )
    .await;
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@two.test"
    );
    assert!(
        test.shards("c_syncConflict").await.is_empty(),
        "the provider holds what this engine wrote: no conflict"
    );
}

/// Ann, synced in from Salesforce under `strategy`; then renamed "Ann Lee" in Castiel an hour
/// ago while, five minutes ago, Salesforce renamed her "Annie" and changed her email; then
/// synced again. Returns the test app with the synced result.
async fn edited_on_both_sides(strategy: &str) -> TestApp {
    let (test, fake, handler) = ann_synced(strategy, &[]).await;

    let store = test.store();
    let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    shard.structured_data["name"] = json!("Ann Lee");
    shard.updated_at = Some(Utc::now() - Duration::hours(1));
    store.upsert(&shard).await.unwrap();
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "LastName": "Annie", "Email": "ann@lee.test"}),
        Utc::now() - Duration::minutes(5),
    );
    sync(&handler, "job-2").await;
    test
}

#[tokio::test]
async fn an_inbound_sync_keeps_castiel_edits_and_leaves_a_conflict_for_an_operator_under_manual() {
    let test = edited_on_both_sides("manual").await;
    let store = test.store();
    let shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(
        shard.structured_data["name"], "Ann Lee",
        "not overwritten while in conflict"
    );
    assert_eq!(
        shard.structured_data["email"], "ann@lee.test",
        "the provider's own change is taken"
    );
    let conflicts = test.shards("c_syncConflict").await;
    assert_eq!(conflicts.len(), 1);
    let record = &conflicts[0]["structuredData"];
    assert_eq!(record["status"], "open");
    assert_eq!(
        record["fields"],
        json!([{"field": "name", "castiel": "Ann Lee", "provider": "Annie"}])
    );
    let detected: Vec<_> = test
        .events()
        .into_iter()
        .filter(|e| e.kind == "integration.conflict.detected")
        .collect();
    assert_eq!(detected.len(), 1);
    let announced = detected[0].data.to_string();
    assert!(announced.contains("\"field\":\"name\""));
    assert!(
        !announced.contains("Annie") && !announced.contains("Ann Lee"),
        "no values in events"
    );
    assert!(
        test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty(),
        "nothing goes to Salesforce for a field waiting for an operator"
    );
}

#[tokio::test]
async fn under_castiel_wins_an_inbound_conflict_sends_castiels_record_to_the_provider() {
    let test = edited_on_both_sides("castiel_wins").await;
    let store = test.store();
    let shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(shard.structured_data["name"], "Ann Lee");
    assert_eq!(
        shard.structured_data["email"], "ann@acme.test",
        "Castiel's record wins whole"
    );
    let outbound = test.broker().peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(outbound.len(), 1);
    assert_eq!(outbound[0].session_id.as_deref(), Some(SF));
    let message: Value = serde_json::from_slice(&outbound[0].body).unwrap();
    assert_eq!(message["operation"], "update");
    assert_eq!(message["changedFields"], json!(["email", "name"]));
    assert_eq!(message["externalId"], "003000000000001AAA");
    assert!(
        test.shards("c_syncConflict").await.is_empty(),
        "settled, nothing left open"
    );
}

/// Ann, made in Castiel: a contact shard no record is linked to yet.
async fn castiel_made_ann(test: &TestApp) {
    let shard: handler::model::Shard = serde_json::from_value(json!({
        "id": "shard-ann", "tenantId": "t1", "shardTypeId": "c_contact", "name": "Ann Lee",
        "structuredData": {"name": "Ann Lee", "email": "ann@lee.test"},
        "updatedAt": Utc::now()
    }))
    .unwrap();
    test.store().upsert(&shard).await.unwrap();
}

/// Delivers a write-back (`envelope`, a [`write_back`]) to SyncOutbound, as the host does,
/// and checks that the host takes the answer (the delivery is settled, not retried).
async fn push(handler: &HostedHandler, envelope: &Value) {
    let res = handler.invoke("SyncOutbound", envelope).await;
    assert!(res.host_accepts(), "{res:?}");
}

/// The SyncOutbound invocation for a write-back of `shard`, as the host delivers it.
fn write_back(
    shard: &str,
    operation: &str,
    changed: Option<&[&str]>,
    message_id: &str,
    delivery: u32,
) -> Value {
    // A redelivery carries the very message the first delivery did.
    let mut message = json!({
        "shardId": shard, "tenantId": "t1", "operation": operation, "externalSystem": "salesforce",
        "triggeredAt": "2026-11-22T10:00:00Z",
        "triggeredBy": "user-7"
    });
    if let Some(fields) = changed {
        message["changedFields"] = json!(fields);
    }
    service_bus_message(
        "SyncOutbound",
        &message.to_string(),
        message_id,
        delivery,
        Some(SF),
    )
}

async fn history_of(test: &TestApp, job: &str) -> Value {
    test.history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == job)
        .unwrap_or_else(|| panic!("no history for {job}"))["structuredData"]
        .clone()
}

/// Ann, made in Castiel, whose create reached Salesforce while the handler died before the host
/// heard back (the shard is not linked to the record).
async fn ann_created_and_the_answer_lost() -> (TestApp, FakeSalesforce) {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    test.register_integration(two_way(&fake, "newest_wins"))
        .await;
    test.set_credentials(SF, &fake.credentials()).await;
    castiel_made_ann(&test).await;
    let handler = test.host_handler().await;
    fake.org.lock().unwrap().hold_next_write = true;
    let first = handler.invoke_in_background(
        "SyncOutbound",
        &write_back("shard-ann", "create", None, "wb-1", 1),
    );
    fake.held.notified().await;
    handler.kill_9().await;
    let _ = first.await;
    fake.release.notify_one();
    (test, fake)
}

#[tokio::test]
async fn a_contact_deleted_after_a_create_whose_answer_was_lost_goes_from_salesforce_too() {
    let (test, fake) = ann_created_and_the_answer_lost().await;
    assert_eq!(fake.records("Contact").len(), 1);

    // Ann is deleted in Castiel before the create is delivered again.
    let store = test.store();
    let mut shard = store.get("t1", "shard-ann").await.unwrap().unwrap().value;
    shard.deleted_at = Some(Utc::now());
    store.upsert(&shard).await.unwrap();
    let handler = test.host_handler().await;
    push(
        &handler,
        &write_back("shard-ann", "delete", None, "wb-2", 1),
    )
    .await;
    assert!(
        fake.records("Contact").is_empty(),
        "the record the lost create made is found by the shard's id and deleted"
    );
}

#[tokio::test]
async fn a_contact_made_in_castiel_is_created_once_at_salesforce_whatever_the_deliveries() {
    // The write is made, then the handler dies before the host hears back.
    let (test, fake) = ann_created_and_the_answer_lost().await;
    assert_eq!(
        fake.records("Contact").len(),
        1,
        "the first attempt's record exists"
    );

    // The host redelivers, twice.
    let handler = test.host_handler().await;
    for delivery in [2, 3] {
        push(
            &handler,
            &write_back("shard-ann", "create", None, "wb-1", delivery),
        )
        .await;
    }
    let records = fake.records("Contact");
    assert_eq!(
        records.len(),
        1,
        "one record, however often the create was delivered"
    );
    assert_eq!(records[0]["LastName"], "Ann Lee");
    assert_eq!(records[0]["Castiel_Id__c"], "shard-ann");
    let shard = test
        .store()
        .get("t1", "shard-ann")
        .await
        .unwrap()
        .unwrap()
        .value;
    let link = &shard.external_relationships[0];
    assert_eq!(link.external_id, records[0]["Id"].as_str().unwrap());
    assert_eq!(
        link.sync_direction,
        handler::model::shard::SyncDirection::Bidirectional
    );
    let record = history_of(&test, "writeback:wb-1").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["recordsCreated"], 1);
    assert_eq!(record["entityStats"][0]["direction"], "outbound");
}

#[tokio::test]
async fn a_name_salesforce_will_not_write_is_left_out_and_the_rest_of_the_edit_goes_through() {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "Name": "Ann Lee", "LastName": "Lee",
               "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    // A contact's `Name` is compound: Salesforce refuses any write that sets it.
    let mut integration = two_way(&fake, "newest_wins");
    integration["structuredData"]["entityMappings"][0]["fieldMappings"] = json!([
        {"source": "Name", "target": "name"}, {"source": "Email", "target": "email"}
    ]);
    let handler = first_sync(&test, &fake, integration).await;

    let changes = json!({"name": "Ann Smith", "email": "ann@smith.test"});
    edit_in_castiel(&test, ANN, "Ann Smith", changes).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    let record = fake.record("Contact", "003000000000001AAA").unwrap();
    assert_eq!(
        (&record["Email"], &record["Name"]),
        (&json!("ann@smith.test"), &json!("Ann Lee"))
    );
    // Castiel's name, which Salesforce will not take, goes back to Salesforce's.
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(
        (ann.name.as_str(), &ann.structured_data["name"]),
        ("Ann Lee", &json!("Ann Lee"))
    );
    let history = test.history().await;
    let written = history
        .iter()
        .map(|r| &r["structuredData"])
        .find(|r| {
            r["jobId"]
                .as_str()
                .is_some_and(|id| id.starts_with("writeback:"))
        })
        .expect("the write-back's record");
    assert_eq!(written["status"], "partial", "{written}");
    let error = &written["errors"][0];
    assert_eq!(error["field"], "name");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("does not let `Name` be written"),
        "{message}"
    );
    assert!(test.broker().peek(SYNC_DEADLETTER).unwrap().is_empty());
}

#[tokio::test]
async fn an_edit_in_castiel_reaches_salesforce_and_the_next_sync_reads_it_back_as_no_change() {
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;

    let store = test.store();
    let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    shard.structured_data["email"] = json!("ann@lee.test");
    shard.updated_at = Some(Utc::now());
    store.upsert(&shard).await.unwrap();
    push(
        &handler,
        &write_back(ANN, "update", Some(&["email"]), "wb-2", 1),
    )
    .await;
    let record = fake.record("Contact", "003000000000001AAA").unwrap();
    assert_eq!(record["Email"], "ann@lee.test");
    assert_eq!(
        record["LastName"], "Ann",
        "only the changed field is written"
    );
    let writes_before = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH"))
        .count();
    assert_eq!(writes_before, 1);

    sync(&handler, "job-2").await;
    let synced = history_of(&test, "job-2").await;
    assert_eq!(
        synced["stats"]["shardsUpdated"], 0,
        "our own write is not a change: {synced}"
    );
    assert!(
        test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty(),
        "and starts no write-back"
    );

    // Deleted in Castiel: deleted at Salesforce, once.
    let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    shard.deleted_at = Some(Utc::now());
    store.upsert(&shard).await.unwrap();
    for delivery in [1, 2] {
        push(&handler, &write_back(ANN, "delete", None, "wb-3", delivery)).await;
    }
    assert!(fake.record("Contact", "003000000000001AAA").is_none());
    let deletes = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("DELETE"))
        .count();
    assert_eq!(
        deletes, 1,
        "the redelivery finds the link already marked deleted"
    );
}

#[tokio::test]
async fn a_deletion_in_castiel_outlasts_a_sync_that_reads_the_record_before_it_is_written_back() {
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;
    let sent = test
        .cli_json(&["shards", "delete", ANN, "--tenant", "t1"])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "delete");

    // A full sync runs before the deletion is written back, and reads Ann at Salesforce.
    handler
        .run_sync(SF, "salesforce", "job-2", "full_sync")
        .await;
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert!(ann.deleted_at.is_some(), "still deleted in Castiel");

    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert!(
        fake.record("Contact", "003000000000001AAA").is_none(),
        "and deleted at Salesforce"
    );
}

#[tokio::test]
async fn a_contact_merged_into_a_shard_its_lead_began_is_the_record_written_back() {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Lead",
        json!({"Id": "00Q000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(3),
    );
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    let dedup = json!({
        "rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"
    });
    let mut integration = two_way(&fake, "newest_wins");
    let contacts = integration["structuredData"]["entityMappings"][0].clone();
    let mut contacts = contacts;
    contacts["deduplication"] = dedup.clone();
    // The leads sync first, one way: Ann's shard is her lead's.
    integration["structuredData"]["entityMappings"] = json!([{
        "externalEntity": "Lead", "shardTypeId": "c_contact", "nameField": "name",
        "fieldMappings": [
            {"source": "LastName", "target": "name"},
            {"source": "Email", "target": "email"}
        ],
        "deduplication": dedup
    }, contacts]);
    let handler = first_sync(&test, &fake, integration).await;
    let lead_shard = "int-acme-sf~Lead~00Q000000000001AAA";
    let ann = test
        .store()
        .get("t1", lead_shard)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(ann.external_relationships.len(), 2, "{ann:?}");

    edit_in_castiel(&test, lead_shard, "Ann", json!({"email": "ann@new.test"})).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@new.test",
        "{:?}",
        fake.requests()
    );

    test.cli_json(&["shards", "delete", lead_shard, "--tenant", "t1"])
        .await;
    deliver_write_backs(&test, &handler).await;
    assert!(fake.record("Contact", "003000000000001AAA").is_none());
    assert!(
        fake.record("Lead", "00Q000000000001AAA").is_some(),
        "the lead is not Castiel's to delete: {:?}",
        fake.requests()
    );
}

#[tokio::test]
async fn deleting_a_contact_merged_from_two_records_deletes_both_at_salesforce() {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    for (id, name) in [
        ("003000000000001AAA", "Ann"),
        ("003000000000002AAA", "Ann Lee"),
    ] {
        fake.add(
            "Contact",
            json!({"Id": id, "LastName": name, "Email": "ann@acme.test"}),
            Utc::now() - Duration::days(2),
        );
    }
    // And a lead of hers, synced one way into contacts.
    fake.add(
        "Lead",
        json!({"Id": "00Q000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    let mut integration = two_way(&fake, "newest_wins");
    let dedup = json!({
        "rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"
    });
    integration["structuredData"]["entityMappings"][0]["deduplication"] = dedup.clone();
    let mappings = integration["structuredData"]["entityMappings"]
        .as_array_mut()
        .unwrap();
    mappings.push(json!({
        "externalEntity": "Lead", "shardTypeId": "c_contact", "nameField": "name",
        "fieldMappings": [
            {"source": "LastName", "target": "name"},
            {"source": "Email", "target": "email"}
        ],
        "deduplication": dedup
    }));
    let handler = first_sync(&test, &fake, integration).await;
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(
        ann.external_relationships.len(),
        3,
        "one person, two contacts and a lead"
    );

    test.cli_json(&["shards", "delete", ANN, "--tenant", "t1"])
        .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    assert!(
        fake.records("Contact").is_empty(),
        "the duplicate would bring Ann back: {:?}",
        fake.requests()
    );
    assert_eq!(
        fake.records("Lead").len(),
        1,
        "the lead is not written back"
    );
    assert!(
        !fake.requests().iter().any(|r| r.contains("00Q")),
        "{:?}",
        fake.requests()
    );
    let history = test.history().await;
    let written = history
        .iter()
        .map(|r| &r["structuredData"])
        .find(|r| {
            r["jobId"]
                .as_str()
                .is_some_and(|id| id.starts_with("writeback:"))
        })
        .expect("the write-back's record");
    assert_eq!(written["stats"]["recordsDeleted"], 2, "{written}");
}

#[tokio::test]
async fn a_deletion_salesforce_never_took_gives_way_to_the_record_after_a_week() {
    let (test, _fake, handler) = ann_synced("newest_wins", &[]).await;
    // Deleted in Castiel eight days ago; its write-back was refused and dead-lettered.
    let store = test.store();
    let mut ann = store.get("t1", ANN).await.unwrap().unwrap().value;
    ann.deleted_at = Some(Utc::now() - Duration::days(8));
    ann.updated_at = ann.deleted_at;
    ann.content_hash = Some(handler::engine::pipeline::content_hash(&ann));
    store.upsert(&ann).await.unwrap();

    handler
        .run_sync(SF, "salesforce", "job-2", "full_sync")
        .await;

    let ann = store.get("t1", ANN).await.unwrap().unwrap().value;
    assert!(
        ann.deleted_at.is_none(),
        "the record lives on at Salesforce"
    );
}

#[tokio::test]
async fn a_contact_deleted_at_salesforce_takes_its_derived_shards_when_a_write_back_finds_it_gone()
{
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    let mut integration = two_way(&fake, "newest_wins");
    integration["structuredData"]["entityMappings"][0]["derivedShards"] = json!([{
        "shardTypeId": "c_contact_card",
        "fieldMappings": [{"source": "Email", "target": "email"}]
    }]);
    let handler = first_sync(&test, &fake, integration).await;
    let card = format!("{ANN}~c_contact_card");
    assert!(test.store().get("t1", &card).await.unwrap().is_some());

    fake.delete("Contact", "003000000000001AAA", Utc::now());
    edit_in_castiel(&test, ANN, "Ann", json!({"email": "ann@new.test"})).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert!(ann.deleted_at.is_some());
    let card = test.store().get("t1", &card).await.unwrap().unwrap().value;
    assert!(
        card.deleted_at.is_some(),
        "derived shards go with their primary"
    );
}

#[tokio::test]
async fn a_value_salesforce_spells_its_own_way_can_be_edited_again_before_the_next_sync() {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "LastName": "Ann", "Email": "ann@acme.test",
               "Revenue__c": 1000.0, "Next_Call__c": "2026-01-05T10:00:00.000+0000"}),
        Utc::now() - Duration::days(2),
    );
    let mut integration = two_way(&fake, "provider_wins");
    let fields = &mut integration["structuredData"]["entityMappings"][0]["fieldMappings"];
    for (source, target) in [("Revenue__c", "revenue"), ("Next_Call__c", "nextCall")] {
        fields
            .as_array_mut()
            .unwrap()
            .push(json!({"source": source, "target": target}));
    }
    let handler = first_sync(&test, &fake, integration).await;

    // Edited twice before any inbound sync: Salesforce's spelling of the first edit is what
    // was written, not a change made there, so nothing conflicts and provider_wins takes
    // nothing back.
    for (revenue, next_call, as_kept) in [
        (5000, "2026-02-01T09:00:00Z", "2026-02-01T09:00:00.000+0000"),
        (6000, "2026-03-01T09:00:00Z", "2026-03-01T09:00:00.000+0000"),
    ] {
        edit_in_castiel(
            &test,
            ANN,
            "Ann",
            json!({"revenue": revenue, "nextCall": next_call}),
        )
        .await;
        assert_eq!(deliver_write_backs(&test, &handler).await, 1);
        let record = fake.record("Contact", "003000000000001AAA").unwrap();
        assert_eq!(
            record["Revenue__c"],
            json!(f64::from(revenue)),
            "the edit landed, kept as a double"
        );
        assert_eq!(record["Next_Call__c"], as_kept);
    }
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(ann.structured_data["revenue"], 6000, "and stays in Castiel");

    // The next sync reads Salesforce's spelling as the same values.
    sync(&handler, "job-2").await;
    assert!(
        test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty(),
        "nothing to write back"
    );
    let ann = test.store().get("t1", ANN).await.unwrap().unwrap().value;
    assert_eq!(ann.structured_data["nextCall"], "2026-03-01T09:00:00Z");
}

/// Checks that the one write-back waiting in `sync-outbound` is held for the provider's
/// allocation: not dead-lettered, and with no attempt spent.
fn held_write_back(test: &TestApp) {
    let waiting = test.broker().peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(waiting.len(), 1, "held, not dead-lettered");
    assert!(
        waiting[0].message_id.contains(":held-"),
        "{}",
        waiting[0].message_id
    );
    let held: Value = serde_json::from_slice(&waiting[0].body).unwrap();
    assert_eq!(held["attempt"], 1, "no attempt spent: {held}");
    assert!(test.broker().peek(SYNC_DEADLETTER).unwrap().is_empty());
}

/// Delivers what waits in `sync-outbound` to SyncOutbound, in order, as the host would.
async fn deliver_write_backs(test: &TestApp, handler: &HostedHandler) -> usize {
    let broker = test.broker();
    let waiting = broker.peek(SYNC_OUTBOUND).unwrap();
    for message in &waiting {
        handler.deliver("SyncOutbound", message).await;
        broker.delete_unlocked(message.sequence_number).unwrap();
    }
    waiting.len()
}

#[tokio::test]
async fn a_contact_changed_with_the_operator_commands_is_created_updated_and_deleted_at_salesforce()
{
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    test.register_integration(two_way(&fake, "newest_wins"))
        .await;
    test.set_credentials(SF, &fake.credentials()).await;
    let handler = test.host_handler().await;
    let file = test.data_dir().join("ann.json");
    let put = |data: Value| {
        let shard = json!({"id": "shard-ann", "tenantId": "t1", "shardTypeId": "c_contact",
                           "name": "Ann", "structuredData": data});
        std::fs::write(&file, shard.to_string()).unwrap();
    };

    put(json!({"name": "Ann Lee", "email": "ann@lee.test"}));
    let sent = test
        .cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "create", "{sent}");
    assert_eq!(sent[0]["integrationId"], SF);
    // The same change sent twice is one message: duplicate detection keeps the first.
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    let records = fake.records("Contact");
    assert_eq!(records.len(), 1);
    let id = records[0]["Id"].as_str().unwrap().to_string();
    assert_eq!(records[0]["Email"], "ann@lee.test");

    put(json!({"name": "Ann Lee", "email": "ann@acme.test"}));
    let sent = test
        .cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "update");
    assert_eq!(sent[0]["writeBack"]["changedFields"], json!(["email"]));
    deliver_write_backs(&test, &handler).await;
    assert_eq!(
        fake.record("Contact", &id).unwrap()["Email"],
        "ann@acme.test"
    );

    // Deleted, then restored before the delete is handled: the contact stays at Salesforce.
    test.cli_json(&["shards", "delete", "shard-ann", "--tenant", "t1"])
        .await;
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    deliver_write_backs(&test, &handler).await;
    assert!(
        fake.record("Contact", &id).is_some(),
        "restored, not deleted"
    );

    let sent = test
        .cli_json(&["shards", "delete", "shard-ann", "--tenant", "t1"])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "delete");
    deliver_write_backs(&test, &handler).await;
    assert!(fake.record("Contact", &id).is_none());
}

/// Seed 001's example 4, written back: the contact both sides agreed on, then, in Castiel two
/// hours ago, name, email and phone changed, and at Salesforce an hour ago name, email and
/// title. Castiel's write-back of its change is delivered under `strategy`. Returns the record
/// at Salesforce and the shard afterwards.
async fn example_four(strategy: &str, owners: Value) -> (Value, Value, TestApp, FakeSalesforce) {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    let id = "003000000000004AAA";
    fake.add(
        "Contact",
        json!({"Id": id, "LastName": "J. Doe", "Email": "j@example.com", "Phone": "555-0100",
               "Title": "Engineer"}),
        Utc::now() - Duration::days(2),
    );
    let mut integration = two_way(&fake, strategy);
    let data = &mut integration["structuredData"];
    data["fieldOwners"] = owners;
    data["entityMappings"][0]["fieldMappings"] = json!([
        {"source": "LastName", "target": "name"}, {"source": "Email", "target": "email"},
        {"source": "Phone", "target": "phone"}, {"source": "Title", "target": "title"}
    ]);
    let handler = first_sync(&test, &fake, integration).await;

    let shard_id = format!("int-acme-sf~Contact~{id}");
    let store = test.store();
    let mut shard = store.get("t1", &shard_id).await.unwrap().unwrap().value;
    shard.structured_data["name"] = json!("John Doe");
    shard.structured_data["email"] = json!("john@example.com");
    shard.structured_data["phone"] = json!("555-0199");
    shard.updated_at = Some(Utc::now() - Duration::hours(2));
    store.upsert(&shard).await.unwrap();
    fake.add(
        "Contact",
        json!({"Id": id, "LastName": "Jonathan Doe", "Email": "john.doe@example.com",
               "Phone": "555-0100", "Title": "Senior Engineer"}),
        Utc::now() - Duration::hours(1),
    );
    let res = handler
        .invoke(
            "SyncOutbound",
            &write_back(
                &shard_id,
                "update",
                Some(&["name", "email", "phone"]),
                "wb-4",
                1,
            ),
        )
        .await;
    assert!(res.host_accepts(), "{res:?}");
    let record = Value::Object(fake.record("Contact", id).unwrap());
    let shard = store.get("t1", &shard_id).await.unwrap().unwrap().value;
    (record, shard.structured_data, test, fake)
}

fn contact(name: &str, email: &str, phone: &str, title: &str) -> (Value, Value) {
    (
        json!({"name": name, "email": email, "phone": phone, "title": title}),
        json!([name, email, phone, title]),
    )
}

fn at_salesforce(record: &Value) -> Value {
    json!([
        record["LastName"],
        record["Email"],
        record["Phone"],
        record["Title"]
    ])
}

#[tokio::test]
async fn each_strategy_settles_example_four_on_write_back_as_documented() {
    let salesforce_newer = contact(
        "Jonathan Doe",
        "john.doe@example.com",
        "555-0100",
        "Senior Engineer",
    );
    let castiel_whole = contact("John Doe", "john@example.com", "555-0199", "Engineer");
    let merged = contact(
        "Jonathan Doe",
        "john.doe@example.com",
        "555-0199",
        "Senior Engineer",
    );
    let owned = contact(
        "John Doe",
        "john.doe@example.com",
        "555-0199",
        "Senior Engineer",
    );
    for (strategy, owners, expected) in [
        ("newest_wins", json!({}), &salesforce_newer),
        ("provider_wins", json!({}), &salesforce_newer),
        ("castiel_wins", json!({}), &castiel_whole),
        ("merge", json!({}), &merged),
        ("field_priority", json!({"name": "castiel"}), &owned),
    ] {
        let (record, shard, test, _) = example_four(strategy, owners).await;
        assert_eq!(shard, expected.0, "{strategy}: Castiel");
        assert_eq!(at_salesforce(&record), expected.1, "{strategy}: Salesforce");
        assert!(
            test.shards("c_syncConflict").await.is_empty(),
            "{strategy} settles them"
        );
        let detected = test
            .events()
            .iter()
            .filter(|e| e.kind == "integration.conflict.resolved")
            .count();
        assert_eq!(detected, 1, "{strategy}");
    }
}

#[tokio::test]
async fn manual_overwrites_neither_side_until_an_operator_takes_one() {
    let (record, shard, test, fake) = example_four("manual", json!({})).await;
    assert_eq!(
        at_salesforce(&record),
        json!([
            "Jonathan Doe",
            "john.doe@example.com",
            "555-0199",
            "Senior Engineer"
        ]),
        "only Castiel's one-sided change (phone) is written"
    );
    assert_eq!(shard["name"], "John Doe");
    assert_eq!(shard["email"], "john@example.com");
    assert_eq!(
        shard["title"], "Senior Engineer",
        "Salesforce's one-sided change is taken"
    );

    let open = test
        .cli_json(&["conflicts", "list", "--tenant", "t1"])
        .await;
    assert_eq!(open.as_array().unwrap().len(), 1, "{open}");
    let conflict = &open[0];
    let fields: Vec<&str> = conflict["conflict"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["email", "name"]);
    let id = conflict["id"].as_str().unwrap();
    let out = test
        .cli(&[
            "conflicts",
            "resolve",
            id,
            "--tenant",
            "t1",
            "--take",
            "castiel",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        test.cli_json(&["conflicts", "list", "--tenant", "t1"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The operator's choice goes to Salesforce the usual way.
    let handler = test.host_handler().await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    let record = Value::Object(fake.record("Contact", "003000000000004AAA").unwrap());
    assert_eq!(
        at_salesforce(&record),
        json!([
            "John Doe",
            "john@example.com",
            "555-0199",
            "Senior Engineer"
        ])
    );
}

/// A Dynamics 365 integration that writes its contacts back, keeping each row's shard id in
/// `castiel_id`.
fn two_way_dynamics(fake: &FakeDynamics) -> Value {
    json!({
        "id": "int-contoso", "tenantId": "t1", "name": "Contoso CRM",
        "structuredData": {
            "providerName": "dynamics365",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "connection": {"environmentUrl": fake.url, "tokenUrl": fake.token_url(),
                           "organizationId": ORGANIZATION_ID},
            "entityMappings": [{
                "externalEntity": "contacts", "shardTypeId": "c_contact", "nameField": "full_name",
                "bidirectional": true, "idempotencyField": "castiel_id",
                "fieldMappings": [
                    {"source": "fullname", "target": "full_name"},
                    {"source": "emailaddress1", "target": "email"}
                ]
            }]
        }
    })
}

#[tokio::test]
async fn a_dynamics_365_row_whose_answer_the_gateway_lost_is_found_again_not_created_twice() {
    let test = TestApp::new();
    let fake = FakeDynamics::start().await;
    test.register_integration(two_way_dynamics(&fake)).await;
    test.set_credentials("int-contoso", &fake.credentials())
        .await;
    let handler = test.host_handler().await;
    let file = test.data_dir().join("zoe.json");
    let shard = json!({"id": "shard-zoe", "tenantId": "t1", "shardTypeId": "c_contact",
                       "name": "Zoe", "structuredData": {"full_name": "Zoe Ng", "email": "zoe@contoso.test"}});
    std::fs::write(&file, shard.to_string()).unwrap();
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;

    // Dataverse makes the row; the gateway in front of it answers 504.
    fake.state.lock().unwrap().lose_next_write_answer = true;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    let posts = |fake: &FakeDynamics| {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("POST"))
            .count()
    };
    assert_eq!(posts(&fake), 1, "a create is not sent again in place");
    let retry = test.broker().peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(retry.len(), 1, "the write-back is retried later");
    assert!(retry[0].message_id.ends_with(":attempt-2"));

    // Zoe's email is corrected in Castiel before the retry.
    let shard = json!({"id": "shard-zoe", "tenantId": "t1", "shardTypeId": "c_contact",
                       "name": "Zoe", "structuredData": {"full_name": "Zoe Ng", "email": "zoe.ng@contoso.test"}});
    std::fs::write(&file, shard.to_string()).unwrap();
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 2);
    assert_eq!(posts(&fake), 1, "the retry found the row by its castiel_id");
    let rows = fake.rows("contacts");
    assert_eq!(rows.len(), 1, "one row");
    assert_eq!(rows[0]["castiel_id"], "shard-zoe");
    assert_eq!(
        rows[0]["emailaddress1"], "zoe.ng@contoso.test",
        "the row found holds what Castiel says now"
    );
    assert!(test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty());
    assert!(
        test.broker()
            .peek(handler::queue::SYNC_DEADLETTER)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_field_split_in_castiel_is_written_back_with_the_part_the_provider_changed_meanwhile() {
    let test = TestApp::new();
    let fake = FakeDynamics::start().await;
    let mut integration = two_way_dynamics(&fake);
    integration["structuredData"]["entityMappings"][0]["fieldMappings"] = json!([
        {"source": "fullname", "target": "full_name"},
        {"source": "nickname", "targets": ["nick_first", "nick_last"], "transform": "split",
         "separator": "|"}
    ]);
    test.register_integration(integration).await;
    test.set_credentials("int-contoso", &fake.credentials())
        .await;
    let id = fake.add(
        "contacts",
        json!({"fullname": "Ann Lee", "nickname": "Ann|Lee"}),
    );
    let handler = test.host_handler().await;
    sync_of(&handler, "int-contoso", "dynamics365", "job-1").await;
    let shard_id = format!("int-contoso~contacts~{id}");

    // Dataverse gets the first part changed, Castiel the last.
    fake.update("contacts", &id, json!({"nickname": "Anna|Lee"}));
    edit_in_castiel(&test, &shard_id, "Ann Lee", json!({"nick_last": "Li"})).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    let rows = fake.rows("contacts");
    assert_eq!(rows[0]["nickname"], "Anna|Li", "neither change is lost");
    let shard = test
        .store()
        .get("t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(shard.structured_data["nick_first"], "Anna");
    assert_eq!(shard.structured_data["nick_last"], "Li");
}

#[tokio::test]
async fn dynamics_365_rows_are_created_once_whatever_the_deliveries_then_updated_and_deleted() {
    let test = TestApp::new();
    let fake = FakeDynamics::start().await;
    test.register_integration(two_way_dynamics(&fake)).await;
    test.set_credentials("int-contoso", &fake.credentials())
        .await;
    let handler = test.host_handler().await;
    let file = test.data_dir().join("yvonne.json");
    let put = |data: Value| {
        let shard = json!({"id": "shard-yvonne", "tenantId": "t1", "shardTypeId": "c_contact",
                           "name": "Yvonne", "structuredData": data});
        std::fs::write(&file, shard.to_string()).unwrap();
    };

    put(json!({"full_name": "Yvonne McKay", "email": "yvonne@contoso.test"}));
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    let waiting = test.broker().peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(waiting.len(), 1);
    // The row is made, then the handler dies before the host hears back; the host delivers
    // the message twice more.
    fake.state.lock().unwrap().hold_next_write = true;
    let body = String::from_utf8(waiting[0].body.clone()).unwrap();
    let envelope = |delivery| {
        service_bus_message(
            "SyncOutbound",
            &body,
            &waiting[0].message_id,
            delivery,
            Some("int-contoso"),
        )
    };
    let first = handler.invoke_in_background("SyncOutbound", &envelope(1));
    fake.held.notified().await;
    handler.kill_9().await;
    let _ = first.await;
    fake.release.notify_one();
    let handler = test.host_handler().await;
    for delivery in [2, 3] {
        assert!(
            handler
                .invoke("SyncOutbound", &envelope(delivery))
                .await
                .host_accepts()
        );
    }
    test.broker()
        .delete_unlocked(waiting[0].sequence_number)
        .unwrap();
    let rows = fake.rows("contacts");
    assert_eq!(rows.len(), 1, "one row");
    assert_eq!(rows[0]["castiel_id"], "shard-yvonne");
    assert_eq!(rows[0]["emailaddress1"], "yvonne@contoso.test");

    put(json!({"full_name": "Yvonne McKay-Lee", "email": "yvonne@contoso.test"}));
    test.cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    deliver_write_backs(&test, &handler).await;
    let rows = fake.rows("contacts");
    assert_eq!(
        rows[0]["fullname"], "Yvonne McKay-Lee",
        "updated under the etag it read"
    );

    test.cli_json(&["shards", "delete", "shard-yvonne", "--tenant", "t1"])
        .await;
    deliver_write_backs(&test, &handler).await;
    assert!(fake.rows("contacts").is_empty());
}

#[tokio::test]
async fn two_write_backs_whose_history_ids_collide_are_both_carried_out_and_recorded() {
    // The platform's record id keeps three characters of the job: find two write-backs of
    // the same second that share one.
    let at = Utc::now();
    let mut seen = std::collections::HashMap::new();
    let (first, second) = (0..)
        .find_map(|n| {
            let id = format!("wb-{n}");
            let record = handler::model::history::history_shard_id(&format!("writeback:{id}"), at);
            seen.insert(record, id.clone()).map(|other| (other, id))
        })
        .unwrap();
    let (test, fake, handler) = ann_synced("newest_wins", &[]).await;
    let store = test.store();
    for (message_id, email) in [(&first, "ann@one.test"), (&second, "ann@two.test")] {
        let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
        shard.structured_data["email"] = json!(email);
        shard.updated_at = Some(Utc::now());
        store.upsert(&shard).await.unwrap();
        let mut message = json!({
            "shardId": ANN, "tenantId": "t1", "operation": "update", "changedFields": ["email"],
            "externalSystem": "salesforce", "triggeredAt": at, "triggeredBy": "user-7"
        });
        message["triggeredAt"] = json!(at);
        let envelope = service_bus_message(
            "SyncOutbound",
            &message.to_string(),
            message_id,
            1,
            Some(SF),
        );
        assert!(
            handler
                .invoke("SyncOutbound", &envelope)
                .await
                .host_accepts()
        );
    }
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@two.test",
        "the second write-back was not mistaken for the first"
    );
    history_of(&test, &format!("writeback:{first}")).await;
    history_of(&test, &format!("writeback:{second}")).await;
}

#[tokio::test]
async fn a_write_back_salesforce_cannot_take_now_is_retried_later_and_one_no_retry_can_fix_is_dead_lettered()
 {
    let (test, fake, handler) =
        ann_synced("newest_wins", &[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")]).await;
    let store = test.store();
    let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    shard.structured_data["email"] = json!("ann@lee.test");
    shard.updated_at = Some(Utc::now());
    store.upsert(&shard).await.unwrap();

    fake.org.lock().unwrap().outage = Some(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    push(
        &handler,
        &write_back(ANN, "update", Some(&["email"]), "wb-9", 1),
    )
    .await;
    let record = history_of(&test, "writeback:wb-9").await;
    assert_eq!(record["status"], "failed");
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("retrying at"),
        "{record}"
    );
    assert_eq!(record["stats"]["recordsFailed"], 1);
    let retry = test.broker().peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(retry.len(), 1, "re-sent for later");
    assert_eq!(
        retry[0].session_id.as_deref(),
        Some(SF),
        "in the integration's session"
    );
    let body: Value = serde_json::from_slice(&retry[0].body).unwrap();
    assert_eq!(body["attempt"], 2);

    // Salesforce is back: the retry writes it.
    fake.org.lock().unwrap().outage = None;
    deliver_write_backs(&test, &handler).await;
    assert_eq!(
        fake.record("Contact", "003000000000001AAA").unwrap()["Email"],
        "ann@lee.test"
    );

    // No integration writes c_company shards back: nothing to retry, dead-lettered with why.
    let company: handler::model::Shard = serde_json::from_value(json!({
        "id": "acme", "tenantId": "t1", "shardTypeId": "c_company", "structuredData": {}
    }))
    .unwrap();
    store.upsert(&company).await.unwrap();
    push(&handler, &write_back("acme", "update", None, "wb-10", 1)).await;
    let dead = test.broker().peek(handler::queue::SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].properties["DeadLetterReason"], "VALIDATION_ERROR");
    assert!(
        dead[0].properties["DeadLetterErrorDescription"]
            .as_str()
            .unwrap()
            .contains("writes `c_company` shards back")
    );
}

const DRIVE: &str = "b!contoso-docs";
const OD: &str = "int-contoso-drive";

/// A OneDrive integration whose files sync both ways, against `fake`.
fn two_way_drive(fake: &FakeGraph) -> Value {
    json!({
        "id": OD, "tenantId": "t1", "name": "Contoso documents",
        "structuredData": {
            "providerName": "onedrive",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "conflictResolution": "newest_wins",
            "connection": {"driveId": DRIVE, "tokenUrl": fake.token_url(),
                           "apiBaseUrl": fake.api_base()},
            "entityMappings": [{
                "externalEntity": "driveItem", "shardTypeId": "c_document", "nameField": "name",
                "bidirectional": true,
                "fieldMappings": [
                    {"source": "name", "target": "name"},
                    {"source": "description", "target": "description"},
                    {"source": "size", "target": "size"},
                    {"source": "parentReference", "target": "folder"}
                ]
            }]
        }
    })
}

/// The engine's connection to the fake drive, with the credentials stored for the integration,
/// asking for a token that may write or not.
async fn onedrive_connection(test: &TestApp, fake: &FakeGraph, writes: bool) -> Connection {
    let mut conn = stored_connection(test, &two_way_drive(fake)).await;
    conn.writes = writes;
    conn
}

fn item_write(id: &str, fields: Value, etag: Option<&str>) -> RecordWrite {
    RecordWrite {
        entity: "driveItem".into(),
        external_id: Some(id.into()),
        fields: fields.as_object().unwrap().clone(),
        expected_version: etag.map(str::to_string),
        idempotency_key: "shard-report".into(),
        key_field: None,
    }
}

#[tokio::test]
async fn onedrive_renames_and_deletes_items_only_as_last_read_and_refuses_what_it_cannot_write() {
    let test = TestApp::new();
    let fake = FakeGraph::start().await;
    let report = fake.add_item(DRIVE, "report.docx", false);
    fake.add_item(DRIVE, "budget.xlsx", false);
    let onedrive = adapters::graph::onedrive::OneDrive::new();
    let reader: &dyn adapters::Pull = &onedrive;
    let writer = adapters::Provider::write_back(&onedrive).unwrap();
    let request = adapters::FetchRequest {
        entity: "driveItem".into(),
        fields: vec![],
        cursor: None,
        page_token: None,
        filters: vec![],
        page_size: 1,
        cursor_read_at: None,
    };

    test.register_integration(two_way_drive(&fake)).await;
    test.set_credentials(OD, &fake.credentials()).await;

    // A token asked for reading only cannot write, whatever the engine sends.
    let mut reading = onedrive_connection(&test, &fake, false).await;
    let read = reader
        .fetch_by_ids(
            &mut reading,
            &request,
            &[report.clone(), "01ITEM9999999999".into()],
        )
        .await
        .unwrap();
    assert_eq!(read.len(), 1, "an item the drive does not have is absent");
    let etag = reader.version_of(&read[0]).unwrap();
    let refused = writer
        .update(
            &mut reading,
            &item_write(&report, json!({"name": "Q4.docx"}), Some(&etag)),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidCredentials, "{refused}");

    // An integration that writes back asks for Files.ReadWrite.All, and gets a new token for
    // it although the one it holds still lives.
    let mut conn = onedrive_connection(&test, &fake, true).await;
    let renamed = writer
        .update(
            &mut conn,
            &item_write(&report, json!({"name": "Q4.docx"}), Some(&etag)),
        )
        .await
        .unwrap();
    assert_eq!(fake.item(DRIVE, &report).unwrap().name, "Q4.docx");
    assert_ne!(renamed.version.as_deref(), Some(etag.as_str()));

    // Changed at OneDrive since the engine read it: refused, to be read again.
    let stale = writer
        .update(
            &mut conn,
            &item_write(&report, json!({"name": "Q5.docx"}), Some(&etag)),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict, "{stale}");
    assert_eq!(fake.item(DRIVE, &report).unwrap().name, "Q4.docx");

    // A name its folder already holds is refused for good; so is a field Graph sets, before
    // any request; and a file cannot be made from a shard.
    let now = renamed.version.as_deref();
    let taken = writer
        .update(
            &mut conn,
            &item_write(&report, json!({"name": "budget.xlsx"}), now),
        )
        .await
        .unwrap_err();
    assert_eq!(taken.code, ErrorCode::ValidationError);
    assert!(taken.message.contains("nameAlreadyExists"), "{taken}");
    let requests = fake.state.lock().unwrap().requests.len();
    let size = writer
        .update(&mut conn, &item_write(&report, json!({"size": 0}), now))
        .await
        .unwrap_err();
    assert_eq!(size.code, ErrorCode::ValidationError);
    assert!(size.message.contains("`size`"), "{size}");
    assert_eq!(fake.state.lock().unwrap().requests.len(), requests);
    let mut create = item_write(&report, json!({"name": "new.docx"}), None);
    create.external_id = None;
    let refused = writer.create(&mut conn, &create).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationError);

    // Moved into a folder, under the version the rename left.
    let archive = fake.add_item(DRIVE, "Archive", true);
    let moved = writer
        .update(
            &mut conn,
            &item_write(&report, json!({"parentReference": {"id": archive}}), now),
        )
        .await
        .unwrap();
    let read = reader
        .fetch_by_ids(&mut conn, &request, std::slice::from_ref(&report))
        .await
        .unwrap();
    assert_eq!(read[0].fields["parentReference"]["id"], json!(archive));
    assert_eq!(reader.version_of(&read[0]), moved.version);

    // A delete under a version the item no longer has is refused; without one, it is deleted
    // once, and a second delete finds it gone and counts it deleted.
    let stale = writer
        .delete(&mut conn, &item_write(&report, json!({}), Some(&etag)))
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict, "{stale}");
    assert!(fake.item(DRIVE, &report).is_some());
    for _ in 0..2 {
        writer
            .delete(&mut conn, &item_write(&report, json!({}), None))
            .await
            .unwrap();
    }
    assert!(fake.item(DRIVE, &report).is_none());
}

#[tokio::test]
async fn a_file_renamed_in_castiel_is_renamed_in_onedrive_and_the_next_sync_reads_it_back_as_no_change()
 {
    let test = TestApp::new();
    let fake = FakeGraph::start().await;
    let report = fake.add_item(DRIVE, "report.docx", false);
    test.register_integration(two_way_drive(&fake)).await;
    test.set_credentials(OD, &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync_of(&handler, OD, "onedrive", "drive-1").await;
    let shard_id = format!("{OD}~driveItem~{report}");

    // Renamed in Castiel, and described; the size is left as synced.
    let changes = json!({"name": "Q4 report.docx", "description": "Board pack"});
    let sent = edit_in_castiel(&test, &shard_id, "Q4 report.docx", changes).await;
    assert_eq!(sent[0]["writeBack"]["operation"], "update", "{sent}");
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    let item = fake.item(DRIVE, &report).unwrap();
    assert_eq!(item.name, "Q4 report.docx");
    assert_eq!(item.description.as_deref(), Some("Board pack"));
    assert!(
        test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty()
            && test
                .broker()
                .peek(handler::queue::SYNC_DEADLETTER)
                .unwrap()
                .is_empty(),
        "written once, nothing dead-lettered"
    );

    sync_of(&handler, OD, "onedrive", "drive-2").await;
    let synced = test
        .history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == "drive-2")
        .unwrap()["structuredData"]
        .clone();
    assert_eq!(synced["stats"]["recordsFetched"], 1, "{synced}");
    assert_eq!(
        synced["stats"]["shardsUpdated"], 0,
        "our own write is not a change: {synced}"
    );
    assert!(
        test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty(),
        "and starts no write-back"
    );

    test.cli_json(&["shards", "delete", &shard_id, "--tenant", "t1"])
        .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert!(fake.item(DRIVE, &report).is_none(), "deleted at OneDrive");
}

#[tokio::test]
async fn a_field_onedrive_sets_itself_edited_with_the_name_goes_back_and_the_rename_goes_through() {
    let test = TestApp::new();
    let fake = FakeGraph::start().await;
    let report = fake.add_item(DRIVE, "report.docx", false);
    test.register_integration(two_way_drive(&fake)).await;
    test.set_credentials(OD, &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync_of(&handler, OD, "onedrive", "drive-1").await;
    let shard_id = format!("{OD}~driveItem~{report}");
    let synced = test
        .store()
        .get("t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    let size = synced.structured_data["size"].clone();
    assert!(size.as_u64().is_some_and(|s| s > 1), "{size}");

    // Renamed in Castiel, with the size (which OneDrive keeps for itself) changed too.
    let changes = json!({"name": "Q4 report.docx", "size": 1});
    edit_in_castiel(&test, &shard_id, "Q4 report.docx", changes).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    assert_eq!(fake.item(DRIVE, &report).unwrap().name, "Q4 report.docx");
    assert!(
        test.broker()
            .peek(handler::queue::SYNC_DEADLETTER)
            .unwrap()
            .is_empty(),
        "nothing dead-lettered"
    );
    let shard = test
        .store()
        .get("t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(shard.structured_data["size"], size, "the size goes back");
    // And the next rename is not held up by it.
    edit_in_castiel(
        &test,
        &shard_id,
        "Q4 final.docx",
        json!({"name": "Q4 final.docx"}),
    )
    .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(fake.item(DRIVE, &report).unwrap().name, "Q4 final.docx");
}

const GD: &str = "int-contoso-gdrive";

/// A Google Drive integration whose files sync both ways, against `fake`.
fn two_way_google_drive(fake: &FakeGoogleDrive) -> Value {
    json!({
        "id": GD, "tenantId": "t1", "name": "Contoso Drive",
        "structuredData": {
            "providerName": "google_drive",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "conflictResolution": "newest_wins",
            "connection": {"tokenUrl": fake.token_url(), "apiBaseUrl": fake.api_base()},
            "entityMappings": [{
                "externalEntity": "files", "shardTypeId": "c_document", "nameField": "name",
                "bidirectional": true,
                "fieldMappings": [
                    {"source": "name", "target": "name"},
                    {"source": "description", "target": "description"},
                    {"source": "parents", "target": "folders"}
                ]
            }]
        }
    })
}

/// A connection to the fake Drive with the credentials stored for the integration.
async fn google_drive_connection(test: &TestApp, fake: &FakeGoogleDrive) -> Connection {
    test.register_integration(two_way_google_drive(fake)).await;
    test.set_credentials(GD, &fake.credentials()).await;
    stored_connection(test, &two_way_google_drive(fake)).await
}

fn file_write(id: &str, fields: Value, version: Option<&str>) -> RecordWrite {
    RecordWrite {
        entity: "files".into(),
        ..item_write(id, fields, version)
    }
}

#[tokio::test]
async fn google_drive_renames_moves_and_trashes_files_only_over_the_version_read() {
    let test = TestApp::new();
    let fake = FakeGoogleDrive::start().await;
    fake.state.lock().unwrap().consent = FULL_SCOPE;
    let plan = fake.add_file("plan.txt");
    let mut conn = google_drive_connection(&test, &fake).await;
    let drive = adapters::google_drive::GoogleDrive::new();
    let reader: &dyn adapters::Pull = &drive;
    let writer = adapters::Provider::write_back(&drive).unwrap();
    let request = adapters::FetchRequest {
        entity: "files".into(),
        fields: vec!["description".into()],
        cursor: None,
        page_token: None,
        filters: vec![],
        page_size: 1,
        cursor_read_at: None,
    };

    let read = reader
        .fetch_by_ids(&mut conn, &request, &[plan.clone(), "1NoSuchFile".into()])
        .await
        .unwrap();
    assert_eq!(read.len(), 1, "a file Drive does not have is absent");
    let version = reader.version_of(&read[0]).unwrap();
    let renamed = writer
        .update(
            &mut conn,
            &file_write(
                &plan,
                json!({"name": "Plan 2027.txt", "description": "Draft"}),
                Some(&version),
            ),
        )
        .await
        .unwrap();
    let file = fake.file(&plan).unwrap();
    assert_eq!(
        (file.name.as_str(), file.description.as_deref()),
        ("Plan 2027.txt", Some("Draft"))
    );
    assert_eq!(renamed.version, Some(file.version.to_string()));

    // Drive takes no condition: the adapter reads the version first and does not write over a
    // newer one.
    let stale = writer
        .update(
            &mut conn,
            &file_write(&plan, json!({"name": "Plan.txt"}), Some(&version)),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict, "{stale}");
    assert_eq!(fake.file(&plan).unwrap().name, "Plan 2027.txt");

    // A move is parents added and removed, as Drive wants it.
    let now = renamed.version.as_deref();
    writer
        .update(
            &mut conn,
            &file_write(&plan, json!({"parents": ["0BArchiveFolder"]}), now),
        )
        .await
        .unwrap();
    assert_eq!(fake.file(&plan).unwrap().parents, ["0BArchiveFolder"]);
    let moved = fake
        .requests()
        .into_iter()
        .find(|r| r.starts_with("PATCH") && r.contains("addParents"))
        .unwrap();
    assert!(
        moved.contains(&format!("removeParents={MY_DRIVE_ROOT}")),
        "{moved}"
    );
    // Into a second folder, keeping the first: nothing to remove, and nothing said of it.
    writer
        .update(
            &mut conn,
            &file_write(
                &plan,
                json!({"parents": ["0BArchiveFolder", "0BShared"]}),
                None,
            ),
        )
        .await
        .unwrap();
    let kept = fake
        .requests()
        .into_iter()
        .rfind(|r| r.starts_with("PATCH"))
        .unwrap();
    assert!(
        kept.contains("addParents=0BShared") && !kept.contains("removeParents"),
        "{kept}"
    );

    // What Drive sets is refused before any request, as are a `parents` that is not a list
    // and an id that is not one; a file cannot be made from a shard.
    let requests = fake.requests().len();
    let not_a_list = writer
        .update(
            &mut conn,
            &file_write(&plan, json!({"parents": "0BArchiveFolder"}), None),
        )
        .await
        .unwrap_err();
    assert!(
        not_a_list.message.contains("list of folder ids"),
        "{not_a_list}"
    );
    let bad_id = writer
        .update(
            &mut conn,
            &file_write("../about", json!({"name": "x"}), None),
        )
        .await
        .unwrap_err();
    assert!(bad_id.message.contains("not a Drive file id"), "{bad_id}");
    let size = writer
        .update(&mut conn, &file_write(&plan, json!({"size": "0"}), None))
        .await
        .unwrap_err();
    assert_eq!(size.code, ErrorCode::ValidationError);
    assert!(size.message.contains("`size`"), "{size}");
    assert_eq!(fake.requests().len(), requests);
    let mut create = file_write(&plan, json!({"name": "new.txt"}), None);
    create.external_id = None;
    assert_eq!(
        writer.create(&mut conn, &create).await.unwrap_err().code,
        ErrorCode::ValidationError
    );

    // Deleted in Castiel: to the trash, once or twice; a file Drive deleted for good counts
    // as deleted too.
    for _ in 0..2 {
        writer
            .delete(&mut conn, &file_write(&plan, json!({}), None))
            .await
            .unwrap();
    }
    assert!(fake.file(&plan).unwrap().trashed);
    fake.delete_file(&plan);
    writer
        .delete(&mut conn, &file_write(&plan, json!({}), None))
        .await
        .unwrap();

    // A refresh token consented for reading only cannot write: Drive says so, and nothing
    // changes.
    let test = TestApp::new();
    let fake = FakeGoogleDrive::start().await;
    let memo = fake.add_file("memo.txt");
    let mut conn = google_drive_connection(&test, &fake).await;
    let refused = writer
        .update(
            &mut conn,
            &file_write(&memo, json!({"name": "Memo.txt"}), None),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidCredentials, "{refused}");
    assert!(
        refused.message.contains("insufficientPermissions"),
        "{refused}"
    );
    assert_eq!(fake.file(&memo).unwrap().name, "memo.txt");
}

#[tokio::test]
async fn a_file_renamed_in_castiel_is_renamed_in_google_drive_and_trashed_when_deleted() {
    let test = TestApp::new();
    let fake = FakeGoogleDrive::start().await;
    fake.state.lock().unwrap().consent = FULL_SCOPE;
    let plan = fake.add_file("plan.txt");
    test.register_integration(two_way_google_drive(&fake)).await;
    test.set_credentials(GD, &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync_of(&handler, GD, "google_drive", "gd-1").await;
    let shard_id = format!("{GD}~files~{plan}");

    let changes = json!({"name": "Plan 2027.txt"});
    let sent = edit_in_castiel(&test, &shard_id, "Plan 2027.txt", changes).await;
    assert_eq!(
        sent[0]["writeBack"]["changedFields"],
        json!(["name"]),
        "{sent}"
    );
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(fake.file(&plan).unwrap().name, "Plan 2027.txt");

    sync_of(&handler, GD, "google_drive", "gd-2").await;
    let synced = test
        .history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == "gd-2")
        .unwrap()["structuredData"]
        .clone();
    assert_eq!(synced["stats"]["recordsFetched"], 1, "{synced}");
    assert_eq!(
        synced["stats"]["shardsUpdated"], 0,
        "our own write is not a change: {synced}"
    );
    assert!(test.broker().peek(SYNC_OUTBOUND).unwrap().is_empty());

    test.cli_json(&["shards", "delete", &shard_id, "--tenant", "t1"])
        .await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert!(
        fake.file(&plan).unwrap().trashed,
        "in the trash, where it can be restored"
    );
}

/// A Zoom integration whose meetings sync both ways, against `fake`.
fn two_way_zoom(fake: &FakeZoom) -> Value {
    json!({
        "id": "int-zoom", "tenantId": "t1", "name": "Zoom",
        "structuredData": {
            "providerName": "zoom",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "connection": {"tokenUrl": fake.token_url(), "apiBaseUrl": fake.api_base()},
            "entityMappings": [{
                "externalEntity": "meetings", "shardTypeId": "c_meeting", "nameField": "topic",
                "bidirectional": true,
                "fieldMappings": [{"source": "topic", "target": "topic"}]
            }]
        }
    })
}

#[tokio::test]
async fn zoom_updates_and_deletes_meetings_and_stops_at_its_daily_cap_until_midnight() {
    let test = TestApp::new();
    let fake = FakeZoom::start().await;
    let standup = fake.add_meeting("Standup");
    test.register_integration(two_way_zoom(&fake)).await;
    test.set_credentials("int-zoom", &fake.credentials()).await;
    let mut conn = stored_connection(&test, &two_way_zoom(&fake)).await;
    let zoom = adapters::zoom::Zoom::new();
    let writer = adapters::Provider::write_back(&zoom).unwrap();
    let meeting_write = |fields: Value| RecordWrite {
        entity: "meetings".into(),
        ..item_write(&standup, fields, None)
    };

    // An app not given `meeting:write` is refused, for good, with Zoom's reason.
    let refused = writer
        .update(&mut conn, &meeting_write(json!({"topic": "Daily standup"})))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationError);
    assert!(refused.message.contains("meeting:write"), "{refused}");

    fake.state.lock().unwrap().app_scopes = "meeting:read meeting:write recording:read";
    writer
        .update(
            &mut conn,
            &meeting_write(json!({"topic": "Daily standup", "agenda": "Blockers first",
                                  "start_time": "2026-12-08T09:30:00Z", "duration": 15})),
        )
        .await
        .unwrap();
    let meeting = fake.meeting(&standup).unwrap();
    assert_eq!(meeting.topic, "Daily standup");
    assert_eq!(meeting.agenda, "Blockers first");
    assert_eq!(meeting.duration, 15);
    assert_eq!(meeting.start_time.to_rfc3339(), "2026-12-08T09:30:00+00:00");

    // What Zoom sets is refused before any request; a create is refused, since nothing would
    // find the meeting a lost answer made.
    let requests = fake.requests().len();
    let link = writer
        .update(
            &mut conn,
            &meeting_write(json!({"join_url": "https://x.test"})),
        )
        .await
        .unwrap_err();
    assert_eq!(link.code, ErrorCode::ValidationError);
    assert!(link.message.contains("`join_url`"), "{link}");
    let not_a_meeting = RecordWrite {
        entity: "recordings".into(),
        ..meeting_write(json!({"topic": "x"}))
    };
    let refused = writer.update(&mut conn, &not_a_meeting).await.unwrap_err();
    assert!(refused.message.contains("`recordings`"), "{refused}");
    let not_an_id = RecordWrite {
        external_id: Some("85/../users".into()),
        ..meeting_write(json!({"topic": "x"}))
    };
    let refused = writer.delete(&mut conn, &not_an_id).await.unwrap_err();
    assert!(
        refused.message.contains("not a Zoom meeting id"),
        "{refused}"
    );
    let mut create = meeting_write(json!({"topic": "Retro"}));
    create.external_id = None;
    assert_eq!(
        writer.create(&mut conn, &create).await.unwrap_err().code,
        ErrorCode::ValidationError
    );
    assert_eq!(fake.requests().len(), requests);

    // The daily cap: asked once, not retried in place, and kept for a later run.
    fake.state.lock().unwrap().updates_left_today = 0;
    let capped = writer
        .update(&mut conn, &meeting_write(json!({"topic": "Standup"})))
        .await
        .unwrap_err();
    assert_eq!(capped.code, ErrorCode::RateLimit);
    assert!(capped.resume_next_run, "{capped:?}");
    let back = capped.resume_at.expect("Zoom's cap lifts at midnight UTC");
    // The minute after the next midnight: up to a day and a minute away.
    let a_day_and_a_minute = Duration::days(1) + Duration::minutes(1);
    assert!(back > Utc::now() && back - Utc::now() <= a_day_and_a_minute);
    assert_eq!(back.format("%H:%M:%S").to_string(), "00:01:00");
    assert_eq!(fake.requests().len(), requests + 1);
    assert_eq!(fake.meeting(&standup).unwrap().topic, "Daily standup");

    // Deleted; a second delete finds it gone and counts it deleted.
    for _ in 0..2 {
        writer
            .delete(&mut conn, &meeting_write(json!({})))
            .await
            .unwrap();
    }
    assert!(fake.meeting(&standup).is_none());
}

#[tokio::test]
async fn an_edit_to_a_meeting_zoom_let_expire_is_refused_and_the_meeting_is_not_taken_for_deleted()
{
    let test = TestApp::new();
    let fake = FakeZoom::start().await;
    fake.state.lock().unwrap().app_scopes = "meeting:read meeting:write recording:read";
    let kickoff = fake.schedule_meeting("Kickoff", Utc::now() - Duration::days(20));
    test.register_integration(two_way_zoom(&fake)).await;
    test.set_credentials("int-zoom", &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync_of(&handler, "int-zoom", "zoom", "zoom-1").await;

    // Eleven days on, Zoom has let the meeting expire and answers for it as for a deleted one.
    fake.let_days_pass(11);
    let shard_id = format!("int-zoom~meetings~{kickoff}");
    let changes = json!({"topic": "Kickoff (notes)"});
    edit_in_castiel(&test, &shard_id, "Kickoff (notes)", changes).await;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    let dead = test.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    let reason = dead[0].properties["DeadLetterErrorDescription"].to_string();
    assert!(reason.contains("no longer served"), "{reason}");
    let meeting = test
        .store()
        .get("t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(
        meeting.external_relationships[0].sync_status,
        RelationshipStatus::Synced
    );
    assert!(meeting.deleted_at.is_none());
}

#[tokio::test]
async fn a_meeting_update_past_zooms_daily_cap_is_held_until_it_lifts_without_spending_an_attempt()
{
    let test = TestApp::new();
    let fake = FakeZoom::start().await;
    fake.state.lock().unwrap().app_scopes = "meeting:read meeting:write recording:read";
    let standup = fake.add_meeting("Standup");
    test.register_integration(two_way_zoom(&fake)).await;
    test.set_credentials("int-zoom", &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync_of(&handler, "int-zoom", "zoom", "zoom-1").await;

    let shard_id = format!("int-zoom~meetings~{standup}");
    let changes = json!({"topic": "Daily standup"});
    edit_in_castiel(&test, &shard_id, "Daily standup", changes).await;
    fake.state.lock().unwrap().updates_left_today = 0;
    let before = Utc::now();
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);

    held_write_back(&test);
    let due = test
        .broker()
        .next_wakeup(SYNC_OUTBOUND, Utc::now())
        .unwrap();
    // Held until the cap lifts, at midnight UTC (and a minute).
    let due = due.expect("a held write-back");
    let a_day_and_a_minute = Duration::days(1) + Duration::minutes(1);
    assert!(due > before && due - before <= a_day_and_a_minute, "{due}");
    assert_eq!(due.format("%H:%M:%S").to_string(), "00:01:00");
    let history = test.history().await;
    let said: Vec<&str> = history
        .iter()
        .filter_map(|r| r["structuredData"]["statusMessage"].as_str())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.contains("allocation is used up") && m.contains("held until")),
        "{said:?}"
    );
    assert_eq!(fake.meeting(&standup).unwrap().topic, "Standup");

    // The cap lifts at midnight; the held write-back goes through.
    fake.state.lock().unwrap().updates_left_today = 100;
    assert_eq!(deliver_write_backs(&test, &handler).await, 1);
    assert_eq!(fake.meeting(&standup).unwrap().topic, "Daily standup");
}
