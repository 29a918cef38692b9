//! What a sync does when the shard store fails under it: batch writes retried with backoff,
//! then shard by shard, and a shard that still cannot be written listed in the history. The
//! records arrive as webhook notifications and are read from a loopback Salesforce.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Map, Value, json};

use handler::app::App;
use handler::engine::inbound;
use handler::model::Shard;
use handler::protocol::ServiceBusMessage;
use handler::queue::SYNC_INBOUND_WEBHOOK;
use handler::store::{ShardQuery, ShardStore, SqliteStore, StoreError, Versioned};

use crate::fake_salesforce::FakeSalesforce;
use crate::helpers::{TestApp, salesforce_integration};

/// A store whose batch writes fail `batch_failures` times, and whose single writes of
/// `poisoned` always fail.
struct FailingWrites {
    inner: SqliteStore,
    batch_failures: u32,
    batch_calls: AtomicU32,
    poisoned: Option<String>,
}

#[async_trait]
impl ShardStore for FailingWrites {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        self.inner.get(tenant_id, id).await
    }
    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        self.inner.create(shard).await
    }
    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        if self.poisoned.as_deref() == Some(shard.id.as_str()) {
            return Err(StoreError::Unavailable("request entity too large".into()));
        }
        self.inner.upsert(shard).await
    }
    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        self.inner.replace(shard, if_match).await
    }
    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        self.inner.query(query).await
    }
    async fn upsert_many(&self, shards: &[Shard]) -> Result<Vec<String>, StoreError> {
        if self.batch_calls.fetch_add(1, Ordering::SeqCst) < self.batch_failures {
            return Err(StoreError::Unavailable("429 too many requests".into()));
        }
        self.inner.upsert_many(shards).await
    }
}

fn app_with(test: &TestApp, store: Arc<FailingWrites>) -> App {
    let mut app = test.app(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")]);
    app.store = store;
    app
}

/// A webhook job about the first `records` accounts of the fake org.
fn webhook_job(records: usize) -> ServiceBusMessage {
    let ids: Vec<String> = (0..records).map(|i| format!("001{i:015}")).collect();
    let job = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "webhook", "trigger": "webhook",
        "provider": "salesforce", "jobId": "wh-1", "scheduledAt": Utc::now(),
        "webhookPayload": {"entity": "Account", "ids": ids}
    });
    ServiceBusMessage {
        body: job.to_string().into_bytes(),
        delivery_count: 1,
        message_id: Some("wh-1".into()),
        session_id: None,
        correlation_id: None,
        content_type: None,
        sequence_number: Some(1),
        enqueued_time_utc: None,
        application_properties: Map::new(),
    }
}

/// An integration connected to a fake org of 20 accounts.
async fn register(test: &TestApp) -> FakeSalesforce {
    let fake = FakeSalesforce::start().await;
    fake.load(
        "Account",
        (0..20).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}")}),
                Utc::now(),
            )
        }),
    );
    test.register_integration(integration(&fake, true)).await;
    test.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    fake
}

fn integration(fake: &FakeSalesforce, create_new: bool) -> Value {
    let mut integration = salesforce_integration("int-acme-sf");
    integration["structuredData"]["connection"] = json!({"loginHost": fake.url});
    integration["structuredData"]["entityMappings"] = json!([{
        "externalEntity": "Account", "shardTypeId": "c_company", "nameField": "name",
        "createNew": create_new, "fieldMappings": [{"source": "Name", "target": "name"}]
    }]);
    integration
}

#[tokio::test]
async fn a_batch_write_that_fails_is_retried_with_backoff_and_nothing_is_lost() {
    let test = TestApp::new();
    register(&test).await;
    let store = Arc::new(FailingWrites {
        inner: test.store(),
        batch_failures: 2,
        batch_calls: AtomicU32::new(0),
        poisoned: None,
    });
    let app = app_with(&test, store.clone());

    inbound::process(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(20), Utc::now())
        .await
        .unwrap();

    assert_eq!(
        store.batch_calls.load(Ordering::SeqCst),
        3,
        "two failures, then the write"
    );
    let record = &test.history().await[0]["structuredData"];
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 20);
    assert_eq!(test.shards("c_company").await.len(), 20);
}

#[tokio::test]
async fn a_shard_that_cannot_be_written_is_listed_and_the_rest_are_written() {
    let test = TestApp::new();
    register(&test).await;
    let store = Arc::new(FailingWrites {
        inner: test.store(),
        batch_failures: u32::MAX,
        batch_calls: AtomicU32::new(0),
        poisoned: Some("int-acme-sf~Account~001000000000000007".into()),
    });
    let app = app_with(&test, store.clone());

    inbound::process(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(10), Utc::now())
        .await
        .unwrap();

    assert_eq!(
        store.batch_calls.load(Ordering::SeqCst),
        4,
        "the batch was tried four times"
    );
    let record = &test.history().await[0]["structuredData"];
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 9);
    assert_eq!(record["stats"]["shardsFailed"], 1);
    let error = &record["errors"][0];
    assert_eq!(error["code"], "STORE_ERROR");
    assert_eq!(error["recordId"], "001000000000000007");
    assert_eq!(error["entity"], "Account");
    assert_eq!(error["retryable"], true);
    assert_eq!(test.shards("c_company").await.len(), 9);
}

#[tokio::test]
async fn with_create_new_off_only_records_that_have_a_shard_are_synced() {
    let test = TestApp::new();
    let fake = register(&test).await;
    let store = Arc::new(FailingWrites {
        inner: test.store(),
        batch_failures: 0,
        batch_calls: AtomicU32::new(0),
        poisoned: None,
    });
    let app = app_with(&test, store);
    inbound::process(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(2), Utc::now())
        .await
        .unwrap();
    assert_eq!(test.shards("c_company").await.len(), 2);

    test.register_integration(integration(&fake, false)).await;
    fake.add(
        "Account",
        json!({"Id": "001000000000000000", "Name": "Renamed 0"}),
        Utc::now(),
    );
    let mut job: Value = serde_json::from_slice(&webhook_job(4).body).unwrap();
    job["jobId"] = json!("wh-2");
    let mut message = webhook_job(0);
    message.body = job.to_string().into_bytes();
    inbound::process(&app, SYNC_INBOUND_WEBHOOK, &message, Utc::now())
        .await
        .unwrap();

    let record = test
        .history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == "wh-2")
        .unwrap();
    assert_eq!(
        record["structuredData"]["stats"],
        json!({"recordsFetched": 4, "shardsCreated": 0, "shardsUpdated": 1, "shardsSkipped": 3, "shardsFailed": 0})
    );
    let names: Vec<Value> = test
        .shards("c_company")
        .await
        .into_iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, [json!("Renamed 0"), json!("Account 1")]);
}
