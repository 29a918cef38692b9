//! Timer triggers of the embedded runtime, fired on the NCRONTAB schedules of the
//! function.json files.
//!
//! Like the host's schedule monitor, each timer's last and next occurrence is kept (in the
//! runtime database), so after a restart an occurrence that was missed while the runtime was
//! down fires once at start-up with `IsPastDue: true`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;

use super::envelopes::{self, ScheduleStatus};
use super::invoker::{Invoker, Outcome};
use crate::definition::FunctionName;
use crate::model::timestamp;
use crate::ncrontab::Ncrontab;
use crate::store::sqlite_open;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS timer_status (
    function     TEXT PRIMARY KEY,
    last         TEXT,
    next         TEXT NOT NULL,
    last_updated TEXT NOT NULL
);
";

/// The persisted schedule status of every timer.
#[derive(Clone)]
pub struct TimerStatusStore {
    conn: Arc<Mutex<Connection>>,
}

impl TimerStatusStore {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        Ok(Self {
            conn: Arc::new(Mutex::new(sqlite_open(path, SCHEMA)?)),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, function: FunctionName) -> rusqlite::Result<Option<ScheduleStatus>> {
        let row: Option<(Option<String>, String, String)> = self
            .conn()
            .query_row(
                "SELECT last, next, last_updated FROM timer_status WHERE function = ?1",
                [function.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let parse = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| d.with_timezone(&Utc))
        };
        Ok(row.and_then(|(last, next, updated)| {
            Some(ScheduleStatus {
                last: last.as_deref().and_then(parse),
                next: parse(&next)?,
                last_updated: parse(&updated)?,
            })
        }))
    }

    pub fn set(&self, function: FunctionName, status: &ScheduleStatus) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO timer_status (function, last, next, last_updated) VALUES (?1, ?2, ?3, ?4)",
            params![
                function.as_str(),
                status.last.as_ref().map(timestamp::format),
                timestamp::format(&status.next),
                timestamp::format(&status.last_updated)
            ],
        )?;
        Ok(())
    }
}

pub struct Timer {
    pub function: FunctionName,
    pub binding: String,
    pub schedule: Ncrontab,
}

impl Timer {
    pub async fn run(
        self,
        statuses: TimerStatusStore,
        invoker: Invoker,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let now = Utc::now();
        let stored = statuses.get(self.function).unwrap_or_else(|e| {
            tracing::warn!(function = %self.function, error = %e, "timer status unreadable; starting afresh");
            None
        });
        let mut last = stored.and_then(|s| s.last);
        if let Some(missed) = stored.map(|s| s.next).filter(|next| *next <= now) {
            tracing::info!(function = %self.function, %missed, "timer occurrence missed while stopped; firing now");
            last = self
                .fire(&statuses, &invoker, last, now, true)
                .await
                .or(last);
        }
        loop {
            let Some(next) = self.schedule.next_after(Utc::now()) else {
                tracing::warn!(function = %self.function, "schedule has no further occurrences");
                return;
            };
            if let Err(e) = statuses.set(
                self.function,
                &ScheduleStatus {
                    last,
                    next,
                    last_updated: Utc::now(),
                },
            ) {
                tracing::warn!(function = %self.function, error = %e, "could not save timer status");
            }
            let wait = (next - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {},
                _ = shutdown.changed() => return,
            }
            last = self
                .fire(&statuses, &invoker, last, next, false)
                .await
                .or(last);
        }
    }

    /// Invokes the function for the occurrence `at`; returns `at` as the new last occurrence.
    async fn fire(
        &self,
        statuses: &TimerStatusStore,
        invoker: &Invoker,
        last: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
        is_past_due: bool,
    ) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let next = self.schedule.next_after(at.max(now))?;
        let status = ScheduleStatus {
            last,
            next,
            last_updated: now,
        };
        let envelope = envelopes::timer(self.function, &self.binding, status, is_past_due, now);
        match invoker.invoke(self.function, &envelope).await {
            Outcome::Succeeded(_) => {
                tracing::debug!(function = %self.function, "timer invocation succeeded")
            }
            Outcome::Failed(reason) => {
                tracing::warn!(function = %self.function, %reason, "timer invocation failed")
            }
        }
        let status = ScheduleStatus {
            last: Some(at),
            next,
            last_updated: Utc::now(),
        };
        if let Err(e) = statuses.set(self.function, &status) {
            tracing::warn!(function = %self.function, error = %e, "could not save timer status");
        }
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn schedule_status_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runtime.db");
        let t = |m| Utc.with_ymd_and_hms(2026, 1, 1, 10, m, 0).unwrap();
        let status = ScheduleStatus {
            last: Some(t(1)),
            next: t(2),
            last_updated: t(1),
        };
        TimerStatusStore::open(&path)
            .unwrap()
            .set(FunctionName::SyncScheduler, &status)
            .unwrap();
        let reopened = TimerStatusStore::open(&path).unwrap();
        assert_eq!(
            reopened.get(FunctionName::SyncScheduler).unwrap(),
            Some(status)
        );
        assert_eq!(reopened.get(FunctionName::TokenRefresher).unwrap(), None);
    }
}
