//! The CONNECT request head: read it within a size and time bound (so a slow or endless client
//! cannot hold anything), parse it, and write the proxy's one-line answers.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request head accepted; a CONNECT needs a few hundred bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A request head and whatever the client sent after it (e.g. a pipelined TLS ClientHello),
/// which belongs to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why no usable request head arrived.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("the request head exceeds {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("the request head did not arrive within {} s", HEAD_TIMEOUT.as_secs())]
    Timeout,
    #[error("the client closed the connection before a complete request head")]
    Closed,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("reading the request head failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one request head from `io`, bounded by [`MAX_HEAD_BYTES`] and `timeout`.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> Result<Head, HeadError> {
    let read = async {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        loop {
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Err(HeadError::Closed);
            }
            // Search only where the terminator can newly appear.
            let from = buf.len().saturating_sub(3);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_end(&buf[from..]) {
                let end = from + end;
                if end > MAX_HEAD_BYTES {
                    return Err(HeadError::TooLarge);
                }
                let rest = buf.split_off(end);
                return parse_head(&buf, rest);
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HeadError::TooLarge);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| HeadError::Timeout)?
}

/// The index just past the first `\r\n\r\n`.
fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parse `head` (ending in the blank line).
pub fn parse_head(head: &[u8], rest: Vec<u8>) -> Result<Head, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "the request line is not METHOD TARGET VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HeadError::Malformed("the method is not an HTTP token"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Malformed(
            "the version is not HTTP/1.1 or HTTP/1.0",
        ));
    }
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or(HeadError::Malformed("a header line has no colon"))?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HeadError::Malformed("a header name is empty or has spaces"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        rest,
    })
}

/// A refusal's HTTP answer: status line, the extra header if any, and the one-line reason.
pub fn refusal_response(status: u16, extra_header: Option<&str>, reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        status_text(status),
        body.len()
    );
    if let Some(h) = extra_header {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Write a refusal and close our side; errors are ignored because the client may be gone.
pub async fn send_refusal<S: AsyncWrite + Unpin>(
    io: &mut S,
    status: u16,
    extra_header: Option<&str>,
    reason: &str,
) {
    let bytes = refusal_response(status, extra_header, reason);
    let write = async {
        io.write_all(&bytes).await?;
        io.shutdown().await
    };
    // A client that does not read its refusal must not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> Result<Head, HeadError> {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        drop(client);
        read_head(&mut server, Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn a_connect_head_and_the_bytes_after_it() {
        let head = head_of(
            b"CONNECT webexapis.com:443 HTTP/1.1\r\nHost: webexapis.com:443\r\nProxy-Authorization:  Basic eDp5 \r\n\r\n\x16\x03\x01hello",
        )
        .await
        .unwrap();
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.target, "webexapis.com:443");
        assert_eq!(head.header("proxy-authorization"), Some("Basic eDp5"));
        assert_eq!(head.header("host"), Some("webexapis.com:443"));
        assert_eq!(head.rest, b"\x16\x03\x01hello");
    }

    #[tokio::test]
    async fn a_head_split_across_reads_is_assembled() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let reader =
            tokio::spawn(async move { read_head(&mut server, Duration::from_secs(5)).await });
        for piece in [&b"CONNECT a:1 HTTP/1.1\r"[..], b"\n", b"\r", b"\nXY"] {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let head = reader.await.unwrap().unwrap();
        assert_eq!(head.target, "a:1");
        assert_eq!(head.rest, b"XY");
    }

    #[tokio::test]
    async fn oversized_truncated_and_malformed_heads_are_refused() {
        let mut big = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        while big.len() <= MAX_HEAD_BYTES {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(head_of(&big).await, Err(HeadError::TooLarge)));
        big.extend_from_slice(b"\r\n");
        assert!(matches!(head_of(&big).await, Err(HeadError::TooLarge)));
        assert!(matches!(
            head_of(b"CONNECT a:1 HTTP/1.1\r\n").await,
            Err(HeadError::Closed)
        ));
        for bad in [
            &b"CONNECT a:1\r\n\r\n"[..],
            b"CONNECT  a:1 HTTP/1.1\r\n\r\n",
            b"connect a:1 HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 HTTP/2\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nNoColon\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nX: \xff\r\n\r\n",
        ] {
            assert!(
                matches!(head_of(bad).await, Err(HeadError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"CONNECT a:1 HTTP/1.1\r\n").await.unwrap();
        let result = read_head(&mut server, Duration::from_secs(10)).await;
        assert!(matches!(result, Err(HeadError::Timeout)));
        drop(client);
    }

    #[test]
    fn refusals_carry_status_header_and_one_line_reason() {
        let text = String::from_utf8(refusal_response(
            407,
            Some("Proxy-Authenticate: Basic realm=\"flowthrough\""),
            "proxy credentials missing",
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 407 Proxy Authentication Required\r\n"));
        assert!(text.contains("\r\nProxy-Authenticate: Basic realm=\"flowthrough\"\r\n"));
        assert!(text.contains("\r\nContent-Length: 26\r\n"));
        assert!(text.ends_with("\r\n\r\nproxy credentials missing\n"));
    }
}
