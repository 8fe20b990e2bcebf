//! Connection targets as users type them: `host`, `host:port`, `[v6]:port`, `PEERID@host:port`.

use crate::core::identity::{PeerId, PEER_ID_TEXT_LEN};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Pinned peer ID (`PEERID@...`, or announced by discovery): the peer must prove exactly
    /// this identity.
    pub peer: Option<PeerId>,
    pub host: String,
    pub port: u16,
    /// Addresses already known (from discovery); empty means resolve `host` by DNS.
    pub addrs: Vec<std::net::SocketAddr>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("empty target: give host, host:port or PEERID@host:port")]
    Empty,
    #[error("invalid port in {0:?}")]
    BadPort(String),
    #[error("invalid peer ID before '@' in {0:?} (expected {PEER_ID_TEXT_LEN} base32 characters)")]
    BadPeerId(String),
}

impl Target {
    pub fn parse(s: &str, default_port: u16) -> Result<Self, TargetError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        let (peer, rest) = match s.rsplit_once('@') {
            Some((id, rest)) => (
                Some(
                    id.parse::<PeerId>()
                        .map_err(|_| TargetError::BadPeerId(s.into()))?,
                ),
                rest,
            ),
            None => (None, s),
        };
        let bad_port = || TargetError::BadPort(s.into());
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad_port)?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().map_err(|_| bad_port())?),
                None if after.is_empty() => (h, default_port),
                None => return Err(bad_port()),
            }
        } else if rest.matches(':').count() > 1 {
            (rest, default_port) // bare IPv6 address
        } else if let Some((h, p)) = rest.split_once(':') {
            (h, p.parse().map_err(|_| bad_port())?)
        } else {
            (rest, default_port)
        };
        if host.is_empty() {
            return Err(TargetError::Empty);
        }
        Ok(Target {
            peer,
            host: host.to_string(),
            port,
            addrs: Vec::new(),
        })
    }

    /// True for a bare word that may name a discovered peer (a name, a peer ID or a prefix of
    /// one) rather than a host: no port, no `@`, no dot, not an IP address, not localhost.
    pub fn may_be_discovered(s: &str) -> bool {
        let s = s.trim();
        !s.is_empty()
            && !s.contains([':', '@', '.', '[', '/'])
            && s != "localhost"
            && s.parse::<std::net::IpAddr>().is_err()
    }

    /// `host:port` with brackets for IPv6, as known_peers stores it.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let t = Target::parse("example.org", 22222).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.peer),
            ("example.org", 22222, None)
        );
        assert_eq!(Target::parse("h:1", 2).unwrap().port, 1);
        let t = Target::parse("[::1]:7", 2).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7));
        assert_eq!(t.host_port(), "[::1]:7");
        assert_eq!(Target::parse("fe80::1", 5).unwrap().port, 5);
        let id = PeerId([1; 32]);
        let t = Target::parse(&format!("{id}@127.0.0.1:9"), 2).unwrap();
        assert_eq!(t.peer, Some(id));
        assert!(matches!(
            Target::parse("zz@h", 1),
            Err(TargetError::BadPeerId(_))
        ));
        assert!(matches!(
            Target::parse("h:x", 1),
            Err(TargetError::BadPort(_))
        ));
        assert_eq!(Target::parse(" ", 1), Err(TargetError::Empty));
        assert!(Target::may_be_discovered("alice"));
        assert!(Target::may_be_discovered(&PeerId([1; 32]).to_string()));
        for host in [
            "alice:22",
            "a.example",
            "localhost",
            "10.0.0.1",
            "::1",
            "x@h",
        ] {
            assert!(!Target::may_be_discovered(host), "{host}");
        }
    }
}
