//! [`LocalBroker`]: durable queues in SQLite with the Service Bus semantics the app relies on.
//!
//! * Peek-lock: a receive locks a message for the queue's lock duration and adds one to its
//!   DeliveryCount; `complete` removes it, `abandon` releases it for redelivery.
//! * Dead-lettering: an unlocked message that has been delivered maxDeliveryCount times moves
//!   to the queue's dead-letter subqueue with reason `MaxDeliveryCountExceeded`; an expired one
//!   with `TTLExpiredException`.
//! * Scheduled enqueue: a message is invisible until its scheduled time.
//! * Duplicate detection: a MessageId seen on the same queue within the window is dropped.
//!   A MessageId longer than Service Bus takes is shortened as for Service Bus
//!   ([`super::broker_message_id`]).
//! * Sessions: on a session queue, a session's messages are delivered one at a time in send
//!   order; a failing message blocks its session until it is dead-lettered.
//!
//! Every state change is one SQLite transaction, so a crash at any point leaves each message
//! either delivered-and-settled or still in the queue. After a crash the runtime calls
//! [`LocalBroker::release_locks`]: the data directory has a single consumer, so locks held by a
//! dead process can be released at once instead of waiting for them to expire; the
//! DeliveryCount they took is kept, as Service Bus keeps it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::{
    MAX_DELIVERY_COUNT_EXCEEDED, MessageQueue, OutgoingMessage, QueueError, QueueSettings,
    queue_settings,
};
use crate::store::sqlite_open;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq                     INTEGER PRIMARY KEY AUTOINCREMENT,
    queue                   TEXT NOT NULL,
    message_id              TEXT NOT NULL,
    session_id              TEXT,
    correlation_id          TEXT,
    content_type            TEXT,
    properties              TEXT NOT NULL,
    body                    BLOB NOT NULL,
    enqueued_at             INTEGER NOT NULL,
    visible_at              INTEGER NOT NULL,
    expires_at              INTEGER NOT NULL,
    delivery_count          INTEGER NOT NULL DEFAULT 0,
    locked_until            INTEGER,
    lock_token              TEXT,
    dead_lettered           INTEGER NOT NULL DEFAULT 0,
    dead_letter_reason      TEXT,
    dead_letter_description TEXT,
    dead_lettered_at        INTEGER
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, dead_lettered, visible_at, seq);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (queue, session_id, seq);
CREATE TABLE IF NOT EXISTS duplicate_detection (
    queue      TEXT NOT NULL,
    message_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (queue, message_id)
) WITHOUT ROWID;
";

pub const TTL_EXPIRED: &str = "TTLExpiredException";

/// A locked message, as a receiver gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedMessage {
    pub queue: String,
    pub sequence_number: i64,
    pub lock_token: String,
    pub locked_until: DateTime<Utc>,
    pub message_id: String,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub properties: Map<String, Value>,
    pub body: Vec<u8>,
    pub enqueued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub delivery_count: u32,
}

/// A message in a dead-letter subqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub queue: String,
    pub sequence_number: i64,
    pub message_id: String,
    pub session_id: Option<String>,
    pub reason: String,
    pub description: Option<String>,
    pub dead_lettered_at: DateTime<Utc>,
    pub delivery_count: u32,
    pub properties: Map<String, Value>,
    pub body: Vec<u8>,
}

#[derive(Clone)]
pub struct LocalBroker {
    conn: Arc<Mutex<Connection>>,
    arrivals: Arc<Notify>,
    duplicate_detection_window: chrono::Duration,
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn settings(queue: &str) -> Result<&'static QueueSettings, QueueError> {
    queue_settings(queue).ok_or_else(|| QueueError::Rejected(format!("no queue named `{queue}`")))
}

impl LocalBroker {
    pub fn open(
        path: &Path,
        duplicate_detection_window: std::time::Duration,
    ) -> Result<Self, QueueError> {
        let conn = sqlite_open(path, SCHEMA).map_err(unavailable)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            arrivals: Arc::new(Notify::new()),
            duplicate_detection_window: chrono::Duration::from_std(duplicate_detection_window)
                .unwrap_or(chrono::Duration::minutes(10)),
        })
    }

    /// Woken whenever this process sends a message.
    pub fn arrivals(&self) -> Arc<Notify> {
        self.arrivals.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends at time `now`. Returns `false` if duplicate detection dropped the message.
    pub fn send_at(
        &self,
        message: &OutgoingMessage,
        now: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let settings = settings(&message.queue)?;
        let message_id = super::broker_message_id(&message.message_id);
        if settings.requires_session && message.session_id.is_none() {
            return Err(QueueError::Rejected(format!(
                "the SessionId was not set on a message, and it cannot be sent to `{}`",
                message.queue
            )));
        }
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        tx.prepare_cached("DELETE FROM duplicate_detection WHERE queue = ?1 AND expires_at <= ?2")
            .and_then(|mut s| s.execute(params![message.queue, millis(now)]))
            .map_err(unavailable)?;
        let fresh = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO duplicate_detection (queue, message_id, expires_at) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    message.queue,
                    message_id,
                    millis(now + self.duplicate_detection_window)
                ])
            })
            .map_err(unavailable)?
            == 1;
        if fresh {
            let visible_at = message.scheduled_enqueue_time.unwrap_or(now).max(now);
            let ttl = chrono::Duration::from_std(settings.time_to_live).unwrap_or_default();
            tx.prepare_cached(
                "INSERT INTO messages (queue, message_id, session_id, correlation_id, content_type,
                    properties, body, enqueued_at, visible_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    message.queue,
                    message_id,
                    message.session_id,
                    message.correlation_id,
                    message.content_type,
                    Value::Object(message.properties.clone()).to_string(),
                    message.body,
                    millis(now),
                    millis(visible_at),
                    millis(visible_at + ttl),
                ])
            })
            .map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        drop(conn);
        if fresh {
            self.arrivals.notify_waiters();
        }
        Ok(fresh)
    }

    /// Locks and returns the next deliverable message of `queue` at time `now`, first moving
    /// expired and exhausted messages to the dead-letter subqueue.
    pub fn receive_at(
        &self,
        queue: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ReceivedMessage>, QueueError> {
        let settings = settings(queue)?;
        let now_ms = millis(now);
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(unavailable)?;
        let unlocked = "dead_lettered = 0 AND (locked_until IS NULL OR locked_until <= ?2)";
        tx.execute(
            &format!(
                "UPDATE messages SET dead_lettered = 1, dead_letter_reason = ?3,
                    dead_letter_description = COALESCE(dead_letter_description, ?4),
                    dead_lettered_at = ?2, locked_until = NULL, lock_token = NULL
                 WHERE queue = ?1 AND {unlocked} AND delivery_count >= ?5"
            ),
            params![
                queue,
                now_ms,
                MAX_DELIVERY_COUNT_EXCEEDED,
                format!(
                    "Message could not be consumed after {} delivery attempts.",
                    settings.max_delivery_count
                ),
                settings.max_delivery_count
            ],
        )
        .map_err(unavailable)?;
        let expired_sql = if settings.dead_letter_on_expiration {
            format!(
                "UPDATE messages SET dead_lettered = 1, dead_letter_reason = ?3,
                    dead_letter_description = 'The message expired before it was consumed.',
                    dead_lettered_at = ?2, locked_until = NULL, lock_token = NULL
                 WHERE queue = ?1 AND {unlocked} AND expires_at <= ?2"
            )
        } else {
            format!(
                "DELETE FROM messages WHERE queue = ?1 AND {unlocked} AND expires_at <= ?2 AND ?3 IS NOT NULL"
            )
        };
        tx.execute(&expired_sql, params![queue, now_ms, TTL_EXPIRED])
            .map_err(unavailable)?;

        let candidate = if settings.requires_session {
            // The head of a session is its oldest visible message; a session is busy while any
            // of its messages is locked.
            "SELECT seq FROM messages m
             WHERE queue = ?1 AND dead_lettered = 0 AND visible_at <= ?2 AND session_id IS NOT NULL
               AND seq = (SELECT MIN(seq) FROM messages h
                          WHERE h.queue = m.queue AND h.session_id = m.session_id
                            AND h.dead_lettered = 0 AND h.visible_at <= ?2)
               AND NOT EXISTS (SELECT 1 FROM messages b
                               WHERE b.queue = m.queue AND b.session_id = m.session_id
                                 AND b.dead_lettered = 0 AND b.locked_until > ?2)
             ORDER BY seq LIMIT 1"
        } else {
            "SELECT seq FROM messages
             WHERE queue = ?1 AND dead_lettered = 0 AND visible_at <= ?2
               AND (locked_until IS NULL OR locked_until <= ?2)
             ORDER BY seq LIMIT 1"
        };
        let seq: Option<i64> = tx
            .prepare_cached(candidate)
            .and_then(|mut s| s.query_row(params![queue, now_ms], |r| r.get(0)).optional())
            .map_err(unavailable)?;
        let Some(seq) = seq else {
            tx.commit().map_err(unavailable)?;
            return Ok(None);
        };
        let lock_token = uuid::Uuid::new_v4().to_string();
        let locked_until = chrono::Duration::from_std(settings.lock_duration)
            .ok()
            .and_then(|lock| now.checked_add_signed(lock))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        tx.prepare_cached(
            "UPDATE messages SET delivery_count = delivery_count + 1, locked_until = ?2, lock_token = ?3
             WHERE seq = ?1",
        )
        .and_then(|mut s| s.execute(params![seq, millis(locked_until), lock_token]))
        .map_err(unavailable)?;
        let message = tx
            .prepare_cached(
                "SELECT queue, seq, lock_token, locked_until, message_id, session_id, correlation_id,
                        content_type, properties, body, enqueued_at, expires_at, delivery_count
                 FROM messages WHERE seq = ?1",
            )
            .and_then(|mut s| {
                s.query_row([seq], |r| {
                    Ok(ReceivedMessage {
                        queue: r.get(0)?,
                        sequence_number: r.get(1)?,
                        lock_token: r.get(2)?,
                        locked_until: from_millis(r.get(3)?),
                        message_id: r.get(4)?,
                        session_id: r.get(5)?,
                        correlation_id: r.get(6)?,
                        content_type: r.get(7)?,
                        properties: parse_properties(&r.get::<_, String>(8)?),
                        body: r.get(9)?,
                        enqueued_at: from_millis(r.get(10)?),
                        expires_at: from_millis(r.get(11)?),
                        delivery_count: r.get(12)?,
                    })
                })
            })
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Some(message))
    }

    /// Extends the lock on a message still being processed to `until`, as the Functions host
    /// renews the locks of Service Bus messages whose invocation is running. `false` if the
    /// lock was lost meanwhile.
    pub fn renew_lock(
        &self,
        message: &ReceivedMessage,
        until: DateTime<Utc>,
    ) -> Result<bool, QueueError> {
        let renewed = self
            .lock()
            .prepare_cached(
                "UPDATE messages SET locked_until = ?3 WHERE seq = ?1 AND lock_token = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    message.sequence_number,
                    message.lock_token,
                    millis(until)
                ])
            })
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    /// Settles a delivered message: it is done and leaves the queue.
    pub fn complete(&self, message: &ReceivedMessage) -> Result<(), QueueError> {
        let removed = self
            .lock()
            .prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lock_token = ?2")
            .and_then(|mut s| s.execute(params![message.sequence_number, message.lock_token]))
            .map_err(unavailable)?;
        if removed == 1 {
            Ok(())
        } else {
            Err(QueueError::Rejected(format!(
                "the lock on message {} was lost",
                message.message_id
            )))
        }
    }

    /// Gives a delivered message back for redelivery; at maxDeliveryCount it is dead-lettered
    /// with `reason` as its description.
    pub fn abandon(
        &self,
        message: &ReceivedMessage,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), QueueError> {
        let settings = settings(&message.queue)?;
        let conn = self.lock();
        if message.delivery_count >= settings.max_delivery_count {
            conn.prepare_cached(
                "UPDATE messages SET dead_lettered = 1, dead_letter_reason = ?3,
                    dead_letter_description = ?4, dead_lettered_at = ?5, locked_until = NULL, lock_token = NULL
                 WHERE seq = ?1 AND lock_token = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    message.sequence_number,
                    message.lock_token,
                    MAX_DELIVERY_COUNT_EXCEEDED,
                    format!(
                        "Message could not be consumed after {} delivery attempts; last failure: {reason}",
                        message.delivery_count
                    ),
                    millis(now)
                ])
            })
            .map_err(unavailable)?;
        } else {
            conn.prepare_cached(
                "UPDATE messages SET locked_until = NULL, lock_token = NULL WHERE seq = ?1 AND lock_token = ?2",
            )
            .and_then(|mut s| s.execute(params![message.sequence_number, message.lock_token]))
            .map_err(unavailable)?;
        }
        drop(conn);
        self.arrivals.notify_waiters();
        Ok(())
    }

    /// Releases every lock: called once at start-up by the data directory's only consumer.
    pub fn release_locks(&self) -> Result<usize, QueueError> {
        self.lock()
            .execute(
                "UPDATE messages SET locked_until = NULL, lock_token = NULL WHERE locked_until IS NOT NULL",
                [],
            )
            .map_err(unavailable)
    }

    /// When the next message of `queue` that is waiting for its scheduled time or for a lock to
    /// expire becomes deliverable.
    pub fn next_wakeup(
        &self,
        queue: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, QueueError> {
        self.lock()
            .prepare_cached(
                "SELECT MIN(CASE WHEN locked_until > ?2 THEN locked_until ELSE visible_at END)
                 FROM messages WHERE queue = ?1 AND dead_lettered = 0
                   AND (visible_at > ?2 OR locked_until > ?2)",
            )
            .and_then(|mut s| {
                s.query_row(params![queue, millis(now)], |r| r.get::<_, Option<i64>>(0))
            })
            .map(|ms| ms.map(from_millis))
            .map_err(unavailable)
    }

    /// Messages waiting in `queue` (not dead-lettered), locked or not.
    pub fn active_count(&self, queue: &str) -> Result<u64, QueueError> {
        self.lock()
            .prepare_cached("SELECT COUNT(*) FROM messages WHERE queue = ?1 AND dead_lettered = 0")
            .and_then(|mut s| s.query_row([queue], |r| r.get(0)))
            .map_err(unavailable)
    }

    /// The dead-letter subqueues' messages, oldest first, optionally of one queue.
    pub fn dead_letters(&self, queue: Option<&str>) -> Result<Vec<DeadLetter>, QueueError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT queue, seq, message_id, session_id, dead_letter_reason, dead_letter_description,
                        dead_lettered_at, delivery_count, properties, body
                 FROM messages WHERE dead_lettered = 1 AND (?1 IS NULL OR queue = ?1) ORDER BY seq",
            )
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([queue], |r| {
                Ok(DeadLetter {
                    queue: r.get(0)?,
                    sequence_number: r.get(1)?,
                    message_id: r.get(2)?,
                    session_id: r.get(3)?,
                    reason: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    description: r.get(5)?,
                    dead_lettered_at: from_millis(r.get::<_, Option<i64>>(6)?.unwrap_or_default()),
                    delivery_count: r.get(7)?,
                    properties: parse_properties(&r.get::<_, String>(8)?),
                    body: r.get(9)?,
                })
            })
            .map_err(unavailable)?;
        rows.collect::<Result<_, _>>().map_err(unavailable)
    }

    /// Removes one dead-lettered message (after it was replayed).
    pub fn delete_dead_letter(&self, sequence_number: i64) -> Result<bool, QueueError> {
        self.lock()
            .execute(
                "DELETE FROM messages WHERE seq = ?1 AND dead_lettered = 1",
                [sequence_number],
            )
            .map(|n| n == 1)
            .map_err(unavailable)
    }

    /// Messages waiting in `queue`, oldest first, without locking them.
    pub fn peek(&self, queue: &str) -> Result<Vec<ReceivedMessage>, QueueError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT queue, seq, COALESCE(lock_token, ''), COALESCE(locked_until, 0), message_id, session_id,
                        correlation_id, content_type, properties, body, enqueued_at, expires_at, delivery_count
                 FROM messages WHERE queue = ?1 AND dead_lettered = 0 ORDER BY seq",
            )
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([queue], |r| {
                Ok(ReceivedMessage {
                    queue: r.get(0)?,
                    sequence_number: r.get(1)?,
                    lock_token: r.get(2)?,
                    locked_until: from_millis(r.get(3)?),
                    message_id: r.get(4)?,
                    session_id: r.get(5)?,
                    correlation_id: r.get(6)?,
                    content_type: r.get(7)?,
                    properties: parse_properties(&r.get::<_, String>(8)?),
                    body: r.get(9)?,
                    enqueued_at: from_millis(r.get(10)?),
                    expires_at: from_millis(r.get(11)?),
                    delivery_count: r.get(12)?,
                })
            })
            .map_err(unavailable)?;
        rows.collect::<Result<_, _>>().map_err(unavailable)
    }

    /// Removes a message that is not locked (after it was replayed from `sync-deadletter`).
    pub fn delete_unlocked(&self, sequence_number: i64) -> Result<bool, QueueError> {
        self.lock()
            .execute(
                "DELETE FROM messages WHERE seq = ?1 AND dead_lettered = 0 AND locked_until IS NULL",
                [sequence_number],
            )
            .map(|n| n == 1)
            .map_err(unavailable)
    }
}

fn parse_properties(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

#[async_trait]
impl MessageQueue for LocalBroker {
    async fn send(&self, message: OutgoingMessage) -> Result<(), QueueError> {
        let broker = self.clone();
        tokio::task::spawn_blocking(move || broker.send_at(&message, Utc::now()).map(drop))
            .await
            .map_err(unavailable)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{SYNC_INBOUND_SCHEDULED, SYNC_INBOUND_WEBHOOK, SYNC_OUTBOUND};
    use chrono::Duration;

    fn broker() -> (tempfile::TempDir, LocalBroker) {
        let dir = tempfile::tempdir().unwrap();
        let broker = LocalBroker::open(
            &dir.path().join("runtime.db"),
            std::time::Duration::from_secs(600),
        )
        .unwrap();
        (dir, broker)
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    fn msg(queue: &str, id: &str) -> OutgoingMessage {
        OutgoingMessage::json(queue, id, &serde_json::json!({"id": id}))
    }

    #[test]
    fn an_abandoned_message_is_redelivered_with_a_higher_delivery_count() {
        let (_d, b) = broker();
        b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "m1"), t0()).unwrap();
        let first = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
        assert_eq!(first.delivery_count, 1);
        assert!(
            b.receive_at(SYNC_INBOUND_SCHEDULED, t0())
                .unwrap()
                .is_none(),
            "locked"
        );
        b.abandon(&first, "boom", t0()).unwrap();
        let second = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
        assert_eq!(second.delivery_count, 2);
        assert_eq!(second.message_id, "m1");
        b.complete(&second).unwrap();
        assert!(
            b.receive_at(SYNC_INBOUND_SCHEDULED, t0())
                .unwrap()
                .is_none()
        );
        assert!(
            b.complete(&second).is_err(),
            "a settled message cannot be settled twice"
        );
    }

    #[test]
    fn a_message_is_dead_lettered_after_max_deliveries_with_the_reason() {
        let (_d, b) = broker();
        b.send_at(&msg(SYNC_INBOUND_WEBHOOK, "m1"), t0()).unwrap();
        for attempt in 1..=5 {
            let m = b.receive_at(SYNC_INBOUND_WEBHOOK, t0()).unwrap().unwrap();
            assert_eq!(m.delivery_count, attempt);
            b.abandon(&m, "provider answered 503", t0()).unwrap();
        }
        assert!(b.receive_at(SYNC_INBOUND_WEBHOOK, t0()).unwrap().is_none());
        let dead = b.dead_letters(Some(SYNC_INBOUND_WEBHOOK)).unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, MAX_DELIVERY_COUNT_EXCEEDED);
        assert_eq!(dead[0].delivery_count, 5);
        assert!(
            dead[0]
                .description
                .as_deref()
                .unwrap()
                .contains("provider answered 503")
        );
    }

    #[test]
    fn a_renewed_lock_keeps_a_message_from_being_delivered_again() {
        let (_d, b) = broker();
        b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "m1"), t0()).unwrap();
        let first = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
        let renewed_until = first.locked_until + Duration::minutes(5);
        assert!(b.renew_lock(&first, renewed_until).unwrap());
        let past_first_lock = first.locked_until + Duration::seconds(1);
        assert!(
            b.receive_at(SYNC_INBOUND_SCHEDULED, past_first_lock)
                .unwrap()
                .is_none(),
            "still locked"
        );
        assert!(
            b.complete(&first).is_ok(),
            "the lock is still the first one's"
        );
        assert!(
            !b.renew_lock(&first, renewed_until).unwrap(),
            "settled: nothing to renew"
        );
    }

    #[test]
    fn an_expired_lock_counts_as_a_delivery() {
        let (_d, b) = broker();
        b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "m1"), t0()).unwrap();
        let first = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
        assert_eq!(
            b.next_wakeup(SYNC_INBOUND_SCHEDULED, t0()).unwrap(),
            Some(first.locked_until)
        );
        let later = first.locked_until + Duration::seconds(1);
        let again = b
            .receive_at(SYNC_INBOUND_SCHEDULED, later)
            .unwrap()
            .unwrap();
        assert_eq!(again.delivery_count, 2);
        assert!(b.complete(&first).is_err(), "the first lock was lost");
    }

    #[test]
    fn a_scheduled_message_waits_for_its_time() {
        let (_d, b) = broker();
        let at = t0() + Duration::seconds(30);
        b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "later").scheduled_at(at), t0())
            .unwrap();
        assert!(
            b.receive_at(SYNC_INBOUND_SCHEDULED, t0())
                .unwrap()
                .is_none()
        );
        assert_eq!(
            b.next_wakeup(SYNC_INBOUND_SCHEDULED, t0()).unwrap(),
            Some(at)
        );
        let m = b.receive_at(SYNC_INBOUND_SCHEDULED, at).unwrap().unwrap();
        assert_eq!(m.message_id, "later");
    }

    #[test]
    fn a_duplicate_message_id_is_dropped_within_the_window() {
        let (_d, b) = broker();
        assert!(
            b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "job-1"), t0())
                .unwrap()
        );
        assert!(
            !b.send_at(
                &msg(SYNC_INBOUND_SCHEDULED, "job-1"),
                t0() + Duration::minutes(9)
            )
            .unwrap()
        );
        assert!(
            b.send_at(&msg(SYNC_INBOUND_WEBHOOK, "job-1"), t0())
                .unwrap(),
            "per queue"
        );
        assert_eq!(b.active_count(SYNC_INBOUND_SCHEDULED).unwrap(), 1);
        assert!(
            b.send_at(
                &msg(SYNC_INBOUND_SCHEDULED, "job-1"),
                t0() + Duration::minutes(11)
            )
            .unwrap()
        );
        assert_eq!(b.active_count(SYNC_INBOUND_SCHEDULED).unwrap(), 2);
    }

    #[test]
    fn sessions_deliver_in_order_one_at_a_time() {
        let (_d, b) = broker();
        for (session, id) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")] {
            b.send_at(&msg(SYNC_OUTBOUND, id).in_session(session), t0())
                .unwrap();
        }
        let a1 = b.receive_at(SYNC_OUTBOUND, t0()).unwrap().unwrap();
        assert_eq!(a1.message_id, "a1");
        let b1 = b.receive_at(SYNC_OUTBOUND, t0()).unwrap().unwrap();
        assert_eq!(b1.message_id, "b1", "session a is busy, so b goes next");
        assert!(b.receive_at(SYNC_OUTBOUND, t0()).unwrap().is_none());

        // A failure keeps the session's order: a1 comes back before a2.
        b.abandon(&a1, "conflict check failed", t0()).unwrap();
        let again = b.receive_at(SYNC_OUTBOUND, t0()).unwrap().unwrap();
        assert_eq!((again.message_id.as_str(), again.delivery_count), ("a1", 2));
        b.complete(&again).unwrap();
        let a2 = b.receive_at(SYNC_OUTBOUND, t0()).unwrap().unwrap();
        assert_eq!(a2.message_id, "a2");
        b.complete(&a2).unwrap();
        assert_eq!(
            b.receive_at(SYNC_OUTBOUND, t0())
                .unwrap()
                .unwrap()
                .message_id,
            "a3"
        );
    }

    #[test]
    fn a_session_queue_refuses_a_message_without_a_session() {
        let (_d, b) = broker();
        let e = b.send_at(&msg(SYNC_OUTBOUND, "x"), t0()).unwrap_err();
        assert!(e.to_string().contains("SessionId was not set"), "{e}");
        let e = b.send_at(&msg("no-such-queue", "x"), t0()).unwrap_err();
        assert!(e.to_string().contains("no queue named"), "{e}");
    }

    #[test]
    fn an_expired_message_is_dead_lettered() {
        let (_d, b) = broker();
        b.send_at(&msg(SYNC_INBOUND_WEBHOOK, "old"), t0()).unwrap();
        let after_ttl = t0() + Duration::days(8);
        assert!(
            b.receive_at(SYNC_INBOUND_WEBHOOK, after_ttl)
                .unwrap()
                .is_none()
        );
        let dead = b.dead_letters(None).unwrap();
        assert_eq!(dead[0].reason, TTL_EXPIRED);
    }

    #[test]
    fn a_lock_held_by_a_crashed_process_is_released_and_the_delivery_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runtime.db");
        let window = std::time::Duration::from_secs(600);
        {
            let b = LocalBroker::open(&path, window).unwrap();
            b.send_at(&msg(SYNC_INBOUND_SCHEDULED, "m1"), t0()).unwrap();
            let m = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
            assert_eq!(m.delivery_count, 1);
            // The process dies here without settling the message.
        }
        let b = LocalBroker::open(&path, window).unwrap();
        assert!(
            b.receive_at(SYNC_INBOUND_SCHEDULED, t0())
                .unwrap()
                .is_none(),
            "still locked"
        );
        assert_eq!(b.release_locks().unwrap(), 1);
        let m = b.receive_at(SYNC_INBOUND_SCHEDULED, t0()).unwrap().unwrap();
        assert_eq!((m.message_id.as_str(), m.delivery_count), ("m1", 2));
    }
}
