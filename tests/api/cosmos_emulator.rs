//! A Cosmos DB shard store on the SDK's in-memory emulator, the bulk-import jobs run on it,
//! and a count of the requests a client sends, for the tests and the Cosmos benchmark.

use std::sync::Arc;

use azure_data_cosmos::options::{BinaryEncodingOptions, Region};
use azure_data_cosmos::{
    AccountEndpoint, AccountReference, CosmosClient, CosmosClientBuilder, CosmosRuntimeBuilder,
    RoutingStrategy,
};
use azure_data_cosmos_driver::fault_injection::{
    FaultInjectionConditionBuilder, FaultInjectionResultBuilder, FaultInjectionRule,
    FaultInjectionRuleBuilder, FaultOperationType,
};
use azure_data_cosmos_driver::in_memory_emulator::{
    ConsistencyLevel, InMemoryEmulatorHttpClient, VirtualAccountConfig, VirtualRegion,
};

use handler::protocol::ServiceBusMessage;
use handler::store::{CosmosStore, Provisioning};

/// A manual bulk-import integration of tenant `t1` over `folder`: accounts by name, contacts
/// split into first and last name and deduplicated by email.
pub fn bulk_import_integration(id: &str, folder: &std::path::Path) -> handler::model::Shard {
    serde_json::from_value(serde_json::json!({
        "id": id, "tenantId": "t1", "shardTypeId": "c_integration", "name": "Bulk import",
        "structuredData": {
            "providerName": "bulk_import", "syncFrequency": {"type": "manual"},
            "connection": {"path": folder.display().to_string(), "settleSeconds": "0"},
            "entityMappings": [
                {"externalEntity": "accounts", "shardTypeId": "c_company", "nameField": "name",
                 "fieldMappings": [{"source": "name", "target": "name", "required": true}]},
                {"externalEntity": "contacts", "shardTypeId": "c_contact",
                 "fieldMappings": [{"source": "name", "targets": ["first_name", "last_name"], "transform": "split"},
                                   {"source": "email", "target": "email", "required": true}],
                 "deduplication": {"rules": [{"field": "email", "matching": "exact"}]}}
            ]
        }
    }))
    .unwrap()
}

/// Writes `per_entity` accounts and as many contacts (every hundredth repeating the previous
/// one's email: a duplicate to merge) as the files of a bulk import, into `folder`.
pub fn write_bulk_import(folder: &std::path::Path, per_entity: usize) {
    std::fs::create_dir_all(folder).unwrap();
    let mut accounts = String::from("id,name,modified_at\n");
    let mut contacts = String::from("id,name,email,modified_at\n");
    for i in 0..per_entity {
        accounts.push_str(&format!("A{i},Account {i},2026-11-01T00:00:00Z\n"));
        let email = if i % 100 == 99 { i - 1 } else { i };
        contacts.push_str(&format!(
            "C{i},Mary Ann Person{i},person{email}@acme.test,2026-11-01T00:00:00Z\n"
        ));
    }
    std::fs::write(folder.join("accounts.csv"), accounts).unwrap();
    std::fs::write(folder.join("contacts.csv"), contacts).unwrap();
}

/// Counts the item requests a Cosmos client sends, by operation: a fault-injection rule per
/// operation that matches every request and changes nothing. The first rule that matches a
/// request applies, so these go after any rule that injects a fault.
pub struct RequestCounter {
    rules: Vec<(FaultOperationType, Arc<FaultInjectionRule>)>,
}

/// Requests of each kind a client sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub point_reads: u32,
    pub queries: u32,
    pub single_writes: u32,
    pub batches: u32,
}

impl Requests {
    pub fn total(&self) -> u32 {
        self.point_reads + self.queries + self.single_writes + self.batches
    }

    pub fn since(&self, earlier: Requests) -> Requests {
        Requests {
            point_reads: self.point_reads - earlier.point_reads,
            queries: self.queries - earlier.queries,
            single_writes: self.single_writes - earlier.single_writes,
            batches: self.batches - earlier.batches,
        }
    }
}

impl RequestCounter {
    pub fn new() -> Self {
        let operations = [
            FaultOperationType::ReadItem,
            FaultOperationType::QueryItem,
            FaultOperationType::CreateItem,
            FaultOperationType::UpsertItem,
            FaultOperationType::ReplaceItem,
            FaultOperationType::DeleteItem,
            FaultOperationType::BatchItem,
        ];
        let rules = operations
            .into_iter()
            .map(|operation| {
                let rule = FaultInjectionRuleBuilder::new(
                    format!("count-{}", operation.as_str()),
                    FaultInjectionResultBuilder::new().build(),
                )
                .with_condition(
                    FaultInjectionConditionBuilder::new()
                        .with_operation_type(operation)
                        .build(),
                )
                .build();
                (operation, Arc::new(rule))
            })
            .collect();
        Self { rules }
    }

    /// The rules to give the client.
    pub fn rules(&self) -> Vec<Arc<FaultInjectionRule>> {
        self.rules.iter().map(|(_, rule)| rule.clone()).collect()
    }

    pub fn requests(&self) -> Requests {
        let hits = |wanted: &[FaultOperationType]| -> u32 {
            self.rules
                .iter()
                .filter(|(operation, _)| wanted.contains(operation))
                .map(|(_, rule)| rule.hit_count())
                .sum()
        };
        Requests {
            point_reads: hits(&[FaultOperationType::ReadItem]),
            queries: hits(&[FaultOperationType::QueryItem]),
            single_writes: hits(&[
                FaultOperationType::CreateItem,
                FaultOperationType::UpsertItem,
                FaultOperationType::ReplaceItem,
                FaultOperationType::DeleteItem,
            ]),
            batches: hits(&[FaultOperationType::BatchItem]),
        }
    }
}

const ENDPOINT: &str = "https://eastus.emulator.local";

/// A client of a fresh in-memory account, with `rules` injecting faults.
pub async fn emulator_client(rules: Vec<Arc<FaultInjectionRule>>) -> CosmosClient {
    let config = VirtualAccountConfig::new(vec![VirtualRegion::new(
        "East US",
        azure_core::http::Url::parse(ENDPOINT).unwrap(),
    )])
    .unwrap()
    .with_consistency(ConsistencyLevel::Session);
    let emulator = Arc::new(InMemoryEmulatorHttpClient::new(config));
    let account = AccountReference::with_authentication_key(
        ENDPOINT.parse::<AccountEndpoint>().unwrap(),
        azure_core::credentials::Secret::new("dGVzdGtleQ=="),
    );
    let mut builder = CosmosClientBuilder::new().with_runtime(
        CosmosRuntimeBuilder::from(emulator.runtime_builder())
            .build()
            .await
            .unwrap(),
    );
    if !rules.is_empty() {
        builder = builder.with_fault_injection_rules(rules).unwrap();
    }
    builder
        .build(account, RoutingStrategy::ProximityTo(Region::EAST_US))
        .await
        .unwrap()
}

/// A shards container in a fresh in-memory account, with `rules` injecting faults.
pub async fn emulator_store(rules: Vec<Arc<FaultInjectionRule>>) -> CosmosStore {
    let client = emulator_client(rules).await;
    CosmosStore::open(&client, "castiel", "shards", Provisioning::Create)
        .await
        .unwrap()
}

/// The history record (`structuredData`) of job `job_id` of tenant `t1`.
pub async fn history_of(store: &CosmosStore, job_id: &str) -> serde_json::Value {
    use handler::store::{ShardQuery, ShardStore};
    store
        .query(&ShardQuery::of_type("c_integrationSync").in_tenant("t1"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.value.structured_data)
        .find(|r| r["jobId"] == job_id)
        .expect("every run leaves its history record")
}

/// The well-known emulator key (cosmosdb-server checks none, the client wants valid base64).
pub const EMULATOR_KEY: &str =
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw==";

/// A shards container in database `database` of the Cosmos DB emulator at `url` (over HTTP:
/// `@vercel/cosmosdb-server` in CI), with `rules` injecting faults or counting requests.
pub async fn http_store(
    url: &str,
    database: &str,
    rules: Vec<Arc<FaultInjectionRule>>,
) -> CosmosStore {
    let account = AccountReference::with_authentication_key(
        url.parse::<AccountEndpoint>().unwrap(),
        azure_core::credentials::Secret::new(EMULATOR_KEY),
    );
    let mut builder = CosmosClientBuilder::new()
        // A runtime (and connection pool) of this client's own.
        .with_runtime(CosmosRuntimeBuilder::new().build().await.unwrap())
        // cosmosdb-server reads text JSON only.
        .with_binary_encoding_options(BinaryEncodingOptions::new().with_enabled(false));
    if !rules.is_empty() {
        builder = builder.with_fault_injection_rules(rules).unwrap();
    }
    let client = builder
        .build(
            account,
            RoutingStrategy::ProximityTo(Region::SOUTH_CENTRAL_US),
        )
        .await
        .unwrap();
    CosmosStore::open(&client, database, "shards", Provisioning::Create)
        .await
        .unwrap()
}

/// A bulk-import sync job of tenant `t1`, as a first delivery of its queue message.
pub fn bulk_import_job(integration_id: &str, job_id: &str, job_type: &str) -> ServiceBusMessage {
    let job = serde_json::json!({
        "integrationId": integration_id, "tenantId": "t1", "jobType": job_type,
        "provider": "bulk_import", "jobId": job_id, "scheduledAt": chrono::Utc::now()
    });
    ServiceBusMessage {
        body: job.to_string().into_bytes(),
        delivery_count: 1,
        message_id: Some(job_id.into()),
        session_id: None,
        correlation_id: None,
        content_type: None,
        sequence_number: None,
        enqueued_time_utc: None,
        application_properties: serde_json::Map::new(),
    }
}
