//! Listener admission control, sans-IO: how many handshakes and sessions run at once, and how
//! fast one IP address may start handshakes (a token bucket per address).

use super::limits::{
    HANDSHAKES_PER_IP_PER_SEC, HANDSHAKE_BURST_PER_IP, MAX_CONCURRENT_HANDSHAKES, MAX_SESSIONS,
};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Addresses tracked at once; beyond this, full buckets are forgotten first.
pub const MAX_TRACKED_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyHandshakes,
    TooManySessions,
    RateLimited,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::TooManyHandshakes => "too many handshakes in progress",
            Refusal::TooManySessions => "too many sessions",
            Refusal::RateLimited => "too many handshakes from this address",
        })
    }
}

/// IPv6 hosts usually own a whole /64: rate-limit by that prefix.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        },
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Counts handshakes and sessions; callers report each start and end.
#[derive(Debug, Default)]
pub struct Admission {
    handshakes: usize,
    sessions: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl Admission {
    /// A new connection from `ip` wants to handshake.
    pub fn admit(&mut self, now: Instant, ip: IpAddr) -> Result<(), Refusal> {
        let ip = rate_key(ip);
        if self.handshakes >= MAX_CONCURRENT_HANDSHAKES {
            return Err(Refusal::TooManyHandshakes);
        }
        if self.sessions >= MAX_SESSIONS {
            return Err(Refusal::TooManySessions);
        }
        let rate = f64::from(HANDSHAKES_PER_IP_PER_SEC);
        let burst = f64::from(HANDSHAKE_BURST_PER_IP);
        if self.buckets.len() >= MAX_TRACKED_ADDRESSES && !self.buckets.contains_key(&ip) {
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_TRACKED_ADDRESSES {
                // Forget the address seen longest ago.
                if let Some(oldest) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| *k)
                {
                    self.buckets.remove(&oldest);
                }
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(Refusal::RateLimited);
        }
        b.tokens -= 1.0;
        self.handshakes += 1;
        Ok(())
    }

    /// The handshake ended; `established` moves it to the session count.
    pub fn handshake_done(&mut self, established: bool) -> Result<(), Refusal> {
        self.handshakes = self.handshakes.saturating_sub(1);
        if established {
            if self.sessions >= MAX_SESSIONS {
                return Err(Refusal::TooManySessions);
            }
            self.sessions += 1;
        }
        Ok(())
    }

    pub fn session_done(&mut self) {
        self.sessions = self.sessions.saturating_sub(1);
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.handshakes, self.sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_ip_rate_limit_and_refill() {
        let mut a = Admission::default();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..HANDSHAKE_BURST_PER_IP {
            a.admit(t0, ip).unwrap();
            a.handshake_done(false).unwrap();
        }
        assert_eq!(a.admit(t0, ip), Err(Refusal::RateLimited));
        // another address is unaffected
        a.admit(t0, "192.0.2.2".parse().unwrap()).unwrap();
        a.handshake_done(false).unwrap();
        // one second later the bucket holds HANDSHAKES_PER_IP_PER_SEC tokens again
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..HANDSHAKES_PER_IP_PER_SEC {
            a.admit(t1, ip).unwrap();
            a.handshake_done(false).unwrap();
        }
        assert_eq!(a.admit(t1, ip), Err(Refusal::RateLimited));
    }

    #[test]
    fn concurrent_handshakes_and_sessions_are_capped() {
        let mut a = Admission::default();
        let t0 = Instant::now();
        for i in 0..MAX_CONCURRENT_HANDSHAKES {
            a.admit(t0, IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]))
                .unwrap();
        }
        assert_eq!(
            a.admit(t0, "10.9.9.9".parse().unwrap()),
            Err(Refusal::TooManyHandshakes)
        );
        a.handshake_done(true).unwrap();
        assert_eq!(a.counts(), (MAX_CONCURRENT_HANDSHAKES - 1, 1));
        a.session_done();
        assert_eq!(a.counts().1, 0);
    }

    #[test]
    fn tracked_addresses_stay_bounded() {
        let mut a = Admission::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_ADDRESSES as u32 + 100) {
            let _ = a.admit(t0, IpAddr::from(i.to_be_bytes()));
            let _ = a.handshake_done(false);
        }
        assert!(a.buckets.len() <= MAX_TRACKED_ADDRESSES);
        // a new address is still admitted: the oldest entry was forgotten
        a.admit(t0, "198.51.100.1".parse().unwrap()).unwrap();
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let mut a = Admission::default();
        let t0 = Instant::now();
        for i in 0..HANDSHAKE_BURST_PER_IP {
            let ip: IpAddr = format!("2001:db8::{:x}", i + 1).parse().unwrap();
            a.admit(t0, ip).unwrap();
            a.handshake_done(false).unwrap();
        }
        assert_eq!(
            a.admit(t0, "2001:db8::ffff".parse().unwrap()),
            Err(Refusal::RateLimited)
        );
        a.admit(t0, "2001:db8:0:1::1".parse().unwrap()).unwrap();
    }
}
