//! Per-address rate limit on session creation, so one client cannot fill `max_sessions` and
//! lock everyone else out.
//!
//! Each client address has a token bucket; loopback peers are exempt unless configured
//! otherwise (the bench and local tools create thousands of sessions from 127.0.0.1). The
//! table is bounded: past `MAX_TRACKED` addresses, the ones whose bucket is full again (they
//! could create a burst anyway) are forgotten, and if that is not enough the table starts
//! over, which errs towards admitting clients rather than growing without bound.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use crate::hub::TokenBucket;

/// Addresses tracked at most.
const MAX_TRACKED: usize = 100_000;

/// Session creations allowed per client address.
#[derive(Debug)]
pub struct AddressLimiter {
    rate: Option<(f64, f64)>,
    limit_loopback: bool,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl AddressLimiter {
    /// `rate` is `(per second, burst)`, `None` for no limit; loopback peers are limited only
    /// with `limit_loopback`.
    pub fn new(rate: Option<(f64, f64)>, limit_loopback: bool) -> Self {
        AddressLimiter {
            rate,
            limit_loopback,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `address`; `Err` with the wait until the next one.
    pub fn admit(&self, address: IpAddr) -> Result<(), Duration> {
        let Some((per_sec, burst)) = self.rate else {
            return Ok(());
        };
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d.
        let address = address.to_canonical();
        if address.is_loopback() && !self.limit_loopback {
            return Ok(());
        }
        // One IPv6 client usually holds a whole /64: count the prefix, not the address.
        let address = match address {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
            v4 => v4,
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&address) {
            buckets.retain(|_, bucket| !bucket.is_full());
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(address)
            .or_insert_with(|| TokenBucket::new(per_sec, burst));
        if bucket.try_take() {
            Ok(())
        } else {
            Err(bucket.retry_after())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_address_gets_its_burst_then_the_rate_and_loopback_is_exempt() {
        let limiter = AddressLimiter::new(Some((2.0, 3.0)), false);
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.admit(client).is_ok());
        }
        assert_eq!(limiter.admit(client), Err(Duration::from_millis(500)));
        assert!(limiter.admit(other).is_ok(), "addresses are counted apart");
        for _ in 0..100 {
            assert!(limiter.admit("127.0.0.1".parse().unwrap()).is_ok());
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(limiter.admit(client).is_ok());
        let strict = AddressLimiter::new(Some((1.0, 1.0)), true);
        let local: IpAddr = "::1".parse().unwrap();
        assert!(strict.admit(local).is_ok());
        assert!(strict.admit(local).is_err());
        let v6_a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6_b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert!(strict.admit(v6_a).is_ok());
        assert!(strict.admit(v6_b).is_err(), "one /64, one bucket");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(
                limiter.admit(mapped).is_ok(),
                "IPv4 loopback on a dual-stack socket"
            );
        }
    }
}
