//! Microsoft Graph, shared by the OneDrive and Teams adapters: delta queries, change
//! notifications and their subscriptions.
//!
//! * Delta: the first request enumerates everything, pages follow `@odata.nextLink`, and the
//!   last page's `@odata.deltaLink` is where the next sync starts. Items removed since come
//!   with a `deleted` facet or `@removed`. A delta token Graph no longer keeps (410
//!   `resyncRequired`, `syncStateNotFound`) restarts the enumeration.
//! * Change notifications: Graph validates a new subscription by POSTing `?validationToken=`,
//!   answered at once with the token as `text/plain`. A notification names its
//!   `subscriptionId`, which routes it to the one integration holding that subscription, and
//!   carries the subscription's secret `clientState`, compared in constant time with the one
//!   kept in the integration's credentials. Notifications say only that something changed:
//!   each asks for a catch-up sync of the entity. Lifecycle notifications ask for a renewal
//!   (`reauthorizationRequired`), a new subscription (`subscriptionRemoved`) or a catch-up
//!   (`missed`).
//! * Subscriptions are created with a `clientState` per subscription, renewed with PATCH
//!   before `expirationDateTime`, deleted when no longer wanted.
//!
//! Connection settings shared by both: `tenantId` or `tokenUrl`, `apiBaseUrl` (default
//! `https://graph.microsoft.com/v1.0`). Credentials: `client_id`, `client_secret`, and
//! `refresh_token` for delegated access.

pub mod onedrive;
pub mod teams;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::OrGone;
use crate::api::{Api, Dialect, TokenRequest};
use crate::microsoft;
use crate::{
    Connection, ErrorCode, ProviderError, RateLimiter, RouteKey, SubscriptionAction,
    SubscriptionInfo, SubscriptionRequest, WebhookAnswer, WebhookDelivery, WebhookError,
    WebhookNotification, WebhookRequest, WebhookRoute,
};

pub const DEFAULT_API_BASE: &str = "https://graph.microsoft.com/v1.0";
/// Graph's own resource, for token scopes whatever host the requests go to.
const GRAPH_RESOURCE: &str = "https://graph.microsoft.com";

/// A Graph client for one service (OneDrive, Teams).
pub struct Graph {
    api: Api<GraphDialect>,
}

/// Microsoft Graph as the shared request loop speaks it.
struct GraphDialect {
    /// The delegated permission asked for with a refresh token.
    delegated_scope: &'static str,
    /// The one asked for instead by an integration that writes back, where the service takes
    /// writes.
    delegated_write_scope: Option<&'static str>,
}

impl Dialect for GraphDialect {
    fn service(&self) -> &'static str {
        "Microsoft Graph"
    }

    fn token_request(&self, conn: &Connection) -> TokenRequest {
        let scope = if conn.credentials.get("refresh_token").is_some() {
            let delegated = match self.delegated_write_scope {
                Some(write) if conn.writes => write,
                _ => self.delegated_scope,
            };
            format!("{GRAPH_RESOURCE}/{delegated}")
        } else {
            format!("{GRAPH_RESOURCE}/.default")
        };
        microsoft::token_request(conn, &scope)
    }

    /// A name its folder already holds stays taken however often a write is tried, where
    /// Graph's other 409s and its 412 say the item moved on, which a retry that reads it again
    /// settles.
    fn error(&self, status: reqwest::StatusCode, body: &Value) -> ProviderError {
        let error = microsoft::answer_error(status, body);
        if body["error"]["code"] == "nameAlreadyExists" {
            ProviderError::new(ErrorCode::ValidationError, error.message)
        } else {
            error
        }
    }
}

impl Graph {
    /// Graph allows about 30 requests a second per app per tenant for most workloads; Teams
    /// allows 4 a second on one team or channel (`per_second`).
    pub fn new(per_second: u32, delegated_scope: &'static str) -> Self {
        Self::writing(per_second, delegated_scope, None)
    }

    /// A client for a service that also takes writes: an integration that writes back asks
    /// for `delegated_write_scope` (app-only access has whatever the app was granted).
    pub fn writing(
        per_second: u32,
        delegated_scope: &'static str,
        delegated_write_scope: Option<&'static str>,
    ) -> Self {
        let dialect = GraphDialect {
            delegated_scope,
            delegated_write_scope,
        };
        Self {
            api: Api::new(dialect, RateLimiter::new(per_second)),
        }
    }

    pub fn base(conn: &Connection) -> &str {
        conn.setting("apiBaseUrl").unwrap_or(DEFAULT_API_BASE)
    }

    pub async fn refresh(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.api.refresh(conn).await
    }

    /// Sends a request to `url`, which must be under the integration's API base: links come
    /// back from Graph and cursors from storage, and the token must go nowhere else.
    pub async fn send(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        self.send_with(conn, method, url, &[], body).await
    }

    /// [`Graph::send`] with more headers (an `If-Match`).
    pub async fn send_with(
        &self,
        conn: &mut Connection,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, ProviderError> {
        let base = Self::base(conn);
        if !url.starts_with(&format!("{base}/")) {
            return Err(ProviderError::resync_required(
                "a Graph link points outside the integration's apiBaseUrl",
            ));
        }
        let answer = self
            .api
            .send(conn, method, url, headers, body)
            .await
            .map_err(|e| {
                let expired = ["resyncRequired", "syncStateNotFound", "410 Gone"];
                if expired.iter().any(|code| e.message.contains(code)) {
                    ProviderError::resync_required(e.message)
                } else {
                    e
                }
            })?;
        Ok(answer.body)
    }

    pub async fn subscribe(
        &self,
        conn: &mut Connection,
        request: &SubscriptionRequest,
        change_type: &str,
    ) -> Result<SubscriptionInfo, ProviderError> {
        let url = format!("{}/subscriptions", Self::base(conn));
        let body = json!({
            "changeType": change_type,
            "notificationUrl": request.notification_url,
            "lifecycleNotificationUrl": request.lifecycle_url,
            "resource": request.resource,
            "expirationDateTime": request.expires_at.to_rfc3339(),
            "clientState": request.client_state,
        });
        let created = self
            .send(conn, Method::POST, &url, Some(&body))
            .await
            .map_err(|e| crate::http::without_query_of(e, &request.notification_url))?;
        let id = created["id"].as_str().ok_or_else(|| {
            ProviderError::new(
                ErrorCode::ValidationError,
                "Graph created a subscription without an id",
            )
        })?;
        Ok(SubscriptionInfo {
            id: id.to_string(),
            resource: request.resource.clone(),
            expires_at: expiry(&created).unwrap_or(request.expires_at),
            resource_id: None,
        })
    }

    pub async fn renew(
        &self,
        conn: &mut Connection,
        id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ProviderError> {
        microsoft::check_id("subscription", id)?;
        let url = format!("{}/subscriptions/{id}", Self::base(conn));
        let body = json!({"expirationDateTime": expires_at.to_rfc3339()});
        let renewed = self.send(conn, Method::PATCH, &url, Some(&body)).await?;
        Ok(expiry(&renewed).unwrap_or(expires_at))
    }

    pub async fn unsubscribe(&self, conn: &mut Connection, id: &str) -> Result<(), ProviderError> {
        microsoft::check_id("subscription", id)?;
        let url = format!("{}/subscriptions/{id}", Self::base(conn));
        self.send(conn, Method::DELETE, &url, None)
            .await
            .or_gone()
            .map(drop)
    }
}

fn expiry(subscription: &Value) -> Option<DateTime<Utc>> {
    subscription["expirationDateTime"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Checks the settings Graph connections share.
pub fn check_connection(settings: &mut Map<String, Value>) -> Result<(), String> {
    microsoft::check_identity(settings)?;
    crate::http::check_url(settings, "apiBaseUrl")?;
    Ok(())
}

/// A setting that goes into a URL path: present, and an id.
pub fn id_setting<'a>(conn: &'a Connection, name: &str) -> Result<&'a str, ProviderError> {
    let id = conn.setting(name).ok_or_else(|| {
        ProviderError::new(
            ErrorCode::ValidationError,
            format!("the connection has no {name}"),
        )
    })?;
    microsoft::check_id(name, id)?;
    Ok(id)
}

/// The page token or cursor `link`, or `first` when there is neither.
pub fn next_url(link: Option<&str>, first: impl FnOnce() -> String) -> String {
    link.map_or_else(first, str::to_string)
}

/// Whether an item of a delta answer says the item is gone.
pub fn is_removed(item: &Map<String, Value>) -> bool {
    item.contains_key("@removed") || item.contains_key("deleted")
}

/// The delta answer's items.
pub fn items(body: &Value) -> impl Iterator<Item = &Map<String, Value>> {
    body["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

pub fn parse_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    value
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Reads a change-notification delivery: a validation handshake, or the subscriptions its
/// notifications name.
pub fn route(request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
    if let Some(token) = request.query.get("validationToken") {
        return Ok(WebhookRoute::Handshake(WebhookAnswer::new(
            200,
            "text/plain; charset=utf-8",
            token.clone(),
        )));
    }
    let notifications = notifications(request)?;
    let mut keys: Vec<RouteKey> = notifications
        .iter()
        .map(|n| RouteKey::Subscription(text(n, "subscriptionId").unwrap_or_default()))
        .collect();
    keys.sort();
    keys.dedup();
    Ok(WebhookRoute::To(keys))
}

fn notifications(request: &WebhookRequest<'_>) -> Result<Vec<Map<String, Value>>, WebhookError> {
    let malformed = |why: &str| WebhookError::Malformed(format!("a Graph notification {why}"));
    let body: Value = request
        .body
        .and_then(|b| serde_json::from_str(b).ok())
        .ok_or_else(|| malformed("is JSON with a `value` array; this body is not JSON"))?;
    let list: Vec<Map<String, Value>> = body["value"]
        .as_array()
        .ok_or_else(|| malformed("has a `value` array; this one has none"))?
        .iter()
        .filter_map(|n| n.as_object().cloned())
        .collect();
    if list.is_empty() {
        return Err(malformed("delivery names no notification"));
    }
    if list.iter().any(|n| text(n, "subscriptionId").is_none()) {
        return Err(malformed("has no subscriptionId"));
    }
    Ok(list)
}

fn text(map: &Map<String, Value>, name: &str) -> Option<String> {
    map.get(name).and_then(Value::as_str).map(str::to_string)
}

/// Verifies the notifications of a delivery for subscription `key` against the subscription's
/// `clientState`, and turns each into a catch-up of `entity`.
pub fn verify(
    conn: &Connection,
    request: &WebhookRequest<'_>,
    key: &RouteKey,
    entity: &str,
) -> Result<WebhookDelivery, WebhookError> {
    let RouteKey::Subscription(subscription) = key else {
        return Err(WebhookError::Malformed(
            "a Graph delivery is routed by subscription".into(),
        ));
    };
    let expected = conn
        .credentials
        .get(&format!("clientState:{subscription}"))
        .ok_or_else(|| {
            WebhookError::NotKept(format!(
                "subscription `{subscription}` has no clientState kept"
            ))
        })?;
    let mut out = Vec::new();
    let delivery = uuid::Uuid::new_v4().simple().to_string();
    for n in notifications(request)? {
        if text(&n, "subscriptionId").as_deref() != Some(subscription.as_str()) {
            continue;
        }
        let given = text(&n, "clientState").unwrap_or_default();
        if !crate::same_secret(&given, expected) {
            return Err(WebhookError::Forged(format!(
                "a notification for subscription `{subscription}` has the wrong clientState"
            )));
        }
        let id = text(&n, "id").unwrap_or_else(|| match text(&n, "lifecycleEvent") {
            // Lifecycle notifications have no id. A `missed` one asks for a catch-up, and is
            // each delivery's own, as a change notification without an id is: another `missed`
            // after the catch-up the first started tells of changes that catch-up may not
            // have read.
            Some(event) if event == "missed" => format!("{subscription}:missed:{delivery}"),
            // The others, one per event and expiry: renewing or re-creating twice is once.
            Some(event) => format!(
                "{subscription}:{event}:{}",
                text(&n, "subscriptionExpirationDateTime").unwrap_or_default()
            ),
            // Graph may leave a change notification's id out, and OneDrive's say no more than
            // "the drive changed": every one of a drive reads the same. Each delivery is then
            // its own (those it batches, one), so that a change made after the catch-up an
            // earlier one started is not dropped as its duplicate; Graph delivering one again
            // costs a catch-up that finds nothing.
            None => format!("{subscription}:change:{delivery}"),
        });
        let id = id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        out.push(match text(&n, "lifecycleEvent").as_deref() {
            None => WebhookNotification::CatchUp {
                id,
                entity: entity.to_string(),
            },
            Some(event) => WebhookNotification::Subscription {
                id,
                subscription_id: subscription.clone(),
                action: match event {
                    "reauthorizationRequired" => SubscriptionAction::Renew,
                    "subscriptionRemoved" => SubscriptionAction::Recreate,
                    _ => SubscriptionAction::CatchUp,
                },
            },
        });
    }
    Ok(WebhookDelivery {
        notifications: out,
        answer: WebhookAnswer::new(202, "text/plain; charset=utf-8", ""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;
    use std::collections::BTreeMap;

    fn request<'a>(
        query: &'a BTreeMap<String, String>,
        body: Option<&'a str>,
    ) -> WebhookRequest<'a> {
        WebhookRequest {
            url: "https://func-sync.example/api/webhooks/onedrive",
            headers: &[],
            query,
            body,
        }
    }

    #[test]
    fn the_validation_handshake_echoes_the_token_as_text() {
        let query = BTreeMap::from([("validationToken".to_string(), "a b+c:d".to_string())]);
        let WebhookRoute::Handshake(answer) = route(&request(&query, None)).unwrap() else {
            panic!("not a handshake")
        };
        assert_eq!((answer.status, answer.body.as_str()), (200, "a b+c:d"));
        assert!(answer.content_type.starts_with("text/plain"));
    }

    #[test]
    fn notifications_are_routed_by_subscription_and_checked_by_client_state() {
        let none = BTreeMap::new();
        let body = json!({"value": [
            {"id": "n1", "subscriptionId": "s1", "clientState": "secret-1", "changeType": "updated", "resource": "drives/d/root"},
            {"id": "n2", "subscriptionId": "s2", "clientState": "other", "changeType": "updated", "resource": "drives/d/root"},
            {"subscriptionId": "s1", "clientState": "secret-1", "lifecycleEvent": "missed", "subscriptionExpirationDateTime": "2026-11-23T00:00:00Z"}
        ]})
        .to_string();
        let WebhookRoute::To(keys) = route(&request(&none, Some(&body))).unwrap() else {
            panic!("not routed")
        };
        assert_eq!(
            keys,
            [
                RouteKey::Subscription("s1".into()),
                RouteKey::Subscription("s2".into())
            ]
        );
        let mut credentials = Credentials::default();
        credentials.set("clientState:s1", "secret-1");
        let conn = Connection::new("int-1", Map::new(), credentials);
        let delivery = verify(&conn, &request(&none, Some(&body)), &keys[0], "driveItem").unwrap();
        assert_eq!(delivery.answer.status, 202);
        assert_eq!(delivery.notifications.len(), 2);
        assert_eq!(
            delivery.notifications[0],
            WebhookNotification::CatchUp {
                id: "n1".into(),
                entity: "driveItem".into()
            }
        );
        assert!(matches!(
            delivery.notifications[1],
            WebhookNotification::Subscription {
                action: SubscriptionAction::CatchUp,
                ..
            }
        ));
        let forged = body.replace("secret-1", "guess");
        let err = verify(&conn, &request(&none, Some(&forged)), &keys[0], "driveItem").unwrap_err();
        assert!(matches!(err, WebhookError::Forged(_)), "{err}");
        let err = verify(&conn, &request(&none, Some(&body)), &keys[1], "driveItem").unwrap_err();
        assert!(
            matches!(err, WebhookError::NotKept(_)),
            "no secret kept for s2: {err}"
        );
    }

    #[test]
    fn change_notifications_without_an_id_have_their_deliverys_id() {
        let none = BTreeMap::new();
        // OneDrive's: every one of a drive reads the same.
        let change = json!({"subscriptionId": "s1", "clientState": "secret-1",
                            "changeType": "updated", "resource": "/me/drive/root",
                            "subscriptionExpirationDateTime": "2026-11-23T00:00:00Z"});
        let body = json!({"value": [change, change]}).to_string();
        let mut credentials = Credentials::default();
        credentials.set("clientState:s1", "secret-1");
        let conn = Connection::new("int-1", Map::new(), credentials);
        let key = RouteKey::Subscription("s1".into());
        let delivery = verify(&conn, &request(&none, Some(&body)), &key, "driveItem").unwrap();
        let ids: Vec<&str> = delivery
            .notifications
            .iter()
            .map(|n| match n {
                WebhookNotification::CatchUp { id, .. } => id.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids[0], ids[1], "one delivery's changes, one catch-up");
        let again = verify(&conn, &request(&none, Some(&body)), &key, "driveItem").unwrap();
        match &again.notifications[0] {
            WebhookNotification::CatchUp { id, .. } => assert_ne!(
                id, ids[0],
                "another delivery's, another: it may come after the first's catch-up read"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            ids.iter()
                .all(|id| id.starts_with("s1_change_") && !id.contains("secret"))
        );
    }
}
