//! SyncScheduler's guarantees: one job per due time, and limits that defer but never drop.

use chrono::{DurationRound, Utc};
use serde_json::{Value, json};

use handler::queue::SYNC_INBOUND_SCHEDULED;

use crate::fake_host::{HostedHandler, timer_first_run};
use crate::fake_salesforce::FakeSalesforce;
use crate::helpers::{TestApp, integration_of, salesforce_integration};

async fn tick(handler: &HostedHandler) -> Value {
    let res = handler
        .invoke("SyncScheduler", &timer_first_run("SyncScheduler", "timer"))
        .await;
    assert!(res.host_accepts(), "{res:?}");
    res.json()["Logs"].clone()
}

#[tokio::test]
async fn syncs_over_a_tenants_concurrency_limit_wait_for_a_later_tick() {
    let app = TestApp::new();
    for i in 0..5 {
        app.plant_integration(integration_of(&format!("int-{i}"), "workday"))
            .await;
    }
    let handler = app
        .host_handler_with(&[("SYNC_MAX_CONCURRENT_PER_TENANT", "3")])
        .await;

    assert_eq!(
        tick(&handler).await,
        json!(["5 integrations due, 3 sync jobs enqueued"])
    );
    assert_eq!(
        tick(&handler).await,
        json!(["2 integrations due, 0 sync jobs enqueued"])
    );
    let check_due = app
        .events()
        .into_iter()
        .rfind(|e| e.kind == "integration.sync.check_due")
        .unwrap();
    assert_eq!(check_due.data["deferred"], 2);

    // One sync ends (it fails: no workday adapter), freeing a slot.
    let queued = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(queued.len(), 3);
    handler.deliver("SyncInboundScheduled", &queued[0]).await;
    assert_eq!(
        tick(&handler).await,
        json!(["2 integrations due, 1 sync jobs enqueued"])
    );
    assert_eq!(app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap().len(), 4);
}

#[tokio::test]
async fn one_tenants_backlog_does_not_hold_back_another_tenants_syncs() {
    let app = TestApp::new();
    let due = |hours: i64| {
        handler::model::timestamp::format(&(Utc::now() - chrono::Duration::hours(hours)))
    };
    // Tenant t1 has 600 integrations due for two hours, more than a tick reads, and syncs
    // one at a time; tenant t2's one integration came due an hour ago.
    for i in 0..600 {
        let mut waiting = integration_of(&format!("int-{i:03}"), "workday");
        waiting["structuredData"]["nextSyncAt"] = json!(due(2));
        app.plant_integration(waiting).await;
    }
    let mut other = integration_of("int-other", "workday");
    other["tenantId"] = json!("t2");
    other["structuredData"]["nextSyncAt"] = json!(due(1));
    app.plant_integration(other).await;
    let handler = app
        .host_handler_with(&[("SYNC_MAX_CONCURRENT_PER_TENANT", "1")])
        .await;

    assert_eq!(
        tick(&handler).await,
        json!(["500 integrations due, 1 sync jobs enqueued"])
    );
    // t1's passed over wait behind what comes due by the next minute's tick; t2's is taken
    // (first, even should this tick fall in the next minute).
    let logs = tick(&handler).await;
    assert!(
        logs[0]
            .as_str()
            .unwrap()
            .ends_with(", 1 sync jobs enqueued"),
        "{logs}"
    );
    let queued = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    let job: Value = serde_json::from_slice(&queued[1].body).unwrap();
    assert_eq!(job["tenantId"], "t2");
}

#[tokio::test]
async fn two_tenants_integrations_of_one_id_due_together_both_sync() {
    let app = TestApp::new();
    let due = handler::model::timestamp::format(&(Utc::now() - chrono::Duration::minutes(1)));
    for tenant in ["t1", "t2"] {
        let mut integration = integration_of("int-crm", "workday");
        integration["tenantId"] = json!(tenant);
        integration["structuredData"]["nextSyncAt"] = json!(due);
        app.plant_integration(integration).await;
    }
    let handler = app.host_handler().await;

    assert_eq!(
        tick(&handler).await,
        json!(["2 integrations due, 2 sync jobs enqueued"])
    );
    let mut tenants: Vec<String> = app
        .broker()
        .peek(SYNC_INBOUND_SCHEDULED)
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.body).unwrap()["tenantId"].to_string())
        .collect();
    tenants.sort();
    assert_eq!(tenants, [r#""t1""#, r#""t2""#]);
}

/// Receives the next job, runs it as the host would deliver it, and completes it. Returns its
/// MessageId.
async fn run_next(app: &TestApp, handler: &HostedHandler) -> String {
    let broker = app.broker();
    let message = broker
        .receive_at(SYNC_INBOUND_SCHEDULED, Utc::now())
        .unwrap()
        .expect("a job is queued");
    handler.deliver("SyncInboundScheduled", &message).await;
    broker.complete(&message).unwrap();
    message.message_id
}

#[tokio::test]
async fn a_sync_that_continues_past_the_record_limit_holds_its_tenants_slot_until_it_ends() {
    let fake = FakeSalesforce::start().await;
    fake.load(
        "Account",
        (0..3000).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}")}),
                Utc::now() - chrono::Duration::days(1),
            )
        }),
    );
    let app = TestApp::new();
    for id in ["int-a", "int-b"] {
        let mut integration = salesforce_integration(id);
        integration["structuredData"]["connection"] = json!({"loginHost": fake.url});
        app.register_integration(integration).await;
        app.set_credentials(id, &fake.credentials()).await;
    }
    let handler = app
        .host_handler_with(&[
            ("SYNC_MAX_CONCURRENT_PER_TENANT", "1"),
            ("SYNC_MAX_RECORDS", "2000"),
        ])
        .await;

    assert_eq!(
        tick(&handler).await,
        json!(["2 integrations due, 1 sync jobs enqueued"])
    );
    let first = run_next(&app, &handler).await;
    let continuation = format!("{first}+1");
    assert_eq!(
        app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap()[0].message_id,
        continuation,
        "the first job stopped at the record limit"
    );

    assert_eq!(
        tick(&handler).await,
        json!(["1 integrations due, 0 sync jobs enqueued"]),
        "the chain still holds the tenant's one slot"
    );
    assert_eq!(run_next(&app, &handler).await, continuation);
    assert_eq!(
        tick(&handler).await,
        json!(["1 integrations due, 1 sync jobs enqueued"]),
        "the chain ended"
    );
}

#[tokio::test]
async fn two_instances_ticking_at_once_enqueue_a_due_integration_once() {
    let app = TestApp::new();
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let before = app.integration("int-1").await["structuredData"]["nextSyncAt"].clone();
    let a = app.host_handler().await;
    let b = app.host_handler().await;

    let (la, lb) = tokio::join!(tick(&a), tick(&b));
    let enqueued: Vec<_> = [la, lb]
        .iter()
        .map(|l| l[0].as_str().unwrap().to_string())
        .collect();
    assert!(
        enqueued
            .iter()
            .filter(|l| l.ends_with("1 sync jobs enqueued"))
            .count()
            <= 1,
        "{enqueued:?}"
    );
    let queued = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(
        queued.len(),
        1,
        "duplicate detection and the etag claim keep one job"
    );
    let after = app.integration("int-1").await["structuredData"]["nextSyncAt"].clone();
    assert_ne!(before, after);
}

#[tokio::test]
async fn a_frequent_schedule_is_held_to_the_minimum_interval() {
    let app = TestApp::new();
    let mut every_minute = integration_of("int-1", "workday");
    every_minute["structuredData"]["syncFrequency"] =
        json!({"type": "interval", "intervalMinutes": 1});
    app.plant_integration(every_minute).await;
    let handler = app.host_handler().await;
    let before = chrono::Utc::now();
    tick(&handler).await;
    let after = chrono::Utc::now();
    let next = app.integration("int-1").await["structuredData"]["nextSyncAt"]
        .as_str()
        .unwrap()
        .to_string();
    let next = chrono::DateTime::parse_from_rfc3339(&next).unwrap();
    // Five minutes from the minute of the tick, where the schedule alone says one.
    let minute = |t: chrono::DateTime<chrono::Utc>| {
        t.duration_trunc(chrono::Duration::minutes(1)).unwrap() + chrono::Duration::minutes(5)
    };
    assert!(
        next == minute(before) || next == minute(after),
        "next sync at {next}, ticked between {before} and {after}"
    );
}

#[tokio::test]
async fn a_finished_job_delivered_again_lets_go_of_a_claim_written_for_it_too_late() {
    let app = TestApp::new();
    let job_id = "job_t1_int-1_20261122T100000.000Z";
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let handler = app.host_handler().await;
    let job = json!({"integrationId": "int-1", "tenantId": "t1", "jobType": "full_sync",
                     "provider": "workday", "jobId": job_id, "scheduledAt": Utc::now()});
    let delivery = crate::fake_host::service_bus_message(
        "SyncInboundScheduled",
        &job.to_string(),
        job_id,
        1,
        None,
    );
    // The job runs to its end (it fails: no workday adapter) before the tick that sent it
    // claims the integration for it; the claim holds the integration for an hour.
    assert!(
        handler
            .invoke("SyncInboundScheduled", &delivery)
            .await
            .host_accepts()
    );
    let mut claimed = app.integration("int-1").await;
    claimed["structuredData"]["running"] = json!({
        "chain": job_id, "jobId": job_id, "since": Utc::now(),
        "until": Utc::now() + chrono::Duration::minutes(60)
    });
    let claimed: handler::model::Shard = serde_json::from_value(claimed).unwrap();
    handler::store::ShardStore::upsert(&app.store(), &claimed)
        .await
        .unwrap();

    // Its message comes again (a redelivery): the job is over, and lets the integration go.
    assert!(
        handler
            .invoke("SyncInboundScheduled", &delivery)
            .await
            .host_accepts()
    );
    assert!(
        app.integration("int-1").await["structuredData"]
            .get("running")
            .is_none(),
        "the claim is released"
    );
}
