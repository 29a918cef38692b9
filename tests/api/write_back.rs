//! Two-way sync: Castiel's changes written back to the provider, against the loopback
//! Salesforce and Dataverse.

use std::sync::Arc;

use serde_json::{Value, json};

use adapters::{Connection, ErrorCode, RecordWrite};
use handler::engine::credentials::StoredCredentials;

use crate::fake_salesforce::{FakeSalesforce, ORG_ID};
use crate::helpers::TestApp;

const SF: &str = "int-acme-sf";

fn salesforce(fake: &FakeSalesforce) -> Value {
    json!({
        "id": SF, "tenantId": "t1", "name": "Acme Salesforce",
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "manual"},
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
