//! Where a tunnel may go: the CONNECT target parsed, matched against the allow-list of
//! `tunnel.allowed_destinations`, and its resolved addresses checked to be public.
//! Pure functions, so every rule is tested without sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed CONNECT target: a lower-case host name without a trailing dot, or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Target {
    /// `host:port`, `[v6]:port` or `a.b.c.d:port`; `None` for anything else (no port, port 0,
    /// characters no host name has).
    pub fn parse(text: &str) -> Option<Target> {
        let (host, port) = text.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        let host = if let Some(inner) = host.strip_prefix('[') {
            Host::Ip(IpAddr::V6(inner.strip_suffix(']')?.parse().ok()?))
        } else if let Ok(v4) = host.parse::<Ipv4Addr>() {
            Host::Ip(IpAddr::V4(v4))
        } else {
            let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !valid {
                return None;
            }
            Host::Name(name)
        };
        Some(Target { host, port })
    }

    /// The host as the resolver takes it.
    pub fn host_text(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            Host::Ip(IpAddr::V4(v4)) => write!(f, "{v4}:{}", self.port),
        }
    }
}

/// One entry of `allowed_destinations`: an exact host (name or IP literal) or `*.suffix`, always
/// with an explicit port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    host: PatternHost,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternHost {
    Exact(Host),
    /// Matches names ending in `.suffix` (stored with its leading dot), never the suffix itself.
    Suffix(String),
}

impl Pattern {
    /// Config validation already checked the shape; this still refuses what it cannot use.
    pub fn parse(text: &str) -> Option<Pattern> {
        let (host, port) = text.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        if let Some(suffix) = host.strip_prefix("*.") {
            let target = Target::parse(&format!("{suffix}:{port}"))?;
            let Host::Name(name) = target.host else {
                return None;
            };
            return Some(Pattern {
                host: PatternHost::Suffix(format!(".{name}")),
                port,
            });
        }
        let target = Target::parse(text)?;
        Some(Pattern {
            host: PatternHost::Exact(target.host),
            port,
        })
    }

    pub fn matches(&self, target: &Target) -> bool {
        if self.port != target.port {
            return false;
        }
        match (&self.host, &target.host) {
            (PatternHost::Exact(want), got) => want == got,
            (PatternHost::Suffix(suffix), Host::Name(name)) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
            // A wildcard is about names: an IP literal must be listed as such.
            (PatternHost::Suffix(_), Host::Ip(_)) => false,
        }
    }

    /// The exact host name of this pattern, if it is one (what `doctor` resolves).
    pub fn exact_name(&self) -> Option<(&str, u16)> {
        match &self.host {
            PatternHost::Exact(Host::Name(name)) => Some((name, self.port)),
            _ => None,
        }
    }
}

/// True when `target` matches any pattern.
pub fn allowed(patterns: &[Pattern], target: &Target) -> bool {
    patterns.iter().any(|p| p.matches(target))
}

/// Why an address is not a public destination, or `None` when it is one. IPv6 forms that embed
/// an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by the embedded address, so a
/// private IPv4 address cannot be smuggled in through them.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("shared address space (carrier-grade NAT)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast() || a >= 240 {
        Some("reserved")
    } else if ip.is_documentation() || (a == 198 && (b & 0xfe) == 18) {
        Some("documentation or benchmarking")
    } else {
        None
    }
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if seg[..6] == [0; 6] {
        // IPv4-compatible (deprecated): judge the embedded address.
        return non_public_v4(Ipv4Addr::from(ip.to_bits() as u32));
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0; 4] {
        return non_public_v4(Ipv4Addr::from(ip.to_bits() as u32));
    }
    if seg[0] == 0x2002 {
        let embedded = Ipv4Addr::new(
            (seg[1] >> 8) as u8,
            seg[1] as u8,
            (seg[2] >> 8) as u8,
            seg[2] as u8,
        );
        return non_public_v4(embedded);
    }
    if ip.is_multicast() {
        Some("multicast")
    } else if (seg[0] & 0xfe00) == 0xfc00 {
        Some("unique local (ULA)")
    } else if (seg[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if (seg[0] & 0xffc0) == 0xfec0 {
        Some("site-local")
    } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
        Some("documentation")
    } else if seg[0] == 0x0100 && seg[1..4] == [0; 3] {
        Some("discard-only")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    fn p(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|s| Pattern::parse(s).unwrap()).collect()
    }

    #[test]
    fn targets_parse_names_and_literals() {
        assert_eq!(
            t("WebexAPIs.com.:443"),
            Target {
                host: Host::Name("webexapis.com".into()),
                port: 443
            }
        );
        assert_eq!(t("[::1]:8443").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            t("192.0.2.1:1").host,
            Host::Ip("192.0.2.1".parse().unwrap())
        );
        assert_eq!(t("[2001:db8::1]:443").to_string(), "[2001:db8::1]:443");
        for bad in [
            "webexapis.com",
            "webexapis.com:0",
            "webexapis.com:65536",
            "webexapis.com:https",
            ":443",
            "a..b:443",
            "a b:443",
            "evil.com/x:443",
            "[::1:443",
            "::1:443",
            "user@host:443",
        ] {
            assert!(Target::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn exact_names_and_ports_must_match() {
        let list = p(&["webexapis.com:443"]);
        assert!(allowed(&list, &t("webexapis.com:443")));
        assert!(allowed(&list, &t("WEBEXAPIS.COM.:443")));
        assert!(!allowed(&list, &t("webexapis.com:8443")));
        assert!(!allowed(&list, &t("api.webexapis.com:443")));
        assert!(!allowed(&list, &t("webexapis.com.evil.net:443")));
        assert!(!allowed(&list, &t("xwebexapis.com:443")));
    }

    #[test]
    fn suffix_patterns_match_subdomains_only() {
        let list = p(&["*.wbx2.com:443"]);
        assert!(allowed(&list, &t("hydra-a.wbx2.com:443")));
        assert!(allowed(&list, &t("a.b.wbx2.com:443")));
        assert!(!allowed(&list, &t("wbx2.com:443")), "not the suffix itself");
        assert!(!allowed(&list, &t("evilwbx2.com:443")));
        assert!(!allowed(&list, &t("a.wbx2.com:80")));
        assert!(!allowed(&list, &t("a.wbx2.com.evil.net:443")));
    }

    #[test]
    fn ip_literals_follow_the_same_rules() {
        let list = p(&["192.0.2.7:443", "[2001:db8::5]:443", "*.example.net:443"]);
        assert!(allowed(&list, &t("192.0.2.7:443")));
        assert!(!allowed(&list, &t("192.0.2.7:444")));
        assert!(!allowed(&list, &t("192.0.2.8:443")));
        assert!(
            allowed(&list, &t("[2001:0db8:0:0::5]:443")),
            "canonical form"
        );
        assert!(!allowed(&list, &t("[::ffff:192.0.2.7]:443")));
        // A wildcard never admits an IP literal.
        let wild = p(&["*.example.net:443"]);
        assert!(!allowed(&wild, &t("192.0.2.7:443")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["*.:443", "*.*.x:443", "x:0", "x", "*.1.2.3.4:443"] {
            assert!(Pattern::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            Pattern::parse("WebexAPIs.com:443").unwrap().exact_name(),
            Some(("webexapis.com", 443))
        );
        assert_eq!(Pattern::parse("*.a.com:443").unwrap().exact_name(), None);
    }

    #[test]
    fn non_public_addresses_are_named() {
        let np = |s: &str| non_public(s.parse().unwrap());
        for (addr, why) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared address space (carrier-grade NAT)"),
            ("255.255.255.255", "reserved"),
            ("240.0.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "unique local (ULA)"),
            ("fc00::1", "unique local (ULA)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:c0a8:0101::1", "private"),
            ("2001:db8::1", "documentation"),
        ] {
            assert_eq!(np(addr), Some(why), "{addr}");
        }
        for public in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(np(public), None, "{public}");
        }
    }
}
