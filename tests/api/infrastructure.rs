//! The Azure resources in `infra/` (Bicep) kept consistent with the code. No Bicep compiler
//! runs here, so these read the text: every queue the functions use is provisioned with the
//! properties the app assumes, every setting the handler reads in Azure is set on the function
//! app, identity-based and keyless, every role the code needs is granted to the app's identity
//! and no broader one, and the alerts watch metrics the handler emits.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use handler::definition::{AppDefinition, Trigger};
use handler::queue::QUEUES;
use handler::settings::Settings;
use handler::telemetry::INSTRUMENTS;

fn infra() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("infra")
}

/// Every Bicep file under `infra/`, with its path relative to it.
fn bicep_files() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "bicep") {
                let relative = path.strip_prefix(infra()).unwrap().display().to_string();
                out.push((relative, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&infra(), &mut out);
    out.sort();
    out
}

/// The one Bicep file that declares `resource_type`.
fn declaring(resource_type: &str) -> (String, String) {
    let mut found: Vec<(String, String)> = bicep_files()
        .into_iter()
        .filter(|(_, text)| text.contains(&format!("'{resource_type}@")))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one file declaring {resource_type}, found {:?}",
        found.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    found.remove(0)
}

/// `name: value` inside `block`, unquoted.
fn field(block: &str, name: &str) -> String {
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} missing in {block}"));
    line.split_once(':')
        .unwrap()
        .1
        .trim()
        .trim_matches('\'')
        .to_string()
}

#[test]
fn every_queue_the_functions_use_is_provisioned_as_the_app_assumes() {
    let (_, bicep) = declaring("Microsoft.ServiceBus/namespaces/queues");
    let used: BTreeSet<&str> = AppDefinition::embedded()
        .functions
        .iter()
        .filter_map(|f| match &f.trigger {
            Trigger::ServiceBus { queue, .. } => Some(queue.as_str()),
            _ => None,
        })
        .collect();
    for queue in &used {
        assert!(
            QUEUES.iter().any(|q| q.name == *queue),
            "{queue} has no settings"
        );
    }
    for queue in QUEUES {
        let start = bicep
            .find(&format!("name: '{}'", queue.name))
            .unwrap_or_else(|| panic!("{} is not provisioned", queue.name));
        let block = &bicep[start..start + bicep[start..].find('}').unwrap()];
        let expected = [
            ("maxDeliveryCount", queue.max_delivery_count.to_string()),
            (
                "lockDuration",
                format!("PT{}M", queue.lock_duration.as_secs() / 60),
            ),
            (
                "defaultMessageTimeToLive",
                format!("P{}D", queue.time_to_live.as_secs() / 86_400),
            ),
            ("requiresSession", queue.requires_session.to_string()),
            (
                "deadLetteringOnMessageExpiration",
                queue.dead_letter_on_expiration.to_string(),
            ),
        ];
        for (name, value) in expected {
            assert_eq!(field(block, name), value, "{}: {name}", queue.name);
        }
    }
    assert!(bicep.contains("requiresDuplicateDetection: true"));
}

/// The app settings of the function app: every `name: 'X'` entry of its `appSettings`.
fn app_settings() -> (String, BTreeSet<String>) {
    let (path, text) = declaring("Microsoft.Web/sites");
    let start = text
        .find("appSettings")
        .unwrap_or_else(|| panic!("{path} sets no appSettings"));
    let block = &text[start..];
    let end = block
        .find("\n    ]")
        .or_else(|| block.find("\n]"))
        .unwrap_or(block.len());
    let names = block[..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name: '"))
        .filter_map(|l| l.split_once('\'').map(|(n, _)| n.to_string()))
        .collect();
    (block[..end].to_string(), names)
}

/// Settings the handler reads that the function app does not set, and why.
const NOT_SET_IN_AZURE: [(&str, &str); 11] = [
    (
        "FUNCTIONS_CUSTOMHANDLER_PORT",
        "set by the Functions host at each start",
    ),
    (
        "FUNCTIONS_HTTPWORKER_PORT",
        "the host's older name for the same",
    ),
    ("WEBSITE_INSTANCE_ID", "set by the platform"),
    ("REGION_NAME", "set by the platform; COSMOS_REGION is set"),
    (
        "FUNC_SYNC_DATA_DIR",
        "the embedded backends are not used in Azure",
    ),
    ("FUNC_SYNC_LOCAL_ADDR", "handler local only"),
    (
        "FUNC_SYNC_DUPLICATE_DETECTION_WINDOW_SECONDS",
        "the embedded queues only",
    ),
    (
        "FUNC_SYNC_RECORD_RETRY_BASE_MS",
        "its default is the production value",
    ),
    ("COSMOS_KEY", "keys are not used: managed identity"),
    ("EVENTGRID_KEY", "keys are not used: managed identity"),
    (
        "ServiceBusConnection",
        "a connection string: the namespace is used instead",
    ),
];

/// The settings the handler reads when it runs with the function app's settings.
fn settings_read_in_azure(set: &BTreeSet<String>) -> BTreeSet<String> {
    let read = RefCell::new(BTreeSet::new());
    let production = |name: &str| -> Option<String> {
        read.borrow_mut().insert(name.to_string());
        if !set.contains(name) {
            return None;
        }
        Some(
            match name {
                "ServiceBusConnection__fullyQualifiedNamespace" => {
                    "sb-sync-dev.servicebus.windows.net"
                }
                "COSMOS_ENDPOINT" => "https://cosmos-sync-dev.documents.azure.com:443/",
                "KEY_VAULT_URL" => "https://kv-sync-dev.vault.azure.net/",
                "EVENTGRID_ENDPOINT" => "https://egt-sync-dev.westeurope-1.eventgrid.azure.net/api/events",
                "EVENTGRID_SCHEMA" => "cloudevents",
                "WEBHOOK_BASE_URL" => "https://func-sync-dev.azurewebsites.net",
                "APPLICATIONINSIGHTS_CONNECTION_STRING" => {
                    "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/"
                }
                "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" => "Authorization=AAD;ClientId=x",
                "FUNC_SYNC_LOG_FORMAT" => "json",
                "TOKEN_REFRESH_ENABLED" => "true",
                "HISTORY_RETENTION_DAYS_BY_TENANT" => "",
                _ => "30",
            }
            .to_string(),
        )
    };
    Settings::from_lookup(production).unwrap_or_else(|e| panic!("{e}"));
    read.into_inner()
}

#[test]
fn every_setting_the_handler_reads_in_azure_is_set_identity_based_and_keyless() {
    let (block, set) = app_settings();
    let read = settings_read_in_azure(&set);
    let exempt: BTreeSet<&str> = NOT_SET_IN_AZURE.iter().map(|(n, _)| *n).collect();
    let missing: Vec<&String> = read
        .iter()
        .filter(|n| !set.contains(*n) && !exempt.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the handler but not set: {missing:?}"
    );
    for identity_based in [
        "ServiceBusConnection__fullyQualifiedNamespace",
        "ServiceBusConnection__credential",
        "ServiceBusConnection__clientId",
        "AZURE_CLIENT_ID",
        "COSMOS_ENDPOINT",
        "KEY_VAULT_URL",
        "EVENTGRID_ENDPOINT",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        "FUNCTIONS_WORKER_RUNTIME",
    ] {
        assert!(set.contains(identity_based), "{identity_based} is not set");
    }
    for key in ["COSMOS_KEY", "EVENTGRID_KEY", "ServiceBusConnection"] {
        assert!(
            !set.contains(key),
            "{key} carries a key; managed identity is used"
        );
    }
    for secret in ["AccountKey=", "SharedAccessKey=", "listKeys(", "primaryKey"] {
        assert!(
            !block.contains(secret) || block.contains("@Microsoft.KeyVault("),
            "an app setting carries a key ({secret}) instead of a Key Vault reference"
        );
    }
}

/// Built-in roles the app's identity needs, with why the code needs each.
const NEEDED: [(&str, &str, &str); 9] = [
    (
        "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
        "Azure Service Bus Data Receiver",
        "the host's queue triggers complete, abandon and dead-letter",
    ),
    (
        "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
        "Azure Service Bus Data Sender",
        "ServiceBusSender sends jobs, retries and dead-letter copies",
    ),
    (
        "00000000-0000-0000-0000-000000000002",
        "Cosmos DB Built-in Data Contributor",
        "CosmosStore reads and writes shards",
    ),
    (
        "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
        "Key Vault Secrets Officer",
        "KeyVaultSecrets stores refreshed tokens",
    ),
    (
        "d5a91429-5739-47e2-a06b-3470a27159e7",
        "EventGrid Data Sender",
        "EventGridPublisher publishes events",
    ),
    (
        "3913510d-42f4-4e42-8a64-420c390055eb",
        "Monitoring Metrics Publisher",
        "telemetry sends metrics and traces under Entra",
    ),
    (
        "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
        "Storage Blob Data Owner",
        "the host's identity-based AzureWebJobsStorage",
    ),
    (
        "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
        "Storage Queue Data Contributor",
        "the host's identity-based AzureWebJobsStorage",
    ),
    (
        "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
        "Storage Table Data Contributor",
        "the host's identity-based AzureWebJobsStorage",
    ),
];

/// Roles broader than anything the code does.
const TOO_BROAD: [(&str, &str); 4] = [
    ("8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "Owner"),
    ("b24988ac-6180-42a0-ab88-20f7382dd24c", "Contributor"),
    (
        "090c5cfd-751d-490a-894a-3ce6f1109419",
        "Azure Service Bus Data Owner",
    ),
    (
        "00000000-0000-0000-0000-000000000001",
        "Cosmos DB Built-in Data Reader",
    ),
];

#[test]
fn every_role_the_code_needs_is_granted_to_the_apps_identity_and_nothing_broader() {
    let all: String = bicep_files().into_iter().map(|(_, t)| t).collect();
    for (guid, role, why) in NEEDED {
        assert!(all.contains(guid), "{role} ({guid}) is not granted; {why}");
    }
    for (guid, role) in TOO_BROAD {
        assert!(
            !all.contains(guid),
            "{role} is granted: broader than the code needs"
        );
    }
    let (_, cosmos) = declaring("Microsoft.DocumentDB/databaseAccounts/sqlRoleAssignments");
    assert!(
        cosmos.contains("principalId"),
        "the SQL role assignment names a principal"
    );
    for (_, text) in bicep_files() {
        for (i, _) in text.match_indices("Microsoft.Authorization/roleAssignments@") {
            let block = &text[i..i + text[i..].find("\n}").unwrap_or(text.len() - i)];
            assert!(
                block.contains("principalType: 'ServicePrincipal'"),
                "a role assignment for something other than the app's identity:\n{block}"
            );
        }
    }
}

#[test]
fn the_container_lets_history_records_expire_by_their_own_ttl() {
    let (_, cosmos) = declaring("Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers");
    assert!(cosmos.contains("'/tenantId'"), "partitioned by tenant");
    assert!(
        cosmos.contains("defaultTtl: -1"),
        "time to live on with no default, so only documents with a ttl expire"
    );
    assert!(cosmos.contains("disableLocalAuth: true"));
}

#[test]
fn the_four_alerts_watch_what_the_handler_emits() {
    let alerts: String = bicep_files()
        .into_iter()
        .filter(|(_, t)| {
            t.contains("Microsoft.Insights/metricAlerts@")
                || t.contains("Microsoft.Insights/scheduledQueryRules@")
        })
        .map(|(_, t)| t)
        .collect();
    for metric in [
        "sync_jobs_processed",
        "sync_jobs_failed",
        "token_refresh_failures",
    ] {
        assert!(INSTRUMENTS.contains(&metric));
        assert!(alerts.contains(metric), "no alert reads {metric}");
    }
    assert!(alerts.contains("0.1"), "failure rate above 10%");
    assert!(
        alerts.contains("'ActiveMessages'") && alerts.contains("100"),
        "pending jobs"
    );
    assert!(
        alerts.contains("'DeadletteredMessages'") && alerts.contains("10"),
        "dead letters"
    );
    assert!(
        alerts.contains("Microsoft.Insights/actionGroups@"),
        "an action group"
    );
}

#[test]
fn each_alert_is_raised_at_the_severity_the_design_gives_it() {
    let alerts = std::fs::read_to_string(infra().join("modules/alerts.bicep")).unwrap();
    // Azure Monitor's severities: 0 Critical, 1 Error, 2 Warning.
    for (alert, severity) in [
        ("sync-failure-rate", 0),
        ("token-refresh-failures", 1),
        ("pending-jobs", 2),
        ("dead-letters", 2),
        ("poison-messages", 2),
    ] {
        let declared = alerts
            .split(&format!("name: '{alert}'"))
            .nth(1)
            .unwrap_or_else(|| panic!("no alert {alert}"))
            .lines()
            .find_map(|line| line.trim().strip_prefix("severity: "))
            .unwrap_or_else(|| panic!("alert {alert} declares no severity"));
        assert_eq!(declared, severity.to_string(), "alert {alert}");
    }
}

#[test]
fn the_bounds_of_each_number_the_app_settings_take_are_the_handlers() {
    let main = std::fs::read_to_string(infra().join("main.bicep")).unwrap();
    let accepts = |setting: &str, value: i64| {
        let value = value.to_string();
        handler::settings::Settings::from_lookup(|name| (name == setting).then(|| value.clone()))
            .is_ok()
    };
    for (param, setting) in [
        ("historyRetentionDays", "HISTORY_RETENTION_DAYS"),
        (
            "tokenRefreshThresholdMs",
            "TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS",
        ),
        ("syncMaxRecords", "SYNC_MAX_RECORDS"),
        ("syncMinIntervalMinutes", "SYNC_MIN_INTERVAL_MINUTES"),
        (
            "syncMaxConcurrentPerTenant",
            "SYNC_MAX_CONCURRENT_PER_TENANT",
        ),
    ] {
        assert!(
            main.contains(&format!("param {param} int")),
            "main.bicep declares no {param}"
        );
        let declaration = main
            .split(&format!("param {param} int"))
            .next()
            .unwrap()
            .rsplit("\nparam ")
            .next()
            .unwrap();
        let bound = |decorator: &str| {
            declaration
                .split(&format!("@{decorator}("))
                .nth(1)
                .map(|rest| rest.split(')').next().unwrap().parse::<i64>().unwrap())
        };
        let min = bound("minValue").unwrap_or_else(|| panic!("{param} has no @minValue"));
        assert!(accepts(setting, min), "{setting} refuses {param}'s least");
        assert!(
            !accepts(setting, min - 1),
            "{param} takes less than {setting} does"
        );
        if let Some(max) = bound("maxValue") {
            assert!(accepts(setting, max), "{setting} refuses {param}'s most");
            assert!(
                !accepts(setting, max + 1),
                "{param} takes more than {setting} does"
            );
        } else {
            assert!(accepts(setting, i64::MAX), "{param} needs a @maxValue");
        }
    }
}

#[test]
fn each_environment_sets_every_parameter_without_a_default() {
    let main = std::fs::read_to_string(infra().join("main.bicep")).unwrap();
    let required: Vec<&str> = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("param "))
        .filter(|l| !l.contains('='))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for env in ["dev", "staging", "prod"] {
        let path = infra().join("parameters").join(format!("{env}.bicepparam"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains("using '../main.bicep'"), "{env}");
        for name in &required {
            assert!(
                text.contains(&format!("param {name} =")),
                "{env} does not set {name}"
            );
        }
    }
}

/// A resource's `name:` as Azure would see it in `env`: `uniqueString()` is 13 characters,
/// and `take()` keeps what it says.
fn evaluated_name(expression: &str, env: &str) -> String {
    const UNIQUE: &str = "${uniqueString(resourceGroup().id)}";
    let (quoted, keep) = match expression
        .strip_prefix("take(")
        .and_then(|e| e.strip_suffix(')'))
        .and_then(|e| e.rsplit_once(','))
    {
        Some((inner, n)) => (inner.trim(), n.trim().parse::<usize>().ok()),
        None => (expression, None),
    };
    let mut name = quoted.trim_matches('\'').replace("${env}", env);
    while let Some(at) = name.find("${take(uniqueString(resourceGroup().id), ") {
        let end = at + name[at..].find(")}").unwrap() + 2;
        let n: usize = name[at..end]
            .trim_start_matches("${take(uniqueString(resourceGroup().id), ")
            .trim_end_matches(")}")
            .parse()
            .unwrap();
        name.replace_range(at..end, &"u".repeat(n));
    }
    let name = name.replace(UNIQUE, &"u".repeat(13));
    assert!(!name.contains("${"), "cannot evaluate {expression}");
    name.chars().take(keep.unwrap_or(usize::MAX)).collect()
}

#[test]
fn resource_names_fit_azures_limits_in_every_environment() {
    /// A resource type, the longest name it takes, and the characters that name may have.
    type Limit = (&'static str, usize, fn(char) -> bool);
    let limits: [Limit; 2] = [
        ("Microsoft.Storage/storageAccounts", 24, |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit()
        }),
        ("Microsoft.KeyVault/vaults", 24, |c| {
            c.is_ascii_alphanumeric() || c == '-'
        }),
    ];
    for (resource_type, longest, allowed) in limits {
        let declared = format!("'{resource_type}@");
        let (file, block) = bicep_files()
            .into_iter()
            .find_map(|(file, text)| {
                let at = text
                    .match_indices(&declared)
                    .map(|(at, _)| at)
                    .find(|&at| !text[at..].lines().next().unwrap().contains("existing"))?;
                Some((file, text[at..].to_string()))
            })
            .unwrap_or_else(|| panic!("{resource_type} is not declared"));
        let expression = field(&block, "name");
        for env in ["dev", "staging", "prod"] {
            let name = evaluated_name(&expression, env);
            assert!(
                (3..=longest).contains(&name.len()) && name.chars().all(allowed),
                "{file}: `{name}` ({} characters) is not a valid {resource_type} name in {env}",
                name.len()
            );
        }
    }
}
