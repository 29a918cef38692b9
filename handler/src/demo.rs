//! The demo tenant of `handler local --demo`: a bulk-import integration over bundled sample
//! exports, so that a new user sees shards, an incremental run and the sync history within
//! minutes, with no account anywhere.
//!
//! The first drop (300 accounts, 500 contacts, one person exported twice, one contact without
//! an email) is written to `<data dir>/imports/demo/` when the demo is installed, and its sync
//! is enqueued at once; `handler demo second-drop` adds a later export that changes, adds and
//! deletes records, and asks for a sync.

use std::path::{Path, PathBuf};

use chrono::Utc;
use serde_json::json;

use crate::app::App;
use crate::model::Shard;
use crate::queue::{OutgoingMessage, SYNC_INBOUND_SCHEDULED};
use crate::store::StoreError;

pub const TENANT: &str = "tenant-demo";
pub const INTEGRATION: &str = "int-demo-import";

const FIRST_DROP: [(&str, &str); 2] = [
    (
        "accounts.csv",
        include_str!("../../demo/drop-1/accounts.csv"),
    ),
    (
        "contacts.jsonl",
        include_str!("../../demo/drop-1/contacts.jsonl"),
    ),
];
const SECOND_DROP: [(&str, &str); 2] = [
    (
        "accounts-2.csv",
        include_str!("../../demo/drop-2/accounts-2.csv"),
    ),
    (
        "contacts-2.jsonl",
        include_str!("../../demo/drop-2/contacts-2.jsonl"),
    ),
];

/// Where the demo integration reads its exports.
pub fn import_folder(data_dir: &Path) -> PathBuf {
    data_dir.join("imports").join("demo")
}

fn write_drop(folder: &Path, files: &[(&str, &str)]) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    for (name, text) in files {
        let path = folder.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The demo integration: accounts and contacts from the import folder, every five minutes.
fn integration(folder: &Path) -> Shard {
    let now = Utc::now();
    serde_json::from_value(json!({
        "id": INTEGRATION,
        "tenantId": TENANT,
        "shardTypeId": "c_integration",
        "name": "Demo CRM export",
        "createdAt": now,
        "createdBy": "demo",
        "structuredData": {
            "providerName": "bulk_import",
            "syncFrequency": {"type": "interval", "intervalMinutes": 5},
            "nextSyncAt": crate::model::timestamp::format(&(now + chrono::Duration::minutes(5))),
            "connection": {"path": folder.display().to_string()},
            "entityMappings": [
                {
                    "externalEntity": "accounts", "shardTypeId": "c_company", "nameField": "name",
                    "fieldMappings": [
                        {"source": "name", "target": "name", "required": true},
                        {"source": "industry", "target": "industry"},
                        {"source": "city", "target": "city"},
                        {"source": "employees", "target": "employees", "type": "integer"}
                    ],
                    "derivedShards": [{
                        "shardTypeId": "c_company_profile", "when": {"field": "industry"},
                        "fieldMappings": [{"source": "industry", "target": "industry"},
                                          {"source": "employees", "target": "employees", "type": "integer"}]
                    }]
                },
                {
                    "externalEntity": "contacts", "shardTypeId": "c_contact", "nameField": "full_name",
                    "fieldMappings": [
                        {"source": "name", "targets": ["first_name", "last_name"], "transform": "split"},
                        {"source": "name", "target": "full_name"},
                        {"source": "email", "target": "email", "required": true},
                        {"source": "title", "target": "title"},
                        {"source": "account_id", "target": "account_external_id"}
                    ],
                    "deduplication": {"rules": [{"field": "email", "matching": "exact"}], "merge": "merge_fields"}
                }
            ]
        }
    }))
    .expect("the demo integration is a valid shard")
}

/// Installs the demo tenant if it is not there yet, and asks for its first sync at once (the
/// scheduler takes over five minutes later). Returns whether it was installed now.
pub async fn install(app: &App, data_dir: &Path) -> Result<bool, String> {
    if app
        .store
        .get(TENANT, INTEGRATION)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(false);
    }
    // Absolute: `handler local` may be started again from another directory.
    let folder = std::path::absolute(import_folder(data_dir))
        .map_err(|e| format!("the demo's import folder: {e}"))?;
    // The export before the integration that reads it: an install cut short in between is
    // made again by the next start, which finds no integration.
    write_drop(&folder, &FIRST_DROP)?;
    let shard = integration(&folder);
    match app.store.create(&shard).await {
        Ok(_) => {
            let integration = shard.data().map_err(|e| e.to_string())?;
            let job = crate::engine::scheduler::manual_job(
                &shard,
                &integration,
                true,
                Utc::now(),
                "demo",
            );
            app.queue
                .send(OutgoingMessage::json(
                    SYNC_INBOUND_SCHEDULED,
                    job.job_id.clone(),
                    &job,
                ))
                .await
                .map_err(|e| e.to_string())?;
            Ok(true)
        }
        Err(StoreError::Conflict) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// Adds the second export to the demo's import folder.
pub fn second_drop(data_dir: &Path) -> Result<PathBuf, String> {
    let folder = import_folder(data_dir);
    write_drop(&folder, &SECOND_DROP)?;
    Ok(folder)
}
