//! Read-modify-write of an integration's state under its etag.
//!
//! The scheduler, a running job's checkpoints and an operator's `put` all write the same
//! `c_integration` shard. Each applies its change to the freshly read document and replaces
//! it only if nobody wrote in between; on a conflict it reads again and reapplies, so no
//! writer's change is lost and none overwrites another's.

use chrono::{DateTime, Utc};

use crate::app::App;
use crate::model::Integration;
use crate::store::StoreError;

const MAX_CONFLICTS: usize = 20;

/// Applies `change` to the integration and saves it. `change` returns `false` to leave the
/// document as it is. Returns the integration as saved (or found).
pub async fn update_integration(
    app: &App,
    tenant_id: &str,
    integration_id: &str,
    now: DateTime<Utc>,
    mut change: impl FnMut(&mut Integration) -> bool,
) -> Result<Integration, StoreError> {
    for _ in 0..MAX_CONFLICTS {
        let stored = app
            .store
            .get(tenant_id, integration_id)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("integration `{integration_id}` disappeared"))
            })?;
        let mut shard = stored.value;
        let mut integration: Integration = shard
            .data()
            .map_err(|e| StoreError::Corrupt(format!("integration `{integration_id}`: {e}")))?;
        if !change(&mut integration) {
            return Ok(integration);
        }
        shard.structured_data =
            serde_json::to_value(&integration).expect("an integration serializes");
        shard.updated_at = Some(now);
        match app.store.replace(&shard, &stored.etag).await {
            Ok(_) => return Ok(integration),
            Err(StoreError::PreconditionFailed) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Unavailable(format!(
        "integration `{integration_id}` kept changing while being updated"
    )))
}
