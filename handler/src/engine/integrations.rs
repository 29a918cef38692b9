//! What makes an integration registrable: checks made when it is put, so that a mistake is
//! named at once instead of failing its first sync (or, for webhooks, every delivery).

use serde_json::json;

use crate::app::App;
use crate::model::shard::types as shard_types;
use crate::model::{Integration, Shard};
use crate::store::{Op, ShardQuery};

/// Checks `integration` (the `structuredData` of `shard`) against this build's providers and
/// the integrations already registered, putting its connection settings in their canonical
/// form. The error names the field at fault; what is returned are notes on what will not work
/// yet (webhook subscriptions without `WEBHOOK_BASE_URL`).
pub async fn check(
    app: &App,
    shard: &Shard,
    integration: &mut Integration,
) -> Result<Vec<String>, String> {
    let name = &integration.provider_name;
    let provider = app.providers.get(name).ok_or_else(|| {
        format!(
            "structuredData.providerName: this build has no provider `{name}` (it has: {})",
            app.providers.names().collect::<Vec<_>>().join(", ")
        )
    })?;
    provider
        .check_connection(&mut integration.connection)
        .map_err(|e| format!("structuredData.{e}"))?;
    // A webhook names its sender by organization; two integrations on one organization would
    // leave every delivery unroutable.
    if let Some(org) = integration.connection.get("organizationId") {
        let query = ShardQuery::of_type(shard_types::INTEGRATION)
            .filter("structuredData.providerName", Op::Eq, json!(name))
            .filter(
                "structuredData.connection.organizationId",
                Op::Eq,
                org.clone(),
            );
        let found = app.store.query(&query).await.map_err(|e| e.to_string())?;
        if let Some(other) = found
            .iter()
            .find(|v| v.value.id != shard.id || v.value.tenant_id != shard.tenant_id)
        {
            return Err(format!(
                "structuredData.connection.organizationId: already connected to integration `{}` \
                 of tenant `{}`",
                other.value.id, other.value.tenant_id
            ));
        }
    }
    let mut notes = Vec::new();
    if provider.subscriptions().is_some() && app.settings.webhook_base_url.is_none() {
        notes.push(format!(
            "WEBHOOK_BASE_URL is not set: {name} change notifications cannot be subscribed to, \
             so this integration syncs on its schedule only"
        ));
    }
    Ok(notes)
}
