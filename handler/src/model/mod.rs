//! Castiel's documents and the engine's messages, as plain data.
//!
//! Everything here is serde types and pure functions over them: no I/O. The JSON field names
//! are Castiel's (camelCase, with `external_relationships` in snake case as the platform spells
//! it), so a document written by the engine reads the same in every other Castiel service.
//! An integration's entity mappings and deduplication rules are part of its document, so how
//! they turn a record into shard data ([`mapping`], [`dedup`]) lives here too.

pub mod conflict;
pub mod dedup;
pub mod digest;
pub mod event;
pub mod history;
pub mod integration;
pub mod listing;
pub mod mapping;
pub mod messages;
pub mod shard;
pub mod timestamp;

pub use event::Event;
pub use history::{IntegrationSync, SyncError, SyncStats, SyncStatus, history_shard_id};
pub use integration::{Integration, SyncFrequency};
pub use messages::{SyncJobMessage, WriteBackMessage};
pub use shard::Shard;
