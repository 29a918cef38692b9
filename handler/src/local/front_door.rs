//! The embedded runtime's public HTTP endpoint: the routes of the HTTP-triggered functions
//! under `/api`, as the Functions host exposes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, get, on};
use chrono::Utc;
use serde_json::Value;

use super::envelopes::{self, IncomingHttp};
use super::invoker::{Invoker, Outcome};
use crate::definition::{AppDefinition, FunctionName, Trigger};
use crate::secrets::Secret;
use crate::telemetry::PrometheusText;

struct Route {
    function: FunctionName,
    binding: String,
    output: String,
    invoker: Invoker,
    /// The function key callers must bring, for a function whose `authLevel` asks for one,
    /// when the runtime has one (`WEBHOOK_FUNCTION_KEY`).
    key: Option<Secret>,
}

/// A router serving every httpTrigger function at `/api/<route>`, and the app's metrics in
/// Prometheus text at `/metrics` when there are any.
/// The largest request body the Functions host takes on an HTTP trigger (100 MB); axum's own
/// default (2 MB) would refuse a large webhook delivery here that Azure accepts.
const MAX_REQUEST_BYTES: usize = 100 * 1024 * 1024;

/// `function_key` is the key a keyed function asks for, as the host asks for its keys; without
/// one, every caller is let in.
pub fn router(
    invoker: &Invoker,
    metrics: Option<PrometheusText>,
    function_key: Option<Secret>,
) -> Router {
    let mut router = Router::new();
    if let Some(metrics) = metrics {
        router = router.route(
            "/metrics",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, PrometheusText::CONTENT_TYPE)],
                    metrics.render(),
                )
            }),
        );
    }
    for def in &AppDefinition::embedded().functions {
        if let Trigger::Http {
            binding,
            output,
            route,
            methods,
            keyed,
        } = &def.trigger
        {
            let filter = methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .filter_map(|m| MethodFilter::try_from(m).ok())
                .reduce(MethodFilter::or)
                .unwrap_or(MethodFilter::POST);
            let state = Arc::new(Route {
                function: def.name,
                binding: binding.clone(),
                output: output.clone(),
                invoker: invoker.clone(),
                key: function_key.clone().filter(|_| *keyed),
            });
            router = router.route(
                &format!("/api/{route}"),
                on(filter, handle).with_state(state),
            );
        }
    }
    router.layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
}

async fn handle(
    State(route): State<Arc<Route>>,
    Path(params): Path<BTreeMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let has_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let request = IncomingHttp {
        url: format!("http://{host}{uri}"),
        method: method.to_string(),
        query: uri
            .query()
            .map(|q| {
                q.split('&')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        (percent_decode(k), percent_decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        params,
        // The host reads a body only when the request declares its length.
        body: has_length.then(|| body.to_vec()),
    };
    if let Some(key) = &route.key {
        // As the host: `?code=` or `x-functions-key`, else 401 before the function runs.
        let given = request
            .query
            .iter()
            .find(|(name, _)| name == "code")
            .map(|(_, value)| value.as_str())
            .or_else(|| headers.get("x-functions-key").and_then(|v| v.to_str().ok()));
        if !given.is_some_and(|given| adapters::same_secret(given, key.expose())) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    let envelope = envelopes::http(route.function, &route.binding, &request, Utc::now());
    match route.invoker.invoke(route.function, &envelope).await {
        Outcome::Succeeded(result) => http_output(&result["Outputs"][&route.output]),
        Outcome::Failed(reason) => {
            tracing::error!(function = %route.function, %reason, "HTTP invocation failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Turns a function's `res` output into the HTTP response, as the host's HTTP binding does.
fn http_output(res: &Value) -> Response {
    let status = match res.get("statusCode").or_else(|| res.get("status")) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => Some(200),
    }
    .and_then(|code| StatusCode::from_u16(u16::try_from(code).ok()?).ok())
    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match res.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => serde_json::to_vec_pretty(other).unwrap_or_default(),
    };
    let mut response = (status, body).into_response();
    if let Some(Value::Object(headers)) = res.get("headers") {
        for (name, value) in headers {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&text),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    response
}

fn percent_decode(text: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 1 < bytes.len() => {
                match (hex(bytes[i + 1]), bytes.get(i + 2).and_then(|b| hex(*b))) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn a_res_output_becomes_the_response() {
        let res = serde_json::json!({"statusCode": "202", "headers": {"Content-Type": "text/xml"}, "body": "<Ack/>"});
        let response = http_output(&res);
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(response.headers()["content-type"], "text/xml");
    }
}
