//! The tunnel's part of `doctor`: can it listen, where may it go, do those names resolve to
//! public addresses, and is it protected. Each line says what to do when it is not fine.

use std::net::SocketAddr;

use crate::config::TunnelConfig;
use crate::failover::Resolver;

use super::destination::{Pattern, non_public};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One doctor line: what was checked and the finding (with its fix when not `Ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub level: Level,
    pub check: String,
    pub detail: String,
}

fn line(level: Level, check: impl Into<String>, detail: impl Into<String>) -> CheckLine {
    CheckLine {
        level,
        check: check.into(),
        detail: detail.into(),
    }
}

/// Check `[tunnel]`. Binding is tried and released at once, so run it while `serve` is stopped
/// (a running `serve` holds the port and the line says so).
pub async fn check(cfg: &TunnelConfig, resolver: Option<&Resolver>) -> Vec<CheckLine> {
    let mut out = Vec::new();
    for addr in &cfg.listen {
        out.push(bindable(*addr));
    }
    if cfg.tls {
        out.push(line(
            Level::Ok,
            "tunnel protection",
            "mTLS with the [server] certificate and the [client_policy]",
        ));
    } else {
        out.push(line(
            Level::Warn,
            "tunnel protection",
            format!(
                "tunnel.tls = false: clients are identified only by address ({}); set tls = true unless the AS cannot speak TLS to its proxy",
                cfg.allowed_networks
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if cfg.allowed_destinations.is_empty() {
        out.push(line(
            Level::Fail,
            "tunnel destinations",
            "tunnel.allowed_destinations is empty: no tunnel can open; list the Webex hosts, e.g. \"*.wbx2.com:443\"",
        ));
        return out;
    }
    out.push(line(
        Level::Ok,
        "tunnel destinations",
        cfg.allowed_destinations.join(", "),
    ));
    for text in &cfg.allowed_destinations {
        let Some(pattern) = Pattern::parse(text) else {
            out.push(line(
                Level::Fail,
                format!("destination {text}"),
                "not host:port or *.suffix:port; fix the entry",
            ));
            continue;
        };
        match (pattern.exact_name(), resolver) {
            (Some((name, port)), Some(resolver)) => {
                out.push(resolves(resolver, name, port, cfg.allow_private_destinations).await)
            }
            (Some((name, port)), None) => out.push(line(
                Level::Warn,
                format!("destination {name}:{port}"),
                "not resolved (--offline); run doctor without --offline to check DNS",
            )),
            (None, _) => {}
        }
    }
    out
}

fn bindable(addr: SocketAddr) -> CheckLine {
    let what = format!("tunnel listener {addr}");
    match std::net::TcpListener::bind(addr) {
        Ok(_) => line(Level::Ok, what, "can be bound"),
        Err(e) => line(
            Level::Fail,
            what,
            format!(
                "cannot bind: {e}; stop the process using the port (a running serve holds it) or grant the privilege to bind it"
            ),
        ),
    }
}

async fn resolves(resolver: &Resolver, name: &str, port: u16, allow_private: bool) -> CheckLine {
    let what = format!("destination {name}:{port}");
    match resolver.resolve(name, port).await {
        Err(e) => line(
            Level::Fail,
            what,
            format!("does not resolve: {e}; check the DMZ's DNS resolver and the name"),
        ),
        Ok(addrs) => {
            let list = addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let private = addrs
                .iter()
                .find_map(|a| non_public(a.ip()).map(|why| (a.ip(), why)));
            match private {
                Some((ip, why)) if !allow_private => line(
                    Level::Fail,
                    what,
                    format!(
                        "resolves to {list}; {ip} is {why}, so tunnels to it are refused; fix DNS, or set allow_private_destinations = true if the destination really is internal"
                    ),
                ),
                _ => line(Level::Ok, what, format!("resolves to {list}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(text: &str) -> TunnelConfig {
        let full = format!("[tunnel]\n{text}\n");
        let cfg = crate::config::Config::parse(&full, std::path::Path::new("t.toml")).unwrap();
        cfg.tunnel.unwrap()
    }

    fn resolver() -> Resolver {
        let mut map = HashMap::new();
        map.insert(
            "public.test".to_owned(),
            vec!["192.0.43.10".parse().unwrap()],
        );
        map.insert("inside.test".to_owned(), vec!["127.0.0.5".parse().unwrap()]);
        map.insert("gone.test".to_owned(), Vec::new());
        Resolver::Static(map)
    }

    /// `doctor --offline` resolves nothing: a name that would not resolve is only noted.
    #[tokio::test]
    async fn offline_no_name_is_resolved() {
        let cfg = config("listen = []\nallowed_destinations = [\"gone.test:443\"]");
        let lines = check(&cfg, None).await;
        let line = lines
            .iter()
            .find(|l| l.check == "destination gone.test:443")
            .unwrap();
        assert_eq!(line.level, Level::Warn, "{line:?}");
        assert!(line.detail.contains("--offline"), "{line:?}");
        let online = check(&cfg, Some(&resolver())).await;
        assert!(
            online
                .iter()
                .any(|l| l.check == "destination gone.test:443" && l.level == Level::Fail),
            "the same name resolved fails: {online:?}"
        );
    }

    #[tokio::test]
    async fn lines_for_listener_protection_and_each_exact_name() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = config(&format!(
            "listen = [\"127.0.0.1:0\", \"{}\"]\ntls = false\nallowed_networks = [\"127.0.0.0/8\"]\nallowed_destinations = [\"public.test:443\", \"inside.test:443\", \"*.wild.test:443\"]",
            taken.local_addr().unwrap()
        ));
        let lines = check(&cfg, Some(&resolver())).await;
        let levels: Vec<(Level, &str)> =
            lines.iter().map(|l| (l.level, l.check.as_str())).collect();
        assert_eq!(levels[0], (Level::Ok, "tunnel listener 127.0.0.1:0"));
        assert_eq!(levels[1].0, Level::Fail, "{:?}", lines[1]);
        assert!(lines[1].detail.contains("running serve"));
        assert_eq!(levels[2], (Level::Warn, "tunnel protection"));
        assert!(lines[2].detail.contains("127.0.0.0/8"));
        assert_eq!(levels[3], (Level::Ok, "tunnel destinations"));
        assert_eq!(levels[4], (Level::Ok, "destination public.test:443"));
        assert_eq!(levels[5], (Level::Fail, "destination inside.test:443"));
        assert!(lines[5].detail.contains("127.0.0.5 is loopback"));
        assert_eq!(lines.len(), 6, "wildcards are not resolved: {lines:?}");
    }

    #[tokio::test]
    async fn private_allowed_and_unresolvable_names() {
        let cfg = config(
            "listen = []\nallow_private_destinations = true\nallowed_destinations = [\"inside.test:443\", \"nothing.invalid:443\"]",
        );
        let lines = check(&cfg, Some(&resolver())).await;
        assert_eq!(lines[0].level, Level::Ok, "tls = true by default");
        assert_eq!(lines[2].level, Level::Ok, "{:?}", lines[2]);
        assert_eq!(lines[3].level, Level::Fail);
        assert!(lines[3].detail.contains("does not resolve"));
    }
}
