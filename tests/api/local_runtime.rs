//! `handler local`: the embedded runtime delivering, retrying, dead-lettering and surviving a
//! crash, as a user running it on one machine sees it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::watch;

use handler::app::LocalBackends;
use handler::definition::FunctionName;
use handler::local::consumers::Consumer;
use handler::local::invoker::Invoker;
use handler::model::Shard;
use handler::queue::{
    MessageQueue, OutgoingMessage, QueueError, SYNC_DEADLETTER, SYNC_INBOUND_WEBHOOK, SYNC_OUTBOUND,
};
use handler::settings::Settings;
use handler::store::{ShardQuery, ShardStore, SqliteStore, StoreError, Versioned};

use crate::helpers::{TestApp, http_request, integration_of, salesforce_integration, wait_until};

const PATIENCE: Duration = Duration::from_secs(30);

async fn history(app: &TestApp) -> Vec<Value> {
    app.cli_json(&["history", "--tenant", "t1"])
        .await
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn an_operator_sync_runs_in_the_local_runtime_and_its_failure_can_be_replayed() {
    let app = TestApp::new();
    // Manual, so that the runtime's own scheduler does not add syncs while the test runs.
    let mut integration = integration_of("int-acme-sf", "workday");
    integration["structuredData"]["syncFrequency"] = json!({"type": "manual"});
    app.plant_integration(integration).await;
    let _runtime = app.start_local().await;

    let job = app
        .cli_json(&["sync", "int-acme-sf", "--tenant", "t1"])
        .await;
    assert_eq!(job["trigger"], "manual");
    wait_until(
        "the job has a history record that finished",
        PATIENCE,
        || async {
            history(&app)
                .await
                .first()
                .is_some_and(|r| r["structuredData"]["status"] == "failed")
        },
    )
    .await;
    let record = &history(&app).await[0]["structuredData"];
    assert_eq!(record["jobId"], job["jobId"]);
    assert_eq!(
        (record["jobType"].clone(), record["trigger"].clone()),
        (json!("full"), json!("manual"))
    );
    assert_eq!(record["errors"][0]["code"], "PROVIDER_NOT_SUPPORTED");

    let dead = app.cli_json(&["dead-letters", "list"]).await;
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["originalQueue"], "sync-inbound-scheduled");
    assert_eq!(dead[0]["reason"], "PROVIDER_NOT_SUPPORTED");
    assert_eq!(dead[0]["body"]["jobId"], job["jobId"]);

    // Replaying sends the job back to its queue; it runs again and fails again, for the same
    // reason, and leaves one dead letter, not two.
    let seq = dead[0]["sequenceNumber"].as_i64().unwrap();
    let replayed = app
        .cli_json(&["dead-letters", "replay", &seq.to_string()])
        .await;
    assert_eq!(replayed[0]["queue"], "sync-inbound-scheduled");
    wait_until(
        "the replayed job is dead-lettered again",
        PATIENCE,
        || async {
            let dead = app.cli_json(&["dead-letters", "list"]).await;
            let dead = dead.as_array().unwrap();
            dead.len() == 1 && dead[0]["sequenceNumber"].as_i64() != Some(seq)
        },
    )
    .await;
    assert_eq!(
        app.cli_json(&["dead-letters", "list"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let started: Vec<String> = app
        .events()
        .into_iter()
        .filter(|e| e.kind == "integration.sync.started")
        .map(|e| e.id)
        .collect();
    assert_eq!(started.len(), 2, "the replay ran the job again");
    assert_ne!(
        started[0], started[1],
        "the replay is a run of its own, not the first told again"
    );
}

#[tokio::test]
async fn a_webhook_reaches_the_receiver_through_the_front_door() {
    let app = TestApp::new();
    let runtime = app.start_local().await;
    let url = format!("http://{}/api/webhooks/workday?x=1", runtime.addr);
    let (status, headers, body) = http_request(
        "POST",
        &url,
        &[("Content-Type", "application/json")],
        Some(br#"{"event":"meeting.ended"}"#),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);
    assert!(headers.contains(&("content-type".into(), "application/json".into())));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "no webhook receiver for provider `workday`");

    // A delivery of a few megabytes reaches the receiver, as the host takes up to 100 MB.
    let large = format!(
        r#"{{"event":"meeting.ended","pad":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    let (status, _, _) = http_request(
        "POST",
        &url,
        &[("Content-Type", "application/json")],
        Some(large.as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(
        status, 404,
        "answered by the receiver, not refused as too large"
    );
}

#[tokio::test]
async fn only_one_local_runtime_runs_on_a_data_directory() {
    let app = TestApp::new();
    let _runtime = app.start_local().await;
    let out = app.cli(&["local", "--addr", "127.0.0.1:0"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another `handler local` is already running"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_message_being_delivered_when_the_runtime_is_killed_is_delivered_again() {
    let app = TestApp::new();
    let mut integration = salesforce_integration("int-acme-sf");
    integration["structuredData"]["syncFrequency"] = json!({"type": "manual"});
    app.register_integration(integration).await;
    let runtime = app.start_local().await;

    // Hold the shard store's write lock, so the job blocks mid-invocation when it writes its
    // history record, after its message was locked for delivery.
    let blocker = rusqlite::Connection::open(app.path("store.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let job = app
        .cli_json(&["sync", "int-acme-sf", "--tenant", "t1"])
        .await;
    let broker = app.broker();
    wait_until(
        "the job's message is locked for its first delivery",
        PATIENCE,
        || async {
            broker
                .peek("sync-inbound-scheduled")
                .unwrap()
                .first()
                .is_some_and(|m| m.delivery_count == 1 && !m.lock_token.is_empty())
        },
    )
    .await;

    runtime.kill_9().await;
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(
        history(&app).await.is_empty(),
        "the killed delivery wrote nothing"
    );

    let _runtime = app.start_local().await;
    wait_until("the job finished after the restart", PATIENCE, || async {
        history(&app)
            .await
            .first()
            .is_some_and(|r| r["structuredData"]["status"] == "failed")
    })
    .await;
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties["OriginalDeliveryCount"], 2,
        "redelivered, and counted"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&dead[0].body).unwrap()["jobId"],
        job["jobId"]
    );
    assert!(
        app.broker()
            .peek("sync-inbound-scheduled")
            .unwrap()
            .is_empty()
    );
}

/// A shard store that is down for its first `failures` calls, then works.
struct FlakyStore {
    inner: SqliteStore,
    failures: u32,
    calls: AtomicU32,
}

impl FlakyStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            Err(StoreError::Unavailable("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl ShardStore for FlakyStore {
    async fn get(&self, tenant_id: &str, id: &str) -> Result<Option<Versioned<Shard>>, StoreError> {
        self.check()?;
        self.inner.get(tenant_id, id).await
    }
    async fn create(&self, shard: &Shard) -> Result<String, StoreError> {
        self.check()?;
        self.inner.create(shard).await
    }
    async fn upsert(&self, shard: &Shard) -> Result<String, StoreError> {
        self.check()?;
        self.inner.upsert(shard).await
    }
    async fn replace(&self, shard: &Shard, if_match: &str) -> Result<String, StoreError> {
        self.check()?;
        self.inner.replace(shard, if_match).await
    }
    async fn query(&self, query: &ShardQuery) -> Result<Vec<Versioned<Shard>>, StoreError> {
        self.check()?;
        self.inner.query(query).await
    }
}

/// A queue that refuses its first `failures` dead letters, then works.
struct FlakyDeadLetters {
    inner: Arc<dyn MessageQueue>,
    failures: u32,
    dead_letters: AtomicU32,
}

#[async_trait]
impl MessageQueue for FlakyDeadLetters {
    async fn send(&self, message: OutgoingMessage) -> Result<(), QueueError> {
        if message.queue == SYNC_DEADLETTER
            && self.dead_letters.fetch_add(1, Ordering::SeqCst) < self.failures
        {
            return Err(QueueError::Unavailable("the namespace is busy".into()));
        }
        self.inner.send(message).await
    }
}

/// What fails while [`consume_with`] runs: the store's first calls, the queue's first dead
/// letters.
#[derive(Default)]
struct Faults {
    store_calls: u32,
    dead_letters: u32,
}

/// Runs the consumer of `function` on `queue` of the embedded runtime in this process, over a
/// store and a queue that fail as `faults` says, until `done` says so. Returns the store's
/// calls.
async fn consume_with(
    app: &TestApp,
    (function, queue): (FunctionName, &str),
    faults: Faults,
    done: impl AsyncFn(&LocalBackends) -> bool,
) -> u32 {
    let settings = Settings::from_lookup(|name| {
        (name == "FUNC_SYNC_DATA_DIR").then(|| app.data_dir().display().to_string())
    })
    .unwrap();
    let backends = LocalBackends::open(&settings).unwrap();
    let store = Arc::new(FlakyStore {
        inner: backends.store.clone(),
        failures: faults.store_calls,
        calls: AtomicU32::new(0),
    });
    let mut handler_app = backends.app(settings, handler::app::providers());
    handler_app.store = store.clone();
    handler_app.queue = Arc::new(FlakyDeadLetters {
        inner: handler_app.queue.clone(),
        failures: faults.dead_letters,
        dead_letters: AtomicU32::new(0),
    });
    let invoker = Invoker::new(handler::server::router(handler_app));
    let (stop, stopped) = watch::channel(false);
    let consumer = Consumer {
        function,
        binding: "message".into(),
        queue: queue.into(),
        concurrency: 4,
    };
    let task = tokio::spawn(consumer.run(backends.broker.clone(), invoker, stopped));
    wait_until("the consumer is done", PATIENCE, || done(&backends)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    store.calls.load(Ordering::SeqCst)
}

/// The consumer of webhook sync jobs.
const WEBHOOK_JOBS: (FunctionName, &str) = (FunctionName::SyncInboundWebhook, SYNC_INBOUND_WEBHOOK);

/// Runs the consumer of `consumer`'s queue under `faults` until the queue is empty.
async fn consume_until_empty(app: &TestApp, consumer: (FunctionName, &str), faults: Faults) {
    let queue = consumer.1;
    consume_with(app, consumer, faults, async |b: &LocalBackends| {
        b.broker.active_count(queue).unwrap() == 0
    })
    .await;
}

/// An app with the Salesforce integration and one webhook job waiting for it.
async fn app_with_a_webhook_job() -> TestApp {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    app.broker()
        .send(OutgoingMessage::json(
            SYNC_INBOUND_WEBHOOK,
            "wh-1",
            &webhook_job(),
        ))
        .await
        .unwrap();
    app
}

fn webhook_job() -> Value {
    json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "webhook",
        "provider": "salesforce", "jobId": "job-wh-1", "trigger": "webhook",
        "scheduledAt": Utc::now(), "attempt": 1
    })
}

#[tokio::test]
async fn a_failed_invocation_is_redelivered_until_it_succeeds() {
    let app = app_with_a_webhook_job().await;

    let faults = Faults {
        store_calls: 2,
        ..Faults::default()
    };
    consume_until_empty(&app, WEBHOOK_JOBS, faults).await;

    // Two deliveries failed on the store; the third ran the job to its end.
    assert!(
        app.broker()
            .dead_letters(Some(SYNC_INBOUND_WEBHOOK))
            .unwrap()
            .is_empty()
    );
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(
        dead.len(),
        1,
        "the job itself ends dead-lettered: no adapter"
    );
    assert_eq!(dead[0].properties["OriginalDeliveryCount"], 3);
    assert_eq!(history(&app).await.len(), 1);
}

#[tokio::test]
async fn a_job_whose_dead_letter_could_not_be_sent_sends_it_when_redelivered() {
    let app = app_with_a_webhook_job().await;

    let faults = Faults {
        dead_letters: 1,
        ..Faults::default()
    };
    consume_until_empty(&app, WEBHOOK_JOBS, faults).await;

    // The first delivery failed to send its dead letter; the second sent it, and only then
    // recorded the job as failed.
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1, "the job ends dead-lettered once");
    assert_eq!(dead[0].properties["OriginalDeliveryCount"], 2);
    let records = history(&app).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["structuredData"]["status"], "failed");
}

#[tokio::test]
async fn a_write_back_whose_dead_letter_could_not_be_sent_sends_it_when_redelivered() {
    let app = TestApp::new();
    let mut integration = salesforce_integration("int-acme-sf");
    integration["structuredData"]["writeBack"] = json!({"enabled": true});
    integration["structuredData"]["entityMappings"][0]["bidirectional"] = json!(true);
    app.register_integration(integration).await;
    let acme: Shard = serde_json::from_value(json!({
        "id": "shard-acme", "tenantId": "t1", "shardTypeId": "c_company", "name": "Acme",
        "structuredData": {"Name": "Acme"}
    }))
    .unwrap();
    app.store().upsert(&acme).await.unwrap();
    let write_back = json!({
        "shardId": "shard-acme", "tenantId": "t1", "operation": "update",
        "changedFields": ["Name"], "externalSystem": "salesforce", "externalId": "001000000000001AAA",
        "integrationId": "int-acme-sf", "triggeredAt": Utc::now(), "triggeredBy": "user-1"
    });
    app.broker()
        .send(OutgoingMessage::json(SYNC_OUTBOUND, "wb-1", &write_back).in_session("int-acme-sf"))
        .await
        .unwrap();

    let faults = Faults {
        dead_letters: 1,
        ..Faults::default()
    };
    let write_backs = (FunctionName::SyncOutbound, SYNC_OUTBOUND);
    consume_until_empty(&app, write_backs, faults).await;

    // No credentials were ever stored, which no retry mends: the change ends in the dead
    // letters, however the first try to put it there failed.
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1, "the write-back ends dead-lettered once");
    assert_eq!(
        dead[0].properties["OriginalDeliveryCount"], 2,
        "{:?}",
        dead[0].properties
    );
}

#[tokio::test]
async fn a_message_that_always_fails_is_dead_lettered_after_max_deliveries_with_the_reason() {
    let app = TestApp::new();
    app.broker()
        .send(OutgoingMessage::json(
            SYNC_INBOUND_WEBHOOK,
            "wh-1",
            &webhook_job(),
        ))
        .await
        .unwrap();

    let faults = Faults {
        store_calls: u32::MAX,
        ..Faults::default()
    };
    let calls = consume_with(&app, WEBHOOK_JOBS, faults, async |b: &LocalBackends| {
        !b.broker.peek(SYNC_DEADLETTER).unwrap().is_empty()
    })
    .await;

    assert_eq!(calls, 5, "sync-inbound-webhook allows 5 deliveries");
    // The handler dead-lettered it on the last delivery, before the broker would have, so
    // that the failure that exhausted the deliveries is kept with it.
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties["DeadLetterReason"],
        "MaxDeliveryCountExceeded"
    );
    assert_eq!(dead[0].properties["OriginalDeliveryCount"], 5);
    let description = dead[0].properties["DeadLetterErrorDescription"]
        .as_str()
        .unwrap();
    assert!(
        description.contains("shard store unavailable: connection refused"),
        "{description}"
    );
    assert!(
        app.broker()
            .dead_letters(Some(SYNC_INBOUND_WEBHOOK))
            .unwrap()
            .is_empty()
    );
    let listed = app
        .cli_json(&["dead-letters", "list", "--queue", "sync-inbound-webhook"])
        .await;
    assert_eq!(listed[0]["reason"], "MaxDeliveryCountExceeded", "{listed}");
    assert!(
        listed[0]["description"]
            .as_str()
            .is_some_and(|d| d.contains("shard store unavailable")),
        "{listed}"
    );
}

/// A stand-in custom handler that hands every envelope it receives to the test.
fn recording_handler() -> (
    axum::Router,
    tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
) {
    use axum::extract::{Path, State};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let router = axum::Router::new()
        .route(
            "/{function}",
            axum::routing::post(
                |State(tx): State<tokio::sync::mpsc::UnboundedSender<(String, Value)>>,
                 Path(function): Path<String>,
                 body: axum::body::Bytes| async move {
                    let envelope: Value = serde_json::from_slice(&body).unwrap();
                    tx.send((function, envelope)).unwrap();
                    axum::Json(json!({"Outputs": {}, "Logs": [], "ReturnValue": null}))
                },
            ),
        )
        .with_state(tx);
    (router, rx)
}

#[tokio::test]
async fn timers_fire_on_schedule_with_the_hosts_first_run_and_past_due_shapes() {
    use handler::local::timers::{Timer, TimerStatusStore};
    let app = TestApp::new();
    let statuses = TimerStatusStore::open(&app.path("runtime.db")).unwrap();
    let (router, mut invocations) = recording_handler();
    let every_second = || Timer {
        function: FunctionName::SyncScheduler,
        binding: "timer".into(),
        schedule: "* * * * * *".parse().unwrap(),
    };

    let (stop, stopped) = watch::channel(false);
    let task =
        tokio::spawn(every_second().run(statuses.clone(), Invoker::new(router.clone()), stopped));
    let (function, first) = tokio::time::timeout(PATIENCE, invocations.recv())
        .await
        .unwrap()
        .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(function, "SyncScheduler");
    let timer = &first["Data"]["timer"];
    assert_eq!(
        timer["ScheduleStatus"]["Last"], "0001-01-01T00:00:00",
        "a first run"
    );
    assert_eq!(timer["IsPastDue"], false);
    assert_eq!(timer["Schedule"]["AdjustForDST"], true);
    assert_eq!(first["Metadata"]["sys"]["MethodName"], "SyncScheduler");

    // The runtime was stopped past the next occurrence: at start-up it fires once, past due.
    let status = statuses.get(FunctionName::SyncScheduler).unwrap().unwrap();
    assert!(status.last.is_some());
    let missed = handler::local::envelopes::ScheduleStatus {
        next: Utc::now() - chrono::Duration::minutes(5),
        ..status
    };
    statuses.set(FunctionName::SyncScheduler, &missed).unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(every_second().run(statuses.clone(), Invoker::new(router), stopped));
    let (_, late) = tokio::time::timeout(PATIENCE, invocations.recv())
        .await
        .unwrap()
        .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();
    let timer = &late["Data"]["timer"];
    assert_eq!(timer["IsPastDue"], true);
    assert_ne!(timer["ScheduleStatus"]["Last"], "0001-01-01T00:00:00");
}

/// A stand-in custom handler that never answers: each invocation counts itself among those
/// running until it is dropped, and the most that ran at once is kept.
fn hanging_handler() -> (axum::Router, Arc<AtomicU32>, Arc<AtomicU32>) {
    struct Running(Arc<AtomicU32>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let (started, running, most) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicU32::new(0)),
    );
    let state = (started.clone(), running, most.clone());
    let router = axum::Router::new()
        .route(
            "/{function}",
            axum::routing::post(
                |axum::extract::State((started, running, most)): axum::extract::State<(
                    Arc<AtomicU32>,
                    Arc<AtomicU32>,
                    Arc<AtomicU32>,
                )>| async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let _running = Running(running);
                    std::future::pending::<axum::Json<Value>>().await
                },
            ),
        )
        .with_state(state);
    (router, started, most)
}

#[tokio::test]
async fn an_invocation_past_the_function_timeout_is_stopped_before_its_message_runs_again() {
    let app = TestApp::new();
    let broker = app.broker();
    broker
        .send(OutgoingMessage::json(
            SYNC_INBOUND_WEBHOOK,
            "wh-1",
            &webhook_job(),
        ))
        .await
        .unwrap();
    let (router, started, most) = hanging_handler();
    let invoker = Invoker::new(router).with_timeout(Duration::from_millis(200));
    let consumer = Consumer {
        function: FunctionName::SyncInboundWebhook,
        binding: "message".into(),
        queue: SYNC_INBOUND_WEBHOOK.into(),
        concurrency: 4,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(consumer.run(broker.clone(), invoker, stopped));

    wait_until("the message is delivered again", PATIENCE, || async {
        started.load(Ordering::SeqCst) >= 2
    })
    .await;
    stop.send(true).unwrap();
    task.abort();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "the first delivery was stopped before the second began"
    );
}
