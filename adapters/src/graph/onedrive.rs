//! OneDrive and SharePoint document libraries through Microsoft Graph `driveItem` delta.
//!
//! One entity, `driveItem`: files and folders of one drive
//! (`/drives/{driveId}/root/delta`, or the signed-in user's with `driveId: "me"`), each a
//! record with Graph's fields (`name`, `size`, `file`, `folder`, `parentReference` with its
//! `driveId`, `driveType` and `id`, which every read gives, `lastModifiedDateTime`, `webUrl`,
//! ...). The drive's root folder itself is not a record.
//! Items with a `deleted` facet are soft-deleted; a delta read again from the start (a full
//! sync, a delta link Graph no longer keeps) enumerates every item, so what it leaves out was
//! deleted meanwhile. Change notifications subscribe to the drive's
//! root (only `updated` exists there) and ask for a catch-up.
//!
//! Write-back renames and moves items (`PATCH /drives/{driveId}/items/{id}`) under the `eTag`
//! the engine just read (`If-Match`: Graph answers 412 if the item changed since), and deletes
//! them (`DELETE`, conditional too when the write names a version; the engine's deletes name
//! none, since a shard deleted in Castiel is to go whatever became of the item). It creates none: an item is a file, and a
//! shard made in Castiel has no content to make one of.
//!
//! Connection settings: `driveId` (required) and Graph's ([`super`]). Delegated scope
//! `Files.Read.All`, or `Files.ReadWrite.All` for an integration that writes back; app-only
//! needs the application permission of the same name.

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Map, Value};

use super::Graph;
use crate::{
    Connection, ErrorCode, FetchRequest, LeftOut, Page, Provider, ProviderError, Pull, Record,
    RecordWrite, RouteKey, SubscriptionInfo, SubscriptionRequest, Subscriptions, TokenRefresh,
    WebhookDelivery, WebhookError, WebhookRequest, WebhookRoute, Webhooks, WriteBack, Written,
};
use crate::{Kept, OrGone, keep_scoped};

pub const ENTITY: &str = "driveItem";
/// Graph keeps a drive subscription for at most 42,300 minutes.
const MAX_LIFETIME_MINUTES: i64 = 42_300;
/// Graph returns at most this many items per delta page.
const MAX_PAGE_SIZE: usize = 1000;
/// What a write to an item may set; Graph sets the rest (its size, links, hashes, times).
const WRITABLE: [&str; 3] = ["name", "description", "parentReference"];

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
            graph: Graph::writing(30, "Files.Read.All", Some("Files.ReadWrite.All")),
        }
    }

    fn drive_path(conn: &Connection) -> Result<String, ProviderError> {
        match super::id_setting(conn, "driveId")? {
            "me" => Ok("/me/drive".into()),
            id => Ok(format!("/drives/{id}")),
        }
    }

    /// The URL of one item of the connection's drive.
    fn item_url(conn: &Connection, id: &str) -> Result<String, ProviderError> {
        crate::microsoft::check_id("item", id)?;
        Ok(format!(
            "{}{}/items/{id}",
            Graph::base(conn),
            Self::drive_path(conn)?
        ))
    }
}

fn check_entity(entity: &str) -> Result<(), ProviderError> {
    if entity == ENTITY {
        Ok(())
    } else {
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            format!("OneDrive syncs `{ENTITY}` records, not `{entity}`"),
        ))
    }
}

/// What of an item's `parentReference` every read gives: a delta's has no `path` (renaming
/// a folder lists none of the items under it), nor always the `name` or `siteId` that reading
/// the item alone gives. A parent is told by its `id`.
const PARENT_FIELDS: [&str; 3] = ["driveId", "driveType", "id"];

/// An item as a record, whichever read it came from: its `parentReference` keeps only
/// [`PARENT_FIELDS`], so that a write-back, which reads the item alone, does not take what a
/// delta leaves out for a change made at OneDrive.
fn record_of(item: &Map<String, Value>) -> Option<Record> {
    let id = item.get("id")?.as_str()?.to_string();
    let mut fields = item.clone();
    if let Some(Value::Object(parent)) = fields.get_mut("parentReference") {
        parent.retain(|name, _| PARENT_FIELDS.contains(&name.as_str()));
    }
    Some(Record {
        id,
        modified_at: super::parse_time(item.get("lastModifiedDateTime")),
        deleted: super::is_removed(item),
        fields,
        listed_until: None,
    })
}

/// The link the engine kept for `drive`. One kept before links named their drive is followed
/// if its path is the drive's (`/me/drive` links, whose drive no path names, as they are).
fn link_of<'a>(drive: &str, kept: &'a str) -> Result<&'a str, ProviderError> {
    match crate::kept_under(drive, kept, "delta link")? {
        Kept::Scoped(link) => Ok(link),
        Kept::Unscoped(link) if drive == "/me/drive" || link.contains(&format!("{drive}/")) => {
            Ok(link)
        }
        Kept::Unscoped(_) => Err(ProviderError::resync_required(format!(
            "the delta link reads another drive; the integration now reads `{drive}`"
        ))),
    }
}

#[async_trait]
impl Pull for OneDrive {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        check_entity(&request.entity)?;
        let drive = Self::drive_path(conn)?;
        let first = format!(
            "{}{drive}/root/delta?$top={}",
            Graph::base(conn),
            request.page_size.clamp(1, MAX_PAGE_SIZE)
        );
        let link = request
            .page_token
            .as_deref()
            .or(request.cursor.as_deref())
            .map(|kept| link_of(&drive, kept))
            .transpose()?;
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
            unreadable: Vec::new(),
            records,
            next_page: body["@odata.nextLink"]
                .as_str()
                .map(|l| keep_scoped(&drive, l)),
            query,
            stop_after: None,
            cursor: body["@odata.deltaLink"]
                .as_str()
                .map(|l| keep_scoped(&drive, l)),
        })
    }

    /// The delta's first round enumerates the whole drive.
    fn lists_everything_from_start(
        &self,
        _settings: &Map<String, Value>,
        _request: &FetchRequest,
    ) -> bool {
        true
    }

    /// Items Graph no longer serves (deleted, or in the recycle bin).
    async fn gone(
        &self,
        conn: &mut Connection,
        entity: &str,
        ids: Vec<String>,
    ) -> Result<LeftOut, ProviderError> {
        crate::gone_unless_found(self, conn, entity, ids, 1).await
    }

    /// The item's `eTag`, which changes with any change to it.
    fn version_of(&self, record: &Record) -> Option<String> {
        record.fields.get("eTag")?.as_str().map(str::to_string)
    }

    async fn fetch_by_ids(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
        ids: &[String],
    ) -> Result<Vec<Record>, ProviderError> {
        check_entity(&request.entity)?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let url = Self::item_url(conn, id)?;
            // Gone when deleted (or in the recycle bin, which Graph does not serve either).
            let item = self
                .graph
                .send(conn, Method::GET, &url, None)
                .await
                .or_gone()?;
            if let Some(Value::Object(item)) = item {
                records.extend(record_of(&item));
            }
        }
        Ok(records)
    }
}

/// Renames and moves items under the version the engine read, and deletes them.
#[async_trait]
impl WriteBack for OneDrive {
    fn writable_fields(&self, _entity: &str) -> Option<&'static [&'static str]> {
        Some(&WRITABLE)
    }

    async fn create(
        &self,
        _conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        check_entity(&write.entity)?;
        Err(ProviderError::new(
            ErrorCode::ValidationError,
            "OneDrive items are files: a shard made in Castiel has no content to create one \
             from (items synced from the drive are renamed, moved and deleted)",
        ))
    }

    async fn update(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<Written, ProviderError> {
        check_entity(&write.entity)?;
        write.check_writable(&WRITABLE, "a OneDrive item")?;
        let id = write.external_id.as_deref().unwrap_or_default();
        let url = Self::item_url(conn, id)?;
        let headers = if_match(write);
        let body = Value::Object(write.fields.clone());
        let item = self
            .graph
            .send_with(conn, Method::PATCH, &url, &headers, Some(&body))
            .await?;
        Ok(Written {
            external_id: id.to_string(),
            version: item["eTag"].as_str().map(str::to_string),
        })
    }

    async fn delete(
        &self,
        conn: &mut Connection,
        write: &RecordWrite,
    ) -> Result<(), ProviderError> {
        check_entity(&write.entity)?;
        // Without an id, the record a create of the shard made: OneDrive's write-back makes
        // none.
        let Some(id) = write.external_id.as_deref() else {
            return Ok(());
        };
        let url = Self::item_url(conn, id)?;
        let headers = if_match(write);
        self.graph
            .send_with(conn, Method::DELETE, &url, &headers, None)
            .await
            .or_gone()
            .map(drop)
    }
}

/// The write's condition: the item still has the `eTag` the engine read, if it read one.
fn if_match(write: &RecordWrite) -> Vec<(&'static str, String)> {
    write
        .expected_version
        .iter()
        .map(|etag| ("If-Match", etag.clone()))
        .collect()
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

    fn write_back(&self) -> Option<&dyn WriteBack> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_link_is_followed_only_in_the_drive_it_was_read_from() {
        let link = "https://graph.microsoft.com/v1.0/drives/b!1/root/delta?token=abc";
        let kept = keep_scoped("/drives/b!1", link);
        assert_eq!(link_of("/drives/b!1", &kept).unwrap(), link);
        assert!(link_of("/drives/b!2", &kept).unwrap_err().resync);
        // Links kept before links named their drive.
        assert_eq!(link_of("/drives/b!1", link).unwrap(), link);
        assert!(link_of("/drives/b!2", link).unwrap_err().resync);
    }

    #[tokio::test]
    async fn an_item_to_delete_that_no_link_names_was_never_made() {
        let mut conn = Connection::new("int-1", Map::new(), crate::Credentials::new(Map::new()));
        let write = RecordWrite::unlinked_delete(ENTITY);
        OneDrive::new().delete(&mut conn, &write).await.unwrap();
    }

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
