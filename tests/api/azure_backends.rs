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

use crate::fake_azure::{BEARER, FakeEventGrid, FakeKeyVault, FakeServiceBus, SAS_KEY};
use crate::fake_host::{service_bus_message, timer_first_run};
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

#[tokio::test]
async fn the_scheduler_sends_its_jobs_to_service_bus_signed_with_sas() {
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    app.plant_integration(integration_of("int-1", "workday"))
        .await;
    let connection = service_bus.connection_string(SAS_KEY);
    let handler = app
        .host_handler_with(&[("ServiceBusConnection", connection.as_str())])
        .await;

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
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    let connection = service_bus.connection_string(SAS_KEY);
    let handler = app
        .host_handler_with(&[("ServiceBusConnection", connection.as_str())])
        .await;
    let envelope =
        service_bus_message("SyncOutbound", "{not json", "int-1:evt-1", 3, Some("int-1"));

    assert!(
        handler
            .invoke("SyncOutbound", &envelope)
            .await
            .host_accepts()
    );

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

#[tokio::test]
async fn credentials_live_in_key_vault_behind_its_challenge() {
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

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["dead-letters", "list"])
        .env("FUNC_SYNC_DATA_DIR", app.data_dir())
        .env(
            "ServiceBusConnection",
            service_bus.connection_string(SAS_KEY),
        )
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("$DeadLetterQueue"));
}
