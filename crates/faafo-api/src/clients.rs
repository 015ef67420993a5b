//! Who is asking, and how much they may ask: the client a create is counted against
//! (an API key, or the address it comes from), its create rate (a token bucket) and its
//! quota of unfinished work (checked by the store, atomically with the insert).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// How clients are told apart and limited.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    /// SHA-256 digests of the accepted API keys; empty: any key names a client.
    pub api_keys: Vec<[u8; 32]>,
    /// Proxies (gateways, load balancers) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Creates per second per client, with a burst of as many.
    pub create_rate: Option<f64>,
    /// Largest sum of width × height × iterations of one client's unfinished fractals.
    pub max_queued_work: Option<f64>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            api_keys: Vec::new(),
            trusted_proxies: vec![
                "127.0.0.0/8".parse().expect("a network"),
                "::1/128".parse().expect("a network"),
            ],
            create_rate: None,
            max_queued_work: None,
        }
    }
}

impl ClientPolicy {
    /// What `api_keys` holds of a key.
    pub fn digest(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }

    /// The client a request is counted against: `key:DIGEST` for a bearer key (the
    /// digest's first 16 hex digits; the key itself is never stored), else `ip:ADDRESS`.
    pub fn identify(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<String, ApiError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let key = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|key| !key.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request("the Authorization header must be `Bearer API_KEY`")
                })?;
            let digest = Self::digest(key);
            if !self.api_keys.is_empty() && !self.api_keys.iter().any(|k| same(k, &digest)) {
                return Err(ApiError::UnknownApiKey);
            }
            return Ok(format!("key:{}", &hex::encode(digest)[..16]));
        }
        Ok(format!("ip:{}", self.address(headers, peer.ip())))
    }

    /// The client's address: the peer's, or, from a trusted proxy, the last address in
    /// `X-Forwarded-For` that is not itself a trusted proxy (the ones before it could be
    /// made up by the client).
    fn address(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|entry| entry.trim().parse().ok())
            .collect();
        forwarded
            .iter()
            .rev()
            .find(|address| !self.trusts(**address))
            .or(forwarded.first())
            .copied()
            .unwrap_or(peer)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(address))
    }
}

/// Compares two digests in constant time.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An address block, `10.0.0.0/8` or an address alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(a)) => self.contains(IpAddr::V6(a.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|a| self.contains(IpAddr::V4(a))),
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let invalid = || format!("{text:?} is not an address or an address block (10.0.0.0/8)");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let longest = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.trim().parse().map_err(|_| invalid())?,
            None => longest,
        };
        if prefix > longest {
            return Err(invalid());
        }
        Ok(IpNet { network, prefix })
    }
}

/// Token buckets, one per client: `rate` creates a second, bursts of as many.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets kept before full ones (which hold nothing a new one would not) are dropped.
const KEPT_BUCKETS: usize = 10_000;

impl RateLimiter {
    pub fn new(rate: f64) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Creates per second (and the burst).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes a token for `client`, or says how long until there is one.
    pub fn take(&self, client: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= KEPT_BUCKETS && !buckets.contains_key(client) {
            buckets.retain(|_, bucket| self.refilled(*bucket, now) < self.rate);
        }
        let bucket = buckets.entry(client.to_owned()).or_insert(Bucket {
            tokens: self.rate,
            updated: now,
        });
        let tokens = self.refilled(*bucket, now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                updated: now,
            };
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn peer(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 40000)
    }

    #[test]
    fn a_key_names_the_client_by_its_digest_and_a_key_list_refuses_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        let open = ClientPolicy::default();
        let id = open.identify(&headers, peer("10.0.0.9")).unwrap();
        assert!(id.starts_with("key:") && !id.contains("s3cret"), "{id}");
        assert_eq!(id.len(), 4 + 16);

        let listed = ClientPolicy {
            api_keys: vec![Sha256::digest(b"other").into()],
            ..ClientPolicy::default()
        };
        assert!(matches!(
            listed.identify(&headers, peer("10.0.0.9")),
            Err(ApiError::UnknownApiKey)
        ));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(
            open.identify(&headers, peer("10.0.0.9")),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let policy = ClientPolicy {
            trusted_proxies: vec!["10.0.0.0/24".parse().unwrap()],
            ..ClientPolicy::default()
        };
        let mut headers = HeaderMap::new();
        // The client made up the first entry; the gateway appended the real one.
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.0.0.3"),
        );
        assert_eq!(
            policy.identify(&headers, peer("10.0.0.2")).unwrap(),
            "ip:203.0.113.7"
        );
        assert_eq!(
            policy.identify(&headers, peer("198.51.100.1")).unwrap(),
            "ip:198.51.100.1"
        );
        assert_eq!(
            policy
                .identify(&HeaderMap::new(), peer("10.0.0.2"))
                .unwrap(),
            "ip:10.0.0.2"
        );
    }

    #[test]
    fn address_blocks() {
        let net: IpNet = "192.168.4.0/22".parse().unwrap();
        assert!(net.contains("192.168.7.255".parse().unwrap()));
        assert!(!net.contains("192.168.8.0".parse().unwrap()));
        assert!(net.contains("::ffff:192.168.5.1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let one: IpNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nowhere".parse::<IpNet>().is_err());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(5.0);
        for _ in 0..5 {
            limiter.take("a").unwrap();
        }
        let wait = limiter.take("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // Another client has a bucket of its own.
        limiter.take("b").unwrap();
    }
}
