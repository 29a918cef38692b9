//! Entra tokens for the Azure services the handler calls itself.
//!
//! In Azure the function app's managed identity (system-assigned, or user-assigned when
//! `AZURE_CLIENT_ID` or a connection's `__clientId` names one) gets the tokens; on a developer's
//! machine the Azure CLI or Azure Developer CLI login does. Keys and connection strings are
//! used only where an operator configures them instead.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential};
use azure_core::time::{Duration, OffsetDateTime};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};

/// Something that hands out bearer tokens for a scope.
#[async_trait]
pub trait TokenSource: Send + Sync {
    async fn token(&self, scope: &str) -> Result<String, String>;
}

/// Tokens from an `azure_identity` credential, kept per scope until shortly before they
/// expire. Managed identity keeps its own, but the developer tools' credentials keep none and
/// run the Azure CLI for every token, a second or so each: the Service Bus and Event Grid
/// clients, which ask for a token per request, would spend that on every message.
#[derive(Clone)]
pub struct AzureCredential {
    credential: Arc<dyn TokenCredential>,
    tokens: Arc<Mutex<HashMap<String, AccessToken>>>,
    /// One token of a scope asked for at a time: the sends that find none kept wait for it
    /// rather than each running the CLI.
    asking: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl fmt::Debug for AzureCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AzureCredential({:?})", self.credential)
    }
}

/// How long before it expires a kept token is asked for anew.
const RENEW_BEFORE: Duration = Duration::minutes(5);

impl AzureCredential {
    pub fn new(credential: Arc<dyn TokenCredential>) -> Self {
        Self {
            credential,
            tokens: Arc::default(),
            asking: Arc::default(),
        }
    }

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
            Ok(Self::new(credential))
        } else {
            let credential = DeveloperToolsCredential::new(None)
                .map_err(|e| format!("no developer credential (az login?): {e}"))?;
            Ok(Self::new(credential))
        }
    }

    /// The credential itself, for the Azure SDK clients, whose pipelines keep its tokens.
    pub fn credential(&self) -> Arc<dyn TokenCredential> {
        self.credential.clone()
    }

    fn kept(&self, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().ok()?;
        tokens
            .get(scope)
            .filter(|t| t.expires_on - RENEW_BEFORE > OffsetDateTime::now_utc())
            .map(|t| t.token.secret().to_string())
    }
}

#[async_trait]
impl TokenSource for AzureCredential {
    async fn token(&self, scope: &str) -> Result<String, String> {
        if let Some(token) = self.kept(scope) {
            return Ok(token);
        }
        let asking = match self.asking.lock() {
            Ok(mut locks) => locks.entry(scope.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let _asking = asking.lock().await;
        if let Some(token) = self.kept(scope) {
            return Ok(token);
        }
        let token = self
            .credential
            .get_token(&[scope], None)
            .await
            .map_err(|e| e.to_string())?;
        let secret = token.token.secret().to_string();
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(scope.to_string(), token);
        }
        Ok(secret)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use azure_core::credentials::{Secret, TokenRequestOptions};

    use super::*;

    /// A credential that counts the tokens it is asked for, each valid for `lifetime`.
    #[derive(Debug)]
    struct Counting {
        asked: AtomicUsize,
        lifetime: Duration,
    }

    #[async_trait]
    impl TokenCredential for Counting {
        async fn get_token(
            &self,
            scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.asked.fetch_add(1, Ordering::SeqCst);
            // As a CLI run does, it lets other tasks run meanwhile.
            tokio::task::yield_now().await;
            Ok(AccessToken {
                token: Secret::new(format!("{}-{n}", scopes[0])),
                expires_on: OffsetDateTime::now_utc() + self.lifetime,
            })
        }
    }

    #[tokio::test]
    async fn a_token_is_asked_for_once_per_scope_until_it_nears_its_expiry() {
        let counting = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            lifetime: Duration::hours(1),
        });
        let credential = AzureCredential::new(counting.clone());
        for _ in 0..50 {
            assert_eq!(credential.token("bus").await.unwrap(), "bus-0");
        }
        assert_eq!(credential.token("grid").await.unwrap(), "grid-1");
        assert_eq!(counting.asked.load(Ordering::SeqCst), 2);

        // Twenty sends that find no token at once ask for one.
        let counting = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            lifetime: Duration::hours(1),
        });
        let credential = AzureCredential::new(counting.clone());
        let asks: Vec<_> = (0..20)
            .map(|_| {
                let credential = credential.clone();
                tokio::spawn(async move { credential.token("bus").await.unwrap() })
            })
            .collect();
        for ask in asks {
            assert_eq!(ask.await.unwrap(), "bus-0");
        }
        assert_eq!(counting.asked.load(Ordering::SeqCst), 1);

        let short = Arc::new(Counting {
            asked: AtomicUsize::new(0),
            lifetime: Duration::minutes(4),
        });
        let credential = AzureCredential::new(short.clone());
        credential.token("bus").await.unwrap();
        credential.token("bus").await.unwrap();
        assert_eq!(
            short.asked.load(Ordering::SeqCst),
            2,
            "a token within five minutes of its expiry is asked for anew"
        );
    }
}
