//! Entra tokens for the Azure services the handler calls itself.
//!
//! In Azure the function app's managed identity (system-assigned, or user-assigned when
//! `AZURE_CLIENT_ID` or a connection's `__clientId` names one) gets the tokens; on a developer's
//! machine the Azure CLI or Azure Developer CLI login does. Keys and connection strings are
//! used only where an operator configures them instead.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};

/// Something that hands out bearer tokens for a scope.
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self, scope: &str) -> Result<String, String>;
}

/// Tokens from an `azure_identity` credential (which caches them until shortly before expiry).
#[derive(Clone)]
pub struct AzureCredential(pub Arc<dyn TokenCredential>);

impl fmt::Debug for AzureCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AzureCredential({:?})", self.0)
    }
}

impl AzureCredential {
    /// The credential for where the app runs: managed identity when the Functions platform
    /// provides one (`IDENTITY_ENDPOINT`, or `MSI_ENDPOINT` on older hosts), developer tools
    /// otherwise.
    pub fn for_environment(client_id: Option<&str>) -> Result<Self, String> {
        let in_azure = ["IDENTITY_ENDPOINT", "MSI_ENDPOINT"]
            .iter()
            .any(|name| std::env::var_os(name).is_some());
        if in_azure {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.map(|id| UserAssignedId::ClientId(id.to_string())),
                ..Default::default()
            };
            let credential = ManagedIdentityCredential::new(Some(options))
                .map_err(|e| format!("managed identity is not available: {e}"))?;
            Ok(Self(credential))
        } else {
            let credential = DeveloperToolsCredential::new(None)
                .map_err(|e| format!("no developer credential (az login?): {e}"))?;
            Ok(Self(credential))
        }
    }
}

#[async_trait]
impl TokenSource for AzureCredential {
    async fn token(&self, scope: &str) -> Result<String, String> {
        self.0
            .get_token(&[scope], None)
            .await
            .map(|t| t.token.secret().to_string())
            .map_err(|e| e.to_string())
    }
}
