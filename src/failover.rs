//! Address failover toward an upstream host: resolve it to all its addresses, use the first one
//! not blocked, block an address that fails, and let it back after a while (SPEC §4 "Failover").
//! Plain data with plain methods, so the Webex client and the tunnel's TCP connects share it; the
//! caller passes the current instant, which keeps the algorithm testable with a fake clock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

/// How a host name becomes addresses. `Static` maps chosen names (tests, pinned deployments) and
/// falls back to the system resolver for any other name; a name mapped to no address fails.
#[derive(Debug, Clone, Default)]
pub enum Resolver {
    #[default]
    System,
    Static(HashMap<String, Vec<IpAddr>>),
}

impl Resolver {
    /// All addresses of `host` with `port`, in resolution order, without duplicates.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Resolver::Static(map) = self
            && let Some(ips) = map.get(host)
        {
            // A name mapped to no address stands for one that does not resolve (tests).
            if ips.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host} resolved to no address"),
                ));
            }
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let mut out: Vec<SocketAddr> = Vec::new();
        for addr in tokio::net::lookup_host((host, port)).await? {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        if out.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} resolved to no address"),
            ));
        }
        Ok(out)
    }
}

/// The failover state of one host: its addresses in order and the ones blocked until an instant.
#[derive(Debug, Clone)]
pub struct Failover {
    addrs: Vec<SocketAddr>,
    blocked_until: HashMap<SocketAddr, Instant>,
    block_for: Duration,
}

impl Failover {
    pub fn new(addrs: Vec<SocketAddr>, block_for: Duration) -> Self {
        Failover {
            addrs,
            blocked_until: HashMap::new(),
            block_for,
        }
    }

    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The address to use now: the first one not blocked; when all are blocked, one at random
    /// (it is unblocked by [`Failover::succeeded`] if it answers). `None` only without addresses.
    pub fn pick(&mut self, now: Instant) -> Option<SocketAddr> {
        self.blocked_until.retain(|_, until| *until > now);
        if let Some(addr) = self
            .addrs
            .iter()
            .find(|a| !self.blocked_until.contains_key(a))
        {
            return Some(*addr);
        }
        if self.addrs.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..self.addrs.len());
        Some(self.addrs[i])
    }

    /// `addr` failed (network or TLS error, 5xx, no answer in time): keep it out for a while.
    pub fn block(&mut self, addr: SocketAddr, now: Instant) {
        self.blocked_until.insert(addr, now + self.block_for);
    }

    /// `addr` answered: it is usable again at once.
    pub fn succeeded(&mut self, addr: SocketAddr) {
        self.blocked_until.remove(&addr);
    }

    /// The addresses blocked at `now`, in list order (for status and metrics).
    pub fn blocked(&self, now: Instant) -> Vec<SocketAddr> {
        self.addrs
            .iter()
            .filter(|a| self.blocked_until.get(a).is_some_and(|until| *until > now))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        (2..=4)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 443)))
            .collect()
    }

    #[test]
    fn uses_the_first_address_not_blocked() {
        let t0 = Instant::now();
        let a = addrs();
        let mut f = Failover::new(a.clone(), Duration::from_secs(60));
        assert_eq!(f.pick(t0), Some(a[0]));
        f.block(a[0], t0);
        assert_eq!(f.pick(t0), Some(a[1]));
        f.block(a[1], t0);
        assert_eq!(f.pick(t0), Some(a[2]));
        assert_eq!(f.blocked(t0), vec![a[0], a[1]]);
    }

    #[test]
    fn a_blocked_address_returns_after_the_block_period() {
        let t0 = Instant::now();
        let a = addrs();
        let mut f = Failover::new(a.clone(), Duration::from_secs(60));
        f.block(a[0], t0);
        assert_eq!(f.pick(t0 + Duration::from_secs(59)), Some(a[1]));
        assert_eq!(f.pick(t0 + Duration::from_secs(60)), Some(a[0]));
        assert!(f.blocked(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn all_blocked_picks_at_random_and_success_unblocks() {
        let t0 = Instant::now();
        let a = addrs();
        let mut f = Failover::new(a.clone(), Duration::from_secs(60));
        for addr in &a {
            f.block(*addr, t0);
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let p = f.pick(t0).unwrap();
            assert!(a.contains(&p));
            seen.insert(p);
        }
        assert!(seen.len() > 1, "the pick among blocked addresses is random");
        assert_eq!(
            f.blocked(t0).len(),
            3,
            "a random pick does not unblock by itself"
        );
        f.succeeded(a[2]);
        assert_eq!(f.pick(t0), Some(a[2]));
        assert_eq!(f.blocked(t0), vec![a[0], a[1]]);
    }

    #[test]
    fn no_addresses_no_pick() {
        let mut f = Failover::new(Vec::new(), Duration::from_secs(1));
        assert_eq!(f.pick(Instant::now()), None);
    }

    #[tokio::test]
    async fn static_resolver_maps_names_and_passes_ip_literals() {
        let mut map = HashMap::new();
        map.insert(
            "api.test".to_owned(),
            vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
        );
        map.insert("gone.test".to_owned(), Vec::new());
        let r = Resolver::Static(map);
        let err = r.resolve("gone.test", 443).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            r.resolve("api.test", 8443).await.unwrap(),
            vec![
                SocketAddr::from(([127, 0, 0, 2], 8443)),
                SocketAddr::from(([127, 0, 0, 3], 8443))
            ]
        );
        assert_eq!(
            r.resolve("127.0.0.9", 1).await.unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 9], 1))]
        );
    }
}
