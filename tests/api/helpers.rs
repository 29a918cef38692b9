//! Test fixtures: an isolated data directory per test, the real binary, and ways to look at
//! the state it leaves.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use handler::events::FileEvents;
use handler::model::Event;
use handler::queue::LocalBroker;
use handler::store::SqliteStore;

use crate::fake_host::{HostedHandler, free_port};

/// One test's world: its own data directory, removed when the test ends, and the app settings
/// every process it starts gets.
pub struct TestApp {
    dir: tempfile::TempDir,
    settings: Vec<(String, String)>,
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_settings(&[])
    }

    /// A world whose commands and local runtime run with these app settings.
    pub fn with_settings(settings: &[(&str, &str)]) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// One of this world's app settings.
    /// Sets app setting `name` for what the app runs from now on (an operator changing it).
    pub fn set_setting(&mut self, name: &str, value: &str) {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_string(), value.to_string()));
    }

    pub fn settings_value(&self, name: &str) -> String {
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no setting {name}"))
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs an operator command of the binary on this data directory.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, None).await
    }

    pub async fn cli_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt;
        let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .args(args)
            .envs(self.settings.iter().map(|(k, v)| (k, v)))
            .env("FUNC_SYNC_DATA_DIR", self.data_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        child.wait_with_output().await.unwrap()
    }

    /// Runs an operator command with `--json` and parses what it prints; panics if it fails.
    pub async fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all).await;
        assert!(
            out.status.success(),
            "handler {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "handler {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Registers an integration through `handler integrations put`.
    pub async fn register_integration(&self, integration: Value) -> Value {
        let file = self.path(&format!("{}.json", integration["id"].as_str().unwrap()));
        std::fs::write(&file, integration.to_string()).unwrap();
        self.cli_json(&["integrations", "put", file.to_str().unwrap()])
            .await
    }

    /// Sets tenant `t1`'s integration `integration_id` to `status` (`active`, `paused`, `error`),
    /// as Castiel does.
    pub async fn set_integration_status(&self, integration_id: &str, status: &str) {
        use handler::store::ShardStore;
        let store = self.store();
        let mut stored = store.get("t1", integration_id).await.unwrap().unwrap();
        stored.value.structured_data["status"] = json!(status);
        store.replace(&stored.value, &stored.etag).await.unwrap();
    }

    /// Writes an integration straight into the store, as Castiel's platform may (unchecked:
    /// its provider may be one this build does not have). A scheduled one is due at once.
    pub async fn plant_integration(&self, mut integration: Value) {
        use handler::store::ShardStore;
        let now = handler::model::timestamp::format(&chrono::Utc::now());
        let data = &mut integration["structuredData"];
        if data.get("status").is_none() {
            data["status"] = json!("active");
        }
        if data["syncFrequency"]["type"] != "manual" && data.get("nextSyncAt").is_none() {
            data["nextSyncAt"] = json!(now);
        }
        integration["shardTypeId"] = json!("c_integration");
        integration["createdAt"] = json!(now);
        let shard = serde_json::from_value(integration).unwrap();
        self.store().create(&shard).await.unwrap();
    }

    /// The app as the handler builds it on this data directory, but in this process, with
    /// extra app settings: for tests that drive the engine or an adapter directly.
    pub fn app(&self, settings: &[(&str, &str)]) -> handler::app::App {
        let dir = self.data_dir().display().to_string();
        let settings = handler::settings::Settings::from_lookup(|name| {
            if name == "FUNC_SYNC_DATA_DIR" {
                return Some(dir.clone());
            }
            settings
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        handler::app::LocalBackends::open(&settings)
            .unwrap()
            .app(settings, handler::app::providers())
    }

    /// The queues, opened beside the running app as another process would.
    pub fn broker(&self) -> LocalBroker {
        LocalBroker::open(&self.path("runtime.db"), Duration::from_secs(600)).unwrap()
    }

    pub fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.path("store.db")).unwrap()
    }

    pub fn events(&self) -> Vec<Event> {
        FileEvents::read_all(&self.path("events.jsonl")).unwrap()
    }

    /// Starts the custom handler the way the Functions host does.
    pub async fn host_handler(&self) -> HostedHandler {
        HostedHandler::start(self.data_dir()).await
    }

    /// Starts the custom handler with extra app settings.
    pub async fn host_handler_with(&self, settings: &[(&str, &str)]) -> HostedHandler {
        HostedHandler::start_with(self.data_dir(), settings).await
    }

    /// Delivers every job waiting in `sync-inbound-webhook` to SyncInboundWebhook, as the
    /// host would.
    pub async fn deliver_webhook_jobs(&self, handler: &HostedHandler) {
        for message in self
            .broker()
            .peek(handler::queue::SYNC_INBOUND_WEBHOOK)
            .unwrap()
        {
            handler.deliver("SyncInboundWebhook", &message).await;
        }
    }

    /// Stores credentials for an integration of tenant `t1` through the operator command.
    pub async fn set_credentials(&self, integration_id: &str, credentials: &Value) {
        self.set_credentials_of("t1", integration_id, credentials)
            .await;
    }

    /// Stores credentials for an integration of `tenant` through the operator command.
    pub async fn set_credentials_of(
        &self,
        tenant: &str,
        integration_id: &str,
        credentials: &Value,
    ) {
        let out = self
            .cli_with_stdin(
                &["credentials", "set", integration_id, "--tenant", tenant],
                Some(&credentials.to_string()),
            )
            .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Shards of one type in tenant `t1`, as the operator command lists them.
    pub async fn shards(&self, shard_type: &str) -> Vec<Value> {
        self.cli_json(&[
            "shards", "--tenant", "t1", "--type", shard_type, "--limit", "1000000",
        ])
        .await
        .as_array()
        .unwrap()
        .clone()
    }

    /// The history records of tenant `t1`, newest first.
    pub async fn history(&self) -> Vec<Value> {
        self.cli_json(&["history", "--tenant", "t1", "--limit", "100"])
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// The stored integration document.
    pub async fn integration(&self, id: &str) -> Value {
        use handler::store::ShardStore;
        let shard = self.store().get("t1", id).await.unwrap().unwrap().value;
        serde_json::to_value(shard).unwrap()
    }

    /// Starts `handler local` on this data directory.
    pub async fn start_local(&self) -> LocalRuntime {
        self.start_local_with_args(&[]).await
    }

    /// Starts `handler local` with extra arguments.
    pub async fn start_local_with_args(&self, args: &[&str]) -> LocalRuntime {
        LocalRuntime::start(self.data_dir(), args, &self.settings).await
    }
}

/// A Salesforce integration of tenant `t1` that syncs every 15 minutes.
pub fn salesforce_integration(id: &str) -> Value {
    integration_of(id, "salesforce")
}

/// An integration of tenant `t1` with `provider`, syncing every 15 minutes.
pub fn integration_of(id: &str, provider: &str) -> Value {
    json!({
        "id": id,
        "tenantId": "t1",
        "name": "Acme Salesforce",
        "structuredData": {
            "providerName": provider,
            "syncFrequency": {"type": "interval", "intervalMinutes": 15},
            "entityMappings": [{"externalEntity": "Account", "shardTypeId": "c_company", "createNew": true}]
        }
    })
}

/// `handler local` as a child process.
pub struct LocalRuntime {
    pub addr: String,
    child: Child,
}

impl LocalRuntime {
    /// Starts `handler local` on `data_dir` with extra arguments and app settings; its front
    /// door is at the settings' `FUNC_SYNC_LOCAL_ADDR`, or on a free port.
    async fn start(data_dir: &Path, args: &[&str], settings: &[(String, String)]) -> Self {
        let addr = settings
            .iter()
            .find(|(name, _)| name == "FUNC_SYNC_LOCAL_ADDR")
            .map_or_else(|| format!("127.0.0.1:{}", free_port()), |(_, a)| a.clone());
        let child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .arg("local")
            .args(args)
            .envs(settings.iter().map(|(k, v)| (k, v)))
            .env("FUNC_SYNC_DATA_DIR", data_dir)
            .env("FUNC_SYNC_LOCAL_ADDR", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let runtime = Self { addr, child };
        let url = format!("http://{}/api/webhooks/probe", runtime.addr);
        wait_until(
            "the local runtime's front door answers",
            Duration::from_secs(30),
            || async { http_request("GET", &url, &[], None).await.is_some() },
        )
        .await;
        runtime
    }

    /// Stops the runtime as the platform does, with SIGTERM, and waits until it has exited.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success());
        self.child.wait().await.unwrap()
    }

    /// Kills the runtime with SIGKILL: no cleanup of any kind.
    pub async fn kill_9(mut self) {
        self.child.kill().await.unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Polls `condition` until it holds; fails the test after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 client for the front door: (status, headers, body), or `None` if the
/// connection failed.
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Option<(u16, Vec<(String, String)>, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&bytes).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, raw[split + 4..].to_vec()))
}
