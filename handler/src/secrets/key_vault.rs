//! [`SecretStore`] on Azure Key Vault, with the official `azure_security_keyvault_secrets`
//! client.
//!
//! Reads go through a short cache: a sync job reads its integration's credentials once, but
//! many jobs run a minute apart, and Key Vault throttles per vault. A write (a refreshed or
//! rotated token) replaces the cached value at once. Errors carry the secret's name, never
//! its value.
//!
//! With soft delete on (as every vault has it now), a deleted secret keeps its name until it is
//! purged, and the vault refuses to write a secret of that name (409). An integration deleted
//! and registered again under its id meets that: the deleted secret is recovered, and written
//! over once the vault has it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, StatusCode};
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};

use super::{Secret, SecretStore, SecretsError, is_valid_secret_name};

/// How long a read value is trusted without asking Key Vault again.
const CACHE_TTL: Duration = Duration::from_secs(60);

pub struct KeyVaultSecrets {
    client: SecretClient,
    cache: Mutex<HashMap<String, (Secret, Instant)>>,
}

impl KeyVaultSecrets {
    /// A client of the vault at `vault_url` (`https://<name>.vault.azure.net/`).
    pub fn new(vault_url: &str, credential: Arc<dyn TokenCredential>) -> Result<Self, String> {
        Self::with_client_options(vault_url, credential, ClientOptions::default())
    }

    /// The same with custom client options (a transport, retries).
    pub fn with_client_options(
        vault_url: &str,
        credential: Arc<dyn TokenCredential>,
        client_options: ClientOptions,
    ) -> Result<Self, String> {
        let options = SecretClientOptions {
            client_options,
            ..Default::default()
        };
        let client = SecretClient::new(vault_url, credential, Some(options))
            .map_err(|e| format!("Key Vault `{vault_url}`: {e}"))?;
        Ok(Self {
            client,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn cached(&self, name: &str) -> Option<Secret> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(name)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(secret, _)| secret.clone())
    }

    fn remember(&self, name: &str, secret: &Secret) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (secret.clone(), Instant::now()));
    }
}

fn unavailable(name: &str, e: azure_core::Error) -> SecretsError {
    SecretsError::Unavailable(format!("Key Vault secret `{name}`: {}", e.kind()))
}

#[async_trait]
impl SecretStore for KeyVaultSecrets {
    async fn get(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        match self.cached(name) {
            Some(secret) => Ok(Some(secret)),
            None => self.get_fresh(name).await,
        }
    }

    async fn get_fresh(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        let response = match self.client.get_secret(name, None).await {
            Ok(response) => response,
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => return Ok(None),
            Err(e) => return Err(unavailable(name, e)),
        };
        let value = response
            .into_model()
            .map_err(|e| unavailable(name, e))?
            .value
            .ok_or_else(|| {
                SecretsError::Unavailable(format!("Key Vault secret `{name}` has no value"))
            })?;
        let secret = Secret::new(value);
        self.remember(name, &secret);
        Ok(Some(secret))
    }

    async fn set(&self, name: &str, value: Secret) -> Result<(), SecretsError> {
        if !is_valid_secret_name(name) {
            return Err(SecretsError::InvalidName(name.to_string()));
        }
        let mut recovered = false;
        let mut pause = Duration::from_millis(500);
        let deadline = Instant::now() + RECOVERY_WAIT;
        loop {
            let parameters = SetSecretParameters {
                value: Some(value.expose().to_string()),
                content_type: Some("application/json".into()),
                ..Default::default()
            };
            let body = parameters
                .try_into()
                .map_err(|e: azure_core::Error| unavailable(name, e))?;
            let refused = match self.client.set_secret(name, body, None).await {
                Ok(_) => break,
                Err(e) if e.http_status() == Some(StatusCode::Conflict) => e,
                Err(e) => return Err(unavailable(name, e)),
            };
            if !recovered {
                // A secret deleted with soft delete on keeps its name until it is purged: it
                // can only be recovered, and is, since it is the integration's.
                if !self.is_deleted(name).await? {
                    return Err(unavailable(name, refused));
                }
                self.client
                    .recover_deleted_secret(name, None)
                    .await
                    .map_err(|e| {
                        SecretsError::Unavailable(format!(
                            "Key Vault secret `{name}` was deleted and is kept for recovery, and recovering it was refused ({}): recover or purge it",
                            e.kind()
                        ))
                    })?;
                recovered = true;
                continue;
            }
            // Recovering takes the vault a few seconds, during which writes are refused.
            if Instant::now() + pause > deadline {
                return Err(unavailable(name, refused));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(4));
        }
        self.remember(name, &value);
        Ok(())
    }
}

/// How long a write waits for a deleted secret it recovered to be back.
const RECOVERY_WAIT: Duration = Duration::from_secs(30);

impl KeyVaultSecrets {
    /// Whether `name` is a deleted secret the vault keeps for recovery.
    async fn is_deleted(&self, name: &str) -> Result<bool, SecretsError> {
        match self.client.get_deleted_secret(name, None).await {
            Ok(_) => Ok(true),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(false),
            Err(e) => Err(unavailable(name, e)),
        }
    }
}
