//! `handler local`: the whole app on one machine, with no Azure and no Core Tools.
//!
//! The embedded runtime plays the Functions host: it invokes the same custom-handler code with
//! the same envelopes ([`envelopes`], [`invoker`]), fires the timers on their NCRONTAB
//! schedules ([`timers`]), delivers queue messages with peek-lock semantics ([`consumers`]),
//! and serves the HTTP-triggered functions under `/api` ([`front_door`]). All state lives in
//! the data directory and survives a restart, including a kill -9 in the middle of a delivery:
//! the message's lock is released at the next start and it is delivered again.

pub mod consumers;
pub mod envelopes;
pub mod front_door;
pub mod invoker;
pub mod timers;

use std::fs::File;

use tokio::sync::watch;

use crate::app::{App, LocalBackends};
use crate::definition::{AppDefinition, Trigger};
use crate::server;
use crate::telemetry::PrometheusText;
use consumers::Consumer;
use invoker::Invoker;
use timers::{Timer, TimerStatusStore};

/// Service Bus trigger concurrency, as host.json sets it (`maxConcurrentCalls`,
/// `maxConcurrentSessions` × `maxConcurrentCallsPerSession`).
const MAX_CONCURRENT_CALLS: usize = 16;
const MAX_CONCURRENT_SESSIONS: usize = 8;

/// Runs the embedded runtime until SIGTERM or Ctrl-C.
pub async fn run(
    app: App,
    backends: LocalBackends,
    metrics: Option<PrometheusText>,
) -> Result<(), String> {
    let lock_path = backends.dir.runtime_lock();
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        format!(
            "another `handler local` is already running on {}",
            backends.dir.root().display()
        )
    })?;
    // As the host's handler does: the first sync does not wait for the HTTP client.
    tokio::task::spawn_blocking(adapters::http::warm_up);

    let released = backends.broker.release_locks().map_err(|e| e.to_string())?;
    if released > 0 {
        tracing::info!(
            released,
            "messages that were being delivered when the runtime stopped will be delivered again"
        );
    }
    let timer_statuses =
        TimerStatusStore::open(&backends.dir.runtime()).map_err(|e| e.to_string())?;
    let settings = app.settings.clone();
    // The port first: a runtime that cannot listen (the port taken) must stop before its
    // consumers take a delivery, which would count against the message, or its timers fire.
    let listener = tokio::net::TcpListener::bind(settings.local_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.local_addr))?;
    let invoker = Invoker::new(server::router(app));
    let (stop, stopped) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    for def in &AppDefinition::embedded().functions {
        match &def.trigger {
            Trigger::ServiceBus {
                binding,
                queue,
                sessions,
            } => {
                let consumer = Consumer {
                    function: def.name,
                    binding: binding.clone(),
                    queue: queue.clone(),
                    concurrency: if *sessions {
                        MAX_CONCURRENT_SESSIONS
                    } else {
                        MAX_CONCURRENT_CALLS
                    },
                };
                tasks.spawn(consumer.run(
                    backends.broker.clone(),
                    invoker.clone(),
                    stopped.clone(),
                ));
            }
            Trigger::Timer { binding, schedule } => {
                let timer = Timer {
                    function: def.name,
                    binding: binding.clone(),
                    schedule: schedule.clone(),
                };
                tasks.spawn(timer.run(timer_statuses.clone(), invoker.clone(), stopped.clone()));
            }
            Trigger::Http { .. } => {}
        }
    }

    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, data_dir = %backends.dir.root().display(), "func-sync running locally; webhooks at http://{addr}/api/webhooks/{{provider}}");
    let key = settings.webhook_function_key.clone();
    let front_door = axum::serve(listener, front_door::router(&invoker, metrics, key))
        .with_graceful_shutdown(server::shutdown_signal());
    let result = front_door.await.map_err(|e| e.to_string());

    tracing::info!("stopping: finishing the invocations in flight");
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    drop(lock);
    result
}
