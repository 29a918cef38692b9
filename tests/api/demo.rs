//! The demo a new user runs first: `handler local --demo`, then the second export.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, wait_until};

async fn history(app: &TestApp) -> Vec<Value> {
    app.cli_json(&["history", "--tenant", "tenant-demo"])
        .await
        .as_array()
        .unwrap()
        .clone()
}

async fn shards(app: &TestApp, shard_type: &str) -> usize {
    app.cli_json(&[
        "shards",
        "--tenant",
        "tenant-demo",
        "--type",
        shard_type,
        "--limit",
        "100000",
    ])
    .await
    .as_array()
    .unwrap()
    .len()
}

/// Asks for a sync of the demo integration, full or incremental, and waits until the history
/// holds `runs` finished runs; returns the newest run's record.
async fn sync_and_wait(app: &TestApp, full: bool, runs: usize) -> Value {
    let mut args = vec!["sync", "int-demo-import", "--tenant", "tenant-demo"];
    if full {
        args.push("--full");
    }
    app.cli_json(&args).await;
    wait_until("the sync finished", Duration::from_secs(60), || async {
        let h = history(app).await;
        h.len() == runs && h.iter().all(|r| r["structuredData"]["status"] != "running")
    })
    .await;
    history(app).await[0]["structuredData"].clone()
}

#[tokio::test]
async fn the_demo_imports_the_sample_exports_then_the_second_drop_incrementally() {
    let app = TestApp::new();
    // Installing the demo enqueues its first sync; the scheduler's turn is five minutes away.
    let runtime = app.start_local_with_args(&["--demo"]).await;
    wait_until(
        "the first import finished",
        Duration::from_secs(60),
        || async {
            history(&app)
                .await
                .first()
                .is_some_and(|r| r["structuredData"]["status"] != "running")
        },
    )
    .await;
    let first = history(&app).await[0]["structuredData"].clone();
    assert_eq!(
        first["status"], "partial",
        "one contact has no email: {first}"
    );
    assert_eq!(first["stats"]["recordsFetched"], 800);
    assert_eq!(first["stats"]["shardsFailed"], 1);
    assert_eq!(first["errors"][0]["code"], "VALIDATION_ERROR");
    assert_eq!(first["errors"][0]["recordId"], "C0100");
    assert_eq!(first["errors"][0]["field"], "email");
    assert_eq!(shards(&app, "c_company").await, 300);
    assert_eq!(
        shards(&app, "c_contact").await,
        498,
        "one duplicate merged, one failed"
    );

    let out = app.cli(&["demo", "second-drop"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the second import finished",
        Duration::from_secs(60),
        || async {
            let h = history(&app).await;
            h.len() == 2 && h.iter().all(|r| r["structuredData"]["status"] != "running")
        },
    )
    .await;
    let all = history(&app).await;
    let second = all
        .iter()
        .map(|r| &r["structuredData"])
        .find(|r| r["jobId"] != first["jobId"])
        .unwrap();
    assert_eq!(second["jobType"], "incremental");
    // 20 changed and 3 new accounts, 5 deleted; 10 changed and 3 deleted contacts; plus the
    // records at exactly the cursor, fetched again and skipped unchanged.
    assert_eq!(second["stats"]["shardsCreated"], 3, "{second}");
    assert_eq!(
        second["stats"]["shardsUpdated"],
        20 + 5 + 10 + 3,
        "{second}"
    );
    assert_eq!(shards(&app, "c_company").await, 298);
    assert_eq!(shards(&app, "c_contact").await, 495);

    // The runtime shows the same metrics Application Insights gets, in Prometheus text.
    let metrics = reqwest::get(format!("http://{}/metrics", runtime.addr))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = metrics.text().await.unwrap();
    let labels = r#"integrationId="int-demo-import",provider="bulk_import",tenantId="tenant-demo""#;
    for line in [
        format!("sync_jobs_processed{{{labels}}} 2"),
        format!("sync_jobs_failed{{{labels}}} 0"),
        format!("sync_records_created{{{labels}}} {}", 300 + 498 + 3),
        format!(
            "sync_records_updated{{{labels}}} {}",
            first["stats"]["shardsUpdated"].as_u64().unwrap()
                + second["stats"]["shardsUpdated"].as_u64().unwrap()
        ),
        format!("sync_latency_ms_count{{{labels}}} 2"),
    ] {
        assert!(text.contains(&line), "no `{line}` in:\n{text}");
    }

    // A full re-sync reads both drops again: a record the second drop deleted is listed by
    // the first and then tombstoned, and stays deleted without being written back to life.
    let resync = sync_and_wait(&app, true, 3).await;
    assert_eq!(resync["jobType"], "full", "{resync}");
    assert_eq!(resync["stats"]["shardsCreated"], 0, "{resync}");
    assert_eq!(resync["stats"]["shardsUpdated"], 0, "{resync}");
    assert_eq!(shards(&app, "c_company").await, 298);
    assert_eq!(shards(&app, "c_contact").await, 495);

    // Once the exports have settled (here at once: the operator set `settleSeconds` to 0),
    // the next sync reads the records modified at exactly its cursor once more, and the one
    // after it opens none of the files: each was read whole as it is.
    let mut integration = app
        .cli_json(&["integrations", "list"])
        .await
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "int-demo-import")
        .unwrap()
        .clone();
    integration["structuredData"]["connection"]["settleSeconds"] = "0".into();
    let file = app.path("demo-integration.json");
    std::fs::write(&file, integration.to_string()).unwrap();
    app.cli_json(&["integrations", "put", file.to_str().unwrap()])
        .await;
    let mut fetched = Vec::new();
    for runs in [4, 5] {
        let newest = sync_and_wait(&app, false, runs).await;
        assert_eq!(newest["jobType"], "incremental", "{newest}");
        fetched.push(newest["stats"]["recordsFetched"].as_u64().unwrap());
    }
    assert!(fetched[0] > 0, "{fetched:?}");
    assert_eq!(fetched[1], 0, "{fetched:?}");

    // An operator drops a backfill, last month's export, which sorts after the two drops:
    // 1,500 contacts never imported, then older versions of a contact the second drop changed
    // and of one it deleted. A full re-sync adds the new contacts and leaves the newer versions
    // be, though the old ones come a page after the drop that changed them, and in the
    // continuation job the record limit starts.
    let folder = app.data_dir().join("imports").join("demo");
    assert!(
        folder.join("contacts-2.jsonl").exists(),
        "{}",
        folder.display()
    );
    let mut backfill: Vec<Value> = (7000..8500)
        .map(|n| {
            json!({"id": format!("C{n}"), "name": format!("Rosa Lind{n}"),
                   "email": format!("rosa.lind{n}@example.test"), "title": "Analyst",
                   "account_id": "A0001", "modified_at": "2026-10-01T10:00:00Z"})
        })
        .collect();
    backfill.push(
        json!({"id": "C0001", "name": "Mary Ann Tanaka", "email": "mary.ann.tanaka1@example.test",
               "title": "CTO", "account_id": "A0224", "modified_at": "2026-11-01T08:01:30Z"}),
    );
    backfill.push(
        json!({"id": "C0011", "name": "Xavier Chen", "email": "xavier.chen11@example.test",
               "title": "Engineer", "account_id": "A0013", "modified_at": "2026-11-01T08:11:30Z"}),
    );
    let lines: Vec<String> = backfill.iter().map(Value::to_string).collect();
    std::fs::write(
        folder.join("contacts-3-backfill.jsonl"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    let newest = sync_and_wait(&app, true, 7).await;
    let chain: Vec<Value> = history(&app).await[..2]
        .iter()
        .map(|r| r["structuredData"].clone())
        .collect();
    assert_eq!(newest, chain[0]);
    let total = |stat: &str| -> u64 {
        chain
            .iter()
            .map(|r| r["stats"][stat].as_u64().unwrap())
            .sum()
    };
    assert!(chain.iter().all(|r| r["jobType"] == "full"), "{chain:?}");
    assert_eq!(total("shardsCreated"), 1500, "{chain:?}");
    assert_eq!(total("shardsUpdated"), 0, "{chain:?}");
    assert_eq!(
        shards(&app, "c_contact").await,
        495 + 1500,
        "C0011 stays deleted"
    );
    let contacts = app
        .cli_json(&[
            "shards",
            "--tenant",
            "tenant-demo",
            "--type",
            "c_contact",
            "--limit",
            "100000",
        ])
        .await;
    let mary_ann = contacts
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "int-demo-import~contacts~C0001")
        .unwrap();
    assert_eq!(
        mary_ann["structuredData"]["title"], "Director",
        "{mary_ann}"
    );
}
