//! What a sync does when the shard store fails under it: batch writes retried with backoff,
//! then shard by shard, and a shard that still cannot be written listed in the history; and
//! when someone else writes a shard between the sync's read of it and its write: the sync
//! reads it again and lands its record on what was written. The records arrive as webhook
//! notifications and are read from a loopback Salesforce.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Map, Value, json};

use handler::app::App;
use handler::engine::inbound;
use handler::model::Shard;
use handler::protocol::ServiceBusMessage;
use handler::queue::{SYNC_INBOUND_SCHEDULED, SYNC_INBOUND_WEBHOOK};
use handler::store::{ShardQuery, ShardStore, SqliteStore, StoreError, Upsert, Versioned, Written};

use crate::fake_salesforce::FakeSalesforce;
use crate::helpers::{TestApp, salesforce_integration};

/// What a test's store does with the writes a sync makes, around or in place of the embedded
/// store's; reads and single-shard point operations go to the embedded store unchanged.
#[async_trait]
trait Writes: Send + Sync {
    async fn upsert_many(
        &self,
        inner: &SqliteStore,
        writes: &[Upsert<'_>],
    ) -> Result<Written, StoreError>;

    async fn upsert(&self, inner: &SqliteStore, shard: &Shard) -> Result<String, StoreError> {
        inner.upsert(shard).await
    }
}

/// The embedded store of a test app, its writes going through `writes` (whose state the test
/// reads through this store).
struct Intercepted<W> {
    inner: SqliteStore,
    writes: W,
}

fn intercepted<W: Writes>(test: &TestApp, writes: W) -> Arc<Intercepted<W>> {
    Arc::new(Intercepted {
        inner: test.store(),
        writes,
    })
}

impl<W> std::ops::Deref for Intercepted<W> {
    type Target = W;
    fn deref(&self) -> &W {
        &self.writes
    }
}

#[async_trait]
impl<W: Writes> ShardStore for Intercepted<W> {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        self.inner.get(tenant_id, id).await
    }
    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        self.inner.create(shard).await
    }
    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        self.writes.upsert(&self.inner, shard).await
    }
    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        self.inner.replace(shard, if_match).await
    }
    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        self.inner.query(query).await
    }
    async fn upsert_many(&self, writes: &[Upsert<'_>]) -> Result<Written, StoreError> {
        self.writes.upsert_many(&self.inner, writes).await
    }
}

/// Batch writes that fail `batch_failures` times, and single writes of `poisoned` that
/// the store always refuses.
struct FailingWrites {
    batch_failures: u32,
    batch_calls: AtomicU32,
    poisoned: Option<String>,
}

#[async_trait]
impl Writes for FailingWrites {
    async fn upsert(&self, inner: &SqliteStore, shard: &Shard) -> Result<String, StoreError> {
        if self.poisoned.as_deref() == Some(shard.id.as_str()) {
            return Err(StoreError::Refused("request entity too large".into()));
        }
        inner.upsert(shard).await
    }
    async fn upsert_many(
        &self,
        inner: &SqliteStore,
        writes: &[Upsert<'_>],
    ) -> Result<Written, StoreError> {
        if self.batch_calls.fetch_add(1, Ordering::SeqCst) < self.batch_failures {
            return Err(StoreError::Unavailable("429 too many requests".into()));
        }
        inner.upsert_many(writes).await
    }
}

/// Every write that includes `shard_id` throttled while `throttling` is set, in a batch or
/// alone, as Cosmos DB throttles a hot partition.
struct ThrottledAlone {
    shard_id: String,
    throttling: AtomicBool,
}

impl ThrottledAlone {
    fn throttles(&self, shard_id: &str) -> bool {
        shard_id == self.shard_id && self.throttling.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Writes for ThrottledAlone {
    async fn upsert(&self, inner: &SqliteStore, shard: &Shard) -> Result<String, StoreError> {
        if self.throttles(&shard.id) {
            return Err(StoreError::Unavailable("429 too many requests".into()));
        }
        inner.upsert(shard).await
    }
    async fn upsert_many(
        &self,
        inner: &SqliteStore,
        writes: &[Upsert<'_>],
    ) -> Result<Written, StoreError> {
        if writes.iter().any(|w| self.throttles(&w.shard.id)) {
            return Err(StoreError::Unavailable("429 too many requests".into()));
        }
        inner.upsert_many(writes).await
    }
}

fn app_with(test: &TestApp, store: Arc<dyn ShardStore>) -> App {
    let mut app = test.app(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")]);
    app.store = store;
    app
}

/// Someone else (a Castiel user) edits one shard, setting its `phone`, right before each of
/// the sync's next `edits` writes that include it: between the sync's read of the shard and
/// its write.
struct EditedMeanwhile {
    shard_id: String,
    edits: u32,
    made: AtomicU32,
}

impl EditedMeanwhile {
    fn new(test: &TestApp, account: usize, edits: u32) -> Arc<Intercepted<Self>> {
        intercepted(
            test,
            Self {
                shard_id: account_shard(account),
                edits,
                made: AtomicU32::new(0),
            },
        )
    }

    /// The `phone` the last edit set.
    fn last_phone(&self) -> String {
        format!("555-010{}", self.made.load(Ordering::SeqCst))
    }
}

#[async_trait]
impl Writes for EditedMeanwhile {
    async fn upsert_many(
        &self,
        inner: &SqliteStore,
        writes: &[Upsert<'_>],
    ) -> Result<Written, StoreError> {
        let includes = writes.iter().any(|w| w.shard.id == self.shard_id);
        if includes && self.made.load(Ordering::SeqCst) < self.edits {
            let n = self.made.fetch_add(1, Ordering::SeqCst) + 1;
            let mut shard = inner.get("t1", &self.shard_id).await?.unwrap().value;
            shard.structured_data["phone"] = json!(format!("555-010{n}"));
            inner.upsert(&shard).await?;
        }
        inner.upsert_many(writes).await
    }
}

/// A first write of many that writes half of its shards, then fails as throttled, as a
/// page's Cosmos batches do when the last of them is throttled.
struct HalfWritten {
    calls: AtomicU32,
}

#[async_trait]
impl Writes for HalfWritten {
    async fn upsert_many(
        &self,
        inner: &SqliteStore,
        writes: &[Upsert<'_>],
    ) -> Result<Written, StoreError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            inner.upsert_many(&writes[..writes.len() / 2]).await?;
            return Err(StoreError::Unavailable("429 too many requests".into()));
        }
        inner.upsert_many(writes).await
    }
}

/// The shard synced from the `i`th account of the fake org.
fn account_shard(i: usize) -> String {
    format!("int-acme-sf~Account~001{i:015}")
}

/// A webhook job about the first `records` accounts of the fake org.
/// Delivers `job` from `queue` to the inbound engine of `app`, as the host would.
async fn deliver(app: &App, queue: &str, job: &ServiceBusMessage) {
    inbound::process(app, queue, job, Utc::now()).await.unwrap();
}

fn webhook_job(records: usize) -> ServiceBusMessage {
    webhook_job_named("wh-1", records)
}

/// [`webhook_job`] with its own job id.
fn webhook_job_named(job_id: &str, records: usize) -> ServiceBusMessage {
    let ids: Vec<String> = (0..records).map(|i| format!("001{i:015}")).collect();
    message(json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "webhook", "trigger": "webhook",
        "provider": "salesforce", "jobId": job_id, "scheduledAt": Utc::now(),
        "webhookPayload": {"entity": "Account", "ids": ids}
    }))
}

/// A scheduled job of `job_type` (`full_sync`, `incremental`).
fn scheduled_job(job_id: &str, job_type: &str) -> ServiceBusMessage {
    message(json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": job_type,
        "trigger": "scheduled", "provider": "salesforce", "jobId": job_id,
        "scheduledAt": Utc::now(), "attempt": 1
    }))
}

fn message(job: Value) -> ServiceBusMessage {
    ServiceBusMessage {
        body: job.to_string().into_bytes(),
        delivery_count: 1,
        message_id: job["jobId"].as_str().map(str::to_string),
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
    let store = intercepted(
        &test,
        FailingWrites {
            batch_failures: 2,
            batch_calls: AtomicU32::new(0),
            poisoned: None,
        },
    );
    let app = app_with(&test, store.clone());

    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(20)).await;

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
    let store = intercepted(
        &test,
        FailingWrites {
            batch_failures: u32::MAX,
            batch_calls: AtomicU32::new(0),
            poisoned: Some("int-acme-sf~Account~001000000000000007".into()),
        },
    );
    let app = app_with(&test, store.clone());

    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(10)).await;

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
async fn a_shard_the_store_throttles_alone_is_written_by_the_jobs_retry_not_passed_by_the_cursor() {
    let test = TestApp::new();
    register(&test).await;
    let store = intercepted(
        &test,
        ThrottledAlone {
            shard_id: "int-acme-sf~Account~001000000000000007".into(),
            throttling: AtomicBool::new(true),
        },
    );
    let app = app_with(&test, store.clone());

    deliver(
        &app,
        SYNC_INBOUND_SCHEDULED,
        &scheduled_job("sync-1", "incremental"),
    )
    .await;

    let run = run_of(&test, "sync-1").await;
    assert_ne!(run["status"], "partial", "nothing is passed over: {run}");
    let retries = test.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(retries.len(), 1, "the job is tried again");
    store.throttling.store(false, Ordering::SeqCst);
    let retry: Value = serde_json::from_slice(&retries[0].body).unwrap();
    deliver(&app, SYNC_INBOUND_SCHEDULED, &message(retry)).await;

    assert_eq!(test.shards("c_company").await.len(), 20);
}

#[tokio::test]
async fn with_create_new_off_only_records_that_have_a_shard_are_synced() {
    let test = TestApp::new();
    let fake = register(&test).await;
    let store = intercepted(
        &test,
        FailingWrites {
            batch_failures: 0,
            batch_calls: AtomicU32::new(0),
            poisoned: None,
        },
    );
    let app = app_with(&test, store);
    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(2)).await;
    assert_eq!(test.shards("c_company").await.len(), 2);

    test.register_integration(integration(&fake, false)).await;
    fake.add(
        "Account",
        json!({"Id": "001000000000000000", "Name": "Renamed 0"}),
        Utc::now(),
    );
    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job_named("wh-2", 4)).await;

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

/// The history record of the job `job_id`.
async fn run_of(test: &TestApp, job_id: &str) -> Value {
    test.history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == job_id)
        .unwrap()["structuredData"]
        .clone()
}

/// The shard synced from the first account, as stored.
async fn first_account(test: &TestApp) -> Shard {
    test.store()
        .get("t1", &account_shard(0))
        .await
        .unwrap()
        .unwrap()
        .value
}

/// Twenty accounts synced; then the first `renamed` of them renamed at Salesforce, and their
/// webhook's job (`wh-2`) run while account 0's shard is edited in Castiel before each of the
/// sync's next `edits` writes of it.
async fn renamed_at_salesforce_while_edited_in_castiel(
    renamed: usize,
    edits: u32,
) -> (TestApp, Arc<Intercepted<EditedMeanwhile>>) {
    let test = TestApp::new();
    let fake = register(&test).await;
    let app = test.app(&[]);
    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(20)).await;
    for i in 0..renamed {
        fake.add(
            "Account",
            json!({"Id": format!("001{i:015}"), "Name": format!("Renamed {i}")}),
            Utc::now(),
        );
    }
    let store = EditedMeanwhile::new(&test, 0, edits);
    let app = app_with(&test, store.clone());
    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job_named("wh-2", 2)).await;
    (test, store)
}

#[tokio::test]
async fn a_castiel_edit_made_while_a_sync_writes_the_shard_is_kept() {
    let (test, store) = renamed_at_salesforce_while_edited_in_castiel(1, 1).await;

    let shard = first_account(&test).await;
    assert_eq!(shard.name, "Renamed 0", "the provider's change is written");
    assert_eq!(
        shard.structured_data["phone"],
        json!(store.last_phone()),
        "over the edit made meanwhile, not in its place"
    );
    let run = run_of(&test, "wh-2").await;
    assert_eq!(run["status"], "success", "{run}");
    assert_eq!(
        run["stats"],
        json!({"recordsFetched": 2, "shardsCreated": 0, "shardsUpdated": 1, "shardsSkipped": 1, "shardsFailed": 0})
    );
}

#[tokio::test]
async fn a_shard_written_by_someone_else_under_every_try_fails_its_record_alone() {
    let (test, store) = renamed_at_salesforce_while_edited_in_castiel(2, u32::MAX).await;

    let shard = first_account(&test).await;
    assert_eq!(shard.name, "Account 0", "never written over an edit");
    assert_eq!(shard.structured_data["phone"], json!(store.last_phone()));
    let run = run_of(&test, "wh-2").await;
    assert_eq!(run["status"], "partial", "{run}");
    assert_eq!(
        run["stats"]["shardsUpdated"], 1,
        "the other record is written"
    );
    assert_eq!(run["stats"]["shardsFailed"], 1);
    let error = &run["errors"][0];
    assert_eq!(error["recordId"], "001000000000000000");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("something else wrote it each of the 3 times"),
        "{error}"
    );
}

#[tokio::test]
async fn a_deletion_applied_while_the_shard_is_edited_keeps_the_edit() {
    let test = TestApp::new();
    let fake = register(&test).await;
    let app = test.app(&[]);
    deliver(
        &app,
        SYNC_INBOUND_SCHEDULED,
        &scheduled_job("full", "full_sync"),
    )
    .await;
    // In a minute Salesforce's log of deletions covers: a whole one, gone by.
    fake.delete(
        "Account",
        "001000000000000000",
        Utc::now() - chrono::Duration::minutes(2),
    );
    let store = EditedMeanwhile::new(&test, 0, 1);
    let app = app_with(&test, store.clone());

    deliver(
        &app,
        SYNC_INBOUND_SCHEDULED,
        &scheduled_job("incremental", "incremental"),
    )
    .await;

    let shard = first_account(&test).await;
    assert!(shard.deleted_at.is_some(), "the deletion is applied");
    assert_eq!(
        shard.structured_data["phone"],
        json!(store.last_phone()),
        "to the shard as edited"
    );
    let run = run_of(&test, "incremental").await;
    assert_eq!(run["status"], "success", "{run}");
    assert_eq!(run["stats"]["shardsUpdated"], 1, "{run}");
}

#[tokio::test]
async fn a_write_retried_after_it_failed_part_way_counts_what_it_wrote_the_first_time() {
    let test = TestApp::new();
    let fake = register(&test).await;
    let app = test.app(&[]);
    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job(20)).await;
    for i in 0..20 {
        fake.add(
            "Account",
            json!({"Id": format!("001{i:015}"), "Name": format!("Renamed {i}")}),
            Utc::now(),
        );
    }
    let store = intercepted(
        &test,
        HalfWritten {
            calls: AtomicU32::new(0),
        },
    );
    let app = app_with(&test, store.clone());

    deliver(&app, SYNC_INBOUND_WEBHOOK, &webhook_job_named("wh-2", 20)).await;

    assert_eq!(store.calls.load(Ordering::SeqCst), 2, "one retry");
    let run = run_of(&test, "wh-2").await;
    assert_eq!(run["status"], "success", "{run}");
    assert_eq!(
        run["stats"],
        json!({"recordsFetched": 20, "shardsCreated": 0, "shardsUpdated": 20, "shardsSkipped": 0, "shardsFailed": 0}),
        "the ten written before the failure are its own, not someone else's"
    );
    let names: Vec<Value> = test
        .shards("c_company")
        .await
        .into_iter()
        .map(|s| s["name"].clone())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n.as_str().unwrap().starts_with("Renamed")),
        "{names:?}"
    );
}
