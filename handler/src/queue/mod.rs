//! The sync queues: what the functions send, and the queue properties the app relies on.
//!
//! In Azure the queues are Service Bus queues in the `sb-sync-<env>` namespace; the Functions
//! host receives from them and the handler sends over the REST API (output bindings cannot set
//! MessageId, SessionId or a schedule). On one machine [`LocalBroker`] is both ends.
//!
//! Poison messages, ones that no retry can fix, are not thrown back at the broker (that would
//! burn every delivery and lose the reason): the function sends a copy to `sync-deadletter`
//! with the reason in its properties ([`dead_letter`]) and completes the original.

mod dead_letters;
mod local;
mod service_bus;

pub use dead_letters::{
    DeadLetteredMessage, DeadLetters, Replayed, Selection, check_queue, replay_of,
};
pub use local::{DeadLetter, LocalBroker, ReceivedMessage};
pub use service_bus::{
    LockedMessage, ServiceBusAuth, ServiceBusConfig, ServiceBusSender, broker_properties,
    locked_message, namespace_host, sas_token,
};

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

/// A Service Bus message as a serviceBusTrigger delivers it (decoded from the host's envelope
/// by `protocol`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBusMessage {
    /// The exact body bytes, with the host's extra layer of JSON string encoding removed.
    pub body: Vec<u8>,
    /// 1 on the first delivery; the broker dead-letters after the queue's maxDeliveryCount.
    pub delivery_count: u32,
    pub message_id: Option<String>,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub sequence_number: Option<u64>,
    pub enqueued_time_utc: Option<DateTime<Utc>>,
    pub application_properties: Map<String, Value>,
}

pub const SYNC_INBOUND_WEBHOOK: &str = "sync-inbound-webhook";
pub const SYNC_INBOUND_SCHEDULED: &str = "sync-inbound-scheduled";
pub const SYNC_OUTBOUND: &str = "sync-outbound";
pub const SYNC_DEADLETTER: &str = "sync-deadletter";

/// The reason Service Bus gives a message it dead-lettered after the queue's maxDeliveryCount.
pub const MAX_DELIVERY_COUNT_EXCEEDED: &str = "MaxDeliveryCountExceeded";

/// The properties of one queue, as the namespace is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    pub name: &'static str,
    pub max_delivery_count: u32,
    pub lock_duration: Duration,
    pub time_to_live: Duration,
    pub requires_session: bool,
    pub dead_letter_on_expiration: bool,
}

const MINUTE: u64 = 60;
const DAY: u64 = 24 * 60 * MINUTE;

/// The app's queues. `infra/` provisions the same values in Azure.
pub const QUEUES: [QueueSettings; 4] = [
    QueueSettings {
        name: SYNC_INBOUND_WEBHOOK,
        max_delivery_count: 5,
        lock_duration: Duration::from_secs(5 * MINUTE),
        time_to_live: Duration::from_secs(7 * DAY),
        requires_session: false,
        dead_letter_on_expiration: true,
    },
    QueueSettings {
        name: SYNC_INBOUND_SCHEDULED,
        max_delivery_count: 10,
        // Service Bus caps a lock at 5 minutes; the host renews it while the function runs.
        lock_duration: Duration::from_secs(5 * MINUTE),
        time_to_live: Duration::from_secs(14 * DAY),
        requires_session: false,
        dead_letter_on_expiration: true,
    },
    QueueSettings {
        name: SYNC_OUTBOUND,
        max_delivery_count: 10,
        lock_duration: Duration::from_secs(5 * MINUTE),
        time_to_live: Duration::from_secs(7 * DAY),
        requires_session: true,
        dead_letter_on_expiration: true,
    },
    QueueSettings {
        name: SYNC_DEADLETTER,
        max_delivery_count: 10,
        lock_duration: Duration::from_secs(MINUTE),
        // An expired copy moves to the queue's dead-letter subqueue, which keeps it until an
        // operator replays it: a poison message is never dropped.
        time_to_live: Duration::from_secs(14 * DAY),
        requires_session: false,
        dead_letter_on_expiration: true,
    },
];

pub fn queue_settings(name: &str) -> Option<&'static QueueSettings> {
    QUEUES.iter().find(|q| q.name == name)
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    pub queue: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// Duplicate detection drops a second message with the same id within the window, which
    /// is what makes sends from a redelivered invocation harmless.
    pub message_id: String,
    pub session_id: Option<String>,
    pub correlation_id: Option<String>,
    /// Not delivered before this time.
    pub scheduled_enqueue_time: Option<DateTime<Utc>>,
    /// Application properties.
    pub properties: Map<String, Value>,
}

impl OutgoingMessage {
    /// A JSON message.
    pub fn json(queue: &str, message_id: impl Into<String>, body: &impl Serialize) -> Self {
        Self {
            queue: queue.to_string(),
            body: serde_json::to_vec(body).expect("message bodies serialize"),
            content_type: Some("application/json".into()),
            message_id: message_id.into(),
            session_id: None,
            correlation_id: None,
            scheduled_enqueue_time: None,
            properties: Map::new(),
        }
    }

    pub fn in_session(mut self, session_id: impl Into<String>) -> Self {
        self.session_id = Some(session_id.into());
        self
    }

    pub fn scheduled_at(mut self, at: DateTime<Utc>) -> Self {
        self.scheduled_enqueue_time = Some(at);
        self
    }

    pub fn property(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.properties.insert(name.to_string(), value.into());
        self
    }
}

/// The longest MessageId Service Bus takes.
pub const MAX_MESSAGE_ID: usize = 128;

/// A MessageId as the brokers take it. Ids are derived (a job's id from its integration and the
/// provider's notification, a retry's from the job's, a dead letter's from its queue's), so one
/// may pass [`MAX_MESSAGE_ID`]; it then keeps its beginning and ends in a digest of the whole
/// (`~` and 16 hex digits). The same id is always the same MessageId, so duplicate detection
/// still drops a message sent twice, and two ids stay two.
pub fn broker_message_id(id: &str) -> std::borrow::Cow<'_, str> {
    use sha2::{Digest, Sha256};
    const DIGEST: usize = 17;
    if id.len() <= MAX_MESSAGE_ID {
        return id.into();
    }
    let mut kept = MAX_MESSAGE_ID - DIGEST;
    while !id.is_char_boundary(kept) {
        kept -= 1;
    }
    let digest = Sha256::digest(id.as_bytes());
    let mut shortened = String::with_capacity(MAX_MESSAGE_ID);
    shortened.push_str(&id[..kept]);
    shortened.push('~');
    for byte in &digest[..8] {
        shortened.push_str(&format!("{byte:02x}"));
    }
    shortened.into()
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The message can never be sent as it is (unknown queue, no SessionId for a session queue).
    #[error("message rejected: {0}")]
    Rejected(String),
    /// The broker could not be reached or refused for now; trying again later can help.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait MessageQueue: Send + Sync {
    async fn send(&self, message: OutgoingMessage) -> Result<(), QueueError>;
}

/// The application property `name` of a message. Names are matched without regard to case:
/// the REST API carries properties as HTTP headers, whose names HTTP clients may lowercase.
pub fn property<'a>(properties: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    properties.get(name).or_else(|| {
        properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// Application properties that carry a dead-letter reason, named as Service Bus names them on
/// its own dead-letter subqueue, and the app's own copy of them: a copy in `sync-deadletter`
/// that the broker moves to that queue's dead-letter subqueue (listing it counts as a
/// delivery) has Service Bus's stamped over with `MaxDeliveryCountExceeded`.
pub mod properties {
    pub const DEAD_LETTER_REASON: &str = "DeadLetterReason";
    pub const DEAD_LETTER_ERROR_DESCRIPTION: &str = "DeadLetterErrorDescription";
    pub const POISON_REASON: &str = "PoisonReason";
    pub const POISON_DESCRIPTION: &str = "PoisonDescription";
    pub const ORIGINAL_QUEUE: &str = "OriginalQueue";
    pub const ORIGINAL_MESSAGE_ID: &str = "OriginalMessageId";
    pub const ORIGINAL_DELIVERY_COUNT: &str = "OriginalDeliveryCount";
    pub const ORIGINAL_SESSION_ID: &str = "OriginalSessionId";
    /// Set on a message an operator replayed from the dead letters: the sequence number it
    /// had there. A replayed job runs even if its history says it finished.
    pub const REPLAYED_FROM: &str = "ReplayedFrom";

    /// The properties above, which a replay removes again.
    pub const ALL: [&str; 8] = [
        DEAD_LETTER_REASON,
        DEAD_LETTER_ERROR_DESCRIPTION,
        POISON_REASON,
        POISON_DESCRIPTION,
        ORIGINAL_QUEUE,
        ORIGINAL_MESSAGE_ID,
        ORIGINAL_DELIVERY_COUNT,
        ORIGINAL_SESSION_ID,
    ];
}

/// The copy of a poison `message` from `queue` to send to `sync-deadletter`. Its MessageId is
/// derived from the original's, so a redelivered poison message is dead-lettered once.
pub fn dead_letter(
    queue: &str,
    message: &ServiceBusMessage,
    reason: &str,
    description: &str,
) -> OutgoingMessage {
    let original_id = message
        .message_id
        .clone()
        .unwrap_or_else(|| format!("seq-{}", message.sequence_number.unwrap_or_default()));
    let mut copy = OutgoingMessage {
        queue: SYNC_DEADLETTER.to_string(),
        body: message.body.clone(),
        content_type: message.content_type.clone(),
        message_id: format!("{queue}:{original_id}"),
        session_id: None,
        correlation_id: message.correlation_id.clone(),
        scheduled_enqueue_time: None,
        properties: message.application_properties.clone(),
    }
    .property(properties::DEAD_LETTER_REASON, reason)
    .property(properties::DEAD_LETTER_ERROR_DESCRIPTION, description)
    .property(properties::POISON_REASON, reason)
    .property(properties::POISON_DESCRIPTION, description)
    .property(properties::ORIGINAL_QUEUE, queue)
    .property(properties::ORIGINAL_MESSAGE_ID, original_id)
    .property(properties::ORIGINAL_DELIVERY_COUNT, message.delivery_count);
    if let Some(session) = &message.session_id {
        copy = copy.property(properties::ORIGINAL_SESSION_ID, session.as_str());
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_id_past_service_bus_limit_is_shortened_the_same_way_every_time() {
        assert_eq!(broker_message_id("job-1:attempt-2"), "job-1:attempt-2");
        let at_limit = "x".repeat(MAX_MESSAGE_ID);
        assert_eq!(broker_message_id(&at_limit), at_limit);
        let base = format!(
            "wh_{}_{}",
            "4f1c2a9e-0b7d-4c55-9a57-1e2f3a4b5c6d",
            "é".repeat(60)
        );
        let (a, b) = (format!("{base}_Account"), format!("{base}_Contact"));
        let short = broker_message_id(&a);
        assert!(short.len() <= MAX_MESSAGE_ID, "{} bytes", short.len());
        assert!(short.starts_with("wh_4f1c2a9e"));
        assert_eq!(
            short,
            broker_message_id(&a),
            "the same id, the same MessageId"
        );
        assert_ne!(short, broker_message_id(&b), "two ids, two MessageIds");
    }
}
