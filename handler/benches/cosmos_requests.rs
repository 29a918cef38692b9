//! Cosmos DB requests per synced record, through the official SDK: a full sync of 10,000 new
//! records (every record changed), then the same sync again (every record unchanged).
//!
//!     cargo bench -p handler --bench cosmos_requests
//!
//! Runs against the SDK's in-memory emulator, and also over HTTP against the emulator at
//! `COSMOS_EMULATOR_URL` when that is set (`@vercel/cosmosdb-server`, as `.ci/run` starts it).
//! Requests are counted as the client sends them (a fault-injection rule per operation that
//! changes nothing): point reads, queries, single writes and transactional batches.

#[path = "../../tests/api/cosmos_emulator.rs"]
#[allow(dead_code)]
mod cosmos_emulator;

use std::sync::Arc;

use chrono::Utc;

use cosmos_emulator::{
    RequestCounter, bulk_import_integration, bulk_import_job, emulator_store, history_of,
    http_store, write_bulk_import,
};
use handler::app::LocalBackends;
use handler::engine::inbound;
use handler::queue::SYNC_INBOUND_SCHEDULED;
use handler::settings::Settings;
use handler::store::{CosmosStore, ShardStore};

/// Syncs 5,000 accounts and 5,000 contacts twice into `store`, printing each run's requests.
async fn measure(label: &str, store: CosmosStore, counter: &RequestCounter) {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("imports");
    write_bulk_import(&folder, 5000);
    let settings = Settings::from_lookup(|name| match name {
        "FUNC_SYNC_DATA_DIR" => Some(dir.path().display().to_string()),
        "SYNC_MAX_RECORDS" => Some("1000000".into()),
        _ => None,
    })
    .unwrap();
    let backends = LocalBackends::open(&settings).unwrap();
    let store = Arc::new(store);
    let mut app = backends.app(settings, handler::app::providers());
    app.store = store.clone();
    store
        .create(&bulk_import_integration("int-bench", &folder))
        .await
        .unwrap();

    println!("{label}:");
    for (what, job_id) in [
        ("every record new", "bench-1"),
        ("nothing changed", "bench-2"),
    ] {
        let before = counter.requests();
        let started = std::time::Instant::now();
        inbound::process(
            &app,
            SYNC_INBOUND_SCHEDULED,
            &bulk_import_job("int-bench", job_id, "full_sync"),
            Utc::now(),
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        let requests = counter.requests().since(before);
        let stats = history_of(&store, job_id).await["stats"].clone();
        let changed =
            stats["shardsCreated"].as_u64().unwrap() + stats["shardsUpdated"].as_u64().unwrap();
        let per_changed = if changed == 0 {
            "no record changed".to_string()
        } else {
            format!(
                "{:.4} requests per changed record",
                f64::from(requests.total()) / changed as f64
            )
        };
        println!(
            "  10,000 records, {what}: {changed} changed, {per_changed}; {} requests in all \
             ({} transactional batches, {} single writes, {} queries, {} point reads), {:.2} s",
            requests.total(),
            requests.batches,
            requests.single_writes,
            requests.queries,
            requests.point_reads,
            elapsed.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    let counter = RequestCounter::new();
    let store = emulator_store(counter.rules()).await;
    measure("SDK in-memory emulator", store, &counter).await;

    match std::env::var("COSMOS_EMULATOR_URL") {
        Ok(url) => {
            let counter = RequestCounter::new();
            let database = format!("bench-{}", uuid::Uuid::new_v4().simple());
            let store = http_store(&url, &database, counter.rules()).await;
            measure(
                &format!("cosmosdb-server over HTTP ({url})"),
                store,
                &counter,
            )
            .await;
        }
        Err(_) => println!("(set COSMOS_EMULATOR_URL to measure over HTTP as well)"),
    }
}
