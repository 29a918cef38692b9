//! Job-level retries: what happens to a sync job whose run failed.
//!
//! A retryable failure (rate limit, timeout, unavailable, reset) is re-enqueued as a new
//! scheduled message with exponential backoff, and the current delivery completes: holding the
//! message and failing the invocation would retry within seconds and burn the queue's delivery
//! count. A non-retryable failure, or the tenth attempt, is dead-lettered with its reason.

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

pub fn after_failure(code: FailureCode, attempt: u32, now: DateTime<Utc>) -> AfterFailure {
    if !code.is_retryable() {
        AfterFailure::DeadLetter { exhausted: false }
    } else if attempt >= MAX_ATTEMPTS {
        AfterFailure::DeadLetter { exhausted: true }
    } else {
        AfterFailure::RetryAt {
            attempt: attempt + 1,
            at: now + backoff(attempt),
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
    fn only_retryable_failures_are_retried_and_only_ten_times() {
        let now = Utc::now();
        assert_eq!(
            after_failure(ErrorCode::RateLimit.into(), 1, now),
            AfterFailure::RetryAt {
                attempt: 2,
                at: now + Duration::seconds(5)
            }
        );
        assert_eq!(
            after_failure(ErrorCode::AuthenticationFailed.into(), 1, now),
            AfterFailure::DeadLetter { exhausted: false }
        );
        assert_eq!(
            after_failure(ErrorCode::Timeout.into(), MAX_ATTEMPTS, now),
            AfterFailure::DeadLetter { exhausted: true }
        );
    }
}
