//! Request pacing per key (an integration): at most N requests in any second, and optionally
//! at most M in a longer window.
//!
//! Each rate is a token bucket that holds as many requests as the rate allows in its period
//! and refills evenly over it: a full bucket lets a burst through, an empty one spaces requests
//! out. Dataverse's service protection (6,000 requests in 5 minutes per user) is a 6,000-token
//! bucket refilling 20 a second; its 60 a second on top is a second bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Token buckets per key. `acquire` waits until the key may send another request.
pub struct RateLimiter {
    /// Per rate: the bucket's size and its refill per second.
    rates: Vec<(f64, f64)>,
    buckets: Mutex<HashMap<String, Vec<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// At most `per_second` requests per second per key.
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rates: vec![(rate, rate)],
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Also at most `requests` per `period` per key.
    pub fn with_window(mut self, requests: u32, period: Duration) -> Self {
        let size = f64::from(requests.max(1));
        self.rates
            .push((size, size / period.as_secs_f64().max(f64::EPSILON)));
        self
    }

    /// Waits for a request slot for `key`.
    pub async fn acquire(&self, key: &str) {
        loop {
            let wait = {
                let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let buckets = all.entry(key.to_string()).or_insert_with(|| {
                    self.rates
                        .iter()
                        .map(|&(size, _)| Bucket {
                            tokens: size,
                            updated: now,
                        })
                        .collect()
                });
                let mut wait = Duration::ZERO;
                for (bucket, &(size, refill)) in buckets.iter_mut().zip(&self.rates) {
                    let added = now.duration_since(bucket.updated).as_secs_f64() * refill;
                    bucket.tokens = (bucket.tokens + added).min(size);
                    bucket.updated = now;
                    if bucket.tokens < 1.0 {
                        wait = wait.max(Duration::from_secs_f64((1.0 - bucket.tokens) / refill));
                    }
                }
                if wait.is_zero() {
                    for bucket in buckets.iter_mut() {
                        bucket.tokens -= 1.0;
                    }
                    return;
                }
                wait
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

    #[tokio::test(start_paused = true)]
    async fn a_window_limit_holds_a_key_back_once_its_share_is_spent() {
        // 60 a second, but only 120 in 10 seconds: the first 60 go at once and the next 60 take
        // a second, during which the window earned 12 more. From then on the window's 12 a
        // second rules: 24 more take a second with that head start, not the 0.4 s that 60 a
        // second alone would allow.
        let limiter = RateLimiter::new(60).with_window(120, Duration::from_secs(10));
        let start = Instant::now();
        for _ in 0..120 {
            limiter.acquire("int-1").await;
        }
        let burst = start.elapsed();
        assert!(burst <= Duration::from_millis(1050), "{burst:?}");
        for _ in 0..24 {
            limiter.acquire("int-1").await;
        }
        let slowed = start.elapsed() - burst;
        assert!(
            slowed >= Duration::from_millis(950) && slowed <= Duration::from_millis(1100),
            "{slowed:?}"
        );
    }
}
