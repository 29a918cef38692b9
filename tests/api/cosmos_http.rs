//! The Cosmos DB shard store over real HTTP, against `@vercel/cosmosdb-server` started by
//! `.ci/run` (`.ci/cosmosdb-server.js`), which sets `COSMOS_EMULATOR_URL` (and turns off the
//! SDK's HTTP/2 probe, which that server does not answer cleanly). Without it the test
//! says so and passes: the in-memory emulator tests cover the same contract in every run.

use std::sync::Arc;

use handler::store::{CosmosStore, ShardQuery, ShardStore};

use crate::cosmos_emulator::{EMULATOR_KEY, RequestCounter, http_store};
use crate::cosmos_store::{
    count, entity_fingerprints, guarded_writes, linked_queries, point_operations, queries,
    sync_demo_into, writes_in_batches_then_nothing,
};
use crate::helpers::{TestApp, wait_until};

async fn store(database: &str) -> Option<CosmosStore> {
    let Ok(url) = std::env::var("COSMOS_EMULATOR_URL") else {
        eprintln!("COSMOS_EMULATOR_URL is not set: the Cosmos-over-HTTP test runs under .ci/run");
        return None;
    };
    Some(http_store(&url, database, Vec::new()).await)
}

#[tokio::test]
async fn the_cosmos_store_keeps_its_contract_over_http() {
    let Some(store) = store(&format!("contract-{}", uuid::Uuid::new_v4().simple())).await else {
        return;
    };
    point_operations(&store).await;
    queries(&store).await;
    linked_queries(&store).await;
    entity_fingerprints(&store).await;
    guarded_writes(&store).await;
}

#[tokio::test]
async fn a_whole_inbound_sync_runs_on_cosmos_over_http() {
    let Some(store) = store(&format!("sync-{}", uuid::Uuid::new_v4().simple())).await else {
        return;
    };
    let (_test, store) = sync_demo_into(store).await;
    assert_eq!(count(&store, "c_company").await, 300);
    assert_eq!(count(&store, "c_contact").await, 498);
    let history = store
        .query(&ShardQuery::of_type("c_integrationSync").in_tenant("t1"))
        .await
        .unwrap();
    assert_eq!(
        history[0].value.structured_data["stats"]["recordsFetched"],
        800
    );
}

#[tokio::test]
async fn the_demo_and_the_operator_commands_run_on_cosmos_over_http() {
    let Ok(url) = std::env::var("COSMOS_EMULATOR_URL") else {
        eprintln!("COSMOS_EMULATOR_URL is not set: the Cosmos-over-HTTP test runs under .ci/run");
        return;
    };
    let database = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let app = TestApp::with_settings(&[
        ("COSMOS_ENDPOINT", &url),
        ("COSMOS_KEY", EMULATOR_KEY),
        ("COSMOS_DATABASE", &database),
        // cosmosdb-server reads text JSON only.
        ("AZURE_COSMOS_BINARY_ENCODING_ENABLED", "false"),
        // The demo tenant is on the plan that keeps a week of history.
        ("HISTORY_RETENTION_DAYS_BY_TENANT", "tenant-demo=7"),
    ]);
    let _runtime = app.start_local_with_args(&["--demo"]).await;
    // `cli_json` fails on anything but JSON on stdout: the SDK's own logging included.
    let history = || async {
        app.cli_json(&["history", "--tenant", "tenant-demo"])
            .await
            .as_array()
            .unwrap()
            .clone()
    };
    wait_until(
        "the demo's first import finished on Cosmos",
        std::time::Duration::from_secs(60),
        || async {
            history()
                .await
                .first()
                .is_some_and(|r| r["structuredData"]["status"] != "running")
        },
    )
    .await;
    let stored = history().await[0].clone();
    assert_eq!(
        stored["ttl"],
        7 * 24 * 60 * 60,
        "the record expires through Cosmos DB's per-item ttl"
    );
    let record = stored["structuredData"].clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 800);
    let dead = app.cli_json(&["dead-letters", "list"]).await;
    assert_eq!(
        dead,
        serde_json::json!([]),
        "the demo's job found its integration"
    );
    assert!(
        app.store()
            .get("tenant-demo", "int-demo-import")
            .await
            .unwrap()
            .is_none(),
        "the demo was installed where the engine reads: Cosmos, not the embedded store"
    );
}

#[tokio::test]
async fn over_http_a_sync_writes_in_transactional_batches_and_a_rerun_writes_nothing() {
    let Ok(url) = std::env::var("COSMOS_EMULATOR_URL") else {
        eprintln!("COSMOS_EMULATOR_URL is not set: the Cosmos-over-HTTP test runs under .ci/run");
        return;
    };
    let counter = RequestCounter::new();
    let database = format!("batches-{}", uuid::Uuid::new_v4().simple());
    let store = Arc::new(http_store(&url, &database, counter.rules()).await);
    writes_in_batches_then_nothing(store, &counter).await;
}
