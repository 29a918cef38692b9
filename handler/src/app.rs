//! The app's state: its settings and the backends behind the I/O traits.
//!
//! Functions receive an [`App`] and never know which backends they run on. [`LocalBackends`]
//! builds the embedded ones in a data directory; the same directory is what `handler local`
//! runs on and what the operator commands read. [`App::from_settings`] swaps in each Azure
//! service whose settings are present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::events::{EventGridAuth, EventGridPublisher, EventSink, FileEvents};
use crate::identity::AzureCredential;
use crate::queue::{LocalBroker, MessageQueue, ServiceBusConfig, ServiceBusSender};
use crate::secrets::{FileSecrets, KeyVaultSecrets, SecretStore};
use crate::settings::{ServiceBusSetting, Settings};
use crate::store::{CosmosStore, Provisioning, ShardStore, SqliteStore};
use crate::telemetry::Metrics;
use azure_data_cosmos::options::Region;
use azure_data_cosmos::{AccountEndpoint, AccountReference, CosmosClientBuilder, RoutingStrategy};

#[derive(Clone)]
pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn ShardStore>,
    pub queue: Arc<dyn MessageQueue>,
    pub secrets: Arc<dyn SecretStore>,
    pub events: Arc<dyn EventSink>,
    pub providers: adapters::Registry,
    pub metrics: Metrics,
}

/// The files of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Shards (the Cosmos DB container's stand-in).
    pub fn store(&self) -> PathBuf {
        self.root.join("store.db")
    }
    /// Queues and timer schedule status (the Service Bus namespace's and the host's stand-in).
    pub fn runtime(&self) -> PathBuf {
        self.root.join("runtime.db")
    }
    /// Connection credentials (the Key Vault's stand-in).
    pub fn secrets(&self) -> PathBuf {
        self.root.join("secrets.json")
    }
    /// Published events (the Event Grid topic's stand-in).
    pub fn events(&self) -> PathBuf {
        self.root.join("events.jsonl")
    }
    /// Held by the running `handler local`, so two runtimes never consume the same queues.
    pub fn runtime_lock(&self) -> PathBuf {
        self.root.join("runtime.lock")
    }
}

/// The embedded backends, opened in one data directory.
#[derive(Clone)]
pub struct LocalBackends {
    pub dir: DataDir,
    pub store: SqliteStore,
    pub broker: LocalBroker,
    pub secrets: FileSecrets,
    pub events: FileEvents,
}

impl LocalBackends {
    /// Opens (creating them if needed) the embedded backends in the data directory. The
    /// directory and everything in it are the owner's alone: shards hold personal data.
    pub fn open(settings: &Settings) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = DataDir::new(&settings.data_dir);
        std::fs::create_dir_all(dir.root())
            .and_then(|()| {
                std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.root().display()))?;
        crate::store::restrict_to_owner(&dir.events())
            .map_err(|e| format!("{}: {e}", dir.events().display()))?;
        let store = SqliteStore::open(&dir.store()).map_err(|e| e.to_string())?;
        let broker = LocalBroker::open(&dir.runtime(), settings.duplicate_detection_window)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            secrets: FileSecrets::new(&dir.secrets()),
            events: FileEvents::new(&dir.events()),
            dir,
            store,
            broker,
        })
    }

    /// An app on the embedded backends only.
    pub fn app(&self, settings: Settings, providers: adapters::Registry) -> App {
        App {
            settings,
            store: Arc::new(self.store.clone()),
            queue: Arc::new(self.broker.clone()),
            secrets: Arc::new(self.secrets.clone()),
            events: Arc::new(self.events.clone()),
            providers,
            metrics: Metrics::global(),
        }
    }
}

/// Which queue an app sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChoice {
    /// Service Bus when configured (the Functions host receives from it).
    Configured,
    /// The embedded queues, whatever is configured: `handler local` consumes them itself.
    Embedded,
}

impl App {
    /// The app on the backends its settings choose: each Azure service whose settings are
    /// present, the embedded backend otherwise.
    pub async fn from_settings(
        settings: Settings,
        local: &LocalBackends,
        providers: adapters::Registry,
        queue: QueueChoice,
    ) -> Result<Self, String> {
        let mut app = local.app(settings.clone(), providers);
        let azure = &settings.azure;
        // One credential per identity: Service Bus's connection may name its own
        // (`ServiceBusConnection__clientId`), which is no other service's.
        let mut credentials: HashMap<Option<String>, AzureCredential> = HashMap::new();
        let mut entra = |client_id: Option<&str>| -> Result<AzureCredential, String> {
            let identity = client_id.or(azure.client_id.as_deref()).map(str::to_string);
            if let Some(c) = credentials.get(&identity) {
                return Ok(c.clone());
            }
            let c = AzureCredential::for_environment(identity.as_deref())?;
            credentials.insert(identity, c.clone());
            Ok(c)
        };
        if let (Some(service_bus), QueueChoice::Configured) = (&azure.service_bus, queue) {
            app.queue = Arc::new(service_bus_client(service_bus, |client_id| {
                entra(client_id)
            })?);
        }
        if let Some(url) = &azure.key_vault_url {
            let credential = entra(None)?;
            app.secrets = Arc::new(KeyVaultSecrets::new(url, credential.credential())?);
        }
        if let Some(cosmos) = &azure.cosmos {
            let endpoint = cosmos
                .endpoint
                .parse::<AccountEndpoint>()
                .map_err(|e| format!("COSMOS_ENDPOINT: {e}"))?;
            let account = match &cosmos.key {
                Some(key) => AccountReference::with_authentication_key(
                    endpoint,
                    azure_core::credentials::Secret::new(key.clone()),
                ),
                None => AccountReference::with_credential(endpoint, entra(None)?.credential()),
            };
            let client = CosmosClientBuilder::new()
                .build(
                    account,
                    RoutingStrategy::ProximityTo(Region::new(cosmos.region.clone())),
                )
                .await
                .map_err(|e| format!("Cosmos DB `{}`: {e}", cosmos.endpoint))?;
            // Through Entra the app holds a data-plane role, which cannot create databases.
            let provisioning = if cosmos.key.is_some() {
                Provisioning::Create
            } else {
                Provisioning::Existing
            };
            let store =
                CosmosStore::open(&client, &cosmos.database, &cosmos.container, provisioning)
                    .await
                    .map_err(|e| format!("Cosmos DB `{}`: {e}", cosmos.endpoint))?;
            app.store = Arc::new(store);
        }
        if let Some(event_grid) = &azure.event_grid {
            let auth = match &event_grid.key {
                Some(key) => EventGridAuth::Key(key.clone()),
                None => EventGridAuth::Entra(Arc::new(entra(None)?)),
            };
            app.events = Arc::new(EventGridPublisher::new(
                &event_grid.endpoint,
                event_grid.schema,
                auth,
            ));
        }
        Ok(app)
    }
}

/// The Service Bus client of `setting`, with Entra tokens from `entra` for an identity-based
/// connection.
pub fn service_bus_client(
    setting: &ServiceBusSetting,
    entra: impl FnOnce(Option<&str>) -> Result<AzureCredential, String>,
) -> Result<ServiceBusSender, String> {
    let config = match setting {
        ServiceBusSetting::ConnectionString(text) => {
            ServiceBusConfig::from_connection_string(text)?
        }
        ServiceBusSetting::Namespace { host, client_id } => {
            ServiceBusConfig::from_namespace(host, Arc::new(entra(client_id.as_deref())?))?
        }
    };
    Ok(ServiceBusSender::new(config))
}

/// The provider clients of this build.
pub fn providers() -> adapters::Registry {
    adapters::Registry::standard()
}
