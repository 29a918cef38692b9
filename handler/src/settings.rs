//! App settings: read once from the environment at start-up, validated as a whole.
//!
//! In Azure the app settings of the function app become environment variables of the host,
//! and the custom handler inherits them; `func start` does the same with the `Values` of
//! `local.settings.json`. `handler local` reads the same names, so one set of settings describes
//! every way of running the app. Every setting has a default that works on one machine with no
//! cloud account.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A value the app reads from its environment, with its default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Settings read but doubtful (a Key Vault reference the platform left unresolved), to be
    /// logged once logging has started: they are read before it is.
    pub warnings: Vec<String>,
    /// Where the embedded backends keep their state (shards, queues, secrets, events).
    pub data_dir: PathBuf,
    /// Port the custom handler listens on; the Functions host picks it at each start.
    pub port: u16,
    /// Address of the embedded runtime's HTTP front door (`handler local`).
    pub local_addr: SocketAddr,
    /// `json` (one object a line, for log collectors) or `text` (for people).
    pub log_format: Option<LogFormat>,
    /// How long a MessageId is remembered by the embedded queues' duplicate detection.
    pub duplicate_detection_window: Duration,
    /// Whether TokenRefresher refreshes anything.
    pub token_refresh_enabled: bool,
    /// TokenRefresher refreshes credentials that expire within this window.
    pub token_refresh_threshold: Duration,
    /// A sync job stops after this many records; a continuation job does the rest.
    pub max_records_per_sync: u64,
    /// The scheduler never syncs an integration more often than this.
    pub min_sync_interval: Duration,
    /// The scheduler runs at most this many syncs of one tenant at once; more wait.
    pub max_concurrent_syncs_per_tenant: usize,
    /// Delay before the first retry of a failed shard write (then 2×, 4×, ±20%).
    pub record_retry_base: Duration,
    /// How long a sync's history record is kept: `HISTORY_RETENTION_DAYS` (default 30), or a
    /// tenant's own plan retention from `HISTORY_RETENTION_DAYS_BY_TENANT` (`t1=7,t2=90`).
    pub history_retention: HistoryRetention,
    /// `WEBHOOK_BASE_URL`: where providers reach this app (`https://func-sync-prod.azurewebsites.net`);
    /// provider-side subscriptions deliver to `{it}/api/webhooks/{provider}`.
    pub webhook_base_url: Option<String>,
    /// `WEBHOOK_FUNCTION_KEY`: the Functions key WebhookReceiver's `function` auth level asks
    /// of every delivery (`?code=`). The URLs the engine registers with providers carry it, and
    /// `handler local` asks for it as the host does. In Azure it is a Key Vault reference to the
    /// secret `webhook-function-key`; one the platform could not resolve yet counts as unset.
    pub webhook_function_key: Option<crate::secrets::Secret>,
    /// Azure backends to use instead of the embedded ones, each when its settings are present.
    pub azure: AzureSettings,
}

/// How long history records are kept, per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRetention {
    pub days: u32,
    pub by_tenant: std::collections::BTreeMap<String, u32>,
}

impl HistoryRetention {
    /// The `ttl`, in seconds, of a history record of `tenant`.
    pub fn ttl_seconds(&self, tenant: &str) -> i64 {
        i64::from(*self.by_tenant.get(tenant).unwrap_or(&self.days)) * 24 * 60 * 60
    }
}

/// The Azure services the app uses when configured.
#[derive(Debug, Clone, Default)]
pub struct AzureSettings {
    pub service_bus: Option<ServiceBusSetting>,
    /// `KEY_VAULT_URL`: `https://<name>.vault.azure.net/`.
    pub key_vault_url: Option<String>,
    pub event_grid: Option<EventGridSetting>,
    /// `AZURE_CLIENT_ID`: a user-assigned managed identity to use for Entra tokens.
    pub client_id: Option<String>,
    pub cosmos: Option<CosmosSetting>,
    pub app_insights: Option<AppInsightsSetting>,
}

/// Where metrics and traces go in Azure: `APPLICATIONINSIGHTS_CONNECTION_STRING` and, for
/// ingestion under Entra, `APPLICATIONINSIGHTS_AUTHENTICATION_STRING`.
#[derive(Clone)]
pub struct AppInsightsSetting {
    pub connection_string: String,
    pub auth: IngestionAuth,
    /// The connection string's `IngestionEndpoint` when it is plain http to a loopback address
    /// (a local stand-in for Azure Monitor): its authority, which the exporter would otherwise
    /// reach over https.
    pub loopback_http: Option<String>,
}

impl std::fmt::Debug for AppInsightsSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppInsights({:?})", self.auth)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestionAuth {
    /// The instrumentation key of the connection string alone.
    Key,
    /// A managed identity's token (`Authorization=AAD[;ClientId=<id>]`); the identity needs
    /// Monitoring Metrics Publisher on the Application Insights resource.
    Entra { client_id: Option<String> },
}

/// Reads `APPLICATIONINSIGHTS_AUTHENTICATION_STRING`: `Authorization=AAD`, optionally with
/// `;ClientId=<user-assigned identity's client id>`.
fn ingestion_auth(value: &str) -> Result<IngestionAuth, String> {
    let mut aad = false;
    let mut client_id = None;
    for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((name, v)) if name.eq_ignore_ascii_case("Authorization") => {
                aad = v.eq_ignore_ascii_case("AAD");
            }
            Some((name, v)) if name.eq_ignore_ascii_case("ClientId") => {
                client_id = Some(v.to_string());
            }
            _ => {
                return Err(
                    "expected `Authorization=AAD` or `Authorization=AAD;ClientId=<id>`".into(),
                );
            }
        }
    }
    if aad {
        Ok(IngestionAuth::Entra { client_id })
    } else {
        Err("only `Authorization=AAD` is supported".into())
    }
}

/// Where the shards live in Cosmos DB.
#[derive(Clone)]
pub struct CosmosSetting {
    /// `COSMOS_ENDPOINT`: `https://<account>.documents.azure.com:443/`.
    pub endpoint: String,
    /// `COSMOS_KEY`: the account key; managed identity when absent.
    pub key: Option<String>,
    /// `COSMOS_DATABASE` (default `castiel`) and `COSMOS_CONTAINER` (default `shards`).
    pub database: String,
    pub container: String,
    /// `COSMOS_REGION` (default: the app's `REGION_NAME`, else `eastus`): requests go to the
    /// account's regions nearest to it.
    pub region: String,
}

impl std::fmt::Debug for CosmosSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cosmos({}, {}/{}, {}, key: {})",
            self.endpoint,
            self.database,
            self.container,
            self.region,
            self.key.is_some()
        )
    }
}

/// How to reach Service Bus, as the Functions host's own `ServiceBusConnection` says.
#[derive(Clone)]
pub enum ServiceBusSetting {
    /// `ServiceBusConnection`: a connection string with a shared access key.
    ConnectionString(String),
    /// `ServiceBusConnection__fullyQualifiedNamespace` (and `__clientId`): managed identity.
    Namespace {
        host: String,
        client_id: Option<String>,
    },
}

impl std::fmt::Debug for ServiceBusSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnectionString(_) => f.write_str("ConnectionString(<redacted>)"),
            Self::Namespace { host, .. } => write!(f, "Namespace({host})"),
        }
    }
}

#[derive(Clone)]
pub struct EventGridSetting {
    /// `EVENTGRID_ENDPOINT`: the topic endpoint, `https://<topic>.<region>-1.eventgrid.azure.net/api/events`.
    pub endpoint: String,
    /// `EVENTGRID_KEY`: the topic access key; managed identity when absent.
    pub key: Option<String>,
    /// `EVENTGRID_SCHEMA`: `cloudevents` (default) or `eventgrid`.
    pub schema: crate::events::Schema,
}

impl std::fmt::Debug for EventGridSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EventGrid({}, {:?}, key: {})",
            self.endpoint,
            self.schema,
            self.key.is_some()
        )
    }
}

/// Whether a setting's value looks like a connection string (`Key=value;...`), which carries a
/// key and belongs in another setting.
/// Whether a URL names this machine: `localhost` or a loopback address.
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_connection_string(value: &str) -> bool {
    value.contains(';') && value.contains('=')
}

/// An endpoint URL: https, or http to this machine (an emulator, a fake), since the app sends
/// keys and tokens there. The value itself is never quoted back: a misplaced connection
/// string in it carries an account key.
fn https_url(name: &str, value: &str, problems: &mut Vec<String>) -> Option<String> {
    if is_connection_string(value) {
        problems.push(format!(
            "{name}: looks like a connection string; it takes the endpoint URL alone \
             (the value is not shown because a connection string carries a key)"
        ));
        return None;
    }
    match reqwest::Url::parse(value.trim()) {
        Ok(url)
            if url.host().is_some()
                && (url.scheme() == "https" || (url.scheme() == "http" && is_loopback(&url))) =>
        {
            Some(value.trim().to_string())
        }
        Ok(url) if url.scheme() == "http" => {
            problems.push(format!(
                "{name}: plain http goes only to this machine (an emulator); expected https"
            ));
            None
        }
        Ok(url) if url.host().is_some() => {
            problems.push(format!(
                "{name}: the URL's scheme is `{}`; expected https",
                url.scheme()
            ));
            None
        }
        Ok(_) => {
            problems.push(format!(
                "{name}: the URL has no host; expected https://<host>/"
            ));
            None
        }
        Err(e) => {
            problems.push(format!("{name}: not a URL ({e}); expected https://<host>/"));
            None
        }
    }
}

/// A Service Bus namespace host name (`<name>.servicebus.windows.net`).
fn namespace_host(name: &str, value: &str, problems: &mut Vec<String>) -> Option<String> {
    if is_connection_string(value) {
        problems.push(format!(
            "{name}: looks like a connection string; it takes the namespace host name alone \
             (<name>.servicebus.windows.net), and a connection string goes in ServiceBusConnection \
             (the value is not shown because a connection string carries a key)"
        ));
        return None;
    }
    match crate::queue::namespace_host(value) {
        Some(host) => Some(host.to_string()),
        None => {
            problems.push(format!(
                "{name}: not a host name; expected <name>.servicebus.windows.net"
            ));
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Every setting that was present but unusable, named, so an operator fixes them all at once.
#[derive(Debug, thiserror::Error)]
#[error("invalid app settings:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct SettingsError {
    pub problems: Vec<String>,
}

/// The port a custom handler uses when the host did not give one (running it by hand).
const FALLBACK_PORT: u16 = 3000;

impl Settings {
    /// Where `provider`'s deliveries reach this app, with the function key: `None` without
    /// `WEBHOOK_BASE_URL`.
    pub fn webhook_url(&self, provider: &str) -> Option<String> {
        let base = self.webhook_base_url.as_deref()?;
        let url = format!("{base}/api/webhooks/{provider}");
        let Some(key) = &self.webhook_function_key else {
            return Some(url);
        };
        let mut keyed = reqwest::Url::parse(&url).ok()?;
        keyed.query_pairs_mut().append_pair("code", key.expose());
        Some(keyed.into())
    }

    /// Reads the settings from the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let mut problems = Vec::new();
        let read = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let port_setting = read("FUNCTIONS_CUSTOMHANDLER_PORT")
            .map(|v| ("FUNCTIONS_CUSTOMHANDLER_PORT", v))
            .or_else(|| {
                read("FUNCTIONS_HTTPWORKER_PORT").map(|v| ("FUNCTIONS_HTTPWORKER_PORT", v))
            });
        let port = match port_setting {
            None => FALLBACK_PORT,
            Some((name, v)) => {
                parse(name, &v, "a port number", &mut problems).unwrap_or(FALLBACK_PORT)
            }
        };

        // In Azure the app folder is read-only; the embedded backends then only serve what no
        // Azure setting covers, and scratch space will do.
        let default_data_dir = if read("WEBSITE_INSTANCE_ID").is_some() {
            "/tmp/func-sync"
        } else {
            ".func-sync"
        };
        let data_dir = read("FUNC_SYNC_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default_data_dir));

        let local_addr = match read("FUNC_SYNC_LOCAL_ADDR") {
            None => SocketAddr::from(([127, 0, 0, 1], 7071)),
            Some(v) => parse(
                "FUNC_SYNC_LOCAL_ADDR",
                &v,
                "an address (host:port)",
                &mut problems,
            )
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7071))),
        };

        let log_format = match read("FUNC_SYNC_LOG_FORMAT").as_deref() {
            None => None,
            Some("json") => Some(LogFormat::Json),
            Some("text") => Some(LogFormat::Text),
            Some(_) => {
                problems.push("FUNC_SYNC_LOG_FORMAT: expected `json` or `text`".into());
                None
            }
        };

        let mut warnings = Vec::new();
        let duplicate_detection_window = read("FUNC_SYNC_DUPLICATE_DETECTION_WINDOW_SECONDS")
            .and_then(|v| {
                parse(
                    "FUNC_SYNC_DUPLICATE_DETECTION_WINDOW_SECONDS",
                    &v,
                    WHOLE_NUMBER,
                    &mut problems,
                )
            })
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(10 * 60));
        // As long as Service Bus keeps a MessageId at most: the embedded queues add it to the
        // time of every send.
        const LONGEST_WINDOW: Duration = Duration::from_secs(7 * 24 * 60 * 60);
        let duplicate_detection_window = if duplicate_detection_window > LONGEST_WINDOW {
            warnings.push(
                "FUNC_SYNC_DUPLICATE_DETECTION_WINDOW_SECONDS is more than 604800 (seven days): seven days it is"
                    .into(),
            );
            LONGEST_WINDOW
        } else {
            duplicate_detection_window
        };

        // As the Functions host reads its own switches: any case, or 1 and 0.
        let token_refresh_enabled = match read("TOKEN_REFRESH_ENABLED")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None => true,
            Some("true" | "1") => true,
            Some("false" | "0") => false,
            Some(_) => {
                problems.push(
                    "TOKEN_REFRESH_ENABLED: expected `true` or `false` (any case), or `1` or `0`"
                        .into(),
                );
                true
            }
        };

        let token_refresh_threshold = read("TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS")
            .and_then(|v| {
                parse(
                    "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS",
                    &v,
                    WHOLE_NUMBER,
                    &mut problems,
                )
            })
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(2 * 60 * 60));

        let max_records_per_sync = read("SYNC_MAX_RECORDS")
            .and_then(|v| parse::<u64>("SYNC_MAX_RECORDS", &v, WHOLE_NUMBER, &mut problems))
            .unwrap_or(1000);
        if max_records_per_sync == 0 {
            problems.push("SYNC_MAX_RECORDS: must be at least 1".into());
        }
        let min_sync_interval = read("SYNC_MIN_INTERVAL_MINUTES")
            .and_then(|v| {
                parse::<u64>("SYNC_MIN_INTERVAL_MINUTES", &v, WHOLE_NUMBER, &mut problems)
            })
            .and_then(|minutes| {
                // As long as an integration's own interval may be.
                let longest = u64::from(crate::model::integration::MAX_INTERVAL_MINUTES);
                if minutes > longest {
                    problems.push(format!(
                        "SYNC_MIN_INTERVAL_MINUTES: at most {longest} (a year)"
                    ));
                    return None;
                }
                Some(Duration::from_secs(minutes * 60))
            })
            .unwrap_or(Duration::from_secs(5 * 60));
        let max_concurrent_syncs_per_tenant = read("SYNC_MAX_CONCURRENT_PER_TENANT")
            .and_then(|v| {
                parse::<usize>(
                    "SYNC_MAX_CONCURRENT_PER_TENANT",
                    &v,
                    WHOLE_NUMBER,
                    &mut problems,
                )
            })
            .unwrap_or(3);
        if max_concurrent_syncs_per_tenant == 0 {
            problems.push("SYNC_MAX_CONCURRENT_PER_TENANT: must be at least 1".into());
        }
        let record_retry_base = read("FUNC_SYNC_RECORD_RETRY_BASE_MS")
            .and_then(|v| {
                parse(
                    "FUNC_SYNC_RECORD_RETRY_BASE_MS",
                    &v,
                    WHOLE_NUMBER,
                    &mut problems,
                )
            })
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(1));

        let mut history_retention = HistoryRetention {
            days: read("HISTORY_RETENTION_DAYS")
                .and_then(|v| {
                    parse::<u32>("HISTORY_RETENTION_DAYS", &v, WHOLE_NUMBER, &mut problems)
                })
                .unwrap_or(30),
            by_tenant: Default::default(),
        };
        if let Some(list) = read("HISTORY_RETENTION_DAYS_BY_TENANT") {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                match entry
                    .split_once('=')
                    .and_then(|(t, d)| Some((t.trim(), d.trim().parse::<u32>().ok()?)))
                {
                    Some((tenant, days)) if !tenant.is_empty() && days > 0 => {
                        history_retention.by_tenant.insert(tenant.to_string(), days);
                    }
                    _ => {
                        problems.push(
                            "HISTORY_RETENTION_DAYS_BY_TENANT: expected `tenant=days` pairs separated by commas"
                                .into(),
                        );
                        break;
                    }
                }
            }
        }
        if history_retention.days == 0 {
            problems.push("HISTORY_RETENTION_DAYS: must be at least 1".into());
        }
        // Cosmos DB takes a `ttl` of at most i32::MAX seconds (68 years).
        let longest = (i32::MAX as i64 / (24 * 60 * 60)) as u32;
        if history_retention.days > longest
            || history_retention.by_tenant.values().any(|&d| d > longest)
        {
            problems.push(format!(
                "HISTORY_RETENTION_DAYS: at most {longest} days (Cosmos DB's longest ttl)"
            ));
        }

        let webhook_base_url = read("WEBHOOK_BASE_URL").and_then(|v| {
            let url = v.trim().trim_end_matches('/').to_string();
            let parsed = reqwest::Url::parse(&url).ok();
            let loopback = parsed.as_ref().is_some_and(is_loopback);
            match parsed.as_ref().map(reqwest::Url::scheme) {
                Some("https") => Some(url),
                Some("http") if loopback => Some(url),
                _ => {
                    problems.push(
                        "WEBHOOK_BASE_URL: expected an https URL (plain http only to a loopback address)"
                            .into(),
                    );
                    None
                }
            }
        });

        let webhook_function_key = read("WEBHOOK_FUNCTION_KEY")
            .map(|v| v.trim().to_string())
            .filter(|v| {
                let unresolved = v.starts_with("@Microsoft.KeyVault(");
                if unresolved {
                    warnings.push("WEBHOOK_FUNCTION_KEY is a Key Vault reference the platform has not resolved: the webhook URLs registered now carry no key".to_string());
                }
                !unresolved
            })
            .map(crate::secrets::Secret::new);

        let service_bus = match (
            read("ServiceBusConnection"),
            read("ServiceBusConnection__fullyQualifiedNamespace"),
        ) {
            (Some(connection), _) => {
                match crate::queue::ServiceBusConfig::from_connection_string(&connection) {
                    Ok(_) => Some(ServiceBusSetting::ConnectionString(connection)),
                    Err(e) => {
                        problems.push(format!("ServiceBusConnection: {e}"));
                        None
                    }
                }
            }
            (None, Some(value)) => namespace_host(
                "ServiceBusConnection__fullyQualifiedNamespace",
                &value,
                &mut problems,
            )
            .map(|host| ServiceBusSetting::Namespace {
                host,
                client_id: read("ServiceBusConnection__clientId"),
            }),
            (None, None) => None,
        };
        let key_vault_url =
            read("KEY_VAULT_URL").and_then(|v| https_url("KEY_VAULT_URL", &v, &mut problems));
        let event_grid = match read("EVENTGRID_ENDPOINT") {
            None => None,
            Some(endpoint) => {
                let endpoint = https_url("EVENTGRID_ENDPOINT", &endpoint, &mut problems);
                let schema = match read("EVENTGRID_SCHEMA") {
                    None => Some(crate::events::Schema::CloudEvents),
                    Some(v) => match v.parse() {
                        Ok(schema) => Some(schema),
                        Err(_) => {
                            problems.push(
                                "EVENTGRID_SCHEMA: expected `cloudevents` or `eventgrid`".into(),
                            );
                            None
                        }
                    },
                };
                endpoint
                    .zip(schema)
                    .map(|(endpoint, schema)| EventGridSetting {
                        endpoint,
                        key: read("EVENTGRID_KEY"),
                        schema,
                    })
            }
        };
        if read("EVENTGRID_KEY").is_some()
            && event_grid.is_none()
            && read("EVENTGRID_ENDPOINT").is_none()
        {
            problems.push("EVENTGRID_KEY: set, but EVENTGRID_ENDPOINT is missing".into());
        }
        let cosmos = read("COSMOS_ENDPOINT")
            .and_then(|v| https_url("COSMOS_ENDPOINT", &v, &mut problems))
            .map(|endpoint| CosmosSetting {
                endpoint,
                key: read("COSMOS_KEY"),
                database: read("COSMOS_DATABASE").unwrap_or_else(|| "castiel".into()),
                container: read("COSMOS_CONTAINER").unwrap_or_else(|| "shards".into()),
                region: read("COSMOS_REGION")
                    .or_else(|| read("REGION_NAME"))
                    .unwrap_or_else(|| "eastus".into()),
            });
        if read("COSMOS_KEY").is_some() && read("COSMOS_ENDPOINT").is_none() {
            problems.push("COSMOS_KEY: set, but COSMOS_ENDPOINT is missing".into());
        }
        let app_insights = read("APPLICATIONINSIGHTS_CONNECTION_STRING").and_then(|text| {
            let auth = match read("APPLICATIONINSIGHTS_AUTHENTICATION_STRING") {
                None => IngestionAuth::Key,
                Some(v) => match ingestion_auth(&v) {
                    Ok(auth) => auth,
                    Err(e) => {
                        problems.push(format!("APPLICATIONINSIGHTS_AUTHENTICATION_STRING: {e}"));
                        return None;
                    }
                },
            };
            let has_key = text.split(';').any(|part| {
                part.trim().split_once('=').is_some_and(|(name, v)| {
                    name.eq_ignore_ascii_case("InstrumentationKey") && !v.is_empty()
                })
            });
            if !has_key {
                problems.push(
                    "APPLICATIONINSIGHTS_CONNECTION_STRING: no InstrumentationKey (expected the \
                     resource's connection string, InstrumentationKey=...;IngestionEndpoint=...)"
                        .into(),
                );
                return None;
            }
            let endpoint = text.split(';').find_map(|part| {
                let (name, v) = part.trim().split_once('=')?;
                name.eq_ignore_ascii_case("IngestionEndpoint")
                    .then(|| v.trim().to_string())
            });
            let loopback_http = match endpoint.as_deref().map(reqwest::Url::parse) {
                None => None,
                Some(Ok(url)) if url.scheme() == "https" => None,
                Some(Ok(url)) if url.scheme() == "http" && is_loopback(&url) => {
                    let host = url.host_str().unwrap_or_default();
                    Some(match url.port() {
                        Some(port) => format!("{host}:{port}"),
                        None => host.to_string(),
                    })
                }
                Some(_) => {
                    problems.push(
                        "APPLICATIONINSIGHTS_CONNECTION_STRING: IngestionEndpoint must be an https \
                         URL (plain http only to a loopback address)"
                            .into(),
                    );
                    return None;
                }
            };
            Some(AppInsightsSetting {
                connection_string: text,
                auth,
                loopback_http,
            })
        });
        let azure = AzureSettings {
            service_bus,
            key_vault_url,
            event_grid,
            client_id: read("AZURE_CLIENT_ID"),
            cosmos,
            app_insights,
        };

        if !problems.is_empty() {
            return Err(SettingsError { problems });
        }
        Ok(Self {
            warnings,
            data_dir,
            port,
            local_addr,
            log_format,
            duplicate_detection_window,
            token_refresh_enabled,
            token_refresh_threshold,
            max_records_per_sync,
            min_sync_interval,
            max_concurrent_syncs_per_tenant,
            record_retry_base,
            history_retention,
            webhook_base_url,
            webhook_function_key,
            azure,
        })
    }
}

/// A setting of type `T`, described as `expected` when it is not one; the problem never quotes
/// the value found.
fn parse<T: std::str::FromStr>(
    name: &str,
    value: &str,
    expected: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => {
            problems.push(format!("{name}: expected {expected}"));
            None
        }
    }
}

/// What the numeric settings expect.
const WHOLE_NUMBER: &str = "a whole number";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn application_insights_under_entra_names_its_identity_and_never_echoes_the_key() {
        let connection = "InstrumentationKey=00000000-aaaa-bbbb-cccc-000000000000;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/";
        let s = settings(&[
            ("APPLICATIONINSIGHTS_CONNECTION_STRING", connection),
            (
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
                "Authorization=AAD;ClientId=uami-1",
            ),
        ])
        .unwrap();
        let setting = s.azure.app_insights.unwrap();
        assert_eq!(
            setting.auth,
            IngestionAuth::Entra {
                client_id: Some("uami-1".into())
            }
        );
        assert!(!format!("{setting:?}").contains("aaaa"));

        let err = settings(&[
            (
                "APPLICATIONINSIGHTS_CONNECTION_STRING",
                "IngestionEndpoint=https://x/;Secretish=abc",
            ),
            (
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
                "Authorization=Key",
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("APPLICATIONINSIGHTS_AUTHENTICATION_STRING"),
            "{err}"
        );
        assert!(!err.contains("abc"), "{err}");
        let err = settings(&[(
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            "IngestionEndpoint=https://x/;Secretish=abc",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("no InstrumentationKey"), "{err}");
        assert!(!err.contains("abc"), "{err}");
        let plain = settings(&[(
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            "InstrumentationKey=k;IngestionEndpoint=http://westeurope.in.applicationinsights.azure.com/",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            plain.contains("IngestionEndpoint must be an https URL"),
            "{plain}"
        );
        let local = settings(&[(
            "APPLICATIONINSIGHTS_CONNECTION_STRING",
            "InstrumentationKey=k;IngestionEndpoint=http://127.0.0.1:4318/",
        )])
        .unwrap();
        assert_eq!(
            local.azure.app_insights.unwrap().loopback_http.as_deref(),
            Some("127.0.0.1:4318")
        );
    }

    #[test]
    fn defaults_need_no_environment() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.port, 3000);
        assert_eq!(s.data_dir, PathBuf::from(".func-sync"));
        assert_eq!(s.local_addr.to_string(), "127.0.0.1:7071");
        assert_eq!(s.duplicate_detection_window, Duration::from_secs(600));
        assert_eq!(s.token_refresh_threshold, Duration::from_secs(7200));
        assert!(s.token_refresh_enabled);
        assert_eq!(s.max_records_per_sync, 1000);
        assert_eq!(s.min_sync_interval, Duration::from_secs(300));
        assert_eq!(s.max_concurrent_syncs_per_tenant, 3);
        assert_eq!(s.record_retry_base, Duration::from_secs(1));
    }

    #[test]
    fn azure_backends_are_configured_by_their_settings_and_checked() {
        let s = settings(&[
            (
                "ServiceBusConnection__fullyQualifiedNamespace",
                "sb-sync-dev.servicebus.windows.net",
            ),
            ("KEY_VAULT_URL", "https://kv-sync-dev.vault.azure.net/"),
            (
                "EVENTGRID_ENDPOINT",
                "https://egt-sync-dev.westeurope-1.eventgrid.azure.net/api/events",
            ),
            ("EVENTGRID_SCHEMA", "eventgrid"),
        ])
        .unwrap();
        assert!(matches!(
            s.azure.service_bus,
            Some(ServiceBusSetting::Namespace { .. })
        ));
        assert_eq!(
            s.azure.event_grid.unwrap().schema,
            crate::events::Schema::EventGrid
        );
        assert!(settings(&[]).unwrap().azure.service_bus.is_none());

        let err = settings(&[
            (
                "ServiceBusConnection",
                "Endpoint=sb://x/;SharedAccessKey=very-secret",
            ),
            ("KEY_VAULT_URL", "not a url"),
            ("EVENTGRID_ENDPOINT", "https://egt/api/events"),
            ("EVENTGRID_SCHEMA", "xml"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(
            text.contains("ServiceBusConnection: the connection string has no SharedAccessKeyName")
        );
        assert!(text.contains("KEY_VAULT_URL"));
        assert!(text.contains("EVENTGRID_SCHEMA"));
        assert!(!text.contains("very-secret"));
    }

    #[test]
    fn history_is_kept_for_the_tenants_plan_or_thirty_days() {
        let s = settings(&[("HISTORY_RETENTION_DAYS_BY_TENANT", "t1=7, t3=90")]).unwrap();
        let day = 24 * 60 * 60;
        assert_eq!(s.history_retention.ttl_seconds("t1"), 7 * day);
        assert_eq!(s.history_retention.ttl_seconds("t2"), 30 * day);
        assert_eq!(s.history_retention.ttl_seconds("t3"), 90 * day);
        let err = settings(&[("HISTORY_RETENTION_DAYS_BY_TENANT", "t1:7")]).unwrap_err();
        assert!(
            err.to_string().contains("HISTORY_RETENTION_DAYS_BY_TENANT"),
            "{err}"
        );
        assert!(settings(&[("HISTORY_RETENTION_DAYS", "0")]).is_err());
        // Kept "for ever": longer than Cosmos DB's longest ttl, which would refuse every record.
        assert!(settings(&[("HISTORY_RETENTION_DAYS", "24855")]).is_ok());
        let err = settings(&[("HISTORY_RETENTION_DAYS", "36500")]).unwrap_err();
        assert!(err.to_string().contains("at most 24855 days"), "{err}");
        assert!(settings(&[("HISTORY_RETENTION_DAYS_BY_TENANT", "t1=40000")]).is_err());
    }

    #[test]
    fn no_problem_quotes_the_value_it_found() {
        let err = settings(&[
            (
                "COSMOS_ENDPOINT",
                "AccountEndpoint=https://c.documents.azure.com:443/;AccountKey=cosmos-key-123==;",
            ),
            (
                "ServiceBusConnection__fullyQualifiedNamespace",
                "Endpoint=sb://sb.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=sb-key-456=",
            ),
            ("KEY_VAULT_URL", "kv-secret-name-789"),
            ("FUNC_SYNC_LOG_FORMAT", "log-format-value"),
            ("SYNC_MAX_RECORDS", "records-value"),
            ("WEBHOOK_BASE_URL", "http://webhook-host-value.example"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 6, "{text}");
        for value in [
            "cosmos-key-123",
            "AccountEndpoint",
            "sb-key-456",
            "SharedAccessKeyName",
            "kv-secret-name-789",
            "log-format-value",
            "records-value",
            "webhook-host-value",
        ] {
            assert!(!text.contains(value), "`{value}` printed: {text}");
        }
        assert!(text.contains("COSMOS_ENDPOINT: looks like a connection string"));
        assert!(text.contains(
            "ServiceBusConnection__fullyQualifiedNamespace: looks like a connection string"
        ));
        assert!(text.contains("KEY_VAULT_URL: not a URL"));
        assert!(text.contains("SYNC_MAX_RECORDS: expected a whole number"));
    }

    #[test]
    fn keys_and_tokens_go_over_plain_http_only_to_this_machine() {
        let err = settings(&[
            (
                "EVENTGRID_ENDPOINT",
                "http://egt-sync.westeurope-1.eventgrid.azure.net/api/events",
            ),
            ("EVENTGRID_KEY", "k"),
        ])
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("EVENTGRID_ENDPOINT: plain http goes only to this machine"),
            "{err}"
        );
        let local = settings(&[
            ("EVENTGRID_ENDPOINT", "http://127.0.0.1:9090/api/events"),
            ("EVENTGRID_KEY", "k"),
            ("COSMOS_ENDPOINT", "http://localhost:8081/"),
            ("COSMOS_KEY", "k"),
        ]);
        assert!(local.is_ok(), "{:?}", local.err());
    }

    #[test]
    fn in_azure_the_data_directory_defaults_to_scratch_space() {
        let s = settings(&[("WEBSITE_INSTANCE_ID", "abc123")]).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/tmp/func-sync"));
    }

    #[test]
    fn the_hosts_port_wins_over_the_legacy_name() {
        let s = settings(&[
            ("FUNCTIONS_CUSTOMHANDLER_PORT", "40123"),
            ("FUNCTIONS_HTTPWORKER_PORT", "5"),
        ])
        .unwrap();
        assert_eq!(s.port, 40123);
        let s = settings(&[("FUNCTIONS_HTTPWORKER_PORT", "40124")]).unwrap();
        assert_eq!(s.port, 40124);
    }

    #[test]
    fn every_bad_setting_is_named() {
        let err = settings(&[
            ("FUNCTIONS_CUSTOMHANDLER_PORT", "seventy"),
            ("FUNC_SYNC_LOG_FORMAT", "xml"),
            ("TOKEN_REFRESH_ENABLED", "maybe"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        assert!(text.contains("FUNCTIONS_CUSTOMHANDLER_PORT"));
        assert!(text.contains("FUNC_SYNC_LOG_FORMAT"));
        assert!(text.contains("TOKEN_REFRESH_ENABLED"));
    }

    #[test]
    fn switches_read_as_the_functions_host_reads_them_and_windows_stay_within_service_bus() {
        for (value, enabled) in [("True", true), ("FALSE", false), ("1", true), ("0", false)] {
            let s = settings(&[("TOKEN_REFRESH_ENABLED", value)]).unwrap();
            assert_eq!(s.token_refresh_enabled, enabled, "{value}");
        }
        let s = settings(&[(
            "FUNC_SYNC_DUPLICATE_DETECTION_WINDOW_SECONDS",
            "10000000000000",
        )])
        .unwrap();
        assert_eq!(
            s.duplicate_detection_window,
            Duration::from_secs(7 * 24 * 60 * 60)
        );
        assert!(s.warnings[0].contains("seven days"), "{:?}", s.warnings);
    }

    #[test]
    fn an_unresolved_key_vault_reference_is_kept_to_be_told_once_logging_starts() {
        let s = settings(&[(
            "WEBHOOK_FUNCTION_KEY",
            "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/k/)",
        )])
        .unwrap();
        assert!(s.webhook_function_key.is_none());
        assert!(
            s.warnings[0].contains("WEBHOOK_FUNCTION_KEY"),
            "{:?}",
            s.warnings
        );
    }
}
