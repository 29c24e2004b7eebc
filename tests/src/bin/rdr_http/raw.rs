//! `rdr-http raw`: bytes on a plain TCP connection, for what a well-behaved client never sends
//! (malformed request lines, oversized headers, one byte at a time).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{connect, print_json};

/// How much of the answer is printed.
const KEEP: usize = 512;

/// `\r`, `\n`, `\t`, `\0`, `\\` and `\xHH` in a command-line argument become the bytes they name.
pub fn unescape(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = b
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => out.push(v),
                    None => bail!("bad \\x escape at byte {i} of {s:?}"),
                }
                i += 2;
            }
            _ => bail!("unknown escape at byte {i} of {s:?} (use \\r \\n \\t \\0 \\\\ \\xHH)"),
        }
        i += 2;
    }
    Ok(out)
}

/// A request whose one header carries `n` bytes of value.
pub fn big_header_request(n: usize) -> Vec<u8> {
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.resize(req.len() + n, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    req
}

#[derive(Default)]
struct Seen {
    kept: Vec<u8>,
    total: u64,
}

/// Why the reader stopped: the peer ended the connection (EOF or an error such as a reset).
enum Closed {
    Eof,
    Error(String),
}

/// `HTTP/1.x NNN` at the start of `resp`.
fn status_of(resp: &[u8]) -> Option<u16> {
    let rest = resp.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

pub async fn raw(
    addr: SocketAddr,
    limit: Duration,
    data: &[u8],
    drip: Option<Duration>,
    read_window: Duration,
) -> Result<()> {
    let stream = connect(addr, limit).await?;
    let (mut rd, mut wr) = stream.into_split();

    // The reader runs from the start: a server may answer (and close) while we still write,
    // and what it said must not be lost to the reset that a close with unread data causes.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut reader = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => return Closed::Eof,
                    Ok(n) => {
                        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                        let room = KEEP.saturating_sub(s.kept.len());
                        s.kept.extend_from_slice(&buf[..n.min(room)]);
                        s.total += n as u64;
                    }
                    Err(e) => return Closed::Error(e.to_string()),
                }
            }
        }
    });

    let mut write_error = None;
    match drip {
        Some(pause) => {
            for (i, b) in data.iter().enumerate() {
                if let Err(e) = write_bounded(&mut wr, std::slice::from_ref(b), limit).await {
                    write_error = Some(format!("byte {i}: {e}"));
                    break;
                }
                if i + 1 < data.len() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
        None => {
            if let Err(e) = write_bounded(&mut wr, data, limit).await {
                write_error = Some(e);
            }
        }
    }

    // The read window starts once everything is written (or writing failed).
    let (closed, close_error) = match tokio::time::timeout(read_window, &mut reader).await {
        Ok(Ok(Closed::Eof)) => (true, None),
        Ok(Ok(Closed::Error(e))) => (true, Some(e)),
        Ok(Err(e)) => bail!("reader task: {e}"),
        Err(_) => {
            reader.abort();
            (false, None)
        }
    };
    let s = seen.lock().unwrap_or_else(|e| e.into_inner());
    print_json(&json!({
        "response": String::from_utf8_lossy(&s.kept),
        "status": status_of(&s.kept),
        "closed": closed,
        "close_error": close_error,
        "write_error": write_error,
        "received_bytes": s.total,
    }))
}

async fn write_bounded(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    data: &[u8],
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, async {
        wr.write_all(data).await?;
        wr.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {} ms", limit.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(unescape(r"a\r\n\\b\x41\t").unwrap(), b"a\r\n\\bA\t");
        assert!(unescape(r"\q").is_err());
        assert!(unescape(r"\x4").is_err());
        assert!(unescape("\\").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
        assert_eq!(status_of(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_of(b"HTTP/2 200"), None);
        assert_eq!(status_of(b"garbage"), None);
    }
}
