//! TokenRefresher: each hour, finds OAuth credentials about to expire and refreshes them.

use chrono::{Duration, Utc};
use serde_json::json;

use super::InvocationError;
use crate::app::App;
use crate::engine::{Transient, publish};
use crate::model::event::types as events;
use crate::model::shard::types as shard_types;
use crate::model::{Event, timestamp};
use crate::protocol::{InvocationResponse, TimerInfo};
use crate::store::{Op, ShardQuery};

pub async fn run(app: &App, _timer: TimerInfo) -> Result<InvocationResponse, InvocationError> {
    if !app.settings.token_refresh_enabled {
        return Ok(InvocationResponse::new().log("token refresh is disabled"));
    }
    let now = Utc::now();
    let threshold =
        now + Duration::from_std(app.settings.token_refresh_threshold).unwrap_or_default();
    let expiring = app
        .store
        .query(
            &ShardQuery::of_type(shard_types::INTEGRATION)
                .filter("structuredData.status", Op::Eq, json!("active"))
                .filter(
                    "structuredData.credentialsExpireAt",
                    Op::Le,
                    timestamp::query_value(&threshold),
                ),
        )
        .await
        .map_err(Transient::from)?;
    let mut batch = vec![Event::new(
        events::TOKEN_CHECK_EXPIRING,
        "/integrations",
        now,
        json!({"timestamp": now, "thresholdTime": threshold}),
    )];
    for stored in &expiring {
        let shard = &stored.value;
        let provider = shard.structured_data["providerName"]
            .as_str()
            .unwrap_or_default();
        let error = match app.providers.get(provider) {
            None => format!("this build has no adapter for provider `{provider}`"),
            Some(_) => format!("provider `{provider}` has no token refresh in this build"),
        };
        tracing::warn!(tenant_id = %shard.tenant_id, integration_id = %shard.id, %error, "credentials expire soon and cannot be refreshed");
        batch.push(Event::new(
            events::TOKEN_REFRESH_FAILED,
            format!("/tenants/{}/integrations/{}", shard.tenant_id, shard.id),
            now,
            json!({"connectionId": shard.id, "integrationId": shard.id, "tenantId": shard.tenant_id,
                   "error": error, "failedAt": now}),
        ));
    }
    publish(app, &batch).await;
    Ok(InvocationResponse::new().log(format!(
        "{} integrations have credentials expiring",
        expiring.len()
    )))
}
