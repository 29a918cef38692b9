//! Google Drive stories beyond the conformance suite: the trash, shared drives, and Drive
//! itself telling the local runtime of changes through a watch channel.

use std::time::Duration;

use serde_json::{Value, json};

use handler::queue::SYNC_INBOUND_SCHEDULED;

use crate::fake_google_drive::FakeGoogleDrive;
use crate::fake_host::{HostedHandler, free_port};
use crate::helpers::{TestApp, wait_until};

const ID: &str = "int-drive";

fn integration(drive: &FakeGoogleDrive, shared: bool) -> Value {
    json!({
        "id": ID, "tenantId": "t1", "name": "Contoso Drive",
        "structuredData": {
            "providerName": "google_drive",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": drive.token_url(), "apiBaseUrl": drive.api_base(),
                           "includeSharedDrives": shared},
            "entityMappings": [{
                "externalEntity": "files", "shardTypeId": "c_document", "nameField": "name",
                "fieldMappings": [{"source": "name", "target": "name", "required": true},
                                  {"source": "mimeType", "target": "mime_type"}]
            }]
        }
    })
}

async fn names(app: &TestApp) -> Vec<String> {
    let mut names: Vec<String> = app
        .shards("c_document")
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

/// An app with the Drive integration registered against `drive` (every shared drive too when
/// `shared`), its credentials stored, and the handler as the host runs it.
async fn connected(drive: &FakeGoogleDrive, shared: bool) -> (TestApp, HostedHandler) {
    let app = TestApp::new();
    app.register_integration(integration(drive, shared)).await;
    app.set_credentials(ID, &drive.credentials()).await;
    let handler = app.host_handler().await;
    (app, handler)
}

async fn run_job(handler: &HostedHandler, job_id: &str, job_type: &str) {
    handler.run_sync(ID, "google_drive", job_id, job_type).await;
}

#[tokio::test]
async fn shared_drives_are_read_when_asked_and_a_trashed_file_goes_away() {
    let drive = FakeGoogleDrive::start().await;
    let plan = drive.add_file("plan.docx");
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    let (app, handler) = connected(&drive, false).await;

    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(names(&app).await, ["plan.docx"], "My Drive only");

    app.register_integration(integration(&drive, true)).await;
    run_job(&handler, "job-2", "full_sync").await;
    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);

    drive.trash_file(&plan);
    run_job(&handler, "job-3", "incremental").await;
    assert_eq!(
        names(&app).await,
        ["team-budget.xlsx"],
        "the trash is a deletion"
    );
}

#[tokio::test]
async fn shared_drives_asked_for_later_are_read_whole_by_the_next_sync() {
    let drive = FakeGoogleDrive::start().await;
    drive.add_file("plan.docx");
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    let (app, handler) = connected(&drive, false).await;
    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(names(&app).await, ["plan.docx"], "My Drive only");

    // The operator adds the shared drives; the next sync is an ordinary one.
    app.register_integration(integration(&drive, true)).await;
    run_job(&handler, "job-2", "incremental").await;

    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);
}

#[tokio::test]
async fn shared_drives_asked_for_while_a_first_listing_spans_jobs_are_listed_too() {
    let drive = FakeGoogleDrive::start().await;
    drive.load_files(1500);
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    let app = TestApp::new();
    app.register_integration(integration(&drive, false)).await;
    app.set_credentials(ID, &drive.credentials()).await;
    // Each job syncs a thousand files at most: the listing goes on in a continuation.
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "1000")]).await;
    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(names(&app).await.len(), 1000);

    // The operator adds the shared drives before the continuation runs.
    app.register_integration(integration(&drive, true)).await;
    let broker = app.broker();
    let far = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut continuations = 0;
    while let Some(next) = broker.receive_at(SYNC_INBOUND_SCHEDULED, far).unwrap() {
        handler.deliver("SyncInboundScheduled", &next).await;
        broker.complete(&next).unwrap();
        continuations += 1;
        assert!(continuations < 10, "the chain ends");
    }

    let synced = names(&app).await;
    assert_eq!(synced.len(), 1501);
    assert!(synced.contains(&"team-budget.xlsx".to_string()));
}

#[tokio::test]
async fn a_search_of_every_drive_that_came_back_incomplete_is_listed_again_next_time() {
    let drive = FakeGoogleDrive::start().await;
    drive.add_file("plan.docx");
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    drive.state.lock().unwrap().incomplete_search = true;
    let (app, handler) = connected(&drive, true).await;

    run_job(&handler, "job-1", "full_sync").await;
    let history = app.history().await;
    let run = &history[0]["structuredData"];
    assert_eq!(run["status"], "partial", "{run}");
    assert!(
        run["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("incompleteSearch"),
        "{run}"
    );
    let state = app.integration(ID).await;
    assert!(
        state["structuredData"]["cursors"].get("files").is_none(),
        "no cursor from an incomplete listing: {state}"
    );

    drive.state.lock().unwrap().incomplete_search = false;
    run_job(&handler, "job-2", "incremental").await;
    let state = app.integration(ID).await;
    assert!(state["structuredData"]["cursors"]["files"].is_string());
    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);
}

#[tokio::test]
async fn files_deleted_while_drive_refused_the_changes_token_go_when_it_lists_again() {
    let drive = FakeGoogleDrive::start().await;
    let plan = drive.add_file("plan.docx");
    let budget = drive.add_file("budget.xlsx");
    drive.add_file("notes.txt");
    let (app, handler) = connected(&drive, false).await;
    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(names(&app).await.len(), 3);

    // One deleted, one trashed; then Drive refuses the token whose changes would say so.
    drive.delete_file(&plan);
    drive.trash_file(&budget);
    drive.state.lock().unwrap().refuse_change_tokens = true;
    run_job(&handler, "job-2", "incremental").await;

    assert_eq!(names(&app).await, ["notes.txt"]);
}

#[tokio::test]
async fn a_full_sync_deletes_what_it_no_longer_lists_unless_its_search_came_back_incomplete() {
    let drive = FakeGoogleDrive::start().await;
    let plan = drive.add_file("plan.docx");
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    let (app, handler) = connected(&drive, true).await;
    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);

    // The search leaves the shared drive out, and says so: what it left out is not gone, and
    // the changes feed the last sync left goes on from where it was.
    drive.state.lock().unwrap().incomplete_search = true;
    run_job(&handler, "job-2", "full_sync").await;
    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);
    let state = app.integration(ID).await["structuredData"].clone();
    assert!(state["cursors"]["files"].is_string(), "{state}");
    assert!(
        state["lostDeletions"]
            .as_array()
            .is_none_or(|lost| lost.is_empty()),
        "{state}"
    );

    drive.state.lock().unwrap().incomplete_search = false;
    drive.delete_file(&plan);
    run_job(&handler, "job-3", "full_sync").await;
    assert_eq!(names(&app).await, ["team-budget.xlsx"]);
}

#[tokio::test]
async fn a_file_out_of_the_integrations_scope_is_not_taken_for_deleted_by_a_full_sync() {
    let drive = FakeGoogleDrive::start().await;
    drive.add_file("plan.docx");
    drive.add_shared_drive_file("0AsharedDrive1", "team-budget.xlsx");
    let (app, handler) = connected(&drive, true).await;
    run_job(&handler, "job-1", "full_sync").await;

    // Shared drives are no longer read: the listing leaves the budget out, but Drive has it.
    app.register_integration(integration(&drive, false)).await;
    run_job(&handler, "job-2", "full_sync").await;

    assert_eq!(names(&app).await, ["plan.docx", "team-budget.xlsx"]);
}

#[tokio::test]
async fn hundreds_of_files_a_listing_no_longer_reaches_are_kept_without_asking_for_each() {
    let drive = FakeGoogleDrive::start().await;
    drive.add_file("plan.docx");
    for i in 0..150 {
        drive.add_shared_drive_file("0AsharedDrive1", &format!("budget-{i:03}.xlsx"));
    }
    let (app, handler) = connected(&drive, true).await;
    run_job(&handler, "job-1", "full_sync").await;

    app.register_integration(integration(&drive, false)).await;
    let asked_before = drive.requests().len();
    run_job(&handler, "job-2", "full_sync").await;

    assert_eq!(names(&app).await.len(), 151);
    let reads: Vec<String> = drive.requests()[asked_before..]
        .iter()
        .filter(|r| r.split('?').next().unwrap_or_default().contains("/files/"))
        .cloned()
        .collect();
    assert!(reads.is_empty(), "{reads:?}");
    let history = app.history().await;
    let run = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2")
        .unwrap();
    let told = run["structuredData"]["errors"].to_string();
    assert!(
        told.contains("left out, 150 may be deleted for good"),
        "{told}"
    );
}

#[tokio::test]
async fn drive_tells_the_local_runtime_of_a_change_through_its_channel() {
    let front_door = format!("127.0.0.1:{}", free_port());
    let app = TestApp::with_settings(&[
        ("FUNC_SYNC_LOCAL_ADDR", &front_door),
        ("WEBHOOK_BASE_URL", &format!("http://{front_door}")),
    ]);
    let drive = FakeGoogleDrive::start().await;
    drive.load_files(3);
    app.register_integration(integration(&drive, false)).await;
    app.set_credentials(ID, &drive.credentials()).await;
    let _runtime = app.start_local().await;
    let subscribed = app
        .cli_json(&["integrations", "subscribe", ID, "--tenant", "t1"])
        .await;
    assert_eq!(subscribed["created"], 1);
    app.cli_json(&["sync", ID, "--tenant", "t1"]).await;
    wait_until("the files are shards", Duration::from_secs(30), || async {
        names(&app).await.len() == 3
    })
    .await;

    let added = drive.add_file("minutes.txt");
    let answers = drive.notify_change().await;

    assert_eq!(
        answers,
        [200],
        "the channel's change message is acknowledged"
    );
    wait_until(
        "the new file is synced",
        Duration::from_secs(30),
        || async { names(&app).await.contains(&"minutes.txt".to_string()) },
    )
    .await;
    let channel = drive.channels()[0].clone();
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(secrets.contains(channel.token.as_deref().unwrap()));
    assert!(!added.is_empty());
}

#[tokio::test]
async fn a_notification_address_drive_refuses_is_reported_without_the_function_key() {
    let app = TestApp::with_settings(&[
        ("WEBHOOK_BASE_URL", "https://func-sync.example"),
        ("WEBHOOK_FUNCTION_KEY", "k3y-s3cret-value"),
    ]);
    let drive = FakeGoogleDrive::start().await;
    drive.state.lock().unwrap().refuse_addresses = true;
    app.register_integration(integration(&drive, false)).await;
    app.set_credentials(ID, &drive.credentials()).await;

    let out = app
        .cli(&["integrations", "subscribe", ID, "--tenant", "t1"])
        .await;

    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains("Unauthorized WebHook callback channel")
            || stderr.contains("Unauthorized WebHook callback channel"),
        "the refusal is told: {stdout} {stderr}"
    );
    assert!(
        !stdout.contains("k3y-s3cret-value") && !stderr.contains("k3y-s3cret-value"),
        "{stdout} {stderr}"
    );
    assert!(
        stderr.contains("VALIDATION_ERROR") || stdout.contains("VALIDATION_ERROR"),
        "the address's fault, not the credentials': {stdout} {stderr}"
    );
}

#[tokio::test]
async fn filters_drive_cannot_apply_are_refused_at_registration() {
    let app = TestApp::new();
    let drive = FakeGoogleDrive::start().await;
    let mut filtered = integration(&drive, false);
    filtered["structuredData"]["pullFilters"] = json!(["mimeType = 'application/pdf'"]);
    let file = app.path("filtered.json");
    std::fs::write(&file, filtered.to_string()).unwrap();

    let out = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("structuredData.pullFilters"), "{stderr}");
}

#[tokio::test]
async fn a_request_drive_refuses_for_another_reason_keeps_the_changes_feed_where_it_was() {
    let drive = FakeGoogleDrive::start().await;
    drive.add_file("plan.docx");
    let (app, handler) = connected(&drive, false).await;
    run_job(&handler, "job-1", "full_sync").await;
    let before = app.integration(ID).await["structuredData"]["cursors"]["files"].clone();
    assert!(before.is_string());

    drive.state.lock().unwrap().refuse_field_masks = true;
    run_job(&handler, "job-2", "incremental").await;

    let state = app.integration(ID).await["structuredData"].clone();
    assert_eq!(state["cursors"]["files"], before, "{state}");
    assert!(
        state["lostDeletions"]
            .as_array()
            .is_none_or(|lost| lost.is_empty()),
        "{state}"
    );
}
