//! Request pacing per key (an integration): at most N requests in any second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket per key. `acquire` waits until the key may send another request.
pub struct RateLimiter {
    per_second: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a request slot for `key`.
    pub async fn acquire(&self, key: &str) {
        loop {
            let wait = {
                let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
                    tokens: self.per_second,
                    updated: now,
                });
                let refill = now.duration_since(bucket.updated).as_secs_f64() * self.per_second;
                bucket.tokens = (bucket.tokens + refill).min(self.per_second);
                bucket.updated = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_gets_at_most_its_rate_and_keys_are_independent() {
        let limiter = RateLimiter::new(25);
        let start = Instant::now();
        for _ in 0..25 {
            limiter.acquire("int-1").await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "a full bucket to start");
        for _ in 0..25 {
            limiter.acquire("int-1").await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(950) && elapsed <= Duration::from_millis(1050),
            "{elapsed:?}"
        );
        let other = Instant::now();
        limiter.acquire("int-2").await;
        assert_eq!(other.elapsed(), Duration::ZERO);
    }
}
