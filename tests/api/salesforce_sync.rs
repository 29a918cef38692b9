//! Inbound sync from Salesforce, end to end: a loopback Salesforce, the real handler under the
//! fake Functions host, and the shards and history it leaves.

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

use handler::engine::pipeline::content_hash;
use handler::model::shard::{ExternalRelationship, RelationshipStatus, SyncDirection};
use handler::queue::{SYNC_DEADLETTER, SYNC_INBOUND_SCHEDULED};
use handler::store::ShardStore;

use crate::fake_host::{HostedHandler, service_bus_message};
use crate::fake_salesforce::{FakeSalesforce, ORG_ID};
use crate::helpers::{TestApp, wait_until};

/// A timestamp as cursors and range-compared fields spell it.
fn fixed(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const UNLIMITED: &[(&str, &str)] = &[("SYNC_MAX_RECORDS", "1000000")];

/// When the test org's records were last modified: two days ago, inside Salesforce's 15-day
/// deletion window, in whole seconds.
fn base_time() -> DateTime<Utc> {
    static BASE: std::sync::LazyLock<DateTime<Utc>> = std::sync::LazyLock::new(|| {
        let t = Utc::now() - Duration::days(2);
        DateTime::from_timestamp(t.timestamp(), 0).unwrap()
    });
    *BASE
}

fn integration(fake: &FakeSalesforce, with_contacts: bool) -> Value {
    let mut mappings = vec![json!({
        "externalEntity": "Account", "shardTypeId": "c_company", "nameField": "name",
        "fieldMappings": [
            {"source": "Name", "target": "name", "required": true},
            {"source": "Industry", "target": "industry"}
        ],
        "derivedShards": [{
            "shardTypeId": "c_company_profile", "when": {"field": "Industry"},
            "fieldMappings": [{"source": "Industry", "target": "industry"}]
        }]
    })];
    if with_contacts {
        mappings.push(json!({
            "externalEntity": "Contact", "shardTypeId": "c_contact", "nameField": "full_name",
            "fieldMappings": [
                {"source": "Name", "targets": ["first_name", "last_name"], "transform": "split"},
                {"source": "Name", "target": "full_name"},
                {"source": "Email", "target": "email", "required": true}
            ],
            "deduplication": {"rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"}
        }));
    }
    json!({
        "id": "int-acme-sf", "tenantId": "t1", "name": "Acme Salesforce",
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "connection": {"loginHost": fake.url, "organizationId": ORG_ID},
            "entityMappings": mappings
        }
    })
}

/// A fresh app with the Salesforce integration registered (its accounts, and its contacts
/// `with_contacts`) and the fake org's credentials stored.
async fn spawn_app(fake: &FakeSalesforce, with_contacts: bool) -> TestApp {
    let app = TestApp::new();
    app.register_integration(integration(fake, with_contacts))
        .await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    app
}

fn add_accounts(fake: &FakeSalesforce, count: usize) {
    fake.load(
        "Account",
        (0..count).map(|i| {
            let industry = if i % 2 == 0 { json!("Technology") } else { Value::Null };
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}"), "Industry": industry}),
                base_time() + Duration::seconds(i as i64),
            )
        }),
    );
}

/// A job of the integration as the host delivers it to SyncInboundScheduled.
fn job_envelope(job_id: &str, job_type: &str, delivery: u32) -> Value {
    let job = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": job_type,
        "provider": "salesforce", "jobId": job_id, "scheduledAt": "2026-11-22T10:00:00Z", "attempt": 1
    });
    service_bus_message(
        "SyncInboundScheduled",
        &job.to_string(),
        job_id,
        delivery,
        None,
    )
}

async fn run_job(handler: &HostedHandler, job_id: &str, job_type: &str, delivery: u32) {
    let res = handler
        .invoke(
            "SyncInboundScheduled",
            &job_envelope(job_id, job_type, delivery),
        )
        .await;
    assert!(res.host_accepts(), "{res:?}");
}

/// Another job takes the integration over, as after a job's hold lapsed.
async fn take_over(app: &TestApp) {
    let held = json!({"chain": "job-other", "jobId": "job-other",
                      "since": Utc::now(), "until": Utc::now() + Duration::minutes(15)});
    age_integration(app, |data| data["running"] = held).await;
}

fn record_of<'a>(history: &'a [Value], job_id: &str) -> &'a Value {
    &history
        .iter()
        .find(|r| r["structuredData"]["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no history for {job_id}: {history:?}"))["structuredData"]
}

#[tokio::test]
async fn a_full_sync_pages_through_salesforce_into_shards_and_records_its_history() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 2500);
    for i in 0..300 {
        // Contacts 0 and 1 are the same person under two Salesforce ids.
        let email = if i == 1 {
            "person0@acme.test".to_string()
        } else {
            format!("person{i}@acme.test")
        };
        fake.add(
            "Contact",
            json!({"Id": format!("003{i:015}"), "Name": format!("Mary Ann Person{i}"), "Email": email}),
            base_time() + Duration::seconds(i),
        );
    }
    {
        let mut org = fake.org.lock().unwrap();
        org.rotate_refresh_tokens = true;
        // The access token expires after the first page: the second gets a 401.
        org.expire_token_after = Some(1);
    }
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-full-1", "full_sync", 1).await;

    let history = app.history().await;
    assert_eq!(history.len(), 1);
    let shard = &history[0];
    assert_eq!(shard["shardTypeId"], "c_integrationSync");
    assert!(
        shard["id"]
            .as_str()
            .unwrap()
            .starts_with("sync_20261122_100000_")
    );
    let started = shard["structuredData"]["startedAt"].as_str().unwrap();
    assert_eq!(
        shard["name"],
        format!("Sync {}", started[..19].replace('T', " "))
    );
    assert_eq!(
        shard["relationships"],
        json!([{"type": "sync_of", "targetId": "int-acme-sf", "targetType": "c_integration"}])
    );
    assert_eq!(shard["createdBy"], "system");
    let record = &shard["structuredData"];
    assert_eq!(record["integrationId"], "int-acme-sf");
    assert_eq!(record["integrationName"], "Acme Salesforce");
    assert_eq!(record["providerName"], "salesforce");
    assert_eq!(record["jobId"], "job-full-1");
    assert_eq!(record["jobType"], "full");
    assert_eq!(record["trigger"], "scheduled");
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["statusMessage"], "Sync completed successfully");
    assert!(record["durationMs"].is_u64());
    assert!(record["completedAt"].as_str().unwrap() >= record["startedAt"].as_str().unwrap());
    assert_eq!(
        record["stats"],
        json!({"recordsFetched": 2800, "shardsCreated": 2799, "shardsUpdated": 1, "shardsSkipped": 0, "shardsFailed": 0})
    );
    assert_eq!(
        record["entityStats"],
        json!([
            {"externalEntity": "Account", "shardTypeId": "c_company", "direction": "inbound",
             "fetched": 2500, "created": 2500, "updated": 0, "skipped": 0, "failed": 0},
            {"externalEntity": "Contact", "shardTypeId": "c_contact", "direction": "inbound",
             "fetched": 300, "created": 299, "updated": 1, "skipped": 0, "failed": 0}
        ])
    );
    let details = &record["syncDetails"];
    assert_eq!(details["pagesProcessed"], 3);
    assert!(
        details["query"]
            .as_str()
            .unwrap()
            .starts_with("SELECT Id, SystemModstamp, Name, Industry FROM Account")
    );
    assert!(
        details.get("syncFromDate").is_none(),
        "a full sync has no lower bound"
    );
    assert!(record.get("errors").is_none());

    // Shards: one per account, a profile for each account with an industry, one contact per
    // person with both Salesforce ids linked, the name split.
    assert_eq!(app.shards("c_company").await.len(), 2500);
    assert_eq!(app.shards("c_company_profile").await.len(), 1250);
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 299);
    let merged = contacts
        .iter()
        .find(|c| c["structuredData"]["email"] == "person0@acme.test")
        .unwrap();
    assert_eq!(
        merged["external_relationships"].as_array().unwrap().len(),
        2
    );
    let found = app
        .cli_json(&[
            "shards",
            "--tenant",
            "t1",
            "--type",
            "c_contact",
            "--external-id",
            "003000000000000042",
        ])
        .await;
    let person = &found[0];
    assert_eq!(person["name"], "Mary Ann Person42");
    assert_eq!(person["structuredData"]["first_name"], "Mary Ann");
    assert_eq!(person["structuredData"]["last_name"], "Person42");
    let link = &person["external_relationships"][0];
    assert_eq!(
        (
            link["integrationId"].clone(),
            link["syncStatus"].clone(),
            link["syncDirection"].clone()
        ),
        (json!("int-acme-sf"), json!("synced"), json!("inbound"))
    );

    // The expired token was refreshed once mid-sync, and the rotated refresh token stored.
    assert_eq!(fake.org.lock().unwrap().token_refreshes, 2);
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(
        secrets.contains("rt-rotated-2"),
        "the newest refresh token is kept"
    );
    assert!(!secrets.contains("rt-initial"));

    let integration = app.integration("int-acme-sf").await;
    let state = &integration["structuredData"];
    assert!(state["lastSyncAt"].is_string());
    assert!(
        state.get("checkpoints").is_none(),
        "a finished sync leaves no checkpoint"
    );
    assert_eq!(
        state["cursors"]["Account"],
        fixed(base_time() + Duration::seconds(2499)),
        "the latest SystemModstamp synced, as the adapter spells its cursors"
    );

    // The same message again (a redelivery) runs nothing twice.
    let requests = fake.requests().len();
    run_job(&handler, "job-full-1", "full_sync", 2).await;
    assert_eq!(fake.requests().len(), requests);
    assert_eq!(app.history().await.len(), 1);
    let kinds: Vec<_> = app.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        ["integration.sync.started", "integration.sync.completed"]
    );
}

#[tokio::test]
async fn a_paused_integration_syncs_only_when_an_operator_asks() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3);
    let app = spawn_app(&fake, false).await;
    app.set_integration_status("int-acme-sf", "paused").await;
    let handler = app.host_handler().await;

    // A scheduled job queued before the pause.
    run_job(&handler, "job-1", "full_sync", 1).await;

    assert!(app.shards("c_company").await.is_empty(), "nothing synced");
    assert!(app.history().await.is_empty(), "and no run recorded");
    assert!(fake.requests().is_empty(), "Salesforce was not asked");
    assert!(app.broker().peek(SYNC_DEADLETTER).unwrap().is_empty());

    let manual = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "full_sync",
        "provider": "salesforce", "jobId": "job-2", "scheduledAt": "2026-11-22T10:00:00Z",
        "attempt": 1, "trigger": "manual", "triggeredBy": "ops"
    });
    let asked = service_bus_message(
        "SyncInboundScheduled",
        &manual.to_string(),
        "job-2",
        1,
        None,
    );
    let res = handler.invoke("SyncInboundScheduled", &asked).await;
    assert!(res.host_accepts(), "{res:?}");
    assert_eq!(
        app.shards("c_company").await.len(),
        3,
        "an operator's sync runs"
    );
}

#[tokio::test]
async fn records_whose_derived_shards_fail_are_synced_and_the_run_is_partial_not_failed() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 4);
    let app = TestApp::new();
    let mut profiles_fail = integration(&fake, false);
    // Every account's profile needs a field no account has.
    profiles_fail["structuredData"]["entityMappings"][0]["derivedShards"][0] = json!({
        "shardTypeId": "c_company_profile",
        "fieldMappings": [{"source": "Rating", "target": "rating", "required": true}]
    });
    app.register_integration(profiles_fail).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    assert_eq!(app.shards("c_company").await.len(), 4);
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 4, "{record}");
    assert_eq!(record["stats"]["shardsFailed"], 4, "{record}");
}

#[tokio::test]
async fn a_person_on_a_later_page_is_merged_into_the_shard_an_earlier_page_wrote() {
    // Pages hold 2,000 contacts: the first of the second page is the last of the first under
    // another Salesforce id, and one on the third page is the sixth of the first.
    let fake = FakeSalesforce::start().await;
    fake.load(
        "Contact",
        (0..4100).map(|i| {
            let person = match i {
                2000 => 1999,
                4050 => 5,
                i => i,
            };
            (
                json!({"Id": format!("003{i:015}"), "Name": format!("Mary Ann Person{person}"),
                       "Email": format!("person{person}@acme.test")}),
                base_time() + Duration::seconds(i as i64),
            )
        }),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-pages", "full_sync", 1).await;

    let history = app.history().await;
    let record = record_of(&history, "job-pages");
    assert_eq!(record["syncDetails"]["pagesProcessed"], 4, "{record}");
    assert_eq!(
        record["entityStats"][1],
        json!({"externalEntity": "Contact", "shardTypeId": "c_contact", "direction": "inbound",
               "fetched": 4100, "created": 4098, "updated": 2, "skipped": 0, "failed": 0})
    );
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 4098);
    for (email, ids) in [
        (
            "person1999@acme.test",
            ["003000000000001999", "003000000000002000"],
        ),
        (
            "person5@acme.test",
            ["003000000000000005", "003000000000004050"],
        ),
    ] {
        let person = contacts
            .iter()
            .find(|c| c["structuredData"]["email"] == email)
            .unwrap();
        let linked: Vec<&str> = person["external_relationships"]
            .as_array()
            .unwrap()
            .iter()
            .map(|link| link["externalId"].as_str().unwrap())
            .collect();
        assert_eq!(linked, ids, "{person}");
    }
}

#[tokio::test]
async fn a_merged_contact_stays_while_one_of_its_records_lives_and_goes_with_the_last() {
    // Two Salesforce contacts of one person, merged into one shard by email. A CRM's merge of
    // duplicates deletes the loser; here it is the one whose id the shard took.
    let fake = FakeSalesforce::start().await;
    for (i, name) in ["Ann Lee", "Ann B. Lee"].into_iter().enumerate() {
        fake.add(
            "Contact",
            json!({"Id": format!("003{i:015}"), "Name": name, "Email": "ann@acme.test"}),
            base_time() + Duration::seconds(i as i64),
        );
    }
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0]["id"], "int-acme-sf~Contact~003000000000000000");
    let statuses = |contact: &Value| -> Vec<String> {
        contact["external_relationships"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r["externalId"], r["syncStatus"]))
            .collect()
    };

    fake.delete(
        "Contact",
        "003000000000000000",
        Utc::now() - Duration::minutes(2),
    );
    run_job(&handler, "job-2", "incremental", 1).await;
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 1, "Ann still has a record at Salesforce");
    assert_eq!(
        statuses(&contacts[0]),
        [
            "\"003000000000000000\" \"deleted\"",
            "\"003000000000000001\" \"synced\""
        ]
    );
    assert_eq!(
        record_of(&app.history().await, "job-2")["stats"]["shardsUpdated"],
        1
    );

    // The survivor's own id names no shard: it is found by its link.
    fake.delete(
        "Contact",
        "003000000000000001",
        Utc::now() - Duration::minutes(1),
    );
    run_job(&handler, "job-3", "incremental", 1).await;
    assert!(
        app.shards("c_contact").await.is_empty(),
        "soft-deleted with its last record"
    );
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["stats"]["shardsUpdated"], 1, "{record}");
}

#[tokio::test]
async fn a_merged_contact_stays_in_its_shard_when_either_records_email_changes() {
    // Ann's two Salesforce contacts, merged into one shard by email. Then the second gets an
    // email of its own, and later the first does too: the shard's links, not the emails,
    // say where each record lives.
    let fake = FakeSalesforce::start().await;
    let ann = |i: usize, name: &str, email: &str, at: DateTime<Utc>| {
        fake.add(
            "Contact",
            json!({"Id": format!("003{i:015}"), "Name": name, "Email": email}),
            at,
        );
    };
    ann(0, "Ann Lee", "ann@acme.test", base_time());
    ann(
        1,
        "Ann B. Lee",
        "ann@acme.test",
        base_time() + Duration::seconds(1),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    assert_eq!(app.shards("c_contact").await.len(), 1);

    let later = Utc::now() - Duration::minutes(2);
    ann(1, "Ann B. Lee", "ann.lee@home.test", later);
    run_job(&handler, "job-2", "incremental", 1).await;
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 1, "still one Ann: {contacts:?}");
    assert_eq!(contacts[0]["structuredData"]["email"], "ann.lee@home.test");
    let stats = record_of(&app.history().await, "job-2")["stats"].clone();
    assert_eq!(
        (&stats["shardsCreated"], &stats["shardsUpdated"]),
        (&json!(0), &json!(1)),
        "{stats}"
    );

    ann(
        0,
        "Ann Lee",
        "a.lee@acme.test",
        Utc::now() - Duration::minutes(1),
    );
    run_job(&handler, "job-3", "incremental", 1).await;
    ann(1, "Ann Lee-Brown", "ann.lee@home.test", Utc::now());
    run_job(&handler, "job-4", "incremental", 1).await;
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 1, "still one Ann: {contacts:?}");
    assert_eq!(contacts[0]["structuredData"]["full_name"], "Ann Lee-Brown");
    let links: Vec<&Value> = contacts[0]["external_relationships"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["externalId"])
        .collect();
    assert_eq!(
        links,
        [&json!("003000000000000000"), &json!("003000000000000001")]
    );
    let stats = record_of(&app.history().await, "job-4")["stats"].clone();
    assert_eq!(stats["shardsCreated"], 0, "{stats}");
}

#[tokio::test]
async fn a_record_listed_again_on_the_next_page_updates_the_shard_the_page_before_wrote() {
    // The last contact of the first page is listed again at the start of the second, changed
    // meanwhile (a listing may return a record modified while it ran).
    let fake = FakeSalesforce::start().await;
    let contact = |i: usize, name: &str, email: &str| {
        (
            json!({"Id": format!("003{i:015}"), "Name": name, "Email": email}),
            base_time() + Duration::seconds(i as i64),
        )
    };
    fake.load(
        "Contact",
        (0..2000)
            .map(|i| {
                contact(
                    i,
                    &format!("Mary Ann Person{i}"),
                    &format!("person{i}@acme.test"),
                )
            })
            .chain([(
                json!({"Id": "003000000000001999", "Name": "Mary Ann Moved",
                       "Email": "moved@acme.test"}),
                base_time() + Duration::seconds(2000),
            )]),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-again", "full_sync", 1).await;

    let history = app.history().await;
    let record = record_of(&history, "job-again");
    assert_eq!(
        record["entityStats"][1],
        json!({"externalEntity": "Contact", "shardTypeId": "c_contact", "direction": "inbound",
               "fetched": 2001, "created": 2000, "updated": 1, "skipped": 0, "failed": 0}),
        "{record}"
    );
    let contacts = app.shards("c_contact").await;
    assert_eq!(contacts.len(), 2000);
    let moved = contacts
        .iter()
        .find(|c| c["external_relationships"][0]["externalId"] == "003000000000001999")
        .unwrap();
    assert_eq!(moved["structuredData"]["email"], "moved@acme.test");
    assert_eq!(moved["name"], "Mary Ann Moved");
}

#[tokio::test]
async fn an_incremental_sync_writes_only_what_changed_and_soft_deletes_what_was_deleted() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 50);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let before: Vec<Value> = app.shards("c_company").await;
    assert_eq!(
        app.shards("c_company_profile").await.len(),
        25,
        "a profile for each account in an industry"
    );

    let later = base_time() + Duration::hours(1);
    for i in [3, 4, 5] {
        fake.add(
            "Account",
            json!({"Id": format!("001{i:015}"), "Name": format!("Renamed {i}"), "Industry": null}),
            later,
        );
    }
    fake.add(
        "Account",
        json!({"Id": "001999999999999999", "Name": "Newco", "Industry": null}),
        later,
    );
    fake.delete(
        "Account",
        "001000000000000010",
        Utc::now() - Duration::minutes(2),
    );
    fake.delete(
        "Account",
        "001000000000000011",
        Utc::now() - Duration::minutes(2),
    );
    // And one made and deleted between the two syncs: nothing to do, nothing skipped.
    fake.delete(
        "Account",
        "001000000000000777",
        Utc::now() - Duration::minutes(2),
    );
    run_job(&handler, "job-2", "incremental", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["jobType"], "incremental");
    assert_eq!(record["status"], "success", "{record}");
    // Fetched: three changed, one new, and the record modified at exactly the cursor (fetched
    // again, never skipped by the query, skipped by the content check). The accounts were
    // edited two days before the first sync read them, long enough for any transaction to have
    // committed: nothing before the cursor is read again. Two deletions soft-delete.
    assert_eq!(
        record["stats"],
        json!({"recordsFetched": 5, "shardsCreated": 1, "shardsUpdated": 5, "shardsSkipped": 1, "shardsFailed": 0})
    );
    assert_eq!(
        record["syncDetails"]["syncFromDate"],
        json!(base_time() + Duration::seconds(49))
    );
    assert!(fake.requests().iter().any(|r| r == "deleted Account"));

    let after = app.shards("c_company").await;
    assert_eq!(after.len(), 49, "two soft-deleted, one new");
    let at_cursor = |shards: &[Value]| {
        shards
            .iter()
            .find(|s| s["name"] == "Account 49")
            .map(|s| s["updatedAt"].clone())
    };
    assert_eq!(
        at_cursor(&before),
        at_cursor(&after),
        "an unchanged record is not written"
    );
    let renamed = after
        .iter()
        .find(|s| s["structuredData"]["name"] == "Renamed 4")
        .unwrap();
    assert_eq!(renamed["id"], "int-acme-sf~Account~001000000000000004");
    // Account 4 left its industry, and account 10 was deleted: their profiles go with them.
    let profiles: Vec<Value> = app
        .shards("c_company_profile")
        .await
        .into_iter()
        .map(|p| p["id"].clone())
        .collect();
    assert_eq!(profiles.len(), 23, "{profiles:?}");
    assert!(profiles.contains(&json!(
        "int-acme-sf~Account~001000000000000002~c_company_profile"
    )));
    for gone in ["4", "10"] {
        let id = format!("int-acme-sf~Account~001{gone:0>15}~c_company_profile");
        assert!(!profiles.contains(&json!(id)), "{id}");
    }

    // A third run with nothing changed writes nothing.
    run_job(&handler, "job-3", "incremental", 1).await;
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["stats"]["shardsCreated"], 0);
    assert_eq!(record["stats"]["shardsUpdated"], 0);
    assert_eq!(app.shards("c_company").await, after);
}

#[tokio::test]
async fn a_castiel_edit_to_a_synced_contact_is_put_back_by_the_next_sync_of_its_unchanged_record() {
    let fake = FakeSalesforce::start().await;
    fake.load(
        "Contact",
        (0..20).map(|i| {
            (
                json!({"Id": format!("003{i:015}"), "Name": format!("Mary Ann Person{i}"),
                       "Email": format!("person{i}@acme.test")}),
                base_time() + Duration::seconds(i),
            )
        }),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;

    // Castiel changes a synced field of one contact as `handler shards put` does: with the
    // time of its change and the content's new fingerprint.
    let store = app.store();
    let id = "int-acme-sf~Contact~003000000000000007";
    let mut shard = store.get("t1", id).await.unwrap().unwrap().value;
    shard.structured_data["full_name"] = json!("Edited in Castiel");
    shard.updated_at = Some(Utc::now());
    shard.content_hash = Some(content_hash(&shard));
    store.upsert(&shard).await.unwrap();

    run_job(&handler, "job-2", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(
        record["stats"],
        json!({"recordsFetched": 20, "shardsCreated": 0, "shardsUpdated": 1, "shardsSkipped": 19, "shardsFailed": 0})
    );
    let shard = store.get("t1", id).await.unwrap().unwrap().value;
    assert_eq!(
        shard.structured_data["full_name"], "Mary Ann Person7",
        "Salesforce is the source of a one-way mapping's fields"
    );
}

#[tokio::test]
async fn a_contact_renamed_or_blanked_at_salesforce_changes_its_own_shard_whatever_the_merge() {
    let fake = FakeSalesforce::start().await;
    fake.add(
        "Contact",
        json!({"Id": "003000000000000001", "Name": "Ann Old", "Email": "ann@acme.test", "Phone": "555-0100"}),
        base_time(),
    );
    let mut integration = integration(&fake, true);
    let contacts = &mut integration["structuredData"]["entityMappings"][1];
    contacts["deduplication"]["merge"] = json!("keep_first");
    contacts["fieldMappings"]
        .as_array_mut()
        .unwrap()
        .push(json!({"source": "Phone", "target": "phone"}));
    let app = TestApp::new();
    app.register_integration(integration).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;

    fake.add(
        "Contact",
        json!({"Id": "003000000000000001", "Name": "Ann New", "Email": "ann@acme.test", "Phone": null}),
        base_time() + Duration::hours(1),
    );
    run_job(&handler, "job-2", "incremental", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["entityStats"][1]["updated"], 1, "{record}");
    let contact = &app.shards("c_contact").await[0];
    assert_eq!(contact["name"], "Ann New");
    assert_eq!(contact["structuredData"]["full_name"], "Ann New");
    assert_eq!(
        contact["structuredData"]["phone"],
        Value::Null,
        "a blanked field clears"
    );
}

#[tokio::test]
async fn a_first_sync_the_allocation_stopped_does_not_read_again_what_it_had_finished() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 10);
    fake.load(
        "Contact",
        (0..3000).map(|i| {
            let email = format!("person{i}@acme.test");
            (
                json!({"Id": format!("003{i:015}"), "Name": format!("Person {i}"), "Email": email}),
                base_time() + Duration::seconds(i),
            )
        }),
    );
    // The accounts are read whole, and then the contacts' first page uses the allocation up.
    fake.org.lock().unwrap().limit_exceeded_after = Some(3);
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let first = record_of(&app.history().await, "job-1").clone();
    assert_eq!(first["status"], "partial", "{first}");
    assert_eq!(first["stats"]["shardsCreated"], 2010, "{first}");

    // The allocation comes back; the next run is still the integration's first full sync.
    fake.org.lock().unwrap().limit_exceeded_after = None;
    let asked_before = fake.requests().len();
    run_job(&handler, "job-2", "full_sync", 1).await;

    let second = record_of(&app.history().await, "job-2").clone();
    assert_eq!(second["status"], "success", "{second}");
    let asked: Vec<String> = fake.requests()[asked_before..].to_vec();
    let accounts: Vec<&String> = asked
        .iter()
        .filter(|r| r.contains("FROM Account"))
        .collect();
    assert!(
        accounts
            .iter()
            .all(|r| r.contains("WHERE SystemModstamp >=")),
        "the accounts are read from their cursor, not again from the start: {asked:?}"
    );
    assert_eq!(app.shards("c_contact").await.len(), 3000);
}

#[tokio::test]
async fn a_run_with_many_failed_records_lists_the_first_and_counts_them_all() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 10);
    // Every contact lacks the email the mapping requires.
    fake.load(
        "Contact",
        (0..500).map(|i| {
            (
                json!({"Id": format!("003{i:015}"), "Name": format!("Person {i}")}),
                base_time() + Duration::seconds(i),
            )
        }),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "partial", "{}", record["statusMessage"]);
    assert_eq!(record["stats"]["shardsFailed"], 500);
    let errors = record["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 201);
    let last = errors[200]["message"].as_str().unwrap();
    assert!(
        last.contains("more records failed than the 200 listed"),
        "{last}"
    );
}

#[tokio::test]
async fn the_orgs_concurrent_request_cap_is_waited_out_not_taken_for_the_days_allocation() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 10);
    // Another app's long reports fill the org's 25 concurrent requests for a moment.
    fake.org.lock().unwrap().concurrent_limit_next = 2;
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 10);
}

#[tokio::test]
async fn a_sync_that_exhausts_the_api_allocation_stops_partial_and_the_next_run_resumes() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    // The query and one more page succeed; the third request is refused.
    fake.org.lock().unwrap().limit_exceeded_after = Some(2);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-1", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 4000);
    assert_eq!(record["errors"][0]["code"], "RATE_LIMIT");
    assert_eq!(record["errors"][0]["retryable"], true);
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("REQUEST_LIMIT_EXCEEDED")
    );
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "no quick retry"
    );
    assert!(app.broker().peek(SYNC_DEADLETTER).unwrap().is_empty());
    let checkpoint =
        app.integration("int-acme-sf").await["structuredData"]["checkpoints"]["Account"].clone();
    assert_eq!(
        checkpoint["pageToken"],
        "/services/data/v62.0/query/01gRO00000000001-4000"
    );
    assert_eq!(app.shards("c_company").await.len(), 4000);

    fake.org.lock().unwrap().limit_exceeded_after = None;
    let before = fake.requests().len();
    run_job(&handler, "job-2", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 1000);
    assert_eq!(
        fake.requests()[before],
        "more 01gRO00000000001-4000",
        "resumed, not restarted"
    );
    assert_eq!(app.shards("c_company").await.len(), 5000);
}

#[tokio::test]
async fn a_mapping_that_names_no_fields_copies_every_field_salesforce_has() {
    let app = two_accounts_synced_by(json!([
        {"externalEntity": "Account", "shardTypeId": "c_company", "nameField": "Name"}
    ]))
    .await;

    let account = account_0(&app).await;
    assert_eq!(
        account["structuredData"]["Industry"], "Technology",
        "{account}"
    );
}

/// Two accounts synced in by a full sync of an integration with `mappings`; the run succeeded.
async fn two_accounts_synced_by(mappings: Value) -> TestApp {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 2);
    let mut integration = integration(&fake, false);
    integration["structuredData"]["entityMappings"] = mappings;
    let app = TestApp::new();
    app.register_integration(integration).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(app.shards("c_company").await.len(), 2);
    app
}

/// The shard of the first account `add_accounts` makes.
async fn account_0(app: &TestApp) -> Value {
    let companies = app.shards("c_company").await;
    companies
        .iter()
        .find(|c| c["name"] == "Account 0")
        .unwrap_or_else(|| panic!("{companies:?}"))
        .clone()
}

#[tokio::test]
async fn a_mapping_may_spell_salesforce_fields_in_any_case() {
    let app = two_accounts_synced_by(json!([{
        "externalEntity": "account", "shardTypeId": "c_company", "nameField": "name",
        "fieldMappings": [
            {"source": "name", "target": "name", "required": true},
            {"source": "INDUSTRY", "target": "industry"}
        ]
    }]))
    .await;

    let account = account_0(&app).await;
    assert_eq!(
        account["structuredData"]["industry"], "Technology",
        "{account}"
    );
}

#[tokio::test]
async fn a_save_committed_after_the_query_is_read_though_a_later_run_finished_that_query() {
    let fake = FakeSalesforce::start().await;
    let saved = DateTime::from_timestamp((Utc::now() - Duration::hours(1)).timestamp(), 0).unwrap();
    fake.load(
        "Account",
        (0..5000).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}")}),
                saved + Duration::milliseconds(i),
            )
        }),
    );
    // The query and one more page succeed; the allocation then runs out.
    fake.org.lock().unwrap().limit_exceeded_after = Some(2);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    // That run was an hour ago, a minute after the saves.
    age_integration(&app, |data| {
        let checkpoint = &mut data["checkpoints"]["Account"];
        assert!(checkpoint["readBegan"].is_string(), "{checkpoint}");
        checkpoint["readBegan"] = json!(saved + Duration::minutes(1));
    })
    .await;
    // A save stamped before the last of those, whose transaction committed after the query:
    // not in the query's answer.
    fake.add(
        "Account",
        json!({"Id": "001900000000000001", "Name": "Late Account"}),
        saved - Duration::seconds(20),
    );

    // The allocation comes back: the next run finishes the hour-old query's pages, and the
    // one after reads from the cursor they left.
    fake.org.lock().unwrap().limit_exceeded_after = None;
    run_job(&handler, "job-2", "incremental", 1).await;
    assert_eq!(app.shards("c_company").await.len(), 5000);
    run_job(&handler, "job-3", "incremental", 1).await;

    let names: Vec<Value> = app
        .shards("c_company")
        .await
        .into_iter()
        .map(|s| s["name"].clone())
        .collect();
    assert!(
        names.contains(&json!("Late Account")),
        "read from five minutes before the cursor, for the query was sent less than five minutes after it"
    );
}

#[tokio::test]
async fn an_allocation_that_runs_out_as_deletions_are_read_keeps_the_counts_of_what_was_synced() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5);
    // The query succeeds; getDeleted, at the entity's end, is refused.
    fake.org.lock().unwrap().limit_exceeded_after = Some(1);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    assert!(
        fake.requests()
            .last()
            .unwrap()
            .starts_with("deleted Account")
    );
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 5, "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 5, "{record}");
    assert_eq!(app.shards("c_company").await.len(), 5);
}

#[tokio::test]
async fn a_job_killed_mid_sync_resumes_from_its_checkpoint_with_every_record_once() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    {
        let mut org = fake.org.lock().unwrap();
        org.hold_locator = Some("01gRO00000000001-4000".into());
        // Refresh tokens rotate, and the access token expires after the first page: the
        // refresh mid-sync spends the only refresh token the integration had.
        org.rotate_refresh_tokens = true;
        org.expire_token_after = Some(1);
    }
    let app = spawn_app(&fake, false).await;

    let first = app.host_handler_with(UNLIMITED).await;
    let held = fake.held.clone();
    let waiting = held.notified();
    let job = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "full_sync",
        "provider": "salesforce", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z"
    });
    let envelope = service_bus_message("SyncInboundScheduled", &job.to_string(), "job-1", 1, None);
    let delivery = first.invoke_in_background("SyncInboundScheduled", &envelope);
    waiting.await;
    // The third page is being fetched; once the second is checkpointed, the handler dies.
    wait_until("the second page is checkpointed", std::time::Duration::from_secs(30), || async {
        app.integration("int-acme-sf").await["structuredData"]["checkpoints"]["Account"]["pageToken"]
            == "/services/data/v62.0/query/01gRO00000000001-4000"
    })
    .await;
    first.kill_9().await;
    let _ = delivery.await;
    fake.org.lock().unwrap().hold_locator = None;
    fake.release.notify_waiters();
    assert_eq!(app.shards("c_company").await.len(), 4000);
    let secrets = std::fs::read_to_string(app.path("secrets.json")).unwrap();
    assert!(
        secrets.contains("rt-rotated-2") && !secrets.contains("rt-initial"),
        "the rotated refresh token was stored before it was used, not at the end of the job"
    );

    let second = app.host_handler_with(UNLIMITED).await;
    let before = fake.requests().len();
    run_job(&second, "job-1", "full_sync", 2).await;
    assert_eq!(fake.requests()[before], "more 01gRO00000000001-4000");
    let companies = app.shards("c_company").await;
    assert_eq!(companies.len(), 5000);
    let mut ids: Vec<&str> = companies
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 5000, "no duplicates");
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success");
    assert_eq!(
        record["stats"],
        json!({"recordsFetched": 5000, "shardsCreated": 5000, "shardsUpdated": 0, "shardsSkipped": 0, "shardsFailed": 0}),
        "the record counts the pages before the crash too"
    );
    assert_eq!(record["syncDetails"]["pagesProcessed"], 3);
    assert_eq!(
        app.integration("int-acme-sf").await["structuredData"]["status"],
        "active"
    );
    assert_eq!(
        app.history().await.len(),
        1,
        "the resumed job kept its record"
    );
}

/// An org with `accounts` accounts, and an integration whose stored refresh token the user
/// revoked.
async fn revoked_refresh_token(accounts: usize) -> (FakeSalesforce, TestApp) {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, accounts);
    let app = TestApp::new();
    app.register_integration(integration(&fake, false)).await;
    let mut credentials = fake.credentials();
    credentials["refresh_token"] = json!("rt-revoked");
    app.set_credentials("int-acme-sf", &credentials).await;
    (fake, app)
}

#[tokio::test]
async fn a_revoked_refresh_token_met_by_a_sync_counts_as_a_failed_token_refresh() {
    let (_fake, app) = revoked_refresh_token(1).await;
    let runtime = app.start_local().await;

    app.cli_json(&["sync", "int-acme-sf", "--tenant", "t1"])
        .await;
    wait_until(
        "the integration is flagged",
        std::time::Duration::from_secs(30),
        || async { app.integration("int-acme-sf").await["structuredData"]["status"] == "error" },
    )
    .await;

    let metrics = reqwest::get(format!("http://{}/metrics", runtime.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let labels = r#"integrationId="int-acme-sf",provider="salesforce",tenantId="t1""#;
    assert!(
        metrics.contains(&format!("token_refresh_failures{{{labels}}} 1")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_job_that_fails_for_good_part_way_keeps_the_counts_of_what_it_synced() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    let app = spawn_app(&fake, false).await;
    // A live token for two more requests, and a refresh token revoked meanwhile.
    fake.org
        .lock()
        .unwrap()
        .access_tokens
        .insert("at-live".into());
    fake.org.lock().unwrap().expire_token_after = Some(2);
    let mut credentials = fake.credentials();
    credentials["refresh_token"] = json!("rt-revoked");
    credentials["access_token"] = json!("at-live");
    credentials["instance_url"] = json!(fake.url);
    app.set_credentials("int-acme-sf", &credentials).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 4000, "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 4000);
    assert_eq!(record["entityStats"][0]["externalEntity"], "Account");
    let errors = record["errors"].as_array().unwrap();
    assert_eq!(errors.last().unwrap()["code"], "AUTHENTICATION_FAILED");
}

#[tokio::test]
async fn a_revoked_refresh_token_fails_the_job_for_good_and_flags_the_integration() {
    let (fake, app) = revoked_refresh_token(10).await;
    let handler = app.host_handler().await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "failed");
    assert_eq!(record["errors"][0]["code"], "AUTHENTICATION_FAILED");
    assert_eq!(record["errors"][0]["retryable"], false);
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("invalid_grant")
    );
    assert!(
        !record.to_string().contains("s3cr3t"),
        "no secret in the history"
    );
    let dead = app.broker().peek(SYNC_DEADLETTER).unwrap();
    assert_eq!(
        dead[0].properties["DeadLetterReason"],
        "AUTHENTICATION_FAILED"
    );
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "not retried"
    );
    let integration = app.integration("int-acme-sf").await;
    assert_eq!(integration["structuredData"]["status"], "error");

    // New credentials put it back in service.
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let integration = app.integration("int-acme-sf").await;
    assert_eq!(integration["structuredData"]["status"], "active");
}

#[tokio::test]
async fn a_paused_integration_stays_paused_through_a_revoked_token_and_new_credentials() {
    let (fake, app) = revoked_refresh_token(3).await;
    app.set_integration_status("int-acme-sf", "paused").await;
    let handler = app.host_handler().await;
    let manual = json!({
        "integrationId": "int-acme-sf", "tenantId": "t1", "jobType": "full_sync",
        "provider": "salesforce", "jobId": "job-1", "scheduledAt": "2026-11-22T10:00:00Z",
        "attempt": 1, "trigger": "manual", "triggeredBy": "ops"
    });
    let asked = service_bus_message(
        "SyncInboundScheduled",
        &manual.to_string(),
        "job-1",
        1,
        None,
    );

    // An operator's sync of the paused integration meets the revoked token...
    let res = handler.invoke("SyncInboundScheduled", &asked).await;
    assert!(res.host_accepts(), "{res:?}");
    assert_eq!(record_of(&app.history().await, "job-1")["status"], "failed");
    let status = |i: Value| i["structuredData"]["status"].clone();
    assert_eq!(status(app.integration("int-acme-sf").await), "paused");

    // ...and the new credentials an operator stores during the pause do not end it.
    let mut renewed = fake.credentials();
    renewed["expiresAt"] = json!((Utc::now() + Duration::hours(2)).to_rfc3339());
    app.set_credentials("int-acme-sf", &renewed).await;
    let integration = app.integration("int-acme-sf").await;
    assert!(!integration["structuredData"]["credentialsExpireAt"].is_null());
    assert_eq!(status(integration), "paused");
}

#[tokio::test]
async fn an_account_committed_after_a_sync_read_later_ones_is_still_synced() {
    // A trigger's long transaction saved account 9 before account 10 was saved and committed,
    // and committed it after a sync had read account 10, a minute later: its SystemModstamp is
    // older than the cursor that sync left.
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    let later =
        DateTime::from_timestamp((Utc::now() - Duration::minutes(1)).timestamp(), 0).unwrap();
    fake.add(
        "Account",
        json!({"Id": "001000000000000010", "Name": "Account 10", "Industry": null}),
        later,
    );
    run_job(&handler, "job-1", "full_sync", 1).await;

    fake.add(
        "Account",
        json!({"Id": "001000000000000009", "Name": "Account 9", "Industry": null}),
        later - Duration::seconds(20),
    );
    run_job(&handler, "job-2", "incremental", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["stats"]["shardsCreated"], 1, "{record}");
    assert!(
        app.shards("c_company")
            .await
            .iter()
            .any(|s| s["name"] == "Account 9")
    );
    assert_eq!(
        app.integration("int-acme-sf").await["structuredData"]["cursors"]["Account"],
        fixed(later),
        "the cursor does not go back"
    );
}

#[tokio::test]
async fn a_job_that_stalled_past_its_hold_leaves_the_integration_to_the_job_that_took_over() {
    // A job stalls on its second page for longer than its hold on the integration; the hold
    // lapses and another job takes the integration over. The stalled job then wakes up.
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    fake.org.lock().unwrap().hold_locator = Some("01gRO00000000001-2000".into());
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    let stalled = handler.invoke_in_background(
        "SyncInboundScheduled",
        &job_envelope("job-stalled", "full_sync", 1),
    );
    wait_until(
        "the first page is checkpointed",
        std::time::Duration::from_secs(30),
        || async {
            app.integration("int-acme-sf").await["structuredData"]["checkpoints"]["Account"]
                .is_object()
        },
    )
    .await;
    take_over(&app).await;
    let checkpoint = app.integration("int-acme-sf").await["structuredData"]["checkpoints"].clone();
    fake.held.notified().await;
    fake.org.lock().unwrap().hold_locator = None;
    fake.release.notify_waiters();
    assert!(stalled.await.unwrap().host_accepts());

    let record = record_of(&app.history().await, "job-stalled").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("another job took over"),
        "{record}"
    );
    assert_eq!(
        record["stats"]["recordsFetched"], 4000,
        "what it did before it stopped: {record}"
    );
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert_eq!(state["running"]["chain"], "job-other", "{state}");
    assert_eq!(
        state["checkpoints"], checkpoint,
        "the other job's checkpoints are left alone"
    );
    assert!(state.get("cursors").is_none(), "{state}");
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "no retry"
    );
}

#[tokio::test]
async fn a_job_that_stalled_reading_deletions_deletes_nothing_once_another_took_over() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;
    run_job(&handler, "job-1", "full_sync", 1).await;

    // The next job stalls on Salesforce's deletions; meanwhile its hold lapses and another
    // job takes the integration over.
    fake.delete(
        "Account",
        "001000000000000001",
        Utc::now() - Duration::minutes(1),
    );
    fake.org.lock().unwrap().hold_next_deleted = true;
    let stalled = handler.invoke_in_background(
        "SyncInboundScheduled",
        &job_envelope("job-stalled", "incremental", 1),
    );
    fake.held.notified().await;
    take_over(&app).await;
    fake.release.notify_waiters();
    assert!(stalled.await.unwrap().host_accepts());

    let record = record_of(&app.history().await, "job-stalled").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(
        app.shards("c_company").await.len(),
        3,
        "the deletion is the other job's to apply"
    );
}

/// The names of tenant `t1`'s live companies.
async fn company_names(app: &TestApp) -> Vec<Value> {
    app.shards("c_company")
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect()
}

/// Changes tenant `t1`'s stored integration `int-acme-sf`, as time passing would have.
async fn age_integration(app: &TestApp, change: impl FnOnce(&mut Value)) {
    let mut shard = app.store().get("t1", "int-acme-sf").await.unwrap().unwrap();
    let mut data = serde_json::to_value(&shard.value.structured_data).unwrap();
    change(&mut data);
    shard.value.structured_data = data;
    app.store()
        .replace(&shard.value, &shard.etag)
        .await
        .unwrap();
}

#[tokio::test]
async fn deletions_of_accounts_nobody_edits_are_found_past_salesforces_window() {
    // Accounts last edited three weeks ago: longer than the 15 days Salesforce remembers
    // deletions. Deletions are read on from where the last read ended, not from the last edit.
    let fake = FakeSalesforce::start().await;
    let edited = Utc::now() - Duration::days(21);
    fake.load(
        "Account",
        (0..3).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}"), "Industry": null}),
                edited + Duration::seconds(i),
            )
        }),
    );
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let checked =
        app.integration("int-acme-sf").await["structuredData"]["deletionsChecked"]["Account"]
            .clone();
    assert!(checked.is_string(), "the full sync read the deletions too");

    // The last check was ten minutes ago; an account was deleted two minutes ago.
    let ten_minutes_ago = json!(Utc::now() - Duration::minutes(10));
    age_integration(&app, |data| {
        data["deletionsChecked"]["Account"] = ten_minutes_ago.clone()
    })
    .await;
    fake.delete(
        "Account",
        "001000000000000001",
        Utc::now() - Duration::minutes(2),
    );
    run_job(&handler, "job-2", "incremental", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsUpdated"], 1, "{record}");
    let names = company_names(&app).await;
    assert_eq!(names, [json!("Account 0"), json!("Account 2")]);
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert!(
        state["cursors"]["Account"].is_string(),
        "no resync: {state}"
    );
    assert_ne!(state["deletionsChecked"]["Account"], ten_minutes_ago);

    // After a resync, a full sync lists no deleted account, but the one deleted yesterday
    // still had its shard: the full sync reads back the whole window for it.
    age_integration(&app, |data| {
        data.as_object_mut().unwrap().remove("cursors");
        data.as_object_mut().unwrap().remove("deletionsChecked");
    })
    .await;
    fake.delete(
        "Account",
        "001000000000000002",
        Utc::now() - Duration::days(1),
    );
    run_job(&handler, "job-3", "full_sync", 1).await;
    let names = company_names(&app).await;
    assert_eq!(names, [json!("Account 0")]);
}

#[tokio::test]
async fn more_deletions_than_salesforce_lists_at_once_are_read_in_narrower_ranges() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;

    // Three accounts deleted over the last hours, where getDeleted lists two at once (600,000
    // in Salesforce); then a resync, which reads the whole window of deletions.
    for (i, hours) in [(1, 3), (2, 2), (3, 1)] {
        fake.delete(
            "Account",
            &format!("001{i:015}"),
            Utc::now() - Duration::hours(hours),
        );
    }
    // And a minute with more deletions than getDeleted lists: account 4 and two others.
    let crowded = DateTime::from_timestamp(
        (Utc::now() - Duration::minutes(30)).timestamp() / 60 * 60,
        0,
    )
    .unwrap();
    for id in [
        "001000000000000004",
        "001000000000000901",
        "001000000000000902",
    ] {
        fake.delete("Account", id, crowded);
    }
    fake.org.lock().unwrap().deleted_ids_limit = Some(2);
    age_integration(&app, |data| {
        data.as_object_mut().unwrap().remove("cursors");
        data.as_object_mut().unwrap().remove("deletionsChecked");
    })
    .await;
    run_job(&handler, "job-2", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["stats"]["shardsFailed"], 0, "{record}");
    assert!(
        record["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("would not list"),
        "the minute it could not read is told: {record}"
    );
    let names = company_names(&app).await;
    assert_eq!(
        names,
        [json!("Account 0"), json!("Account 4")],
        "every deletion but the crowded minute's"
    );
    let reads = fake
        .requests()
        .iter()
        .filter(|r| *r == "deleted Account")
        .count();
    assert!(reads >= 3, "refused whole, then read in halves: {reads}");
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert!(state["deletionsChecked"]["Account"].is_string(), "{state}");
}

/// An org of five accounts synced once, then left until Salesforce no longer remembers the
/// deletions since: the next run drops the cursor and marks the entity's deletions lost. Then,
/// in the span no log of deletions covers, account 2 is deleted and purged from the recycle
/// bin, account 4 deleted into it, and account 3 archived (a query leaves it out, but it lives
/// on); and a lead is merged into account 1's shard. Returns the app, the fake and the data
/// requests of the run after that.
async fn deletions_lost_then_relisted(
    view_all_data: bool,
) -> (TestApp, FakeSalesforce, Vec<String>) {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5);
    if view_all_data {
        fake.grant_view_all_data();
    }
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    assert!(
        app.integration("int-acme-sf").await["structuredData"]["cursors"]["Account"].is_string()
    );

    fake.org.lock().unwrap().earliest_deleted_available = Some(Utc::now());
    run_job(&handler, "job-2", "incremental", 1).await;
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert!(
        state.get("cursors").is_none(),
        "the cursor is dropped: {state}"
    );
    assert_eq!(state["lostDeletions"], json!(["Account"]), "{state}");

    {
        let mut org = fake.org.lock().unwrap();
        org.records
            .get_mut("Account")
            .unwrap()
            .retain(|r| r["Id"] != "001000000000000002");
        org.archived.insert("001000000000000003".into());
    }
    fake.delete(
        "Account",
        "001000000000000004",
        Utc::now() - Duration::minutes(2),
    );
    let store = app.store();
    let mut merged = store
        .get("t1", "int-acme-sf~Account~001000000000000001")
        .await
        .unwrap()
        .unwrap()
        .value;
    merged
        .external_relationships
        .push(ExternalRelationship::synced(
            "int-acme-sf",
            "00Q000000000000009",
            SyncDirection::Inbound,
            Utc::now(),
        ));
    merged.content_hash = Some(content_hash(&merged));
    store.upsert(&merged).await.unwrap();

    let before = fake.requests().len();
    run_job(&handler, "job-3", "incremental", 1).await;
    let requests = fake.requests()[before..].to_vec();
    assert!(
        !requests[0].contains("SystemModstamp >="),
        "a full query: {}",
        requests[0]
    );
    let asked: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("queryAll"))
        .collect();
    assert_eq!(
        asked,
        [
            "queryAll SELECT Id, IsDeleted FROM Account WHERE Id IN ('001000000000000002', '001000000000000003', '001000000000000004')"
        ],
        "only this object's records the listing left out are asked about"
    );
    let lead = store
        .get("t1", "int-acme-sf~Account~001000000000000001")
        .await
        .unwrap()
        .unwrap()
        .value
        .external_relationships
        .into_iter()
        .find(|r| r.external_id == "00Q000000000000009")
        .unwrap();
    assert_eq!(
        lead.sync_status,
        RelationshipStatus::Synced,
        "another object's record is not judged by this one's listing"
    );
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
    (app, fake, requests)
}

#[tokio::test]
async fn a_duplicate_deleted_while_deletions_were_lost_leaves_the_shard_it_was_merged_into() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 1);
    // One person under two Salesforce ids: the second is merged into the first one's shard.
    for (id, name) in [
        ("003000000000000001", "Ann Lee"),
        ("003000000000000002", "Ann B. Lee"),
    ] {
        fake.add(
            "Contact",
            json!({"Id": id, "Name": name, "Email": "ann@acme.test"}),
            base_time(),
        );
    }
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler().await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let ann = "int-acme-sf~Contact~003000000000000001";
    let link_to_duplicate = || async {
        app.store()
            .get("t1", ann)
            .await
            .unwrap()
            .unwrap()
            .value
            .external_relationships
            .into_iter()
            .find(|r| r.external_id == "003000000000000002")
            .unwrap()
            .sync_status
    };
    assert_eq!(link_to_duplicate().await, RelationshipStatus::Synced);

    // Left until Salesforce no longer remembers the deletions since: the next run marks them lost.
    fake.org.lock().unwrap().earliest_deleted_available = Some(Utc::now());
    run_job(&handler, "job-2", "incremental", 1).await;
    assert!(lost_deletions(&app).await.to_string().contains("Contact"));
    // Then the duplicate is deleted, inside what the log of deletions holds now.
    fake.org.lock().unwrap().earliest_deleted_available = Some(Utc::now() - Duration::minutes(10));
    fake.delete(
        "Contact",
        "003000000000000002",
        Utc::now() - Duration::minutes(3),
    );

    run_job(&handler, "job-3", "incremental", 1).await;

    assert_eq!(
        link_to_duplicate().await,
        RelationshipStatus::Deleted,
        "the log of deletions names the duplicate, and its link goes"
    );
    let ann = app.store().get("t1", ann).await.unwrap().unwrap().value;
    assert!(ann.deleted_at.is_none(), "Ann lives on in her other record");
}

/// The entities of `int-acme-sf` whose deletions were lost, to be listed whole (`null`: none).
async fn lost_deletions(app: &TestApp) -> Value {
    app.integration("int-acme-sf").await["structuredData"]["lostDeletions"].clone()
}

async fn company_names_of(app: &TestApp) -> Vec<Value> {
    app.shards("c_company")
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect()
}

#[tokio::test]
async fn deletions_salesforce_no_longer_remembers_are_found_by_listing_the_object_whole() {
    let (app, _fake, _) = deletions_lost_then_relisted(true).await;

    assert_eq!(
        company_names_of(&app).await,
        [json!("Account 0"), json!("Account 1"), json!("Account 3")],
        "what the listing left out and Salesforce no longer has is gone; the archived account stays"
    );
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["stats"]["shardsUpdated"], 2, "{record}");
}

#[tokio::test]
async fn a_record_the_user_may_not_see_is_not_taken_for_deleted_for_good() {
    // Without View All Data, a record queryAll does not answer may be out of the integration
    // user's sight rather than purged.
    let (app, _fake, requests) = deletions_lost_then_relisted(false).await;

    assert!(
        requests
            .iter()
            .any(|r| r.contains("FROM UserPermissionAccess")),
        "{requests:?}"
    );
    assert_eq!(
        company_names_of(&app).await,
        [
            json!("Account 0"),
            json!("Account 1"),
            json!("Account 2"),
            json!("Account 3")
        ],
        "only the account in the recycle bin is gone"
    );
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["stats"]["shardsUpdated"], 1, "{record}");
    let told = record["errors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["message"].as_str().unwrap().starts_with("of the records the listing left out, 1 may be deleted for good or out of the integration user's sight"));
    assert!(told, "{record}");
}

/// Three accounts synced once by a user with View All Data, then left until Salesforce no
/// longer remembers the deletions since (the entity marked lost), and account 1 deleted and
/// purged meanwhile.
async fn three_accounts_one_purged_after_deletions_were_lost()
-> (FakeSalesforce, TestApp, HostedHandler) {
    accounts_purged_after_deletions_were_lost(3, 1..2).await
}

/// `count` accounts synced once by a user with View All Data, then left until Salesforce no
/// longer remembers the deletions since (the entity marked lost), and the accounts numbered
/// `purged` deleted and purged meanwhile.
async fn accounts_purged_after_deletions_were_lost(
    count: usize,
    purged: std::ops::Range<usize>,
) -> (FakeSalesforce, TestApp, HostedHandler) {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, count);
    fake.grant_view_all_data();
    let app = spawn_app(&fake, false).await;
    let handler = app
        .host_handler_with(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")])
        .await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    fake.org.lock().unwrap().earliest_deleted_available = Some(Utc::now());
    run_job(&handler, "job-2", "incremental", 1).await;
    let purged: Vec<String> = purged.map(|i| format!("001{i:015}")).collect();
    fake.org
        .lock()
        .unwrap()
        .records
        .get_mut("Account")
        .unwrap()
        .retain(|r| !purged.iter().any(|id| r["Id"] == *id));
    (fake, app, handler)
}

#[tokio::test]
async fn a_listing_whose_leftovers_cannot_be_checked_keeps_their_shards_and_says_so() {
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;
    fake.org.lock().unwrap().refuse_describe = true;

    run_job(&handler, "job-3", "incremental", 1).await;

    assert_eq!(
        company_names_of(&app).await.len(),
        3,
        "nothing judged, nothing deleted"
    );
    let record = record_of(&app.history().await, "job-3").clone();
    let told = record["errors"].as_array().unwrap().iter().any(|e| {
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("the records the listing left out could not all be checked")
    });
    assert!(told, "{record}");
    // Listing the object at every run would fail the same way, at the cost of a full read.
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
}

#[tokio::test]
async fn leftovers_salesforce_cannot_check_for_now_are_checked_again_by_the_jobs_retry() {
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;
    fake.org.lock().unwrap().query_all_down = true;

    run_job(&handler, "job-3", "incremental", 1).await;

    assert_eq!(company_names_of(&app).await.len(), 3, "nothing deleted");
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["status"], "running", "{record}");
    assert_eq!(
        record["errors"][0]["code"], "SERVICE_UNAVAILABLE",
        "{record}"
    );
    assert_eq!(
        lost_deletions(&app).await,
        json!(["Account"]),
        "to be listed again"
    );

    fake.org.lock().unwrap().query_all_down = false;
    let retry = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(retry.len(), 1, "a retry was scheduled");
    handler.deliver("SyncInboundScheduled", &retry[0]).await;

    assert_eq!(
        company_names_of(&app).await,
        [json!("Account 0"), json!("Account 2")]
    );
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
}

#[tokio::test]
async fn an_object_without_a_recycle_bin_is_asked_only_which_of_its_records_live() {
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;
    fake.org.lock().unwrap().no_recycle_bin = true;
    let before = fake.requests().len();

    run_job(&handler, "job-3", "incremental", 1).await;

    let asked: Vec<String> = fake.requests()[before..]
        .iter()
        .filter(|r| r.starts_with("queryAll"))
        .cloned()
        .collect();
    assert_eq!(
        asked,
        ["queryAll SELECT Id FROM Account WHERE Id IN ('001000000000000001')"]
    );
    assert_eq!(
        company_names_of(&app).await,
        [json!("Account 0"), json!("Account 2")]
    );
}

#[tokio::test]
async fn an_object_whose_ids_have_no_known_beginning_keeps_the_shards_its_listing_left_out() {
    // Its ids cannot be told from those of records of other objects merged into its shards.
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;
    fake.org.lock().unwrap().no_key_prefix = true;
    let before = fake.requests().len();

    run_job(&handler, "job-3", "incremental", 1).await;

    assert!(
        !fake.requests()[before..]
            .iter()
            .any(|r| r.starts_with("queryAll")),
        "nothing is asked"
    );
    assert_eq!(company_names_of(&app).await.len(), 3, "nothing deleted");
    let record = record_of(&app.history().await, "job-3").clone();
    assert_eq!(record["status"], "success", "{record}");
    let told = record["errors"].as_array().unwrap().iter().any(|e| {
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("of the records the listing left out, 1 may be")
    });
    assert!(told, "{record}");
}

#[tokio::test]
async fn a_job_that_stalled_asking_about_a_listings_leftovers_deletes_nothing_once_another_took_over()
 {
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;
    fake.org.lock().unwrap().hold_next_query_all = true;

    let stalled = handler.invoke_in_background(
        "SyncInboundScheduled",
        &job_envelope("job-stalled", "incremental", 1),
    );
    fake.held.notified().await;
    take_over(&app).await;
    fake.release.notify_waiters();
    assert!(stalled.await.unwrap().host_accepts());

    assert_eq!(company_names_of(&app).await.len(), 3, "nothing deleted");
    let record = record_of(&app.history().await, "job-stalled").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(
        lost_deletions(&app).await,
        json!(["Account"]),
        "to be listed again"
    );
}

#[tokio::test]
async fn asking_about_a_listings_leftovers_stops_at_the_integrations_share_of_the_allocation() {
    // 210 purged: two questions of at most 200 ids.
    let (fake, app, handler) = accounts_purged_after_deletions_were_lost(220, 0..210).await;

    let record = relisted_as_usage_reaches_the_share(&fake, &app, &handler).await;

    assert_eq!(record["status"], "partial", "{record}");
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("API usage"),
        "{record}"
    );
    assert_eq!(
        record["stats"]["recordsFetched"], 10,
        "its counts are kept: {record}"
    );
    assert_eq!(
        company_names_of(&app).await.len(),
        20,
        "what the first question's answer says is gone is gone, and no more is asked"
    );
    let asked = fake
        .requests()
        .iter()
        .filter(|r| r.starts_with("queryAll"))
        .count();
    assert_eq!(asked, 1);
    assert_eq!(
        lost_deletions(&app).await,
        json!(["Account"]),
        "to be listed again"
    );
}

#[tokio::test]
async fn a_relisting_of_many_pages_of_shards_describes_the_object_once() {
    // Purged accounts on both sides of the first thousand shards.
    let (fake, app, handler) = accounts_purged_after_deletions_were_lost(1100, 995..1005).await;
    let before = fake.requests().len();

    run_job(&handler, "job-3", "incremental", 1).await;

    let requests = fake.requests()[before..].to_vec();
    let described = requests
        .iter()
        .filter(|r| r.starts_with("describe"))
        .count();
    let asked = requests
        .iter()
        .filter(|r| r.starts_with("queryAll"))
        .count();
    assert_eq!((described, asked), (1, 2), "{requests:?}");
    assert_eq!(company_names_of(&app).await.len(), 1090);
}

/// Runs job-3 of `app`, whose first `queryAll` finds the org's usage at 90% of its allocation
/// (other applications used it meanwhile).
async fn relisted_as_usage_reaches_the_share(
    fake: &FakeSalesforce,
    app: &TestApp,
    handler: &HostedHandler,
) -> Value {
    fake.org.lock().unwrap().hold_next_query_all = true;
    let relisting = handler.invoke_in_background(
        "SyncInboundScheduled",
        &job_envelope("job-3", "incremental", 1),
    );
    fake.held.notified().await;
    fake.org.lock().unwrap().api_usage = (90_000, 100_000);
    fake.release.notify_waiters();
    assert!(relisting.await.unwrap().host_accepts());
    record_of(&app.history().await, "job-3").clone()
}

#[tokio::test]
async fn the_share_reached_on_a_relistings_last_question_lets_it_finish() {
    let (fake, app, handler) = three_accounts_one_purged_after_deletions_were_lost().await;

    let record = relisted_as_usage_reaches_the_share(&fake, &app, &handler).await;

    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(
        company_names_of(&app).await,
        [json!("Account 0"), json!("Account 2")]
    );
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
}

#[tokio::test]
async fn the_share_reached_on_a_full_page_with_nothing_left_out_after_it_lets_it_finish() {
    // A thousand shards: one full page of them, so the comparison reads on and finds no more.
    let (fake, app, handler) = accounts_purged_after_deletions_were_lost(1000, 5..6).await;

    let record = relisted_as_usage_reaches_the_share(&fake, &app, &handler).await;

    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(company_names_of(&app).await.len(), 999);
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
}

#[tokio::test]
async fn the_share_reached_with_pages_of_shards_still_to_compare_stops_the_relisting() {
    let (fake, app, handler) = accounts_purged_after_deletions_were_lost(1100, 995..1005).await;

    let record = relisted_as_usage_reaches_the_share(&fake, &app, &handler).await;

    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(
        company_names_of(&app).await.len(),
        1095,
        "the first page's answer is applied, the second page not asked about"
    );
    assert_eq!(
        lost_deletions(&app).await,
        json!(["Account"]),
        "to be listed again"
    );
}

#[tokio::test]
async fn a_full_sync_that_finds_its_deletions_lost_has_the_next_run_list_the_object_whole() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3);
    fake.grant_view_all_data();
    let app = spawn_app(&fake, false).await;
    let handler = app
        .host_handler_with(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")])
        .await;
    run_job(&handler, "job-1", "full_sync", 1).await;
    fake.org.lock().unwrap().earliest_deleted_available = Some(Utc::now());
    fake.org
        .lock()
        .unwrap()
        .records
        .get_mut("Account")
        .unwrap()
        .retain(|r| r["Id"] != "001000000000000001");

    run_job(&handler, "job-2", "full_sync", 1).await;
    assert_eq!(
        lost_deletions(&app).await,
        json!(["Account"]),
        "to be listed again"
    );
    let state = app.integration("int-acme-sf").await["structuredData"].clone();
    assert!(state["cursors"]["Account"].is_string(), "{state}");

    run_job(&handler, "job-3", "incremental", 1).await;
    assert_eq!(
        company_names_of(&app).await,
        [json!("Account 0"), json!("Account 2")],
        "the incremental run listed the object whole, and the purged account is gone"
    );
    assert_eq!(
        lost_deletions(&app).await,
        Value::Null,
        "the listing is compared"
    );
}

#[tokio::test]
async fn an_outage_is_retried_later_with_backoff_and_the_job_record_says_so() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 10);
    fake.org.lock().unwrap().outage = Some(axum::http::StatusCode::SERVICE_UNAVAILABLE);
    let app = spawn_app(&fake, false).await;
    let handler = app
        .host_handler_with(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")])
        .await;

    let started = Utc::now();
    run_job(&handler, "job-1", "full_sync", 1).await;

    assert_eq!(
        fake.requests().len(),
        4,
        "the request was retried three times in place first"
    );
    let retry = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(
        retry.len(),
        1,
        "the delivery completed and a retry was scheduled"
    );
    assert_eq!(retry[0].message_id, "job-1:attempt-2");
    let job: Value = serde_json::from_slice(&retry[0].body).unwrap();
    assert_eq!(
        (job["attempt"].clone(), job["trigger"].clone()),
        (json!(2), json!("retry"))
    );
    let delay = app
        .broker()
        .next_wakeup(SYNC_INBOUND_SCHEDULED, started)
        .unwrap()
        .unwrap()
        - started;
    assert!(
        delay >= Duration::seconds(4) && delay <= Duration::seconds(7),
        "first retry after ~5 s: {delay}"
    );
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "running");
    assert_eq!(record["errors"][0]["code"], "SERVICE_UNAVAILABLE");
    assert_eq!(record["errors"][0]["retryable"], true);
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .starts_with("attempt 1 of 10 failed (SERVICE_UNAVAILABLE)")
    );

    // Salesforce is back; the retry (same job, attempt 2) finishes the job in the same record.
    fake.org.lock().unwrap().outage = None;
    handler.deliver("SyncInboundScheduled", &retry[0]).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success");
    assert_eq!(record["trigger"], "retry");
    assert_eq!(app.history().await.len(), 1);
    assert_eq!(app.shards("c_company").await.len(), 10);
}

#[tokio::test]
async fn a_proxys_page_in_place_of_a_token_is_no_reason_to_doubt_the_credentials() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3);
    let app = spawn_app(&fake, false).await;
    let handler = app
        .host_handler_with(&[("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5")])
        .await;

    // Asked again in place, the token endpoint answers.
    fake.org.lock().unwrap().token_proxy_pages = 1;
    run_job(&handler, "job-1", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success", "{record}");

    // Answering pages longer than the job waits, it is retried later, the integration active.
    fake.org.lock().unwrap().token_proxy_pages = 100;
    fake.org.lock().unwrap().access_tokens.clear();
    run_job(&handler, "job-2", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-2").clone();
    assert_eq!(record["status"], "running", "{record}");
    assert_eq!(
        record["errors"][0]["code"], "SERVICE_UNAVAILABLE",
        "{record}"
    );
    assert_eq!(
        app.integration("int-acme-sf").await["structuredData"]["status"],
        "active"
    );
    assert!(
        app.broker().peek(SYNC_DEADLETTER).unwrap().is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test]
async fn a_salesforce_that_fails_every_other_request_costs_no_job_attempt() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    fake.org.lock().unwrap().fail_every = Some(2);
    let app = spawn_app(&fake, false).await;
    let handler = app
        .host_handler_with(&[
            ("SYNC_MAX_RECORDS", "1000000"),
            ("FUNC_SYNC_RECORD_RETRY_BASE_MS", "5"),
        ])
        .await;

    run_job(&handler, "job-1", "full_sync", 1).await;

    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["shardsCreated"], 5000);
    assert!(record.get("errors").is_none(), "{record}");
    assert!(
        app.broker()
            .peek(SYNC_INBOUND_SCHEDULED)
            .unwrap()
            .is_empty(),
        "no job-level retry was needed"
    );
    // Three pages, each of the two after the first refused once and sent again, then the
    // deletions of the last 15 days, refused once too.
    assert_eq!(fake.requests().len(), 7, "{:?}", fake.requests());
}

#[tokio::test]
async fn a_sync_stops_early_when_api_usage_reaches_the_integrations_share() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    fake.org.lock().unwrap().api_usage = (79_999, 100_000);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-1", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "partial", "{record}");
    assert_eq!(
        record["stats"]["recordsFetched"], 2000,
        "one page, then the 80% share is reached"
    );
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("API usage 80000/100000"),
        "{record}"
    );
    assert_eq!(fake.requests().len(), 1, "no request past the share");
}

#[tokio::test]
async fn a_sync_over_the_record_limit_hands_the_rest_to_a_continuation_job() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 5000);
    let app = spawn_app(&fake, false).await;
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "2500")]).await;

    run_job(&handler, "job-1", "full_sync", 1).await;
    let record = record_of(&app.history().await, "job-1").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(record["stats"]["recordsFetched"], 2500);
    assert!(
        record["statusMessage"]
            .as_str()
            .unwrap()
            .contains("continuing in job job-1+1")
    );
    let queued = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].message_id, "job-1+1");
    assert_eq!(app.shards("c_company").await.len(), 2500);

    handler.deliver("SyncInboundScheduled", &queued[0]).await;
    let record = record_of(&app.history().await, "job-1+1").clone();
    assert_eq!(record["stats"]["recordsFetched"], 2500, "{record}");
    assert_eq!(app.shards("c_company").await.len(), 5000);
    assert!(
        app.integration("int-acme-sf").await["structuredData"]
            .get("checkpoints")
            .is_none()
    );
}

#[tokio::test]
async fn a_full_sync_continued_over_several_jobs_reads_each_entity_once() {
    let fake = FakeSalesforce::start().await;
    add_accounts(&fake, 3000);
    fake.load(
        "Contact",
        (0..3000).map(|i| {
            (
                json!({"Id": format!("003{i:015}"), "Name": format!("Person {i}"),
                       "Email": format!("person{i}@acme.test")}),
                base_time() + Duration::seconds(i),
            )
        }),
    );
    let app = spawn_app(&fake, true).await;
    let handler = app.host_handler_with(&[("SYNC_MAX_RECORDS", "2500")]).await;

    run_job(&handler, "job-1", "full_sync", 1).await;
    let mut jobs = vec!["job-1".to_string()];
    while let Some(next) = app.broker().peek(SYNC_INBOUND_SCHEDULED).unwrap().pop() {
        assert!(jobs.len() < 10, "the chain ends: {jobs:?}");
        handler.deliver("SyncInboundScheduled", &next).await;
        app.broker().delete_unlocked(next.sequence_number).unwrap();
        jobs.push(next.message_id);
    }

    // 3,000 accounts, then 3,000 contacts, 2,500 records a job: three jobs, each record read
    // once. The third job does not read the accounts again from the start.
    assert_eq!(jobs, ["job-1", "job-1+1", "job-1+2"]);
    let history = app.history().await;
    let fetched: Vec<u64> = jobs
        .iter()
        .map(|job| {
            record_of(&history, job)["stats"]["recordsFetched"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(fetched, [2500, 2500, 1000]);
    assert_eq!(app.shards("c_company").await.len(), 3000);
    assert_eq!(app.shards("c_contact").await.len(), 3000);
    let accounts_read = fake
        .requests()
        .iter()
        .filter(|r| r.contains("FROM Account"))
        .count();
    assert_eq!(
        accounts_read, 1,
        "the accounts' query is sent once; its pages follow"
    );
}

#[tokio::test]
async fn an_integration_stored_when_cursors_were_timestamps_carries_on_from_its_cursor() {
    let fake = FakeSalesforce::start().await;
    // Edited an hour apart, and read two days later: nothing before the cursor is read again.
    fake.load(
        "Account",
        (0..10).map(|i| {
            (
                json!({"Id": format!("001{i:015}"), "Name": format!("Account {i}"), "Industry": null}),
                base_time() + Duration::hours(i),
            )
        }),
    );
    let app = TestApp::new();
    // Written by the previous release: the cursor as chrono spelled a DateTime, no millis.
    let mut stored = integration(&fake, false);
    let cursor = base_time() + Duration::hours(7);
    stored["structuredData"]["status"] = json!("active");
    stored["structuredData"]["lastSyncAt"] = json!(base_time() + Duration::hours(9));
    stored["structuredData"]["cursors"] =
        json!({"Account": cursor.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
    app.plant_integration(stored).await;
    app.set_credentials("int-acme-sf", &fake.credentials())
        .await;
    let handler = app.host_handler_with(UNLIMITED).await;

    run_job(&handler, "job-after-upgrade", "incremental", 1).await;

    let record = record_of(&app.history().await, "job-after-upgrade").clone();
    assert_eq!(record["status"], "success", "{record}");
    assert_eq!(
        record["stats"]["recordsFetched"], 3,
        "accounts 7, 8 and 9: from the stored cursor on, inclusive"
    );
    let soql = fake
        .requests()
        .into_iter()
        .find(|r| r.starts_with("query "))
        .unwrap();
    assert!(
        soql.contains(&format!(
            "SystemModstamp >= {}",
            cursor.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )),
        "{soql}"
    );
    assert_eq!(
        app.integration("int-acme-sf").await["structuredData"]["cursors"]["Account"],
        fixed(base_time() + Duration::hours(9))
    );
}
