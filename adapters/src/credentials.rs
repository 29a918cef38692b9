//! Refreshing credentials once, for everyone, and keeping what the refresh returned.
//!
//! Many providers rotate refresh tokens: the token a refresh spends dies the moment the new one
//! is issued. Two rules follow, and [`refresh`] keeps both for every adapter:
//!
//! * **Persist before use.** The refreshed credentials are stored (through the connection's
//!   [`CredentialKeeper`]) before the new access token is used for anything. A process killed
//!   after the refresh still leaves the live refresh token behind.
//! * **One refresh at a time per integration.** Two jobs, two instances, or a job and the token
//!   refresher may all find an expired token at once. Each refresh holds the integration's lease
//!   (the keeper's to implement across processes); whoever gets the lease second first reads the
//!   stored credentials again, and if somebody else already refreshed, uses theirs instead of
//!   spending a refresh token that is already dead. Theirs serves only if it was asked for
//!   what this connection needs: a token asked for reading does not serve a write, and is
//!   refreshed again with the refresh token it left behind.
//!
//! A provider that still answers `invalid_grant` may have lost a race the lease could not see
//! (a lease that expired under a slow refresh): if the stored refresh token changed meanwhile,
//! the refresh is tried once more with it before the credentials are judged revoked.

use std::future::Future;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::{Connection, Credentials, ErrorCode, ProviderError};

/// What a refresh returned: the new credentials, and when the access token expires if the
/// provider said (`expires_in`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    pub credentials: Credentials,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where an integration's credentials live between jobs, and the lease that serialises their
/// refreshes. The engine implements it over the secret store and the integration document.
#[async_trait]
pub trait CredentialKeeper: Send + Sync {
    /// Waits for the integration's refresh lease, then returns the credentials stored now
    /// (never a cached copy).
    async fn lock(&self) -> Result<Credentials, ProviderError>;
    /// Stores `refreshed` and releases the lease.
    async fn store_and_unlock(&self, refreshed: &Refreshed) -> Result<(), ProviderError>;
    /// Releases the lease without storing anything.
    async fn unlock(&self);
    /// The credentials stored now (never a cached copy), without the lease.
    async fn stored(&self) -> Result<Credentials, ProviderError>;
}

/// Credentials that live only as long as their connection: nothing to persist, nobody to race.
/// For tools that run one connection in one process, such as the benchmarks' baseline.
#[derive(Default)]
pub struct InMemory {
    credentials: Mutex<Credentials>,
}

impl InMemory {
    pub fn new(credentials: Credentials) -> Self {
        Self {
            credentials: Mutex::new(credentials),
        }
    }

    fn current(&self) -> Credentials {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl CredentialKeeper for InMemory {
    async fn lock(&self) -> Result<Credentials, ProviderError> {
        Ok(self.current())
    }

    async fn store_and_unlock(&self, refreshed: &Refreshed) -> Result<(), ProviderError> {
        *self.credentials.lock().unwrap_or_else(|p| p.into_inner()) = refreshed.credentials.clone();
        Ok(())
    }

    async fn unlock(&self) {}

    async fn stored(&self) -> Result<Credentials, ProviderError> {
        Ok(self.current())
    }
}

/// How long one token exchange may take, retries included. A keeper's lease outlasts two of
/// them (an exchange retried with the refresh token another holder stored) with room to store
/// the result.
pub const EXCHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(45);

/// Refreshes `conn`'s credentials through `exchange` (the provider's token request, given the
/// credentials to refresh), once per integration at a time, storing the result before the
/// connection uses it. `serves` says whether credentials somebody else refreshed meanwhile
/// serve this connection (their token's scope). See the module documentation for the rules.
pub async fn refresh<S, F, Fut>(
    conn: &mut Connection,
    serves: S,
    exchange: F,
) -> Result<(), ProviderError>
where
    S: Fn(&Credentials) -> bool,
    F: Fn(Credentials) -> Fut,
    Fut: Future<Output = Result<Refreshed, ProviderError>>,
{
    let keeper = conn.keeper.clone();
    let used = conn.credentials.clone();
    let stored = keeper.lock().await?;
    if stored.get("access_token").is_some()
        && stored.get("access_token") != used.get("access_token")
        && serves(&stored)
    {
        // Somebody refreshed while this connection waited: theirs is the live token.
        keeper.unlock().await;
        conn.credentials = stored;
        return Ok(());
    }
    // Within the lease: an exchange still running when it lapses would let another refresher
    // spend the same rotating refresh token.
    let timed_out = std::sync::atomic::AtomicBool::new(false);
    let within = |credentials: Credentials| async {
        tokio::time::timeout(EXCHANGE_DEADLINE, exchange(credentials))
            .await
            .unwrap_or_else(|_| {
                timed_out.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(ProviderError::new(
                    ErrorCode::ServiceUnavailable,
                    format!(
                        "the token endpoint did not answer within {} s",
                        EXCHANGE_DEADLINE.as_secs()
                    ),
                ))
            })
    };
    let result = match within(stored.clone()).await {
        Err(e) if e.code == ErrorCode::AuthenticationFailed => match keeper.stored().await {
            Ok(latest) if latest.get("refresh_token") != stored.get("refresh_token") => {
                within(latest).await
            }
            _ => Err(e),
        },
        other => other,
    };
    match result {
        Ok(refreshed) => {
            keeper.store_and_unlock(&refreshed).await?;
            conn.credentials = refreshed.credentials;
            Ok(())
        }
        // The provider may yet carry out an exchange given up on, and rotate the refresh token
        // it spent: the lease is left to lapse, so that nobody spends that token meanwhile.
        Err(e) if timed_out.load(std::sync::atomic::Ordering::Relaxed) => Err(e),
        Err(e) => {
            keeper.unlock().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn creds(value: serde_json::Value) -> Credentials {
        Credentials::new(value.as_object().cloned().unwrap_or_default())
    }

    fn rotate(c: &Credentials, n: usize) -> Refreshed {
        let mut next = c.clone();
        next.set("access_token", format!("at-{n}"));
        next.set("refresh_token", format!("rt-{n}"));
        Refreshed {
            credentials: next,
            expires_at: None,
        }
    }

    #[tokio::test]
    async fn a_refresh_is_stored_before_the_connection_uses_it() {
        let initial = creds(json!({"refresh_token": "rt-0"}));
        let keeper = Arc::new(InMemory::new(initial.clone()));
        let mut conn = Connection::with_keeper("i", Map::new(), initial, keeper.clone());
        refresh(&mut conn, |_| true, |c| async move { Ok(rotate(&c, 1)) })
            .await
            .unwrap();
        assert_eq!(conn.credentials.get("refresh_token"), Some("rt-1"));
        assert_eq!(
            keeper.stored().await.unwrap().get("refresh_token"),
            Some("rt-1")
        );
    }

    /// A keeper that counts its unlocks.
    struct Unlocks {
        kept: InMemory,
        unlocks: AtomicUsize,
    }

    #[async_trait]
    impl CredentialKeeper for Unlocks {
        async fn lock(&self) -> Result<Credentials, ProviderError> {
            self.kept.lock().await
        }

        async fn store_and_unlock(&self, refreshed: &Refreshed) -> Result<(), ProviderError> {
            self.unlocks.fetch_add(1, Ordering::SeqCst);
            self.kept.store_and_unlock(refreshed).await
        }

        async fn unlock(&self) {
            self.unlocks.fetch_add(1, Ordering::SeqCst);
        }

        async fn stored(&self) -> Result<Credentials, ProviderError> {
            self.kept.stored().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exchange_that_outlasts_its_deadline_gives_up_inside_the_lease() {
        let initial = creds(json!({"refresh_token": "rt-0"}));
        let keeper = Arc::new(Unlocks {
            kept: InMemory::new(initial.clone()),
            unlocks: AtomicUsize::new(0),
        });
        let mut conn = Connection::with_keeper("i", Map::new(), initial, keeper.clone());
        let started = tokio::time::Instant::now();
        let err = refresh(
            &mut conn,
            |_| true,
            |c| async move {
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                Ok(rotate(&c, 1))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::ServiceUnavailable);
        assert_eq!(started.elapsed(), EXCHANGE_DEADLINE);
        assert_eq!(
            keeper.unlocks.load(Ordering::SeqCst),
            0,
            "left to lapse: the abandoned exchange may still rotate the token"
        );
        assert_eq!(
            keeper.stored().await.unwrap().get("refresh_token"),
            Some("rt-0"),
            "nothing stored"
        );
    }

    #[tokio::test]
    async fn a_connection_that_waited_takes_the_refresh_somebody_else_made() {
        let keeper = Arc::new(InMemory::new(creds(
            json!({"refresh_token": "rt-1", "access_token": "at-1"}),
        )));
        let stale = creds(json!({"refresh_token": "rt-0", "access_token": "at-0"}));
        let mut conn = Connection::with_keeper("i", Map::new(), stale, keeper);
        let calls = AtomicUsize::new(0);
        refresh(
            &mut conn,
            |_| true,
            |c| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Ok(rotate(&c, 2)) }
            },
        )
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no refresh token spent");
        assert_eq!(conn.credentials.get("access_token"), Some("at-1"));
    }

    #[tokio::test]
    async fn a_refresh_somebody_else_made_for_another_scope_is_refreshed_again_with_its_token() {
        // A job that still only reads refreshed while a write-back waited for the lease.
        let keeper = Arc::new(InMemory::new(creds(json!({
            "refresh_token": "rt-1", "access_token": "at-1", "access_token_scope": "read",
        }))));
        let stale = creds(json!({"refresh_token": "rt-0", "access_token": "at-0"}));
        let mut conn = Connection::with_keeper("i", Map::new(), stale, keeper.clone());
        let spent = Mutex::new(Vec::new());
        refresh(
            &mut conn,
            |c| c.get("access_token_scope") == Some("write"),
            |c| {
                spent
                    .lock()
                    .unwrap()
                    .extend(c.get("refresh_token").map(str::to_string));
                let mut next = rotate(&c, 2);
                next.credentials.set("access_token_scope", "write");
                async move { Ok(next) }
            },
        )
        .await
        .unwrap();
        assert_eq!(
            *spent.lock().unwrap(),
            ["rt-1"],
            "the live refresh token, once"
        );
        assert_eq!(conn.credentials.get("access_token"), Some("at-2"));
        let stored = keeper.stored().await.unwrap();
        assert_eq!(stored.get("access_token_scope"), Some("write"));
    }

    #[tokio::test]
    async fn invalid_grant_with_a_token_rotated_meanwhile_is_tried_once_with_the_new_one() {
        /// Hands out a refresh token another process has just spent.
        struct Racing(InMemory);
        #[async_trait]
        impl CredentialKeeper for Racing {
            async fn lock(&self) -> Result<Credentials, ProviderError> {
                Ok(creds(json!({"refresh_token": "rt-spent"})))
            }
            async fn store_and_unlock(&self, r: &Refreshed) -> Result<(), ProviderError> {
                self.0.store_and_unlock(r).await
            }
            async fn unlock(&self) {}
            async fn stored(&self) -> Result<Credentials, ProviderError> {
                self.0.stored().await
            }
        }
        let keeper = Arc::new(Racing(InMemory::new(creds(
            json!({"refresh_token": "rt-live"}),
        ))));
        let mut conn = Connection::with_keeper("i", Map::new(), Credentials::default(), keeper);
        refresh(
            &mut conn,
            |_| true,
            |c| async move {
                if c.get("refresh_token") == Some("rt-live") {
                    Ok(rotate(&c, 3))
                } else {
                    Err(ProviderError::new(
                        ErrorCode::AuthenticationFailed,
                        "invalid_grant",
                    ))
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(conn.credentials.get("refresh_token"), Some("rt-3"));
    }

    #[tokio::test]
    async fn a_revoked_token_fails_and_releases_the_lease() {
        let unlocked = Arc::new(AtomicUsize::new(0));
        struct Counting(Arc<AtomicUsize>);
        #[async_trait]
        impl CredentialKeeper for Counting {
            async fn lock(&self) -> Result<Credentials, ProviderError> {
                Ok(creds(json!({"refresh_token": "rt-revoked"})))
            }
            async fn store_and_unlock(&self, _: &Refreshed) -> Result<(), ProviderError> {
                unreachable!("nothing to store")
            }
            async fn unlock(&self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            async fn stored(&self) -> Result<Credentials, ProviderError> {
                Ok(creds(json!({"refresh_token": "rt-revoked"})))
            }
        }
        let mut conn = Connection::with_keeper(
            "i",
            Map::new(),
            Credentials::default(),
            Arc::new(Counting(unlocked.clone())),
        );
        let err = refresh(
            &mut conn,
            |_| true,
            |_| async {
                Err::<Refreshed, _>(ProviderError::new(
                    ErrorCode::AuthenticationFailed,
                    "invalid_grant",
                ))
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::AuthenticationFailed);
        assert_eq!(unlocked.load(Ordering::SeqCst), 1);
    }
}
