//! Bulk import stories beyond the conformance suite: exports with rows that cannot be read.

use serde_json::{Value, json};

use crate::fake_host::HostedHandler;
use crate::helpers::TestApp;

const ID: &str = "int-import";

async fn run_job(handler: &HostedHandler, job_id: &str) {
    handler
        .run_sync(ID, "bulk_import", job_id, "incremental")
        .await;
}

#[tokio::test]
async fn a_row_that_cannot_be_read_is_listed_alone_and_the_rows_after_it_are_imported() {
    let app = TestApp::new();
    let folder = app.data_dir().join("exports");
    std::fs::create_dir_all(&folder).unwrap();
    app.register_integration(json!({
        "id": ID, "tenantId": "t1", "name": "Exports",
        "structuredData": {
            "providerName": "bulk_import", "syncFrequency": {"type": "manual"},
            "connection": {"path": folder.display().to_string(), "settleSeconds": "0"},
            "entityMappings": [{"externalEntity": "accounts", "shardTypeId": "c_company",
                                "nameField": "name",
                                "fieldMappings": [{"source": "name", "target": "name"}]}]
        }
    }))
    .await;
    app.set_credentials(ID, &json!({})).await;
    // The second row has an unquoted comma: its values would land a column off.
    std::fs::write(
        folder.join("accounts.csv"),
        "id,name,modified_at\n\
         a1,Acme,2026-01-01T00:00:00Z\n\
         a2,Globex, Inc,2026-01-02T00:00:00Z\n\
         a3,Initech,2026-01-03T00:00:00Z\n",
    )
    .unwrap();
    let handler = app.host_handler().await;

    run_job(&handler, "job-1").await;

    let history = app.history().await;
    let run: &Value = &history[0]["structuredData"];
    assert_eq!(run["status"], "partial", "{run}");
    assert_eq!(run["stats"]["shardsCreated"], 2);
    assert_eq!(run["stats"]["shardsFailed"], 1);
    let error = &run["errors"][0];
    assert_eq!(error["code"], "VALIDATION_ERROR");
    assert_eq!(error["recordId"], "a2");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("accounts.csv at byte 49")
            && message.contains("4 fields where the header has 3"),
        "{message}"
    );
    let names: Vec<Value> = app
        .shards("c_company")
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, [json!("Acme"), json!("Initech")]);
}
