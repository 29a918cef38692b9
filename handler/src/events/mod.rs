//! Publishing the engine's events.
//!
//! In Azure events go to an Event Grid topic; on one machine they are appended to a JSON Lines
//! file ([`FileEvents`]) that `tail -f` can follow. Publishing is best effort from the
//! functions' point of view: a sync that succeeded is not failed because its event could not be
//! published, but the failure is logged.

mod event_grid;
mod file;

pub use event_grid::{EventGridAuth, EventGridPublisher, Schema, batches, event_grid_schema};
pub use file::FileEvents;

use async_trait::async_trait;

use crate::model::Event;

#[derive(Debug, thiserror::Error)]
#[error("event publishing failed: {0}")]
pub struct EventsError(pub String);

#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, events: &[Event]) -> Result<(), EventsError>;
}
