//! The conformance suite: the same user stories for every provider, each against the
//! provider's own loopback fake, driven through the real handler under the fake Functions host
//! and through `handler local`.
//!
//! A provider joins by implementing [`UnderTest`] for its fake (how to point an integration at
//! it, how to change its records, which of its quirks to switch on) and adding one line to the
//! `conformance!` list at the bottom. A story a provider's API cannot tell (a 429 from a
//! provider that never throttles with 429, a handshake from one that makes none) is skipped
//! for that provider by its `UnderTest` answering `None`, and the skip is printed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use handler::queue::{
    SYNC_DEADLETTER, SYNC_INBOUND_SCHEDULED, SYNC_INBOUND_WEBHOOK, SYNC_OUTBOUND,
};

use crate::fake_dynamics::FakeDynamics;
use crate::fake_gong::FakeGong;
use crate::fake_google_drive::FakeGoogleDrive;
use crate::fake_graph::FakeGraph;
use crate::fake_host::{HostedHandler, free_port, service_bus_message};
use crate::fake_salesforce::FakeSalesforce;
use crate::fake_zoom::FakeZoom;
use crate::helpers::{TestApp, http_request, wait_until};

const INTEGRATION: &str = "int-under-test";

/// A webhook delivery as the provider would send it.
pub struct Delivery {
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A provider's fake, as the suite drives it.
pub trait UnderTest: Sized {
    const PROVIDER: &'static str;
    /// The entity the suite maps (`externalEntity`).
    const ENTITY: &'static str;
    /// The source field holding a record's name.
    const NAME_FIELD: &'static str;

    /// Records that make several pages for this provider.
    const SEVERAL_PAGES: usize = 2500;
    /// Records the adapter asks for per page.
    const PAGE: usize = 2000;
    /// Whether a finished sync leaves a cursor (an entity re-listed whole each time has none).
    const KEEPS_CURSOR: bool = true;
    /// Whether the provider tells of deletions at all (Gong does not).
    const SEES_DELETIONS: bool = true;
    /// Whether a refresh returns a new refresh token and spends the old one.
    const ROTATES: bool = true;
    /// Whether Castiel's changes are written back to the provider.
    const WRITES_BACK: bool = false;
    /// Whether its webhooks say only that something changed, not which records (Drive's change
    /// messages, OneDrive's notifications): the sync they ask for reads what changed since.
    const NOTIFIES_ONLY_OF_CHANGE: bool = false;

    async fn start() -> Self;
    fn connection(&self) -> Value;
    fn credentials(&self) -> Value;
    /// Creates records with these names; returns their ids.
    fn create(&self, names: &[String]) -> Vec<String>;
    fn rename(&self, id: &str, name: &str);
    fn delete(&self, id: &str);
    /// Makes the current access token stop working after `requests` more data requests;
    /// `None` when the provider has no tokens.
    fn expire_token_after(&self, requests: usize) -> Option<()>;
    /// Token requests the provider answered.
    fn token_refreshes(&self) -> usize;
    /// The refresh tokens the provider still honours (rotation spends the one used).
    fn live_refresh_tokens(&self) -> Vec<String>;
    /// The next data request answers 429 with `Retry-After: 1`; `None` when the provider does
    /// not throttle that way.
    fn throttle_next(&self) -> Option<()>;
    /// The next data request fails with a server error; `None` when there is no server.
    fn fail_next(&self) -> Option<()>;
    /// Holds the sync after its first page until [`UnderTest::release`]; the first page is
    /// checkpointed by then. `None` when nothing can hold it.
    fn hold_second_page(&self) -> Option<()>;
    fn release(&self);
    /// Requests for records made so far (not for tokens, nor for a log of deletions read
    /// once an entity is done).
    fn requests(&self) -> usize;
    /// A delivery saying record `id` changed; `None` for providers without webhooks.
    fn webhook(&self, id: &str) -> Option<Delivery>;
    /// The same delivery from someone who does not have the secret.
    fn forged_webhook(&self, id: &str) -> Option<Delivery>;
    /// A subscription handshake, the content type of the answer it expects and its body;
    /// `None` when the provider makes none.
    fn handshake(&self) -> Option<(Delivery, &'static str, String)>;
    /// A delivery saying record `id` was deleted, for providers that report deletions only by
    /// webhook; `None` when their syncs see deletions.
    fn deletion_webhook(&self, _id: &str) -> Option<Delivery> {
        None
    }
    /// Prepares the integration for webhooks after it was registered (a subscription, made
    /// through `handler local`, which must not be running).
    async fn connect_webhooks(&self, _app: &TestApp) {}
    /// The name record `id` has at the provider now; `None` once it is deleted (or in the
    /// trash). Asked only where [`UnderTest::WRITES_BACK`].
    fn name_at_provider(&self, _id: &str) -> Option<String> {
        None
    }
}

fn names(from: usize, count: usize) -> Vec<String> {
    (from..from + count)
        .map(|i| format!("Record {i:05}"))
        .collect()
}

async fn connected<P: UnderTest>() -> (P, TestApp) {
    connected_both_ways::<P>(false).await
}

/// The provider's fake and an app with an integration of it; `two_way` syncs it both ways.
async fn connected_both_ways<P: UnderTest>(two_way: bool) -> (P, TestApp) {
    let fake = P::start().await;
    // Providers deliver to the local runtime's front door, wherever a test starts it.
    let front_door = format!("127.0.0.1:{}", free_port());
    let app = TestApp::with_settings(&[
        ("FUNC_SYNC_LOCAL_ADDR", &front_door),
        ("WEBHOOK_BASE_URL", &format!("http://{front_door}")),
    ]);
    app.register_integration(json!({
        "id": INTEGRATION, "tenantId": "t1", "name": format!("{} under test", P::PROVIDER),
        "structuredData": {
            "providerName": P::PROVIDER,
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": two_way},
            "connection": fake.connection(),
            "entityMappings": [{
                "externalEntity": P::ENTITY, "shardTypeId": "c_document", "nameField": "name",
                "bidirectional": two_way,
                "fieldMappings": [{"source": P::NAME_FIELD, "target": "name", "required": true}]
            }]
        }
    }))
    .await;
    app.set_credentials(INTEGRATION, &fake.credentials()).await;
    (fake, app)
}

async fn handler(app: &TestApp) -> HostedHandler {
    app.host_handler_with(&[
        ("SYNC_MAX_RECORDS", "1000000"),
        ("FUNC_SYNC_RECORD_RETRY_BASE_MS", "50"),
    ])
    .await
}

fn job_envelope<P: UnderTest>(job_id: &str, job_type: &str, delivery: u32) -> Value {
    let job = json!({
        "integrationId": INTEGRATION, "tenantId": "t1", "jobType": job_type,
        "provider": P::PROVIDER, "jobId": job_id, "scheduledAt": "2026-11-22T10:00:00Z", "attempt": 1
    });
    service_bus_message(
        "SyncInboundScheduled",
        &job.to_string(),
        job_id,
        delivery,
        None,
    )
}

async fn run_job<P: UnderTest>(handler: &HostedHandler, job_id: &str, job_type: &str) {
    let res = handler
        .invoke(
            "SyncInboundScheduled",
            &job_envelope::<P>(job_id, job_type, 1),
        )
        .await;
    assert!(res.host_accepts(), "{res:?}");
}

async fn record_of(app: &TestApp, job_id: &str) -> Value {
    app.history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no history for {job_id}"))["structuredData"]
        .clone()
}

/// The names of the shards synced, sorted.
async fn shard_names(app: &TestApp) -> Vec<String> {
    let mut names: Vec<String> = app
        .shards("c_document")
        .await
        .iter()
        .map(|s| {
            s["structuredData"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

async fn post_webhook<P: UnderTest>(handler: &HostedHandler, delivery: &Delivery) -> (u16, Value) {
    let query: Vec<(&str, &str)> = delivery
        .query
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let out = handler
        .post_webhook(P::PROVIDER, &query, &delivery.headers, &delivery.body)
        .await;
    (out["statusCode"].as_u64().unwrap_or_default() as u16, out)
}

fn skip(provider: &str, story: &str, why: &str) {
    eprintln!("{provider}: `{story}` does not apply: {why}");
}

pub async fn a_full_sync_reads_every_page_into_shards<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, P::SEVERAL_PAGES));
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-full", "full_sync").await;

    let record = record_of(&app, "job-full").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(
        record["stats"]["shardsCreated"],
        P::SEVERAL_PAGES,
        "{record}"
    );
    assert!(
        record["syncDetails"]["pagesProcessed"]
            .as_u64()
            .unwrap_or(0)
            >= 2,
        "{record}"
    );
    assert_eq!(shard_names(&app).await, names(0, P::SEVERAL_PAGES));
    let state = &app.integration(INTEGRATION).await["structuredData"];
    assert_eq!(
        state["cursors"][P::ENTITY].is_string(),
        P::KEEPS_CURSOR,
        "{state}"
    );
    assert!(state.get("checkpoints").is_none(), "{state}");
}

pub async fn an_incremental_sync_brings_updates_creations_and_deletions<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 10));
    let handler = handler(&app).await;
    run_job::<P>(&handler, "job-full", "full_sync").await;

    fake.rename(&ids[0], "Renamed 0");
    fake.rename(&ids[1], "Renamed 1");
    fake.delete(&ids[2]);
    fake.delete(&ids[3]);
    fake.create(&names(10, 2));
    run_job::<P>(&handler, "job-incr", "incremental").await;
    for id in &ids[2..4] {
        if let Some(deletion) = fake.deletion_webhook(id) {
            let (status, out) = post_webhook::<P>(&handler, &deletion).await;
            assert!((200..300).contains(&status), "{out}");
        }
    }
    app.deliver_webhook_jobs(&handler).await;

    let record = record_of(&app, "job-incr").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 2, "{record}");
    let mut expected: Vec<String> = if P::SEES_DELETIONS {
        names(4, 8)
    } else {
        names(2, 10)
    };
    expected.extend(["Renamed 0".to_string(), "Renamed 1".to_string()]);
    expected.sort();
    assert_eq!(
        shard_names(&app).await,
        expected,
        "deleted records are soft-deleted"
    );

    run_job::<P>(&handler, "job-again", "incremental").await;
    let again = record_of(&app, "job-again").await;
    assert_eq!(
        (
            again["stats"]["shardsCreated"].as_u64(),
            again["stats"]["shardsUpdated"].as_u64()
        ),
        (Some(0), Some(0)),
        "nothing changed, nothing written: {again}"
    );
}

pub async fn a_record_the_mapping_cannot_take_fails_alone_and_is_synced_once_mended<
    P: UnderTest,
>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&[
        "Record 00000".to_string(),
        String::new(),
        "Record 00002".to_string(),
    ]);
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-full", "full_sync").await;

    // The record with no name (which the mapping requires) is listed with the provider's
    // field; the others are synced.
    let record = record_of(&app, "job-full").await;
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 2, "{record}");
    assert_eq!(record["stats"]["shardsFailed"], 1, "{record}");
    let errors = record["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{record}");
    assert_eq!(errors[0]["code"], "VALIDATION_ERROR", "{record}");
    assert_eq!(errors[0]["recordId"], ids[1].as_str(), "{record}");
    assert_eq!(errors[0]["field"], P::NAME_FIELD, "{record}");
    assert_eq!(
        shard_names(&app).await,
        names(0, 3).into_iter().step_by(2).collect::<Vec<_>>()
    );

    // Mended at the provider, it is synced by the next run, and nothing else is written.
    fake.rename(&ids[1], "Record 00001");
    run_job::<P>(&handler, "job-mended", "incremental").await;
    let record = record_of(&app, "job-mended").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 1, "{record}");
    assert_eq!(record["stats"]["shardsUpdated"], 0, "{record}");
    assert_eq!(shard_names(&app).await, names(0, 3));
}

/// A cursor the provider never gave (mangled, restored from another environment, or left by a
/// mapping that once read the entity another way).
const FOREIGN_CURSOR: &str = "not-a-cursor-of-this-provider";

pub async fn a_cursor_the_provider_does_not_honour_is_dropped_and_the_entity_read_again<
    P: UnderTest,
>() {
    use handler::store::ShardStore;
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 5));
    let handler = handler(&app).await;
    run_job::<P>(&handler, "job-full", "full_sync").await;

    let store = app.store();
    let mut integration = store.get("t1", INTEGRATION).await.unwrap().unwrap().value;
    integration.structured_data["cursors"][P::ENTITY] = json!(FOREIGN_CURSOR);
    store.upsert(&integration).await.unwrap();
    fake.rename(&ids[0], "Renamed 0");
    fake.create(&names(5, 1));
    // A listing read whole tells what is gone, whatever cursor the integration held.
    let reconciles = !P::KEEPS_CURSOR && P::SEES_DELETIONS;
    if reconciles {
        fake.delete(&ids[1]);
    }
    run_job::<P>(&handler, "job-incr", "incremental").await;

    let record = record_of(&app, "job-incr").await;
    assert_eq!(record["status"], "success", "{record}");
    let mut expected = names(
        if reconciles { 2 } else { 1 },
        if reconciles { 4 } else { 5 },
    );
    expected.push("Renamed 0".to_string());
    expected.sort();
    assert_eq!(shard_names(&app).await, expected);
    // The cursor is the provider's own again, or gone where the provider keeps none: the next
    // run neither trips over it nor reads the entity whole for its sake.
    let state = &app.integration(INTEGRATION).await["structuredData"];
    let cursor = &state["cursors"][P::ENTITY];
    assert_ne!(cursor, FOREIGN_CURSOR, "{state}");
    assert_eq!(cursor.is_string(), P::KEEPS_CURSOR, "{state}");

    run_job::<P>(&handler, "job-again", "incremental").await;
    let again = record_of(&app, "job-again").await;
    assert_eq!(again["status"], "success", "{again}");
    assert_eq!(
        (
            again["stats"]["shardsCreated"].as_u64(),
            again["stats"]["shardsUpdated"].as_u64()
        ),
        (Some(0), Some(0)),
        "nothing changed, nothing written: {again}"
    );
}

pub async fn a_refresh_token_the_provider_refuses_fails_the_job_for_good_and_flags_the_integration<
    P: UnderTest,
>() {
    let story = "a refused refresh token fails the job for good";
    let (fake, app) = connected::<P>().await;
    let mut credentials = fake.credentials();
    let Some(secret) = credentials["client_secret"].as_str().map(str::to_string) else {
        skip(P::PROVIDER, story, "its connection has no refresh token");
        return;
    };
    if credentials.get("refresh_token").is_none() || fake.expire_token_after(0).is_none() {
        skip(P::PROVIDER, story, "its connection has no refresh token");
        return;
    }
    fake.create(&names(0, 3));
    credentials["refresh_token"] = json!("a-refresh-token-nobody-issued");
    app.set_credentials(INTEGRATION, &credentials).await;
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-refused", "full_sync").await;

    let record = record_of(&app, "job-refused").await;
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(
        record["errors"][0]["code"], "AUTHENTICATION_FAILED",
        "{record}"
    );
    assert_eq!(record["errors"][0]["retryable"], false, "{record}");
    assert!(
        !record.to_string().contains(&secret),
        "no secret in the history"
    );
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties["DeadLetterReason"],
        "AUTHENTICATION_FAILED"
    );
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "not retried: no retry can fix it"
    );
    assert_eq!(
        app.integration(INTEGRATION).await["structuredData"]["status"],
        "error"
    );

    // New credentials put it back in service, and the next job syncs.
    app.set_credentials(INTEGRATION, &fake.credentials()).await;
    assert_eq!(
        app.integration(INTEGRATION).await["structuredData"]["status"],
        "active"
    );
    run_job::<P>(&handler, "job-after", "full_sync").await;
    let record = record_of(&app, "job-after").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(shard_names(&app).await, names(0, 3));
}

pub async fn a_token_that_expires_mid_sync_is_refreshed_once_and_the_sync_finishes<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, P::SEVERAL_PAGES));
    if fake.expire_token_after(1).is_none() {
        return skip(P::PROVIDER, "expiring token", "it has no tokens");
    }
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-full", "full_sync").await;

    let record = record_of(&app, "job-full").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], P::SEVERAL_PAGES);
    assert_eq!(
        fake.token_refreshes(),
        2,
        "one refresh to start, one when the token expired"
    );
}

pub async fn a_rotated_refresh_token_is_stored_before_it_is_used<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, P::SEVERAL_PAGES));
    if !P::ROTATES || fake.expire_token_after(1).is_none() {
        return skip(
            P::PROVIDER,
            "rotated refresh token",
            "it does not rotate refresh tokens",
        );
    }
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-full", "full_sync").await;

    let live = fake.live_refresh_tokens();
    assert_eq!(
        live.len(),
        1,
        "rotation leaves one live refresh token: {live:?}"
    );
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(secrets.contains(&live[0]), "the live refresh token is kept");
    let initial = fake.credentials()["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!secrets.contains(&initial), "the spent one is gone");

    // The next job starts from what was stored, and the provider still honours it.
    fake.create(&names(P::SEVERAL_PAGES, 1));
    let _ = fake.expire_token_after(0);
    run_job::<P>(&handler, "job-next", "incremental").await;
    assert_eq!(record_of(&app, "job-next").await["status"], "success");
}

pub async fn throttling_is_waited_out_for_as_long_as_the_provider_asks<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, 10));
    if fake.throttle_next().is_none() {
        return skip(
            P::PROVIDER,
            "429 with Retry-After",
            "it does not throttle with 429",
        );
    }
    let handler = handler(&app).await;
    let started = Instant::now();

    run_job::<P>(&handler, "job-full", "full_sync").await;

    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    let record = record_of(&app, "job-full").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 10);
}

pub async fn a_failed_request_is_retried_in_place_without_costing_an_attempt<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, 10));
    if fake.fail_next().is_none() {
        return skip(P::PROVIDER, "failed request", "it has no server to fail");
    }
    let handler = handler(&app).await;

    run_job::<P>(&handler, "job-full", "full_sync").await;

    let record = record_of(&app, "job-full").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 10);
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "no retry job was needed"
    );
}

pub async fn a_forged_webhook_is_refused_and_queues_nothing<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 1));
    fake.connect_webhooks(&app).await;
    let Some(forged) = fake.forged_webhook(&ids[0]) else {
        return skip(P::PROVIDER, "forged webhook", "it delivers no webhooks");
    };
    let handler = handler(&app).await;

    let (status, out) = post_webhook::<P>(&handler, &forged).await;

    assert!((400..500).contains(&status), "{out}");
    assert!(
        out["body"].as_str().unwrap_or_default().contains("error"),
        "{out}"
    );
    assert!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().is_empty());
}

pub async fn a_duplicate_notification_is_processed_once<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 3));
    fake.connect_webhooks(&app).await;
    let handler = handler(&app).await;
    run_job::<P>(&handler, "job-full", "full_sync").await;
    fake.rename(&ids[1], "Renamed by a webhook");
    let Some(delivery) = fake.webhook(&ids[1]) else {
        return skip(
            P::PROVIDER,
            "duplicate notification",
            "it delivers no webhooks",
        );
    };

    for _ in 0..2 {
        let (status, out) = post_webhook::<P>(&handler, &delivery).await;
        assert!((200..300).contains(&status), "{out}");
    }
    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    assert_eq!(queued.len(), 1, "the redelivery is a duplicate");
    handler.deliver("SyncInboundWebhook", &queued[0]).await;

    let mut expected = vec![
        "Record 00000".to_string(),
        "Record 00002".to_string(),
        "Renamed by a webhook".to_string(),
    ];
    expected.sort();
    assert_eq!(shard_names(&app).await, expected);
}

pub async fn a_burst_of_notifications_brings_every_change<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 3));
    fake.connect_webhooks(&app).await;
    let handler = handler(&app).await;
    run_job::<P>(&handler, "job-full", "full_sync").await;

    // Three changes, each told before any sync they ask for has begun.
    for (i, id) in ids.iter().enumerate() {
        fake.rename(id, &format!("Renamed {i}"));
        let Some(delivery) = fake.webhook(id) else {
            return skip(
                P::PROVIDER,
                "burst of notifications",
                "it delivers no webhooks",
            );
        };
        let (status, out) = post_webhook::<P>(&handler, &delivery).await;
        assert!((200..300).contains(&status), "{out}");
    }
    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    if P::NOTIFIES_ONLY_OF_CHANGE {
        assert_eq!(queued.len(), 1, "the first one's sync reads all three");
    } else {
        assert_eq!(queued.len(), 3, "each names its record");
    }
    for message in &queued {
        handler.deliver("SyncInboundWebhook", message).await;
    }

    assert_eq!(
        shard_names(&app).await,
        ["Renamed 0", "Renamed 1", "Renamed 2"]
    );
    if !P::NOTIFIES_ONLY_OF_CHANGE {
        return;
    }
    // A change told once that sync has begun asks for one of its own.
    fake.rename(&ids[1], "Renamed again");
    let delivery = fake.webhook(&ids[1]).unwrap();
    post_webhook::<P>(&handler, &delivery).await;
    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    let next = queued.last().expect("a job for the last change");
    handler.deliver("SyncInboundWebhook", next).await;
    assert!(
        shard_names(&app)
            .await
            .contains(&"Renamed again".to_string())
    );
}

pub async fn the_subscription_handshake_is_answered<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let Some((handshake, content_type, expected)) = fake.handshake() else {
        return skip(P::PROVIDER, "handshake", "it makes none");
    };
    let handler = handler(&app).await;

    let (status, out) = post_webhook::<P>(&handler, &handshake).await;

    assert_eq!(status, 200, "{out}");
    assert!(
        out["headers"]["Content-Type"]
            .as_str()
            .unwrap_or_default()
            .starts_with(content_type),
        "{out}"
    );
    let body = out["body"].as_str().unwrap_or_default();
    match (
        serde_json::from_str::<Value>(body),
        serde_json::from_str::<Value>(&expected),
    ) {
        (Ok(got), Ok(wanted)) => assert_eq!(got, wanted),
        _ => assert_eq!(body, expected),
    }
}

pub async fn a_sync_killed_mid_way_resumes_from_its_checkpoint_without_duplicates<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    fake.create(&names(0, P::SEVERAL_PAGES));
    if fake.hold_second_page().is_none() {
        return skip(
            P::PROVIDER,
            "kill mid-sync",
            "nothing can hold its second page",
        );
    }
    let first = handler(&app).await;
    let envelope = job_envelope::<P>("job-killed", "full_sync", 1);
    let delivery = first.invoke_in_background("SyncInboundScheduled", &envelope);
    wait_until(
        "the first page is checkpointed",
        Duration::from_secs(30),
        || async {
            app.integration(INTEGRATION).await["structuredData"]["checkpoints"][P::ENTITY]
                .is_object()
        },
    )
    .await;
    first.kill_9().await;
    let _ = delivery.await;
    fake.release();
    let before = fake.requests();

    let second = handler(&app).await;
    let res = second
        .invoke(
            "SyncInboundScheduled",
            &job_envelope::<P>("job-killed", "full_sync", 2),
        )
        .await;
    assert!(res.host_accepts(), "{res:?}");

    let record = record_of(&app, "job-killed").await;
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(
        record["stats"]["shardsCreated"],
        P::SEVERAL_PAGES,
        "{record}"
    );
    assert_eq!(
        shard_names(&app).await,
        names(0, P::SEVERAL_PAGES),
        "every record once"
    );
    let pages = P::SEVERAL_PAGES.div_ceil(P::PAGE);
    assert!(
        fake.requests() - before < pages,
        "the resumed job read {} pages of {pages}: it started over",
        fake.requests() - before
    );
}

pub async fn the_local_runtime_syncs_on_demand_and_takes_webhooks<P: UnderTest>() {
    let (fake, app) = connected::<P>().await;
    let ids = fake.create(&names(0, 3));
    fake.connect_webhooks(&app).await;
    let runtime = app.start_local().await;

    app.cli_json(&["sync", INTEGRATION, "--tenant", "t1"]).await;
    wait_until(
        "the records are shards",
        Duration::from_secs(30),
        || async { shard_names(&app).await == names(0, 3) },
    )
    .await;

    fake.rename(&ids[2], "Renamed by a webhook");
    let Some(delivery) = fake.webhook(&ids[2]) else {
        return skip(
            P::PROVIDER,
            "webhook to the local runtime",
            "it delivers no webhooks",
        );
    };
    let query: Vec<String> = delivery
        .query
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    let url = format!(
        "http://{}/api/webhooks/{}?{}",
        runtime.addr,
        P::PROVIDER,
        query.join("&")
    );
    let headers: Vec<(&str, &str)> = delivery
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let (status, _, body) = http_request("POST", &url, &headers, Some(delivery.body.as_bytes()))
        .await
        .unwrap();
    assert!(
        (200..300).contains(&status),
        "{}",
        String::from_utf8_lossy(&body)
    );
    wait_until(
        "the webhook's change is synced",
        Duration::from_secs(30),
        || async {
            shard_names(&app)
                .await
                .contains(&"Renamed by a webhook".to_string())
        },
    )
    .await;
}

pub async fn an_edit_in_castiel_is_written_back_once_and_read_back_as_no_change<P: UnderTest>() {
    if !P::WRITES_BACK {
        skip(P::PROVIDER, "write-back", "its records are only read");
        return;
    }
    let (fake, app) = connected_both_ways::<P>(true).await;
    let ids = fake.create(&names(0, 3));
    let handler = handler(&app).await;
    run_job::<P>(&handler, "job-full", "full_sync").await;

    // Renamed in Castiel, as its shard service changes a shard.
    let shard_id = format!("{INTEGRATION}~{}~{}", P::ENTITY, ids[0]);
    let store = app.store();
    let mut shard = handler::store::ShardStore::get(&store, "t1", &shard_id)
        .await
        .unwrap()
        .unwrap()
        .value;
    shard.name = "Renamed in Castiel".into();
    shard.structured_data["name"] = json!("Renamed in Castiel");
    let file = app.data_dir().join("shard.json");
    std::fs::write(&file, serde_json::to_string(&shard).unwrap()).unwrap();
    let sent = app
        .cli_json(&["shards", "put", file.to_str().unwrap()])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "update", "{sent}");

    // Delivered twice, as a queue may: the second finds the provider holding Castiel's name.
    let broker = app.broker();
    let waiting = broker.peek(SYNC_OUTBOUND).unwrap();
    assert_eq!(waiting.len(), 1);
    for _ in 0..2 {
        handler.deliver("SyncOutbound", &waiting[0]).await;
    }
    broker.delete_unlocked(waiting[0].sequence_number).unwrap();
    assert_eq!(
        fake.name_at_provider(&ids[0]).as_deref(),
        Some("Renamed in Castiel")
    );
    assert!(broker.peek(SYNC_DEADLETTER).unwrap().is_empty());

    run_job::<P>(&handler, "job-after", "incremental").await;
    let after = record_of(&app, "job-after").await;
    assert_eq!(
        after["stats"]["shardsUpdated"], 0,
        "its own write is not a change: {after}"
    );
    assert!(
        broker.peek(SYNC_OUTBOUND).unwrap().is_empty(),
        "and sends nothing back"
    );

    // Deleted in Castiel: gone at the provider, and only that record.
    let sent = app
        .cli_json(&["shards", "delete", &shard_id, "--tenant", "t1"])
        .await;
    assert_eq!(sent[0]["writeBack"]["operation"], "delete", "{sent}");
    for message in broker.peek(SYNC_OUTBOUND).unwrap() {
        handler.deliver("SyncOutbound", &message).await;
        broker.delete_unlocked(message.sequence_number).unwrap();
    }
    assert_eq!(fake.name_at_provider(&ids[0]), None);
    assert_eq!(
        fake.name_at_provider(&ids[1]).as_deref(),
        Some("Record 00001")
    );
}

/// Runs every story of the suite for one provider.
macro_rules! conformance {
    ($($module:ident: $fake:ty),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn a_full_sync_reads_every_page_into_shards() {
                super::a_full_sync_reads_every_page_into_shards::<$fake>().await
            }
            #[tokio::test]
            async fn an_incremental_sync_brings_updates_creations_and_deletions() {
                super::an_incremental_sync_brings_updates_creations_and_deletions::<$fake>().await
            }
            #[tokio::test]
            async fn a_record_the_mapping_cannot_take_fails_alone_and_is_synced_once_mended() {
                super::a_record_the_mapping_cannot_take_fails_alone_and_is_synced_once_mended::<$fake>().await
            }
            #[tokio::test]
            async fn a_cursor_the_provider_does_not_honour_is_dropped_and_the_entity_read_again() {
                super::a_cursor_the_provider_does_not_honour_is_dropped_and_the_entity_read_again::<$fake>().await
            }
            #[tokio::test]
            async fn a_refresh_token_the_provider_refuses_fails_the_job_for_good_and_flags_the_integration() {
                super::a_refresh_token_the_provider_refuses_fails_the_job_for_good_and_flags_the_integration::<$fake>().await
            }
            #[tokio::test]
            async fn a_token_that_expires_mid_sync_is_refreshed_once_and_the_sync_finishes() {
                super::a_token_that_expires_mid_sync_is_refreshed_once_and_the_sync_finishes::<$fake>().await
            }
            #[tokio::test]
            async fn a_rotated_refresh_token_is_stored_before_it_is_used() {
                super::a_rotated_refresh_token_is_stored_before_it_is_used::<$fake>().await
            }
            #[tokio::test]
            async fn throttling_is_waited_out_for_as_long_as_the_provider_asks() {
                super::throttling_is_waited_out_for_as_long_as_the_provider_asks::<$fake>().await
            }
            #[tokio::test]
            async fn a_failed_request_is_retried_in_place_without_costing_an_attempt() {
                super::a_failed_request_is_retried_in_place_without_costing_an_attempt::<$fake>().await
            }
            #[tokio::test]
            async fn a_forged_webhook_is_refused_and_queues_nothing() {
                super::a_forged_webhook_is_refused_and_queues_nothing::<$fake>().await
            }
            #[tokio::test]
            async fn a_duplicate_notification_is_processed_once() {
                super::a_duplicate_notification_is_processed_once::<$fake>().await
            }
            #[tokio::test]
            async fn a_burst_of_notifications_brings_every_change() {
                super::a_burst_of_notifications_brings_every_change::<$fake>().await
            }
            #[tokio::test]
            async fn the_subscription_handshake_is_answered() {
                super::the_subscription_handshake_is_answered::<$fake>().await
            }
            #[tokio::test]
            async fn the_local_runtime_syncs_on_demand_and_takes_webhooks() {
                super::the_local_runtime_syncs_on_demand_and_takes_webhooks::<$fake>().await
            }
            #[tokio::test]
            async fn a_sync_killed_mid_way_resumes_from_its_checkpoint_without_duplicates() {
                super::a_sync_killed_mid_way_resumes_from_its_checkpoint_without_duplicates::<$fake>().await
            }
            #[tokio::test]
            async fn an_edit_in_castiel_is_written_back_once_and_read_back_as_no_change() {
                super::an_edit_in_castiel_is_written_back_once_and_read_back_as_no_change::<$fake>().await
            }
        }
    )*};
}

conformance! {
    salesforce: FakeSalesforce,
    bulk_import: ImportFolder,
    dynamics365: FakeDynamics,
    onedrive: GraphUnderTest<OneDriveService>,
    teams: GraphUnderTest<TeamsService>,
    zoom: FakeZoom,
    google_drive: DriveUnderTest,
    gong: FakeGong,
}

/// A folder of exports, as a bulk-import integration reads it: each change is a new file, as
/// an exporting system drops them.
pub struct ImportFolder {
    dir: tempfile::TempDir,
    files: std::sync::atomic::AtomicUsize,
    next_id: std::sync::atomic::AtomicUsize,
}

impl ImportFolder {
    /// Writes a file of rows (id, name, deleted) stamped now.
    fn drop_file(&self, rows: &[(String, String, bool)]) {
        use std::sync::atomic::Ordering;
        let n = self.files.fetch_add(1, Ordering::SeqCst);
        let modified = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut csv = String::from("id,name,modified_at,_deleted\n");
        for (id, name, deleted) in rows {
            csv.push_str(&format!("{id},{name},{modified},{deleted}\n"));
        }
        std::fs::write(self.dir.path().join(format!("documents-{n:04}.csv")), csv).unwrap();
    }
}

impl UnderTest for ImportFolder {
    const PROVIDER: &'static str = "bulk_import";
    const ENTITY: &'static str = "documents";
    const NAME_FIELD: &'static str = "name";

    async fn start() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            files: Default::default(),
            next_id: Default::default(),
        }
    }

    fn connection(&self) -> Value {
        // The suite writes its exports and syncs at once: they count as settled, as an export
        // dropped minutes before its scheduled sync does.
        json!({"path": self.dir.path(), "settleSeconds": "0"})
    }

    fn credentials(&self) -> Value {
        json!({})
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        use std::sync::atomic::Ordering;
        let rows: Vec<(String, String, bool)> = names
            .iter()
            .map(|name| {
                let id = format!("doc-{:05}", self.next_id.fetch_add(1, Ordering::SeqCst));
                (id, name.clone(), false)
            })
            .collect();
        self.drop_file(&rows);
        rows.into_iter().map(|(id, _, _)| id).collect()
    }

    fn rename(&self, id: &str, name: &str) {
        self.drop_file(&[(id.to_string(), name.to_string(), false)]);
    }

    fn delete(&self, id: &str) {
        self.drop_file(&[(id.to_string(), String::new(), true)]);
    }

    fn expire_token_after(&self, _requests: usize) -> Option<()> {
        None
    }

    fn token_refreshes(&self) -> usize {
        0
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        Vec::new()
    }

    fn throttle_next(&self) -> Option<()> {
        None
    }

    fn fail_next(&self) -> Option<()> {
        None
    }

    fn hold_second_page(&self) -> Option<()> {
        None
    }

    fn release(&self) {}

    fn requests(&self) -> usize {
        0
    }

    fn webhook(&self, _id: &str) -> Option<Delivery> {
        None
    }

    fn forged_webhook(&self, _id: &str) -> Option<Delivery> {
        None
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        None
    }
}

impl UnderTest for FakeSalesforce {
    const PROVIDER: &'static str = "salesforce";
    const ENTITY: &'static str = "Account";
    const NAME_FIELD: &'static str = "Name";
    const WRITES_BACK: bool = true;

    fn name_at_provider(&self, id: &str) -> Option<String> {
        let record = self.record("Account", id)?;
        record["Name"].as_str().map(str::to_string)
    }

    async fn start() -> Self {
        let fake = FakeSalesforce::start().await;
        fake.org.lock().unwrap().rotate_refresh_tokens = true;
        fake
    }

    fn connection(&self) -> Value {
        json!({"loginHost": self.url, "organizationId": crate::fake_salesforce::ORG_ID})
    }

    fn credentials(&self) -> Value {
        FakeSalesforce::credentials(self)
    }

    /// Records are stamped a few seconds in the past: Salesforce reads deletions by whole
    /// seconds (`getDeleted` ignores fractions), so a change in the very second a sync runs
    /// is only seen by the next one.
    fn create(&self, names: &[String]) -> Vec<String> {
        let now = chrono::Utc::now() - chrono::Duration::seconds(5);
        let known = {
            let org = self.org.lock().unwrap();
            org.records.get("Account").map_or(0, Vec::len) + org.deleted.len()
        };
        let ids: Vec<String> = (known..known + names.len())
            .map(|i| format!("001{i:015}"))
            .collect();
        self.load(
            "Account",
            ids.iter()
                .zip(names)
                .map(|(id, name)| (json!({"Id": id, "Name": name}), now)),
        );
        ids
    }

    fn rename(&self, id: &str, name: &str) {
        self.add(
            "Account",
            json!({"Id": id, "Name": name}),
            chrono::Utc::now() - chrono::Duration::seconds(2),
        );
    }

    fn delete(&self, id: &str) {
        // Salesforce logs deletions by the whole minute: one in the minute under way is read
        // by the next sync after it.
        FakeSalesforce::delete(
            self,
            "Account",
            id,
            chrono::Utc::now() - chrono::Duration::minutes(1),
        );
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.org.lock().unwrap().expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        self.org.lock().unwrap().token_refreshes
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.org
            .lock()
            .unwrap()
            .refresh_tokens
            .iter()
            .cloned()
            .collect()
    }

    fn throttle_next(&self) -> Option<()> {
        // Salesforce answers an exhausted allocation with 403 REQUEST_LIMIT_EXCEEDED, which
        // stops the job until the next run (salesforce_sync covers it).
        None
    }

    fn fail_next(&self) -> Option<()> {
        self.org.lock().unwrap().fail_next = 1;
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        self.org.lock().unwrap().hold_locator = Some("01gRO00000000001-2000".into());
        Some(())
    }

    fn release(&self) {
        self.org.lock().unwrap().hold_locator = None;
        self.release.notify_waiters();
    }

    fn requests(&self) -> usize {
        FakeSalesforce::requests(self)
            .iter()
            .filter(|r| !r.starts_with("deleted "))
            .count()
    }

    fn webhook(&self, id: &str) -> Option<Delivery> {
        Some(Delivery {
            query: Vec::new(),
            headers: vec![("Content-Type".into(), "text/xml; charset=utf-8".into())],
            body: crate::salesforce_webhook::delivery(
                crate::fake_salesforce::ORG_ID,
                &[(&format!("04l{id}"), id, "Renamed by a webhook")],
            ),
        })
    }

    fn forged_webhook(&self, id: &str) -> Option<Delivery> {
        // Outbound Messages carry no signature: a forgery is a delivery naming an org that no
        // integration is connected to.
        Some(Delivery {
            query: Vec::new(),
            headers: vec![("Content-Type".into(), "text/xml; charset=utf-8".into())],
            body: crate::salesforce_webhook::delivery(
                "00D000000000099AAA",
                &[("04l1", id, "Forged")],
            ),
        })
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        None
    }
}

/// The Dataverse fake's knobs as the suite uses them.
impl UnderTest for FakeDynamics {
    const PROVIDER: &'static str = "dynamics365";
    const ENTITY: &'static str = "accounts";
    const NAME_FIELD: &'static str = "name";
    const WRITES_BACK: bool = true;

    fn name_at_provider(&self, id: &str) -> Option<String> {
        let rows = self.rows("accounts");
        let row = rows.iter().find(|row| row["accountid"] == id)?;
        row["name"].as_str().map(str::to_string)
    }

    async fn start() -> Self {
        FakeDynamics::start().await
    }

    fn connection(&self) -> Value {
        json!({
            "environmentUrl": self.url,
            "tokenUrl": self.token_url(),
            "organizationId": crate::fake_dynamics::ORGANIZATION_ID
        })
    }

    fn credentials(&self) -> Value {
        let mut credentials = FakeDynamics::credentials(self);
        credentials["webhook_key"] = json!("dataverse-webhook-key");
        credentials
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        let ids: Vec<String> = (0..names.len())
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        self.load(
            "accounts",
            ids.iter()
                .zip(names)
                .map(|(id, name)| json!({"accountid": id, "name": name})),
        );
        ids
    }

    fn rename(&self, id: &str, name: &str) {
        self.update("accounts", id, json!({"name": name}));
    }

    fn delete(&self, id: &str) {
        FakeDynamics::delete(self, "accounts", id);
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.state.lock().unwrap().entra.expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        FakeDynamics::token_refreshes(self)
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .entra
            .refresh_tokens
            .iter()
            .cloned()
            .collect()
    }

    fn throttle_next(&self) -> Option<()> {
        self.state.lock().unwrap().throttle = Some((1, 1));
        Some(())
    }

    fn fail_next(&self) -> Option<()> {
        self.state.lock().unwrap().unavailable = 1;
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        // The request for the second page is throttled for longer than the test takes to
        // kill the handler: the first page is checkpointed while the adapter waits.
        let mut state = self.state.lock().unwrap();
        state.throttle = Some((usize::MAX, 20));
        state.throttle_after = Some(1);
        Some(())
    }

    fn release(&self) {
        let mut state = self.state.lock().unwrap();
        state.throttle = None;
        state.throttle_after = None;
    }

    fn requests(&self) -> usize {
        FakeDynamics::requests(self).len()
    }

    fn webhook(&self, id: &str) -> Option<Delivery> {
        let (headers, body) = FakeDynamics::webhook(self, "Update", "account", id);
        let mut headers = headers;
        headers.push(("x-webhook-key".into(), "dataverse-webhook-key".into()));
        Some(Delivery {
            // As registered behind the Functions host: `code` is the host's function key.
            query: vec![("code".into(), "the-hosts-function-key".into())],
            headers,
            body,
        })
    }

    fn forged_webhook(&self, id: &str) -> Option<Delivery> {
        let (headers, body) = FakeDynamics::webhook(self, "Update", "account", id);
        Some(Delivery {
            query: vec![("code".into(), "a-guessed-key".into())],
            headers,
            body,
        })
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        None
    }
}

/// Subscribes the integration through `handler local`'s front door, which answers Graph's
/// validation handshake, and returns the subscription Graph now holds.
async fn subscribe(graph: &FakeGraph, app: &TestApp) -> crate::fake_graph::Subscription {
    let runtime = app.start_local().await;
    let done = app
        .cli_json(&["integrations", "subscribe", INTEGRATION, "--tenant", "t1"])
        .await;
    runtime.kill_9().await;
    assert_eq!(done["created"], 1, "{done}");
    let subscriptions = graph.subscriptions();
    assert_eq!(subscriptions.len(), 1);
    subscriptions[0].clone()
}

/// A change notification for `subscription` as Graph posts it.
fn notification(
    subscription: &crate::fake_graph::Subscription,
    client_state: &str,
    resource: &str,
    id: &str,
) -> Delivery {
    Delivery {
        query: Vec::new(),
        headers: vec![(
            "Content-Type".into(),
            "application/json; charset=utf-8".into(),
        )],
        body: json!({"value": [{
            "id": format!("notification-{id}"),
            "subscriptionId": subscription.id,
            "subscriptionExpirationDateTime": subscription.expiration.to_rfc3339(),
            "clientState": client_state,
            "changeType": "updated",
            "resource": resource,
            "tenantId": crate::fake_entra::TENANT,
            "resourceData": {"id": id}
        }]})
        .to_string(),
    }
}

/// Graph's validation request and the answer it waits for.
fn graph_handshake() -> Option<(Delivery, &'static str, String)> {
    let token = "Validation: Token issued at 2026-11-22 07:00:00+00:00";
    Some((
        Delivery {
            query: vec![("validationToken".into(), token.into())],
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            body: String::new(),
        },
        "text/plain",
        token.to_string(),
    ))
}

/// What differs between the Graph services the suite drives: OneDrive's files of one drive and
/// Teams' posts of one channel. Everything else is the same fake.
pub trait GraphService {
    const PROVIDER: &'static str;
    const ENTITY: &'static str;
    const NAME_FIELD: &'static str;
    const SEVERAL_PAGES: usize;
    const PAGE: usize;
    /// The connection settings that say which drive or channel.
    fn scope() -> Value;
    fn create(graph: &FakeGraph, name: &str) -> String;
    fn rename(graph: &FakeGraph, id: &str, name: &str);
    fn delete(graph: &FakeGraph, id: &str);
    /// Whether Castiel's changes are written back.
    const WRITES_BACK: bool;
    /// The name of item `id`, while it lives.
    fn name_of(_graph: &FakeGraph, _id: &str) -> Option<String> {
        None
    }
    /// The `resource` a notification about item `id` names.
    fn resource(subscription: &crate::fake_graph::Subscription, id: &str) -> String;
}

const DRIVE: &str = "b!drive-1";
const TEAM: &str = "fbe2bf47-16c8-47cf-b4a5-4b9b187c508b";
const CHANNEL: &str = "19:4a95f7d8db4c4e7fae857bcebe0623e6@thread.tacv2";

/// OneDrive: one drive of the Graph fake.
pub struct OneDriveService;

impl GraphService for OneDriveService {
    const PROVIDER: &'static str = "onedrive";
    const ENTITY: &'static str = "driveItem";
    const NAME_FIELD: &'static str = "name";
    const SEVERAL_PAGES: usize = 2500;
    const PAGE: usize = 1000;

    fn scope() -> Value {
        json!({"driveId": DRIVE})
    }

    fn create(graph: &FakeGraph, name: &str) -> String {
        graph.add_item(DRIVE, name, false)
    }

    fn rename(graph: &FakeGraph, id: &str, name: &str) {
        graph.rename_item(DRIVE, id, name);
    }

    fn delete(graph: &FakeGraph, id: &str) {
        graph.delete_item(DRIVE, id);
    }

    const WRITES_BACK: bool = true;

    fn name_of(graph: &FakeGraph, id: &str) -> Option<String> {
        graph.item(DRIVE, id).map(|item| item.name)
    }

    fn resource(subscription: &crate::fake_graph::Subscription, _id: &str) -> String {
        subscription.resource.clone()
    }
}

/// Teams: one channel of the Graph fake. Graph pages channel messages by 50, and Teams allows
/// 4 requests a second per channel.
pub struct TeamsService;

impl GraphService for TeamsService {
    const PROVIDER: &'static str = "teams";
    const ENTITY: &'static str = "channelMessage";
    const NAME_FIELD: &'static str = "body.content";
    const SEVERAL_PAGES: usize = 120;
    const PAGE: usize = 50;
    const WRITES_BACK: bool = false;

    fn scope() -> Value {
        json!({"teamId": TEAM, "channelIds": [CHANNEL]})
    }

    fn create(graph: &FakeGraph, name: &str) -> String {
        graph.post_message(TEAM, CHANNEL, name)
    }

    fn rename(graph: &FakeGraph, id: &str, name: &str) {
        graph.edit_message(TEAM, CHANNEL, id, name);
    }

    fn delete(graph: &FakeGraph, id: &str) {
        graph.delete_message(TEAM, CHANNEL, id);
    }

    fn resource(_subscription: &crate::fake_graph::Subscription, id: &str) -> String {
        format!("teams('{TEAM}')/channels('{CHANNEL}')/messages('{id}')")
    }
}

/// A Graph service of the Graph fake, with the subscription its webhooks go through.
pub struct GraphUnderTest<S> {
    graph: FakeGraph,
    subscription: std::sync::Mutex<Option<crate::fake_graph::Subscription>>,
    service: std::marker::PhantomData<S>,
}

impl<S: GraphService> GraphUnderTest<S> {
    fn knobs(&self) -> std::sync::MutexGuard<'_, crate::fake_graph::Graph> {
        self.graph.state.lock().unwrap()
    }

    fn notification(&self, id: &str, client_state: Option<&str>) -> Option<Delivery> {
        let subscription = self.subscription.lock().unwrap().clone()?;
        let kept = subscription.client_state.clone().unwrap_or_default();
        let resource = S::resource(&subscription, id);
        Some(notification(
            &subscription,
            client_state.unwrap_or(&kept),
            &resource,
            id,
        ))
    }
}

impl<S: GraphService> UnderTest for GraphUnderTest<S> {
    const PROVIDER: &'static str = S::PROVIDER;
    const ENTITY: &'static str = S::ENTITY;
    const NAME_FIELD: &'static str = S::NAME_FIELD;
    const SEVERAL_PAGES: usize = S::SEVERAL_PAGES;
    const PAGE: usize = S::PAGE;
    const WRITES_BACK: bool = S::WRITES_BACK;
    // Subscriptions without resource data: a notification names the item or message, and the
    // sync reads the drive's or the channel's changes since.
    const NOTIFIES_ONLY_OF_CHANGE: bool = true;

    fn name_at_provider(&self, id: &str) -> Option<String> {
        S::name_of(&self.graph, id)
    }

    async fn start() -> Self {
        Self {
            graph: FakeGraph::start().await,
            subscription: Default::default(),
            service: std::marker::PhantomData,
        }
    }

    fn connection(&self) -> Value {
        let mut connection = S::scope();
        connection["tokenUrl"] = json!(self.graph.token_url());
        connection["apiBaseUrl"] = json!(self.graph.api_base());
        connection
    }

    fn credentials(&self) -> Value {
        self.graph.credentials()
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .map(|name| S::create(&self.graph, name))
            .collect()
    }

    fn rename(&self, id: &str, name: &str) {
        S::rename(&self.graph, id, name);
    }

    fn delete(&self, id: &str) {
        S::delete(&self.graph, id);
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.knobs().entra.expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        self.graph.token_refreshes()
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.knobs().entra.refresh_tokens.iter().cloned().collect()
    }

    fn throttle_next(&self) -> Option<()> {
        self.knobs().throttle = Some((1, 1));
        Some(())
    }

    fn fail_next(&self) -> Option<()> {
        self.knobs().unavailable = 1;
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        let mut graph = self.knobs();
        graph.throttle = Some((usize::MAX, 20));
        graph.throttle_after = Some(1);
        Some(())
    }

    fn release(&self) {
        let mut graph = self.knobs();
        graph.throttle = None;
        graph.throttle_after = None;
    }

    fn requests(&self) -> usize {
        self.graph.requests().len()
    }

    fn webhook(&self, id: &str) -> Option<Delivery> {
        self.notification(id, None)
    }

    fn forged_webhook(&self, id: &str) -> Option<Delivery> {
        self.notification(id, Some("a-guessed-client-state"))
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        graph_handshake()
    }

    async fn connect_webhooks(&self, app: &TestApp) {
        let subscription = subscribe(&self.graph, app).await;
        *self.subscription.lock().unwrap() = Some(subscription);
    }
}

/// The Zoom fake's knobs as the suite uses them: meetings, with deletions by webhook.
impl UnderTest for FakeZoom {
    const PROVIDER: &'static str = "zoom";
    const ENTITY: &'static str = "meetings";
    const NAME_FIELD: &'static str = "topic";
    const PAGE: usize = 300;
    const KEEPS_CURSOR: bool = false;
    const WRITES_BACK: bool = true;

    /// The app was given `meeting:write`, which writing back needs.
    async fn start() -> Self {
        let zoom = FakeZoom::start().await;
        zoom.state.lock().unwrap().app_scopes = "meeting:read meeting:write recording:read";
        zoom
    }

    fn name_at_provider(&self, id: &str) -> Option<String> {
        self.meeting(id).map(|m| m.topic)
    }

    fn connection(&self) -> Value {
        json!({"tokenUrl": self.token_url(), "apiBaseUrl": self.api_base()})
    }

    fn credentials(&self) -> Value {
        FakeZoom::credentials(self)
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        names.iter().map(|name| self.add_meeting(name)).collect()
    }

    fn rename(&self, id: &str, name: &str) {
        self.rename_meeting(id, name);
    }

    fn delete(&self, id: &str) {
        self.delete_meeting(id);
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.state.lock().unwrap().expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        FakeZoom::token_refreshes(self)
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .refresh_tokens
            .iter()
            .cloned()
            .collect()
    }

    fn throttle_next(&self) -> Option<()> {
        self.state.lock().unwrap().throttle = Some((1, 1));
        Some(())
    }

    fn fail_next(&self) -> Option<()> {
        self.state.lock().unwrap().unavailable = 1;
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        let mut state = self.state.lock().unwrap();
        state.throttle = Some((usize::MAX, 20));
        state.throttle_after = Some(1);
        Some(())
    }

    fn release(&self) {
        let mut state = self.state.lock().unwrap();
        state.throttle = None;
        state.throttle_after = None;
    }

    fn requests(&self) -> usize {
        FakeZoom::requests(self).len()
    }

    fn webhook(&self, id: &str) -> Option<Delivery> {
        Some(zoom_delivery(self.webhook(
            "meeting.updated",
            json!({"id": id.parse::<u64>().unwrap(), "topic": "changed"}),
        )))
    }

    fn forged_webhook(&self, id: &str) -> Option<Delivery> {
        let mut delivery = zoom_delivery(
            self.webhook("meeting.updated", json!({"id": id.parse::<u64>().unwrap()})),
        );
        for (name, value) in &mut delivery.headers {
            if name.eq_ignore_ascii_case("x-zm-signature") {
                *value = format!("v0={}", "0".repeat(64));
            }
        }
        Some(delivery)
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        let (challenge, answer) = self.url_validation();
        Some((
            zoom_delivery(challenge),
            "application/json",
            answer.to_string(),
        ))
    }

    fn deletion_webhook(&self, id: &str) -> Option<Delivery> {
        Some(zoom_delivery(self.webhook(
            "meeting.deleted",
            json!({"id": id.parse::<u64>().unwrap()}),
        )))
    }
}

/// A Zoom delivery, to the URL that names the integration.
fn zoom_delivery((headers, body): (Vec<(String, String)>, String)) -> Delivery {
    Delivery {
        query: vec![("integration".into(), INTEGRATION.into())],
        headers,
        body,
    }
}

/// The Google Drive fake as the suite uses it: My Drive's files.
pub struct DriveUnderTest {
    drive: FakeGoogleDrive,
    channel: std::sync::Mutex<Option<String>>,
}

impl UnderTest for DriveUnderTest {
    const NOTIFIES_ONLY_OF_CHANGE: bool = true;
    const PROVIDER: &'static str = "google_drive";
    const ENTITY: &'static str = "files";
    const NAME_FIELD: &'static str = "name";
    const PAGE: usize = 1000;
    const ROTATES: bool = false;
    const WRITES_BACK: bool = true;

    /// The operator consented to the `drive` scope, which writing back needs.
    async fn start() -> Self {
        let drive = FakeGoogleDrive::start().await;
        drive.state.lock().unwrap().consent = crate::fake_google_drive::FULL_SCOPE;
        Self {
            drive,
            channel: Default::default(),
        }
    }

    fn name_at_provider(&self, id: &str) -> Option<String> {
        let file = self.drive.file(id).filter(|f| !f.trashed)?;
        Some(file.name)
    }

    fn connection(&self) -> Value {
        json!({"tokenUrl": self.drive.token_url(), "apiBaseUrl": self.drive.api_base()})
    }

    fn credentials(&self) -> Value {
        self.drive.credentials()
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        names.iter().map(|name| self.drive.add_file(name)).collect()
    }

    fn rename(&self, id: &str, name: &str) {
        self.drive.rename_file(id, name);
    }

    fn delete(&self, id: &str) {
        self.drive.delete_file(id);
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.drive.state.lock().unwrap().expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        self.drive.token_refreshes()
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.drive
            .state
            .lock()
            .unwrap()
            .refresh_tokens
            .iter()
            .cloned()
            .collect()
    }

    fn throttle_next(&self) -> Option<()> {
        self.drive.state.lock().unwrap().throttle = Some((1, 1));
        Some(())
    }

    fn fail_next(&self) -> Option<()> {
        self.drive.state.lock().unwrap().rate_limited = Some((1, "userRateLimitExceeded"));
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        // A full sync asks for the start token, then the first page of files.
        let mut state = self.drive.state.lock().unwrap();
        state.throttle = Some((usize::MAX, 20));
        state.throttle_after = Some(2);
        Some(())
    }

    fn release(&self) {
        let mut state = self.drive.state.lock().unwrap();
        state.throttle = None;
        state.throttle_after = None;
    }

    fn requests(&self) -> usize {
        self.drive.requests().len()
    }

    fn webhook(&self, _id: &str) -> Option<Delivery> {
        let channel = self.channel.lock().unwrap().clone()?;
        Some(Delivery {
            query: Vec::new(),
            headers: self.drive.change_message(&channel, None),
            body: String::new(),
        })
    }

    fn forged_webhook(&self, _id: &str) -> Option<Delivery> {
        let channel = self.channel.lock().unwrap().clone()?;
        Some(Delivery {
            query: Vec::new(),
            headers: self.drive.change_message(&channel, Some("a-guessed-token")),
            body: String::new(),
        })
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        None
    }

    async fn connect_webhooks(&self, app: &TestApp) {
        let runtime = app.start_local().await;
        let done = app
            .cli_json(&["integrations", "subscribe", INTEGRATION, "--tenant", "t1"])
            .await;
        runtime.kill_9().await;
        assert_eq!(done["created"], 1, "{done}");
        let channels = self.drive.channels();
        assert_eq!(channels.len(), 1);
        *self.channel.lock().unwrap() = Some(channels[0].id.clone());
    }
}

/// The URL a Gong rule posts to in these stories; the JWT names it.
const GONG_WEBHOOK_URL: &str =
    "https://func-sync-dev.azurewebsites.net/api/webhooks/gong?integration=int-under-test";

/// The Gong fake as the suite uses it: calls of the last hours, OAuth with single-use refresh
/// tokens, and JWT-signed webhooks. Gong tells of no deletions.
impl UnderTest for FakeGong {
    const PROVIDER: &'static str = "gong";
    const ENTITY: &'static str = "calls";
    const NAME_FIELD: &'static str = "title";
    /// Gong pages by 100 and allows 3 requests a second.
    const SEVERAL_PAGES: usize = 250;
    const PAGE: usize = 100;
    const SEES_DELETIONS: bool = false;

    async fn start() -> Self {
        FakeGong::start().await
    }

    fn connection(&self) -> Value {
        json!({"tokenUrl": self.token_url(), "apiBaseUrl": self.api_base(),
               "webhookPublicKey": self.public_key_pem(), "webhookUrl": GONG_WEBHOOK_URL})
    }

    fn credentials(&self) -> Value {
        self.oauth_credentials()
    }

    fn create(&self, names: &[String]) -> Vec<String> {
        let started = chrono::Utc::now() - chrono::Duration::hours(2);
        names
            .iter()
            .enumerate()
            .map(|(i, name)| self.add_call(name, started + chrono::Duration::seconds(i as i64)))
            .collect()
    }

    fn rename(&self, id: &str, name: &str) {
        self.rename_call(id, name);
    }

    fn delete(&self, id: &str) {
        self.delete_call(id);
    }

    fn expire_token_after(&self, requests: usize) -> Option<()> {
        self.state.lock().unwrap().expire_token_after = Some(requests);
        Some(())
    }

    fn token_refreshes(&self) -> usize {
        FakeGong::token_refreshes(self)
    }

    fn live_refresh_tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .refresh_tokens
            .iter()
            .cloned()
            .collect()
    }

    fn throttle_next(&self) -> Option<()> {
        self.state.lock().unwrap().throttle = Some((1, 1));
        Some(())
    }

    fn fail_next(&self) -> Option<()> {
        self.state.lock().unwrap().unavailable = 1;
        Some(())
    }

    fn hold_second_page(&self) -> Option<()> {
        let mut state = self.state.lock().unwrap();
        state.throttle = Some((usize::MAX, 20));
        state.throttle_after = Some(1);
        Some(())
    }

    fn release(&self) {
        let mut state = self.state.lock().unwrap();
        state.throttle = None;
        state.throttle_after = None;
    }

    fn requests(&self) -> usize {
        FakeGong::requests(self).len()
    }

    fn webhook(&self, id: &str) -> Option<Delivery> {
        let (headers, body) = FakeGong::webhook(self, id, GONG_WEBHOOK_URL);
        Some(Delivery {
            query: vec![("integration".into(), INTEGRATION.into())],
            headers,
            body,
        })
    }

    /// An unsigned delivery: the same body without the JWT.
    fn forged_webhook(&self, id: &str) -> Option<Delivery> {
        let (headers, body) = FakeGong::webhook(self, id, GONG_WEBHOOK_URL);
        Some(Delivery {
            query: vec![("integration".into(), INTEGRATION.into())],
            headers: headers
                .into_iter()
                .filter(|(name, _)| !name.eq_ignore_ascii_case("authorization"))
                .collect(),
            body,
        })
    }

    fn handshake(&self) -> Option<(Delivery, &'static str, String)> {
        None
    }
}
