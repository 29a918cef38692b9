//! [`EventSink`] as an append-only JSON Lines file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{EventSink, EventsError};
use crate::model::Event;

#[derive(Clone)]
pub struct FileEvents {
    path: PathBuf,
    write_lock: Arc<Mutex<()>>,
}

impl FileEvents {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            write_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Every event in the log, oldest first; unreadable lines are skipped.
    pub fn read_all(path: &Path) -> std::io::Result<Vec<Event>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl EventSink for FileEvents {
    async fn publish(&self, events: &[Event]) -> Result<(), EventsError> {
        let mut text = Vec::new();
        for event in events {
            serde_json::to_writer(&mut text, event).map_err(|e| EventsError(e.to_string()))?;
            text.push(b'\n');
        }
        let _guard = self.write_lock.lock().await;
        // One write of whole lines to an O_APPEND file: lines from two processes never interleave.
        // Events name tenants' records: the log is its owner's alone, as the data directory is.
        std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().create(true).append(true),
            0o600,
        )
        .open(&self.path)
        .and_then(|mut f| f.write_all(&text))
        .map_err(|e| EventsError(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    #[tokio::test]
    async fn events_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let sink = FileEvents::new(&path);
        let a = Event::new(
            "integration.sync.started",
            "/integrations/i1",
            "job-1#1",
            Utc::now(),
            json!({"n": 1}),
        );
        let b = Event::new(
            "integration.sync.completed",
            "/integrations/i1",
            "job-1",
            Utc::now(),
            json!({"n": 2}),
        );
        sink.publish(std::slice::from_ref(&a)).await.unwrap();
        sink.publish(std::slice::from_ref(&b)).await.unwrap();
        assert_eq!(FileEvents::read_all(&path).unwrap(), vec![a, b]);
    }
}
