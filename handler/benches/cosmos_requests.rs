//! Cosmos DB requests per synced record, through the official SDK against its in-memory
//! emulator: a full sync of 10,000 new records (every record changed), then the same sync
//! again (every record unchanged).
//!
//!     cargo bench -p handler --bench cosmos_requests
//!
//! Requests are counted as the store issues them: a point operation or a write is one request,
//! a query (such as the one that reads a page's existing shards) is one request per thousand ids.

#[path = "../../tests/api/cosmos_emulator.rs"]
mod cosmos_emulator;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::Utc;

use handler::app::LocalBackends;
use handler::engine::inbound;
use handler::model::Shard;
use handler::queue::SYNC_INBOUND_SCHEDULED;
use handler::settings::Settings;
use handler::store::{CosmosStore, ShardQuery, ShardStore, StoreError, Versioned};

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    writes: AtomicU64,
    shard_writes: AtomicU64,
}

struct Counting {
    inner: CosmosStore,
    counts: Arc<Counts>,
}

#[async_trait]
impl ShardStore for Counting {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.get(tenant_id, id).await
    }
    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.create(shard).await
    }
    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.upsert(shard).await
    }
    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.replace(shard, if_match).await
    }
    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.query(query).await
    }
    async fn get_many(
        &self,
        tenant_id: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Versioned<Shard>>>, StoreError> {
        self.counts
            .reads
            .fetch_add(ids.len().div_ceil(1000) as u64, Ordering::Relaxed);
        self.inner.get_many(tenant_id, ids).await
    }
    async fn upsert_many(&self, shards: &[Shard]) -> Result<Vec<String>, StoreError> {
        self.counts
            .writes
            .fetch_add(shards.len() as u64, Ordering::Relaxed);
        self.counts
            .shard_writes
            .fetch_add(shards.len() as u64, Ordering::Relaxed);
        self.inner.upsert_many(shards).await
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("imports");
    std::fs::create_dir_all(&folder).unwrap();
    let mut accounts = String::from("id,name,modified_at\n");
    let mut contacts = String::from("id,name,email,modified_at\n");
    for i in 0..5000 {
        accounts.push_str(&format!("A{i},Account {i},2026-11-01T00:00:00Z\n"));
        contacts.push_str(&format!(
            "C{i},Mary Ann Person{i},person{i}@acme.test,2026-11-01T00:00:00Z\n"
        ));
    }
    std::fs::write(folder.join("accounts.csv"), accounts).unwrap();
    std::fs::write(folder.join("contacts.csv"), contacts).unwrap();

    let settings = Settings::from_lookup(|name| match name {
        "FUNC_SYNC_DATA_DIR" => Some(dir.path().display().to_string()),
        "SYNC_MAX_RECORDS" => Some("1000000".into()),
        _ => None,
    })
    .unwrap();
    let backends = LocalBackends::open(&settings).unwrap();
    let counts = Arc::new(Counts::default());
    let store = Arc::new(Counting {
        inner: cosmos_emulator::emulator_store(vec![]).await,
        counts: counts.clone(),
    });
    let mut app = backends.app(settings, handler::app::providers());
    app.store = store.clone();
    store
        .inner
        .create(&cosmos_emulator::bulk_import_integration(
            "int-bench",
            &folder,
        ))
        .await
        .unwrap();

    for (label, job_id) in [
        ("every record new (changed)", "bench-1"),
        ("nothing changed (unchanged)", "bench-2"),
    ] {
        let before = (
            counts.reads.load(Ordering::Relaxed),
            counts.writes.load(Ordering::Relaxed),
            counts.shard_writes.load(Ordering::Relaxed),
        );
        let started = std::time::Instant::now();
        inbound::process(
            &app,
            SYNC_INBOUND_SCHEDULED,
            &cosmos_emulator::bulk_import_job("int-bench", job_id, "full_sync"),
            Utc::now(),
        )
        .await
        .unwrap();
        let elapsed = started.elapsed();
        let reads = counts.reads.load(Ordering::Relaxed) - before.0;
        let writes = counts.writes.load(Ordering::Relaxed) - before.1;
        let shard_writes = counts.shard_writes.load(Ordering::Relaxed) - before.2;
        println!(
            "10,000 records, {label}: {:.2} shard writes per record, {:.3} requests per record in all \
             ({reads} reads and queries, {writes} writes including history and checkpoints), {:.2} s",
            shard_writes as f64 / 10_000.0,
            (reads + writes) as f64 / 10_000.0,
            elapsed.as_secs_f64()
        );
    }
}
