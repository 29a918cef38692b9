//! The Cosmos DB shard store, through the official SDK against its in-memory emulator: the
//! store's contract, a whole inbound sync, and injected throttling and outages that lose
//! nothing.

use std::sync::Arc;

use azure_data_cosmos_driver::fault_injection::{
    FaultInjectionConditionBuilder, FaultInjectionErrorType, FaultInjectionResultBuilder,
    FaultInjectionRuleBuilder, FaultOperationType,
};
use chrono::Utc;
use serde_json::{Value, json};

use handler::app::LocalBackends;
use handler::engine::inbound;
use handler::model::{Shard, timestamp};
use handler::queue::SYNC_INBOUND_SCHEDULED;
use handler::settings::Settings;
use handler::store::{CosmosStore, Op, Provisioning, ShardQuery, ShardStore, StoreError};

use crate::cosmos_emulator::{
    bulk_import_integration, bulk_import_job, emulator_client, emulator_store,
};
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
            "throttle-upserts",
            FaultInjectionErrorType::TooManyRequests,
            FaultOperationType::UpsertItem,
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
