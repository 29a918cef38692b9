//! Retrying a provider request in place.
//!
//! A provider that answers one request in four with 503 must not cost the job a whole attempt
//! (the engine's job-level retries wait 5 s, then 10 s, ... up to 5 min, and start the page over).
//! So a request that fails in a way the same request may not fail again (5xx, 429, a timeout,
//! a dropped connection) is sent again in place: up to [`RetryPolicy::retries`] more times, after
//! the base delay, then twice that, then four times (±20%), or after the provider's `Retry-After`
//! when it says one. A `Retry-After` longer than [`RetryPolicy::max_wait`] is not waited out in
//! place: the error goes back to the engine, whose job-level retry (or "resume next run") is the
//! right tool for an outage that long.
//!
//! The decision is [`RetryPolicy::wait_before`], a pure function; [`Retries`] counts one
//! request's tries and sleeps, so an adapter's request loop is: send, and on failure
//! `retries.wait_or_fail(error, retry_after).await?`.
//!
//! Every adapter sends through one [`client`] per process: building one loads the trusted
//! roots for TLS, milliseconds that a cold start would otherwise pay once per provider, inside
//! its first sync. [`warm_up`] pays them before any job needs the client.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{ErrorCode, ProviderError};

/// The HTTP client every provider request goes through: its connection pools are per host, so
/// providers share nothing but the TLS roots.
pub fn client() -> &'static reqwest::Client {
    static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client with default TLS builds")
    });
    &CLIENT
}

/// Builds the [`client`] now, on a thread that may block: for a server to call as it starts,
/// so that its first sync does not wait for it.
pub fn warm_up() {
    client();
}

/// How a failed request is retried in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub retries: u32,
    /// The wait before the first retry; doubled for each next one.
    pub base: Duration,
    /// The longest `Retry-After` waited in place.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retries: 3,
            base: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The policy with another base delay.
    pub fn with_base(base: Duration) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// How long to wait before retrying a request that failed with `error` after `retried`
    /// retries, or `None` to give up and return the error. `retry_after` is what the provider
    /// asked for; `jitter` in [0, 1] spreads the waits of many clients (0.5 is no change).
    pub fn wait_before(
        &self,
        error: &ProviderError,
        retried: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if !error.is_retryable() || error.resume_next_run || retried >= self.retries {
            return None;
        }
        match retry_after {
            Some(wait) if wait > self.max_wait => None,
            Some(wait) => Some(wait),
            None => {
                let backoff = self.base.saturating_mul(1 << retried.min(16));
                Some(backoff.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
            }
        }
    }
}

/// The retries of one request.
pub struct Retries {
    policy: RetryPolicy,
    retried: u32,
}

impl Retries {
    pub fn new(policy: RetryPolicy) -> Self {
        Self { policy, retried: 0 }
    }

    /// Waits before the request is sent again, or gives `error` back when it should not be.
    pub async fn wait_or_fail(
        &mut self,
        error: ProviderError,
        retry_after: Option<Duration>,
    ) -> Result<(), ProviderError> {
        match self
            .policy
            .wait_before(&error, self.retried, retry_after, jitter())
        {
            Some(wait) => {
                self.retried += 1;
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(error),
        }
    }
}

/// A fresh jitter value in [0, 1].
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos().into()),
    );
    (hasher.finish() % 10_001) as f64 / 10_000.0
}

/// What an HTTP status says about a failed request, in the error vocabulary: whether waiting
/// (429, 408, 423, 5xx), new credentials (401, 403) or nothing (400, 404) can help.
pub fn status_code(status: reqwest::StatusCode) -> ErrorCode {
    match status.as_u16() {
        401 => ErrorCode::AuthenticationFailed,
        403 => ErrorCode::InvalidCredentials,
        404 | 410 => ErrorCode::NotFound,
        // Locked: a file checked out, or open for editing; it is let go in time.
        408 | 423 | 504 => ErrorCode::Timeout,
        409 | 412 => ErrorCode::Conflict,
        429 => ErrorCode::RateLimit,
        s if s >= 500 => ErrorCode::ServiceUnavailable,
        _ => ErrorCode::ValidationError,
    }
}

/// `error` without what `url`'s query holds (the function key the host admits deliveries by,
/// as `code`): a provider refusing a notification URL says it back in its error, and errors
/// are logged and shown to operators.
pub fn without_query_of(mut error: ProviderError, url: &str) -> ProviderError {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return error;
    };
    if let Some(query) = parsed.query() {
        error.message = error.message.replace(query, "…");
    }
    for (_, value) in parsed.query_pairs() {
        if !value.is_empty() {
            error.message = error.message.replace(value.as_ref(), "…");
        }
    }
    error
}

/// A request that got no answer: timed out, refused, or cut off.
pub fn transport_error(what: &str, e: &reqwest::Error) -> ProviderError {
    let code = if e.is_timeout() {
        ErrorCode::Timeout
    } else if e.is_connect() {
        ErrorCode::ServiceUnavailable
    } else {
        ErrorCode::ConnectionReset
    };
    // reqwest's message names the URL, never headers or bodies.
    ProviderError::new(code, format!("request to {what} failed: {e}"))
}

/// Checks a URL setting: https, or plain http to a loopback address (fakes and tests), and
/// keeps it without a trailing slash.
pub fn check_url(settings: &mut Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    let Some(value) = settings.get(name) else {
        return Ok(None);
    };
    let text = value
        .as_str()
        .ok_or_else(|| format!("connection.{name} must be a string"))?;
    let url = reqwest::Url::parse(text)
        .map_err(|_| format!("connection.{name} must be an absolute URL"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(format!(
                "connection.{name} must be https (plain http only to a loopback address)"
            ));
        }
    }
    let url = text.trim_end_matches('/').to_string();
    settings.insert(name.to_string(), Value::String(url.clone()));
    Ok(Some(url))
}

/// Reads a `Retry-After` header: delay-seconds or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_notification_url_is_told_without_its_key() {
        let url = "https://func-sync.example/api/webhooks/google_drive?code=k3y%2Fs3cret%3D%3D";
        let refused = ProviderError::new(
            ErrorCode::ValidationError,
            format!(
                "400 push.webhookUrlUnauthorized: Unauthorized WebHook callback channel: {url}"
            ),
        );
        let told = without_query_of(refused, url).message;
        assert!(!told.contains("k3y"), "{told}");
        assert!(
            told.contains("https://func-sync.example/api/webhooks/google_drive?…"),
            "{told}"
        );
        let decoded =
            ProviderError::new(ErrorCode::ValidationError, "callback k3y/s3cret== refused");
        assert!(!without_query_of(decoded, url).message.contains("k3y"));
    }
    use serde_json::json;

    #[test]
    fn a_failure_waiting_can_mend_is_retried_and_no_other() {
        for status in [408, 423, 429, 500, 503, 504] {
            let code = status_code(reqwest::StatusCode::from_u16(status).unwrap());
            assert!(code.is_retryable(), "{status}: {code}");
        }
        for status in [400, 401, 403, 404, 409, 412] {
            let code = status_code(reqwest::StatusCode::from_u16(status).unwrap());
            assert!(!code.is_retryable(), "{status}: {code}");
        }
    }

    #[test]
    fn urls_must_be_https_unless_they_stay_on_this_machine() {
        let settings = |url: &str| json!({"apiBaseUrl": url}).as_object().unwrap().clone();
        for ok in [
            "https://graph.microsoft.com/v1.0/",
            "http://127.0.0.1:8080/v1.0",
            "http://localhost:9/",
            "http://[::1]:9/",
        ] {
            assert!(check_url(&mut settings(ok), "apiBaseUrl").is_ok(), "{ok}");
        }
        assert_eq!(
            check_url(
                &mut settings("https://graph.microsoft.com/v1.0/"),
                "apiBaseUrl"
            )
            .unwrap(),
            Some("https://graph.microsoft.com/v1.0".into())
        );
        for bad in [
            "http://graph.microsoft.com",
            "graph.microsoft.com",
            "ftp://x",
        ] {
            let err = check_url(&mut settings(bad), "apiBaseUrl").unwrap_err();
            assert!(err.starts_with("connection.apiBaseUrl"), "{bad}: {err}");
        }
    }

    fn error(code: ErrorCode) -> ProviderError {
        ProviderError::new(code, "x")
    }

    #[test]
    fn transient_failures_are_retried_three_times_with_doubling_waits() {
        let policy = RetryPolicy::default();
        let unavailable = error(ErrorCode::ServiceUnavailable);
        let waits: Vec<_> = (0..4)
            .map(|n| policy.wait_before(&unavailable, n, None, 0.5))
            .collect();
        assert_eq!(
            waits,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                None
            ]
        );
        let low = policy.wait_before(&unavailable, 0, None, 0.0).unwrap();
        let high = policy.wait_before(&unavailable, 0, None, 1.0).unwrap();
        assert_eq!(
            (low, high),
            (Duration::from_millis(800), Duration::from_millis(1200))
        );
    }

    #[test]
    fn the_providers_retry_after_wins_unless_it_is_too_long_to_wait_in_place() {
        let policy = RetryPolicy::default();
        let throttled = error(ErrorCode::RateLimit);
        assert_eq!(
            policy.wait_before(&throttled, 0, Some(Duration::from_secs(7)), 0.5),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            policy.wait_before(&throttled, 0, Some(Duration::from_secs(3600)), 0.5),
            None
        );
    }

    #[test]
    fn permanent_failures_and_used_up_allocations_are_not_retried_in_place() {
        let policy = RetryPolicy::default();
        for code in [
            ErrorCode::AuthenticationFailed,
            ErrorCode::NotFound,
            ErrorCode::ValidationError,
        ] {
            assert_eq!(policy.wait_before(&error(code), 0, None, 0.5), None);
        }
        let quota = ProviderError::quota("daily limit");
        assert_eq!(policy.wait_before(&quota, 0, None, 0.5), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_tried_four_times_in_all_then_its_error_is_returned() {
        let mut retries = Retries::new(RetryPolicy::default());
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            retries
                .wait_or_fail(error(ErrorCode::ServiceUnavailable), None)
                .await
                .unwrap();
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(5600) && waited <= Duration::from_millis(8400),
            "1 + 2 + 4 s, ±20%: {waited:?}"
        );
        let last = retries
            .wait_or_fail(error(ErrorCode::ServiceUnavailable), None)
            .await
            .unwrap_err();
        assert_eq!(last.code, ErrorCode::ServiceUnavailable);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let now = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "12".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(12)));
        headers.insert(
            "retry-after",
            "Sun, 22 Nov 2026 10:00:30 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
        headers.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
    }
}
