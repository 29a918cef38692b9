//! Microsoft Graph stories beyond the conformance suite: change notifications delivered by
//! Graph itself to the local runtime, lifecycle notifications, subscriptions renewed by
//! TokenRefresher, Teams replies, an expired drive delta, and an item a delta lists twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use handler::local::front_door;
use handler::local::invoker::Invoker;
use handler::queue::SYNC_INBOUND_SCHEDULED;
use handler::secrets::{Secret, SecretStore, SecretsError};

use crate::fake_graph::FakeGraph;
use crate::fake_host::{free_port, service_bus_message, timer_without_status};
use crate::helpers::{LocalRuntime, TestApp, wait_until};

const DRIVE: &str = "b!drive-1";
const TEAM: &str = "fbe2bf47-16c8-47cf-b4a5-4b9b187c508b";
const CHANNEL: &str = "19:4a95f7d8db4c4e7fae857bcebe0623e6@thread.tacv2";

/// The function key WebhookReceiver's auth level asks deliveries for.
const FUNCTION_KEY: &str = "webhooks-k3y/+=";

/// A test world whose providers deliver to its local runtime's front door, which asks for the
/// function key as the host does.
fn world() -> TestApp {
    let front_door = format!("127.0.0.1:{}", free_port());
    TestApp::with_settings(&[
        ("FUNC_SYNC_LOCAL_ADDR", &front_door),
        ("WEBHOOK_BASE_URL", &format!("http://{front_door}")),
        ("WEBHOOK_FUNCTION_KEY", FUNCTION_KEY),
    ])
}

fn onedrive(graph: &FakeGraph) -> Value {
    json!({
        "id": "int-drive", "tenantId": "t1", "name": "Contoso documents",
        "structuredData": {
            "providerName": "onedrive",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": graph.token_url(), "apiBaseUrl": graph.api_base(), "driveId": DRIVE},
            "entityMappings": [{
                "externalEntity": "driveItem", "shardTypeId": "c_document", "nameField": "name",
                "fieldMappings": [{"source": "name", "target": "name", "required": true},
                                  {"source": "parentReference.driveId", "target": "drive"}]
            }]
        }
    })
}

async fn connected_drive(app: &TestApp) -> FakeGraph {
    let graph = FakeGraph::start().await;
    app.register_integration(onedrive(&graph)).await;
    app.set_credentials("int-drive", &graph.credentials()).await;
    graph
}

async fn names(app: &TestApp, shard_type: &str) -> Vec<String> {
    let mut names: Vec<String> = app
        .shards(shard_type)
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

async fn subscribe(app: &TestApp, id: &str) -> Value {
    app.cli_json(&["integrations", "subscribe", id, "--tenant", "t1"])
        .await
}

/// `handler local` started for `app`, whose drive integration is subscribed to Graph and
/// synced once: its one file, `budget.xlsx`, is a shard.
async fn subscribed_and_synced(app: &TestApp) -> LocalRuntime {
    let runtime = app.start_local().await;
    assert_eq!(subscribe(app, "int-drive").await["created"], 1);
    app.cli_json(&["sync", "int-drive", "--tenant", "t1"]).await;
    wait_until("the file is a shard", Duration::from_secs(30), || async {
        names(app, "c_document").await == ["budget.xlsx"]
    })
    .await;
    runtime
}

#[tokio::test]
async fn a_file_renamed_in_onedrive_reaches_castiel_through_graphs_own_notification() {
    let app = world();
    let graph = connected_drive(&app).await;
    let file = graph.add_item(DRIVE, "budget.xlsx", false);
    let runtime = subscribed_and_synced(&app).await;

    graph.rename_item(DRIVE, &file, "budget-2027.xlsx");
    let subscription = graph.subscriptions()[0].clone();
    // The URL Graph was given carries the function key, which the host asks for.
    assert_eq!(
        subscription.notification_url,
        format!(
            "http://{}/api/webhooks/onedrive?code=webhooks-k3y%2F%2B%3D",
            runtime.addr
        )
    );
    let keyless = subscription.notification_url.split('?').next().unwrap();
    let (status, _, _) = crate::helpers::http_request(
        "POST",
        keyless,
        &[("Content-Type", "application/json")],
        Some(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "no key, refused before the receiver runs");
    // In the same batch, the last notification of a subscription replaced meanwhile.
    graph.state.lock().unwrap().extra_subscription_in_batches = Some("replaced-sub-1".into());
    let (status, _) = graph.notify(&subscription.id, "updated", &file, None).await;

    assert_eq!(status, 202, "Graph's notification is accepted at once");
    wait_until("the rename is synced", Duration::from_secs(30), || async {
        names(&app, "c_document").await == ["budget-2027.xlsx"]
    })
    .await;
    let (status, body) = graph
        .notify(&subscription.id, "updated", &file, Some("guessed"))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("clientState"), "{body}");
    let (status, _) = graph.redeliver_last().await;
    assert_eq!(status, 403, "a forgery stays a forgery");
    drop(runtime);
}

#[tokio::test]
async fn each_of_onedrives_identical_notifications_brings_its_change() {
    let app = world();
    let graph = connected_drive(&app).await;
    let file = graph.add_item(DRIVE, "budget.xlsx", false);
    let runtime = subscribed_and_synced(&app).await;
    graph.state.lock().unwrap().notifications_without_id = true;
    let subscription = graph.subscriptions()[0].id.clone();

    for name in ["budget-2027.xlsx", "budget-2027-final.xlsx"] {
        graph.rename_item(DRIVE, &file, name);
        let (status, _) = graph.notify(&subscription, "updated", &file, None).await;
        assert_eq!(status, 202);
        wait_until("the rename is synced", Duration::from_secs(30), || async {
            names(&app, "c_document").await == [name]
        })
        .await;
    }
    drop(runtime);
}

#[tokio::test]
async fn a_batch_that_names_an_integration_unable_to_verify_its_part_still_syncs_the_rest() {
    let app = world();
    let graph = connected_drive(&app).await;
    let file = graph.add_item(DRIVE, "budget.xlsx", false);
    // Another drive's integration, whose subscription posts to the same URL, has lost its
    // credentials.
    let mut other = onedrive(&graph);
    other["id"] = json!("int-drive-2");
    other["structuredData"]["connection"]["driveId"] = json!("b!contoso-archive");
    other["structuredData"]["subscriptions"] = json!([{
        "id": "sub-of-drive-2", "resource": "/drives/b!contoso-archive/root",
        "expiresAt": "2030-01-01T00:00:00.000Z"
    }]);
    app.plant_integration(other).await;
    let _runtime = subscribed_and_synced(&app).await;

    graph.rename_item(DRIVE, &file, "budget-2027.xlsx");
    graph.state.lock().unwrap().extra_subscription_in_batches = Some("sub-of-drive-2".into());
    let subscription = graph.subscriptions()[0].clone();
    let (status, body) = graph.notify(&subscription.id, "updated", &file, None).await;

    assert_eq!(status, 202, "{body}");
    wait_until("the rename is synced", Duration::from_secs(30), || async {
        names(&app, "c_document").await == ["budget-2027.xlsx"]
    })
    .await;
}

#[tokio::test]
async fn lifecycle_notifications_renew_or_recreate_the_subscription() {
    let app = world();
    let graph = connected_drive(&app).await;
    let _runtime = app.start_local().await;
    subscribe(&app, "int-drive").await;
    let first = graph.subscriptions()[0].clone();

    // Graph asks for the subscription to be renewed: the next maintenance renews it.
    let (status, _) = graph.lifecycle(&first.id, "reauthorizationRequired").await;
    assert_eq!(status, 202);
    let renewed = subscribe(&app, "int-drive").await;
    assert_eq!(
        (&renewed["created"], &renewed["renewed"]),
        (&json!(0), &json!(1))
    );

    // Graph removed it: a new one is made, with a secret of its own.
    let (status, _) = graph.lifecycle(&first.id, "subscriptionRemoved").await;
    assert_eq!(status, 202);
    let state = &app.integration("int-drive").await["structuredData"];
    assert!(state.get("subscriptions").is_none(), "{state}");
    let recreated = subscribe(&app, "int-drive").await;
    assert_eq!(recreated["created"], 1);
    let second = graph.subscriptions()[0].clone();
    assert_ne!(second.id, first.id);
    assert_ne!(second.client_state, first.client_state);
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(
        secrets.contains(second.client_state.as_deref().unwrap()),
        "the new clientState is kept with the credentials"
    );
    assert!(
        !secrets.contains(first.client_state.as_deref().unwrap()),
        "the removed subscription's is dropped"
    );
    let state = app.integration("int-drive").await.to_string();
    assert!(
        !state.contains(second.client_state.as_deref().unwrap()),
        "and never in the integration document"
    );
}

#[tokio::test]
async fn each_missed_notice_catches_the_drive_up_again() {
    let app = world();
    let graph = connected_drive(&app).await;
    let file = graph.add_item(DRIVE, "budget.xlsx", false);
    let _runtime = subscribed_and_synced(&app).await;
    let subscription = graph.subscriptions()[0].id.clone();

    // Graph could not deliver some notifications, twice in a few minutes: each time, the
    // changes made meanwhile are read.
    for name in ["budget-2027.xlsx", "budget-2027-final.xlsx"] {
        graph.rename_item(DRIVE, &file, name);
        let (status, _) = graph.lifecycle(&subscription, "missed").await;
        assert_eq!(status, 202);
        wait_until("the rename is synced", Duration::from_secs(30), || async {
            names(&app, "c_document").await == [name]
        })
        .await;
    }
}

#[tokio::test]
async fn the_token_refresher_renews_a_subscription_before_it_lapses() {
    let app = world();
    let graph = connected_drive(&app).await;
    let runtime = app.start_local().await;
    subscribe(&app, "int-drive").await;
    let first = graph.subscriptions()[0].clone();
    graph.lifecycle(&first.id, "reauthorizationRequired").await;
    runtime.kill_9().await;
    let front_door = app.settings_value("FUNC_SYNC_LOCAL_ADDR");
    let handler = app
        .host_handler_with(&[
            ("WEBHOOK_BASE_URL", &format!("http://{front_door}")),
            ("WEBHOOK_FUNCTION_KEY", FUNCTION_KEY),
        ])
        .await;

    let res = handler
        .invoke(
            "TokenRefresher",
            &timer_without_status("TokenRefresher", "timer"),
        )
        .await;

    assert!(res.host_accepts(), "{res:?}");
    let log = res.json()["Logs"][0].as_str().unwrap().to_string();
    assert!(log.contains("1 renewed"), "{log}");
    let renewed = graph.subscriptions()[0].clone();
    assert_eq!(renewed.id, first.id);
    assert!(renewed.expiration > chrono::Utc::now() + chrono::Duration::days(28));
    let state = &app.integration("int-drive").await["structuredData"];
    let kept = state["subscriptions"][0]["expiresAt"].as_str().unwrap();
    assert!(kept > chrono::Utc::now().to_rfc3339().as_str());
}

#[tokio::test]
async fn teams_posts_and_their_replies_become_shards_and_deleted_posts_go_away() {
    let app = TestApp::new();
    let graph = FakeGraph::start().await;
    let post = graph.post_message(TEAM, CHANNEL, "Quarterly numbers are in");
    graph.reply(TEAM, CHANNEL, &post, "Thanks, looking now");
    let gone = graph.post_message(TEAM, CHANNEL, "Wrong channel, sorry");
    app.register_integration(json!({
        "id": "int-teams", "tenantId": "t1", "name": "Sales channel",
        "structuredData": {
            "providerName": "teams",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": graph.token_url(), "apiBaseUrl": graph.api_base(),
                           "teamId": TEAM, "channelIds": [CHANNEL]},
            "entityMappings": [{
                "externalEntity": "channelMessage", "shardTypeId": "c_message", "nameField": "text",
                "fieldMappings": [{"source": "body.content", "target": "text"},
                                  {"source": "from.user.displayName", "target": "author"},
                                  {"source": "replyToId", "target": "reply_to"}]
            }]
        }
    }))
    .await;
    app.set_credentials("int-teams", &graph.credentials()).await;
    let handler = app.host_handler().await;
    let run = |job: &str, job_type: &str| {
        let body = json!({"integrationId": "int-teams", "tenantId": "t1", "jobType": job_type,
                          "provider": "teams", "jobId": job, "scheduledAt": "2026-11-22T10:00:00Z"});
        service_bus_message("SyncInboundScheduled", &body.to_string(), job, 1, None)
    };

    handler
        .invoke("SyncInboundScheduled", &run("job-1", "full_sync"))
        .await;
    let messages = app.shards("c_message").await;
    assert_eq!(messages.len(), 3);
    let reply = messages
        .iter()
        .find(|m| m["structuredData"]["text"] == "Thanks, looking now")
        .unwrap();
    assert_eq!(reply["structuredData"]["reply_to"], post.as_str());

    graph.delete_message(TEAM, CHANNEL, &gone);
    handler
        .invoke("SyncInboundScheduled", &run("job-2", "incremental"))
        .await;
    assert_eq!(
        names(&app, "c_message").await,
        ["Quarterly numbers are in", "Thanks, looking now"]
    );
}

/// Connects `int-teams` to two channels of `graph`'s team: one since deleted, named first
/// (returned), and [`CHANNEL`].
async fn connect_with_a_deleted_channel(app: &TestApp, graph: &FakeGraph) -> &'static str {
    let gone = "19:0deadbeef0000000000000000000000@thread.tacv2";
    graph
        .state
        .lock()
        .unwrap()
        .deleted_channels
        .push(gone.into());
    app.register_integration(json!({
        "id": "int-teams", "tenantId": "t1", "name": "Sales channels",
        "structuredData": {
            "providerName": "teams",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": graph.token_url(), "apiBaseUrl": graph.api_base(),
                           "teamId": TEAM, "channelIds": [gone, CHANNEL]},
            "entityMappings": [{
                "externalEntity": "channelMessage", "shardTypeId": "c_message", "nameField": "text",
                "fieldMappings": [{"source": "body.content", "target": "text"}]
            }]
        }
    }))
    .await;
    app.set_credentials("int-teams", &graph.credentials()).await;
    gone
}

#[tokio::test]
async fn a_deleted_channel_is_reported_and_the_team_s_other_channels_still_sync() {
    let app = TestApp::new();
    let graph = FakeGraph::start().await;
    graph.post_message(TEAM, CHANNEL, "Quarterly numbers are in");
    let gone = connect_with_a_deleted_channel(&app, &graph).await;
    let handler = app.host_handler().await;
    let body = json!({"integrationId": "int-teams", "tenantId": "t1", "jobType": "full_sync",
                      "provider": "teams", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z"});
    let message = service_bus_message("SyncInboundScheduled", &body.to_string(), "job-1", 1, None);
    handler.invoke("SyncInboundScheduled", &message).await;

    assert_eq!(names(&app, "c_message").await, ["Quarterly numbers are in"]);
    let history = app.history().await;
    let run = &history[0]["structuredData"];
    assert_eq!(run["status"], "partial", "{run}");
    let reported = run["errors"][0]["message"].as_str().unwrap();
    assert!(
        reported.contains(gone) && reported.contains("404"),
        "{reported}"
    );
}

#[tokio::test]
async fn a_channel_graph_will_not_watch_leaves_the_team_s_other_channels_subscribed() {
    let app = world();
    let graph = FakeGraph::start().await;
    let gone = connect_with_a_deleted_channel(&app, &graph).await;
    let _runtime = app.start_local().await;

    let out = app
        .cli(&[
            "integrations",
            "subscribe",
            "int-teams",
            "--tenant",
            "t1",
            "--json",
        ])
        .await;

    // The deleted channel is refused and said so; the one after it is watched all the same.
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(gone) && stderr.contains("404"), "{stderr}");
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["created"], 1, "{done}");
    let watched: Vec<String> = graph
        .subscriptions()
        .iter()
        .map(|s| s.resource.clone())
        .collect();
    assert_eq!(
        watched,
        [format!("/teams/{TEAM}/channels/{CHANNEL}/messages")]
    );
    let kept = &app.integration("int-teams").await["structuredData"]["subscriptions"];
    assert_eq!(kept.as_array().unwrap().len(), 1, "{kept}");
}

#[tokio::test]
async fn a_drive_changed_on_the_integration_is_the_one_its_next_sync_reads() {
    let app = TestApp::new();
    let graph = connected_drive(&app).await;
    graph.add_item(DRIVE, "budget.xlsx", false);
    let handler = app.host_handler().await;
    handler
        .run_sync("int-drive", "onedrive", "job-1", "full_sync")
        .await;
    assert_eq!(names(&app, "c_document").await, ["budget.xlsx"]);

    // The operator points the integration at the team's drive instead.
    let team_drive = "b!drive-2";
    graph.add_item(team_drive, "plan.docx", false);
    let mut moved = onedrive(&graph);
    moved["structuredData"]["connection"]["driveId"] = json!(team_drive);
    app.register_integration(moved).await;
    handler
        .run_sync("int-drive", "onedrive", "job-2", "incremental")
        .await;

    // The first drive's file is not in the drive the integration now reads.
    assert_eq!(names(&app, "c_document").await, ["plan.docx"]);
}

#[tokio::test]
async fn an_expired_drive_delta_rereads_the_drive_and_writes_only_what_changed() {
    let app = TestApp::new();
    let graph = connected_drive(&app).await;
    graph.load_items(DRIVE, 30);
    let handler = app.host_handler().await;
    let run = |job: &str, job_type: &str| {
        let body = json!({"integrationId": "int-drive", "tenantId": "t1", "jobType": job_type,
                          "provider": "onedrive", "jobId": job, "scheduledAt": "2026-11-22T10:00:00Z"});
        service_bus_message("SyncInboundScheduled", &body.to_string(), job, 1, None)
    };
    handler
        .invoke("SyncInboundScheduled", &run("job-1", "full_sync"))
        .await;

    // An item added and one deleted, both told only by the delta link Graph then lets go.
    let added = graph.add_item(DRIVE, "new.docx", false);
    let deleted = first_item(&app).await;
    graph.delete_item(DRIVE, &deleted);
    graph.state.lock().unwrap().expire_delta_tokens = true;
    handler
        .invoke("SyncInboundScheduled", &run("job-2", "incremental"))
        .await;

    let history = app.history().await;
    let second = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2")
        .unwrap();
    assert_eq!(second["structuredData"]["status"], "success", "{second}");
    assert_eq!(
        (
            &second["structuredData"]["stats"]["shardsCreated"],
            &second["structuredData"]["stats"]["shardsSkipped"]
        ),
        (&json!(1), &json!(29))
    );
    let documents = app.shards("c_document").await;
    assert_eq!(documents.len(), 30);
    let linked = |id: &str| {
        documents
            .iter()
            .any(|d| d["external_relationships"][0]["externalId"] == id)
    };
    assert!(linked(&added) && !linked(&deleted));
}

/// The external id of one synced document.
async fn first_item(app: &TestApp) -> String {
    app.shards("c_document").await[0]["external_relationships"][0]["externalId"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_first_read_whose_page_expired_between_jobs_starts_over_and_finishes() {
    let app = TestApp::new();
    let graph = connected_drive(&app).await;
    graph.load_items(DRIVE, 1_500);
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "500")]).await;
    let body = json!({"integrationId": "int-drive", "tenantId": "t1", "jobType": "full_sync",
                      "provider": "onedrive", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z"});
    let message = service_bus_message("SyncInboundScheduled", &body.to_string(), "job-1", 1, None);
    handler.invoke("SyncInboundScheduled", &message).await;

    // The continuation comes after Graph has let the enumeration's next page go.
    graph.state.lock().unwrap().expire_next_token = true;
    let mut jobs = 1;
    while let Some(next) = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap().pop() {
        assert!(jobs < 10, "the chain ends");
        handler.deliver("SyncInboundScheduled", &next).await;
        app.broker().delete_unlocked(next.sequence_number).unwrap();
        let history = app.history().await;
        let run = history
            .iter()
            .find(|r| r["structuredData"]["jobId"] == next.message_id.as_str())
            .unwrap();
        assert_ne!(run["structuredData"]["status"], "failed", "{run}");
        jobs += 1;
    }
    assert_eq!(app.shards("c_document").await.len(), 1_500);
}

#[tokio::test]
async fn an_item_mended_while_the_drive_is_paged_through_syncs_once_graph_lists_it_again() {
    let app = TestApp::new();
    let graph = connected_drive(&app).await;
    // Saved with no name, on the first page of the drive's enumeration, and named while the
    // client reads the first page: Graph lists it again on a later page of the same round.
    let unnamed = graph.add_item(DRIVE, "", false);
    graph.load_items(DRIVE, 1_500);
    graph.rename_item_after_pages(DRIVE, &unnamed, "minutes.docx", 1);
    let handler = app.host_handler().await;

    let body = json!({"integrationId": "int-drive", "tenantId": "t1", "jobType": "full_sync",
                      "provider": "onedrive", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z"});
    let message = service_bus_message("SyncInboundScheduled", &body.to_string(), "job-1", 1, None);
    handler.invoke("SyncInboundScheduled", &message).await;

    // The run is what the item's last listing says: the name it has now, no failure.
    let history = app.history().await;
    let run = &history[0]["structuredData"];
    assert_eq!(run["status"], "success", "{run}");
    assert_eq!(run["stats"]["shardsCreated"], 1_501, "{run}");
    assert_eq!(run["stats"]["shardsFailed"], 0, "{run}");
    // Its first listing, superseded, is counted as one within a page is: the counts add up.
    assert_eq!(run["stats"]["recordsFetched"], 1_502, "{run}");
    assert_eq!(run["stats"]["shardsSkipped"], 1, "{run}");
    assert!(run.get("errors").is_none(), "{run}");
    let shards = app.shards("c_document").await;
    assert_eq!(shards.len(), 1_501);
    assert!(
        shards.iter().any(|s| s["name"] == "minutes.docx"),
        "the mended item is synced"
    );
}

#[tokio::test]
async fn registering_a_graph_integration_without_a_public_url_says_webhooks_will_not_work() {
    let app = TestApp::new();
    let graph = FakeGraph::start().await;
    let file = app.path("drive.json");
    std::fs::write(&file, onedrive(&graph).to_string()).unwrap();

    let out = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;

    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("WEBHOOK_BASE_URL is not set: onedrive change notifications"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_subscription_made_while_another_run_maintained_from_an_older_read_keeps_its_secret() {
    let app = world();
    let graph = connected_drive(&app).await;
    // Graph checks the notification URL answers before it subscribes.
    let _runtime = app.start_local().await;
    // A token refresher's run read the integration before the operator subscribed it.
    let stale: handler::model::Shard =
        serde_json::from_value(app.integration("int-drive").await).unwrap();
    assert_eq!(subscribe(&app, "int-drive").await["created"], 1);
    let operators = graph.subscriptions()[0].clone();

    let settings = handler::settings::Settings::from_lookup(|name| match name {
        "FUNC_SYNC_DATA_DIR" => Some(app.data_dir().display().to_string()),
        "WEBHOOK_BASE_URL" | "WEBHOOK_FUNCTION_KEY" => Some(app.settings_value(name)),
        _ => None,
    })
    .unwrap();
    let backends = handler::app::LocalBackends::open(&settings).unwrap();
    let refresher = backends.app(settings, handler::app::providers());
    let integration: handler::model::Integration = stale.data().unwrap();
    let provider = refresher.providers.get("onedrive").unwrap();
    handler::engine::subscriptions::maintain(
        &refresher,
        &stale,
        &integration,
        provider.as_ref(),
        chrono::Utc::now(),
    )
    .await
    .unwrap();

    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(
        secrets.contains(operators.client_state.as_deref().unwrap()),
        "the operator's subscription still verifies"
    );
    // Two now watch the drive; the next maintenance leaves one.
    assert_eq!(graph.subscriptions().len(), 2);
    subscribe(&app, "int-drive").await;
    assert_eq!(graph.subscriptions().len(), 1);
    let state = &app.integration("int-drive").await["structuredData"];
    assert_eq!(
        state["subscriptions"].as_array().unwrap().len(),
        1,
        "{state}"
    );
}

#[tokio::test]
async fn subscriptions_made_before_the_function_key_was_rotated_are_made_again_with_the_new_one() {
    let mut app = world();
    let graph = connected_drive(&app).await;
    let runtime = app.start_local().await;
    subscribe(&app, "int-drive").await;
    let before = graph.subscriptions()[0].clone();
    runtime.kill_9().await;

    // The operator rotates the key the host admits deliveries by. Until the app answers at
    // the new key, Graph will not subscribe there, and the old subscription stays.
    app.set_setting("WEBHOOK_FUNCTION_KEY", "rotated-k3y");
    let refused = app
        .cli(&["integrations", "subscribe", "int-drive", "--tenant", "t1"])
        .await;
    assert!(!refused.status.success());
    assert_eq!(graph.subscriptions().len(), 1);
    assert_eq!(graph.subscriptions()[0].id, before.id);
    let _runtime = app.start_local().await;
    subscribe(&app, "int-drive").await;

    let now = graph.subscriptions();
    assert_eq!(now.len(), 1, "the old one is deleted");
    assert_ne!(now[0].id, before.id);
    assert!(
        now[0].notification_url.contains("code=rotated-k3y"),
        "{}",
        now[0].notification_url
    );
    let state = app.integration("int-drive").await.to_string();
    assert!(
        !state.contains("rotated-k3y"),
        "the key is not kept in the integration"
    );
}

/// The vault as one instance of the app sees it: Key Vault's client keeps what it read for a
/// minute, so a secret another instance wrote meanwhile is seen only by a read made afresh.
struct InstanceVault {
    vault: Arc<dyn SecretStore>,
    read: Mutex<HashMap<String, Option<Secret>>>,
}

#[async_trait]
impl SecretStore for InstanceVault {
    async fn get(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        if let Some(read) = self.read.lock().unwrap().get(name) {
            return Ok(read.clone());
        }
        self.get_fresh(name).await
    }

    async fn get_fresh(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        let secret = self.vault.get_fresh(name).await?;
        self.read
            .lock()
            .unwrap()
            .insert(name.to_string(), secret.clone());
        Ok(secret)
    }

    async fn set(&self, name: &str, value: Secret) -> Result<(), SecretsError> {
        self.vault.set(name, value.clone()).await?;
        self.read
            .lock()
            .unwrap()
            .insert(name.to_string(), Some(value));
        Ok(())
    }
}

#[tokio::test]
async fn a_notification_of_a_subscription_another_instance_made_moments_ago_is_put_off_not_refused()
{
    let front_door = format!("127.0.0.1:{}", free_port());
    let mut app = TestApp::with_settings(&[("WEBHOOK_BASE_URL", &format!("http://{front_door}"))]);
    let graph = connected_drive(&app).await;
    let file = graph.add_item(DRIVE, "budget.xlsx", false);
    // One instance's webhook receiver, its reads of the vault kept as Key Vault's client
    // keeps them.
    let mut instance = app.app(&[]);
    instance.secrets = Arc::new(InstanceVault {
        vault: instance.secrets.clone(),
        read: Mutex::default(),
    });
    let invoker = Invoker::new(handler::server::router(instance));
    let listener = tokio::net::TcpListener::bind(&front_door).await.unwrap();
    let receiver = tokio::spawn(async move {
        axum::serve(listener, front_door::router(&invoker, None, None)).await
    });
    assert_eq!(subscribe(&app, "int-drive").await["created"], 1);
    let first = graph.subscriptions()[0].id.clone();
    // A forgery has the instance read the vault afresh, and is refused.
    let (status, body) = graph
        .notify(&first, "updated", &file, Some("guessed"))
        .await;
    assert_eq!(status, 403, "{body}");

    // Moments later another instance makes the subscription anew, at a new URL.
    app.set_setting("WEBHOOK_FUNCTION_KEY", "rotated-k3y");
    assert_eq!(subscribe(&app, "int-drive").await["created"], 1);
    let second = graph.subscriptions()[0].id.clone();
    assert_ne!(second, first);
    let (status, body) = graph.notify(&second, "updated", &file, None).await;

    assert_eq!(
        status, 503,
        "Graph does not deliver again after a 4xx, but does after a 503: {body}"
    );
    assert!(body.contains("deliver it again"), "{body}");
    assert!(
        app.broker()
            .peek(handler::queue::SYNC_INBOUND_WEBHOOK)
            .unwrap()
            .is_empty()
    );
    receiver.abort();
}
