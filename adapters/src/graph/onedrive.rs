//! OneDrive and SharePoint document libraries through Microsoft Graph `driveItem` delta.
//!
//! One entity, `driveItem`: files and folders of one drive
//! (`/drives/{driveId}/root/delta`, or the signed-in user's with `driveId: "me"`), each a
//! record with Graph's fields (`name`, `size`, `file`, `folder`, `parentReference`,
//! `lastModifiedDateTime`, `webUrl`, ...). The drive's root folder itself is not a record.
//! Items with a `deleted` facet are soft-deleted. Change notifications subscribe to the drive's
//! root (only `updated` exists there) and ask for a catch-up.
//!
//! Connection settings: `driveId` (required) and Graph's ([`super`]). Delegated scope
//! `Files.Read.All`; app-only needs the `Files.Read.All` application permission.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Map, Value};

use super::Graph;
use crate::{
    Connection, ErrorCode, FetchRequest, Page, Provider, ProviderError, Pull, Record, RouteKey,
    SubscriptionInfo, SubscriptionRequest, Subscriptions, TokenRefresh, WebhookDelivery,
    WebhookError, WebhookRequest, WebhookRoute, Webhooks,
};

pub const ENTITY: &str = "driveItem";
/// Graph keeps a drive subscription for at most 42,300 minutes.
const MAX_LIFETIME_MINUTES: i64 = 42_300;
/// Graph returns at most this many items per delta page.
const MAX_PAGE_SIZE: usize = 1000;

pub struct OneDrive {
    graph: Graph,
}

impl Default for OneDrive {
    fn default() -> Self {
        Self::new()
    }
}

impl OneDrive {
    pub fn new() -> Self {
        Self {
            graph: Graph::new(30, "Files.Read.All"),
        }
    }

    fn drive_path(conn: &Connection) -> Result<String, ProviderError> {
        match super::id_setting(conn, "driveId")? {
            "me" => Ok("/me/drive".into()),
            id => Ok(format!("/drives/{id}")),
        }
    }
}

fn check_entity(request: &FetchRequest) -> Result<(), ProviderError> {
    if request.entity == ENTITY {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!(
                "OneDrive syncs `{ENTITY}` records, not `{}`",
                request.entity
            ),
        ))
    }
}

fn record_of(item: &Map<String, Value>) -> Option<Record> {
    let id = item.get("id")?.as_str()?.to_string();
    Some(Record {
        id,
        modified_at: super::parse_time(item.get("lastModifiedDateTime")),
        deleted: super::is_removed(item),
        fields: item.clone(),
    })
}

#[async_trait]
impl Pull for OneDrive {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        check_entity(request)?;
        let first = format!(
            "{}{}/root/delta?$top={}",
            Graph::base(conn),
            Self::drive_path(conn)?,
            request.page_size.clamp(1, MAX_PAGE_SIZE)
        );
        let link = request.page_token.as_deref().or(request.cursor.as_deref());
        let query = link
            .is_none()
            .then(|| format!("GET {}", &first[Graph::base(conn).len()..]));
        let url = super::next_url(link, || first);
        let body = self.graph.send(conn, Method::GET, &url, None).await?;
        let records = super::items(&body)
            .filter(|item| !item.contains_key("root"))
            .filter_map(record_of)
            .collect();
        Ok(Page {
            records,
            next_page: body["@odata.nextLink"].as_str().map(str::to_string),
            query,
            stop_after: None,
            cursor: body["@odata.deltaLink"].as_str().map(str::to_string),
        })
    }
}

#[async_trait]
impl TokenRefresh for OneDrive {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.graph.refresh(conn).await
    }
}

#[async_trait]
impl Webhooks for OneDrive {
    fn route(&self, request: &WebhookRequest<'_>) -> Result<WebhookRoute, WebhookError> {
        super::route(request)
    }

    async fn verify(
        &self,
        conn: &Connection,
        request: &WebhookRequest<'_>,
        key: &RouteKey,
    ) -> Result<WebhookDelivery, WebhookError> {
        super::verify(conn, request, key, ENTITY)
    }
}

#[async_trait]
impl Subscriptions for OneDrive {
    fn resources(&self, settings: &Map<String, Value>, _entities: &[String]) -> Vec<String> {
        match settings.get("driveId").and_then(Value::as_str) {
            Some("me") => vec!["/me/drive/root".into()],
            Some(id) => vec![format!("/drives/{id}/root")],
            None => Vec::new(),
        }
    }

    fn max_lifetime(&self, _resource: &str) -> Duration {
        Duration::minutes(MAX_LIFETIME_MINUTES)
    }

    async fn subscribe(
        &self,
        conn: &mut Connection,
        request: &SubscriptionRequest,
    ) -> Result<SubscriptionInfo, ProviderError> {
        self.graph.subscribe(conn, request, "updated").await
    }

    async fn renew(
        &self,
        conn: &mut Connection,
        subscription: &SubscriptionInfo,
        expires_at: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, ProviderError> {
        self.graph.renew(conn, &subscription.id, expires_at).await
    }

    async fn unsubscribe(
        &self,
        conn: &mut Connection,
        subscription: &SubscriptionInfo,
    ) -> Result<(), ProviderError> {
        self.graph.unsubscribe(conn, &subscription.id).await
    }
}

impl Provider for OneDrive {
    fn name(&self) -> &'static str {
        "onedrive"
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        super::check_connection(settings)?;
        match settings.get("driveId").and_then(Value::as_str) {
            Some(id) if crate::microsoft::check_id("drive", id).is_ok() => Ok(()),
            _ => Err("connection.driveId is required: a drive id, or `me`".into()),
        }
    }

    fn token_refresh(&self) -> Option<&dyn TokenRefresh> {
        Some(self)
    }

    fn webhooks(&self) -> Option<&dyn Webhooks> {
        Some(self)
    }

    fn subscriptions(&self) -> Option<&dyn Subscriptions> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn items_become_records_and_deleted_ones_deletions() {
        let body = json!({"value": [
            {"id": "root", "name": "root", "root": {}, "folder": {"childCount": 1}},
            {"id": "f1", "name": "a.txt", "file": {}, "lastModifiedDateTime": "2026-11-22T07:00:00Z"},
            {"id": "f2", "deleted": {"state": "deleted"}}
        ]});
        let records: Vec<Record> = super::super::items(&body)
            .filter(|i| !i.contains_key("root"))
            .filter_map(record_of)
            .collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].fields["name"], "a.txt");
        assert!(records[0].modified_at.is_some() && !records[0].deleted);
        assert!(records[1].deleted);
    }

    #[test]
    fn the_drive_is_required_and_subscribed_at_its_root() {
        let onedrive = OneDrive::new();
        let mut missing = json!({"tenantId": "t"}).as_object().unwrap().clone();
        assert!(
            onedrive
                .check_connection(&mut missing)
                .unwrap_err()
                .starts_with("connection.driveId")
        );
        let mut ok = json!({"tenantId": "t", "driveId": "b!x-1"})
            .as_object()
            .unwrap()
            .clone();
        onedrive.check_connection(&mut ok).unwrap();
        assert_eq!(onedrive.resources(&ok, &[]), ["/drives/b!x-1/root"]);
    }
}
