//! Invoking a function the way the Functions host does: a JSON envelope POSTed to
//! `/{FunctionName}` on the custom handler, judged by the host's rules.
//!
//! The custom handler's router runs in-process, so no port is opened, but the request and
//! response bytes are the ones that cross the wire in Azure.
//!
//! An invocation runs for at most host.json's `functionTimeout`, as in Azure, where the host
//! then fails it: a message's lock is renewed only as long, and an invocation still running
//! after its message was delivered again would run alongside the next.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Request, header};
use serde_json::Value;
use tower::ServiceExt;

use crate::definition::FunctionName;

/// What the local host reports to the trigger that invoked a function.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx with a JSON object: the invocation succeeded.
    Succeeded(Value),
    /// Anything else; the message says what, for logs and dead-letter descriptions.
    Failed(String),
}

#[derive(Clone)]
pub struct Invoker {
    handler: Router,
    timeout: std::time::Duration,
}

/// host.json's `functionTimeout`.
pub const FUNCTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

const HOST_VERSION: &str = "4.1036.0.0";

impl Invoker {
    pub fn new(handler: Router) -> Self {
        Self {
            handler,
            timeout: FUNCTION_TIMEOUT,
        }
    }

    /// The same, with invocations stopped after `timeout` rather than [`FUNCTION_TIMEOUT`].
    pub fn with_timeout(self, timeout: std::time::Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Invokes `function` with `envelope`; one still running after the function timeout is
    /// stopped (dropped at its next wait) and failed.
    pub async fn invoke(&self, function: FunctionName, envelope: &Value) -> Outcome {
        match tokio::time::timeout(self.timeout, self.invoke_unbounded(function, envelope)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed(format!(
                "the invocation ran past the function timeout ({} s) and was stopped",
                self.timeout.as_secs_f64()
            )),
        }
    }

    async fn invoke_unbounded(&self, function: FunctionName, envelope: &Value) -> Outcome {
        let request = Request::post(format!("/{function}"))
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header("x-azure-functions-hostversion", HOST_VERSION)
            .header(
                "x-azure-functions-invocationid",
                uuid::Uuid::new_v4().to_string(),
            )
            .header(
                header::USER_AGENT,
                format!("Azure-Functions-Host/{HOST_VERSION}"),
            )
            .body(Body::from(envelope.to_string()))
            .expect("a static request is valid");
        let response = match self.handler.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let body = match to_bytes(response.into_body(), usize::MAX).await {
            Ok(body) => body,
            Err(e) => return Outcome::Failed(format!("reading the handler's answer failed: {e}")),
        };
        if !status.is_success() {
            return Outcome::Failed(format!(
                "the handler answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        if !is_json {
            return Outcome::Failed("the handler's answer is not application/json".into());
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(value @ Value::Object(_)) => Outcome::Succeeded(value),
            Ok(_) | Err(_) if body.is_empty() => {
                Outcome::Failed("the handler answered with an empty body".into())
            }
            _ => Outcome::Failed(format!(
                "the handler's answer is not a JSON object: {}",
                String::from_utf8_lossy(&body)
            )),
        }
    }
}
