//! Job-level retries: what happens to a sync job whose run failed.
//!
//! A retryable failure (rate limit, timeout, unavailable, reset) is re-enqueued as a new
//! scheduled message with exponential backoff, and the current delivery completes: holding the
//! message and failing the invocation would retry within seconds and burn the queue's delivery
//! count. A non-retryable failure, or the tenth attempt, is dead-lettered with its reason. A
//! provider that asked for a longer wait than the backoff (a `Retry-After` of minutes, too long
//! to wait out in place) gets it: a retry sooner would be throttled again and spend an attempt.

use chrono::{DateTime, Duration, Utc};

use super::failure::FailureCode;

/// Attempts a job gets before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 10;
const INITIAL_DELAY_SECS: i64 = 5;
const MAX_DELAY_SECS: i64 = 5 * 60;

/// What to do with a job after attempt number `attempt` failed with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    RetryAt { attempt: u32, at: DateTime<Utc> },
    DeadLetter { exhausted: bool },
}

/// The delay before attempt `attempt + 1`: 5 s, 10 s, 20 s, ... capped at 5 minutes.
pub fn backoff(attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    Duration::seconds((INITIAL_DELAY_SECS << exponent).min(MAX_DELAY_SECS))
}

/// What follows attempt `attempt`'s failure with `code`; a retry comes after the backoff, and
/// not before `not_before`, when the provider asked to wait until then (a `Retry-After`).
pub fn after_failure(
    code: FailureCode,
    attempt: u32,
    not_before: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> AfterFailure {
    if !code.is_retryable() {
        AfterFailure::DeadLetter { exhausted: false }
    } else if attempt >= MAX_ATTEMPTS {
        AfterFailure::DeadLetter { exhausted: true }
    } else {
        let after_backoff = now + backoff(attempt);
        AfterFailure::RetryAt {
            attempt: attempt + 1,
            at: not_before.map_or(after_backoff, |at| at.max(after_backoff)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::ErrorCode;

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        let delays: Vec<i64> = (1..=9).map(|a| backoff(a).num_seconds()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_retry_waits_as_long_as_the_provider_asked() {
        let now = Utc::now();
        let asked = now + Duration::seconds(315);
        assert_eq!(
            after_failure(ErrorCode::RateLimit.into(), 1, Some(asked), now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: asked
            }
        );
        assert_eq!(
            after_failure(ErrorCode::RateLimit.into(), 9, Some(now), now),
            AfterFailure::RetryAt {
                attempt: 10,
                at: now + Duration::minutes(5)
            },
            "never sooner than the backoff"
        );
    }

    #[test]
    fn only_retryable_failures_are_retried_and_only_ten_times() {
        let now = Utc::now();
        assert_eq!(
            after_failure(ErrorCode::RateLimit.into(), 1, None, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + Duration::seconds(5)
            }
        );
        assert_eq!(
            after_failure(ErrorCode::AuthenticationFailed.into(), 1, None, now),
            AfterFailure::DeadLetter { exhausted: false }
        );
        assert_eq!(
            after_failure(ErrorCode::Timeout.into(), MAX_ATTEMPTS, None, now),
            AfterFailure::DeadLetter { exhausted: true }
        );
    }
}
