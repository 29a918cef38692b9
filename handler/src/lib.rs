//! func-sync: the Castiel Sync Engine, an Azure Functions app whose custom handler is this
//! crate's `handler` binary.
//!
//! The engine keeps Castiel's shards in sync with the systems tenants use. Six functions do
//! the work: WebhookReceiver turns provider webhooks into jobs, SyncScheduler enqueues due
//! syncs, SyncInboundScheduled and SyncInboundWebhook run jobs into shards and record each run
//! as a `c_integrationSync` history shard, SyncOutbound writes changes back, and
//! TokenRefresher keeps OAuth credentials fresh.
//!
//! The major components are:
//!
//! * [`server`]: the HTTP server the Functions host invokes, speaking [`protocol`].
//! * [`functions`]: one module per function, reading the trigger and calling the engine.
//! * [`engine`]: the sync logic, plain functions over [`model`] data plus thin async drivers.
//! * [`store`], [`queue`], [`secrets`], [`events`]: the I/O edges, each a small trait with an
//!   embedded implementation for running on one machine.
//! * [`local`]: `handler local`, an embedded Functions runtime that runs all six functions
//!   in one process with durable local queues, timers and a webhook front door.
//! * [`telemetry`]: the eight sync metrics and per-invocation traces, to Application Insights
//!   in Azure and as Prometheus text at `handler local`'s `/metrics`.
//! * [`cli`]: operator commands over the same backends; [`demo`]: the demo tenant.
//! * [`definition`]: the function.json files, embedded, as the single source of routes,
//!   schedules and queues.

pub mod app;
pub mod cli;
pub mod definition;
pub mod demo;
pub mod engine;
pub mod events;
pub mod functions;
pub mod identity;
pub mod local;
pub mod logging;
pub mod model;
mod native;
pub mod ncrontab;
pub mod protocol;
pub mod queue;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
