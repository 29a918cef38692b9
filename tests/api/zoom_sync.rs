//! Zoom stories beyond the conformance suite: replayed deliveries, recordings by month
//! windows and their deletion by webhook, Server-to-Server apps, and Zoom itself delivering to
//! the local runtime.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};

use handler::queue::{SYNC_DEADLETTER, SYNC_INBOUND_SCHEDULED, SYNC_INBOUND_WEBHOOK};
use handler::store::ShardStore;

use crate::fake_host::{HostedHandler, service_bus_message};
use crate::fake_zoom::FakeZoom;
use crate::helpers::{TestApp, wait_until};

const ID: &str = "int-zoom";

fn integration(zoom: &FakeZoom, since: &str) -> Value {
    json!({
        "id": ID, "tenantId": "t1", "name": "Contoso Zoom",
        "structuredData": {
            "providerName": "zoom",
            "syncFrequency": {"type": "manual"},
            "connection": {"tokenUrl": zoom.token_url(), "apiBaseUrl": zoom.api_base(),
                           "recordingsSince": since},
            "entityMappings": [
                {"externalEntity": "meetings", "shardTypeId": "c_meeting", "nameField": "topic",
                 "fieldMappings": [{"source": "topic", "target": "topic", "required": true},
                                   {"source": "start_time", "target": "starts_at"}]},
                {"externalEntity": "recordings", "shardTypeId": "c_recording", "nameField": "topic",
                 "fieldMappings": [{"source": "topic", "target": "topic", "required": true},
                                   {"source": "recording_count", "target": "files"}]}
            ]
        }
    })
}

async fn connected() -> (FakeZoom, TestApp) {
    let zoom = FakeZoom::start().await;
    let app = TestApp::new();
    let since = (Utc::now() - chrono::Duration::days(60))
        .format("%Y-%m-%d")
        .to_string();
    app.register_integration(integration(&zoom, &since)).await;
    app.set_credentials(ID, &zoom.credentials()).await;
    (zoom, app)
}

async fn run_job(handler: &HostedHandler, job_id: &str) {
    handler.run_sync(ID, "zoom", job_id, "full_sync").await;
}

async fn post(handler: &HostedHandler, (headers, body): &(Vec<(String, String)>, String)) -> Value {
    handler
        .post_webhook("zoom", &[("integration", ID)], headers, body)
        .await
}

#[tokio::test]
async fn a_delivery_signed_more_than_five_minutes_ago_is_refused_as_a_replay() {
    let (zoom, app) = connected().await;
    let meeting = zoom.add_meeting("Board review");
    let handler = app.host_handler().await;

    let old = zoom.webhook_at(
        "meeting.deleted",
        json!({"id": meeting.parse::<u64>().unwrap()}),
        Utc::now() - chrono::Duration::minutes(6),
    );
    let out = post(&handler, &old).await;

    assert_eq!(out["statusCode"], 403, "{out}");
    assert!(out["body"].as_str().unwrap().contains("replay"), "{out}");
    assert!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().is_empty());
}

#[tokio::test]
async fn a_delivery_for_an_integration_castiel_left_invalid_is_refused_without_its_details() {
    let zoom = FakeZoom::start().await;
    let app = TestApp::new();
    let mut broken = integration(&zoom, "2026-01-01");
    // Written by Castiel itself, with a schedule no integration can have.
    broken["structuredData"]["syncFrequency"] = json!({"type": "sometimes", "secret-ish": 7});
    app.plant_integration(broken).await;
    let meeting = zoom.add_meeting("Board review");
    let handler = app.host_handler().await;

    let out = post(
        &handler,
        &zoom.webhook(
            "meeting.updated",
            json!({"id": meeting.parse::<u64>().unwrap()}),
        ),
    )
    .await;

    assert_eq!(out["statusCode"], 409, "{out}");
    let reason = out["body"].as_str().unwrap();
    assert!(reason.contains("configuration is invalid"), "{reason}");
    assert!(
        !reason.contains("sometimes"),
        "the details stay in the log: {reason}"
    );
}

#[tokio::test]
async fn an_occurrence_of_a_recurring_meeting_deleted_leaves_the_meeting() {
    let (zoom, app) = connected().await;
    let meeting = zoom.add_meeting("Weekly sync");
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;

    let one_week = zoom.webhook(
        "meeting.deleted",
        json!({"id": meeting.parse::<u64>().unwrap(), "topic": "Weekly sync",
               "occurrences": [{"occurrence_id": "1765184400000", "start_time": "2026-12-08T09:00:00Z"}]}),
    );
    assert_eq!(post(&handler, &one_week).await["statusCode"], 200);
    app.deliver_webhook_jobs(&handler).await;
    let meetings = app.shards("c_meeting").await;
    assert_eq!(meetings.len(), 1, "the series goes on");
    assert_eq!(meetings[0]["name"], "Weekly sync");
}

#[tokio::test]
async fn recordings_are_read_month_by_month_and_a_trashed_one_goes_away() {
    let (zoom, app) = connected().await;
    let old = zoom.add_recording("Kick-off", Utc::now() - chrono::Duration::days(45));
    zoom.add_recording("Weekly sync", Utc::now() - chrono::Duration::days(2));
    let handler = app.host_handler().await;

    run_job(&handler, "job-1").await;

    let mut topics: Vec<String> = app
        .shards("c_recording")
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    topics.sort();
    assert_eq!(topics, ["Kick-off", "Weekly sync"]);
    let windows: Vec<String> = zoom
        .requests()
        .into_iter()
        .filter(|r| r.contains("/recordings"))
        .collect();
    assert_eq!(
        windows.len(),
        2,
        "60 days in windows of at most 30: {windows:?}"
    );

    zoom.trash_recording(&old);
    let trashed = zoom.webhook(
        "recording.trashed",
        json!({"uuid": old, "topic": "Kick-off"}),
    );
    assert_eq!(post(&handler, &trashed).await["statusCode"], 200);
    app.deliver_webhook_jobs(&handler).await;
    let left: Vec<Value> = app.shards("c_recording").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["name"], "Weekly sync");
}

#[tokio::test]
async fn two_recordings_of_one_recurring_meeting_trashed_at_once_both_go_away() {
    let (zoom, app) = connected().await;
    let first = zoom.add_recording("Weekly sync", Utc::now() - chrono::Duration::days(2));
    let second = zoom.add_recording("Weekly sync", Utc::now() - chrono::Duration::days(1));
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    assert_eq!(app.shards("c_recording").await.len(), 2);

    // Both instances of one meeting id, trashed in one go: one event time.
    let at = Utc::now();
    for uuid in [&first, &second] {
        zoom.trash_recording(uuid);
        let trashed = zoom.webhook_at(
            "recording.trashed",
            json!({"uuid": uuid, "id": 85_000_000_001_u64, "topic": "Weekly sync"}),
            at,
        );
        assert_eq!(post(&handler, &trashed).await["statusCode"], 200);
    }
    app.deliver_webhook_jobs(&handler).await;

    assert!(app.shards("c_recording").await.is_empty());
}

#[tokio::test]
async fn a_recording_taken_back_from_the_trash_or_renamed_long_after_is_read_again() {
    let (zoom, app) = connected().await;
    let old = zoom.add_recording("Kick-off", Utc::now() - chrono::Duration::days(45));
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    let deliver = |event: &'static str, topic: &'static str| {
        let (zoom, app, handler, old) = (&zoom, &app, &handler, old.clone());
        async move {
            let delivery = zoom.webhook(event, json!({"uuid": old, "id": 1, "topic": topic}));
            assert_eq!(post(handler, &delivery).await["statusCode"], 200);
            let broker = app.broker();
            for message in broker.peek(SYNC_INBOUND_WEBHOOK).unwrap() {
                handler.deliver("SyncInboundWebhook", &message).await;
                broker.delete_unlocked(message.sequence_number).unwrap();
            }
        }
    };
    zoom.trash_recording(&old);
    deliver("recording.trashed", "Kick-off").await;
    assert!(app.shards("c_recording").await.is_empty());

    // Taken back from the trash a month and a half after the meeting: no sync's window
    // lists it again.
    zoom.recover_recording(&old);
    deliver("recording.recovered", "Kick-off").await;
    let back = app.shards("c_recording").await;
    assert_eq!(back.len(), 1, "the recording is back");
    assert_eq!(back[0]["name"], "Kick-off");

    zoom.rename_recording(&old, "Project kick-off");
    deliver("recording.renamed", "Project kick-off").await;
    assert_eq!(
        app.shards("c_recording").await[0]["name"],
        "Project kick-off"
    );

    // Zoom retries the trashed event it sent before the recording came back: it is read, not
    // believed.
    deliver("recording.trashed", "Kick-off").await;
    assert_eq!(app.shards("c_recording").await.len(), 1, "still there");
}

#[tokio::test]
async fn a_recording_ready_days_after_its_meeting_arrives_with_its_completed_event() {
    let (zoom, app) = connected().await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    assert!(app.shards("c_recording").await.is_empty());

    // Processed three days after the meeting began: behind the window a sync reads now.
    let late = zoom.add_recording("Board review", Utc::now() - chrono::Duration::days(3));
    let completed = zoom.webhook(
        "recording.completed",
        json!({"uuid": late, "id": 2, "topic": "Board review"}),
    );
    assert_eq!(post(&handler, &completed).await["statusCode"], 200);
    app.deliver_webhook_jobs(&handler).await;

    let recordings = app.shards("c_recording").await;
    assert_eq!(recordings.len(), 1, "{recordings:?}");
    assert_eq!(recordings[0]["name"], "Board review");
}

#[tokio::test]
async fn a_colleagues_meeting_an_account_wide_app_is_told_of_stays_out_of_castiel() {
    let (zoom, app) = connected().await;
    zoom.state.lock().unwrap().app_scopes = "meeting:read recording:read user:read";
    let handler = app.host_handler().await;
    let own = zoom.add_meeting("Pipeline review");
    let colleagues = zoom.add_colleague_meeting("Recruiting sync");

    for meeting in [&own, &colleagues] {
        let created = zoom.webhook(
            "meeting.created",
            json!({"id": meeting.parse::<u64>().unwrap()}),
        );
        assert_eq!(post(&handler, &created).await["statusCode"], 200);
    }
    app.deliver_webhook_jobs(&handler).await;

    let meetings = app.shards("c_meeting").await;
    assert_eq!(meetings.len(), 1, "{meetings:?}");
    assert_eq!(meetings[0]["name"], "Pipeline review");
    // Nor is the user's own meeting taken for the colleague's and deleted by the next sync.
    run_job(&handler, "job-1").await;
    assert_eq!(app.shards("c_meeting").await.len(), 1);
    let users = zoom
        .requests()
        .into_iter()
        .filter(|r| r.ends_with("/users/me"))
        .count();
    assert_eq!(
        users, 2,
        "the user's id is asked once, and again before a meeting is taken for another's"
    );
}

#[tokio::test]
async fn an_app_not_granted_user_read_still_syncs_what_it_is_told_of() {
    let (zoom, app) = connected().await;
    let handler = app.host_handler().await;
    let own = zoom.add_meeting("Pipeline review");

    let created = zoom.webhook(
        "meeting.created",
        json!({"id": own.parse::<u64>().unwrap()}),
    );
    assert_eq!(post(&handler, &created).await["statusCode"], 200);
    app.deliver_webhook_jobs(&handler).await;

    let meetings = app.shards("c_meeting").await;
    assert_eq!(meetings.len(), 1, "{:?}", app.history().await);
    assert_eq!(
        app.history().await[0]["structuredData"]["status"],
        "success"
    );
}

#[tokio::test]
async fn an_event_of_an_entity_the_integration_does_not_sync_is_acknowledged_and_passed_over() {
    let zoom = FakeZoom::start().await;
    let app = TestApp::new();
    let mut meetings_only = integration(&zoom, "2026-11-01");
    meetings_only["structuredData"]["entityMappings"]
        .as_array_mut()
        .unwrap()
        .truncate(1);
    app.register_integration(meetings_only).await;
    app.set_credentials(ID, &zoom.credentials()).await;
    let handler = app.host_handler().await;
    let recording = zoom.add_recording("Board review", Utc::now() - chrono::Duration::days(1));

    let completed = zoom.webhook(
        "recording.completed",
        json!({"uuid": recording, "id": 2, "topic": "Board review"}),
    );

    assert_eq!(post(&handler, &completed).await["statusCode"], 200);
    assert!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().is_empty());
    app.deliver_webhook_jobs(&handler).await;
    assert!(app.history().await.is_empty(), "no failed run");
    assert!(app.broker().peek(SYNC_DEADLETTER).unwrap().is_empty());
}

#[tokio::test]
async fn a_server_to_server_app_syncs_with_account_credentials() {
    let zoom = FakeZoom::start().await;
    zoom.load_meetings(3);
    let app = TestApp::new();
    let mut file = integration(&zoom, "2026-11-01");
    file["structuredData"]["connection"]["accountId"] = json!(crate::fake_zoom::ACCOUNT_ID);
    app.register_integration(file).await;
    let mut credentials = zoom.account_credentials();
    credentials.as_object_mut().unwrap().remove("account_id");
    app.set_credentials(ID, &credentials).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1").await;

    assert_eq!(app.shards("c_meeting").await.len(), 3);
    let state = zoom.state.lock().unwrap();
    assert_eq!((state.account_grants, state.token_refreshes), (1, 0));
}

#[tokio::test]
async fn zoom_validates_the_endpoint_and_delivers_to_the_local_runtime() {
    let (zoom, app) = connected().await;
    let meeting = zoom.add_meeting("Design review");
    let runtime = app.start_local().await;
    let url = format!("http://{}/api/webhooks/zoom?integration={ID}", runtime.addr);

    let (challenge, expected) = zoom.url_validation();
    let (status, answer) = zoom.deliver(&url, &challenge).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap(), expected);

    let created = zoom.webhook(
        "meeting.created",
        json!({"id": meeting.parse::<u64>().unwrap()}),
    );
    let (status, _) = zoom.deliver(&url, &created).await;
    assert_eq!(status, 200, "answered within Zoom's three seconds");
    wait_until(
        "the meeting is a shard",
        Duration::from_secs(30),
        || async { app.shards("c_meeting").await.len() == 1 },
    )
    .await;
}

#[tokio::test]
async fn a_proxy_page_in_place_of_a_listing_deletes_nothing() {
    let (zoom, app) = connected().await;
    zoom.add_meeting("Weekly planning");
    zoom.add_meeting("Offsite");
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;

    // A 200 that is not Zoom's answer: read as an empty listing, it would delete both.
    zoom.state.lock().unwrap().proxy_pages = 1;
    run_job(&handler, "job-2").await;

    assert_eq!(app.shards("c_meeting").await.len(), 2);
    let history = app.history().await;
    let second = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2")
        .unwrap();
    assert_eq!(second["structuredData"]["status"], "success", "{second}");
    assert_eq!(
        second["structuredData"]["stats"]["shardsUpdated"], 0,
        "{second}"
    );
}

#[tokio::test]
async fn a_meeting_handed_to_a_colleague_keeps_its_shard_and_only_a_deleted_one_goes() {
    let (zoom, app) = connected().await;
    let handed = zoom.add_meeting("Quarterly review");
    let cancelled = zoom.add_meeting("Offsite");
    zoom.add_meeting("Weekly planning");
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    assert_eq!(app.shards("c_meeting").await.len(), 3);

    // One meeting is handed to a colleague, so the user's listing leaves it out as it leaves
    // out the one cancelled; Zoom still has the first.
    zoom.state
        .lock()
        .unwrap()
        .meetings
        .get_mut(&handed.parse::<u64>().unwrap())
        .unwrap()
        .host_id = "colleague-0000000000001".into();
    zoom.delete_meeting(&cancelled);
    run_job(&handler, "job-2").await;

    let live: Vec<String> = app
        .shards("c_meeting")
        .await
        .iter()
        .filter(|s| s["deletedAt"].is_null())
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.contains(&"Quarterly review".to_string()), "{live:?}");
    assert!(!live.contains(&"Offsite".to_string()), "{live:?}");
}

#[tokio::test]
async fn a_meeting_deleted_without_a_webhook_is_reconciled_by_the_next_sync() {
    let (zoom, app) = connected().await;
    let kept = zoom.add_meeting("Weekly planning");
    let cancelled = zoom.add_meeting("Offsite");
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    assert_eq!(app.shards("c_meeting").await.len(), 2);

    // The webhook that would have said so never came.
    zoom.delete_meeting(&cancelled);
    run_job(&handler, "job-2").await;

    let meetings = app.shards("c_meeting").await;
    assert_eq!(meetings.len(), 1);
    assert_eq!(
        meetings[0]["external_relationships"][0]["externalId"],
        kept.as_str()
    );
    let gone = app
        .cli_json(&[
            "shards",
            "--tenant",
            "t1",
            "--type",
            "c_meeting",
            "--external-id",
            &cancelled,
        ])
        .await;
    assert!(gone.as_array().unwrap().is_empty(), "soft-deleted: {gone}");
    let history = app.history().await;
    let second = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2")
        .unwrap();
    assert_eq!(
        second["structuredData"]["stats"]["shardsUpdated"], 1,
        "{second}"
    );
}

#[tokio::test]
async fn a_meeting_held_weeks_ago_keeps_its_shard_once_zoom_no_longer_lists_it() {
    let (zoom, app) = connected().await;
    let kickoff = zoom.schedule_meeting("Kickoff", Utc::now() - chrono::Duration::days(20));
    let review = zoom.schedule_meeting("Review", Utc::now() - chrono::Duration::days(2));
    let offsite = zoom.schedule_meeting("Offsite", Utc::now() + chrono::Duration::days(20));
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    assert_eq!(app.shards("c_meeting").await.len(), 3);

    // Eleven days on, the kickoff has expired: Zoom lists it no more and says it does not
    // exist, as it would of a deleted one. The review, held two days ago, and the offsite,
    // still to come, were deleted, and their webhooks lost: only the offsite is told from an
    // expired meeting by its absence.
    zoom.let_days_pass(11);
    zoom.delete_meeting(&review);
    zoom.delete_meeting(&offsite);
    run_job(&handler, "job-2").await;

    let mut kept = vec![kickoff, review];
    kept.sort();
    assert_eq!(synced_meetings(&app).await, kept);
}

#[tokio::test]
async fn a_meeting_synced_before_zoom_said_how_long_it_lists_it_is_not_taken_for_deleted() {
    let (zoom, app) = connected().await;
    let kickoff = zoom.schedule_meeting("Kickoff", Utc::now() - chrono::Duration::days(20));
    let handler = app.host_handler().await;
    run_job(&handler, "job-1").await;
    // As a shard synced by an engine that kept no such time has it.
    let shard_id = format!("{ID}~meetings~{kickoff}");
    let mut shard = app
        .store()
        .get("t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    shard.external_relationships[0].listed_until = None;
    app.store().upsert(&shard).await.unwrap();

    zoom.let_days_pass(11);
    run_job(&handler, "job-2").await;

    assert_eq!(synced_meetings(&app).await, [kickoff]);
}

#[tokio::test]
async fn meetings_gone_from_anywhere_in_a_long_listing_are_all_reconciled() {
    let (zoom, app) = connected().await;
    zoom.load_meetings(2_500);
    // The listing is read whole by one job, as reconciling it needs.
    let handler = app
        .host_handler_with(&[("SYNC_MAX_RECORDS", "10000")])
        .await;
    run_job(&handler, "job-1").await;
    let synced = synced_meetings(&app).await;
    assert_eq!(synced.len(), 2_500);

    // The shards are reconciled a thousand at a time, in id order: one goes from each end and
    // one from the middle of that order.
    let cancelled = cancel(&zoom, &synced, &[0, 1_200, 2_499]);
    run_job(&handler, "job-2").await;

    let left = synced_meetings(&app).await;
    assert_eq!(left.len(), 2_497);
    assert!(cancelled.iter().all(|id| !left.contains(id)));
    let history = app.history().await;
    let second = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2")
        .unwrap();
    assert_eq!(second["structuredData"]["stats"]["shardsUpdated"], 3);
}

/// Runs `job_id` and every continuation job it hands the rest of the listing to, as the
/// queue delivers them; returns how many jobs ran.
async fn run_job_to_the_end(app: &TestApp, handler: &HostedHandler, job_id: &str) -> usize {
    run_job(handler, job_id).await;
    let broker = app.broker();
    let mut jobs = 1;
    while let Some(continuation) = broker
        .receive_at(SYNC_INBOUND_SCHEDULED, Utc::now())
        .unwrap()
    {
        handler.deliver("SyncInboundScheduled", &continuation).await;
        broker.complete(&continuation).unwrap();
        jobs += 1;
    }
    jobs
}

#[tokio::test]
async fn meetings_gone_from_a_listing_read_over_several_jobs_are_reconciled() {
    let (zoom, app) = connected().await;
    zoom.load_meetings(2_500);
    // A job stops after a thousand records and a continuation job goes on from its checkpoint.
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "1000")]).await;
    assert_eq!(run_job_to_the_end(&app, &handler, "job-1").await, 3);
    let synced = synced_meetings(&app).await;
    assert_eq!(synced.len(), 2_500);

    // One meeting goes from the part each of the three jobs lists.
    let cancelled = cancel(&zoom, &synced, &[0, 1_200, 2_499]);
    assert_eq!(run_job_to_the_end(&app, &handler, "job-2").await, 3);

    let left = synced_meetings(&app).await;
    assert_eq!(left.len(), 2_497);
    assert!(cancelled.iter().all(|id| !left.contains(id)));
    // The job that read the listing's end reconciled what the three jobs listed.
    let history = app.history().await;
    let last = history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == "job-2+2")
        .unwrap();
    assert_eq!(
        last["structuredData"]["stats"]["shardsUpdated"], 3,
        "{last}"
    );
    assert!(
        app.integration(ID).await["structuredData"]
            .get("checkpoints")
            .is_none()
    );
}

#[tokio::test]
async fn a_listing_resumed_after_its_pages_expired_reconciles_nothing() {
    let (zoom, app) = connected().await;
    zoom.load_meetings(1_500);
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "1000")]).await;
    assert_eq!(run_job_to_the_end(&app, &handler, "job-1").await, 2);
    cancel(&zoom, &synced_meetings(&app).await, &[0]);

    // The next listing's first job stops at the limit, and the rest waits eight days: the
    // pages it stored are gone by then.
    run_job(&handler, "job-2").await;
    let store = app.store();
    let purged = store
        .purge_expired(Utc::now() + chrono::Duration::days(8))
        .unwrap();
    assert!(purged > 0);
    let broker = app.broker();
    let continuation = broker
        .receive_at(SYNC_INBOUND_SCHEDULED, Utc::now())
        .unwrap()
        .unwrap();
    handler.deliver("SyncInboundScheduled", &continuation).await;

    // Half a listing cannot tell what is gone: every meeting it did not see stays, the one
    // cancelled too, until a listing is read whole again.
    assert_eq!(app.shards("c_meeting").await.len(), 1_500);
    assert!(
        app.integration(ID).await["structuredData"]
            .get("checkpoints")
            .is_none()
    );
    run_job_to_the_end(&app, &handler, "job-3").await;
    assert_eq!(app.shards("c_meeting").await.len(), 1_499);
}

#[tokio::test]
async fn a_listing_whose_page_token_expired_starts_over_without_the_pages_it_had() {
    let (zoom, app) = connected().await;
    zoom.load_meetings(1_500);
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "1000")]).await;
    assert_eq!(run_job_to_the_end(&app, &handler, "job-1").await, 2);
    let synced = synced_meetings(&app).await;
    let before = cancel(&zoom, &synced, &[0]);

    // The listing's first job stores its pages (`during` among them) and stops at the limit;
    // then `during` is cancelled and the page token the checkpoint holds expires.
    run_job(&handler, "job-2").await;
    let during = cancel(&zoom, &synced, &[1]);
    let store = app.store();
    let mut integration = store.get("t1", ID).await.unwrap().unwrap().value;
    integration.structured_data["checkpoints"]["meetings"]["pageToken"] = json!("expired");
    store.upsert(&integration).await.unwrap();
    let broker = app.broker();
    while let Some(continuation) = broker
        .receive_at(SYNC_INBOUND_SCHEDULED, Utc::now())
        .unwrap()
    {
        handler.deliver("SyncInboundScheduled", &continuation).await;
        broker.complete(&continuation).unwrap();
    }

    // The listing began again, and only what it listed counts: both meetings are gone.
    let left = synced_meetings(&app).await;
    assert_eq!(left.len(), 1_498);
    assert!(!left.contains(&before[0]) && !left.contains(&during[0]));
}

#[tokio::test]
async fn a_listing_killed_mid_way_resumes_and_reconciles_only_what_is_gone() {
    let (zoom, app) = connected().await;
    zoom.load_meetings(1_000);
    // Each job reads the listing whole, unless it is killed.
    let unlimited = [("SYNC_MAX_RECORDS", "10000")];
    let first = app.host_handler_with(&unlimited).await;
    run_job(&first, "job-1").await;
    let cancelled = cancel(&zoom, &synced_meetings(&app).await, &[10, 990]);

    // The next listing is held at its second page, once the first is checkpointed, and the
    // handler is killed there.
    {
        let mut state = zoom.state.lock().unwrap();
        state.throttle = Some((usize::MAX, 20));
        state.throttle_after = Some(1);
    }
    let job = json!({"integrationId": ID, "tenantId": "t1", "jobType": "full_sync",
                     "provider": "zoom", "jobId": "job-2", "scheduledAt": "2026-11-22T10:00:00Z"});
    let delivery = first.invoke_in_background(
        "SyncInboundScheduled",
        &service_bus_message("SyncInboundScheduled", &job.to_string(), "job-2", 1, None),
    );
    wait_until(
        "the listing's first page is checkpointed",
        Duration::from_secs(30),
        || async {
            app.integration(ID).await["structuredData"]["checkpoints"]["meetings"]["listing"]
                .is_object()
        },
    )
    .await;
    first.kill_9().await;
    let _ = delivery.await;
    {
        let mut state = zoom.state.lock().unwrap();
        state.throttle = None;
        state.throttle_after = None;
    }

    // The message comes again, to a new handler: it reads the rest of the listing, and the
    // first page the killed one read counts too.
    let second = app.host_handler_with(&unlimited).await;
    let again = service_bus_message("SyncInboundScheduled", &job.to_string(), "job-2", 2, None);
    assert!(
        second
            .invoke("SyncInboundScheduled", &again)
            .await
            .host_accepts()
    );
    let left = synced_meetings(&app).await;
    assert_eq!(left.len(), 998);
    assert!(cancelled.iter().all(|id| !left.contains(id)));
}

/// The ids at Zoom of the meetings that have a live shard, in the order of the shards' ids.
async fn synced_meetings(app: &TestApp) -> Vec<String> {
    let mut ids: Vec<String> = app
        .shards("c_meeting")
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.iter()
        .map(|id| id.rsplit('~').next().unwrap().to_string())
        .collect()
}

/// Cancels the meetings at `places` in `synced` at Zoom; returns their ids.
fn cancel(zoom: &FakeZoom, synced: &[String], places: &[usize]) -> Vec<String> {
    let ids: Vec<String> = places.iter().map(|&i| synced[i].clone()).collect();
    for id in &ids {
        zoom.delete_meeting(id);
    }
    ids
}

#[tokio::test]
async fn who_attended_past_meetings_is_synced_window_by_window() {
    let zoom = FakeZoom::start().await;
    let recent = zoom.add_past_meeting("Pipeline review", Utc::now() - chrono::Duration::days(3));
    zoom.add_participant(&recent, "Ann Lee", "ann@contoso.test");
    zoom.add_participant(&recent, "Bo Chen", "bo@contoso.test");
    let older = zoom.add_past_meeting(
        "Quarterly kick-off",
        Utc::now() - chrono::Duration::days(45),
    );
    zoom.add_participant(&older, "Cy Diaz", "cy@contoso.test");
    let app = TestApp::new();
    let since = (Utc::now() - chrono::Duration::days(60))
        .format("%Y-%m-%d")
        .to_string();
    let mut file = integration(&zoom, &since);
    file["structuredData"]["entityMappings"] = json!([{
        "externalEntity": "participants", "shardTypeId": "c_attendance", "nameField": "name",
        "fieldMappings": [{"source": "name", "target": "name", "required": true},
                          {"source": "user_email", "target": "email"},
                          {"source": "meeting_uuid", "target": "meeting"}]
    }]);
    app.register_integration(file).await;
    app.set_credentials(ID, &zoom.credentials()).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1").await;

    let mut attended: Vec<(String, String)> = app
        .shards("c_attendance")
        .await
        .iter()
        .map(|s| {
            let data = &s["structuredData"];
            (
                data["name"].as_str().unwrap().to_string(),
                data["meeting"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    attended.sort();
    assert_eq!(
        attended,
        [
            ("Ann Lee".to_string(), recent.clone()),
            ("Bo Chen".to_string(), recent.clone()),
            ("Cy Diaz".to_string(), older.clone())
        ]
    );
    let windows = zoom
        .requests()
        .into_iter()
        .filter(|r| r.contains("/report/users/"))
        .count();
    assert_eq!(windows, 2, "60 days in windows of at most 30");
    let cursor = &app.integration(ID).await["structuredData"]["cursors"]["participants"];
    assert_eq!(
        cursor,
        &json!(
            (Utc::now() - chrono::Duration::days(1))
                .format("%Y-%m-%d")
                .to_string()
        )
    );
}

#[tokio::test]
async fn zoom_is_answered_in_time_though_the_event_topic_is_busy() {
    let (zoom, app) = connected().await;
    let meeting = zoom.add_meeting("Board review");
    let event_grid = crate::fake_azure::FakeEventGrid::start("topic-key-1").await;
    *event_grid.busy.lock().unwrap() = vec![(429, Some(5)); 4];
    let handler = app
        .host_handler_with(&[
            ("EVENTGRID_ENDPOINT", event_grid.endpoint.as_str()),
            ("EVENTGRID_KEY", "topic-key-1"),
        ])
        .await;
    let updated = zoom.webhook(
        "meeting.updated",
        json!({"id": meeting.parse::<u64>().unwrap(), "topic": "Board review, moved"}),
    );

    let started = std::time::Instant::now();
    let out = post(&handler, &updated).await;

    assert_eq!(out["statusCode"], 200, "{out}");
    // Zoom takes an answer later than three seconds for a failed delivery.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().len(), 1);
}

#[tokio::test]
async fn recordings_since_a_day_still_to_come_in_utc_sync_nothing_yet_and_fail_nothing() {
    let zoom = FakeZoom::start().await;
    zoom.add_meeting("Design review");
    let app = TestApp::new();
    // Registered at 09:00 in Sydney on the day it names: still the day before in UTC.
    let tomorrow = (Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    app.register_integration(integration(&zoom, &tomorrow))
        .await;
    app.set_credentials(ID, &zoom.credentials()).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1").await;

    let record = app
        .history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == "job-1")
        .unwrap();
    assert_eq!(record["structuredData"]["status"], "success", "{record}");
    assert_eq!(
        app.shards("c_meeting").await.len(),
        1,
        "meetings are listed as ever"
    );
    assert!(app.shards("c_recording").await.is_empty());
    let cursors = &app.integration(ID).await["structuredData"]["cursors"];
    assert!(
        cursors.get("recordings").is_none(),
        "the setting is read again next time: {cursors}"
    );
}

#[tokio::test]
async fn two_tenants_zoom_integrations_of_one_id_each_take_their_own_deliveries() {
    let (zoom, app) = connected().await;
    let meeting = zoom.add_meeting("Board review");
    // Tenant t2 chose the same id for its own Zoom account, with its own secret token.
    let since = (Utc::now() - chrono::Duration::days(60))
        .format("%Y-%m-%d")
        .to_string();
    let mut other = integration(&zoom, &since);
    other["tenantId"] = json!("t2");
    app.register_integration(other).await;
    let mut credentials = zoom.credentials();
    credentials["webhook_secret_token"] = json!("t2-zoom-secret-token");
    app.set_credentials_of("t2", ID, &credentials).await;
    let handler = app.host_handler().await;

    let updated = zoom.webhook(
        "meeting.updated",
        json!({"id": meeting.parse::<u64>().unwrap(), "topic": "Board review, moved"}),
    );
    let out = post(&handler, &updated).await;

    assert_eq!(out["statusCode"], 200, "{out}");
    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    assert_eq!(queued.len(), 1);
    let job: Value = serde_json::from_slice(&queued[0].body).unwrap();
    assert_eq!(job["tenantId"], "t1", "the tenant whose secret signed it");
}
