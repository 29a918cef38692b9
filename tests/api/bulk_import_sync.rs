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

/// The import integration: accounts, from the folder and as `connection` says.
fn accounts_import(connection: Value) -> Value {
    json!({
        "id": ID, "tenantId": "t1", "name": "Exports",
        "structuredData": {
            "providerName": "bulk_import", "syncFrequency": {"type": "manual"},
            "connection": connection,
            "entityMappings": [{"externalEntity": "accounts", "shardTypeId": "c_company",
                                "nameField": "name",
                                "fieldMappings": [{"source": "name", "target": "name"}]}]
        }
    })
}

/// An app with [`accounts_import`] registered and connected, and the handler as the host runs it.
async fn importing(app: &TestApp, connection: Value) -> HostedHandler {
    app.register_integration(accounts_import(connection)).await;
    app.set_credentials(ID, &json!({})).await;
    app.host_handler().await
}

#[tokio::test]
async fn a_row_that_cannot_be_read_is_listed_alone_and_the_rows_after_it_are_imported() {
    let app = TestApp::new();
    let folder = app.data_dir().join("exports");
    std::fs::create_dir_all(&folder).unwrap();
    let handler = importing(
        &app,
        json!({"path": folder.display().to_string(), "settleSeconds": "0"}),
    )
    .await;
    // The second row has an unquoted comma: its values would land a column off.
    std::fs::write(
        folder.join("accounts.csv"),
        "id,name,modified_at\n\
         a1,Acme,2026-01-01T00:00:00Z\n\
         a2,Globex, Inc,2026-01-02T00:00:00Z\n\
         a3,Initech,2026-01-03T00:00:00Z\n",
    )
    .unwrap();

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

#[tokio::test]
async fn an_export_whose_header_is_not_utf8_fails_alone_and_the_next_file_is_read() {
    let app = TestApp::new();
    let folder = app.data_dir().join("exports");
    std::fs::create_dir_all(&folder).unwrap();
    let handler = importing(
        &app,
        json!({"path": folder.display().to_string(), "settleSeconds": 0}),
    )
    .await;
    // Saved by a spreadsheet in Windows-1252: "Société" is not UTF-8.
    std::fs::write(
        folder.join("accounts.csv"),
        b"id,name,soci\xe9t\xe9\na1,Acme,x\n",
    )
    .unwrap();
    std::fs::write(folder.join("accounts-2.csv"), "id,name\na2,Globex\n").unwrap();

    run_job(&handler, "job-1").await;

    let history = app.history().await;
    let run: &Value = &history[0]["structuredData"];
    assert_eq!(run["status"], "partial", "{run}");
    let message = run["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("accounts.csv") && message.contains("header is not UTF-8"),
        "{message}"
    );
    let names: Vec<Value> = app
        .shards("c_company")
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, [json!("Globex")]);
}

#[tokio::test]
async fn a_settle_time_given_as_a_number_is_kept_and_a_bad_one_refused() {
    let app = TestApp::new();
    let folder = app.data_dir().join("exports");
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.display().to_string();
    let integration = accounts_import(json!({"path": path, "settleSeconds": "an hour"}));
    let file = app.data_dir().join("import.json");
    std::fs::write(&file, integration.to_string()).unwrap();
    let refused = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("settleSeconds"), "{said}");

    // No wait, as a number: the export is trusted as soon as it is written, so its time
    // takes the cursor on and the file is remembered.
    let handler = importing(&app, json!({"path": path, "settleSeconds": 0})).await;
    std::fs::write(
        folder.join("accounts.csv"),
        "id,name,modified_at\na1,Acme,2026-01-01T00:00:00Z\n",
    )
    .unwrap();
    run_job(&handler, "job-1").await;

    let state = app.integration(ID).await;
    assert_eq!(app.shards("c_company").await.len(), 1);
    let cursor = state["structuredData"]["cursors"]["accounts"].to_string();
    assert!(
        cursor.contains("2026-01-01") && cursor.contains("accounts.csv"),
        "{state}"
    );
}

#[tokio::test]
async fn an_integration_whose_entities_would_read_each_others_files_is_refused() {
    let app = TestApp::new();
    let mapping = |entity: &str| {
        json!({"externalEntity": entity, "shardTypeId": "c_order", "nameField": "name",
               "fieldMappings": [{"source": "name", "target": "name"}]})
    };
    let file = app.data_dir().join("orders.json");
    let integration = json!({
        "id": ID, "tenantId": "t1", "name": "Orders",
        "structuredData": {
            "providerName": "bulk_import", "syncFrequency": {"type": "manual"},
            "connection": {"path": app.data_dir().display().to_string()},
            "entityMappings": [mapping("orders"), mapping("orders_items")]
        }
    });
    std::fs::write(&file, integration.to_string()).unwrap();

    let out = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;

    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("entityMappings") && said.contains("orders_items"),
        "{said}"
    );
}

#[tokio::test]
async fn contacts_and_leads_numbered_alike_keep_to_their_own_shards_and_deletions() {
    let app = TestApp::new();
    let folder = app.data_dir().join("exports");
    std::fs::create_dir_all(&folder).unwrap();
    let mapping = |entity: &str| {
        json!({"externalEntity": entity, "shardTypeId": "c_contact", "nameField": "name",
               "fieldMappings": [{"source": "name", "target": "name"},
                                 {"source": "email", "target": "email"}],
               "deduplication": {"rules": [{"field": "email", "matching": "exact"}]}})
    };
    let mut integration =
        accounts_import(json!({"path": folder.display().to_string(), "settleSeconds": "0"}));
    integration["structuredData"]["entityMappings"] =
        json!([mapping("contacts"), mapping("leads")]);
    app.register_integration(integration).await;
    app.set_credentials(ID, &json!({})).await;
    let handler = app.host_handler().await;
    // Each export numbers its rows from 1.
    std::fs::write(
        folder.join("contacts.csv"),
        "id,name,email,modified_at\n\
         1,Ann,ann@acme.test,2026-01-01T00:00:00Z\n\
         2,Bob,bob@acme.test,2026-01-01T00:00:00Z\n\
         3,Cy,cy@acme.test,2026-01-01T00:00:00Z\n",
    )
    .unwrap();
    run_job(&handler, "job-1").await;

    // The leads' first drop: a new lead 2, and lead 3 deleted before it was ever imported.
    std::fs::write(
        folder.join("leads.csv"),
        "id,name,email,modified_at,_deleted\n\
         2,Dave,dave@acme.test,2026-01-02T00:00:00Z,\n\
         3,,,2026-01-02T00:00:00Z,true\n",
    )
    .unwrap();
    run_job(&handler, "job-2").await;

    let shards = app.shards("c_contact").await;
    let mut live: Vec<&str> = shards
        .iter()
        .filter(|s| s["deletedAt"].is_null())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    live.sort_unstable();
    assert_eq!(live, ["Ann", "Bob", "Cy", "Dave"], "{shards:?}");
}
