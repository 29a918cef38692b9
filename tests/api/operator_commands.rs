//! The operator commands, as an operator uses them.

use serde_json::json;

use std::time::Duration;

use crate::helpers::{TestApp, salesforce_integration, wait_until};

#[tokio::test]
async fn registering_an_integration_twice_updates_it_and_keeps_engine_state() {
    let app = TestApp::new();
    let first = app
        .register_integration(salesforce_integration("int-acme-sf"))
        .await;
    let next_sync = first["structuredData"]["nextSyncAt"].clone();
    assert!(
        next_sync.is_string(),
        "a scheduled integration is due at once"
    );

    let mut changed = salesforce_integration("int-acme-sf");
    changed["name"] = json!("Acme Salesforce (EU)");
    let second = app.register_integration(changed).await;
    assert_eq!(second["name"], "Acme Salesforce (EU)");
    assert_eq!(second["structuredData"]["nextSyncAt"], next_sync);
    assert_eq!(second["createdAt"], first["createdAt"]);

    let list = app
        .cli_json(&["integrations", "list", "--tenant", "t1"])
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let text = app.cli(&["integrations", "list"]).await;
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.starts_with("TENANT"), "{text}");
    assert!(text.contains("int-acme-sf"), "{text}");
}

#[tokio::test]
async fn the_data_directory_and_its_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let app = TestApp::new();
    let mut integration = salesforce_integration("int-acme-sf");
    integration["structuredData"]["syncFrequency"] = json!({"type": "manual"});
    app.register_integration(integration).await;
    let _runtime = app.start_local().await;
    app.cli_json(&["sync", "int-acme-sf", "--tenant", "t1"])
        .await;
    wait_until(
        "the job (without credentials, it fails) has published its events",
        Duration::from_secs(30),
        || async { app.events().len() >= 2 },
    )
    .await;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(app.data_dir()), 0o700);
    for file in [
        "store.db",
        "store.db-wal",
        "runtime.db",
        "runtime.db-wal",
        "events.jsonl",
    ] {
        assert_eq!(mode(&app.path(file)), 0o600, "{file}");
    }
}

#[tokio::test]
async fn registering_checks_the_provider_and_its_connection_and_normalizes_the_org_id() {
    let app = TestApp::new();
    let put = |integration: serde_json::Value| {
        let file = app.path("put.json");
        std::fs::write(&file, integration.to_string()).unwrap();
        let app = &app;
        async move {
            let out = app
                .cli(&["integrations", "put", file.to_str().unwrap()])
                .await;
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let unknown = crate::helpers::integration_of("int-x", "zohocrm");
    let (ok, stderr) = put(unknown).await;
    assert!(!ok);
    assert!(
        stderr.contains("structuredData.providerName: this build has no provider `zohocrm`"),
        "{stderr}"
    );

    let mut mistyped = salesforce_integration("int-a");
    mistyped["structuredData"]["connection"] = json!({"maxApiUsage": "80%"});
    let (ok, stderr) = put(mistyped).await;
    assert!(!ok);
    assert!(
        stderr.contains("structuredData.connection.maxApiUsage"),
        "{stderr}"
    );

    // Setup shows the 15-character org id; it is kept in the form Salesforce sends.
    let mut first = salesforce_integration("int-a");
    first["structuredData"]["connection"] = json!({"organizationId": "00D000000000062"});
    let stored = app.register_integration(first).await;
    assert_eq!(
        stored["structuredData"]["connection"]["organizationId"],
        "00D000000000062EAA"
    );
    let mut second = salesforce_integration("int-b");
    second["structuredData"]["connection"] = json!({"organizationId": "00D000000000062EAA"});
    let (ok, stderr) = put(second).await;
    assert!(!ok);
    assert!(
        stderr.contains("already connected to integration `int-a` of tenant `t1`"),
        "{stderr}"
    );

    // Its credentials are a Key Vault secret named after it: at most 127 characters, and
    // no two apart by case alone.
    let long = salesforce_integration(&format!("int-{}", "acme.salesforce.".repeat(8)));
    let (ok, stderr) = put(long).await;
    assert!(!ok);
    assert!(stderr.contains("Key Vault takes at most 127"), "{stderr}");
    let (ok, stderr) = put(salesforce_integration("INT-A")).await;
    assert!(!ok);
    assert!(
        stderr.contains("differs only in case from integration `int-a` of tenant `t1`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_invalid_integration_is_refused_with_the_reason() {
    let app = TestApp::new();
    let mut bad = salesforce_integration("int-bad");
    bad["structuredData"]["syncFrequency"] =
        json!({"type": "cron", "cronExpression": "*/5 * * * *"});
    let file = app.path("bad.json");
    std::fs::write(&file, bad.to_string()).unwrap();
    let out = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected 6 fields"), "{stderr}");
}

#[tokio::test]
async fn credentials_are_stored_and_never_printed() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    let out = app
        .cli_with_stdin(
            &["credentials", "set", "int-acme-sf", "--tenant", "t1"],
            Some(r#"{"refreshToken":"very-secret-token","expiresAt":"2030-01-01T00:00:00Z"}"#),
        )
        .await;
    assert!(out.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains("very-secret-token"), "{printed}");
    assert!(printed.contains("int-t1--int-2dacme-2dsf"), "{printed}");
    let stored = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(stored.contains("very-secret-token"));

    // Malformed input is reported by position, not by quoting it.
    let out = app
        .cli_with_stdin(
            &["credentials", "set", "int-acme-sf", "--tenant", "t1"],
            Some("{\"refreshToken\": very-secret-token}"),
        )
        .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1, column"), "{stderr}");
    assert!(!stderr.contains("very-secret-token"), "{stderr}");
}

#[tokio::test]
async fn commands_on_unknown_integrations_say_so() {
    let app = TestApp::new();
    let out = app.cli(&["sync", "int-nope", "--tenant", "t1"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("integration `int-nope` of tenant `t1` does not exist")
    );
    let out = app.cli(&["dead-letters", "replay", "99"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no dead-lettered message has sequence number 99")
    );
}

#[tokio::test]
async fn shards_are_found_by_type_and_external_id() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    let found = app
        .cli_json(&["shards", "--tenant", "t1", "--type", "c_integration"])
        .await;
    assert_eq!(found[0]["id"], "int-acme-sf");
    let none = app
        .cli_json(&[
            "shards",
            "--tenant",
            "t1",
            "--type",
            "c_integration",
            "--external-id",
            "001A",
        ])
        .await;
    assert_eq!(none, json!([]));
}

#[tokio::test]
async fn shard_edits_leave_the_engines_own_records_alone() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;

    let deleted = app
        .cli(&["shards", "delete", "int-acme-sf", "--tenant", "t1"])
        .await;
    assert!(!deleted.status.success());
    let reason = String::from_utf8_lossy(&deleted.stderr);
    assert!(reason.contains("the engine's own"), "{reason}");

    // A file naming the integration's id as a contact.
    let file = app.data_dir().join("contact.json");
    std::fs::write(
        &file,
        json!({"id": "int-acme-sf", "tenantId": "t1", "shardTypeId": "c_contact",
               "name": "Ann Lee", "structuredData": {"email": "ann@acme.test"}})
        .to_string(),
    )
    .unwrap();
    let put = app.cli(&["shards", "put", file.to_str().unwrap()]).await;
    assert!(!put.status.success());

    let integration = app.integration("int-acme-sf").await;
    assert!(integration["deletedAt"].is_null(), "{integration}");
    assert_eq!(
        integration["structuredData"]["providerName"], "salesforce",
        "{integration}"
    );
}

#[tokio::test]
async fn a_reader_that_stops_reading_ends_a_command_quietly() {
    let app = TestApp::new();
    for i in 0..200 {
        app.plant_integration(salesforce_integration(&format!("int-{i:03}")))
            .await;
    }
    // `handler integrations list --json | head -c 0`: the pipe closes before the answer is
    // written.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["integrations", "list", "--json"])
        .env("FUNC_SYNC_DATA_DIR", app.data_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn new_credentials_keep_the_secrets_of_the_integrations_webhook_subscriptions() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    // What the engine keeps beside the operator's credentials: a subscription's clientState.
    app.set_credentials(
        "int-acme-sf",
        &json!({"refresh_token": "rt-old", "clientState:sub-1": "cs-engine"}),
    )
    .await;

    app.set_credentials("int-acme-sf", &json!({"refresh_token": "rt-new"}))
        .await;

    let secrets: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(app.path("secrets.json")).unwrap()).unwrap();
    let name = handler::secrets::credential_secret_name("t1", "int-acme-sf");
    let stored: serde_json::Value =
        serde_json::from_str(secrets[name.as_str()].as_str().unwrap()).unwrap();
    assert_eq!(stored["refresh_token"], "rt-new");
    assert_eq!(stored["clientState:sub-1"], "cs-engine");
}
