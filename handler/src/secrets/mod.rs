//! Credentials of integration connections.
//!
//! In Azure each connection's credentials are one Key Vault secret; on one machine they are
//! entries of a local file ([`FileSecrets`]) readable by its owner only. A [`Secret`] never
//! prints its value: not in `Debug`, not in `Display`, not in an error.

mod file;
mod key_vault;

pub use file::FileSecrets;
pub use key_vault::KeyVaultSecrets;

use std::fmt;

use async_trait::async_trait;

/// A secret value. The only way to see it is [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secret store unavailable: {0}")]
    Unavailable(String),
    #[error("invalid secret name `{0}`")]
    InvalidName(String),
}

#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The secret, possibly from a short-lived cache.
    async fn get(&self, name: &str) -> Result<Option<Secret>, SecretsError>;
    /// The secret as stored right now, never from a cache: what a refresh must start from,
    /// since another instance may have rotated it a moment ago.
    async fn get_fresh(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        self.get(name).await
    }
    async fn set(&self, name: &str, value: Secret) -> Result<(), SecretsError>;
}

/// The secret holding one integration's credentials: `int-<tenant>-<integration>`, with every
/// character Key Vault does not allow in a name (it allows `0-9a-zA-Z-`) written as `-xx` hex,
/// so two different ids never share a name. Key Vault does not tell names apart by case, nor
/// takes one past 127 characters: registering an integration checks both.
pub fn credential_secret_name(tenant_id: &str, integration_id: &str) -> String {
    fn escape(out: &mut String, id: &str) {
        for byte in id.bytes() {
            if byte.is_ascii_alphanumeric() {
                out.push(byte as char);
            } else {
                out.push_str(&format!("-{byte:02x}"));
            }
        }
    }
    let mut name = String::from("int-");
    escape(&mut name, tenant_id);
    name.push_str("--");
    escape(&mut name, integration_id);
    name
}

/// Whether `name` is a valid Key Vault secret name (1–127 of `0-9a-zA-Z-`).
pub fn is_valid_secret_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("refresh-token-123");
        assert!(!format!("{s:?} {s}").contains("refresh-token-123"));
        assert_eq!(s.expose(), "refresh-token-123");
    }

    #[test]
    fn secret_names_are_key_vault_safe_and_unambiguous() {
        let a = credential_secret_name("tenant_acme", "int_acme_salesforce");
        assert_eq!(a, "int-tenant-5facme--int-5facme-5fsalesforce");
        assert!(is_valid_secret_name(&a));
        assert_ne!(
            credential_secret_name("a-b", "c"),
            credential_secret_name("a", "b-c")
        );
        assert!(!is_valid_secret_name("has space"));
        assert!(!is_valid_secret_name(""));
    }
}
