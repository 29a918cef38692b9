//! Rotating refresh tokens: refreshed once for everyone, stored before use, and never spent by
//! two jobs of one integration at once.

use std::sync::Arc;

use chrono::{Duration, Utc};
use futures_util::future::join_all;
use serde_json::{Value, json};

use adapters::salesforce::Salesforce;
use adapters::{Connection, FetchRequest, Pull};
use handler::engine::credentials::StoredCredentials;
use handler::queue::SYNC_INBOUND_SCHEDULED;

use crate::fake_host::service_bus_message;
use crate::fake_salesforce::FakeSalesforce;
use crate::helpers::{TestApp, salesforce_integration};

/// An org of `accounts` accounts whose refresh tokens rotate, and an integration of tenant `t1`
/// connected to it.
async fn rotating_org(app: &TestApp, accounts: usize) -> FakeSalesforce {
    let fake = FakeSalesforce::start().await;
    fake.load(
        "Account",
        (0..accounts).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}")}),
                Utc::now() - Duration::days(1),
            )
        }),
    );
    fake.org.lock().unwrap().rotate_refresh_tokens = true;
    let mut integration = salesforce_integration("int-acme-sf");
    integration["structuredData"]["connection"] = json!({"loginHost": fake.url});
    integration["structuredData"]["syncFrequency"] = json!({"type": "manual"});
    app.register_integration(integration).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    fake
}

#[tokio::test]
async fn twenty_connections_that_all_need_a_token_refresh_it_once() {
    let test = TestApp::new();
    let fake = rotating_org(&test, 10).await;
    let app = test.app(&[]);
    let salesforce = Salesforce::new();
    let request = FetchRequest {
        entity: "Account".into(),
        fields: vec!["Name".into()],
        cursor: None,
        page_token: None,
        filters: Vec::new(),
        page_size: 2000,
        cursor_read_at: None,
    };
    let settings = json!({"loginHost": fake.url}).as_object().unwrap().clone();

    let pages = join_all((0..20).map(|_| async {
        let keeper = Arc::new(StoredCredentials::new(&app, "t1", "int-acme-sf"));
        let credentials = keeper.load().await.unwrap();
        let mut conn =
            Connection::with_keeper("int-acme-sf", settings.clone(), credentials, keeper);
        salesforce.fetch_page(&mut conn, &request).await
    }))
    .await;

    for page in &pages {
        assert_eq!(page.as_ref().unwrap().records.len(), 10);
    }
    assert_eq!(
        fake.org.lock().unwrap().token_refreshes,
        1,
        "one refresh served all twenty"
    );
    let secrets = std::fs::read_to_string(test.path("secrets.json")).unwrap();
    assert!(
        secrets.contains("rt-rotated-1"),
        "the rotated token is kept"
    );
}

#[tokio::test]
async fn a_second_job_started_while_the_first_runs_waits_for_it_instead_of_failing() {
    let test = TestApp::new();
    let fake = rotating_org(&test, 2500).await;
    fake.org.lock().unwrap().hold_locator = Some("01gRO00000000001-2000".into());
    let handler = test
        .host_handler_with(&[("SYNC_MAX_RECORDS", "100000")])
        .await;
    let job = |job_id: &str, job_type: &str| {
        json!({
            "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": job_type,
            "provider": "salesforce", "jobId": job_id, "scheduledAt": Utc::now(),
            "trigger": "manual"
        })
    };

    // The full sync holds its second page mid-fetch while the incremental one arrives.
    let held = fake.held.clone();
    let waiting = held.notified();
    let full = service_bus_message(
        "SyncInboundScheduled",
        &job("job-full", "full_sync").to_string(),
        "job-full",
        1,
        None,
    );
    let first = handler.invoke_in_background("SyncInboundScheduled", &full);
    waiting.await;
    let second = service_bus_message(
        "SyncInboundScheduled",
        &job("job-incremental", "incremental").to_string(),
        "job-incremental",
        1,
        None,
    );
    assert!(
        handler
            .invoke("SyncInboundScheduled", &second)
            .await
            .host_accepts()
    );
    let queued = test.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].message_id, "job-incremental:attempt-1:wait-1");
    assert!(
        test.history()
            .await
            .iter()
            .all(|r| r["structuredData"]["jobId"] != "job-incremental"),
        "the waiting job has not started"
    );

    fake.release.notify_waiters();
    let _ = first.await;
    handler.deliver("SyncInboundScheduled", &queued[0]).await;

    let statuses: Vec<(Value, Value)> = test
        .history()
        .await
        .iter()
        .map(|r| {
            (
                r["structuredData"]["jobId"].clone(),
                r["structuredData"]["status"].clone(),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert!(statuses.iter().all(|(_, s)| s == "success"), "{statuses:?}");
    assert_eq!(fake.org.lock().unwrap().token_refreshes, 1);
    assert_eq!(
        test.integration("int-acme-sf").await["structuredData"]["status"],
        "active"
    );
}

#[tokio::test]
async fn a_replayed_job_that_waits_for_another_sync_still_runs_as_a_replay() {
    let test = TestApp::new();
    let fake = rotating_org(&test, 10).await;
    let handler = test.host_handler().await;
    let job = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "incremental",
        "provider": "salesforce", "jobId": "job-1", "scheduledAt": Utc::now(), "trigger": "manual"
    })
    .to_string();
    let first = service_bus_message("SyncInboundScheduled", &job, "job-1", 1, None);
    assert!(
        handler
            .invoke("SyncInboundScheduled", &first)
            .await
            .host_accepts()
    );
    let read_before = fake.requests().len();

    // Another chain holds the integration when an operator replays the finished job.
    let hold = |running: Value| {
        let test = &test;
        async move {
            let mut shard = test.integration("int-acme-sf").await;
            shard["structuredData"]["running"] = running;
            let shard: handler::model::Shard = serde_json::from_value(shard).unwrap();
            handler::store::ShardStore::upsert(&test.store(), &shard)
                .await
                .unwrap();
        }
    };
    hold(
        json!({"chain": "job-other", "jobId": "job-other", "since": Utc::now(),
                "until": Utc::now() + Duration::minutes(10)}),
    )
    .await;
    let mut replay = service_bus_message("SyncInboundScheduled", &job, "job-1:replay-5", 1, None);
    replay["Metadata"]["ApplicationProperties"] = json!({"ReplayedFrom": 5});
    assert!(
        handler
            .invoke("SyncInboundScheduled", &replay)
            .await
            .host_accepts()
    );
    let waiting = test.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].properties["ReplayedFrom"], 5, "still a replay");

    hold(Value::Null).await;
    handler.deliver("SyncInboundScheduled", &waiting[0]).await;
    assert!(
        fake.requests().len() > read_before,
        "the replay ran once the other sync was over"
    );
}
