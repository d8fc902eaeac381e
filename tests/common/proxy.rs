//! A TCP relay between flowthrough and PostgreSQL that a test controls: it passes everything,
//! cuts every connection (new ones refused: nothing listens), or swallows PostgreSQL's answers
//! (what flowthrough sends still arrives and is executed, a commit included, but flowthrough
//! never hears of it, and the connection is closed a moment later: a connection lost during a
//! commit). Every mode applies to the connections already open too, since a pool keeps its
//! connections from before the switch.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the relay does with the connections, open and new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes pass both ways.
    Up,
    /// Every connection dropped, connects refused.
    Cut,
    /// Bytes to PostgreSQL pass, its answers are dropped; a connection that lost an answer is
    /// closed [`SWALLOWED_CLOSE`] later. Connects are accepted (and their handshake swallowed).
    SwallowAnswers,
}

/// How long a connection that lost an answer stays open: long enough for PostgreSQL to finish
/// (and commit) what it was sent, short enough that the client does not wait long for an error.
pub const SWALLOWED_CLOSE: Duration = Duration::from_millis(300);

pub struct DbProxy {
    /// The port flowthrough connects to instead of PostgreSQL's.
    pub port: u16,
    /// PostgreSQL's port.
    target: u16,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl DbProxy {
    /// A relay to PostgreSQL on loopback port `target`, up.
    pub async fn start(target: u16) -> DbProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (link, mut state) = watch::channel(Link::Up);
        let task = tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                match listener.take() {
                    Some(l) => {
                        tokio::select! {
                            accepted = l.accept() => {
                                listener = Some(l);
                                let Ok((client, _)) = accepted else { continue };
                                tokio::spawn(relay(client, target, state.clone()));
                            }
                            changed = state.changed() => {
                                if changed.is_err() { return; }
                                // Cut: the listener closes with `l`, so connects are refused.
                                if *state.borrow() != Link::Cut { listener = Some(l); }
                            }
                        }
                    }
                    None => {
                        if state.changed().await.is_err() {
                            return;
                        }
                        if *state.borrow() != Link::Cut {
                            listener = Some(
                                TcpListener::bind(("127.0.0.1", port))
                                    .await
                                    .expect("the proxy's port is free again"),
                            );
                        }
                    }
                }
            }
        });
        DbProxy {
            port,
            target,
            link,
            task,
        }
    }

    pub fn set(&self, link: Link) {
        self.link
            .send(link)
            .expect("the proxy's task runs (it holds a receiver until the proxy is dropped)");
    }

    /// `config`, a flowthrough config whose `[store.postgres]` names PostgreSQL's port, pointed
    /// at the proxy instead.
    pub fn route(&self, config: &str) -> String {
        let (pg, proxy) = (
            format!("\nport = {}\n", self.target),
            format!("\nport = {}\n", self.port),
        );
        assert!(
            config.matches(&pg).count() == 1,
            "the config names PostgreSQL's port once: {config}"
        );
        config.replace(&pg, &proxy)
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        // The sender goes with the proxy, which ends every relay too.
        self.task.abort();
    }
}

/// Relay one connection until either side closes, the proxy is cut or dropped, or it closes a
/// connection that lost an answer.
async fn relay(client: TcpStream, target: u16, mut link: watch::Receiver<Link>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    // Set once the connection has lost an answer (or sent something whose answer it will lose):
    // from then on the client's view of the protocol is broken for good, so the connection keeps
    // swallowing until it is closed, even if the link comes back up meanwhile.
    let mut closing: Option<Instant> = None;
    loop {
        let now = *link.borrow_and_update();
        if now == Link::Cut {
            return;
        }
        let swallow = now == Link::SwallowAnswers || closing.is_some();
        let close_at = closing.unwrap_or_else(Instant::now);
        tokio::select! {
            changed = link.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(close_at), if closing.is_some() => return,
            read = from_client.read(&mut up) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if to_server.write_all(&up[..n]).await.is_err() {
                    return;
                }
                if swallow {
                    closing.get_or_insert_with(|| Instant::now() + SWALLOWED_CLOSE);
                }
            }
            read = from_server.read(&mut down) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if swallow {
                    closing.get_or_insert_with(|| Instant::now() + SWALLOWED_CLOSE);
                } else if to_client.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
