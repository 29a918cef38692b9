//! The app's six functions, as their `function.json` files define them.
//!
//! The files under `functions/` are the single source of truth: the Functions host reads them in
//! Azure, and this binary embeds the same files so that the handler knows each trigger's binding
//! name and the embedded runtime knows routes, schedules and queues without a second copy.

use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::ncrontab::Ncrontab;

/// The six functions of the app. The names are the folder names, which are also the paths the
/// host posts invocations to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FunctionName {
    WebhookReceiver,
    SyncScheduler,
    SyncInboundWebhook,
    SyncInboundScheduled,
    SyncOutbound,
    TokenRefresher,
}

impl FunctionName {
    pub const ALL: [FunctionName; 6] = [
        Self::WebhookReceiver,
        Self::SyncScheduler,
        Self::SyncInboundWebhook,
        Self::SyncInboundScheduled,
        Self::SyncOutbound,
        Self::TokenRefresher,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::WebhookReceiver => "WebhookReceiver",
            Self::SyncScheduler => "SyncScheduler",
            Self::SyncInboundWebhook => "SyncInboundWebhook",
            Self::SyncInboundScheduled => "SyncInboundScheduled",
            Self::SyncOutbound => "SyncOutbound",
            Self::TokenRefresher => "TokenRefresher",
        }
    }

    fn function_json(self) -> &'static str {
        match self {
            Self::WebhookReceiver => include_str!("../../functions/WebhookReceiver/function.json"),
            Self::SyncScheduler => include_str!("../../functions/SyncScheduler/function.json"),
            Self::SyncInboundWebhook => {
                include_str!("../../functions/SyncInboundWebhook/function.json")
            }
            Self::SyncInboundScheduled => {
                include_str!("../../functions/SyncInboundScheduled/function.json")
            }
            Self::SyncOutbound => include_str!("../../functions/SyncOutbound/function.json"),
            Self::TokenRefresher => include_str!("../../functions/TokenRefresher/function.json"),
        }
    }
}

impl fmt::Display for FunctionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FunctionName {
    type Err = String;

    /// The host posts to the folder name exactly as written, so matching is case-sensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("no function named `{s}`"))
    }
}

/// What starts a function, with the binding's settings.
#[derive(Debug, Clone)]
pub enum Trigger {
    Http {
        binding: String,
        /// The `http` output binding: the key of the response in `Outputs`.
        output: String,
        route: String,
        methods: Vec<String>,
        /// Whether the host asks callers for a function key (`authLevel` other than
        /// `anonymous`; `function` when absent, as in the host).
        keyed: bool,
    },
    Timer {
        binding: String,
        schedule: Ncrontab,
    },
    ServiceBus {
        binding: String,
        queue: String,
        sessions: bool,
    },
}

impl Trigger {
    /// The binding name: the key of the trigger's value in an invocation's `Data`.
    pub fn binding(&self) -> &str {
        match self {
            Self::Http { binding, .. }
            | Self::Timer { binding, .. }
            | Self::ServiceBus { binding, .. } => binding,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FunctionDefinition {
    pub name: FunctionName,
    pub trigger: Trigger,
}

/// All six definitions.
#[derive(Debug, Clone)]
pub struct AppDefinition {
    pub functions: Vec<FunctionDefinition>,
}

static EMBEDDED: LazyLock<AppDefinition> = LazyLock::new(|| {
    let functions = FunctionName::ALL
        .into_iter()
        .map(|name| {
            parse_function_json(name, name.function_json())
                .unwrap_or_else(|e| panic!("embedded {name}/function.json is invalid: {e}"))
        })
        .collect();
    AppDefinition { functions }
});

impl AppDefinition {
    /// The definitions compiled into this binary from `functions/*/function.json`.
    pub fn embedded() -> &'static AppDefinition {
        &EMBEDDED
    }

    pub fn get(&self, name: FunctionName) -> &FunctionDefinition {
        self.functions
            .iter()
            .find(|f| f.name == name)
            .expect("every function has a definition")
    }
}

#[derive(Deserialize)]
struct FunctionJson {
    bindings: Vec<BindingJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BindingJson {
    #[serde(rename = "type")]
    kind: String,
    direction: String,
    name: String,
    route: Option<String>,
    methods: Option<Vec<String>>,
    auth_level: Option<String>,
    schedule: Option<String>,
    queue_name: Option<String>,
    is_sessions_enabled: Option<bool>,
}

/// Reads the trigger binding of one `function.json`.
pub fn parse_function_json(name: FunctionName, text: &str) -> Result<FunctionDefinition, String> {
    let json: FunctionJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let http_output = json
        .bindings
        .iter()
        .find(|b| b.direction == "out" && b.kind == "http")
        .map(|b| b.name.clone());
    let mut triggers = json
        .bindings
        .into_iter()
        .filter(|b| b.direction == "in" && b.kind.ends_with("Trigger"));
    let b = triggers.next().ok_or("no trigger binding")?;
    if triggers.next().is_some() {
        return Err("more than one trigger binding".into());
    }
    let trigger = match b.kind.as_str() {
        "httpTrigger" => Trigger::Http {
            binding: b.name,
            output: http_output.ok_or("httpTrigger without an http output binding")?,
            route: b.route.ok_or("httpTrigger without a route")?,
            methods: b
                .methods
                .unwrap_or_default()
                .into_iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            keyed: !b
                .auth_level
                .is_some_and(|level| level.eq_ignore_ascii_case("anonymous")),
        },
        "timerTrigger" => Trigger::Timer {
            binding: b.name,
            schedule: b
                .schedule
                .ok_or("timerTrigger without a schedule")?
                .parse()
                .map_err(|e: crate::ncrontab::NcrontabError| e.to_string())?,
        },
        "serviceBusTrigger" => Trigger::ServiceBus {
            binding: b.name,
            queue: b
                .queue_name
                .ok_or("serviceBusTrigger without a queueName")?,
            sessions: b.is_sessions_enabled.unwrap_or(false),
        },
        other => return Err(format!("unsupported trigger type `{other}`")),
    };
    Ok(FunctionDefinition { name, trigger })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_definitions_match_the_design() {
        let app = AppDefinition::embedded();
        match &app.get(FunctionName::WebhookReceiver).trigger {
            Trigger::Http {
                binding,
                output,
                route,
                methods,
                keyed,
            } => {
                assert_eq!(binding, "req");
                assert_eq!(output, "res");
                assert_eq!(route, "webhooks/{provider}");
                assert_eq!(methods, &["POST"]);
                assert!(keyed, "authLevel function");
            }
            other => panic!("{other:?}"),
        }
        match &app.get(FunctionName::SyncScheduler).trigger {
            Trigger::Timer { schedule, .. } => assert_eq!(schedule.as_str(), "0 */1 * * * *"),
            other => panic!("{other:?}"),
        }
        match &app.get(FunctionName::TokenRefresher).trigger {
            Trigger::Timer { schedule, .. } => assert_eq!(schedule.as_str(), "0 0 * * * *"),
            other => panic!("{other:?}"),
        }
        let queues: Vec<_> = [
            FunctionName::SyncInboundWebhook,
            FunctionName::SyncInboundScheduled,
            FunctionName::SyncOutbound,
        ]
        .into_iter()
        .map(|f| match &app.get(f).trigger {
            Trigger::ServiceBus {
                queue, sessions, ..
            } => (queue.as_str(), *sessions),
            other => panic!("{other:?}"),
        })
        .collect();
        assert_eq!(
            queues,
            [
                ("sync-inbound-webhook", false),
                ("sync-inbound-scheduled", false),
                ("sync-outbound", true)
            ]
        );
    }

    #[test]
    fn function_names_are_case_sensitive_folder_names() {
        assert_eq!(
            "SyncOutbound".parse::<FunctionName>(),
            Ok(FunctionName::SyncOutbound)
        );
        assert!("syncoutbound".parse::<FunctionName>().is_err());
    }

    #[test]
    fn a_function_json_without_a_trigger_is_refused() {
        let err = parse_function_json(
            FunctionName::SyncOutbound,
            r#"{"bindings":[{"type":"http","direction":"out","name":"res"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err, "no trigger binding");
    }
}
