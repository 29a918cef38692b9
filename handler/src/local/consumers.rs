//! Queue consumers: the Service Bus trigger of the embedded runtime.
//!
//! One consumer per queue-triggered function receives peek-locked messages, invokes the
//! function with the host's envelope, and completes the message when the invocation succeeds
//! or abandons it when it fails, exactly as the Functions host with `autoCompleteMessages`
//! does, renewing the message's lock while the invocation runs. Up to `concurrency` invocations run at once; session queues hand out one message per
//! session at a time, so sessions stay in order whatever the concurrency.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::envelopes;
use super::invoker::{Invoker, Outcome};
use crate::definition::FunctionName;
use crate::queue::{LocalBroker, ReceivedMessage};

/// How often a consumer looks for messages sent by another process (an operator command);
/// sends from this process wake it at once.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How long after a message is received its lock is still renewed while its invocation runs
/// (host.json's `maxAutoLockRenewalDuration`).
const MAX_LOCK_RENEWAL: chrono::Duration = chrono::Duration::minutes(10);

/// The lock of a queue with no settings of its own (every sync queue has them).
const DEFAULT_LOCK: Duration = Duration::from_secs(60);

pub struct Consumer {
    pub function: FunctionName,
    pub binding: String,
    pub queue: String,
    pub concurrency: usize,
}

impl Consumer {
    pub async fn run(
        self,
        broker: LocalBroker,
        invoker: Invoker,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let arrivals = broker.arrivals();
        let mut in_flight = JoinSet::new();
        let this = Arc::new(self);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let notified = arrivals.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.changed() => break,
            };
            let received = {
                let (broker, queue) = (broker.clone(), this.queue.clone());
                tokio::task::spawn_blocking(move || broker.receive_at(&queue, Utc::now())).await
            };
            match received {
                Ok(Ok(Some(message))) => {
                    let (this, broker, invoker) = (this.clone(), broker.clone(), invoker.clone());
                    in_flight.spawn(async move {
                        this.deliver(&broker, &invoker, message).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(Ok(None)) => drop(permit),
                Ok(Err(e)) => {
                    drop(permit);
                    tracing::error!(queue = %this.queue, error = %e, "receiving failed");
                }
                Err(e) => {
                    drop(permit);
                    tracing::error!(queue = %this.queue, error = %e, "receiving failed");
                }
            }
            while in_flight.try_join_next().is_some() {}
            let wait = broker
                .next_wakeup(&this.queue, Utc::now())
                .ok()
                .flatten()
                .and_then(|at| (at - Utc::now()).to_std().ok())
                .map_or(POLL_INTERVAL, |d| d.min(POLL_INTERVAL));
            tokio::select! {
                _ = &mut notified => {},
                _ = tokio::time::sleep(wait) => {},
                _ = shutdown.changed() => {},
            }
        }
        // Let in-flight invocations finish and settle their messages.
        while in_flight.join_next().await.is_some() {}
    }

    async fn deliver(&self, broker: &LocalBroker, invoker: &Invoker, message: ReceivedMessage) {
        let envelope = envelopes::service_bus(self.function, &self.binding, &message, Utc::now());
        let outcome = {
            let invocation = invoker.invoke(self.function, &envelope);
            tokio::pin!(invocation);
            // As the host does (host.json's maxAutoLockRenewalDuration): the lock of a message
            // whose invocation runs longer than the lock lasts is renewed, for up to 10 minutes,
            // so the message is not delivered a second time while the first still runs.
            let lock = chrono::Duration::from_std(
                crate::queue::queue_settings(&self.queue).map_or(DEFAULT_LOCK, |s| s.lock_duration),
            )
            .unwrap_or_default();
            // Renewed until 10 minutes past the lock it was received with, each renewal for a
            // whole lock: an invocation stopped at the function timeout (as long) is abandoned
            // while its lock still holds.
            let renew_until = message.locked_until + MAX_LOCK_RENEWAL;
            let mut locked_until = message.locked_until;
            loop {
                let renew_at = locked_until - lock / 2;
                let wait = (renew_at - Utc::now()).to_std().unwrap_or_default();
                tokio::select! {
                    outcome = &mut invocation => break outcome,
                    () = tokio::time::sleep(wait), if locked_until < renew_until => {
                        let until = (Utc::now() + lock).min(renew_until);
                        match broker.renew_lock(&message, until) {
                            Ok(true) => locked_until = until,
                            Ok(false) | Err(_) => locked_until = renew_until,
                        }
                    }
                }
            }
        };
        let settled = match &outcome {
            Outcome::Succeeded(_) => broker.complete(&message),
            Outcome::Failed(reason) => {
                tracing::warn!(
                    function = %self.function, message_id = %message.message_id,
                    delivery_count = message.delivery_count, %reason,
                    "invocation failed; message abandoned"
                );
                broker.abandon(&message, reason, Utc::now())
            }
        };
        if let Err(e) = settled {
            tracing::error!(function = %self.function, message_id = %message.message_id, error = %e, "settling a message failed; it will be redelivered");
        }
    }
}
