//! [`EventSink`] on an Azure Event Grid custom topic.
//!
//! Events are posted in batches under Event Grid's 1 MB limit, as CloudEvents 1.0
//! (`application/cloudevents-batch+json`) or in the Event Grid schema, whichever the topic was
//! created with. Authorization is the topic's access key (`aeg-sas-key`) or an Entra bearer
//! token (role: EventGrid Data Sender). A batch refused for now (throttling, an outage, a lost
//! connection) is posted again, as Azure's own clients do ([`wait_before_retry`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{EventSink, EventsError};
use crate::identity::TokenSource;
use crate::model::Event;

/// The Entra scope of Event Grid publishing.
pub const SCOPE: &str = "https://eventgrid.azure.net/.default";

/// Event Grid refuses a request over 1 MB; stay under it with room for the array's brackets.
const MAX_BATCH_BYTES: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    CloudEvents,
    EventGrid,
}

impl std::str::FromStr for Schema {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cloudevents" | "cloudevents1.0" => Ok(Self::CloudEvents),
            "eventgrid" => Ok(Self::EventGrid),
            other => Err(format!(
                "expected `cloudevents` or `eventgrid`, got `{other}`"
            )),
        }
    }
}

#[derive(Clone)]
pub enum EventGridAuth {
    Key(String),
    Entra(Arc<dyn TokenSource>),
}

#[derive(Clone)]
pub struct EventGridPublisher {
    http: reqwest::Client,
    endpoint: String,
    schema: Schema,
    auth: EventGridAuth,
}

/// One event in the Event Grid schema.
pub fn event_grid_schema(event: &Event) -> Value {
    json!({
        "id": event.id,
        "eventType": event.kind,
        "subject": event.subject,
        "eventTime": event.time,
        "data": event.data,
        "dataVersion": "1.0",
    })
}

/// Splits serialized events into arrays of at most `max_bytes` each. An event larger than the
/// limit alone is an error: Event Grid would refuse it whatever the batch.
pub fn batches(events: &[Value], max_bytes: usize) -> Result<Vec<Vec<&Value>>, EventsError> {
    let mut out: Vec<Vec<&Value>> = Vec::new();
    let mut size = 2;
    for event in events {
        let len = event.to_string().len() + 1;
        if len + 2 > max_bytes {
            return Err(EventsError(format!(
                "an event of {len} bytes is over Event Grid's 1 MB limit"
            )));
        }
        if out.is_empty() || size + len > max_bytes {
            out.push(Vec::new());
            size = 2;
        }
        out.last_mut().expect("a batch was just pushed").push(event);
        size += len;
    }
    Ok(out)
}

impl EventGridPublisher {
    /// `endpoint` is the topic endpoint, `https://<topic>.<region>-1.eventgrid.azure.net/api/events`.
    pub fn new(endpoint: &str, schema: Schema, auth: EventGridAuth) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client with default TLS builds"),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            schema,
            auth,
        }
    }
}

#[async_trait]
impl EventSink for EventGridPublisher {
    async fn publish(&self, events: &[Event]) -> Result<(), EventsError> {
        if events.is_empty() {
            return Ok(());
        }
        let values: Vec<Value> = events
            .iter()
            .map(|e| match self.schema {
                Schema::CloudEvents => serde_json::to_value(e).expect("an event serializes"),
                Schema::EventGrid => event_grid_schema(e),
            })
            .collect();
        let content_type = match self.schema {
            Schema::CloudEvents => "application/cloudevents-batch+json; charset=utf-8",
            Schema::EventGrid => "application/json",
        };
        for batch in batches(&values, MAX_BATCH_BYTES)? {
            let body = serde_json::to_vec(&batch).expect("events serialize");
            let mut attempt = 1;
            loop {
                let failed = match self.post(content_type, &body).await {
                    Ok(()) => break,
                    Err(failed) => failed,
                };
                let Some(wait) = wait_before_retry(failed.status, failed.retry_after, attempt)
                else {
                    return Err(EventsError(failed.message));
                };
                tracing::debug!(attempt, error = %failed.message, "Event Grid refused a batch for now; posting it again");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
        Ok(())
    }
}

/// A post Event Grid did not accept.
struct Refused {
    /// `None` where no answer came.
    status: Option<reqwest::StatusCode>,
    retry_after: Option<Duration>,
    message: String,
}

impl EventGridPublisher {
    async fn post(&self, content_type: &str, body: &[u8]) -> Result<(), Refused> {
        let refused = |status, retry_after, message| Refused {
            status,
            retry_after,
            message,
        };
        let mut request = self
            .http
            .post(&self.endpoint)
            .query(&[("api-version", "2018-01-01")])
            .header("Content-Type", content_type)
            .body(body.to_vec());
        request = match &self.auth {
            EventGridAuth::Key(key) => request.header("aeg-sas-key", key),
            EventGridAuth::Entra(credential) => {
                // Managed identity's endpoint fails for a moment too: asked again.
                let token = credential.token(SCOPE).await.map_err(|e| {
                    refused(None, None, format!("no Entra token for Event Grid: {e}"))
                })?;
                request.bearer_auth(token)
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| refused(None, None, format!("publishing to Event Grid failed: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = adapters::http::retry_after(response.headers(), chrono::Utc::now());
        let body: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(refused(
            Some(status),
            retry_after,
            format!("Event Grid answered {status}: {body}"),
        ))
    }
}

/// How many times a batch is posted before its events are given up.
const ATTEMPTS: u32 = 4;

/// The longest a `Retry-After` is waited: publishing holds up the sync that has the events.
const LONGEST_WAIT: Duration = Duration::from_secs(10);

/// How long to wait before posting a batch again after post `attempt` failed with `status`
/// (`None`: no answer came) and `retry_after`; `None` when it is not to be posted again.
///
/// As Azure's own clients do: throttling (429), a timeout (408), an outage (5xx) and a lost
/// connection (what adapters take for passing) are tried again, three times, after 0.25, 0.5 and 1 s or as long as Event Grid
/// asks (up to 10 s); the events' ids are fixed, so a batch that landed before its answer was
/// lost is one subscribers can tell again. Anything else (a bad key, a refused event) fails as
/// it is.
fn wait_before_retry(
    status: Option<reqwest::StatusCode>,
    retry_after: Option<Duration>,
    attempt: u32,
) -> Option<Duration> {
    let passing = status.is_none_or(|s| adapters::http::status_code(s).is_retryable());
    if !passing || attempt >= ATTEMPTS {
        return None;
    }
    let backoff = Duration::from_millis(250 << (attempt - 1));
    Some(retry_after.map_or(backoff, |asked| asked.min(LONGEST_WAIT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_outages_are_posted_again_and_refusals_are_not() {
        use reqwest::StatusCode;
        let ms = Duration::from_millis;
        assert_eq!(wait_before_retry(None, None, 1), Some(ms(250)));
        assert_eq!(
            wait_before_retry(Some(StatusCode::SERVICE_UNAVAILABLE), None, 2),
            Some(ms(500))
        );
        assert_eq!(
            wait_before_retry(Some(StatusCode::TOO_MANY_REQUESTS), Some(ms(3000)), 3),
            Some(ms(3000))
        );
        assert_eq!(
            wait_before_retry(Some(StatusCode::TOO_MANY_REQUESTS), Some(ms(60_000)), 1),
            Some(LONGEST_WAIT)
        );
        assert_eq!(
            wait_before_retry(Some(StatusCode::REQUEST_TIMEOUT), None, ATTEMPTS),
            None,
            "three tries again at most"
        );
        for refused in [
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::PAYLOAD_TOO_LARGE,
        ] {
            assert_eq!(wait_before_retry(Some(refused), None, 1), None, "{refused}");
        }
    }

    #[test]
    fn batches_stay_under_the_limit_and_keep_order() {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({"id": i, "pad": "x".repeat(100)}))
            .collect();
        let one = events[0].to_string().len() + 1;
        let groups = batches(&events, 2 + one * 3).unwrap();
        assert_eq!(
            groups.iter().map(Vec::len).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(groups[3][0]["id"], 9);
        let huge = vec![json!({"pad": "x".repeat(2000)})];
        assert!(batches(&huge, 1000).is_err());
    }

    #[test]
    fn the_event_grid_schema_has_its_required_fields() {
        let event = Event::new(
            "integration.sync.completed",
            "/tenants/t1/integrations/i1",
            "job-1",
            chrono::Utc::now(),
            json!({"n": 1}),
        );
        let value = event_grid_schema(&event);
        for field in [
            "id",
            "eventType",
            "subject",
            "eventTime",
            "data",
            "dataVersion",
        ] {
            assert!(value.get(field).is_some(), "{field}");
        }
        assert_eq!(value["eventType"], "integration.sync.completed");
    }
}
