//! Microsoft Teams channel messages through Microsoft Graph
//! (`/teams/{teamId}/channels/{channelId}/messages/delta`).
//!
//! One entity, `channelMessage`: the root posts of the configured channels (`$top` 50, Graph's
//! most) with their replies (`$expand=replies`), each post and each reply a record with Graph's
//! chatMessage fields (`body`, `from`, `createdDateTime`, `replyToId`, `channelIdentity`, ...).
//! A message deleted in Teams keeps coming back with `deletedDateTime` set: it is soft-deleted.
//!
//! Several channels make one entity, so its cursor holds one delta link per channel (a JSON
//! object, channel id → delta link) and its page token says which channel is being read. Graph
//! allows polling a channel's delta about once a day; change notifications, which ask for a
//! catch-up, are what keeps a Teams integration current.
//!
//! Connection settings: `teamId` and `channelIds` (required) and Graph's ([`super`]). Delegated
//! scope `ChannelMessage.Read.All`; app-only needs the `ChannelMessage.Read.All` application
//! permission (a protected API that Microsoft must approve).

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Graph;
use crate::{
    Connection, ErrorCode, FetchRequest, Page, Provider, ProviderError, Pull, Record, RouteKey,
    SubscriptionInfo, SubscriptionRequest, Subscriptions, TokenRefresh, Unreadable,
    WebhookDelivery, WebhookError, WebhookRequest, WebhookRoute, Webhooks,
};

pub const ENTITY: &str = "channelMessage";
/// Graph keeps a chatMessage subscription for at most three days.
const MAX_LIFETIME_MINUTES: i64 = 4320;
/// Graph's largest page of channel messages.
const MAX_PAGE_SIZE: usize = 50;

pub struct Teams {
    graph: Graph,
}

impl Default for Teams {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a sync of the entity stands: which channel (its place in `channelIds`, and its id),
/// and the link to its next page.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Position {
    channel: usize,
    /// The channel's id, so that a page token kept across jobs is not read as another
    /// channel's once `channelIds` changed (a token kept before it was written has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

impl Position {
    fn at(channels: &[String], channel: usize, next: Option<String>) -> Self {
        Self {
            channel,
            id: channels.get(channel).cloned(),
            next,
        }
    }

    /// The channel this position is in: a list changed since (the channel moved, or is no
    /// longer synced) is [`ErrorCode::NotFound`], and the entity is read again from its
    /// cursor, whose delta links are kept by channel id.
    fn channel<'c>(&self, channels: &'c [String]) -> Result<&'c String, ProviderError> {
        channels
            .get(self.channel)
            .filter(|c| self.id.as_ref().is_none_or(|id| id == *c))
            .ok_or_else(|| {
                ProviderError::new(ErrorCode::NotFound, "the channel list changed mid-sync")
            })
    }
}

/// The entity's cursor: a delta link per channel.
type Cursor = Map<String, Value>;

fn parse_cursor(cursor: Option<&str>) -> Result<Cursor, ProviderError> {
    match cursor {
        None => Ok(Cursor::new()),
        Some(text) => serde_json::from_str(text).map_err(|_| {
            ProviderError::resync_required("the Teams cursor is not a map of delta links")
        }),
    }
}

impl Teams {
    pub fn new() -> Self {
        Self {
            // Teams allows 4 requests a second on one team or channel.
            graph: Graph::new(4, "ChannelMessage.Read.All"),
        }
    }

    fn channels(conn: &Connection) -> Result<Vec<String>, ProviderError> {
        let channels: Vec<String> = conn
            .settings
            .get("channelIds")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if channels.is_empty() {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                "the connection has no channelIds",
            ));
        }
        for id in &channels {
            crate::microsoft::check_id("channel", id)?;
        }
        Ok(channels)
    }
}

fn records_of(item: &Map<String, Value>, out: &mut Vec<Record>) {
    let Some(id) = item.get("id").and_then(Value::as_str) else {
        return;
    };
    let deleted =
        super::is_removed(item) || item.get("deletedDateTime").is_some_and(|d| !d.is_null());
    let mut fields = item.clone();
    let replies = fields.remove("replies");
    out.push(Record {
        id: id.to_string(),
        modified_at: super::parse_time(item.get("lastModifiedDateTime")),
        deleted,
        fields,
        listed_until: None,
    });
    for reply in replies.iter().flat_map(|r| r.as_array()).flatten() {
        if let Some(reply) = reply.as_object() {
            records_of(reply, out);
        }
    }
}

#[async_trait]
impl Pull for Teams {
    async fn fetch_page(
        &self,
        conn: &mut Connection,
        request: &FetchRequest,
    ) -> Result<Page, ProviderError> {
        if request.entity != ENTITY {
            return Err(ProviderError::new(
                ErrorCode::ValidationError,
                format!("Teams syncs `{ENTITY}` records, not `{}`", request.entity),
            ));
        }
        let team = super::id_setting(conn, "teamId")?.to_string();
        let channels = Self::channels(conn)?;
        let started = parse_cursor(request.cursor.as_deref())?;
        let position: Position = match &request.page_token {
            Some(token) => serde_json::from_str(token).map_err(|_| {
                ProviderError::new(ErrorCode::ValidationError, "unreadable Teams page token")
            })?,
            None => Position::default(),
        };
        let channel = position.channel(&channels)?;
        let base = Graph::base(conn).to_string();
        let link = position.next.clone().or_else(|| {
            started
                .get(channel)
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let query = (link.is_none() && position.channel == 0).then(|| {
            format!("GET /teams/{team}/channels/{{channelIds}}/messages/delta?$expand=replies")
        });
        let url = super::next_url(link.as_deref(), || {
            format!(
                "{base}/teams/{team}/channels/{channel}/messages/delta?$top={}&$expand=replies",
                request.page_size.clamp(1, MAX_PAGE_SIZE)
            )
        });
        let following = (position.channel + 1 < channels.len())
            .then(|| Position::at(&channels, position.channel + 1, None));
        let body = match self.graph.send(conn, Method::GET, &url, None).await {
            Ok(body) => body,
            // A channel deleted from the team is reported and passed over: the others are still
            // synced, and it is asked for again next time. (A refusal, 403, is the app's
            // permission, which the integration's status must show.)
            Err(e) if !e.resync && e.code == ErrorCode::NotFound => {
                return Ok(Page {
                    unreadable: vec![Unreadable {
                        record_id: None,
                        message: format!("channel `{channel}`: {}", e.message),
                    }],
                    records: Vec::new(),
                    next_page: following.map(|p| serde_json::to_string(&p).unwrap_or_default()),
                    query,
                    stop_after: None,
                    cursor: None,
                });
            }
            Err(e) => return Err(e),
        };
        let mut records = Vec::new();
        for item in super::items(&body) {
            records_of(item, &mut records);
        }
        let (next, cursor) = match body["@odata.nextLink"].as_str() {
            Some(next) => (
                Some(Position::at(
                    &channels,
                    position.channel,
                    Some(next.to_string()),
                )),
                None,
            ),
            None => {
                let done = Cursor::from_iter(
                    body["@odata.deltaLink"]
                        .as_str()
                        .map(|delta| (channel.clone(), Value::String(delta.to_string()))),
                );
                (following, Some(Value::Object(done).to_string()))
            }
        };
        Ok(Page {
            unreadable: Vec::new(),
            records,
            next_page: next.map(|p| serde_json::to_string(&p).unwrap_or_default()),
            query,
            stop_after: None,
            cursor,
        })
    }

    /// The union of the channels' delta links, the later one's winning for a channel.
    fn newer_cursor(&self, earlier: String, later: String) -> String {
        match (parse_cursor(Some(&earlier)), parse_cursor(Some(&later))) {
            (Ok(mut merged), Ok(newer)) => {
                merged.extend(newer);
                Value::Object(merged).to_string()
            }
            _ => later,
        }
    }
}

#[async_trait]
impl TokenRefresh for Teams {
    async fn refresh_token(
        &self,
        conn: &mut Connection,
    ) -> Result<Option<DateTime<Utc>>, ProviderError> {
        self.graph.refresh(conn).await
    }
}

#[async_trait]
impl Webhooks for Teams {
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
impl Subscriptions for Teams {
    fn resources(&self, settings: &Map<String, Value>, _entities: &[String]) -> Vec<String> {
        let Some(team) = settings.get("teamId").and_then(Value::as_str) else {
            return Vec::new();
        };
        settings
            .get("channelIds")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|channel| format!("/teams/{team}/channels/{channel}/messages"))
            .collect()
    }

    fn max_lifetime(&self, _resource: &str) -> Duration {
        Duration::minutes(MAX_LIFETIME_MINUTES)
    }

    async fn subscribe(
        &self,
        conn: &mut Connection,
        request: &SubscriptionRequest,
    ) -> Result<SubscriptionInfo, ProviderError> {
        self.graph
            .subscribe(conn, request, "created,updated,deleted")
            .await
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

impl Provider for Teams {
    fn name(&self) -> &'static str {
        "teams"
    }

    fn check_connection(&self, settings: &mut Map<String, Value>) -> Result<(), String> {
        super::check_connection(settings)?;
        let id_ok = |v: &Value| {
            v.as_str()
                .is_some_and(|id| crate::microsoft::check_id("", id).is_ok())
        };
        if !settings.get("teamId").is_some_and(id_ok) {
            return Err("connection.teamId is required: the team's group id".into());
        }
        match settings.get("channelIds").and_then(Value::as_array) {
            Some(ids) if !ids.is_empty() && ids.iter().all(id_ok) => Ok(()),
            _ => Err(
                "connection.channelIds must list the channels to sync (`19:...@thread.tacv2`)"
                    .into(),
            ),
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
    fn posts_and_their_replies_are_records_and_deleted_posts_deletions() {
        let body = json!({"value": [
            {"id": "1", "lastModifiedDateTime": "2026-11-22T07:00:00Z", "deletedDateTime": null,
             "body": {"content": "hello"}, "replies": [
                {"id": "2", "replyToId": "1", "deletedDateTime": null, "body": {"content": "hi"}}
             ]},
            {"id": "3", "deletedDateTime": "2026-11-22T07:05:00Z", "body": {"content": ""}}
        ]});
        let mut records = Vec::new();
        for item in super::super::items(&body) {
            records_of(item, &mut records);
        }
        let ids: Vec<_> = records.iter().map(|r| (r.id.as_str(), r.deleted)).collect();
        assert_eq!(ids, [("1", false), ("2", false), ("3", true)]);
        assert!(!records[0].fields.contains_key("replies"));
    }

    #[test]
    fn a_page_token_names_its_channel_so_a_changed_channel_list_restarts_the_read() {
        let before = ["19:a".to_string(), "19:b".to_string()];
        let token = serde_json::to_string(&Position::at(&before, 1, Some("next".into()))).unwrap();
        let kept: Position = serde_json::from_str(&token).unwrap();
        assert_eq!(kept.channel(&before).unwrap(), "19:b");
        // 19:a is no longer synced: place 1 is now nobody, or another channel.
        let after = ["19:b".to_string()];
        assert_eq!(kept.channel(&after).unwrap_err().code, ErrorCode::NotFound);
        let moved = ["19:b".to_string(), "19:c".to_string()];
        assert_eq!(kept.channel(&moved).unwrap_err().code, ErrorCode::NotFound);
        // A token kept before channels were named in it goes by place.
        let old: Position = serde_json::from_str(r#"{"channel":1,"next":"n"}"#).unwrap();
        assert_eq!(old.channel(&moved).unwrap(), "19:c");
    }

    #[test]
    fn the_cursor_keeps_a_delta_link_per_channel() {
        let teams = Teams::new();
        let merged = teams.newer_cursor(
            json!({"19:a": "https://g/a?$deltatoken=1", "19:b": "https://g/b?$deltatoken=1"})
                .to_string(),
            json!({"19:a": "https://g/a?$deltatoken=2"}).to_string(),
        );
        let merged: Value = serde_json::from_str(&merged).unwrap();
        assert_eq!(
            merged,
            json!({"19:a": "https://g/a?$deltatoken=2", "19:b": "https://g/b?$deltatoken=1"})
        );
        assert!(
            parse_cursor(Some("2026-01-01T00:00:00Z"))
                .unwrap_err()
                .resync
        );
    }

    #[test]
    fn channels_are_required_and_each_subscribed() {
        let teams = Teams::new();
        let mut ok = json!({"tenantId": "t", "teamId": "fbe2bf47-16c8-47cf-b4a5-4b9b187c508b",
                            "channelIds": ["19:4a95f7d8db4c4e7fae857bcebe0623e6@thread.tacv2"]})
        .as_object()
        .unwrap()
        .clone();
        teams.check_connection(&mut ok).unwrap();
        assert_eq!(
            teams.resources(&ok, &[]),
            [
                "/teams/fbe2bf47-16c8-47cf-b4a5-4b9b187c508b/channels/19:4a95f7d8db4c4e7fae857bcebe0623e6@thread.tacv2/messages"
            ]
        );
        let mut none = json!({"tenantId": "t", "teamId": "x", "channelIds": []})
            .as_object()
            .unwrap()
            .clone();
        assert!(
            teams
                .check_connection(&mut none)
                .unwrap_err()
                .starts_with("connection.channelIds")
        );
    }
}
