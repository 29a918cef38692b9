//! The custom handler's HTTP server: what the Functions host talks to.
//!
//! `GET /` answers at once (the host polls it for readiness); `POST /{FunctionName}` runs one
//! invocation. Answers are always JSON: 200 with `{"Outputs","Logs","ReturnValue"}` when the
//! function ran, 400 for an envelope the handler cannot read, 404 for an unknown function and
//! 500 when a retry can help. The host drops the `Logs` of failed invocations, so failures are
//! also logged here, to stdout.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tracing::Instrument;

use crate::app::App;
use crate::definition::FunctionName;
use crate::functions::{self, InvocationError};
use crate::protocol::InvocationRequest;

/// Service Bus Premium allows 100 MB messages; nothing the host sends is larger.
const MAX_INVOCATION_BYTES: usize = 100 * 1024 * 1024;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(ready))
        .route("/{function}", post(invoke))
        .layer(DefaultBodyLimit::max(MAX_INVOCATION_BYTES))
        .with_state(Arc::new(app))
}

async fn ready() -> &'static str {
    "ready"
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(status: StatusCode, message: &str) -> Response {
    json_response(status, json!({ "error": message }).to_string())
}

async fn invoke(
    State(app): State<Arc<App>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let invocation_id = headers
        .get("x-azure-functions-invocationid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let span =
        tracing::info_span!("invocation", function = %function, invocation_id = %invocation_id);
    async move {
        let function = match function.parse::<FunctionName>() {
            Ok(f) => f,
            Err(reason) => {
                tracing::warn!(%reason, "invocation of an unknown function");
                return error_response(StatusCode::NOT_FOUND, &reason);
            }
        };
        let request = match InvocationRequest::parse(&body) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "malformed invocation envelope");
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("malformed invocation: {e}"),
                );
            }
        };
        match functions::invoke(&app, function, &request).await {
            Ok(response) => {
                for line in &response.logs {
                    tracing::info!("{line}");
                }
                json_response(
                    StatusCode::OK,
                    serde_json::to_string(&response).expect("a response serializes"),
                )
            }
            Err(e @ InvocationError::BadEnvelope(_)) => {
                tracing::error!(error = %e, "malformed invocation envelope");
                error_response(StatusCode::BAD_REQUEST, &e.to_string())
            }
            Err(e @ InvocationError::Transient(_)) => {
                tracing::error!(error = %e, "invocation failed; the host will retry");
                error_response(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
        }
    }
    .instrument(span)
    .await
}

/// Serves the custom handler on `127.0.0.1:port` until SIGTERM or Ctrl-C.
pub async fn serve(app: App, port: u16) -> std::io::Result<()> {
    // The host sends the first invocation as soon as the port answers; the providers' HTTP
    // client is built meanwhile rather than inside it.
    tokio::task::spawn_blocking(adapters::http::warm_up);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    tracing::info!(port, "custom handler listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

/// Resolves on SIGTERM (what the host and App Service send) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
