//! Dynamics 365 stories beyond the conformance suite: app-only access, expired change-tracking
//! tokens, registration checks, and tokens refreshed ahead of expiry by TokenRefresher, once
//! for everyone.

use std::sync::Arc;

use futures_util::future::join_all;
use serde_json::{Value, json};

use adapters::dynamics::Dynamics365;
use adapters::{Connection, ErrorCode, FetchRequest, Pull, RecordWrite};
use handler::engine::credentials::StoredCredentials;
use handler::queue::SYNC_INBOUND_WEBHOOK;

use crate::fake_dynamics::{FakeDynamics, ORGANIZATION_ID};
use crate::fake_entra::app_credentials;
use crate::fake_host::{HostedHandler, service_bus_message, timer_without_status};
use crate::helpers::{TestApp, wait_until};

const ID: &str = "int-contoso-crm";

fn integration(fake: &FakeDynamics) -> Value {
    json!({
        "id": ID, "tenantId": "t1", "name": "Contoso CRM",
        "structuredData": {
            "providerName": "dynamics365",
            "syncFrequency": {"type": "manual"},
            "connection": {"environmentUrl": fake.url, "tokenUrl": fake.token_url(),
                           "organizationId": ORGANIZATION_ID},
            "entityMappings": [{
                "externalEntity": "contacts", "shardTypeId": "c_contact", "nameField": "full_name",
                "fieldMappings": [
                    {"source": "fullname", "target": "full_name", "required": true},
                    {"source": "emailaddress1", "target": "email"}
                ]
            }]
        }
    })
}

async fn run_job(handler: &HostedHandler, job_id: &str, job_type: &str) -> Value {
    let job = json!({
        "integrationId": ID, "tenantId": "t1", "jobType": job_type, "provider": "dynamics365",
        "jobId": job_id, "scheduledAt": "2026-11-22T10:00:00Z", "attempt": 1
    });
    let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), job_id, 1, None);
    let res = handler.invoke("SyncInboundScheduled", &envelope).await;
    assert!(res.host_accepts(), "{res:?}");
    res.json()
}

/// An app with `integration` registered against `fake`, its credentials stored, and the handler
/// as the host runs it.
async fn connected(fake: &FakeDynamics, integration: Value) -> (TestApp, HostedHandler) {
    let app = TestApp::new();
    app.register_integration(integration).await;
    app.set_credentials(ID, &fake.credentials()).await;
    let handler = app.host_handler().await;
    (app, handler)
}

async fn record(app: &TestApp, job_id: &str) -> Value {
    app.history()
        .await
        .into_iter()
        .find(|r| r["structuredData"]["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no history for {job_id}"))["structuredData"]
        .clone()
}

#[tokio::test]
async fn an_app_registration_without_a_user_syncs_with_client_credentials() {
    let fake = FakeDynamics::start().await;
    fake.add(
        "contacts",
        json!({"fullname": "Yvonne McKay", "emailaddress1": "yvonne@contoso.test"}),
    );
    let app = TestApp::new();
    app.register_integration(integration(&fake)).await;
    app.set_credentials(ID, &app_credentials()).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1", "full_sync").await;

    assert_eq!(record(&app, "job-1").await["status"], "success");
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 1);
    assert_eq!(
        contacts[0]["structuredData"],
        json!({"full_name": "Yvonne McKay", "email": "yvonne@contoso.test"})
    );
    let state = fake.state.lock().unwrap();
    assert_eq!(
        (
            state.entra.client_credentials_grants,
            state.entra.token_refreshes
        ),
        (1, 0)
    );
}

#[tokio::test]
async fn emails_and_tasks_sync_under_the_key_activities_share() {
    let fake = FakeDynamics::start().await;
    let email = fake.add("emails", json!({"subject": "Renewal quote"}));
    fake.add("tasks", json!({"subject": "Call back about the quote"}));
    let mut activities = integration(&fake);
    activities["structuredData"]["entityMappings"] = json!([
        {"externalEntity": "emails", "shardTypeId": "c_email", "nameField": "subject",
         "fieldMappings": [{"source": "subject", "target": "subject", "required": true}]},
        {"externalEntity": "tasks", "shardTypeId": "c_task", "nameField": "subject",
         "fieldMappings": [{"source": "subject", "target": "subject", "required": true}]}
    ]);
    let (app, handler) = connected(&fake, activities).await;

    run_job(&handler, "job-1", "full_sync").await;

    assert_eq!(record(&app, "job-1").await["status"], "success");
    let emails = app.shards("c_email").await;
    assert_eq!(emails.len(), 1);
    assert_eq!(emails[0]["name"], "Renewal quote");
    assert_eq!(
        emails[0]["external_relationships"][0]["externalId"],
        email.as_str()
    );
    assert_eq!(app.shards("c_task").await.len(), 1);
}

#[tokio::test]
async fn an_expired_change_tracking_token_rereads_the_entity_instead_of_failing() {
    let fake = FakeDynamics::start().await;
    let ids: Vec<String> = (0..5)
        .map(|i| fake.add("contacts", json!({"fullname": format!("Contact {i}")})))
        .collect();
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;

    fake.update("contacts", &ids[0], json!({"fullname": "Renamed"}));
    fake.state.lock().unwrap().expire_delta_tokens = true;
    run_job(&handler, "job-2", "incremental").await;

    let second = record(&app, "job-2").await;
    assert_eq!(second["status"], "success", "{second}");
    assert_eq!(
        (
            &second["stats"]["recordsFetched"],
            &second["stats"]["shardsUpdated"],
            &second["stats"]["shardsSkipped"]
        ),
        (&json!(5), &json!(1), &json!(4)),
        "every row read again, only the change written"
    );
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.contains("$deltatoken")),
        "the stored delta link was tried first: {requests:?}"
    );
}

#[tokio::test]
async fn rows_deleted_while_the_token_expired_or_before_a_full_sync_still_leave_castiel() {
    let fake = FakeDynamics::start().await;
    let ids: Vec<String> = (0..5)
        .map(|i| fake.add("contacts", json!({"fullname": format!("Contact {i}")})))
        .collect();
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;

    // Only the delta Dataverse no longer honours would have told of this deletion.
    fake.delete("contacts", &ids[0]);
    fake.state.lock().unwrap().expire_delta_tokens = true;
    run_job(&handler, "job-2", "incremental").await;
    assert_eq!(record(&app, "job-2").await["status"], "success");
    assert_eq!(app.shards("c_contact").await.len(), 4);

    // Nor does a full sync, which gives its cursor up, lose one.
    fake.state.lock().unwrap().expire_delta_tokens = false;
    fake.delete("contacts", &ids[1]);
    run_job(&handler, "job-3", "full_sync").await;
    let mut names: Vec<Value> = app
        .shards("c_contact")
        .await
        .iter()
        .map(|c| c["structuredData"]["full_name"].clone())
        .collect();
    names.sort_by_key(|n| n.to_string());
    assert_eq!(names, ["Contact 2", "Contact 3", "Contact 4"]);
}

#[tokio::test]
async fn a_lead_merged_into_a_contacts_shard_is_not_taken_for_deleted_when_contacts_are_listed() {
    let fake = FakeDynamics::start().await;
    let contact = fake.add(
        "contacts",
        json!({"fullname": "Ann Lee", "emailaddress1": "ann@contoso.test"}),
    );
    let lead = fake.add(
        "leads",
        json!({"fullname": "Ann Lee", "emailaddress1": "ann@contoso.test"}),
    );
    let mut both = integration(&fake);
    let mapping = |set: &str| {
        json!({"externalEntity": set, "shardTypeId": "c_contact", "nameField": "full_name",
               "fieldMappings": [{"source": "fullname", "target": "full_name", "required": true},
                                 {"source": "emailaddress1", "target": "email"}],
               "deduplication": {"rules": [{"field": "email", "matching": "exact"}],
                                 "merge": "merge_fields"}})
    };
    both["structuredData"]["entityMappings"] = json!([mapping("contacts"), mapping("leads")]);
    let (app, handler) = connected(&fake, both.clone()).await;
    run_job(&handler, "job-1", "full_sync").await;
    let ann = app.shards("c_contact").await;
    assert_eq!(ann.len(), 1, "the lead merged into the contact's shard");

    // A column added to the contacts' mapping lists them again from the start: the lead is
    // not among them, nor gone.
    let mut with_phone = both.clone();
    with_phone["structuredData"]["entityMappings"][0]["fieldMappings"]
        .as_array_mut()
        .unwrap()
        .push(json!({"source": "telephone1", "target": "phone"}));
    app.register_integration(with_phone).await;
    run_job(&handler, "job-2", "incremental").await;
    // Then the contact is deleted: the lead still holds the shard.
    fake.delete("contacts", &contact);
    run_job(&handler, "job-3", "incremental").await;

    let ann = app.shards("c_contact").await;
    assert_eq!(ann.len(), 1, "{ann:?}");
    let links = ann[0]["external_relationships"].as_array().unwrap();
    let status_of = |id: &str| {
        links
            .iter()
            .find(|l| l["externalId"] == id)
            .map(|l| l["syncStatus"].clone())
    };
    assert_eq!(status_of(&lead), Some(json!("synced")));
    assert_eq!(status_of(&contact), Some(json!("deleted")));
}

#[tokio::test]
async fn rows_deleted_while_the_integration_polled_leave_once_change_tracking_is_on() {
    let fake = FakeDynamics::start().await;
    let ids: Vec<String> = (0..3)
        .map(|i| fake.add("contacts", json!({"fullname": format!("Contact {i}")})))
        .collect();
    let mut polling = integration(&fake);
    polling["structuredData"]["connection"]["changeTracking"] = json!(false);
    let (app, handler) = connected(&fake, polling).await;
    run_job(&handler, "job-1", "full_sync").await;

    // A poll sees no deletions; once change tracking is on, the next sync lists every row.
    fake.delete("contacts", &ids[0]);
    app.register_integration(integration(&fake)).await;
    run_job(&handler, "job-2", "incremental").await;

    assert_eq!(record(&app, "job-2").await["status"], "success");
    assert_eq!(app.shards("c_contact").await.len(), 2);
}

#[tokio::test]
async fn a_column_added_to_the_mapping_arrives_with_the_next_sync() {
    let fake = FakeDynamics::start().await;
    fake.add(
        "contacts",
        json!({"fullname": "Yvonne McKay", "telephone1": "+44 20 7946 0000"}),
    );
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;

    let mut with_phone = integration(&fake);
    with_phone["structuredData"]["entityMappings"][0]["fieldMappings"]
        .as_array_mut()
        .unwrap()
        .push(json!({"source": "telephone1", "target": "phone"}));
    app.register_integration(with_phone).await;
    run_job(&handler, "job-2", "incremental").await;

    assert_eq!(record(&app, "job-2").await["status"], "success");
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts[0]["structuredData"]["phone"], "+44 20 7946 0000");
}

#[tokio::test]
async fn a_poll_reads_only_what_changed_and_a_row_committed_late_too() {
    // Without change tracking the adapter polls on `modifiedon`. A plug-in's long operation
    // saved one contact before another that a sync then read, and committed it after.
    let fake = FakeDynamics::start().await;
    let at = |minutes: i64| {
        json!(
            (chrono::Utc::now() - chrono::Duration::minutes(minutes))
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    };
    fake.add(
        "contacts",
        json!({"fullname": "Old contact", "modifiedon": at(120)}),
    );
    fake.add(
        "contacts",
        json!({"fullname": "Read last", "modifiedon": at(2)}),
    );
    let mut polling = integration(&fake);
    polling["structuredData"]["connection"]["changeTracking"] = json!(false);
    let (app, handler) = connected(&fake, polling).await;
    run_job(&handler, "job-1", "full_sync").await;

    fake.add(
        "contacts",
        json!({"fullname": "Committed late", "modifiedon": at(3)}),
    );
    run_job(&handler, "job-2", "incremental").await;

    let second = record(&app, "job-2").await;
    assert_eq!(second["status"], "success", "{second}");
    assert_eq!(
        (
            &second["stats"]["recordsFetched"],
            &second["stats"]["shardsCreated"],
            &second["stats"]["shardsSkipped"]
        ),
        (&json!(2), &json!(1), &json!(1)),
        "the late row, and the last one read again; not the old one: {second}"
    );
    assert!(
        app.shards("c_contact")
            .await
            .iter()
            .any(|s| s["name"] == "Committed late")
    );
}

#[tokio::test]
async fn registration_names_the_connection_setting_that_is_wrong() {
    let app = TestApp::new();
    let fake = FakeDynamics::start().await;
    let mut bad = integration(&fake);
    bad["structuredData"]["connection"]["environmentUrl"] =
        json!("http://contoso.crm.dynamics.com");
    let file = app.path("bad.json");
    std::fs::write(&file, bad.to_string()).unwrap();

    let out = app
        .cli(&["integrations", "put", file.to_str().unwrap()])
        .await;

    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connection.environmentUrl must be https"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_token_refresher_refreshes_a_token_before_it_expires_and_records_the_new_expiry() {
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "Contact"}));
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;
    let first_expiry = app.integration(ID).await["structuredData"]["credentialsExpireAt"].clone();
    assert!(
        first_expiry.is_string(),
        "the job's refresh recorded when its token expires"
    );

    // An hour-long token is within the default two-hour threshold.
    let res = handler
        .invoke(
            "TokenRefresher",
            &timer_without_status("TokenRefresher", "timer"),
        )
        .await;

    assert!(res.host_accepts(), "{res:?}");
    assert_eq!(fake.token_refreshes(), 2);
    let events = app.events();
    let refreshed = events
        .iter()
        .find(|e| e.kind == "integration.token.refreshed")
        .expect("a refreshed event");
    assert_eq!(refreshed.data["integrationId"], ID);
    let state = &app.integration(ID).await["structuredData"];
    assert!(state["credentialsExpireAt"].as_str() >= first_expiry.as_str());
    let live: Vec<String> = fake
        .state
        .lock()
        .unwrap()
        .entra
        .refresh_tokens
        .iter()
        .cloned()
        .collect();
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(
        secrets.contains(&live[0]),
        "the rotated refresh token is stored"
    );
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_holds_up_no_other_integrations_refresh() {
    // Two environments, the first registered (and asked first) behind a token endpoint that
    // stops answering.
    let (hanging, fine) = (FakeDynamics::start().await, FakeDynamics::start().await);
    let app = TestApp::new();
    for (id, fake) in [("int-a-hanging", &hanging), ("int-b-fine", &fine)] {
        let mut file = integration(fake);
        file["id"] = json!(id);
        // One integration per organization.
        file["structuredData"]["connection"]["organizationId"] =
            json!(uuid::Uuid::new_v4().to_string());
        app.register_integration(file).await;
        app.set_credentials(id, &fake.credentials()).await;
    }
    let handler = app.host_handler().await;
    for id in ["int-a-hanging", "int-b-fine"] {
        let job = json!({
            "integrationId": id, "tenantId": "t1", "jobType": "full_sync",
            "provider": "dynamics365", "jobId": format!("job-{id}"),
            "scheduledAt": "2026-11-22T10:00:00Z", "attempt": 1
        });
        let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), id, 1, None);
        let res = handler.invoke("SyncInboundScheduled", &envelope).await;
        assert!(res.host_accepts(), "{res:?}");
    }
    hanging.state.lock().unwrap().hold_next_token = true;

    let refresher = handler.invoke_in_background(
        "TokenRefresher",
        &timer_without_status("TokenRefresher", "timer"),
    );
    hanging.held.notified().await;
    wait_until(
        "the other environment's token is refreshed",
        std::time::Duration::from_secs(30),
        || async { fine.token_refreshes() == 2 },
    )
    .await;

    hanging.release.notify_one();
    let res = refresher.await.unwrap();
    assert!(res.host_accepts(), "{res:?}");
    assert_eq!(hanging.token_refreshes(), 2);
}

#[tokio::test]
async fn a_refresh_token_the_provider_refuses_stops_the_integration_until_new_credentials() {
    let fake = FakeDynamics::start().await;
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;
    // The user revoked the app's consent.
    fake.state.lock().unwrap().entra.refresh_tokens.clear();

    let res = handler
        .invoke(
            "TokenRefresher",
            &timer_without_status("TokenRefresher", "timer"),
        )
        .await;

    assert!(res.host_accepts(), "{res:?}");
    let state = &app.integration(ID).await["structuredData"];
    assert_eq!(state["status"], "error");
    assert!(
        state["statusMessage"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{state}"
    );
    let failed = app
        .events()
        .into_iter()
        .find(|e| e.kind == "integration.token.refresh.failed")
        .expect("a failed event");
    assert_eq!(failed.data["code"], "AUTHENTICATION_FAILED");
    let everything = serde_json::to_string(&app.events()).unwrap();
    assert!(
        !everything.contains("0.AAAA-rt"),
        "no refresh token in events"
    );
}

#[tokio::test]
async fn twenty_jobs_that_need_a_token_at_once_refresh_it_once() {
    let test = TestApp::new();
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "Contact"}));
    test.register_integration(integration(&fake)).await;
    test.set_credentials(ID, &fake.credentials()).await;
    let app = test.app(&[]);
    let dynamics = Dynamics365::new();
    let request = FetchRequest {
        entity: "contacts".into(),
        fields: vec!["fullname".into()],
        cursor: None,
        page_token: None,
        filters: Vec::new(),
        page_size: 100,
        cursor_read_at: None,
    };
    let settings = integration(&fake)["structuredData"]["connection"]
        .as_object()
        .unwrap()
        .clone();

    let pages = join_all((0..20).map(|_| async {
        let keeper = Arc::new(StoredCredentials::new(&app, "t1", ID));
        let credentials = keeper.load().await.unwrap();
        let mut conn = Connection::with_keeper(ID, settings.clone(), credentials, keeper);
        dynamics.fetch_page(&mut conn, &request).await
    }))
    .await;

    for page in &pages {
        assert_eq!(page.as_ref().unwrap().records.len(), 1);
    }
    assert_eq!(fake.token_refreshes(), 1, "one refresh served all twenty");
    println!(
        "refresh calls made by 20 concurrent jobs: {}",
        fake.token_refreshes()
    );
}

#[tokio::test]
async fn rows_are_created_updated_only_at_the_version_written_against_and_deleted_once() {
    let test = TestApp::new();
    let fake = FakeDynamics::start().await;
    test.register_integration(integration(&fake)).await;
    test.set_credentials(ID, &fake.credentials()).await;
    let app = test.app(&[]);
    let settings = integration(&fake)["structuredData"]["connection"]
        .as_object()
        .unwrap()
        .clone();
    let keeper = Arc::new(StoredCredentials::new(&app, "t1", ID));
    let credentials = keeper.load().await.unwrap();
    let mut conn = Connection::with_keeper(ID, settings, credentials, keeper);
    let dynamics = Dynamics365::new();
    let writer = adapters::Provider::write_back(&dynamics).unwrap();
    let write = |id: Option<&str>, fields: Value, version: Option<&str>| RecordWrite {
        entity: "contacts".into(),
        external_id: id.map(str::to_string),
        fields: fields.as_object().unwrap().clone(),
        expected_version: version.map(str::to_string),
        idempotency_key: "wb-1".into(),
        key_field: Some("castiel_id".into()),
    };

    let created = writer
        .create(
            &mut conn,
            &write(None, json!({"fullname": "Ann Lee"}), None),
        )
        .await
        .unwrap();
    let first_version = created
        .version
        .clone()
        .expect("Dataverse says the row's version");
    // The answer was lost and the create is tried again: the row the first attempt made is
    // found by its idempotency key, not made twice.
    let again = writer
        .create(
            &mut conn,
            &write(None, json!({"fullname": "Ann Lee"}), None),
        )
        .await
        .unwrap();
    assert_eq!(again.external_id, created.external_id);
    assert_eq!(fake.rows("contacts").len(), 1);
    // Found, the row is written again with what the retry asks, over the version it read.
    let found_version = again.version.clone().expect("the version written");
    assert_ne!(found_version, first_version);
    let updated = writer
        .update(
            &mut conn,
            &write(
                Some(&created.external_id),
                json!({"fullname": "Ann Lee-Smith"}),
                Some(&found_version),
            ),
        )
        .await
        .unwrap();
    assert_ne!(updated.version.as_deref(), Some(found_version.as_str()));

    let stale = writer
        .update(
            &mut conn,
            &write(
                Some(&created.external_id),
                json!({"fullname": "Someone else's edit"}),
                Some(&first_version),
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict, "{stale}");
    let unknown = writer
        .update(
            &mut conn,
            &write(
                Some("00000000-0000-4000-8000-000000000999"),
                json!({"fullname": "x"}),
                None,
            ),
        )
        .await
        .unwrap_err();
    assert_eq!(
        unknown.code,
        ErrorCode::NotFound,
        "an update never creates: {unknown}"
    );

    let request = FetchRequest {
        entity: "contacts".into(),
        fields: vec!["fullname".into()],
        cursor: None,
        page_token: None,
        filters: Vec::new(),
        page_size: 100,
        cursor_read_at: None,
    };
    let rows = dynamics
        .fetch_by_ids(
            &mut conn,
            &request,
            std::slice::from_ref(&created.external_id),
        )
        .await
        .unwrap();
    assert_eq!(rows[0].fields["fullname"], "Ann Lee-Smith");

    let gone = write(Some(&created.external_id), json!({}), None);
    writer.delete(&mut conn, &gone).await.unwrap();
    writer
        .delete(&mut conn, &gone)
        .await
        .expect("a row already gone counts as deleted");
    assert!(
        dynamics
            .fetch_by_ids(
                &mut conn,
                &request,
                std::slice::from_ref(&created.external_id)
            )
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_sync_record_expires_after_the_tenants_retention() {
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "Contact"}));
    let app = TestApp::new();
    app.register_integration(integration(&fake)).await;
    app.set_credentials(ID, &fake.credentials()).await;
    // Tenant t1 is on the plan that keeps a week of history.
    let handler = app
        .host_handler_with(&[("HISTORY_RETENTION_DAYS_BY_TENANT", "t0=90, t1=7")])
        .await;

    run_job(&handler, "job-1", "full_sync").await;

    let history = app.history().await;
    assert_eq!(
        history[0]["ttl"],
        7 * 24 * 60 * 60,
        "Cosmos DB's per-item ttl"
    );
    let store = app.store();
    assert_eq!(
        store
            .purge_expired(chrono::Utc::now() + chrono::Duration::days(6))
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .purge_expired(chrono::Utc::now() + chrono::Duration::days(8))
            .unwrap(),
        1
    );
    assert!(app.history().await.is_empty());
    assert_eq!(
        app.shards("c_contact").await.len(),
        1,
        "only the history expires"
    );
}

#[tokio::test]
async fn history_stats_add_up_an_integrations_syncs() {
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "Contact"}));
    let (app, handler) = connected(&fake, integration(&fake)).await;
    run_job(&handler, "job-1", "full_sync").await;
    run_job(&handler, "job-2", "incremental").await;

    let stats = app
        .cli_json(&["history", "--tenant", "t1", "--stats", "7"])
        .await;

    assert_eq!(stats.as_array().unwrap().len(), 1, "{stats}");
    let mine = &stats[0];
    assert_eq!(mine["integrationId"], ID);
    assert_eq!(
        (&mine["jobs"], &mine["successRate"]),
        (&json!(2), &json!(1.0))
    );
    assert_eq!(
        (&mine["recordsFetched"], &mine["shardsWritten"]),
        (&json!(1), &json!(1))
    );
    assert!(mine["p95DurationMs"].is_u64(), "{mine}");

    // A window reaching back past the first date there is covers every sync.
    let ever = app
        .cli_json(&["history", "--tenant", "t1", "--stats", "4294967295"])
        .await;
    assert_eq!(ever[0]["jobs"], json!(2), "{ever}");
}

#[tokio::test]
async fn rows_one_request_changed_each_reach_the_sync_and_its_deletions_one_read_a_table() {
    let fake = FakeDynamics::start().await;
    let ids = [
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    ];
    fake.load(
        "contacts",
        ids.iter()
            .map(|id| json!({"contactid": id, "fullname": "Ann Example"})),
    );
    let app = TestApp::new();
    let mut contacts_and_accounts = integration(&fake);
    contacts_and_accounts["structuredData"]["entityMappings"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "externalEntity": "accounts", "shardTypeId": "c_company", "nameField": "name",
            "fieldMappings": [{"source": "name", "target": "name"}]
        }));
    app.register_integration(contacts_and_accounts).await;
    let mut credentials = fake.credentials();
    credentials["webhook_key"] = json!("dataverse-webhook-key");
    app.set_credentials(ID, &credentials).await;
    let handler = app.host_handler().await;

    // One UpdateMultiple request changed both rows: the step runs once a row, each time with
    // the request's id.
    let request_id = uuid::Uuid::new_v4().to_string();
    deliver(&fake, &handler, "Update", "contact", &ids, &request_id).await;

    let queued = app.broker().peek(SYNC_INBOUND_WEBHOOK).unwrap();
    let mut rows: Vec<Value> = queued
        .iter()
        .map(|m| {
            let job: Value = serde_json::from_slice(&m.body).unwrap();
            job["webhookPayload"]["ids"].clone()
        })
        .collect();
    rows.sort_by_key(|ids| ids.to_string());
    let mut expected: Vec<Value> = ids.iter().map(|id| json!([id])).collect();
    expected.sort_by_key(|ids| ids.to_string());
    assert_eq!(
        rows, expected,
        "neither row's notification is taken for the other's"
    );

    // Deleting an account cascaded to both contacts: each row's deletion is its own.
    let cascade = uuid::Uuid::new_v4().to_string();
    let account = vec![uuid::Uuid::new_v4().to_string()];
    deliver(&fake, &handler, "Delete", "account", &account, &cascade).await;
    deliver(&fake, &handler, "Delete", "contact", &ids, &cascade).await;
    let mut deleted: Vec<Value> = app
        .broker()
        .peek(SYNC_INBOUND_WEBHOOK)
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.body).unwrap())
        .filter(|job| job["webhookPayload"]["deletedIds"].is_array())
        .map(|job| job["webhookPayload"].clone())
        .collect();
    deleted.sort_by_key(|payload| payload.to_string());
    let mut expected = vec![json!({"entity": "accounts", "deletedIds": account})];
    expected.extend(
        ids.iter()
            .map(|id| json!({"entity": "contacts", "deletedIds": [id]})),
    );
    expected.sort_by_key(|payload| payload.to_string());
    assert_eq!(deleted, expected);
}

#[tokio::test]
async fn a_row_deleted_in_dataverse_leaves_castiel_through_its_webhook_though_the_integration_polls()
 {
    let fake = FakeDynamics::start().await;
    let ann = uuid::Uuid::new_v4().to_string();
    fake.load(
        "contacts",
        [json!({"contactid": ann, "fullname": "Ann Example"})].into_iter(),
    );
    let app = TestApp::new();
    let mut polling = integration(&fake);
    // A poll reads what changed, and no deletions.
    polling["structuredData"]["connection"]["changeTracking"] = json!(false);
    app.register_integration(polling).await;
    let mut credentials = fake.credentials();
    credentials["webhook_key"] = json!("dataverse-webhook-key");
    app.set_credentials(ID, &credentials).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync").await;
    assert_eq!(app.shards("c_contact").await.len(), 1);

    fake.delete("contacts", &ann);
    let request_id = uuid::Uuid::new_v4().to_string();
    deliver(&fake, &handler, "Delete", "contact", &[ann], &request_id).await;
    app.deliver_webhook_jobs(&handler).await;

    assert!(app.shards("c_contact").await.is_empty(), "Ann is gone");
}

#[tokio::test]
async fn a_row_the_mappings_filters_leave_out_is_not_synced_through_its_webhook_either() {
    let fake = FakeDynamics::start().await;
    let (ann, bo) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    fake.load(
        "contacts",
        [
            json!({"contactid": ann, "fullname": "Ann Example", "address1_country": "NL"}),
            json!({"contactid": bo, "fullname": "Bo Example", "address1_country": "US"}),
        ]
        .into_iter(),
    );
    let app = TestApp::new();
    let mut dutch = integration(&fake);
    dutch["structuredData"]["entityMappings"][0]["filters"] = json!(["address1_country eq 'NL'"]);
    app.register_integration(dutch).await;
    let mut credentials = fake.credentials();
    credentials["webhook_key"] = json!("dataverse-webhook-key");
    app.set_credentials(ID, &credentials).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync").await;
    let names =
        |shards: Vec<Value>| -> Vec<Value> { shards.iter().map(|s| s["name"].clone()).collect() };
    assert_eq!(names(app.shards("c_contact").await), ["Ann Example"]);

    // Both are edited; Dataverse posts its Update step for each.
    for id in [&ann, &bo] {
        deliver(
            &fake,
            &handler,
            "Update",
            "contact",
            std::slice::from_ref(id),
            &uuid::Uuid::new_v4().to_string(),
        )
        .await;
    }
    app.deliver_webhook_jobs(&handler).await;
    assert_eq!(
        names(app.shards("c_contact").await),
        ["Ann Example"],
        "Bo is outside the mapping's filters"
    );
}

#[tokio::test]
async fn a_filter_holding_an_ampersand_reaches_dataverse_whole() {
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "R&D Lead"}));
    fake.add("contacts", json!({"fullname": "Sales Lead"}));
    let mut filtered = integration(&fake);
    filtered["structuredData"]["connection"]["changeTracking"] = json!(false);
    filtered["structuredData"]["entityMappings"][0]["filters"] = json!(["fullname eq 'R&D Lead'"]);
    let (app, handler) = connected(&fake, filtered).await;

    run_job(&handler, "job-1", "full_sync").await;

    let names: Vec<Value> = app
        .shards("c_contact")
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, ["R&D Lead"]);
}

#[tokio::test]
async fn a_table_the_application_user_may_not_read_fails_with_the_reason_and_keeps_the_integration_active()
 {
    let fake = FakeDynamics::start().await;
    fake.add("contacts", json!({"fullname": "Ann Example"}));
    fake.state.lock().unwrap().forbidden.push("leads".into());
    let mut with_leads = integration(&fake);
    with_leads["structuredData"]["entityMappings"]
        .as_array_mut()
        .unwrap()
        .push(
            json!({"externalEntity": "leads", "shardTypeId": "c_lead", "nameField": "full_name",
                     "fieldMappings": [{"source": "fullname", "target": "full_name"}]}),
        );
    let (app, handler) = connected(&fake, with_leads).await;

    run_job(&handler, "job-1", "full_sync").await;

    let record = record(&app, "job-1").await;
    let errors = record["errors"].to_string();
    assert!(errors.contains("prvRead"), "{record}");
    assert!(!errors.contains("INVALID_CREDENTIALS"), "{record}");
    let integration = app.integration(ID).await;
    assert_eq!(
        integration["structuredData"]["status"], "active",
        "granting the privilege is enough: {integration}"
    );
}

/// Delivers Dataverse's webhook for each of `rows` of `table`, all changed by `message` in the
/// request `request_id`.
async fn deliver(
    fake: &FakeDynamics,
    handler: &HostedHandler,
    message: &str,
    table: &str,
    rows: &[String],
    request_id: &str,
) {
    for id in rows {
        let (mut headers, body) = fake.webhook_in_request(message, table, id, request_id);
        headers.push(("x-webhook-key".into(), "dataverse-webhook-key".into()));
        let out = handler
            .post_webhook("dynamics365", &[], &headers, &body)
            .await;
        assert_eq!(out["statusCode"], 200, "{out}");
    }
}

#[tokio::test]
async fn a_delivery_the_queue_cannot_take_now_is_answered_503_which_dataverse_delivers_again() {
    use crate::fake_azure::{FakeServiceBus, SAS_KEY};
    let fake = FakeDynamics::start().await;
    let ann = fake.add("contacts", json!({"fullname": "Ann Example"}));
    let service_bus = FakeServiceBus::start().await;
    let app = TestApp::new();
    app.register_integration(integration(&fake)).await;
    let mut credentials = fake.credentials();
    credentials["webhook_key"] = json!("dataverse-webhook-key");
    app.set_credentials(ID, &credentials).await;
    let connection = service_bus.connection_string(SAS_KEY);
    let handler = app
        .host_handler_with(&[("ServiceBusConnection", connection.as_str())])
        .await;
    let (mut headers, body) = fake.webhook("Delete", "contact", &ann);
    headers.push(("x-webhook-key".into(), "dataverse-webhook-key".into()));

    service_bus
        .unavailable
        .lock()
        .unwrap()
        .push(SYNC_INBOUND_WEBHOOK.into());
    let out = handler
        .post_webhook("dynamics365", &[], &headers, &body)
        .await;
    assert_eq!(out["statusCode"], 503, "{out}");
    assert!(out["headers"]["Retry-After"].is_string(), "{out}");

    service_bus.unavailable.lock().unwrap().clear();
    let out = handler
        .post_webhook("dynamics365", &[], &headers, &body)
        .await;
    assert_eq!(out["statusCode"], 200, "{out}");
    assert_eq!(service_bus.held(SYNC_INBOUND_WEBHOOK).len(), 1);
}
