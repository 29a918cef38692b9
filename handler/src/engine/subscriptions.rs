//! Provider-side subscriptions (Microsoft Graph change notifications): created for every
//! resource an integration watches, renewed before they lapse, deleted when no longer wanted.
//!
//! [`plan`] decides, as a pure function of the integration's subscriptions, the resources its
//! adapter wants watched and the time, what to do. [`maintain`] carries the plan out: a new
//! subscription gets a secret `clientState` of its own, kept with the integration's
//! credentials in the secret store (never in the integration document), and the integration
//! records the subscription's id, resource and expiry under its etag. A subscription Graph no
//! longer has is created again. It runs on TokenRefresher's hourly tick, so a subscription is
//! renewed when it would lapse before the tick after next.

use chrono::{DateTime, Duration, Utc};

use adapters::credentials::{CredentialKeeper, Refreshed};
use adapters::{
    ErrorCode, Provider, ProviderError, SubscriptionInfo, SubscriptionRequest, Subscriptions,
};

use super::credentials::{self, StoredCredentials};
use super::failure::{Failure, FailureCode};
use super::state::update_integration;
use crate::app::App;
use crate::model::integration::WebhookSubscription;
use crate::model::{Integration, Shard};

/// Subscriptions that lapse sooner than this are renewed now: two hourly ticks.
pub const RENEW_AHEAD: Duration = Duration::hours(2);

/// How long a subscription is asked to live: the provider's longest, less a margin for clocks
/// that disagree (an hour, or a tenth of a short lifetime).
pub fn lifetime(max: Duration) -> Duration {
    max - Duration::minutes(60).min(max / 10)
}

/// One thing to do about an integration's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Create {
        resource: String,
    },
    Renew {
        id: String,
    },
    Delete {
        id: String,
    },
    /// A subscription to `resource` at this app's address, in place of `old`, which deliver
    /// elsewhere: they go only once it is made, and keep delivering where they do otherwise.
    Replace {
        resource: String,
        old: Vec<String>,
    },
}

/// What to do so that every wanted resource has one subscription that outlives `now +
/// RENEW_AHEAD` and delivers to `address` (a digest of the notification URL), and no other
/// subscription exists. Of two for one resource (made by two runs at once), the one that lasts
/// longer is kept; one that delivers elsewhere (the app's URL or function key changed since it
/// was made) is replaced, unless one for the resource already delivers here. One made before
/// addresses were kept is taken to deliver to `address`.
pub fn plan(
    existing: &[WebhookSubscription],
    wanted: &[String],
    address: &str,
    now: DateTime<Utc>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let elsewhere = |s: &WebhookSubscription| s.address.as_deref().is_some_and(|a| a != address);
    for resource in wanted {
        let (moved, mut of_resource): (Vec<&WebhookSubscription>, Vec<&WebhookSubscription>) =
            existing
                .iter()
                .filter(|s| &s.resource == resource)
                .partition(|s| elsewhere(s));
        if of_resource.is_empty() && !moved.is_empty() {
            steps.push(Step::Replace {
                resource: resource.clone(),
                old: moved.iter().map(|s| s.id.clone()).collect(),
            });
            continue;
        }
        steps.extend(moved.iter().map(|s| Step::Delete { id: s.id.clone() }));
        of_resource.sort_by_key(|s| std::cmp::Reverse(s.expires_at));
        match of_resource.split_first() {
            None => steps.push(Step::Create {
                resource: resource.clone(),
            }),
            Some((kept, extra)) => {
                if kept.expires_at <= now + RENEW_AHEAD {
                    steps.push(Step::Renew {
                        id: kept.id.clone(),
                    });
                }
                steps.extend(extra.iter().map(|s| Step::Delete { id: s.id.clone() }));
            }
        }
    }
    for s in existing {
        if !wanted.contains(&s.resource) {
            steps.push(Step::Delete { id: s.id.clone() });
        }
    }
    steps
}

/// What maintenance did to one integration.
#[derive(Debug, Default)]
pub struct Maintained {
    pub created: usize,
    pub renewed: usize,
    pub deleted: usize,
    /// Resources the provider would not subscribe to, renew or stop (a channel deleted or
    /// archived, one the app may not read), and why: the integration's other resources are
    /// maintained all the same, and these are tried again on the next tick.
    pub refused: Vec<Refused>,
}

/// A step the provider refused, for one resource.
#[derive(Debug)]
pub struct Refused {
    pub resource: String,
    pub failure: Failure,
}

/// Brings `integration`'s subscriptions in line with what its adapter wants watched. A step the
/// provider refuses for its resource alone is listed in [`Maintained::refused`]; one that the
/// steps after it would meet as well (the store, the secret store or the provider unavailable,
/// credentials refused) ends maintenance with it.
pub async fn maintain(
    app: &App,
    shard: &Shard,
    integration: &Integration,
    provider: &dyn Provider,
    now: DateTime<Utc>,
) -> Result<Maintained, Failure> {
    let Some(subscriptions) = provider.subscriptions() else {
        return Ok(Maintained::default());
    };
    let url = app.settings.webhook_url(provider.name()).ok_or_else(|| {
        Failure::new(
            ErrorCode::ValidationError,
            "WEBHOOK_BASE_URL is not set: providers cannot be told where to deliver",
        )
    })?;
    let entities: Vec<String> = integration
        .entity_mappings
        .iter()
        .map(|m| m.external_entity.clone())
        .collect();
    let wanted = subscriptions.resources(&integration.connection, &entities);
    let address = WebhookSubscription::address_digest(&url);
    if integration
        .subscriptions
        .iter()
        .any(|s| s.address.is_none())
    {
        // Made before addresses were kept: taken to deliver here, and marked so, that a later
        // change of the URL or key is seen.
        save(app, shard, Change::Addressed(address.clone()), now).await?;
    }
    let steps = plan(&integration.subscriptions, &wanted, &address, now);
    if steps.is_empty() {
        return Ok(Maintained::default());
    }
    let conn = credentials::connect(app, &shard.tenant_id, &shard.id, integration).await?;
    let mut maintenance = Maintenance {
        app,
        shard,
        subscriptions,
        conn,
        url,
        now,
        current: integration.subscriptions.clone(),
        done: Maintained::default(),
    };
    for step in steps {
        let resource = match &step {
            Step::Create { resource } | Step::Replace { resource, .. } => resource.clone(),
            Step::Renew { id } | Step::Delete { id } => maintenance
                .current
                .iter()
                .find(|s| &s.id == id)
                .map_or_else(|| id.clone(), |s| s.resource.clone()),
        };
        if let Err(failure) = maintenance.carry_out(step).await {
            if stops_maintenance(&failure) {
                return Err(failure);
            }
            maintenance.done.refused.push(Refused { resource, failure });
        }
    }
    Ok(maintenance.done)
}

/// Whether a step's failure is one every later step would meet too.
fn stops_maintenance(failure: &Failure) -> bool {
    failure.code == FailureCode::Store
        || failure.is_retryable()
        || failure.resume_next_run
        || failure.code.needs_new_credentials()
}

/// One integration's maintenance under way: what it works with, and what it has done.
struct Maintenance<'a> {
    app: &'a App,
    shard: &'a Shard,
    subscriptions: &'a dyn Subscriptions,
    conn: adapters::Connection,
    url: String,
    now: DateTime<Utc>,
    /// The integration's subscriptions, as the steps so far left them.
    current: Vec<WebhookSubscription>,
    done: Maintained,
}

impl Maintenance<'_> {
    async fn carry_out(&mut self, step: Step) -> Result<(), Failure> {
        let (app, shard, now) = (self.app, self.shard, self.now);
        match step {
            Step::Create { resource } => self.add(&resource).await?,
            Step::Replace { resource, old } => {
                self.add(&resource).await?;
                for id in old {
                    self.delete(id).await?;
                }
            }
            Step::Renew { id } => {
                let Some(index) = self.current.iter().position(|s| s.id == id) else {
                    return Ok(());
                };
                let resource = self.current[index].resource.clone();
                let until = now + lifetime(self.subscriptions.max_lifetime(&resource));
                let info = info_of(&self.current[index]);
                match self.subscriptions.renew(&mut self.conn, &info, until).await {
                    Ok(expires_at) => {
                        self.current[index].expires_at = expires_at;
                        save(app, shard, Change::Renewed { id, expires_at }, now).await?;
                    }
                    Err(e) if e.code == ErrorCode::NotFound => {
                        // Gone, or not renewable: a new one replaces it, and the old one (if
                        // the provider still has it) stops delivering.
                        if let Err(e) = self.subscriptions.unsubscribe(&mut self.conn, &info).await
                        {
                            tracing::warn!(integration_id = %shard.id, subscription = %id, error = %e, "a replaced subscription could not be stopped; it lapses on its own");
                        }
                        self.current.remove(index);
                        // Dropped from the integration at once: should the provider refuse a
                        // new one, the old one is not renewed again on every tick.
                        let replaced = self.create(&resource, Some(&id)).await;
                        let change = match &replaced {
                            Ok(new) => Change::Replaced {
                                old: id,
                                new: new.clone(),
                            },
                            Err(_) => Change::Removed(id),
                        };
                        save(app, shard, change, now).await?;
                        self.current.push(replaced?);
                    }
                    Err(e) => return Err(e.into()),
                }
                self.done.renewed += 1;
            }
            Step::Delete { id } => self.delete(id).await?,
        }
        Ok(())
    }

    /// Creates a subscription to `resource` and stores it.
    async fn add(&mut self, resource: &str) -> Result<(), Failure> {
        let created = self.create(resource, None).await?;
        self.current.push(created.clone());
        self.done.created += 1;
        save(self.app, self.shard, Change::Added(created), self.now).await
    }

    /// Stops subscription `id` at the provider and drops it, and its secret.
    async fn delete(&mut self, id: String) -> Result<(), Failure> {
        if let Some(old) = self.current.iter().find(|s| s.id == id) {
            self.subscriptions
                .unsubscribe(&mut self.conn, &info_of(old))
                .await?;
        }
        self.current.retain(|s| s.id != id);
        keep_client_states(self.app, self.shard, &self.current, Some(&id), None).await?;
        self.done.deleted += 1;
        save(self.app, self.shard, Change::Removed(id), self.now).await
    }

    /// Creates a subscription to `resource`, and keeps its secret with those of the current
    /// ones (the secrets of subscriptions that are gone are dropped, and that of the one it
    /// replaces).
    async fn create(
        &mut self,
        resource: &str,
        replacing: Option<&str>,
    ) -> Result<WebhookSubscription, Failure> {
        let client_state = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let until = self.now + lifetime(self.subscriptions.max_lifetime(resource));
        let info = self
            .subscriptions
            .subscribe(
                &mut self.conn,
                &SubscriptionRequest {
                    resource: resource.to_string(),
                    notification_url: self.url.clone(),
                    lifecycle_url: self.url.clone(),
                    client_state: client_state.clone(),
                    expires_at: until,
                },
            )
            .await?;
        let kept = keep_client_states(
            self.app,
            self.shard,
            &self.current,
            replacing,
            Some((&info.id, &client_state)),
        )
        .await;
        if let Err(e) = kept {
            // A subscription whose secret is not kept can deliver nothing the receiver would
            // take: stopped now, not left to deliver until it lapses while the next tick makes
            // another.
            if let Err(stop) = self.subscriptions.unsubscribe(&mut self.conn, &info).await {
                tracing::warn!(integration_id = %self.shard.id, subscription = %info.id, error = %stop, "a subscription whose secret was not kept could not be stopped; it lapses on its own");
            }
            return Err(e.into());
        }
        Ok(WebhookSubscription {
            id: info.id,
            resource: info.resource,
            expires_at: info.expires_at,
            resource_id: info.resource_id,
            address: Some(WebhookSubscription::address_digest(&self.url)),
        })
    }
}

/// One step of maintenance, as it changes the integration's list of subscriptions.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Added(WebhookSubscription),
    Renewed {
        id: String,
        expires_at: DateTime<Utc>,
    },
    /// A subscription the provider no longer had, and the one made in its place.
    Replaced {
        old: String,
        new: WebhookSubscription,
    },
    Removed(String),
    /// Those with no address yet deliver to this one.
    Addressed(String),
}

/// Applies `change` to the list of subscriptions as it is stored now, not as maintenance read
/// it: the webhook receiver may have marked one for renewal or dropped one meanwhile, and a
/// renewal must not bring back a subscription the receiver dropped.
fn apply(stored: &mut Vec<WebhookSubscription>, change: &Change) {
    match change {
        Change::Added(new) => {
            if !stored.iter().any(|s| s.id == new.id) {
                stored.push(new.clone());
            }
        }
        Change::Renewed { id, expires_at } => stored
            .iter_mut()
            .filter(|s| &s.id == id)
            .for_each(|s| s.expires_at = *expires_at),
        Change::Replaced { old, new } => {
            stored.retain(|s| &s.id != old);
            apply(stored, &Change::Added(new.clone()));
        }
        Change::Removed(id) => stored.retain(|s| &s.id != id),
        Change::Addressed(address) => stored
            .iter_mut()
            .filter(|s| s.address.is_none())
            .for_each(|s| s.address = Some(address.clone())),
    }
}

fn info_of(subscription: &WebhookSubscription) -> SubscriptionInfo {
    SubscriptionInfo {
        id: subscription.id.clone(),
        resource: subscription.resource.clone(),
        expires_at: subscription.expires_at,
        resource_id: subscription.resource_id.clone(),
    }
}

/// Keeps the secrets of exactly the live subscriptions (adding `new`) among the integration's
/// credentials, under the credentials' lease so that it cannot overwrite a token refreshed
/// meanwhile. Live are those of `current`, as maintenance left them, and those the integration
/// lists as it is stored now (another run, an operator's `subscribe`, may have made one since
/// maintenance read it), but for `dropped`.
async fn keep_client_states(
    app: &App,
    shard: &Shard,
    current: &[WebhookSubscription],
    dropped: Option<&str>,
    new: Option<(&str, &str)>,
) -> Result<(), ProviderError> {
    let keeper = StoredCredentials::new(app, &shard.tenant_id, &shard.id);
    let stored = keeper.lock().await?;
    let listed = match app.store.get(&shard.tenant_id, &shard.id).await {
        Ok(found) => found
            .and_then(|v| v.value.data::<Integration>().ok())
            .map(|i| i.subscriptions)
            .unwrap_or_default(),
        Err(e) => {
            keeper.unlock().await;
            return Err(ProviderError::new(
                ErrorCode::ServiceUnavailable,
                e.to_string(),
            ));
        }
    };
    let live = |id: &str| dropped != Some(id) && current.iter().chain(&listed).any(|s| s.id == id);
    let mut kept = stored.clone().into_inner();
    kept.retain(|name, _| {
        name.strip_prefix(&WebhookSubscription::client_state_key(""))
            .is_none_or(live)
    });
    let mut credentials = adapters::Credentials::new(kept);
    if let Some((id, secret)) = new {
        credentials.set(&WebhookSubscription::client_state_key(id), secret);
    }
    if credentials == stored {
        keeper.unlock().await;
        return Ok(());
    }
    keeper
        .store_and_unlock(&Refreshed {
            credentials,
            expires_at: None,
        })
        .await
}

/// Stores one step's change, each step as it is done: a subscription the provider made is
/// kept even if a later step fails.
async fn save(app: &App, shard: &Shard, change: Change, now: DateTime<Utc>) -> Result<(), Failure> {
    update_integration(app, &shard.tenant_id, &shard.id, now, |i| {
        let before = i.subscriptions.clone();
        apply(&mut i.subscriptions, &change);
        i.subscriptions != before
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 22, 0, 0, 0).unwrap() + Duration::hours(hours)
    }

    fn sub(id: &str, resource: &str, expires: i64) -> WebhookSubscription {
        WebhookSubscription {
            id: id.into(),
            resource: resource.into(),
            expires_at: at(expires),
            resource_id: None,
            address: None,
        }
    }

    #[test]
    fn a_step_changes_the_subscriptions_as_stored_now_not_as_maintenance_read_them() {
        // Maintenance read [a, b]; meanwhile the receiver dropped b (the provider removed it)
        // and marked a for renewal.
        let mut stored = vec![sub("a", "drive/root", 0)];
        apply(
            &mut stored,
            &Change::Renewed {
                id: "b".into(),
                expires_at: at(70),
            },
        );
        assert_eq!(stored, [sub("a", "drive/root", 0)], "b is not brought back");
        apply(&mut stored, &Change::Added(sub("c", "drive/x", 70)));
        apply(&mut stored, &Change::Added(sub("c", "drive/x", 70)));
        assert_eq!(stored.len(), 2, "added once");
        apply(
            &mut stored,
            &Change::Replaced {
                old: "a".into(),
                new: sub("a2", "drive/root", 70),
            },
        );
        apply(&mut stored, &Change::Removed("c".into()));
        assert_eq!(stored, [sub("a2", "drive/root", 70)]);
    }

    #[test]
    fn missing_resources_are_subscribed_lapsing_ones_renewed_and_unwanted_ones_deleted() {
        let existing = [
            sub("s1", "/teams/t/channels/a/messages", 1),
            sub("s2", "/teams/t/channels/b/messages", 48),
            sub("s3", "/teams/t/channels/gone/messages", 48),
        ];
        let wanted = [
            "/teams/t/channels/a/messages".to_string(),
            "/teams/t/channels/b/messages".to_string(),
            "/teams/t/channels/c/messages".to_string(),
        ];
        assert_eq!(
            plan(&existing, &wanted, "here", at(0)),
            [
                Step::Renew { id: "s1".into() },
                Step::Create {
                    resource: "/teams/t/channels/c/messages".into()
                },
                Step::Delete { id: "s3".into() },
            ]
        );
    }

    #[test]
    fn of_two_subscriptions_for_one_resource_the_longer_lived_is_kept() {
        let existing = [
            sub("made-first", "/drives/d/root", 48),
            sub("made-since", "/drives/d/root", 700),
        ];
        let wanted = ["/drives/d/root".to_string()];
        assert_eq!(
            plan(&existing, &wanted, "here", at(0)),
            [Step::Delete {
                id: "made-first".into()
            }]
        );
    }

    #[test]
    fn a_subscription_that_delivers_elsewhere_is_replaced_and_goes_once_its_replacement_is_made() {
        let mut moved = sub("old-key", "/drives/d/root", 700);
        moved.address = Some("before".into());
        let mut kept = sub("kept", "/drives/e/root", 700);
        kept.address = Some("here".into());
        let wanted = ["/drives/d/root".to_string(), "/drives/e/root".to_string()];
        assert_eq!(
            plan(&[moved.clone(), kept], &wanted, "here", at(0)),
            [Step::Replace {
                resource: "/drives/d/root".into(),
                old: vec!["old-key".into()]
            }]
        );
        // Once its replacement is made, the one left delivering elsewhere goes.
        let mut replacement = sub("new-key", "/drives/d/root", 700);
        replacement.address = Some("here".into());
        assert_eq!(
            plan(&[moved, replacement], &wanted[..1], "here", at(0)),
            [Step::Delete {
                id: "old-key".into()
            }]
        );
    }

    #[test]
    fn subscriptions_are_asked_to_live_a_little_less_than_the_provider_allows() {
        assert_eq!(lifetime(Duration::minutes(4320)), Duration::minutes(4260));
        assert_eq!(lifetime(Duration::minutes(60)), Duration::minutes(54));
    }

    #[test]
    fn a_subscription_is_renewed_when_it_would_lapse_before_the_tick_after_next() {
        let existing = [sub("s1", "/drives/d/root", 2)];
        let wanted = ["/drives/d/root".to_string()];
        assert_eq!(
            plan(&existing, &wanted, "here", at(0)),
            [Step::Renew { id: "s1".into() }]
        );
        assert!(plan(&existing, &wanted, "here", at(-1)).is_empty());
    }
}
