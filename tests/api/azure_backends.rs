//! The production backends the handler calls itself (Service Bus REST send, Event Grid, Key
//! Vault) against loopback fakes that check signatures, tokens and headers; and the choice of
//! backends by app settings.

use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::{
    AccessToken, Secret as AzureSecret, TokenCredential, TokenRequestOptions,
};
use azure_core::http::{
    AsyncRawResponse, ClientOptions, HttpClient, Request, Transport, new_http_client,
};
use azure_core::time::{Duration as AzureDuration, OffsetDateTime};
use chrono::Utc;
use serde_json::{Value, json};

use handler::events::{EventGridAuth, EventGridPublisher, EventSink, Schema};
use handler::identity::TokenSource;
use handler::model::Event;
use handler::queue::{
    MessageQueue, OutgoingMessage, QueueError, ServiceBusConfig, ServiceBusSender,
};
use handler::secrets::{KeyVaultSecrets, Secret, SecretStore};

use crate::fake_azure::{
    BEARER, FakeEventGrid, FakeKeyVault, FakeServiceBus, HeldMessage, SAS_KEY,
};
use crate::fake_host::{HostedHandler, service_bus_message, timer_first_run};
use crate::helpers::{TestApp, integration_of};

#[derive(Debug)]
struct StaticToken;

#[async_trait]
impl TokenCredential for StaticToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken {
            token: AzureSecret::new(BEARER),
            expires_on: OffsetDateTime::now_utc() + AzureDuration::hours(1),
        })
    }
}

struct StaticSource;

#[async_trait]
impl TokenSource for StaticSource {
    async fn token(&self, _scope: &str) -> Result<String, String> {
        Ok(BEARER.to_string())
    }
}

/// The custom handler with Service Bus as its queues, `service_bus`.
async fn handler_on(app: &TestApp, service_bus: &FakeServiceBus) -> HostedHandler {
    let connection = service_bus.connection_string(SAS_KEY);
    app.host_handler_with(&[("ServiceBusConnection", connection.as_str())])
        .await
}

/// Delivers a write-back whose body is `body` to SyncOutbound, as the host does on its third
/// delivery, and checks that the host takes the answer.
async fn push_write_back(handler: &HostedHandler, body: &str) {
    let envelope = service_bus_message("SyncOutbound", body, "int-1:evt-1", 3, Some("int-1"));
    let res = handler.invoke("SyncOutbound", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");
}

#[tokio::test]
async fn the_scheduler_sends_its_jobs_to_service_bus_signed_with_sas() {
    let (service_bus, app) = (FakeServiceBus::start().await, TestApp::new());
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let handler = handler_on(&app, &service_bus).await;

    let res = handler
        .invoke("SyncScheduler", &timer_first_run("SyncScheduler", "timer"))
        .await;
    assert!(res.host_accepts(), "{res:?}");

    let sent = service_bus.sent();
    assert_eq!(
        sent.len(),
        1,
        "refused: {:?}",
        service_bus.refusals.lock().unwrap()
    );
    assert_eq!(sent[0].queue, "sync-inbound-scheduled");
    let job: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(sent[0].broker_properties["MessageId"], job["jobId"]);
    assert_eq!(sent[0].headers["content-type"], "application/json");
    assert!(
        app.broker()
            .peek("sync-inbound-scheduled")
            .unwrap()
            .is_empty(),
        "not the embedded queue"
    );
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_through_service_bus_with_its_reason() {
    let (service_bus, app) = (FakeServiceBus::start().await, TestApp::new());
    let handler = handler_on(&app, &service_bus).await;
    push_write_back(&handler, "{not json").await;

    let sent = service_bus.sent();
    assert_eq!(sent[0].queue, "sync-deadletter");
    assert_eq!(
        sent[0].broker_properties["MessageId"],
        "sync-outbound:int-1:evt-1"
    );
    assert_eq!(sent[0].headers["deadletterreason"], "INVALID_MESSAGE");
    assert_eq!(sent[0].headers["originalsessionid"], "int-1");
    assert_eq!(sent[0].headers["originaldeliverycount"], "3");
    assert_eq!(sent[0].body, b"{not json");
}

#[tokio::test]
async fn a_poison_message_whose_reason_runs_over_lines_is_dead_lettered_all_the_same() {
    let (service_bus, app) = (FakeServiceBus::start().await, TestApp::new());
    let handler = handler_on(&app, &service_bus).await;
    // Its reason quotes the operation it could not read: two lines, and not ASCII.
    let body = r#"{"shardId":"s-1","tenantId":"t1","operation":"créer\nvite"}"#;

    push_write_back(&handler, body).await;

    let sent = service_bus.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].queue, "sync-deadletter");
    assert_eq!(sent[0].headers["deadletterreason"], "INVALID_MESSAGE");
    let description = &sent[0].headers["deadlettererrordescription"];
    assert!(
        description.contains("unknown variant `cr\\u{e9}er vite`"),
        "{description}"
    );
}

#[tokio::test]
async fn a_message_whose_derived_id_passes_service_bus_limit_is_sent_under_a_shortened_one() {
    let (service_bus, app) = (FakeServiceBus::start().await, TestApp::new());
    let handler = handler_on(&app, &service_bus).await;
    // A webhook job's id: its integration's (a GUID) and the provider's notification's.
    let id = format!(
        "wh_4f1c2a9e-0b7d-4c55-9a57-1e2f3a4b5c6d_{}",
        "a1b2c3d4-".repeat(9)
    );
    let envelope = service_bus_message("SyncInboundWebhook", "{not json", &id, 1, None);

    for _ in 0..2 {
        let answer = handler.invoke("SyncInboundWebhook", &envelope).await;
        assert!(answer.host_accepts(), "{answer:?}");
    }

    let ids: Vec<String> = service_bus
        .sent()
        .iter()
        .map(|m| {
            m.broker_properties["MessageId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids[0].len() <= 128 && ids[0].starts_with("sync-inbound-webhook:wh_4f1c2a9e"));
    assert_eq!(
        ids[0], ids[1],
        "sent again, the same MessageId: a duplicate"
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_and_the_error_does_not_show_it() {
    let service_bus = FakeServiceBus::start().await;
    let config =
        ServiceBusConfig::from_connection_string(&service_bus.connection_string("d3Jvbmcta2V5"))
            .unwrap();
    let err = ServiceBusSender::new(config)
        .send(OutgoingMessage::json(
            "sync-inbound-scheduled",
            "m1",
            &json!({}),
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Rejected(_)), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert!(!err.to_string().contains("d3Jvbmcta2V5"));
    assert_eq!(
        service_bus.refusals.lock().unwrap()[0],
        "the signature does not match"
    );
}

#[tokio::test]
async fn with_managed_identity_service_bus_gets_a_bearer_token_and_sessions_keep_their_id() {
    let service_bus = FakeServiceBus::start().await;
    let mut config =
        ServiceBusConfig::from_namespace("unused.servicebus.windows.net", Arc::new(StaticSource))
            .unwrap();
    config.endpoint = format!("http://{}", service_bus.host);
    let sender = ServiceBusSender::new(config);
    let at = Utc::now() + chrono::Duration::minutes(5);
    sender
        .send(
            OutgoingMessage::json("sync-outbound", "int-1:evt-9", &json!({"shardId": "s1"}))
                .in_session("int-1")
                .scheduled_at(at),
        )
        .await
        .unwrap();
    let sent = service_bus.sent();
    assert_eq!(sent[0].headers["authorization"], format!("Bearer {BEARER}"));
    assert_eq!(sent[0].broker_properties["SessionId"], "int-1");
    assert_eq!(
        sent[0].broker_properties["ScheduledEnqueueTimeUtc"],
        at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    );
    let err = sender
        .send(OutgoingMessage::json(
            "sync-outbound",
            "no-session",
            &json!({}),
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("SessionId was not set"), "{err}");
}

#[tokio::test]
async fn events_go_to_event_grid_as_cloudevents_with_the_topic_key() {
    let event_grid = FakeEventGrid::start("topic-key-1").await;
    let app = TestApp::new();
    let handler = app
        .host_handler_with(&[
            ("EVENTGRID_ENDPOINT", event_grid.endpoint.as_str()),
            ("EVENTGRID_KEY", "topic-key-1"),
        ])
        .await;

    assert!(
        handler
            .invoke("SyncScheduler", &timer_first_run("SyncScheduler", "timer"))
            .await
            .host_accepts()
    );

    let batches = event_grid.batches.lock().unwrap().clone();
    assert_eq!(
        batches[0].content_type,
        "application/cloudevents-batch+json; charset=utf-8"
    );
    let event = &batches[0].events[0];
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["type"], "integration.sync.check_due");
    assert!(app.events().is_empty(), "not the local event log");
}

#[tokio::test]
async fn events_event_grid_is_too_busy_for_are_posted_again_until_it_takes_them() {
    let event_grid = FakeEventGrid::start("topic-key-1").await;
    *event_grid.busy.lock().unwrap() = vec![(503, None), (429, Some(0))];
    let publisher = EventGridPublisher::new(
        &event_grid.endpoint,
        Schema::CloudEvents,
        EventGridAuth::Key("topic-key-1".into()),
    );
    let event = Event::new(
        "integration.sync.completed",
        "/tenants/t1/integrations/i1",
        "job-1",
        Utc::now(),
        json!({"n": 1}),
    );

    publisher
        .publish(std::slice::from_ref(&event))
        .await
        .unwrap();

    let events = event_grid.events();
    assert_eq!(events.len(), 1, "taken once, on the third post");
    assert_eq!(events[0]["id"], event.id);

    // A refusal is not posted again.
    *event_grid.busy.lock().unwrap() = vec![(400, None), (400, None)];
    let refused = publisher.publish(&[event]).await.unwrap_err();
    assert!(refused.0.contains("400"), "{}", refused.0);
    assert_eq!(event_grid.busy.lock().unwrap().len(), 1, "posted once");
}

#[tokio::test]
async fn the_event_grid_schema_with_a_bearer_token_and_batches_under_one_megabyte() {
    let event_grid = FakeEventGrid::start("unused").await;
    let publisher = EventGridPublisher::new(
        &event_grid.endpoint,
        Schema::EventGrid,
        EventGridAuth::Entra(Arc::new(StaticSource)),
    );
    let big = "x".repeat(300_000);
    let events: Vec<Event> = (0..5)
        .map(|i| {
            Event::new(
                "integration.sync.completed",
                format!("/integrations/{i}"),
                "job-1",
                Utc::now(),
                json!({"pad": big}),
            )
        })
        .collect();
    publisher.publish(&events).await.unwrap();
    let batches = event_grid.batches.lock().unwrap().clone();
    assert_eq!(
        batches.iter().map(|b| b.events.len()).collect::<Vec<_>>(),
        [3, 2]
    );
    assert_eq!(batches[0].content_type, "application/json");
    assert_eq!(
        batches[0].events[0]["eventType"],
        "integration.sync.completed"
    );
    assert_eq!(event_grid.events().len(), 5);

    let wrong = EventGridPublisher::new(
        &event_grid.endpoint,
        Schema::CloudEvents,
        EventGridAuth::Key("nope".into()),
    );
    let err = wrong.publish(&events[..1]).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
}

/// Sends what the Key Vault client addresses to `https://<vault>` to the loopback fake instead.
#[derive(Debug)]
struct Loopback {
    inner: Arc<dyn HttpClient>,
    port: u16,
}

#[async_trait]
impl HttpClient for Loopback {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let mut request = request.clone();
        let url = request.url_mut();
        url.set_scheme("http").unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        self.inner.execute_request(&request).await
    }
}

/// A loopback Key Vault, and the store's client of it, as the app makes one for
/// `https://kv-sync-dev.vault.azure.net/`.
async fn vault() -> (FakeKeyVault, KeyVaultSecrets) {
    let vault = FakeKeyVault::start().await;
    let port: u16 = vault.addr.rsplit(':').next().unwrap().parse().unwrap();
    let options = ClientOptions {
        transport: Some(Transport::new(Arc::new(Loopback {
            inner: new_http_client(None),
            port,
        }))),
        ..Default::default()
    };
    let secrets = KeyVaultSecrets::with_client_options(
        "https://kv-sync-dev.vault.azure.net/",
        Arc::new(StaticToken),
        options,
    )
    .unwrap();
    (vault, secrets)
}

#[tokio::test]
async fn credentials_live_in_key_vault_behind_its_challenge() {
    let (vault, secrets) = vault().await;

    assert!(secrets.get("int-t1--int-1").await.unwrap().is_none());
    secrets
        .set("int-t1--int-1", Secret::new(r#"{"refresh_token":"rt-1"}"#))
        .await
        .unwrap();
    assert_eq!(
        vault.secrets.lock().unwrap()["int-t1--int-1"],
        r#"{"refresh_token":"rt-1"}"#
    );
    assert_eq!(
        secrets
            .get("int-t1--int-1")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        r#"{"refresh_token":"rt-1"}"#
    );

    // A read within the cache's lifetime does not reach the vault.
    let before = vault.requests.lock().unwrap().len();
    secrets.get("int-t1--int-1").await.unwrap();
    assert_eq!(vault.requests.lock().unwrap().len(), before);
    let requests = vault.requests.lock().unwrap().clone();
    assert!(
        requests.len() >= 3,
        "the challenge was answered: {requests:?}"
    );
}

#[tokio::test]
async fn credentials_of_an_integration_registered_again_recover_its_deleted_secret() {
    let (vault, secrets) = vault().await;
    secrets
        .set("int-t1--int-1", Secret::new(r#"{"refresh_token":"rt-1"}"#))
        .await
        .unwrap();
    // The integration is deleted, its secret with it; the vault keeps the name for 90 days.
    vault.delete("int-t1--int-1");

    secrets
        .set("int-t1--int-1", Secret::new(r#"{"refresh_token":"rt-2"}"#))
        .await
        .unwrap();

    assert_eq!(
        vault.secrets.lock().unwrap()["int-t1--int-1"],
        r#"{"refresh_token":"rt-2"}"#,
        "recovered, then written over once the vault had it back"
    );
    assert!(vault.deleted.lock().unwrap().is_empty());
    let requests = vault.requests.lock().unwrap().clone();
    assert!(
        requests.contains(&"POST recover int-t1--int-1".to_string()),
        "{requests:?}"
    );
}

/// Starts the handler with `settings` and checks it refuses to: exit 2, each setting of `named`
/// named, none of `hidden` printed.
async fn assert_refused(settings: &[(&str, &str)], named: &[&str], hidden: &[&str]) {
    let app = TestApp::new();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .env("FUNC_SYNC_DATA_DIR", app.data_dir())
        .envs(settings.iter().copied())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in named {
        assert!(printed.contains(name), "{name} missing from: {printed}");
    }
    for value in hidden {
        assert!(!printed.contains(value), "`{value}` printed: {printed}");
    }
}

#[tokio::test]
async fn the_handler_refuses_to_start_with_bad_settings_and_names_each() {
    assert_refused(
        &[
            (
                "ServiceBusConnection",
                "Endpoint=sb://x/;SharedAccessKey=do-not-print",
            ),
            ("EVENTGRID_ENDPOINT", "ftp://nowhere"),
            ("SYNC_MAX_RECORDS", "0"),
        ],
        &[
            "ServiceBusConnection",
            "EVENTGRID_ENDPOINT",
            "SYNC_MAX_RECORDS",
        ],
        &["do-not-print"],
    )
    .await;
}

#[tokio::test]
async fn connection_strings_in_the_wrong_settings_are_refused_without_printing_their_keys() {
    assert_refused(
        &[
            (
                "COSMOS_ENDPOINT",
                "AccountEndpoint=https://acct.documents.azure.com:443/;AccountKey=cosmos-account-key==;",
            ),
            (
                "ServiceBusConnection__fullyQualifiedNamespace",
                "Endpoint=sb://sb-sync.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=sb-namespace-key=",
            ),
            ("KEY_VAULT_URL", "vault-name-only"),
        ],
        &[
            "COSMOS_ENDPOINT",
            "ServiceBusConnection__fullyQualifiedNamespace",
            "KEY_VAULT_URL",
        ],
        &["cosmos-account-key", "sb-namespace-key", "vault-name-only"],
    )
    .await;
}

#[tokio::test]
async fn operator_commands_use_the_configured_backends() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["sync", "int-1", "--tenant", "t1", "--json"])
        .env("FUNC_SYNC_DATA_DIR", app.data_dir())
        .env(
            "ServiceBusConnection",
            service_bus.connection_string(SAS_KEY),
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sent = service_bus.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].queue, "sync-inbound-scheduled");
    assert_eq!(sent[0].broker_properties["MessageId"], job["jobId"]);
    assert!(
        app.broker()
            .peek("sync-inbound-scheduled")
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_operator_command_says_what_it_keeps_here_while_other_backends_are_in_azure() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let set_credentials = |service_bus: Option<String>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"));
        command
            .args(["credentials", "set", "int-1", "--tenant", "t1"])
            .env("FUNC_SYNC_DATA_DIR", app.data_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(connection) = service_bus {
            command.env("ServiceBusConnection", connection);
        }
        async move {
            use tokio::io::AsyncWriteExt;
            let mut child = command.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(br#"{"api_key":"k-1"}"#).await.unwrap();
            drop(stdin);
            child.wait_with_output().await.unwrap()
        }
    };

    // Jobs go to Service Bus, but the vault was left out: the credentials stay here.
    let out = set_credentials(Some(service_bus.connection_string(SAS_KEY))).await;
    assert!(out.status.success());
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("KEY_VAULT_URL is not set"), "{warning}");
    assert!(warning.contains("secrets.json"), "{warning}");
    assert!(!warning.contains(SAS_KEY), "{warning}");

    // Everything embedded, as on a workstation: nothing to say.
    let out = set_credentials(None).await;
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `handler dead-letters ...` with Service Bus configured.
async fn dead_letters(
    app: &TestApp,
    service_bus: &FakeServiceBus,
    args: &[&str],
) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .arg("dead-letters")
        .args(args)
        .env("FUNC_SYNC_DATA_DIR", app.data_dir())
        .env(
            "ServiceBusConnection",
            service_bus.connection_string(SAS_KEY),
        )
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_poison_copy_listed_past_its_deliveries_keeps_its_own_reason() {
    let (service_bus, app) = (FakeServiceBus::start().await, TestApp::new());
    let handler = handler_on(&app, &service_bus).await;
    push_write_back(&handler, "{not json").await;

    // Each listing locks and unlocks the copy: a delivery. Past ten, the broker moves it to
    // the queue's own dead-letter subqueue and stamps its reason there.
    for _ in 0..12 {
        let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
        assert!(out.status.success());
    }

    assert_eq!(
        service_bus.held("sync-deadletter/$DeadLetterQueue").len(),
        1
    );
    let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["reason"], "INVALID_MESSAGE", "{listed}");
    assert_eq!(listed[0]["originalQueue"], "sync-outbound", "{listed}");
}

#[tokio::test]
async fn an_operator_lists_and_replays_service_bus_dead_letters_and_a_failed_resend_keeps_its_message()
 {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    // Three dead letters, as they end up on Service Bus: one the broker moved after too many
    // deliveries, one of a session queue, and a poison job the handler copied itself.
    let job = json!({"integrationId": "int-1", "tenantId": "t1", "jobId": "job-1"});
    let exhausted = service_bus.dead_letter(
        "sync-inbound-scheduled",
        HeldMessage::new("job-1", job.to_string().as_bytes(), &[]),
        "MaxDeliveryCountExceeded",
        "Message could not be consumed after 10 delivery attempts.",
    );
    let mut write_back =
        HeldMessage::new("wb-1", br#"{"shardId":"s-1"}"#, &[("tenant", json!("t1"))]);
    write_back.session_id = Some("int-1".into());
    let session = service_bus.dead_letter(
        "sync-outbound",
        write_back,
        "TTLExpiredException",
        "expired",
    );
    let copy = OutgoingMessage::json(
        "sync-deadletter",
        "sync-inbound-webhook:wh-9",
        &json!({"x": 1}),
    )
    .property("DeadLetterReason", "INVALID_MESSAGE")
    .property("DeadLetterErrorDescription", "webhook job: no entity")
    .property("OriginalQueue", "sync-inbound-webhook")
    .property("OriginalMessageId", "wh-9")
    .property("OriginalDeliveryCount", 1);
    let sender = ServiceBusSender::new(
        ServiceBusConfig::from_connection_string(&service_bus.connection_string(SAS_KEY)).unwrap(),
    );
    sender.send(copy).await.unwrap();

    let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_queue = |queue: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["originalQueue"] == queue)
            .unwrap_or_else(|| panic!("no dead letter of {queue} in {listed}"))
            .clone()
    };
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    let scheduled = by_queue("sync-inbound-scheduled");
    assert_eq!(scheduled["sequenceNumber"], exhausted);
    assert_eq!(scheduled["reason"], "MaxDeliveryCountExceeded");
    assert_eq!(scheduled["messageId"], "job-1");
    assert_eq!(scheduled["body"]["jobId"], "job-1");
    let outbound = by_queue("sync-outbound");
    assert_eq!(outbound["sessionId"], "int-1");
    assert_eq!(outbound["sequenceNumber"], session);
    let webhook = by_queue("sync-inbound-webhook");
    assert_eq!(webhook["reason"], "INVALID_MESSAGE");
    assert_eq!(webhook["messageId"], "wh-9");
    // Listing locked each message to read it and unlocked it again.
    assert_eq!(
        service_bus
            .held("sync-inbound-scheduled/$DeadLetterQueue")
            .len(),
        1
    );
    assert_eq!(service_bus.held("sync-deadletter").len(), 1);

    // sync-inbound-scheduled is busy: its message is not replayed and stays a dead letter.
    service_bus
        .unavailable
        .lock()
        .unwrap()
        .push("sync-inbound-scheduled".into());
    let out = dead_letters(&app, &service_bus, &["replay", "--all"]).await;
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(&format!(
            "not replayed {exhausted} to sync-inbound-scheduled"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 3 messages could not be sent"),
        "{stderr}"
    );
    let kept = service_bus.held("sync-inbound-scheduled/$DeadLetterQueue");
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].message_id, "job-1");
    assert!(
        service_bus
            .held("sync-outbound/$DeadLetterQueue")
            .is_empty()
    );
    assert!(service_bus.held("sync-deadletter").is_empty());
    let resent = service_bus.held("sync-outbound");
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0].session_id.as_deref(), Some("int-1"));
    assert_eq!(resent[0].message_id, format!("wb-1:replay-{session}"));
    assert_eq!(
        resent[0].properties["replayedfrom"],
        json!(session.to_string())
    );
    assert_eq!(resent[0].properties["tenant"], json!("t1"));
    assert!(!resent[0].properties.contains_key("deadletterreason"));
    let resent = service_bus.held("sync-inbound-webhook");
    assert_eq!(resent[0].body, br#"{"x":1}"#);

    // Once the queue takes messages again, the one left is replayed by its number.
    service_bus.unavailable.lock().unwrap().clear();
    let out = dead_letters(
        &app,
        &service_bus,
        &[
            "replay",
            &exhausted.to_string(),
            "--queue",
            "sync-inbound-scheduled",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        service_bus
            .held("sync-inbound-scheduled/$DeadLetterQueue")
            .is_empty()
    );
    assert_eq!(
        service_bus.held("sync-inbound-scheduled")[0].body,
        job.to_string().as_bytes()
    );
}

#[tokio::test]
async fn a_dead_letter_whose_locks_keep_lapsing_is_listed_once_and_replayed_once() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    let mut write_back =
        HeldMessage::new("wb-1", br#"{"shardId":"s-1"}"#, &[("tenant", json!("t1"))]);
    write_back.session_id = Some("int-1".into());
    let sequence = service_bus.dead_letter(
        "sync-outbound",
        write_back,
        "TTLExpiredException",
        "expired",
    );
    service_bus
        .lapsing_locks
        .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);

    let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "listed once: {listed}");

    // Sent and deleted while its lock is fresh, it is replayed and gone.
    let out = dead_letters(&app, &service_bus, &["replay", "--all"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        service_bus
            .held("sync-outbound/$DeadLetterQueue")
            .is_empty()
    );
    dead_letters(&app, &service_bus, &["replay", "--all"]).await;
    let sent: Vec<String> = service_bus
        .sent()
        .into_iter()
        .filter(|m| m.queue == "sync-outbound")
        .map(|m| {
            m.broker_properties["MessageId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(sent, [format!("wb-1:replay-{sequence}")]);
}

#[tokio::test]
async fn a_dead_letter_of_an_integration_named_in_another_script_is_listed_and_replayed() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    let mut write_back = HeldMessage::new(
        "intégration-1:évt-1",
        br#"{"shardId":"s-1"}"#,
        &[("tenant", json!("t1"))],
    );
    write_back.session_id = Some("intégration-1".into());
    let sequence = service_bus.dead_letter(
        "sync-outbound",
        write_back,
        "MaxDeliveryCountExceeded",
        "failed",
    );

    let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["messageId"], "intégration-1:évt-1", "{listed}");

    let out = dead_letters(&app, &service_bus, &["replay", &sequence.to_string()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = service_bus.sent();
    let replayed = sent.iter().find(|m| m.queue == "sync-outbound").unwrap();
    assert_eq!(replayed.broker_properties["SessionId"], "intégration-1");
}

#[tokio::test]
async fn a_dead_letter_another_operator_replays_meanwhile_is_reported_not_replayed() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    let job = json!({"integrationId": "int-1", "tenantId": "t1", "jobId": "job-1"});
    let sequence = service_bus.dead_letter(
        "sync-inbound-scheduled",
        HeldMessage::new("job-1", job.to_string().as_bytes(), &[]),
        "MaxDeliveryCountExceeded",
        "Message could not be consumed after 10 delivery attempts.",
    );
    service_bus
        .taken_once_read
        .lock()
        .unwrap()
        .push("sync-inbound-scheduled/$DeadLetterQueue".into());

    let out = dead_letters(&app, &service_bus, &["replay", &sequence.to_string()]).await;

    assert!(!out.status.success(), "nothing was replayed");
    let reason = String::from_utf8_lossy(&out.stderr);
    assert!(
        reason.contains(&format!("dead letters {sequence} were not replayed")),
        "{reason}"
    );
    assert!(
        service_bus
            .sent()
            .iter()
            .all(|m| m.queue != "sync-inbound-scheduled")
    );
}

#[tokio::test]
async fn dead_letters_past_one_whose_lock_lapsed_are_still_listed_and_replayed() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    let sequences: Vec<i64> = (1..=3)
        .map(|n| {
            let job =
                json!({"integrationId": "int-1", "tenantId": "t1", "jobId": format!("job-{n}")});
            service_bus.dead_letter(
                "sync-inbound-scheduled",
                HeldMessage::new(&format!("job-{n}"), job.to_string().as_bytes(), &[]),
                "MaxDeliveryCountExceeded",
                "Message could not be consumed after 10 delivery attempts.",
            )
        })
        .collect();
    let lapse_one = || {
        service_bus
            .lapsing_locks
            .store(1, std::sync::atomic::Ordering::SeqCst)
    };

    lapse_one();
    let out = dead_letters(&app, &service_bus, &["list", "--json"]).await;
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let numbers: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sequenceNumber"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, sequences, "{listed}");

    lapse_one();
    let last = sequences[2].to_string();
    let out = dead_letters(
        &app,
        &service_bus,
        &["replay", &last, "--queue", "sync-inbound-scheduled"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = service_bus.held("sync-inbound-scheduled");
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].message_id, format!("job-3:replay-{last}"));
    let left: Vec<String> = service_bus
        .held("sync-inbound-scheduled/$DeadLetterQueue")
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(
        left,
        ["job-1", "job-2"],
        "the others are unlocked where they were"
    );
}
