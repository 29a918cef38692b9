//! A Cosmos DB shard store on the SDK's in-memory emulator, and the bulk-import jobs run on
//! it, for the tests and the Cosmos benchmark.

use std::sync::Arc;

use azure_data_cosmos::options::Region;
use azure_data_cosmos::{
    AccountEndpoint, AccountReference, CosmosClient, CosmosClientBuilder, CosmosRuntimeBuilder,
    RoutingStrategy,
};
use azure_data_cosmos_driver::fault_injection::FaultInjectionRule;
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
            "connection": {"path": folder.display().to_string()},
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
