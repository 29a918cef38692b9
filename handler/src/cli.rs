//! The `handler` command line: the custom handler itself, the embedded runtime, and the
//! operator commands.
//!
//! With no subcommand the binary serves the custom handler, because that is how the Functions
//! host starts it (`defaultExecutablePath: "handler"`, no arguments). The operator commands
//! work on the backends the app is configured with (today the data directory's embedded
//! ones), print for people by default and JSON with `--json`, and never print a secret.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use serde_json::{Map, Value, json};

use crate::app::{self, App, DataDir, LocalBackends, QueueChoice};
use crate::engine::{self, scheduler, subscriptions};
use crate::identity::{AzureCredential, TokenSource};
use crate::model::conflict::Side;
use crate::model::shard::types as shard_types;
use crate::model::{Integration, IntegrationSync, Shard, timestamp};
use crate::queue::{
    DeadLetteredMessage, DeadLetters, OutgoingMessage, SYNC_INBOUND_SCHEDULED, Selection,
};
use crate::settings::{IngestionAuth, LogFormat, Settings};
use crate::store::{Op, ShardQuery, StoreError};
use crate::telemetry::{PrometheusText, Telemetry};
use crate::{local, logging, server};

/// Prints one line of a command's answer. A reader that stops reading (`| head`, a pager quit
/// early) is not an error of the command; `println!` would panic on the closed pipe, which
/// aborts the process.
macro_rules! say {
    ($($arg:tt)*) => {
        say_line(format_args!($($arg)*))
    };
}

fn say_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Once the reader has gone, the rest of the answer goes nowhere; the command still
    // finishes, and its exit status still says whether it did what was asked.
    static READER_GONE: AtomicBool = AtomicBool::new(false);
    if READER_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            READER_GONE.store(true, Ordering::Relaxed);
            return;
        }
        eprintln!("the answer could not be written: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "handler",
    version,
    about = "func-sync, the Castiel Sync Engine: Azure Functions custom handler, local runtime and operator commands"
)]
pub struct Cli {
    /// Data directory of the embedded backends [default: $FUNC_SYNC_DATA_DIR or .func-sync]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the custom handler for the Functions host (the default)
    Serve,
    /// Run all six functions on this machine with embedded queues, store and timers
    Local {
        /// Address of the webhook front door [default: $FUNC_SYNC_LOCAL_ADDR or 127.0.0.1:7071]
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Install the demo tenant: a bulk-import integration over bundled sample exports
        #[arg(long)]
        demo: bool,
    },
    /// The demo tenant's second export: changes, new records and deletions, synced now
    #[command(subcommand)]
    Demo(DemoCommand),
    /// Register, update or list integrations
    #[command(subcommand)]
    Integrations(IntegrationsCommand),
    /// Store an integration's credentials
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Enqueue a sync of an integration now
    Sync {
        /// The integration's id
        integration: String,
        #[arg(long)]
        tenant: String,
        /// Fetch everything, not only what changed since the last sync
        #[arg(long)]
        full: bool,
    },
    /// List sync history (c_integrationSync records), newest first
    History {
        #[arg(long)]
        tenant: String,
        /// Only this integration's syncs
        #[arg(long)]
        integration: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Aggregates per integration over the last DAYS days instead of the records: jobs,
        /// success rate, records, p50/p95 duration
        #[arg(long, value_name = "DAYS")]
        stats: Option<u32>,
    },
    /// Query shards by type, and optionally by external id; or change one as Castiel does
    #[command(args_conflicts_with_subcommands = true)]
    Shards {
        #[command(subcommand)]
        change: Option<ShardsCommand>,
        #[arg(long)]
        tenant: Option<String>,
        /// Shard type id, such as c_contact
        #[arg(long = "type", value_name = "SHARD_TYPE")]
        shard_type: Option<String>,
        /// Only shards synced from this external record id
        #[arg(long)]
        external_id: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Fields changed both in Castiel and at a provider, left for an operator
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// List or replay dead-lettered messages
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
pub enum ShardsCommand {
    /// Create or change a shard from a JSON file, as Castiel's shard service does, and send
    /// the write-backs it calls for
    Put { file: PathBuf },
    /// Delete a shard, as Castiel does (soft), and send the deletes it calls for
    Delete {
        id: String,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// Open conflicts of a tenant
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Settle a conflict by taking one side's values
    Resolve {
        /// The conflict's id, as `conflicts list` shows it
        id: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        take: TakeSide,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TakeSide {
    Castiel,
    Provider,
}

#[derive(Debug, Subcommand)]
pub enum IntegrationsCommand {
    /// Register or update an integration from a JSON file (a c_integration shard)
    Put { file: PathBuf },
    /// List integrations
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create, renew or delete an integration's provider-side webhook subscriptions now,
    /// instead of at TokenRefresher's next tick (needs the app's WEBHOOK_BASE_URL, and its
    /// WEBHOOK_FUNCTION_KEY where the host asks deliveries for one)
    Subscribe {
        /// The integration's id
        integration: String,
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Store credentials (a JSON object) read from a file, or from stdin without --file
    Set {
        /// The integration's id
        integration: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Drop the second export into the demo's import folder and enqueue a sync
    SecondDrop,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead-lettered messages of every queue
    List {
        /// Only messages that came from this queue
        #[arg(long)]
        queue: Option<String>,
    },
    /// Send dead-lettered messages back to the queue they came from
    Replay {
        /// Sequence numbers, as `dead-letters list` shows them
        sequence_numbers: Vec<i64>,
        /// Replay every dead-lettered message
        #[arg(long, conflicts_with = "sequence_numbers")]
        all: bool,
        /// Only messages that came from this queue (Service Bus numbers each queue's
        /// messages on its own, so a sequence number can be in two queues)
        #[arg(long)]
        queue: Option<String>,
    },
}

/// Runs the command line. Returns the process exit code.
pub async fn run(cli: Cli, mut settings: Settings) -> i32 {
    if let Some(dir) = &cli.data_dir {
        settings.data_dir = dir.clone();
    }
    let command = cli.command.unwrap_or(Command::Serve);
    let (default_format, destination) = match command {
        Command::Serve => (LogFormat::Json, logging::Destination::Stdout),
        Command::Local { .. } => (LogFormat::Text, logging::Destination::Stdout),
        _ => (LogFormat::Text, logging::Destination::Stderr),
    };
    let telemetry = match start_telemetry(&settings, &command) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    logging::init(
        settings.log_format.unwrap_or(default_format),
        destination,
        telemetry.tracer(),
    );
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }

    let backends = match LocalBackends::open(&settings) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    if !matches!(command, Command::Serve | Command::Local { .. })
        && let Some(warning) = mixed_backends(&settings, &backends.dir)
    {
        eprintln!("warning: {warning}");
    }
    let result = match command {
        Command::Serve => {
            let port = settings.port;
            match App::from_settings(
                settings,
                &backends,
                app::providers(),
                QueueChoice::Configured,
            )
            .await
            {
                Ok(app) => server::serve(app, port).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        }
        Command::Local { addr, demo } => {
            if let Some(addr) = addr {
                settings.local_addr = addr;
            }
            run_local(settings, backends, demo, telemetry.prometheus()).await
        }
        Command::DeadLetters(command) => match dead_letter_queues(&settings, &backends) {
            Ok(queues) => match command {
                DeadLettersCommand::List { queue } => {
                    list_dead_letters(queues.as_ref(), queue.as_deref(), cli.json).await
                }
                DeadLettersCommand::Replay {
                    sequence_numbers,
                    all,
                    queue,
                } => {
                    let selection = Selection {
                        all,
                        sequence_numbers,
                        queue,
                    };
                    replay_dead_letters(queues.as_ref(), &selection, cli.json).await
                }
            },
            Err(e) => Err(e),
        },
        operator => {
            match App::from_settings(
                settings,
                &backends,
                app::providers(),
                QueueChoice::Configured,
            )
            .await
            {
                Ok(app) => operate(operator, &backends, &app, cli.json).await,
                Err(e) => Err(e),
            }
        }
    };
    telemetry.shutdown();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// What an operator command would read and write in this data directory while the other
/// backends are in Azure. An operator who set `COSMOS_ENDPOINT` and forgot `KEY_VAULT_URL`
/// would otherwise store credentials no app in Azure reads, and be told they were stored. A
/// mix can be meant (a `handler local` on Cosmos DB reads the embedded queues), so it is said,
/// not refused.
fn mixed_backends(settings: &Settings, dir: &DataDir) -> Option<String> {
    let azure = &settings.azure;
    let backends = [
        (
            azure.cosmos.is_none(),
            "shards",
            dir.store(),
            "COSMOS_ENDPOINT",
        ),
        (
            azure.service_bus.is_none(),
            "jobs and write-backs",
            dir.runtime(),
            "ServiceBusConnection",
        ),
        (
            azure.key_vault_url.is_none(),
            "credentials",
            dir.secrets(),
            "KEY_VAULT_URL",
        ),
        (
            azure.event_grid.is_none(),
            "events",
            dir.events(),
            "EVENTGRID_ENDPOINT",
        ),
    ];
    let embedded: Vec<String> = backends
        .iter()
        .filter(|(embedded, ..)| *embedded)
        .map(|(_, what, path, setting)| {
            format!("{what} in {} ({setting} is not set)", path.display())
        })
        .collect();
    (!embedded.is_empty() && embedded.len() < backends.len()).then(|| {
        format!(
            "some backends are in Azure, but here this command would keep {}; only a `handler local` on this data directory reads those",
            embedded.join(", ")
        )
    })
}

/// Metrics and traces for the long-running commands: to Application Insights when it is
/// configured, and in Prometheus text for `handler local`. Operator commands record none.
fn start_telemetry(settings: &Settings, command: &Command) -> Result<Telemetry, String> {
    let (exported, prometheus) = match command {
        Command::Serve => (settings.azure.app_insights.as_ref(), false),
        Command::Local { .. } => (settings.azure.app_insights.as_ref(), true),
        _ => (None, false),
    };
    let entra = match exported.map(|s| &s.auth) {
        Some(IngestionAuth::Entra { client_id }) => {
            let client_id = client_id.as_deref().or(settings.azure.client_id.as_deref());
            let credential: Arc<dyn TokenSource> =
                Arc::new(AzureCredential::for_environment(client_id)?);
            Some(credential)
        }
        _ => None,
    };
    Telemetry::start(exported, entra, prometheus)
}

type CliResult = Result<(), String>;

/// `handler local`: the runtime on the configured store and secrets, consuming its embedded
/// queues itself whatever else is configured; with `demo`, the demo tenant installed first.
async fn run_local(
    settings: Settings,
    backends: LocalBackends,
    demo: bool,
    metrics: Option<PrometheusText>,
) -> CliResult {
    if settings.azure.service_bus.is_some() {
        tracing::warn!(
            "Service Bus is configured (ServiceBusConnection): this runtime delivers its own embedded queues, while operator commands (`sync`, `dead-letters`) send to and read Service Bus and never reach it; unset ServiceBusConnection for them to"
        );
    }
    let app =
        App::from_settings(settings, &backends, app::providers(), QueueChoice::Embedded).await?;
    if demo {
        let installed = crate::demo::install(&app, backends.dir.root()).await?;
        if installed {
            tracing::info!(
                tenant = crate::demo::TENANT,
                folder = %crate::demo::import_folder(backends.dir.root()).display(),
                "demo tenant installed; its first sync is on its way"
            );
        } else {
            tracing::info!(
                tenant = crate::demo::TENANT,
                "demo tenant already installed"
            );
        }
    }
    local::run(app, backends, metrics).await
}

/// Runs an operator command on the configured backends.
async fn operate(command: Command, backends: &LocalBackends, app: &App, json: bool) -> CliResult {
    match command {
        Command::Demo(DemoCommand::SecondDrop) => second_drop(backends, app, json).await,
        Command::Integrations(IntegrationsCommand::Put { file }) => {
            put_integration(app, &file, json).await
        }
        Command::Integrations(IntegrationsCommand::List { tenant }) => {
            list_integrations(app, tenant.as_deref(), json).await
        }
        Command::Integrations(IntegrationsCommand::Subscribe {
            integration,
            tenant,
        }) => subscribe(app, &tenant, &integration, json).await,
        Command::Credentials(CredentialsCommand::Set {
            integration,
            tenant,
            file,
        }) => set_credentials(app, &tenant, &integration, file, json).await,
        Command::Sync {
            integration,
            tenant,
            full,
        } => sync_now(app, &tenant, &integration, full, json).await,
        Command::History {
            tenant,
            integration,
            limit,
            stats: None,
        } => history(app, &tenant, integration.as_deref(), limit, json).await,
        Command::History {
            tenant,
            integration,
            stats: Some(days),
            ..
        } => history_stats(app, &tenant, integration.as_deref(), days, json).await,
        Command::Shards {
            change: Some(change),
            ..
        } => change_shard(app, change, json).await,
        Command::Shards {
            change: None,
            tenant,
            shard_type,
            external_id,
            limit,
        } => {
            let (Some(tenant), Some(shard_type)) = (tenant, shard_type) else {
                return Err("name the shards: --tenant T --type SHARD_TYPE".into());
            };
            shards(
                app,
                &tenant,
                &shard_type,
                external_id.as_deref(),
                limit,
                json,
            )
            .await
        }
        Command::Conflicts(command) => conflicts(app, command, json).await,
        Command::Serve | Command::Local { .. } | Command::DeadLetters(_) => {
            unreachable!("served, run or listed before the operator commands")
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("output serializes")
    );
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

fn store_error(e: StoreError) -> String {
    e.to_string()
}

async fn load_integration(
    app: &App,
    tenant: &str,
    id: &str,
) -> Result<(Shard, String, Integration), String> {
    let stored = app
        .store
        .get(tenant, id)
        .await
        .map_err(store_error)?
        .filter(|s| s.value.shard_type_id == shard_types::INTEGRATION)
        .ok_or_else(|| format!("integration `{id}` of tenant `{tenant}` does not exist"))?;
    let integration = stored
        .value
        .data()
        .map_err(|e| format!("integration `{id}` is invalid: {e}"))?;
    Ok((stored.value, stored.etag, integration))
}

/// Fields of an integration that the engine maintains; a file that leaves them out keeps the
/// stored values.
async fn put_integration(app: &App, file: &PathBuf, json: bool) -> CliResult {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut doc: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a JSON object: {e}", file.display()))?;
    match doc.get("shardTypeId") {
        None => {
            doc.insert("shardTypeId".into(), json!(shard_types::INTEGRATION));
        }
        Some(Value::String(t)) if t == shard_types::INTEGRATION => {}
        Some(other) => {
            return Err(format!(
                "shardTypeId must be `{}`, found {other}",
                shard_types::INTEGRATION
            ));
        }
    }
    let shard: Shard = serde_json::from_value(Value::Object(doc))
        .map_err(|e| format!("{} is not an integration: {e}", file.display()))?;
    let registered = engine::integrations::register(app, shard, Utc::now())
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    for note in &registered.notes {
        eprintln!("note: {note}");
    }
    if json {
        print_json(&registered.shard);
    } else {
        let shard = &registered.shard;
        say!(
            "{} integration `{}` of tenant `{}` ({}); next sync: {}",
            if registered.updated {
                "updated"
            } else {
                "registered"
            },
            shard.id,
            shard.tenant_id,
            registered.integration.provider_name,
            registered
                .integration
                .next_sync_at
                .map_or("manual only".into(), |t| time(Some(t)))
        );
    }
    Ok(())
}

async fn subscribe(app: &App, tenant: &str, id: &str, json: bool) -> CliResult {
    let (shard, _, integration) = load_integration(app, tenant, id).await?;
    let provider = app
        .providers
        .get(&integration.provider_name)
        .ok_or_else(|| {
            format!(
                "this build has no adapter for `{}`",
                integration.provider_name
            )
        })?;
    if provider.subscriptions().is_none() {
        return Err(format!(
            "`{}` keeps no provider-side subscriptions",
            integration.provider_name
        ));
    }
    let done = subscriptions::maintain(app, &shard, &integration, provider.as_ref(), Utc::now())
        .await
        .map_err(|e| e.to_string())?;
    let refused: Vec<Value> = done
        .refused
        .iter()
        .map(|r| json!({"resource": r.resource, "error": r.failure.to_string()}))
        .collect();
    if json {
        print_json(&json!({
            "created": done.created, "renewed": done.renewed, "deleted": done.deleted,
            "refused": refused
        }));
    } else {
        say!(
            "subscriptions of `{id}`: {} created, {} renewed, {} deleted",
            done.created,
            done.renewed,
            done.deleted
        );
    }
    match done.refused.as_slice() {
        [] => Ok(()),
        refused => Err(format!(
            "the provider refused {} of `{id}`'s subscriptions: {}",
            refused.len(),
            refused
                .iter()
                .map(|r| format!("{} ({})", r.resource, r.failure))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

async fn list_integrations(app: &App, tenant: Option<&str>, json: bool) -> CliResult {
    let mut query = ShardQuery::of_type(shard_types::INTEGRATION);
    query.tenant_id = tenant.map(str::to_string);
    let found = app.store.query(&query).await.map_err(store_error)?;
    if json {
        print_json(&found.iter().map(|v| &v.value).collect::<Vec<_>>());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|v| {
            let s = &v.value;
            let i: Option<Integration> = s.data().ok();
            vec![
                s.tenant_id.clone(),
                s.id.clone(),
                s.name.clone(),
                i.as_ref().map_or("?".into(), |i| i.provider_name.clone()),
                i.as_ref().map_or("invalid".into(), |i| {
                    format!("{:?}", i.status).to_lowercase()
                }),
                time(i.as_ref().and_then(|i| i.last_sync_at)),
                time(i.as_ref().and_then(|i| i.next_sync_at)),
            ]
        })
        .collect();
    print_table(
        &[
            "TENANT",
            "ID",
            "NAME",
            "PROVIDER",
            "STATUS",
            "LAST SYNC",
            "NEXT SYNC",
        ],
        &rows,
    );
    Ok(())
}

async fn set_credentials(
    app: &App,
    tenant: &str,
    integration_id: &str,
    file: Option<PathBuf>,
    json: bool,
) -> CliResult {
    // The input first: pasting it may take a while, and nothing is read or held meanwhile.
    let mut text = String::new();
    match &file {
        Some(path) => {
            text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        }
        None => {
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
        }
    }
    // Parse errors can quote the input, which is a secret: report only the position.
    let credentials: Map<String, Value> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "credentials must be a JSON object (invalid at line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    load_integration(app, tenant, integration_id).await?;
    let (name, expires_at) =
        crate::engine::credentials::replace(app, tenant, integration_id, credentials)
            .await
            .map_err(|e| e.message)?;
    if json {
        print_json(
            &json!({"integrationId": integration_id, "tenantId": tenant, "secretName": name,
                           "expiresAt": expires_at.map(|t| timestamp::format(&t))}),
        );
    } else {
        say!("stored credentials of `{integration_id}` as secret `{name}`");
    }
    Ok(())
}

async fn sync_now(
    app: &App,
    tenant: &str,
    integration_id: &str,
    full: bool,
    json: bool,
) -> CliResult {
    let (shard, _, integration) = load_integration(app, tenant, integration_id).await?;
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let job = scheduler::manual_job(&shard, &integration, full, Utc::now(), &user);
    app.queue
        .send(OutgoingMessage::json(
            SYNC_INBOUND_SCHEDULED,
            job.job_id.clone(),
            &job,
        ))
        .await
        .map_err(|e| e.to_string())?;
    if json {
        print_json(&job);
    } else {
        say!(
            "enqueued {:?} sync job `{}` for `{integration_id}`",
            job.job_type,
            job.job_id
        );
    }
    Ok(())
}

async fn second_drop(backends: &LocalBackends, app: &App, json: bool) -> CliResult {
    let folder = crate::demo::second_drop(backends.dir.root())?;
    if !json {
        say!("second export written to {}", folder.display());
    }
    sync_now(
        app,
        crate::demo::TENANT,
        crate::demo::INTEGRATION,
        false,
        json,
    )
    .await
}

async fn history_stats(
    app: &App,
    tenant: &str,
    integration: Option<&str>,
    days: u32,
    json: bool,
) -> CliResult {
    let since = Utc::now()
        .checked_sub_signed(chrono::Duration::days(i64::from(days)))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut query = ShardQuery::of_type(shard_types::INTEGRATION_SYNC)
        .in_tenant(tenant)
        .filter(
            "structuredData.startedAt",
            Op::Ge,
            json!(since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
    if let Some(id) = integration {
        query = query.filter("structuredData.integrationId", Op::Eq, json!(id));
    }
    let found = app.store.query(&query).await.map_err(store_error)?;
    let records: Vec<IntegrationSync> = found.iter().filter_map(|v| v.value.data().ok()).collect();
    let stats = crate::model::history::stats_per_integration(&records);
    if json {
        print_json(&stats);
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map_or("-".into(), |ms| format!("{ms} ms"));
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.integration_id.clone(),
                s.jobs.to_string(),
                format!("{:.1}%", s.success_rate * 100.0),
                s.failed.to_string(),
                s.records_fetched.to_string(),
                s.shards_written.to_string(),
                ms(s.p50_duration_ms),
                ms(s.p95_duration_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "INTEGRATION",
            "JOBS",
            "SUCCESS",
            "FAILED",
            "FETCHED",
            "WRITTEN",
            "P50",
            "P95",
        ],
        &rows,
    );
    Ok(())
}

async fn history(
    app: &App,
    tenant: &str,
    integration: Option<&str>,
    limit: usize,
    json: bool,
) -> CliResult {
    let mut query = ShardQuery::of_type(shard_types::INTEGRATION_SYNC)
        .in_tenant(tenant)
        .order_by("structuredData.startedAt", true)
        .limit(limit);
    if let Some(id) = integration {
        query = query.filter("structuredData.integrationId", Op::Eq, json!(id));
    }
    let found = app.store.query(&query).await.map_err(store_error)?;
    if json {
        print_json(&found.iter().map(|v| &v.value).collect::<Vec<_>>());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|v| match v.value.data::<IntegrationSync>() {
            Ok(r) => vec![
                v.value.id.clone(),
                r.integration_id.clone(),
                format!("{:?}", r.job_type).to_lowercase(),
                format!("{:?}", r.status).to_lowercase(),
                time(Some(r.started_at)),
                r.duration_ms.map_or("-".into(), |ms| format!("{ms} ms")),
                format!(
                    "{}/{}/{}/{}/{}",
                    r.stats.records_fetched,
                    r.stats.shards_created,
                    r.stats.shards_updated,
                    r.stats.shards_skipped,
                    r.stats.shards_failed
                ),
                r.status_message.unwrap_or_default(),
            ],
            Err(e) => vec![v.value.id.clone(), format!("unreadable: {e}")],
        })
        .collect();
    print_table(
        &[
            "ID",
            "INTEGRATION",
            "TYPE",
            "STATUS",
            "STARTED",
            "DURATION",
            "FETCHED/CREATED/UPDATED/SKIPPED/FAILED",
            "MESSAGE",
        ],
        &rows,
    );
    Ok(())
}

async fn shards(
    app: &App,
    tenant: &str,
    shard_type: &str,
    external_id: Option<&str>,
    limit: usize,
    json: bool,
) -> CliResult {
    let mut query = ShardQuery::of_type(shard_type)
        .in_tenant(tenant)
        .limit(limit);
    if let Some(id) = external_id {
        query = query.with_external_id(id);
    }
    let found = app.store.query(&query).await.map_err(store_error)?;
    if json {
        print_json(&found.iter().map(|v| &v.value).collect::<Vec<_>>());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|v| {
            let s = &v.value;
            let external: Vec<String> = s
                .external_relationships
                .iter()
                .map(|r| format!("{}:{}", r.integration_id, r.external_id))
                .collect();
            vec![
                s.id.clone(),
                s.name.clone(),
                external.join(","),
                time(s.updated_at),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "EXTERNAL", "UPDATED"], &rows);
    Ok(())
}

/// `shards put` and `shards delete`: the change, then what it sent.
async fn change_shard(app: &App, change: ShardsCommand, json: bool) -> CliResult {
    let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let now = Utc::now();
    let sent = match change {
        ShardsCommand::Put { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let shard: Shard = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a shard: {e}", file.display()))?;
            engine::shards::put(app, shard, &user, now).await
        }
        ShardsCommand::Delete { id, tenant } => {
            engine::shards::delete(app, &tenant, &id, &user, now).await
        }
    }
    .map_err(|e| e.to_string())?;
    if json {
        let out: Vec<Value> = sent
            .iter()
            .map(|o| json!({"integrationId": o.integration_id, "messageId": o.message_id, "writeBack": o.message}))
            .collect();
        print_json(&out);
    } else if sent.is_empty() {
        say!("changed; no integration writes it back");
    } else {
        for o in &sent {
            say!(
                "changed; {:?} sent to {} (sync-outbound, session {})",
                o.message.operation,
                o.integration_id,
                o.integration_id
            );
        }
    }
    Ok(())
}

/// `conflicts list` and `conflicts resolve`.
async fn conflicts(app: &App, command: ConflictsCommand, json: bool) -> CliResult {
    match command {
        ConflictsCommand::List { tenant } => {
            let open = engine::conflicts::open(app, &tenant)
                .await
                .map_err(|e| e.to_string())?;
            if json {
                print_json(
                    &open
                        .iter()
                        .map(|(id, c)| json!({"id": id, "conflict": c}))
                        .collect::<Vec<_>>(),
                );
                return Ok(());
            }
            let rows: Vec<Vec<String>> = open
                .iter()
                .map(|(id, c)| {
                    let fields: Vec<&str> = c.fields.iter().map(|f| f.field.as_str()).collect();
                    vec![
                        id.clone(),
                        c.integration_id.clone(),
                        c.shard_id.clone(),
                        fields.join(","),
                        time(Some(c.detected_at)),
                    ]
                })
                .collect();
            print_table(&["ID", "INTEGRATION", "SHARD", "FIELDS", "DETECTED"], &rows);
            Ok(())
        }
        ConflictsCommand::Resolve { id, tenant, take } => {
            let user = std::env::var("USER").unwrap_or_else(|_| "operator".into());
            let side = match take {
                TakeSide::Castiel => Side::Castiel,
                TakeSide::Provider => Side::Provider,
            };
            let sent = engine::conflicts::resolve(app, &tenant, &id, side, &user, Utc::now())
                .await
                .map_err(|e| e.to_string())?;
            if json {
                print_json(&json!({"id": id, "taken": side, "writeBacks": sent.len()}));
            } else {
                say!(
                    "resolved {id}: took {side:?}'s values ({} write-backs sent)",
                    sent.len()
                );
            }
            Ok(())
        }
    }
}

/// The dead letters of the queues the app sends to: Service Bus when it is configured, the
/// embedded queues otherwise.
fn dead_letter_queues(
    settings: &Settings,
    backends: &LocalBackends,
) -> Result<Box<dyn DeadLetters>, String> {
    match &settings.azure.service_bus {
        Some(setting) => Ok(Box::new(app::service_bus_client(setting, |client_id| {
            AzureCredential::for_environment(client_id.or(settings.azure.client_id.as_deref()))
        })?)),
        None => Ok(Box::new(backends.broker.clone())),
    }
}

/// A dead letter as `dead-letters list --json` prints it.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct DeadLetterView<'a> {
    sequence_number: i64,
    original_queue: &'a str,
    message_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
    reason: &'a str,
    description: Option<&'a str>,
    dead_lettered_at: DateTime<Utc>,
    delivery_count: u32,
    body: Value,
}

impl<'a> From<&'a DeadLetteredMessage> for DeadLetterView<'a> {
    fn from(d: &'a DeadLetteredMessage) -> Self {
        Self {
            sequence_number: d.sequence_number,
            original_queue: &d.original_queue,
            message_id: &d.message_id,
            session_id: d.session_id.as_deref(),
            reason: &d.reason,
            description: d.description.as_deref(),
            dead_lettered_at: d.dead_lettered_at,
            delivery_count: d.delivery_count,
            body: serde_json::from_slice(&d.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.body).into())),
        }
    }
}

async fn list_dead_letters(queues: &dyn DeadLetters, queue: Option<&str>, json: bool) -> CliResult {
    if let Some(queue) = queue {
        crate::queue::check_queue(queue)?;
    }
    let listed = queues.list().await.map_err(|e| e.to_string())?;
    let views: Vec<DeadLetterView> = listed
        .iter()
        .filter(|d| queue.is_none_or(|q| d.original_queue == q))
        .map(DeadLetterView::from)
        .collect();
    if json {
        print_json(&views);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.sequence_number.to_string(),
                v.original_queue.to_string(),
                v.message_id.to_string(),
                v.reason.to_string(),
                time(Some(v.dead_lettered_at)),
                v.delivery_count.to_string(),
                v.description.unwrap_or_default().to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "SEQ",
            "QUEUE",
            "MESSAGE ID",
            "REASON",
            "DEAD-LETTERED",
            "DELIVERIES",
            "DESCRIPTION",
        ],
        &rows,
    );
    Ok(())
}

async fn replay_dead_letters(
    queues: &dyn DeadLetters,
    selection: &Selection,
    json: bool,
) -> CliResult {
    let listed = queues.list().await.map_err(|e| e.to_string())?;
    selection.check(&listed)?;
    let replayed = queues.replay(selection).await.map_err(|e| e.to_string())?;
    let failed = replayed.iter().filter(|r| r.error.is_some()).count();
    let left = replayed.iter().filter(|r| r.left.is_some()).count();
    if json {
        let out: Vec<Value> = replayed
            .iter()
            .map(|r| {
                json!({"sequenceNumber": r.sequence_number, "queue": r.queue,
                       "messageId": r.message_id, "error": r.error, "stillListed": r.left})
            })
            .collect();
        print_json(&out);
    } else {
        for r in &replayed {
            match (&r.error, &r.left) {
                (None, None) => say!(
                    "replayed {} to {} as {}",
                    r.sequence_number,
                    r.queue,
                    r.message_id
                ),
                (None, Some(why)) => say!(
                    "replayed {} to {} as {}, but it is still listed ({why}): a replay of it \
                     within 10 minutes is dropped as a duplicate, a later one runs it again",
                    r.sequence_number,
                    r.queue,
                    r.message_id
                ),
                (Some(e), _) => say!(
                    "not replayed {} to {} (still dead-lettered): {e}",
                    r.sequence_number,
                    r.queue
                ),
            }
        }
    }
    if failed > 0 {
        return Err(format!(
            "{failed} of {} messages could not be sent and are still dead-lettered",
            replayed.len()
        ));
    }
    if left > 0 {
        return Err(format!(
            "{left} of {} messages were replayed but are still listed as dead letters",
            replayed.len()
        ));
    }
    // Listed a moment before, and not met by the replay: replayed by another operator
    // meanwhile, or held by another reader past the replay's wait.
    let unmet: Vec<String> = selection
        .sequence_numbers
        .iter()
        .filter(|n| !selection.all && !replayed.iter().any(|r| r.sequence_number == **n))
        .map(i64::to_string)
        .collect();
    if !unmet.is_empty() {
        return Err(format!(
            "dead letters {} were not replayed: they were gone or held by another reader when \
             the replay came to them; list the dead letters again",
            unmet.join(", ")
        ));
    }
    Ok(())
}
