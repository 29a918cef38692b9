//! The handler under a fake Functions host: each of the six functions invoked with the
//! envelopes the host sends, and judged by the host's rules.

use serde_json::{Value, json};

use handler::model::IntegrationSync;
use handler::queue::{SYNC_DEADLETTER, SYNC_INBOUND_SCHEDULED};
use handler::store::ShardStore;

use crate::fake_host::{
    http_request_without_body, service_bus_message, timer_first_run, timer_without_status,
};
use crate::helpers::{TestApp, integration_of, salesforce_integration};

#[tokio::test]
async fn the_handler_answers_readiness_and_refuses_unknown_functions_clearly() {
    let app = TestApp::new();
    let handler = app.host_handler().await;

    let res = handler
        .invoke(
            "NoSuchFunction",
            &timer_first_run("NoSuchFunction", "timer"),
        )
        .await;
    assert_eq!(res.status, 404);
    assert_eq!(res.json()["error"], "no function named `NoSuchFunction`");

    // Function names are folder names, matched exactly.
    let res = handler
        .invoke("syncscheduler", &timer_first_run("SyncScheduler", "timer"))
        .await;
    assert_eq!(res.status, 404);
}

#[tokio::test]
async fn a_malformed_envelope_gets_a_clear_error_not_a_panic_or_an_empty_200() {
    let app = TestApp::new();
    let handler = app.host_handler().await;
    for (body, reason) in [
        (&b""[..], "empty"),
        (b"{not json", "not JSON"),
        (b"{\"Metadata\":{}}", "no `Data` object"),
        (b"{\"Data\":{},\"Metadata\":{}}", "`Data.timer` is missing"),
        (
            b"{\"Data\":{\"timer\":\"x\"},\"Metadata\":{}}",
            "must be a timer object",
        ),
    ] {
        let res = handler.post_raw("SyncScheduler", body).await;
        assert_eq!(res.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(res.content_type.as_deref(), Some("application/json"));
        let error = res.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(reason), "{error}");
    }
    // The handler is still serving after all of that.
    let res = handler
        .invoke("SyncScheduler", &timer_first_run("SyncScheduler", "timer"))
        .await;
    assert!(res.host_accepts());
}

#[tokio::test]
async fn the_scheduler_on_its_first_timer_run_enqueues_a_due_integration_once() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    let handler = app.host_handler().await;

    let res = handler
        .invoke("SyncScheduler", &timer_first_run("SyncScheduler", "timer"))
        .await;
    assert!(res.host_accepts(), "{res:?}");
    let body = res.json();
    assert_eq!(body["Outputs"], json!({}));
    assert_eq!(body["ReturnValue"], Value::Null);
    assert_eq!(
        body["Logs"],
        json!(["1 integrations due, 1 sync jobs enqueued"])
    );

    let queued = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(queued.len(), 1);
    let job: Value = serde_json::from_slice(&queued[0].body).unwrap();
    assert_eq!(job["integrationId"], "int-acme-sf");
    assert_eq!(job["tenantId"], "t1");
    assert_eq!(job["jobType"], "full_sync", "never synced before");
    assert_eq!(job["trigger"], "scheduled");
    assert_eq!(queued[0].message_id, job["jobId"].as_str().unwrap());

    // The due time is claimed: a second tick finds nothing due.
    let integration = app
        .store()
        .get("t1", "int-acme-sf")
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(
        integration.structured_data["nextSyncAt"].as_str().unwrap()
            > job["scheduledAt"].as_str().unwrap()
    );
    let res = handler
        .invoke(
            "SyncScheduler",
            &timer_without_status("SyncScheduler", "timer"),
        )
        .await;
    assert_eq!(
        res.json()["Logs"],
        json!(["0 integrations due, 0 sync jobs enqueued"])
    );
    assert_eq!(app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap().len(), 1);

    let check_due: Vec<_> = app
        .events()
        .into_iter()
        .filter(|e| e.kind == "integration.sync.check_due")
        .collect();
    assert_eq!(check_due.len(), 2);
    assert_eq!(check_due[0].data["enqueued"], 1);
}

#[tokio::test]
async fn a_job_for_a_provider_without_an_adapter_fails_with_history_and_a_dead_letter() {
    let app = TestApp::new();
    app.plant_integration(integration_of("int-acme-sf", "workday"))
        .await;
    let handler = app.host_handler().await;
    let job = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "incremental",
        "provider": "salesforce", "jobId": "job-42", "scheduledAt": "2026-11-22T10:00:00Z",
        "attempt": 1
    });
    let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), "job-42", 1, None);

    let res = handler.invoke("SyncInboundScheduled", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");

    let records = app.cli_json(&["history", "--tenant", "t1"]).await;
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1);
    let record: IntegrationSync =
        serde_json::from_value(records[0]["structuredData"].clone()).unwrap();
    assert_eq!(record.status, handler::model::SyncStatus::Failed);
    assert_eq!(record.job_id, "job-42");
    let errors = record.errors.unwrap();
    assert_eq!(errors[0].code, "PROVIDER_NOT_SUPPORTED");
    assert!(!errors[0].retryable);

    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].properties["DeadLetterReason"],
        "PROVIDER_NOT_SUPPORTED"
    );
    assert_eq!(
        dead[0].properties["OriginalQueue"],
        "sync-inbound-scheduled"
    );
    assert_eq!(serde_json::from_slice::<Value>(&dead[0].body).unwrap(), job);

    // The same message delivered again changes nothing: the job already finished.
    let again = service_bus_message("SyncInboundScheduled", &job.to_string(), "job-42", 2, None);
    assert!(
        handler
            .invoke("SyncInboundScheduled", &again)
            .await
            .host_accepts()
    );
    assert_eq!(
        app.cli_json(&["history", "--tenant", "t1"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(app.broker().peek(SYNC_DEADLETTER).unwrap().len(), 1);
    let kinds: Vec<_> = app.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        ["integration.sync.started", "integration.sync.failed"]
    );
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_its_reason_and_completed() {
    let app = TestApp::new();
    let handler = app.host_handler().await;
    for function in ["SyncInboundScheduled", "SyncInboundWebhook"] {
        let envelope = service_bus_message(function, r#"{"tenantId":"t1"}"#, "poison-1", 1, None);
        let res = handler.invoke(function, &envelope).await;
        assert!(res.host_accepts(), "{function}: {res:?}");
    }
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead.len(), 2);
    for (message, queue) in dead
        .iter()
        .zip(["sync-inbound-scheduled", "sync-inbound-webhook"])
    {
        assert_eq!(message.properties["DeadLetterReason"], "INVALID_MESSAGE");
        assert_eq!(message.properties["OriginalQueue"], queue);
        let description = message.properties["DeadLetterErrorDescription"]
            .as_str()
            .unwrap();
        assert!(
            description.contains("missing field `integrationId`"),
            "{description}"
        );
    }
}

#[tokio::test]
async fn a_write_back_for_a_missing_shard_is_dead_lettered_with_its_session() {
    let app = TestApp::new();
    let handler = app.host_handler().await;
    let write_back = json!({
        "shardId": "shard-404", "tenantId": "t1", "operation": "update",
        "changedFields": ["email"], "externalSystem": "salesforce", "externalId": "003A",
        "triggeredAt": "2026-11-22T10:00:00Z", "triggeredBy": "user-1"
    });
    let envelope = service_bus_message(
        "SyncOutbound",
        &write_back.to_string(),
        "int-1:evt-9",
        1,
        Some("int-1"),
    );
    let res = handler.invoke("SyncOutbound", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead[0].properties["DeadLetterReason"], "NOT_FOUND");
    assert_eq!(dead[0].properties["OriginalSessionId"], "int-1");
    assert_eq!(dead[0].properties["OriginalMessageId"], "int-1:evt-9");
}

#[tokio::test]
async fn a_webhook_without_a_body_or_for_an_unknown_provider_gets_a_4xx_with_a_reason() {
    let app = TestApp::new();
    let handler = app.host_handler().await;

    let res = handler
        .invoke(
            "WebhookReceiver",
            &http_request_without_body("WebhookReceiver", "POST", "workday"),
        )
        .await;
    assert!(
        res.host_accepts(),
        "an HTTP answer is a successful invocation: {res:?}"
    );
    let out = &res.json()["Outputs"]["res"];
    assert_eq!(out["statusCode"], 404);
    assert_eq!(out["headers"]["Content-Type"], "application/json");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["error"], "no webhook receiver for provider `workday`");

    let res = handler
        .invoke(
            "WebhookReceiver",
            &http_request_without_body("WebhookReceiver", "GET", "workday"),
        )
        .await;
    assert_eq!(res.json()["Outputs"]["res"]["statusCode"], 405);
}

#[tokio::test]
async fn the_token_refresher_reports_credentials_it_cannot_refresh() {
    let app = TestApp::new();
    app.register_integration(salesforce_integration("int-acme-sf"))
        .await;
    let out = app
        .cli_with_stdin(
            &["credentials", "set", "int-acme-sf", "--tenant", "t1"],
            Some(r#"{"accessToken":"tok-secret","refreshToken":"ref-secret","expiresAt":"2026-01-01T00:00:00Z"}"#),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let handler = app.host_handler().await;

    let res = handler
        .invoke(
            "TokenRefresher",
            &timer_without_status("TokenRefresher", "timer"),
        )
        .await;
    assert!(res.host_accepts(), "{res:?}");
    assert_eq!(
        res.json()["Logs"],
        json!([
            "1 integrations had credentials expiring: 0 refreshed, 1 failed; subscriptions: 0 created, 0 renewed, 0 deleted, 0 integrations failed"
        ])
    );
    let events = app.events();
    assert_eq!(events[0].kind, "integration.token.check-expiring");
    assert_eq!(events[1].kind, "integration.token.refresh.failed");
    assert_eq!(events[1].data["integrationId"], "int-acme-sf");
    assert_eq!(
        events[1].data["error"],
        "provider `salesforce` refreshes its tokens when they are refused, not ahead"
    );
    let everything = serde_json::to_string(&events).unwrap();
    assert!(
        !everything.contains("secret"),
        "no credential leaks into events"
    );
}

#[tokio::test]
async fn a_job_for_a_shard_that_is_not_an_integration_is_dead_lettered_not_retried_forever() {
    let app = TestApp::new();
    let not_an_integration: handler::model::Shard = serde_json::from_value(json!({
        "id": "int-x", "tenantId": "t1", "shardTypeId": "c_contact", "name": "Ann"
    }))
    .unwrap();
    app.store().upsert(&not_an_integration).await.unwrap();
    let handler = app.host_handler().await;
    let job = json!({
        "integrationId": "int-x", "tenantId": "t1", "jobType": "full_sync",
        "provider": "salesforce", "jobId": "job-x", "scheduledAt": "2026-11-22T10:00:00Z"
    });
    let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), "job-x", 1, None);

    let res = handler.invoke("SyncInboundScheduled", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(dead[0].properties["DeadLetterReason"], "VALIDATION_ERROR");
    let description = dead[0].properties["DeadLetterErrorDescription"]
        .as_str()
        .unwrap();
    assert!(
        description.contains("is a `c_contact` shard, not an integration"),
        "{description}"
    );
    let unchanged = app.store().get("t1", "int-x").await.unwrap().unwrap().value;
    assert_eq!(unchanged, not_an_integration, "the shard is left as it was");
}
