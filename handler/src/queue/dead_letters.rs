//! Dead letters: what an operator lists and replays, on the embedded queues and on Service Bus.
//!
//! A message lands in one of two places:
//!
//! * a queue's dead-letter subqueue (`<queue>/$DeadLetterQueue`), where the broker moves what
//!   exceeded the queue's maxDeliveryCount or expired, with `DeadLetterReason` and
//!   `DeadLetterErrorDescription` as application properties;
//! * `sync-deadletter`, where a function sends a copy of a poison message, or of one that failed
//!   on the last delivery its queue allows, with the reason and the original queue, id, session
//!   and delivery count in [`properties`] ([`super::dead_letter`]).
//!   On Service Bus nothing consumes that queue, but listing it locks and unlocks each
//!   message, which counts as a delivery: after its maxDeliveryCount the broker moves the copy
//!   to `sync-deadletter/$DeadLetterQueue`, which is listed too, so nothing is ever out of
//!   sight.
//!
//! Both read as one [`DeadLetteredMessage`]. Replaying sends the message back to the queue it
//! came from, under a new MessageId (the original may still be inside the duplicate-detection
//! window) and marked [`properties::REPLAYED_FROM`], and only then removes the dead letter: a
//! crash in between replays twice (the handlers are idempotent) and never loses one. A resend
//! that fails leaves the dead letter where it was.
//!
//! Service Bus speaks the REST runtime API here: peek-lock (`POST <path>/messages/head`), then
//! delete (`DELETE` on the lock's location) after a successful resend, or unlock (`PUT`).
//! Its sequence numbers count per entity, so two queues' dead letters can share one; a replay
//! names the queue when that happens.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::local::{DeadLetter, LocalBroker, ReceivedMessage};
use super::service_bus::{LockedMessage, ServiceBusSender};
use super::{
    MessageQueue, OutgoingMessage, QUEUES, QueueError, SYNC_DEADLETTER, properties, property,
};

/// A dead-lettered message, wherever it is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetteredMessage {
    pub sequence_number: i64,
    /// Where the message was going when it was dead-lettered, and where a replay sends it.
    pub original_queue: String,
    pub message_id: String,
    pub session_id: Option<String>,
    pub reason: String,
    pub description: Option<String>,
    pub dead_lettered_at: DateTime<Utc>,
    pub delivery_count: u32,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    pub properties: Map<String, Value>,
}

/// What became of one message a replay chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    pub sequence_number: i64,
    pub queue: String,
    /// The MessageId it was sent under.
    pub message_id: String,
    /// Why it is still a dead letter, if the resend failed.
    pub error: Option<String>,
    /// Why it is still listed although it was sent: the dead letter could not be removed. A
    /// replay of it within the duplicate detection window (10 minutes) is dropped.
    pub left: Option<String>,
}

/// The dead letters of a set of queues.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Every dead letter, oldest first by sequence number.
    async fn list(&self) -> Result<Vec<DeadLetteredMessage>, QueueError>;

    /// Sends the dead letters `chosen` picks back to their queues and removes those sent.
    async fn replay(&self, chosen: &Selection) -> Result<Vec<Replayed>, QueueError>;
}

/// Which dead letters a replay sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Every one (the sequence numbers are then ignored).
    pub all: bool,
    pub sequence_numbers: Vec<i64>,
    /// Only those going to this queue.
    pub queue: Option<String>,
}

impl Selection {
    pub fn chooses(&self, dead: &DeadLetteredMessage) -> bool {
        self.queue
            .as_ref()
            .is_none_or(|q| *q == dead.original_queue)
            && (self.all || self.sequence_numbers.contains(&dead.sequence_number))
    }

    /// Why this selection cannot be replayed from `listed`: a sequence number that names no
    /// dead letter, or several (they count per queue on Service Bus).
    pub fn check(&self, listed: &[DeadLetteredMessage]) -> Result<(), String> {
        if !self.all && self.sequence_numbers.is_empty() {
            return Err("name the messages to replay by sequence number, or pass --all".into());
        }
        if let Some(queue) = &self.queue {
            check_queue(queue)?;
        }
        for wanted in &self.sequence_numbers {
            let queues: Vec<&str> = listed
                .iter()
                .filter(|d| d.sequence_number == *wanted)
                .filter(|d| self.queue.as_ref().is_none_or(|q| *q == d.original_queue))
                .map(|d| d.original_queue.as_str())
                .collect();
            match queues.as_slice() {
                [] => {
                    return Err(format!(
                        "no dead-lettered message has sequence number {wanted}"
                    ));
                }
                [_] => {}
                several => {
                    return Err(format!(
                        "sequence number {wanted} names dead letters of {}; add --queue",
                        several.join(" and ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Refuses a `--queue` that names none of the app's queues: a misspelt one would choose
/// nothing, and a replay of nothing would look like one done.
pub fn check_queue(queue: &str) -> Result<(), String> {
    if super::queue_settings(queue).is_some() {
        Ok(())
    } else {
        let names: Vec<&str> = super::QUEUES.iter().map(|q| q.name).collect();
        Err(format!(
            "`{queue}` is not one of the app's queues: {}",
            names.join(", ")
        ))
    }
}

/// The message a replay of `dead` sends: the original body, session and application
/// properties, without the dead-letter bookkeeping, under a MessageId of its own: the same for
/// every replay of this dead letter, so that one sent twice (a lock that lapsed mid-replay, a
/// command run again) is dropped by duplicate detection rather than run twice.
pub fn replay_of(dead: &DeadLetteredMessage) -> OutgoingMessage {
    let mut props = dead.properties.clone();
    props.retain(|name, _| {
        !properties::ALL
            .iter()
            .chain([&properties::REPLAYED_FROM])
            .any(|p| p.eq_ignore_ascii_case(name))
    });
    props.insert(
        properties::REPLAYED_FROM.into(),
        Value::from(dead.sequence_number),
    );
    OutgoingMessage {
        queue: dead.original_queue.clone(),
        body: dead.body.clone(),
        content_type: Some(
            dead.content_type
                .clone()
                .unwrap_or_else(|| "application/json".into()),
        ),
        message_id: format!("{}:replay-{}", dead.message_id, dead.sequence_number),
        session_id: dead.session_id.clone(),
        correlation_id: None,
        scheduled_enqueue_time: None,
        properties: props,
    }
}

fn text_property(properties: &Map<String, Value>, name: &str) -> Option<String> {
    property(properties, name).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A copy in `sync-deadletter`, read back through the properties [`super::dead_letter`] set.
pub fn from_sync_deadletter(
    sequence_number: i64,
    message_id: &str,
    enqueued_at: DateTime<Utc>,
    content_type: Option<String>,
    body: Vec<u8>,
    props: Map<String, Value>,
) -> DeadLetteredMessage {
    let text = |name| text_property(&props, name);
    DeadLetteredMessage {
        sequence_number,
        original_queue: text(properties::ORIGINAL_QUEUE).unwrap_or_else(|| SYNC_DEADLETTER.into()),
        message_id: text(properties::ORIGINAL_MESSAGE_ID).unwrap_or_else(|| message_id.into()),
        session_id: text(properties::ORIGINAL_SESSION_ID),
        reason: text(properties::POISON_REASON)
            .or_else(|| text(properties::DEAD_LETTER_REASON))
            .unwrap_or_default(),
        description: text(properties::POISON_DESCRIPTION)
            .or_else(|| text(properties::DEAD_LETTER_ERROR_DESCRIPTION)),
        dead_lettered_at: enqueued_at,
        delivery_count: text(properties::ORIGINAL_DELIVERY_COUNT)
            .and_then(|n| n.parse().ok())
            .unwrap_or_default(),
        content_type,
        body,
        properties: props,
    }
}

#[async_trait]
impl DeadLetters for LocalBroker {
    async fn list(&self) -> Result<Vec<DeadLetteredMessage>, QueueError> {
        let mut all: Vec<DeadLetteredMessage> = self
            .dead_letters(None)?
            .into_iter()
            .map(|d: DeadLetter| DeadLetteredMessage {
                sequence_number: d.sequence_number,
                original_queue: d.queue,
                message_id: d.message_id,
                session_id: d.session_id,
                reason: d.reason,
                description: d.description,
                dead_lettered_at: d.dead_lettered_at,
                delivery_count: d.delivery_count,
                content_type: None,
                body: d.body,
                properties: d.properties,
            })
            .collect();
        for m in self.peek(SYNC_DEADLETTER)? {
            let ReceivedMessage {
                sequence_number,
                message_id,
                enqueued_at,
                content_type,
                body,
                properties,
                ..
            } = m;
            all.push(from_sync_deadletter(
                sequence_number,
                &message_id,
                enqueued_at,
                content_type,
                body,
                properties,
            ));
        }
        all.sort_by_key(|d| d.sequence_number);
        Ok(all)
    }

    async fn replay(&self, chosen: &Selection) -> Result<Vec<Replayed>, QueueError> {
        let mut replayed = Vec::new();
        for dead in self.list().await?.into_iter().filter(|d| chosen.chooses(d)) {
            let message = replay_of(&dead);
            let message_id = message.message_id.clone();
            let (error, left) = match self.send(message).await {
                // Sequence numbers are the broker's own, one per message, wherever it is.
                Ok(()) => match self.delete_dead_letter(dead.sequence_number)?
                    || self.delete_unlocked(dead.sequence_number)?
                {
                    true => (None, None),
                    false => (None, Some("another command removed or took it".to_string())),
                },
                Err(e) => (Some(e.to_string()), None),
            };
            replayed.push(Replayed {
                sequence_number: dead.sequence_number,
                queue: dead.original_queue,
                message_id,
                error,
                left,
            });
        }
        Ok(replayed)
    }
}

/// The most messages read from one dead-letter entity: those not replayed stay locked until
/// the entity has been read, and a listing is for people.
const MAX_PER_ENTITY: usize = 1000;

/// Where the dead letters are on Service Bus, and the queue each one's messages were going to
/// (`None`: `sync-deadletter`'s copies, which say so themselves).
fn entities() -> Vec<(String, Option<&'static str>)> {
    let mut out: Vec<(String, Option<&'static str>)> = QUEUES
        .iter()
        .filter(|q| q.name != SYNC_DEADLETTER)
        .map(|q| (format!("{}/$DeadLetterQueue", q.name), Some(q.name)))
        .collect();
    out.push((SYNC_DEADLETTER.to_string(), None));
    out.push((format!("{SYNC_DEADLETTER}/$DeadLetterQueue"), None));
    out
}

fn from_locked(locked: &LockedMessage, queue: Option<&str>) -> DeadLetteredMessage {
    // The lock taken to read the message counted as one more delivery.
    let delivery_count = locked.delivery_count.saturating_sub(1);
    match queue {
        Some(queue) => {
            let text = |name| text_property(&locked.properties, name);
            DeadLetteredMessage {
                sequence_number: locked.sequence_number,
                original_queue: queue.to_string(),
                message_id: locked.message_id.clone(),
                session_id: locked.session_id.clone(),
                reason: text(properties::DEAD_LETTER_REASON).unwrap_or_default(),
                description: text(properties::DEAD_LETTER_ERROR_DESCRIPTION),
                dead_lettered_at: locked.enqueued_at,
                delivery_count,
                content_type: locked.content_type.clone(),
                body: locked.body.clone(),
                properties: locked.properties.clone(),
            }
        }
        None => from_sync_deadletter(
            locked.sequence_number,
            &locked.message_id,
            locked.enqueued_at,
            locked.content_type.clone(),
            locked.body.clone(),
            locked.properties.clone(),
        ),
    }
}

/// What one walk through the dead letters on Service Bus found and did.
#[derive(Default)]
struct Sweep {
    /// The dead letters it left where they were.
    listed: Vec<DeadLetteredMessage>,
    replayed: Vec<Replayed>,
}

impl ServiceBusSender {
    /// Reads every entity's dead letters, locking each in turn, since the REST API reads only
    /// by locking. Those `replay` chooses are sent back and deleted at once, while their locks
    /// are fresh; the others stay locked, so that the next lock reaches past them, until their
    /// entity has been read, and are then unlocked.
    ///
    /// A lock lapses after the queue's lock duration, and Service Bus hands the message out
    /// again: one already read is held again under its new lock and the reading goes on; one
    /// whose lock lapsed twice ends its entity's reading there, with a warning.
    async fn sweep(&self, replay: Option<&Selection>) -> Result<Sweep, QueueError> {
        let mut sweep = Sweep::default();
        for (path, queue) in entities() {
            let mut held: Vec<LockedMessage> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut relocked = std::collections::HashSet::new();
            let outcome = loop {
                if seen.len() == MAX_PER_ENTITY {
                    // One more, to say whether there are more.
                    if let Ok(Some(more)) = self.peek_lock(&path).await {
                        if !seen.contains(&more.sequence_number) {
                            tracing::warn!(entity = %path, "more than {MAX_PER_ENTITY} dead letters here: only the first {MAX_PER_ENTITY} are read; run the command again for the rest once these are replayed");
                        }
                        hold(&mut held, more);
                    }
                    break Ok(());
                }
                let locked = match self.peek_lock(&path).await {
                    Ok(Some(locked)) => locked,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                if !seen.insert(locked.sequence_number) {
                    // Read before, and its lock lapsed: it is held again, under the new lock.
                    let again = relocked.insert(locked.sequence_number);
                    hold(&mut held, locked);
                    if again {
                        continue;
                    }
                    tracing::warn!(entity = %path, "dead letters' locks lapse before they are all read: the rest of this entity is not read; run the command again");
                    break Ok(());
                }
                let dead = from_locked(&locked, queue);
                match replay {
                    Some(chosen) if chosen.chooses(&dead) => {
                        let replayed = self.replay_locked(&locked, &dead).await;
                        if replayed.error.is_some() {
                            // Not sent: it stays where it is, locked until the entity is read.
                            held.push(locked);
                        }
                        sweep.replayed.push(replayed);
                    }
                    _ => {
                        held.push(locked);
                        sweep.listed.push(dead);
                    }
                }
            };
            self.unlock_all(held.iter()).await;
            if let Err(e) = outcome {
                return Err(match sweep.replayed.as_slice() {
                    [] => e,
                    replayed => after_replaying(e, replayed),
                });
            }
        }
        sweep.listed.sort_by_key(|d| d.sequence_number);
        sweep.replayed.sort_by_key(|r| r.sequence_number);
        Ok(sweep)
    }

    /// Sends `dead` back to its queue and, once it is sent, deletes it under `locked`; one
    /// not sent stays locked.
    async fn replay_locked(&self, locked: &LockedMessage, dead: &DeadLetteredMessage) -> Replayed {
        let message = replay_of(dead);
        let message_id = message.message_id.clone();
        let (error, left) = match self.send(message).await {
            Ok(()) => match self.delete_locked(locked).await {
                Ok(()) => (None, None),
                Err(e) => (None, Some(e.to_string())),
            },
            Err(e) => (Some(e.to_string()), None),
        };
        Replayed {
            sequence_number: dead.sequence_number,
            queue: dead.original_queue.clone(),
            message_id,
            error,
            left,
        }
    }

    async fn unlock_all(&self, locked: impl Iterator<Item = &LockedMessage>) {
        for message in locked {
            if let Err(e) = self.unlock(message).await {
                // The lock lapses by itself after the queue's lock duration.
                tracing::warn!(sequence_number = message.sequence_number, error = %e, "could not unlock a dead letter");
            }
        }
    }
}

/// Keeps `locked` among the `held`: in place of an earlier lock of the same message, which
/// has lapsed, or else as one more.
fn hold(held: &mut Vec<LockedMessage>, locked: LockedMessage) {
    match held
        .iter_mut()
        .find(|h| h.sequence_number == locked.sequence_number)
    {
        Some(earlier) => *earlier = locked,
        None => held.push(locked),
    }
}

/// `error`, which ended a replay after it had replayed some: the operator is told which.
fn after_replaying(error: QueueError, replayed: &[Replayed]) -> QueueError {
    let named = |r: &Replayed| {
        let outcome = match (&r.error, &r.left) {
            (None, None) => "replayed".to_string(),
            (None, Some(why)) => format!("replayed but still listed ({why})"),
            (Some(e), _) => format!("not replayed ({e})"),
        };
        format!("{} to {}: {outcome}", r.sequence_number, r.queue)
    };
    let numbers: Vec<String> = replayed.iter().map(named).collect();
    let told = |e: String| {
        format!(
            "{e}; before it: {}; run the command again for the rest",
            numbers.join("; ")
        )
    };
    match error {
        QueueError::Rejected(e) => QueueError::Rejected(told(e)),
        QueueError::Unavailable(e) => QueueError::Unavailable(told(e)),
    }
}

#[async_trait]
impl DeadLetters for ServiceBusSender {
    async fn list(&self) -> Result<Vec<DeadLetteredMessage>, QueueError> {
        Ok(self.sweep(None).await?.listed)
    }

    async fn replay(&self, chosen: &Selection) -> Result<Vec<Replayed>, QueueError> {
        Ok(self.sweep(Some(chosen)).await?.replayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_in_sync_deadletter() -> DeadLetteredMessage {
        let props: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "DeadLetterReason": "INVALID_MESSAGE",
            "DeadLetterErrorDescription": "expected value at line 1",
            "OriginalQueue": "sync-outbound",
            "OriginalMessageId": "wb-1",
            "OriginalDeliveryCount": 1,
            "OriginalSessionId": "int-1",
            "tenant": "t1",
        }))
        .unwrap();
        from_sync_deadletter(
            7,
            "sync-outbound:wb-1",
            Utc::now(),
            None,
            b"{oops".to_vec(),
            props,
        )
    }

    #[test]
    fn a_misspelt_queue_chooses_nothing_and_is_refused() {
        let selection = Selection {
            all: true,
            sequence_numbers: Vec::new(),
            queue: Some("sync-outbnd".into()),
        };
        let refused = selection.check(&[copy_in_sync_deadletter()]).unwrap_err();
        assert!(refused.contains("sync-outbnd") && refused.contains("sync-outbound"));
        let right = Selection {
            queue: Some("sync-outbound".into()),
            ..selection
        };
        assert!(right.check(&[copy_in_sync_deadletter()]).is_ok());
    }

    #[test]
    fn a_copy_in_sync_deadletter_reads_as_the_message_it_was() {
        let dead = copy_in_sync_deadletter();
        assert_eq!(dead.original_queue, "sync-outbound");
        assert_eq!(dead.message_id, "wb-1");
        assert_eq!(dead.session_id.as_deref(), Some("int-1"));
        assert_eq!(dead.reason, "INVALID_MESSAGE");
        assert_eq!(dead.delivery_count, 1);
    }

    #[test]
    fn properties_that_came_back_lowercased_read_the_same() {
        let dead = copy_in_sync_deadletter();
        let lowered: Map<String, Value> = dead
            .properties
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let read = from_sync_deadletter(7, "x", dead.dead_lettered_at, None, vec![], lowered);
        assert_eq!(read.original_queue, "sync-outbound");
        assert_eq!(read.reason, "INVALID_MESSAGE");
        let names: Vec<String> = replay_of(&read).properties.keys().cloned().collect();
        assert_eq!(names, ["ReplayedFrom", "tenant"]);
    }

    #[test]
    fn a_replay_goes_home_under_an_id_of_its_own_without_the_bookkeeping() {
        let dead = copy_in_sync_deadletter();
        let replay = replay_of(&dead);
        assert_eq!(replay.queue, "sync-outbound");
        assert_eq!(replay.session_id.as_deref(), Some("int-1"));
        assert_eq!(replay.message_id, "wb-1:replay-7");
        assert_eq!(
            replay_of(&dead).message_id,
            replay.message_id,
            "replayed twice, it is one message to duplicate detection"
        );
        assert_eq!(replay.body, b"{oops");
        let names: Vec<&str> = replay.properties.keys().map(String::as_str).collect();
        assert_eq!(names, ["ReplayedFrom", "tenant"]);
        assert_eq!(replay.properties["ReplayedFrom"], 7);
    }

    #[test]
    fn a_sequence_number_in_two_queues_needs_the_queue_named() {
        let mut other = copy_in_sync_deadletter();
        other.original_queue = "sync-inbound-scheduled".into();
        let listed = [copy_in_sync_deadletter(), other];
        let seven = Selection {
            sequence_numbers: vec![7],
            ..Selection::default()
        };
        let err = seven.check(&listed).unwrap_err();
        assert!(err.contains("add --queue"), "{err}");
        let named = Selection {
            queue: Some("sync-outbound".into()),
            ..seven.clone()
        };
        assert_eq!(named.check(&listed), Ok(()));
        assert!(named.chooses(&listed[0]) && !named.chooses(&listed[1]));
        let missing = Selection {
            sequence_numbers: vec![8],
            ..Selection::default()
        };
        assert!(
            missing
                .check(&listed)
                .unwrap_err()
                .contains("sequence number 8")
        );
        assert!(Selection::default().check(&listed).is_err());
    }

    #[test]
    fn every_queue_s_dead_letters_are_looked_for_including_sync_deadletter_s_own() {
        let paths: Vec<String> = entities().into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths,
            [
                "sync-inbound-webhook/$DeadLetterQueue",
                "sync-inbound-scheduled/$DeadLetterQueue",
                "sync-outbound/$DeadLetterQueue",
                "sync-deadletter",
                "sync-deadletter/$DeadLetterQueue",
            ]
        );
    }
}
