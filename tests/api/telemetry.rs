//! Metrics and traces leave for Application Insights the way Azure takes them: to the
//! connection string's ingestion endpoint, gzipped, under a managed identity's token when
//! local authentication is off. A loopback ingestion endpoint and App Service's managed
//! identity endpoint stand in for Azure.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::helpers::{TestApp, wait_until};

const IDENTITY_SECRET: &str = "app-service-identity-secret";
const TOKEN: &str = "monitor-token";

/// One upload: the path, the Authorization header, the envelopes.
type Upload = (String, Option<String>, Vec<Value>);

/// What the fake Azure Monitor received.
#[derive(Clone, Default)]
struct Ingestion {
    posts: Arc<Mutex<Vec<Upload>>>,
    token_resources: Arc<Mutex<Vec<String>>>,
}

async fn track(
    State(fake): State<Ingestion>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut text = String::new();
    let gzipped = headers.get("content-encoding").is_some_and(|v| v == "gzip");
    if gzipped {
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .unwrap();
    } else {
        text = String::from_utf8_lossy(&body).into_owned();
    }
    let envelopes: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
    let count = envelopes.len();
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    fake.posts
        .lock()
        .unwrap()
        .push((uri.path().to_string(), authorization, envelopes));
    (
        StatusCode::OK,
        axum::Json(json!({"itemsReceived": count, "itemsAccepted": count, "errors": []})),
    )
        .into_response()
}

/// App Service's identity endpoint: a token for the resource asked, to a caller that knows
/// the secret header.
async fn identity(
    State(fake): State<Ingestion>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if headers
        .get("x-identity-header")
        .is_none_or(|v| v != IDENTITY_SECRET)
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let resource = query
        .iter()
        .find(|(k, _)| k == "resource")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    fake.token_resources.lock().unwrap().push(resource.clone());
    let expires = chrono::Utc::now().timestamp() + 3600;
    axum::Json(
        json!({"access_token": TOKEN, "expires_on": expires.to_string(),
                      "token_type": "Bearer", "resource": resource}),
    )
    .into_response()
}

#[tokio::test]
async fn the_demos_metrics_reach_application_insights_under_the_managed_identity() {
    let fake = Ingestion::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/v2/track", post(track))
        .route("/v2.1/track", post(track))
        .route("/msi/token", get(identity))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let connection = format!(
        "InstrumentationKey=00000000-0000-0000-0000-000000000001;IngestionEndpoint=http://{addr}/"
    );
    let endpoint = format!("http://{addr}/msi/token");
    let app = TestApp::with_settings(&[
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", &connection),
        (
            "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
            "Authorization=AAD",
        ),
        ("IDENTITY_ENDPOINT", &endpoint),
        ("IDENTITY_HEADER", IDENTITY_SECRET),
    ]);
    let runtime = app.start_local_with_args(&["--demo"]).await;
    wait_until(
        "the demo's first import finished",
        Duration::from_secs(60),
        || async {
            app.cli_json(&["history", "--tenant", "tenant-demo"])
                .await
                .as_array()
                .and_then(|h| h.first().cloned())
                .is_some_and(|r| r["structuredData"]["status"] != "running")
        },
    )
    .await;
    // Stopping exports what the last interval collected.
    assert!(runtime.stop().await.success());

    let posts = fake.posts.lock().unwrap().clone();
    assert!(
        !posts.is_empty(),
        "nothing was sent to Application Insights"
    );
    for (path, authorization, _) in &posts {
        assert_eq!(path, "/v2.1/track", "Entra ingestion takes the v2.1 API");
        assert_eq!(
            authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    assert!(
        fake.token_resources
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.starts_with("https://monitor.azure.com")),
        "tokens are for Azure Monitor"
    );
    let envelopes: Vec<&Value> = posts.iter().flat_map(|(_, _, e)| e).collect();
    let metric = |name: &str| {
        envelopes.iter().find_map(|e| {
            let metrics = e["data"]["baseData"]["metrics"].as_array()?;
            let found = metrics.iter().find(|m| m["name"] == name)?;
            Some((found.clone(), e["data"]["baseData"]["properties"].clone()))
        })
    };
    let (processed, dimensions) = metric("sync_jobs_processed").expect("sync_jobs_processed sent");
    assert_eq!(processed["value"], 1.0, "{processed}");
    assert_eq!(dimensions["tenantId"], "tenant-demo");
    assert_eq!(dimensions["integrationId"], "int-demo-import");
    assert_eq!(dimensions["provider"], "bulk_import");
    let (created, _) = metric("sync_records_created").expect("sync_records_created sent");
    assert_eq!(created["value"], 798.0, "{created}");
    assert!(
        envelopes
            .iter()
            .any(|e| e["data"]["baseType"] == "RequestData"
                || e["data"]["baseType"] == "RemoteDependencyData"),
        "the job's span went as a trace"
    );
}
