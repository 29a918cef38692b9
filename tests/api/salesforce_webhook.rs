//! Salesforce Outbound Messages through WebhookReceiver and SyncInboundWebhook.

use serde_json::{Value, json};

use handler::queue::{SYNC_DEADLETTER, SYNC_INBOUND_WEBHOOK};
use handler::store::ShardStore;

use crate::fake_host::{HostedHandler, http_request_with_body};
use crate::fake_salesforce::{FakeSalesforce, ORG_ID};
use crate::helpers::{TestApp, http_request, wait_until};

pub fn delivery(org: &str, notifications: &[(&str, &str, &str)]) -> String {
    let body: String = notifications
        .iter()
        .map(|(id, account, name)| {
            format!(
                r#"<Notification><Id>{id}</Id><sObject xsi:type="sf:Account" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
                   <sf:Id>{account}</sf:Id><sf:Name>{name}</sf:Name><sf:Industry>Energy</sf:Industry>
                   <sf:SystemModstamp>2026-11-22T10:00:00.000Z</sf:SystemModstamp></sObject></Notification>"#
            )
        })
        .collect();
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body><notifications xmlns="http://soap.sforce.com/2005/09/outbound">
  <OrganizationId>{org}</OrganizationId><ActionId>04k000000000001AAA</ActionId>
  <SessionId xsi:nil="true"/><EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/62.0</EnterpriseUrl>
  <PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/62.0</PartnerUrl>
  {body}
 </notifications></soapenv:Body></soapenv:Envelope>"#
    )
}

fn integration(fake_url: &str) -> Value {
    json!({
        "id": "int-acme-sf", "tenantId": "t1", "name": "Acme Salesforce",
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "manual"},
            "connection": {"loginHost": fake_url, "organizationId": ORG_ID},
            "entityMappings": [{
                "externalEntity": "Account", "shardTypeId": "c_company", "nameField": "name",
                "fieldMappings": [{"source": "Name", "target": "name", "required": true},
                                  {"source": "Industry", "target": "industry"}]
            }]
        }
    })
}

const XML: (&str, &str) = ("Content-Type", "text/xml; charset=utf-8");

/// Posts `soap` to WebhookReceiver as Salesforce posts an Outbound Message; returns the
/// HTTP answer.
async fn post_outbound_message(handler: &HostedHandler, soap: &str) -> Value {
    let request = http_request_with_body("WebhookReceiver", "salesforce", &[XML], soap);
    handler.invoke("WebhookReceiver", &request).await.json()["Outputs"]["res"].clone()
}

/// Asserts that `out` acknowledges the delivery as Salesforce expects, so it is not sent again.
fn assert_acknowledged(out: &Value) {
    assert_eq!(out["statusCode"], 200, "{out}");
    assert!(
        out["body"].as_str().unwrap().contains("<Ack>true</Ack>"),
        "{out}"
    );
}

/// Delivers the queued webhook jobs to SyncInboundWebhook, as the host would.
async fn run_queued_jobs(app: &TestApp, handler: &HostedHandler) {
    app.deliver_webhook_jobs(handler).await;
}

/// Delivers the queued webhook jobs to SyncInboundWebhook and completes them, as the host
/// would.
async fn complete_queued_jobs(app: &TestApp, handler: &HostedHandler) {
    let broker = app.broker();
    for message in broker.peek(SYNC_INBOUND_WEBHOOK).unwrap() {
        handler.deliver("SyncInboundWebhook", &message).await;
        broker.delete_unlocked(message.sequence_number).unwrap();
    }
}

/// A fake org with the accounts the tests' notifications name, and an integration of tenant
/// `t1` connected to it.
async fn connected_org(app: &TestApp) -> FakeSalesforce {
    let fake = FakeSalesforce::start().await;
    let now = chrono::Utc::now();
    for (id, name) in [
        ("001000000000000001", "Smith & Sons"),
        ("001000000000000002", "Globex"),
        ("001000000000000009", "Initech"),
    ] {
        fake.add(
            "Account",
            json!({"Id": id, "Name": name, "Industry": "Energy"}),
            now,
        );
    }
    app.register_integration(integration(&fake.url)).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    fake
}

#[tokio::test]
async fn an_outbound_message_is_acknowledged_queued_once_and_its_records_read_together() {
    let app = TestApp::new();
    let fake = connected_org(&app).await;
    let handler = app.host_handler().await;
    let soap = delivery(
        ORG_ID,
        &[
            (
                "04l000000000001AAA",
                "001000000000000001",
                "Smith &amp; Sons",
            ),
            ("04l000000000002AAA", "001000000000000002", "Globex"),
        ],
    );

    let out = post_outbound_message(&handler, &soap).await;
    assert_acknowledged(&out);
    assert_eq!(out["headers"]["Content-Type"], "text/xml; charset=utf-8");

    // Salesforce delivers again (it had not seen the ack): nothing is queued twice.
    post_outbound_message(&handler, &soap).await;
    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    assert_eq!(queued.len(), 1, "one job for the message's records");
    assert!(
        queued[0]
            .message_id
            .starts_with("wh_int-acme-sf_04l000000000001AAA+1-"),
        "{}",
        queued[0].message_id
    );
    // Told twice, subscribers see one event: the redelivery's has the first one's id.
    let told = app.events();
    assert_eq!(told.len(), 2);
    assert_eq!(told[0].kind, "integration.webhook.received");
    assert_eq!(told[0].id, told[1].id);

    run_queued_jobs(&app, &handler).await;
    let companies = app.shards("c_company").await;
    let mut names: Vec<_> = companies
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["Globex", "Smith & Sons"]);
    let history = app.history().await;
    assert_eq!(history.len(), 1);
    let record = &history[0]["structuredData"];
    assert_eq!(
        (record["jobType"].clone(), record["trigger"].clone()),
        (json!("webhook"), json!("webhook"))
    );
    assert_eq!(record["status"], "success");
    assert_eq!(record["stats"]["recordsFetched"], 2);
    let reads: Vec<String> = fake
        .requests()
        .into_iter()
        .filter(|r| r.contains("WHERE Id IN ("))
        .collect();
    assert_eq!(reads.len(), 1, "both records in one query: {reads:?}");
    assert!(
        reads[0].contains("001000000000000001") && reads[0].contains("001000000000000002"),
        "{reads:?}"
    );
}

#[tokio::test]
async fn a_paused_integrations_outbound_messages_wait_to_be_replayed_once_it_is_active() {
    let app = TestApp::new();
    let _fake = connected_org(&app).await;
    app.set_integration_status("int-acme-sf", "paused").await;
    let handler = app.host_handler().await;
    let soap = delivery(
        ORG_ID,
        &[("04l000000000001AAA", "001000000000000001", "Smith")],
    );

    assert_acknowledged(&post_outbound_message(&handler, &soap).await);
    complete_queued_jobs(&app, &handler).await;

    assert!(
        app.shards("c_company").await.is_empty(),
        "no sync while paused"
    );
    assert!(app.history().await.is_empty(), "and no run");
    let kept = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        kept[0].properties["DeadLetterReason"],
        "INTEGRATION_NOT_ACTIVE"
    );

    // Resumed, the operator replays what waited.
    app.set_integration_status("int-acme-sf", "active").await;
    let replayed = app.cli_json(&["dead-letters", "replay", "--all"]).await;
    assert_eq!(replayed.as_array().unwrap().len(), 1, "{replayed}");
    assert!(replayed[0]["error"].is_null(), "{replayed}");
    complete_queued_jobs(&app, &handler).await;
    assert_eq!(app.shards("c_company").await.len(), 1);
}

#[tokio::test]
async fn a_webhook_jobs_retry_after_the_integration_was_paused_lets_go_of_it_and_waits() {
    let app = TestApp::new();
    let _fake = connected_org(&app).await;
    // A webhook's job failed once and holds the integration until its retry; then the
    // integration was paused.
    let job_id = "wh_int-acme-sf_04l000000000001AAA";
    let store = app.store();
    let mut stored = store.get("t1", "int-acme-sf").await.unwrap().unwrap();
    let now = chrono::Utc::now();
    stored.value.structured_data["status"] = json!("paused");
    stored.value.structured_data["running"] = json!({
        "chain": job_id, "jobId": job_id,
        "since": handler::model::timestamp::format(&now),
        "until": handler::model::timestamp::format(&(now + chrono::Duration::minutes(30)))
    });
    store.replace(&stored.value, &stored.etag).await.unwrap();
    let handler = app.host_handler().await;
    let retry = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "webhook",
        "provider": "salesforce", "jobId": job_id, "trigger": "retry", "attempt": 2,
        "entities": ["Account"], "scheduledAt": now,
        "webhookPayload": {"entity": "Account", "ids": ["001000000000000001"]}
    });
    let message = crate::fake_host::service_bus_message(
        "SyncInboundWebhook",
        &retry.to_string(),
        &format!("{job_id}:attempt-2"),
        1,
        None,
    );

    let res = handler.invoke("SyncInboundWebhook", &message).await;

    assert!(res.host_accepts(), "{res:?}");
    assert!(
        app.shards("c_company").await.is_empty(),
        "no sync while paused"
    );
    let kept = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        kept[0].properties["DeadLetterReason"],
        "INTEGRATION_NOT_ACTIVE"
    );
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert!(state.get("running").is_none(), "let go: {state}");
}

#[tokio::test]
async fn an_outbound_message_reaches_a_mapping_that_spells_the_object_in_lower_case() {
    let app = TestApp::new();
    let fake = connected_org(&app).await;
    let mut lower = integration(&fake.url);
    lower["structuredData"]["entityMappings"][0]["externalEntity"] = json!("account");
    app.register_integration(lower).await;
    let handler = app.host_handler().await;

    let soap = delivery(
        ORG_ID,
        &[("04l000000000005AAA", "001000000000000002", "Globex")],
    );
    assert_acknowledged(&post_outbound_message(&handler, &soap).await);
    run_queued_jobs(&app, &handler).await;

    let companies = app.shards("c_company").await;
    assert_eq!(companies.len(), 1, "{companies:?}");
    assert_eq!(companies[0]["name"], "Globex");
}

#[tokio::test]
async fn a_partial_outbound_message_leaves_the_shard_holding_what_salesforce_holds() {
    let app = TestApp::new();
    connected_org(&app).await;
    let handler = app.host_handler().await;
    // Outbound Messages carry whatever fields the rule selected: here the id alone, and a
    // notification about a record that does not exist at Salesforce.
    let partial = delivery(ORG_ID, &[("04l000000000003AAA", "001000000000000001", "")])
        .replace("<sf:Name></sf:Name><sf:Industry>Energy</sf:Industry>", "");
    let unknown = delivery(
        ORG_ID,
        &[("04l000000000004AAA", "001000000000000404", "Ghost")],
    );
    for soap in [partial, unknown] {
        assert_acknowledged(&post_outbound_message(&handler, &soap).await);
    }
    run_queued_jobs(&app, &handler).await;
    let companies = app.shards("c_company").await;
    assert_eq!(companies.len(), 1, "the unknown id created nothing");
    assert_eq!(companies[0]["name"], "Smith & Sons");
    assert_eq!(
        companies[0]["structuredData"],
        json!({"name": "Smith & Sons", "industry": "Energy"})
    );
}

#[tokio::test]
async fn an_unverifiable_delivery_gets_a_4xx_with_a_reason_and_queues_nothing() {
    let app = TestApp::new();
    connected_org(&app).await;
    let handler = app.host_handler().await;
    // Setup shows the 15-character form of the org id; Salesforce may send either.
    let good = delivery("00D000000000062", &[("04l1", "0011", "Acme")]);
    /// Headers, body, expected status and reason.
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![XML],
            delivery("00D000000000099AAA", &[("04l1", "0011", "Acme")]),
            403,
            "no salesforce integration is connected to organizationId `00D000000000099AAA`",
        ),
        (
            vec![XML],
            delivery("00DSOMEONEELSE", &[("04l1", "0011", "Acme")]),
            400,
            "the OrganizationId is not a Salesforce id",
        ),
        (
            vec![XML, ("x-tenant-id", "t2")],
            good.clone(),
            403,
            "x-tenant-id does not match",
        ),
        (
            vec![XML],
            "<notifications><broken>".into(),
            400,
            "no OrganizationId",
        ),
        (
            vec![("Content-Type", "application/json")],
            "{}".into(),
            400,
            "SOAP XML",
        ),
    ];
    for (headers, body, status, reason) in cases {
        let res = handler
            .invoke(
                "WebhookReceiver",
                &http_request_with_body("WebhookReceiver", "salesforce", &headers, &body),
            )
            .await;
        let out = &res.json()["Outputs"]["res"];
        assert_eq!(out["statusCode"], status, "{out}");
        let error: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
        assert!(error["error"].as_str().unwrap().contains(reason), "{error}");
    }
    assert!(app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap().is_empty());

    // The tenant's own id is fine.
    let res = handler
        .invoke(
            "WebhookReceiver",
            &http_request_with_body(
                "WebhookReceiver",
                "salesforce",
                &[XML, ("x-tenant-id", "t1")],
                &good,
            ),
        )
        .await;
    assert_eq!(res.json()["Outputs"]["res"]["statusCode"], 200);
}

#[tokio::test]
async fn an_outbound_message_to_the_local_runtime_becomes_a_shard() {
    let app = TestApp::new();
    connected_org(&app).await;
    let runtime = app.start_local().await;
    let soap = delivery(ORG_ID, &[("04l9", "001000000000000009", "Initech")]);
    let (status, _, body) = http_request(
        "POST",
        &format!("http://{}/api/webhooks/salesforce", runtime.addr),
        &[XML],
        Some(soap.as_bytes()),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8(body).unwrap().contains("<Ack>true</Ack>"));
    wait_until(
        "the notified account is a shard",
        std::time::Duration::from_secs(30),
        || async { app.shards("c_company").await.len() == 1 },
    )
    .await;
    assert_eq!(app.shards("c_company").await[0]["name"], "Initech");
}

#[tokio::test]
async fn a_mapping_castiel_wrote_unchecked_fails_its_webhook_job_with_the_reason() {
    let app = TestApp::new();
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Account",
        json!({"Id": "001000000000000002", "Name": "Globex"}),
        chrono::Utc::now(),
    );
    // Castiel writes the integration's document itself, with a split that names no targets.
    let mut unchecked = integration(&fake.url);
    unchecked["structuredData"]["entityMappings"][0]["fieldMappings"][0] =
        json!({"source": "Name", "target": "name", "transform": "split"});
    app.plant_integration(unchecked).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let handler = app.host_handler().await;

    let soap = delivery(
        ORG_ID,
        &[("04l000000000006AAA", "001000000000000002", "Globex")],
    );
    assert_acknowledged(&post_outbound_message(&handler, &soap).await);
    run_queued_jobs(&app, &handler).await;

    let record = &app.history().await[0]["structuredData"];
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["errors"][0]["code"], "VALIDATION_ERROR", "{record}");
    assert!(
        record["statusMessage"].as_str().unwrap().contains("split"),
        "{record}"
    );
    assert!(app.shards("c_company").await.is_empty());
}

#[tokio::test]
async fn outbound_messages_wait_while_the_integration_has_used_its_share_of_the_org() {
    let app = TestApp::new();
    let fake = connected_org(&app).await;
    let handler = app.host_handler().await;
    // Other apps have used most of the org's daily allocation: the sync that learns it stops.
    fake.org.lock().unwrap().api_usage = (90_000, 100_000);
    handler
        .run_sync("int-acme-sf", "salesforce", "sync-1", "incremental")
        .await;
    let before = fake.org.lock().unwrap().requests.len();
    // Then Globex is renamed, and its Outbound Message sent.
    fake.add(
        "Account",
        json!({"Id": "001000000000000002", "Name": "Globex Corp", "Industry": "Energy"}),
        chrono::Utc::now(),
    );

    let soap = delivery(
        ORG_ID,
        &[("04l000000000007AAA", "001000000000000002", "Globex Corp")],
    );
    assert_acknowledged(&post_outbound_message(&handler, &soap).await);
    run_queued_jobs(&app, &handler).await;

    let requests = fake.org.lock().unwrap().requests[before..].to_vec();
    assert!(
        requests.iter().all(|r| !r.contains("Id IN")),
        "{requests:?}"
    );

    // Salesforce will not deliver the message again: its job waits an hour to read them.
    let held: Vec<_> = app
        .broker()
        .peek(SYNC_INBOUND_WEBHOOK)
        .unwrap()
        .into_iter()
        .filter(|m| m.message_id.ends_with(":held-1"))
        .collect();
    assert_eq!(held.len(), 1);
    let job: Value = serde_json::from_slice(&held[0].body).unwrap();
    let at: chrono::DateTime<chrono::Utc> = job["scheduledAt"].as_str().unwrap().parse().unwrap();
    assert!(
        at > chrono::Utc::now() + chrono::Duration::minutes(59),
        "{job}"
    );

    // An hour on, the org's usage is back down, and the held job reads the records.
    fake.org.lock().unwrap().api_usage = (1_000, 100_000);
    let later = app.host_handler().await;
    later.deliver("SyncInboundWebhook", &held[0]).await;
    let globex = app
        .store()
        .get("t1", "int-acme-sf~Account~001000000000000002")
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(globex.name, "Globex Corp");
}
