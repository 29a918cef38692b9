//! A fake Functions host: starts the handler as the host does and posts invocations with
//! byte-faithful envelopes.
//!
//! The envelope builders here are written from the host's documented wire format and captured
//! payloads, independently of the handler's own code, so a misreading in one shows up as a
//! failing test instead of two matching mistakes.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub const HOST_VERSION: &str = "4.1036.2.2";

/// The custom handler as a child process of the fake host.
pub struct HostedHandler {
    pub port: u16,
    /// Held so that the handler is killed when the test ends.
    child: Child,
}

/// What the handler answered to one invocation.
#[derive(Debug)]
pub struct HostResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl HostResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// What the host would make of it: success needs 2xx, a JSON content type and a JSON object.
    pub fn host_accepts(&self) -> bool {
        (200..300).contains(&self.status)
            && self
                .content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/json"))
            && matches!(
                serde_json::from_slice::<Value>(&self.body),
                Ok(Value::Object(_))
            )
    }
}

/// A port no one listens on, for a process the test starts to bind itself.
///
/// The port is released before that process binds it, so it must not be one the kernel could
/// hand to someone else meanwhile: every fake binds port 0, and a port taken from the same
/// ephemeral range could go to a fake of a test running alongside, which would then answer in
/// the handler's place. Ports are therefore taken below the ephemeral range, each at most once
/// per test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Above the ports only root may bind.
    let base = u32::from(ephemeral_low.min(20_000) / 2).max(1024);
    let span = u32::from(ephemeral_low).saturating_sub(base).max(1);
    // Processes started one after another begin at different places, so a port a previous
    // test process's child still holds while it dies is not the first one tried.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(base + offset).expect("below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range")
}

impl HostedHandler {
    /// Starts the handler with the environment the host gives it and waits until `GET /`
    /// answers, polling every 25 ms as the host does.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[]).await
    }

    /// Starts the handler with extra app settings.
    pub async fn start_with(data_dir: &Path, settings: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
            .envs(settings.iter().copied())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", uuid_like())
            .env("FUNCTIONS_APP_ROOT_PATH", data_dir)
            .env("FUNC_SYNC_DATA_DIR", data_dir)
            .env_remove("FUNC_SYNC_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the handler binary starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await {
                let request = format!(
                    "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                );
                if stream.write_all(request.as_bytes()).await.is_ok() {
                    let mut answer = Vec::new();
                    if stream.read_to_end(&mut answer).await.is_ok()
                        && answer.starts_with(b"HTTP/1.1 ")
                    {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the handler did not answer GET / within 30 s"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the handler exited before it answered GET /: {status}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Self { port, child }
    }

    /// Posts an envelope to `/{function}` as the host does: chunked JSON with the host's headers.
    pub async fn invoke(&self, function: &str, envelope: &Value) -> HostResponse {
        self.post_raw(function, envelope.to_string().as_bytes())
            .await
    }

    /// Runs a sync job of tenant `t1`'s `integration_id` as the host delivers a scheduled job
    /// to SyncInboundScheduled, the first time, and asserts the host would accept the answer.
    pub async fn run_sync(
        &self,
        integration_id: &str,
        provider: &str,
        job_id: &str,
        job_type: &str,
    ) {
        let job = json!({
            "integrationId": integration_id, "tenantId": "t1", "jobType": job_type,
            "provider": provider, "jobId": job_id, "scheduledAt": "2026-11-22T10:00:00Z",
            "attempt": 1
        });
        let envelope =
            service_bus_message("SyncInboundScheduled", &job.to_string(), job_id, 1, None);
        let res = self.invoke("SyncInboundScheduled", &envelope).await;
        assert!(res.host_accepts(), "{res:?}");
    }

    pub async fn post_raw(&self, function: &str, body: &[u8]) -> HostResponse {
        post_invocation(self.port, function, body).await
    }

    /// Delivers a message the test took from the embedded queues to `function`, as the host
    /// delivers a Service Bus message the first time, and asserts the host would accept the
    /// answer.
    pub async fn deliver(&self, function: &str, message: &handler::queue::ReceivedMessage) {
        let body = String::from_utf8(message.body.clone()).unwrap();
        let mut envelope = service_bus_message(
            function,
            &body,
            &message.message_id,
            1,
            message.session_id.as_deref(),
        );
        let properties = Value::Object(message.properties.clone());
        envelope["Metadata"]["ApplicationProperties"] = properties.clone();
        envelope["Metadata"]["UserProperties"] = properties;
        let answer = self.invoke(function, &envelope).await;
        assert!(answer.host_accepts(), "{answer:?}");
    }

    /// Starts an invocation without waiting for it: for one a test holds half-way.
    pub fn invoke_in_background(
        &self,
        function: &str,
        envelope: &Value,
    ) -> tokio::task::JoinHandle<HostResponse> {
        let (port, function, body) = (self.port, function.to_string(), envelope.to_string());
        tokio::spawn(async move { post_invocation(port, &function, body.as_bytes()).await })
    }
}

/// Posts an invocation to the handler on `port` as the host does: chunked JSON with the host's
/// headers.
pub async fn post_invocation(port: u16, function: &str, body: &[u8]) -> HostResponse {
    {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let head = format!(
            "POST /{function} HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\n\
             X-Azure-Functions-HostVersion: {HOST_VERSION}\r\n\
             X-Azure-Functions-InvocationId: {id}\r\n\
             User-Agent: Azure-Functions-Host/{HOST_VERSION}\r\n\
             traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\
             Content-Type: application/json; charset=utf-8\r\n\
             Transfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n",
            id = uuid_like(),
        );
        let mut request = head.into_bytes();
        // Two chunks, as a streaming serializer would send them.
        let (first, second) = body.split_at(body.len() / 2);
        for chunk in [first, second] {
            if !chunk.is_empty() {
                request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                request.extend_from_slice(chunk);
                request.extend_from_slice(b"\r\n");
            }
        }
        request.extend_from_slice(b"0\r\n\r\n");
        stream.write_all(&request).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        parse_response(&raw)
    }
}

impl HostedHandler {
    /// Posts a provider's webhook delivery (`headers`, `body`, and the URL's `query`) to
    /// WebhookReceiver as the host invokes it; returns the HTTP answer the function gave
    /// (`statusCode`, `headers`, `body`).
    pub async fn post_webhook(
        &self,
        provider: &str,
        query: &[(&str, &str)],
        headers: &[(String, String)],
        body: &str,
    ) -> Value {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let res = self
            .invoke(
                "WebhookReceiver",
                &http_request_with_query("WebhookReceiver", provider, query, &headers, body),
            )
            .await;
        assert!(res.host_accepts(), "{res:?}");
        res.json()["Outputs"]["res"].clone()
    }

    /// Kills the handler as a crash would (SIGKILL).
    pub async fn kill_9(mut self) {
        self.child.kill().await.unwrap();
        self.child.wait().await.unwrap();
    }
}

fn parse_response(raw: &[u8]) -> HostResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut content_type = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.trim().to_string()),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = decoded;
    }
    HostResponse {
        status,
        content_type,
        body,
    }
}

fn uuid_like() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        (n >> 48) as u32,
        n as u64 & 0xffff_ffff_ffff
    )
}

/// Newtonsoft's rendering of a .NET string value: JSON-encoded a second time.
pub fn dotnet_string(s: &str) -> Value {
    Value::String(Value::String(s.to_string()).to_string())
}

fn sys(function: &str) -> Value {
    json!({"MethodName": function, "UtcNow": "2026-11-22T10:00:00.1234567Z",
           "RandGuid": "fa3b2fbc-26ed-4fcb-be75-82db8773b519"})
}

/// A timer's first run under `func start`, as captured (`Last` is .NET's minimum date).
pub fn timer_first_run(function: &str, binding: &str) -> Value {
    json!({
        "Data": { binding: {
            "Schedule": {"AdjustForDST": true},
            "ScheduleStatus": {"Last": "0001-01-01T00:00:00",
                               "Next": "2026-11-22T10:01:00+00:00",
                               "LastUpdated": "2026-11-22T10:00:00.403838+00:00"},
            "IsPastDue": false}},
        "Metadata": {"sys": sys(function)}
    })
}

/// A timer invocation from a host that keeps no schedule status.
pub fn timer_without_status(function: &str, binding: &str) -> Value {
    json!({
        "Data": { binding: {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null, "IsPastDue": false}},
        "Metadata": {"sys": sys(function)}
    })
}

/// A Service Bus message bound as a string: the body double-encoded in `Data`, the broker
/// properties in `Metadata` with numbers as strings and strings double-encoded.
pub fn service_bus_message(
    function: &str,
    body: &str,
    message_id: &str,
    delivery_count: u32,
    session_id: Option<&str>,
) -> Value {
    let mut metadata = json!({
        "DeliveryCount": delivery_count.to_string(),
        "LockToken": dotnet_string("4223106e-36f4-45ed-b1ab-96ead73e225b"),
        "ExpiresAtUtc": "2026-12-06T10:00:00",
        "ExpiresAt": "2026-12-06T10:00:00+00:00",
        "EnqueuedTimeUtc": "2026-11-22T10:00:00",
        "EnqueuedTime": "2026-11-22T10:00:00+00:00",
        "MessageId": dotnet_string(message_id),
        "ContentType": dotnet_string("application/json"),
        "SequenceNumber": "17",
        "ApplicationProperties": {},
        "UserProperties": {},
        "MessageActions": {},
        "ReceiveActions": {},
        "Client": {"FullyQualifiedNamespace": "sb-sync-dev.servicebus.windows.net", "IsClosed": false},
        "sys": sys(function)
    });
    if let Some(session) = session_id {
        metadata["SessionId"] = dotnet_string(session);
        metadata["SessionActions"] = json!({});
    }
    if let Ok(Value::Object(props)) = serde_json::from_str::<Value>(body) {
        for (k, v) in props {
            let encoded = match v {
                Value::String(s) => dotnet_string(&s),
                Value::Number(n) => Value::String(n.to_string()),
                Value::Bool(b) => Value::String(b.to_string()),
                Value::Null => continue,
                other => other,
            };
            metadata[k] = encoded;
        }
    }
    json!({"Data": {"message": dotnet_string(body)}, "Metadata": metadata})
}

/// An HTTP request that was sent chunked: the host gives it no `Body`.
pub fn http_request_without_body(function: &str, method: &str, provider: &str) -> Value {
    json!({
        "Data": {"req": {
            "Url": format!("https://func-sync-dev.azurewebsites.net/api/webhooks/{provider}"),
            "Method": method,
            "Query": {},
            "Headers": {"Content-Type": ["text/xml; charset=utf-8"], "Transfer-Encoding": ["chunked"],
                        "User-Agent": ["Jakarta Commons-HttpClient/3.1"]},
            "Params": {"provider": provider},
            "Identities": [{"AuthenticationType": null, "IsAuthenticated": false, "Claims": []}]
        }},
        "Metadata": {
            "provider": dotnet_string(provider),
            "Query": {},
            "Headers": {"Content-Type": "text/xml; charset=utf-8", "Transfer-Encoding": "chunked"},
            "sys": sys(function)
        }
    })
}

/// An HTTP request with a declared length: the host passes its body as text.
pub fn http_request_with_body(
    function: &str,
    provider: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Value {
    http_request_with_query(function, provider, &[], headers, body)
}

/// An HTTP request with query parameters and a declared length. The host gives the query
/// decoded, both in the request and in the metadata.
pub fn http_request_with_query(
    function: &str,
    provider: &str,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
    body: &str,
) -> Value {
    let mut data_headers = serde_json::Map::new();
    let mut meta_headers = serde_json::Map::new();
    for (name, value) in headers {
        data_headers.insert(name.to_string(), json!([value]));
        meta_headers.insert(name.to_string(), json!(value));
    }
    data_headers.insert("Content-Length".into(), json!([body.len().to_string()]));
    let query: serde_json::Map<String, Value> = query
        .iter()
        .map(|(name, value)| (name.to_string(), json!(value)))
        .collect();
    json!({
        "Data": {"req": {
            "Url": format!("https://func-sync-dev.azurewebsites.net/api/webhooks/{provider}"),
            "Method": "POST",
            "Query": query,
            "Headers": data_headers,
            "Params": {"provider": provider},
            "Identities": [{"AuthenticationType": null, "IsAuthenticated": false, "Claims": []}],
            "Body": body
        }},
        "Metadata": {
            "provider": dotnet_string(provider),
            "Query": query,
            "Headers": meta_headers,
            "sys": sys(function)
        }
    })
}
