//! Integration tests: the real `handler` binary driven the way the Functions host drives it,
//! and the embedded runtime driven the way an operator uses it.

mod fake_azure;
mod fake_dynamics;
mod fake_entra;
mod fake_gong;
mod fake_google_drive;
mod fake_graph;
mod fake_host;
mod fake_salesforce;
mod fake_zoom;
mod helpers;

mod azure_backends;
mod bulk_import_sync;
mod conformance;
mod cosmos_emulator;
mod cosmos_http;
mod cosmos_store;
mod credentials;
mod custom_handler;
mod demo;
mod dynamics_sync;
mod gong_sync;
mod google_drive_sync;
mod graph_sync;
mod infrastructure;
mod local_runtime;
mod operator_commands;
mod packaging;
mod salesforce_sync;
mod salesforce_webhook;
mod scheduler;
mod telemetry;
mod write_back;
mod write_failures;
mod zoom_sync;
