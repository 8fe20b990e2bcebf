//! TCP connect to the first answering address of several (Happy Eyeballs, RFC 8305 §5).
//!
//! Discovery and DNS can hand a connector several addresses of one peer (IPv6 link-local,
//! IPv4, a stale address from an old announcement). Trying them one after another lets one
//! unreachable address stall the connection for its whole timeout; ssh does exactly that.
//! Here the attempts are staggered: the next address is tried [`ATTEMPT_DELAY`] after the
//! previous one started, or at once when it fails, address families alternate, and the
//! first connection that completes wins (the others are dropped).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout_at, Instant};

/// Delay between starting connection attempts (RFC 8305 recommends 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);
/// Addresses tried at most; more are ignored (discovery bounds its own lists too).
pub const MAX_ATTEMPTS: usize = 16;

/// Orders addresses as RFC 8305 §4 does: families alternate, starting with the family of
/// the first address, each family keeping its own order.
pub fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let (mut same, mut other): (Vec<_>, Vec<_>) = addrs
        .iter()
        .copied()
        .partition(|a| a.is_ipv6() == first.is_ipv6());
    same.reverse();
    other.reverse();
    let mut out = Vec::with_capacity(addrs.len());
    while !(same.is_empty() && other.is_empty()) {
        out.extend(same.pop());
        out.extend(other.pop());
    }
    out.truncate(MAX_ATTEMPTS);
    out
}

/// Connects to the first of `addrs` that answers, within `limit` overall. The error is the
/// last attempt's, or `TimedOut`.
pub async fn connect(addrs: &[SocketAddr], limit: Duration) -> io::Result<TcpStream> {
    let deadline = Instant::now() + limit;
    let mut queue = interleave(addrs).into_iter();
    let mut running = JoinSet::new();
    let mut last: Option<io::Error> = None;
    let mut next_start = Instant::now();
    loop {
        if Instant::now() >= next_start {
            if let Some(addr) = queue.next() {
                running.spawn(TcpStream::connect(addr));
                next_start = Instant::now() + ATTEMPT_DELAY;
            } else if running.is_empty() {
                return Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no addresses to connect to")
                }));
            }
        }
        let more = queue.len() > 0;
        let finished = timeout_at(deadline, async {
            tokio::select! {
                r = running.join_next(), if !running.is_empty() => r,
                _ = sleep_until(next_start), if more => None,
                else => None,
            }
        })
        .await;
        match finished {
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {limit:?}"),
                ))
            }
            Ok(Some(Ok(Ok(stream)))) => return Ok(stream),
            Ok(Some(Ok(Err(e)))) => {
                last = Some(e);
                // A failure starts the next attempt at once.
                next_start = Instant::now();
            }
            Ok(Some(Err(join))) => last = Some(io::Error::other(join)),
            Ok(None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_first() {
        let got = interleave(&[
            a("[fe80::1]:1"),
            a("[fe80::2]:2"),
            a("10.0.0.1:3"),
            a("[fe80::3]:4"),
            a("10.0.0.2:5"),
        ]);
        let want = [
            a("[fe80::1]:1"),
            a("10.0.0.1:3"),
            a("[fe80::2]:2"),
            a("10.0.0.2:5"),
            a("[fe80::3]:4"),
        ];
        assert_eq!(got, want);
        assert!(interleave(&[]).is_empty());
        let many: Vec<_> = (0..100u16).map(|p| a(&format!("127.0.0.1:{p}"))).collect();
        assert_eq!(interleave(&many).len(), MAX_ATTEMPTS);
    }

    /// A loopback address whose SYNs go unanswered: a listener that never accepts, its
    /// accept queue filled, so the kernel drops further SYNs. Returns it with the fillers.
    async fn silent_listener() -> (tokio::net::TcpListener, SocketAddr, Vec<TcpStream>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(a("127.0.0.1:0")).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                _ => return (l, addr, fillers),
            }
        }
        panic!("accept queue of a backlog-0 listener never filled");
    }

    /// An address that never answers does not delay one that does: the second attempt
    /// starts ATTEMPT_DELAY after the first and wins; one after another, the first attempt
    /// alone would have taken the whole limit.
    #[tokio::test]
    async fn a_silent_address_does_not_stall_the_next() {
        let (_silent, silent, _fillers) = silent_listener().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let s = connect(&[silent, good_addr], Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        // The silent one alone: nothing within the limit.
        let e = connect(&[silent], Duration::from_millis(700))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn refused_everywhere_reports_the_last_error_and_nothing_is_a_clear_error() {
        // A port just released: connection refused on loopback.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = connect(&[a(&format!("127.0.0.1:{port}"))], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let e = connect(&[], Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
