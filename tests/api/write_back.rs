//! Two-way sync: Castiel's changes written back to the provider, against the loopback
//! Salesforce and Dataverse.

use std::sync::Arc;

use chrono::{Duration, Utc};
use serde_json::{Value, json};

use adapters::{Connection, ErrorCode, RecordWrite};
use handler::engine::credentials::StoredCredentials;
use handler::queue::SYNC_OUTBOUND;
use handler::store::ShardStore;

use crate::fake_host::{HostedHandler, service_bus_message};
use crate::fake_salesforce::{FakeSalesforce, ORG_ID};
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
                    {"source": "Name", "target": "name"},
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
    let app = test.app(&[]);
    let settings = salesforce(fake)["structuredData"]["connection"]
        .as_object()
        .unwrap()
        .clone();
    let keeper = Arc::new(StoredCredentials::new(&app, "t1", SF));
    let credentials = keeper.load().await.unwrap();
    Connection::with_keeper(SF, settings, credentials, keeper)
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

    let ann = json!({"Name": "Ann Lee", "Email": "ann@acme.test"});
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

    let unkeyed = RecordWrite {
        key_field: None,
        ..write(None, json!({"Name": "No Key"}), None)
    };
    let refused = writer.create(&mut conn, &unkeyed).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::ValidationError);
    assert!(refused.message.contains("idempotencyField"), "{refused}");
}

async fn sync(handler: &HostedHandler, job_id: &str) {
    let job = json!({
        "integrationId": SF, "tenantId": "t1", "jobType": "incremental", "provider": "salesforce",
        "jobId": job_id, "scheduledAt": Utc::now(), "attempt": 1
    });
    let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), job_id, 1, None);
    let res = handler.invoke("SyncInboundScheduled", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");
}

const ANN: &str = "int-acme-sf~Contact~003000000000001AAA";

/// Ann, synced in from Salesforce under `strategy`; then renamed "Ann Lee" in Castiel an hour
/// ago while, five minutes ago, Salesforce renamed her "Annie" and changed her email; then
/// synced again. Returns the test app with the synced result.
async fn edited_on_both_sides(strategy: &str) -> TestApp {
    let test = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "Name": "Ann", "Email": "ann@acme.test"}),
        Utc::now() - Duration::days(2),
    );
    test.register_integration(two_way(&fake, strategy)).await;
    test.set_credentials(SF, &fake.credentials()).await;
    let handler = test.host_handler().await;
    sync(&handler, "job-1").await;

    let store = test.store();
    let mut shard = store.get("t1", ANN).await.unwrap().unwrap().value;
    shard.structured_data["name"] = json!("Ann Lee");
    shard.updated_at = Some(Utc::now() - Duration::hours(1));
    store.upsert(&shard).await.unwrap();
    fake.add(
        "Contact",
        json!({"Id": "003000000000001AAA", "Name": "Annie", "Email": "ann@lee.test"}),
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
