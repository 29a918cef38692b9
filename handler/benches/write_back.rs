//! Write-back throughput, end to end: loopback Salesforce orgs, the release `handler` binary
//! invoked as the Functions host invokes SyncOutbound, and the embedded store.
//!
//!     cargo bench -p handler --bench write_back
//!
//! Each integration's contacts are first synced in (two-way), then edited in Castiel; then:
//! * 1,000 updates to one integration, delivered one after another as its session would;
//! * 1,000 updates across 10 integrations, one session each, delivered in parallel.
//!
//! Prints write-backs per second and the provider requests each write-back made (a read of
//! the record for the conflict check, then the write). The adapter paces Salesforce at 25
//! requests per second per integration, which caps one integration at 12.5 write-backs/s: the
//! figures say how close the engine comes to that.

#[path = "../../tests/api/fake_salesforce.rs"]
#[allow(dead_code)]
mod fake_salesforce;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};

use fake_salesforce::{FakeSalesforce, ORG_ID};
use handler::model::Shard;
use handler::secrets::{FileSecrets, Secret, SecretStore, credential_secret_name};
use handler::store::{ShardQuery, ShardStore, SqliteStore};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn integration(id: &str, fake: &FakeSalesforce) -> Shard {
    serde_json::from_value(json!({
        "id": id, "tenantId": "t1", "shardTypeId": "c_integration", "name": id,
        "structuredData": {
            "providerName": "salesforce",
            "syncFrequency": {"type": "manual"},
            "writeBack": {"enabled": true},
            "connection": {"loginHost": fake.url, "organizationId": ORG_ID},
            "entityMappings": [{
                "externalEntity": "Contact", "shardTypeId": "c_contact", "nameField": "name",
                "bidirectional": true, "idempotencyField": "Castiel_Id__c",
                "fieldMappings": [{"source": "Name", "target": "name"},
                                  {"source": "Email", "target": "email"}]
            }]
        }
    }))
    .unwrap()
}

struct Handler {
    child: Child,
    port: u16,
}

impl Handler {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNC_SYNC_DATA_DIR", dir)
            .env("SYNC_MAX_RECORDS", "10000000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { child, port }
    }

    /// Invokes `function` with a Service Bus message, as the host does.
    fn invoke(port: u16, function: &str, body: &Value, message_id: &str, session: Option<&str>) {
        let quoted = |s: &str| Value::String(Value::String(s.to_string()).to_string());
        let mut metadata = json!({"DeliveryCount": "1", "MessageId": quoted(message_id)});
        if let Some(session) = session {
            metadata["SessionId"] = quoted(session);
        }
        let envelope =
            json!({"Data": {"message": quoted(&body.to_string())}, "Metadata": metadata})
                .to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "POST /{function} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{envelope}",
            envelope.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An org of `contacts` contacts, an integration syncing it both ways, synced in, and every
/// contact then edited in Castiel. Returns the fake and the shard ids.
async fn prepared(
    dir: &Path,
    handler: &Handler,
    integration_id: &str,
    contacts: usize,
) -> (FakeSalesforce, Vec<String>) {
    let fake = FakeSalesforce::start().await;
    let at = Utc::now() - chrono::Duration::days(1);
    fake.load(
        "Contact",
        (0..contacts).map(|i| {
            (
                json!({"Id": format!("003{i:012}AAA"), "Name": format!("Person {i}"),
                       "Email": format!("person{i}@acme.test")}),
                at,
            )
        }),
    );
    let store = SqliteStore::open(&dir.join("store.db")).unwrap();
    store
        .upsert(&integration(integration_id, &fake))
        .await
        .unwrap();
    FileSecrets::new(&dir.join("secrets.json"))
        .set(
            &credential_secret_name("t1", integration_id),
            Secret::new(fake.credentials().to_string()),
        )
        .await
        .unwrap();
    let job = json!({"integrationId": integration_id, "tenantId": "t1", "jobType": "full_sync",
                     "provider": "salesforce", "jobId": format!("sync-{integration_id}"),
                     "scheduledAt": Utc::now()});
    Handler::invoke(
        handler.port,
        "SyncInboundScheduled",
        &job,
        &format!("sync-{integration_id}"),
        None,
    );
    let mut ids = Vec::with_capacity(contacts);
    for i in 0..contacts {
        let id = format!("{integration_id}~Contact~003{i:012}AAA");
        let mut shard = store.get("t1", &id).await.unwrap().unwrap().value;
        shard.structured_data["email"] = json!(format!("person{i}@castiel.test"));
        shard.updated_at = Some(Utc::now());
        store.upsert(&shard).await.unwrap();
        ids.push(id);
    }
    (fake, ids)
}

fn update(integration_id: &str, shard_id: &str) -> Value {
    json!({"shardId": shard_id, "tenantId": "t1", "operation": "update",
           "changedFields": ["email"], "externalSystem": "salesforce",
           "triggeredAt": Utc::now(), "triggeredBy": "bench", "integrationId": integration_id})
}

/// Delivers the write-backs of one session, one after another.
fn deliver(port: u16, integration_id: &str, ids: &[String]) {
    for (n, id) in ids.iter().enumerate() {
        Handler::invoke(
            port,
            "SyncOutbound",
            &update(integration_id, id),
            &format!("wb-{integration_id}-{n}"),
            Some(integration_id),
        );
    }
}

fn writes(fake: &FakeSalesforce) -> (usize, usize) {
    let requests = fake.requests();
    let patches = requests.iter().filter(|r| r.starts_with("PATCH")).count();
    (patches, requests.len())
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let handler = Handler::start(dir.path());

    let (fake, ids) = prepared(dir.path(), &handler, "int-one", 1_000).await;
    let before = writes(&fake);
    let started = Instant::now();
    let port = handler.port;
    tokio::task::spawn_blocking(move || deliver(port, "int-one", &ids))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let (patches, requests) = writes(&fake);
    let (patches, requests) = (patches - before.0, requests - before.1);
    println!(
        "1,000 updates to one integration, in order: {:.1} s, {:.1} write-backs/s, {patches} records written, {:.1} provider requests per write-back",
        elapsed.as_secs_f64(),
        1_000.0 / elapsed.as_secs_f64(),
        requests as f64 / 1_000.0
    );

    let mut orgs = Vec::new();
    let mut sessions = Vec::new();
    for n in 0..10 {
        let id = format!("int-{n}");
        let (fake, ids) = prepared(dir.path(), &handler, &id, 100).await;
        orgs.push(fake);
        sessions.push((id, ids));
    }
    let started = Instant::now();
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(id, ids)| tokio::task::spawn_blocking(move || deliver(port, &id, &ids)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let written: usize = orgs.iter().map(|f| writes(f).0).sum();
    println!(
        "1,000 updates across 10 integrations, one session each in parallel: {:.1} s, {:.1} write-backs/s, {written} records written",
        elapsed.as_secs_f64(),
        1_000.0 / elapsed.as_secs_f64()
    );
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let history = store
        .query(
            &ShardQuery::of_type("c_integrationSync")
                .in_tenant("t1")
                .limit(100_000),
        )
        .await
        .unwrap();
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    for record in history.iter().filter(|r| {
        r.value.structured_data["jobId"]
            .as_str()
            .is_some_and(|j| j.starts_with("writeback:"))
    }) {
        let data = &record.value.structured_data;
        let key = match data["errors"][0]["code"].as_str() {
            Some(code) => format!("{} ({code})", data["status"].as_str().unwrap_or_default()),
            None => data["status"].as_str().unwrap_or_default().to_string(),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    println!("write-back outcomes: {outcomes:?}");
}
