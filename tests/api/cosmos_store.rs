//! The Cosmos DB shard store, through the official SDK against its in-memory emulator: the
//! store's contract, a whole inbound sync written in transactional batches, a listing read over
//! several jobs, a batch Cosmos refuses, and injected throttling and outages that lose nothing.

use std::sync::Arc;

use azure_core::http::StatusCode;
use azure_data_cosmos_driver::fault_injection::{
    CustomResponseBuilder, FaultInjectionConditionBuilder, FaultInjectionErrorType,
    FaultInjectionResultBuilder, FaultInjectionRule, FaultInjectionRuleBuilder, FaultOperationType,
};
use chrono::Utc;
use serde_json::{Value, json};

use handler::app::LocalBackends;
use handler::engine::inbound;
use handler::model::shard::{ExternalRelationship, SyncDirection};
use handler::model::{Shard, timestamp};
use handler::queue::SYNC_INBOUND_SCHEDULED;
use handler::settings::Settings;
use handler::store::{
    CosmosStore, Op, Provisioning, ShardFingerprint, ShardQuery, ShardStore, StoreError, Upsert,
    Written,
};

use crate::cosmos_emulator::{
    RequestCounter, Requests, bulk_import_integration, bulk_import_job, emulator_client,
    emulator_store, history_of, write_bulk_import,
};
use crate::fake_zoom::FakeZoom;
use crate::helpers::TestApp;

fn shard(tenant: &str, id: &str, data: Value) -> Shard {
    serde_json::from_value(json!({
        "id": id, "tenantId": tenant, "shardTypeId": "c_integration", "name": id, "structuredData": data
    }))
    .unwrap()
}

#[tokio::test]
async fn point_operations_are_guarded_by_etags() {
    point_operations(&emulator_store(vec![]).await).await;
}

#[tokio::test]
async fn queries_filter_order_and_limit_within_and_across_tenants() {
    queries(&emulator_store(vec![]).await).await;
}

#[tokio::test]
async fn an_entitys_shards_are_read_a_page_of_fingerprints_at_a_time() {
    entity_fingerprints(&emulator_store(vec![]).await).await;
}

#[tokio::test]
async fn a_batch_leaves_the_shards_written_since_they_were_read_and_writes_the_rest() {
    guarded_writes(&emulator_store(vec![]).await).await;
}

/// The store's contract for a write of many whose shards carry the etags they were read at:
/// a shard written by someone else since, or gone, is left as it is and named; the rest of the
/// batch is written.
pub async fn guarded_writes(store: &CosmosStore) {
    let stored: Vec<Shard> = ["guarded-a", "guarded-b"]
        .iter()
        .map(|id| shard("t1", id, json!({"v": "read"})))
        .collect();
    assert!(
        store
            .upsert_many(&Upsert::every(&stored))
            .await
            .unwrap()
            .is_empty()
    );
    let etag = |id: &str| {
        let id = id.to_string();
        async move { store.get("t1", &id).await.unwrap().unwrap().etag }
    };
    let (a, b) = (etag("guarded-a").await, etag("guarded-b").await);
    store
        .upsert(&shard("t1", "guarded-b", json!({"v": "someone else's"})))
        .await
        .unwrap();
    // Read once, expired since.
    let gone = a.clone();

    let decided: Vec<Shard> = ["guarded-a", "guarded-b", "guarded-gone", "guarded-new"]
        .iter()
        .map(|id| shard("t1", id, json!({"v": "decided"})))
        .collect();
    let writes = [
        Upsert {
            shard: &decided[0],
            if_match: Some(&a),
        },
        Upsert {
            shard: &decided[1],
            if_match: Some(&b),
        },
        Upsert {
            shard: &decided[2],
            if_match: Some(&gone),
        },
        Upsert::any(&decided[3]),
    ];
    let written = store.upsert_many(&writes).await.unwrap();

    assert_eq!(
        written,
        Written {
            refused: vec![],
            raced: vec!["guarded-b".to_string(), "guarded-gone".to_string()]
        }
    );
    let value = |id: &str| {
        let id = id.to_string();
        async move {
            store
                .get("t1", &id)
                .await
                .unwrap()
                .map(|v| v.value.structured_data["v"].clone())
        }
    };
    assert_eq!(value("guarded-a").await, Some(json!("decided")));
    assert_eq!(
        value("guarded-b").await,
        Some(json!("someone else's")),
        "not written over"
    );
    assert_eq!(value("guarded-gone").await, None, "not brought back");
    assert_eq!(value("guarded-new").await, Some(json!("decided")));
}

/// The store's contract for point operations, whatever Cosmos serves it.
pub async fn point_operations(store: &CosmosStore) {
    let s = shard("t1", "a", json!({"n": 1}));
    let etag = store.create(&s).await.unwrap();
    assert!(matches!(store.create(&s).await, Err(StoreError::Conflict)));
    let read = store.get("t1", "a").await.unwrap().unwrap();
    assert_eq!(read.value, s, "no system property leaks into the shard");
    assert_eq!(read.etag, etag);
    let mut changed = s.clone();
    changed.structured_data = json!({"n": 2});
    store.replace(&changed, &etag).await.unwrap();
    assert!(matches!(
        store.replace(&changed, &etag).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(
        store.get("t2", "a").await.unwrap().is_none(),
        "tenants are partitions"
    );
    assert_eq!(
        store
            .get_many("t1", &["a".into(), "b".into()])
            .await
            .unwrap()
            .iter()
            .filter(|s| s.is_some())
            .count(),
        1
    );

    // A fingerprint is what the shard itself says of when it was written and what it links.
    let mut synced = shard("t1", "f", json!({"n": 3}));
    synced.updated_at = Some(Utc::now());
    synced.deleted_at = Some(Utc::now());
    synced.external_relationships = vec![ExternalRelationship::synced(
        "int-1",
        "001F",
        SyncDirection::Inbound,
        Utc::now(),
    )];
    synced.external_relationships[0].record_hash = Some("00ff".into());
    store.upsert(&synced).await.unwrap();
    let ids = ["f".to_string(), "missing".to_string(), "a".to_string()];
    let expected: Vec<_> = store
        .get_many("t1", &ids)
        .await
        .unwrap()
        .iter()
        .map(|r| r.as_ref().map(|v| ShardFingerprint::of(&v.value)))
        .collect();
    assert_eq!(store.fingerprints("t1", &ids).await.unwrap(), expected);
    assert!(expected[0].as_ref().unwrap().deleted);
}

/// The store's contract for queries, whatever Cosmos serves it.
pub async fn queries(store: &CosmosStore) {
    let t = |m: u32| chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 1, 10, m, 0).unwrap();
    for (tenant, id, minute, status) in [
        ("t1", "a", 5, "active"),
        ("t1", "b", 1, "active"),
        ("t2", "c", 3, "active"),
        ("t1", "d", 2, "paused"),
        ("t1", "e", 30, "active"),
    ] {
        store
            .upsert(&shard(
                tenant,
                id,
                json!({"nextSyncAt": timestamp::format(&t(minute)), "status": status}),
            ))
            .await
            .unwrap();
    }
    let due = ShardQuery::of_type("c_integration")
        .filter("structuredData.status", Op::Eq, json!("active"))
        .filter(
            "structuredData.nextSyncAt",
            Op::Le,
            timestamp::query_value(&t(10)),
        )
        .order_by("structuredData.nextSyncAt", false);
    let ids = |found: Vec<handler::store::Versioned<Shard>>| {
        found.into_iter().map(|v| v.value.id).collect::<Vec<_>>()
    };
    assert_eq!(ids(store.query(&due).await.unwrap()), ["b", "c", "a"]);
    assert_eq!(
        ids(store
            .query(&due.clone().in_tenant("t1").limit(1))
            .await
            .unwrap()),
        ["b"]
    );

    let mut deleted = shard("t1", "gone", json!({}));
    deleted.deleted_at = Some(Utc::now());
    deleted.dedup_keys = [("email_exact".to_string(), "x@y".to_string())].into();
    store.upsert(&deleted).await.unwrap();
    let by_key = ShardQuery::of_type("c_integration").in_tenant("t1").filter(
        "dedupKeys.email_exact",
        Op::In,
        json!(["x@y"]),
    );
    assert!(
        store.query(&by_key).await.unwrap().is_empty(),
        "soft-deleted shards are left out"
    );
    let mut with_deleted = by_key;
    with_deleted.include_deleted = true;
    assert_eq!(ids(store.query(&with_deleted).await.unwrap()), ["gone"]);
}

/// The store's contract for finding shards by their links: how a deleted record's shard is
/// found when a merge put it in a shard named after another record. Over HTTP only: the SDK's
/// in-memory emulator has no subqueries, which Cosmos DB and cosmosdb-server serve.
pub async fn linked_queries(store: &CosmosStore) {
    let ids = |found: Vec<handler::store::Versioned<Shard>>| {
        found.into_iter().map(|v| v.value.id).collect::<Vec<_>>()
    };
    for (id, linked) in [("m1", ["003A", "003B"]), ("m2", ["003C", "003D"])] {
        let mut merged = shard("t1", id, json!({}));
        merged.shard_type_id = "c_contact".into();
        merged.external_relationships = linked
            .iter()
            .map(|external| {
                ExternalRelationship::synced("int-1", external, SyncDirection::Inbound, Utc::now())
            })
            .collect();
        store.upsert(&merged).await.unwrap();
    }
    let linked = |external: &[&str]| {
        ShardQuery::of_type("c_contact")
            .in_tenant("t1")
            .with_external_ids(external.iter().map(|e| e.to_string()).collect())
    };
    let mut found = ids(store
        .query(&linked(&["003B", "003D", "003Z"]))
        .await
        .unwrap());
    found.sort();
    assert_eq!(found, ["m1", "m2"]);
    assert_eq!(ids(store.query(&linked(&["003C"])).await.unwrap()), ["m2"]);
    assert!(store.query(&linked(&["003Z"])).await.unwrap().is_empty());
}

/// The store's contract for reading an entity's shards a page of fingerprints at a time.
pub async fn entity_fingerprints(store: &CosmosStore) {
    let mut shards: Vec<Shard> = ["d", "a", "b", "c"]
        .iter()
        .map(|k| shard("t1", &format!("int-1~Meeting~{k}"), json!({"topic": k})))
        .collect();
    shards[2].deleted_at = Some(Utc::now());
    shards.push(shard("t2", "int-1~Meeting~a", json!({})));
    shards.push(shard("t1", "int-1~Meetings~a", json!({})));
    shards.push(shard("t1", "int-1~Meeting", json!({})));
    for s in &mut shards {
        s.shard_type_id = "c_meeting".into();
    }
    let mut other_type = shard("t1", "int-1~Meeting~e", json!({}));
    other_type.shard_type_id = "c_note".into();
    shards.push(other_type);
    assert!(
        store
            .upsert_many(&Upsert::every(&shards))
            .await
            .unwrap()
            .is_empty()
    );

    let prefix = "int-1~Meeting~";
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .fingerprints_by_prefix("t1", "c_meeting", prefix, after.as_deref(), 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|(id, _)| id.clone());
        pages.push(page.into_iter().map(|(id, _)| id).collect::<Vec<_>>());
    }
    assert_eq!(
        pages,
        [
            vec!["int-1~Meeting~a", "int-1~Meeting~c"],
            vec!["int-1~Meeting~d"]
        ],
        "live, of the tenant, the type and the prefix only, in id order"
    );
    let first = store
        .fingerprints_by_prefix("t1", "c_meeting", prefix, None, 1)
        .await
        .unwrap();
    let read = store.get("t1", "int-1~Meeting~a").await.unwrap().unwrap();
    assert_eq!(first[0].1, ShardFingerprint::of(&read.value));
}

/// Runs the demo's bulk import into a Cosmos store: every record lands once, whatever faults.
pub async fn sync_demo_into(store: CosmosStore) -> (TestApp, Arc<CosmosStore>) {
    let test = TestApp::new();
    let settings = Settings::from_lookup(|name| match name {
        "FUNC_SYNC_DATA_DIR" => Some(test.data_dir().display().to_string()),
        "FUNC_SYNC_RECORD_RETRY_BASE_MS" => Some("5".into()),
        _ => None,
    })
    .unwrap();
    let backends = LocalBackends::open(&settings).unwrap();
    let store = Arc::new(store);
    let mut app = backends.app(settings, handler::app::providers());
    app.store = store.clone();

    let folder = test.path("imports");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/drop-1/accounts.csv"),
        folder.join("accounts.csv"),
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/drop-1/contacts.jsonl"),
        folder.join("contacts.jsonl"),
    )
    .unwrap();
    store
        .create(&bulk_import_integration("int-demo", &folder))
        .await
        .unwrap();
    // Delivered as the host delivers: a failed invocation is redelivered.
    let mut deliveries = 0;
    loop {
        deliveries += 1;
        let mut message = bulk_import_job("int-demo", "job-1", "full_sync");
        message.delivery_count = deliveries;
        match inbound::process(&app, SYNC_INBOUND_SCHEDULED, &message, Utc::now()).await {
            Ok(()) => break,
            Err(e) if deliveries < 10 => {
                eprintln!("delivery {deliveries} failed, redelivering: {e}")
            }
            Err(e) => panic!("still failing after 10 deliveries: {e}"),
        }
    }
    (test, store)
}

pub async fn count(store: &CosmosStore, shard_type: &str) -> usize {
    store
        .query(&ShardQuery::of_type(shard_type).in_tenant("t1"))
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn a_whole_inbound_sync_runs_on_cosmos() {
    let (_test, store) = sync_demo_into(emulator_store(vec![]).await).await;
    let history = store
        .query(&ShardQuery::of_type("c_integrationSync").in_tenant("t1"))
        .await
        .unwrap();
    let record = &history[0].value.structured_data;
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 800);
    assert_eq!(count(&store, "c_company").await, 300);
    assert_eq!(
        count(&store, "c_contact").await,
        498,
        "the duplicate merged through the Cosmos key lookup"
    );
    let integration = store.get("t1", "int-demo").await.unwrap().unwrap().value;
    assert!(integration.structured_data["cursors"]["accounts"].is_string());
}

#[tokio::test]
async fn a_listing_read_over_several_jobs_is_reconciled_on_cosmos() {
    use handler::secrets::{FileSecrets, Secret, SecretStore, credential_secret_name};

    let zoom = FakeZoom::start().await;
    zoom.load_meetings(700);
    let test = TestApp::new();
    // A page of 300 meetings a job: the listing takes three.
    let mut app = test.app(&[("SYNC_MAX_RECORDS", "300")]);
    let store = Arc::new(emulator_store(vec![]).await);
    app.store = store.clone();
    let integration = json!({
        "id": "int-zoom", "tenantId": "t1", "shardTypeId": "c_integration", "name": "Zoom",
        "structuredData": {
            "providerName": "zoom", "status": "active", "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": zoom.token_url(), "apiBaseUrl": zoom.api_base()},
            "entityMappings": [{"externalEntity": "meetings", "shardTypeId": "c_meeting",
                                "nameField": "topic",
                                "fieldMappings": [{"source": "topic", "target": "topic"}]}]
        }
    });
    store
        .create(&serde_json::from_value(integration).unwrap())
        .await
        .unwrap();
    FileSecrets::new(&test.path("secrets.json"))
        .set(
            &credential_secret_name("t1", "int-zoom"),
            Secret::new(zoom.credentials().to_string()),
        )
        .await
        .unwrap();
    let listing = |job_id: &'static str| {
        let (app, test) = (&app, &test);
        async move {
            let job = json!({"integrationId": "int-zoom", "tenantId": "t1",
                             "jobType": "full_sync", "provider": "zoom", "jobId": job_id,
                             "scheduledAt": Utc::now()});
            let mut message = bulk_import_job("int-zoom", job_id, "full_sync");
            message.body = job.to_string().into_bytes();
            let broker = test.broker();
            let mut jobs = 0;
            loop {
                inbound::process(app, SYNC_INBOUND_SCHEDULED, &message, Utc::now())
                    .await
                    .unwrap();
                jobs += 1;
                let Some(next) = broker
                    .receive_at(SYNC_INBOUND_SCHEDULED, Utc::now())
                    .unwrap()
                else {
                    return jobs;
                };
                broker.complete(&next).unwrap();
                message.body = next.body;
            }
        }
    };
    assert_eq!(listing("job-1").await, 3);
    assert_eq!(count(&store, "c_meeting").await, 700);

    let mut synced: Vec<String> = store
        .query(&ShardQuery::of_type("c_meeting").in_tenant("t1"))
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.value.id.rsplit('~').next().unwrap().to_string())
        .collect();
    synced.sort();
    // One listed by the first job, one by the last.
    let gone = [synced[0].clone(), synced[699].clone()];
    for id in &gone {
        zoom.delete_meeting(id);
    }
    assert_eq!(listing("job-2").await, 3);
    assert_eq!(count(&store, "c_meeting").await, 698);
    for id in &gone {
        let shard = store
            .get("t1", &format!("int-zoom~meetings~{id}"))
            .await
            .unwrap()
            .unwrap()
            .value;
        assert!(shard.deleted_at.is_some(), "{id} is soft-deleted");
    }
    // The pages the listing's first two jobs stored, for the third to read back.
    assert_eq!(count(&store, "c_syncListing").await, 2);
}

#[tokio::test]
async fn throttling_and_outages_injected_into_cosmos_lose_nothing() {
    let rule =
        |name: &str, error: FaultInjectionErrorType, operation: FaultOperationType, hits: u32| {
            Arc::new(
                FaultInjectionRuleBuilder::new(
                    name,
                    FaultInjectionResultBuilder::new().with_error(error).build(),
                )
                .with_condition(
                    FaultInjectionConditionBuilder::new()
                        .with_operation_type(operation)
                        .build(),
                )
                .with_hit_limit(hits)
                .build(),
            )
        };
    let rules = vec![
        rule(
            "throttle-batches",
            FaultInjectionErrorType::TooManyRequests,
            FaultOperationType::BatchItem,
            3,
        ),
        rule(
            "unavailable-reads",
            FaultInjectionErrorType::ServiceUnavailable,
            FaultOperationType::ReadItem,
            2,
        ),
        rule(
            "timeout-queries",
            FaultInjectionErrorType::Timeout,
            FaultOperationType::QueryItem,
            1,
        ),
    ];
    let (_test, store) = sync_demo_into(emulator_store(rules.clone()).await).await;
    let hits: Vec<u32> = rules.iter().map(|r| r.hit_count()).collect();
    assert_eq!(hits, [3, 2, 1], "every injected fault happened");
    assert_eq!(count(&store, "c_company").await, 300);
    assert_eq!(count(&store, "c_contact").await, 498);
    let history = store
        .query(&ShardQuery::of_type("c_integrationSync").in_tenant("t1"))
        .await
        .unwrap();
    assert_eq!(history.len(), 1, "redeliveries rewrote one record");
    assert_ne!(history[0].value.structured_data["status"], "running");
}

#[tokio::test]
async fn through_entra_a_missing_database_or_container_is_named_not_created() {
    let client = emulator_client(vec![]).await;

    let missing = CosmosStore::open(&client, "castiel", "shards", Provisioning::Existing)
        .await
        .err()
        .expect("nothing is provisioned yet");
    assert!(
        missing
            .to_string()
            .contains("database `castiel` does not exist"),
        "{missing}"
    );

    CosmosStore::open(&client, "castiel", "other", Provisioning::Create)
        .await
        .unwrap();
    let missing = CosmosStore::open(&client, "castiel", "shards", Provisioning::Existing)
        .await
        .err()
        .expect("the database exists, the container does not");
    assert!(
        missing
            .to_string()
            .contains("container `shards` of database `castiel` does not exist"),
        "{missing}"
    );
    CosmosStore::open(&client, "castiel", "other", Provisioning::Existing)
        .await
        .expect("what is provisioned is used as it is");
}

/// What one sync job of a [`bulk_sync`] did.
pub struct Run {
    pub requests: Requests,
    pub stats: Value,
    pub errors: Value,
}

/// Syncs `per_entity` accounts and contacts from a bulk import into `store` as job `job_id`
/// of integration `int-bulk` (registered on the first call), counting the requests it sends.
pub async fn bulk_sync(
    test: &TestApp,
    store: &Arc<CosmosStore>,
    counter: &RequestCounter,
    per_entity: usize,
    job_id: &str,
) -> Run {
    let mut app = test.app(&[
        ("SYNC_MAX_RECORDS", "1000000"),
        ("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5"),
    ]);
    app.store = store.clone();
    let folder = test.path("imports");
    if store.get("t1", "int-bulk").await.unwrap().is_none() {
        write_bulk_import(&folder, per_entity);
        store
            .create(&bulk_import_integration("int-bulk", &folder))
            .await
            .unwrap();
    }
    let before = counter.requests();
    inbound::process(
        &app,
        SYNC_INBOUND_SCHEDULED,
        &bulk_import_job("int-bulk", job_id, "full_sync"),
        Utc::now(),
    )
    .await
    .unwrap();
    let requests = counter.requests().since(before);
    let record = history_of(store, job_id).await;
    Run {
        requests,
        stats: record["stats"].clone(),
        errors: record["errors"].clone(),
    }
}

/// Records whose shards were written (created or updated).
pub fn changed(stats: &Value) -> u64 {
    stats["shardsCreated"].as_u64().unwrap() + stats["shardsUpdated"].as_u64().unwrap()
}

/// The batched-writes story, on any Cosmos store: the first sync writes its shards in
/// transactional batches, with at most one request per 20 changed records in all; the same
/// sync again writes nothing.
pub async fn writes_in_batches_then_nothing(store: Arc<CosmosStore>, counter: &RequestCounter) {
    let test = TestApp::new();
    let first = bulk_sync(&test, &store, counter, 1000, "job-1").await;
    assert_eq!(changed(&first.stats), 2000, "{}", first.stats);
    assert_eq!(count(&store, "c_company").await, 1000);
    assert_eq!(count(&store, "c_contact").await, 990, "duplicates merged");
    assert_eq!(
        first.requests.batches, 20,
        "1,990 shards in batches of up to 100: {:?}",
        first.requests
    );
    let per_record = f64::from(first.requests.total()) / 2000.0;
    assert!(
        per_record <= 0.05,
        "{per_record} requests per changed record: {:?}",
        first.requests
    );

    let second = bulk_sync(&test, &store, counter, 1000, "job-2").await;
    assert_eq!(changed(&second.stats), 0, "{}", second.stats);
    assert_eq!(second.stats["shardsSkipped"], 2000);
    assert_eq!(second.requests.batches, 0, "{:?}", second.requests);
}

#[tokio::test]
async fn a_sync_writes_its_shards_in_transactional_batches_and_a_rerun_writes_nothing() {
    let counter = RequestCounter::new();
    let store = Arc::new(emulator_store(counter.rules()).await);
    writes_in_batches_then_nothing(store, &counter).await;
}

#[tokio::test]
async fn a_batch_cosmos_refuses_is_written_shard_by_shard_and_only_the_refused_shard_fails() {
    // Cosmos DB answers the first batch with a 400, as it does when one of its operations is
    // refused, and one account is larger than a Cosmos DB item may be (2 MB).
    let refuse_a_batch = Arc::new(
        FaultInjectionRuleBuilder::new(
            "refuse-a-batch",
            FaultInjectionResultBuilder::new()
                .with_custom_response(
                    CustomResponseBuilder::new(StatusCode::BadRequest)
                        .with_body(json!({"code": "BadRequest", "message": "refused"}).to_string())
                        .build(),
                )
                .build(),
        )
        .with_condition(
            FaultInjectionConditionBuilder::new()
                .with_operation_type(FaultOperationType::BatchItem)
                .build(),
        )
        .with_hit_limit(1)
        .build(),
    );
    let counter = RequestCounter::new();
    let mut rules: Vec<Arc<FaultInjectionRule>> = vec![refuse_a_batch.clone()];
    rules.extend(counter.rules());
    let store = Arc::new(emulator_store(rules).await);
    let test = TestApp::new();
    let folder = test.path("imports");
    write_bulk_import(&folder, 1000);
    let accounts = std::fs::read_to_string(folder.join("accounts.csv")).unwrap();
    let huge = "x".repeat(2_200_000);
    std::fs::write(
        folder.join("accounts.csv"),
        accounts.replace("A500,Account 500,", &format!("A500,{huge},")),
    )
    .unwrap();
    store
        .create(&bulk_import_integration("int-bulk", &folder))
        .await
        .unwrap();

    let run = bulk_sync(&test, &store, &counter, 1000, "job-1").await;

    assert_eq!(refuse_a_batch.hit_count(), 1);
    assert!(
        run.requests.single_writes >= 101,
        "the refused batch's shards, and the one too large for any batch, written one by one: {:?}",
        run.requests
    );
    assert_eq!(run.stats["shardsFailed"], 1, "{}", run.stats);
    assert_eq!(changed(&run.stats), 1999, "{}", run.stats);
    assert_eq!(
        count(&store, "c_company").await,
        999,
        "only the refused shard is missing"
    );
    let errors = run.errors.as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["recordId"], "A500", "{errors:?}");
}
