//! Gong stories beyond the conformance suite: access-key connections, and webhooks that do not
//! verify (expired, tampered, or with the wrong key in the URL) refused without a job.

use serde_json::{Value, json};

use handler::queue::SYNC_INBOUND_WEBHOOK;

use crate::fake_gong::FakeGong;
use crate::fake_host::{HostedHandler, service_bus_message};
use crate::helpers::TestApp;

const ID: &str = "int-gong";
const URL: &str = "https://func-sync-dev.azurewebsites.net/api/webhooks/gong?integration=int-gong";

fn integration(gong: &FakeGong, signed: bool) -> Value {
    let mut connection = json!({"tokenUrl": gong.token_url(), "apiBaseUrl": gong.api_base()});
    if signed {
        connection["webhookPublicKey"] = json!(gong.public_key_pem());
        connection["webhookUrl"] = json!(URL);
    }
    json!({
        "id": ID, "tenantId": "t1", "name": "Contoso Gong",
        "structuredData": {
            "providerName": "gong",
            "syncFrequency": {"type": "manual"},
            "connection": connection,
            "entityMappings": [{
                "externalEntity": "calls", "shardTypeId": "c_call", "nameField": "title",
                "fieldMappings": [{"source": "title", "target": "title", "required": true},
                                  {"source": "duration", "target": "seconds"}]
            }]
        }
    })
}

async fn post(
    handler: &HostedHandler,
    query: &[(&str, &str)],
    (headers, body): &(Vec<(String, String)>, String),
) -> Value {
    handler.post_webhook("gong", query, headers, body).await
}

#[tokio::test]
async fn an_access_key_connection_syncs_without_any_token() {
    let gong = FakeGong::start().await;
    gong.load_calls(5, chrono::Utc::now() - chrono::Duration::days(1));
    let app = TestApp::new();
    app.register_integration(integration(&gong, false)).await;
    app.set_credentials(ID, &gong.key_credentials()).await;
    let handler = app.host_handler().await;
    let job = json!({"integrationId": ID, "tenantId": "t1", "jobType": "full_sync",
                     "provider": "gong", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z"});

    let res = handler
        .invoke(
            "SyncInboundScheduled",
            &service_bus_message("SyncInboundScheduled", &job.to_string(), "job-1", 1, None),
        )
        .await;

    assert!(res.host_accepts());
    assert_eq!(app.shards("c_call").await.len(), 5);
    assert_eq!(gong.token_refreshes(), 0);
}

#[tokio::test]
async fn deliveries_that_do_not_verify_are_refused_with_a_reason_and_queue_nothing() {
    let gong = FakeGong::start().await;
    let call = gong.add_call("Discovery - Acme", chrono::Utc::now());
    let app = TestApp::new();
    app.register_integration(integration(&gong, true)).await;
    app.set_credentials(ID, &gong.oauth_credentials()).await;
    let handler = app.host_handler().await;
    let route = [("integration", ID)];

    let expired = post(&handler, &route, &gong.expired_webhook(&call, URL)).await;
    assert_eq!(expired["statusCode"], 403, "{expired}");
    assert!(
        expired["body"].as_str().unwrap().contains("expired"),
        "{expired}"
    );

    let (headers, body) = gong.webhook(&call, URL);
    let tampered = post(
        &handler,
        &route,
        &(headers, body.replace("Discovery", "Closed won")),
    )
    .await;
    assert_eq!(tampered["statusCode"], 403, "{tampered}");
    assert!(
        tampered["body"].as_str().unwrap().contains("body"),
        "{tampered}"
    );

    let elsewhere = post(
        &handler,
        &route,
        &gong.webhook(&call, "https://attacker.example/hook"),
    )
    .await;
    assert_eq!(elsewhere["statusCode"], 403, "{elsewhere}");
    assert!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().is_empty());

    let good = post(&handler, &route, &gong.webhook(&call, URL)).await;
    assert_eq!(good["statusCode"], 200, "{good}");
    assert_eq!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().len(), 1);
}

#[tokio::test]
async fn a_rule_with_a_key_in_its_url_is_checked_by_that_key() {
    let gong = FakeGong::start().await;
    let call = gong.add_call("Renewal", chrono::Utc::now());
    let app = TestApp::new();
    app.register_integration(integration(&gong, false)).await;
    let mut credentials = gong.oauth_credentials();
    credentials["webhook_url_key"] = json!("k3y-in-the-url");
    app.set_credentials(ID, &credentials).await;
    let handler = app.host_handler().await;
    let (_, body) = gong.webhook(&call, URL);
    let unsigned = (
        vec![("Content-Type".to_string(), "application/json".to_string())],
        body,
    );

    let wrong = post(
        &handler,
        &[("integration", ID), ("key", "guess")],
        &unsigned,
    )
    .await;
    assert_eq!(wrong["statusCode"], 403, "{wrong}");
    let right = post(
        &handler,
        &[("integration", ID), ("key", "k3y-in-the-url")],
        &unsigned,
    )
    .await;
    assert_eq!(right["statusCode"], 200, "{right}");
}

#[tokio::test]
async fn one_call_told_to_two_integrations_makes_a_job_for_each() {
    let gong = FakeGong::start().await;
    let call = gong.add_call("Discovery - Acme", chrono::Utc::now());
    let app = TestApp::new();
    let ids = [ID, "int-gong-emea"];
    let url = |id: &str| URL.replace(ID, id);
    for id in ids {
        let mut integration = integration(&gong, true);
        integration["id"] = json!(id);
        integration["structuredData"]["connection"]["webhookUrl"] = json!(url(id));
        app.register_integration(integration).await;
        app.set_credentials(id, &gong.oauth_credentials()).await;
    }
    let handler = app.host_handler().await;

    for id in ids {
        let answer = post(
            &handler,
            &[("integration", id)],
            &gong.webhook(&call, &url(id)),
        )
        .await;
        assert_eq!(answer["statusCode"], 200, "{answer}");
    }

    let queued: Vec<Value> = app
        .broker()
        .peek(SYNC_INBOUND_WEBHOOK)
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.body).unwrap()["integrationId"].clone())
        .collect();
    assert_eq!(queued, ids, "the same call, one job per integration");
}
