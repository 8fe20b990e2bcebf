//! LAN discovery probe for the network-namespace tests and `bench/discover.sh`.
//! Prints one JSON object per line on stdout.
//!
//! ```text
//! disc_probe announce --name NAME [--peer-id ID | --seed N] [--port P] [--no-broadcast]
//!                     [--no-mdns] [--discovery-port N] [--max-ms MS]
//!     {"event":"ready",...}; runs until stdin closes or MS pass; {"event":"stopped",...}
//! disc_probe discover [--timeout-ms MS] [--expect N] [--no-broadcast] [--no-mdns]
//!                     [--exclude ID] [--discovery-port N] [--resolve TARGET]...
//!     {"event":"discovered","elapsed_ms":..,"peers":[..],"first_seen_ms":[..],"conflicts":[..]}
//!     --expect N returns as soon as N peers are listed (else at the timeout).
//! disc_probe flood --target IPV4 [--count N] [--max-ms MS] [--discovery-port N]
//!     sends at most N garbage datagrams, paced over MS, to the discovery port; {"event":"flooded",..}
//! ```

use clap::{Parser, Subcommand};
use qssh::core::announce::{
    Announcement, ListenPort, Query, ANNOUNCE_FIXED_LEN, DISCOVERY_MAGIC, DISCOVERY_PORT,
    DISCOVERY_VERSION, MAX_DISCOVERY_DATAGRAM,
};
use qssh::core::crypto::sha256;
use qssh::core::identity::PeerId;
use qssh::net::discovery::{
    discover_until, Announcer, AnnouncerConfig, DiscoverOptions, DiscoveryStats,
};
use serde_json::{json, Value};
use std::io::{IsTerminal, Read};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Announce {
        #[arg(long)]
        name: String,
        #[arg(long)]
        peer_id: Option<PeerId>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 22222)]
        port: u16,
        #[arg(long)]
        no_broadcast: bool,
        #[arg(long)]
        no_mdns: bool,
        #[arg(long, default_value_t = DISCOVERY_PORT)]
        discovery_port: u16,
        /// Upper bound on the run time.
        #[arg(long, default_value_t = 120_000)]
        max_ms: u64,
    },
    Discover {
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        #[arg(long)]
        expect: Option<usize>,
        #[arg(long)]
        no_broadcast: bool,
        #[arg(long)]
        no_mdns: bool,
        #[arg(long)]
        exclude: Vec<PeerId>,
        #[arg(long, default_value_t = DISCOVERY_PORT)]
        discovery_port: u16,
        /// Also resolve these `connect` targets against the result.
        #[arg(long)]
        resolve: Vec<String>,
    },
    Flood {
        #[arg(long)]
        target: Ipv4Addr,
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        #[arg(long, default_value_t = 2000)]
        max_ms: u64,
        #[arg(long, default_value_t = DISCOVERY_PORT)]
        discovery_port: u16,
    },
}

fn stats_json(s: &DiscoveryStats) -> Value {
    json!({
        "received": s.received, "oversized": s.oversized, "foreign": s.foreign,
        "malformed": s.malformed, "rate_limited": s.rate_limited,
        "queries_received": s.queries_received, "queries_answered": s.queries_answered,
        "replies_limited": s.replies_limited, "announcements_received": s.announcements_received,
        "announcements_sent": s.announcements_sent, "queries_sent": s.queries_sent,
        "send_errors": s.send_errors, "mdns_queries_sent": s.mdns_queries_sent,
        "mdns_records": s.mdns_records,
        "mdns_rejected": s.mdns_rejected,
    })
}

fn emit(v: Value) {
    println!("{v}");
}

fn parse(s: String) -> Value {
    serde_json::from_str(&s).expect("core JSON is valid")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().cmd {
        Cmd::Announce {
            name,
            peer_id,
            seed,
            port,
            no_broadcast,
            no_mdns,
            discovery_port,
            max_ms,
        } => {
            let id = match (peer_id, seed) {
                (Some(id), _) => id,
                (None, Some(s)) => PeerId(sha256(&[b"disc_probe", &s.to_be_bytes()])),
                (None, None) => PeerId(qssh::core::crypto::random_array::<32>(
                    &mut qssh::core::crypto::OsRandom,
                )),
            };
            let mut cfg = AnnouncerConfig::new(id, &name, vec![ListenPort::tcp(port)]);
            cfg.broadcast = !no_broadcast;
            cfg.mdns = !no_mdns;
            cfg.discovery_port = discovery_port;
            let ann = Announcer::start(cfg).await?;
            emit(json!({
                "event": "ready", "peer_id": id.to_string(), "name": ann.name(),
                "instance": format!("{:016x}", ann.instance()), "port": port,
            }));
            // Run until stdin closes (the test drops it) or the time bound passes.
            let stdin_closed = tokio::task::spawn_blocking(|| {
                let mut sink = [0u8; 64];
                let mut stdin = std::io::stdin();
                while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            });
            tokio::select! {
                _ = stdin_closed => {}
                _ = tokio::time::sleep(Duration::from_millis(max_ms)) => {}
            }
            let stats = ann.stats();
            ann.stop().await;
            emit(json!({"event": "stopped", "stats": stats_json(&stats)}));
            // The blocking stdin reader may still be parked in read(): exit without it.
            std::process::exit(0);
        }
        Cmd::Discover {
            timeout_ms,
            expect,
            no_broadcast,
            no_mdns,
            exclude,
            discovery_port,
            resolve,
        } => {
            let opts = DiscoverOptions {
                timeout: Duration::from_millis(timeout_ms),
                broadcast: !no_broadcast,
                mdns: !no_mdns,
                discovery_port,
                exclude,
            };
            let d = discover_until(&opts, |p| expect.is_some_and(|n| p.len() >= n)).await?;
            let resolved: Vec<Value> = resolve
                .into_iter()
                .map(|t| match d.resolve(&t) {
                    Ok(p) => json!({"target": t, "peer_id": p.peer_id.to_string()}),
                    Err(e) => json!({"target": t, "error": e.to_string()}),
                })
                .collect();
            emit(json!({
                "resolved": resolved,
                "event": "discovered",
                "elapsed_ms": d.elapsed.as_secs_f64() * 1000.0,
                "peers": d.peers.iter().map(|p| parse(p.to_json())).collect::<Vec<_>>(),
                "lines": d.peers.iter().map(|p| p.line()).collect::<Vec<_>>(),
                "first_seen_ms": d.first_seen.iter().map(|t| t.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
                "conflicts": d.conflicts.iter().map(|c| parse(c.to_json())).collect::<Vec<_>>(),
                "stats": stats_json(&d.stats),
            }));
        }
        Cmd::Flood {
            target,
            count,
            max_ms,
            discovery_port,
        } => {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_broadcast(true)?;
            sock.set_nonblocking(true)?;
            let to = SocketAddr::from((target, discovery_port));
            let start = Instant::now();
            let limit = Duration::from_millis(max_ms);
            let valid = Announcement {
                peer_id: PeerId([0xee; 32]),
                protocol_version: 1,
                instance: 1,
                seq: 1,
                reply_to: 0,
                name: "flood".into(),
                ports: vec![ListenPort::tcp(1)],
            }
            .encode()?;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let (mut sent, mut dropped) = (0u64, 0u64);
            // Paced evenly over 90 % of the time bound, so the flood overlaps what it tests.
            let per = limit.mul_f64(0.9).div_f64(count.max(1) as f64);
            for i in 0..count {
                let elapsed = start.elapsed();
                if elapsed >= limit {
                    break;
                }
                if i % 64 == 0 {
                    if let Some(ahead) = per.mul_f64(i as f64).checked_sub(elapsed) {
                        std::thread::sleep(ahead);
                    }
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let d = garbage(i, rng, &valid);
                match sock.send_to(&d, to) {
                    Ok(_) => sent += 1,
                    Err(_) => {
                        dropped += 1;
                        // Socket buffer full: yield briefly instead of spinning.
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
            emit(json!({
                "event": "flooded", "sent": sent, "send_failed": dropped,
                "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
            }));
        }
    }
    Ok(())
}

/// One garbage datagram of kind `i % 8`: every way a discovery datagram can be wrong.
fn garbage(i: u64, r: u64, valid: &[u8]) -> Vec<u8> {
    let mut head = DISCOVERY_MAGIC.to_vec();
    match i % 8 {
        // Random bytes, random length (some oversized).
        0 => (0..(r % 1400) as usize + 1)
            .map(|k| (r >> (k % 56)) as u8)
            .collect(),
        // Unsupported version.
        1 => {
            head.extend_from_slice(&[DISCOVERY_VERSION.wrapping_add(1 + (r % 200) as u8), 1]);
            head.extend_from_slice(&valid[6..]);
            head
        }
        // Unknown type.
        2 => {
            head.extend_from_slice(&[DISCOVERY_VERSION, 3 + (r % 250) as u8]);
            head
        }
        // Truncated announcement.
        3 => valid[..(r as usize % (valid.len() - 1)) + 1].to_vec(),
        // Name with a control character.
        4 => {
            let mut v = valid.to_vec();
            v[ANNOUNCE_FIXED_LEN - 1] = 0x1b;
            v
        }
        // A valid QUERY: answers are rate limited.
        5 => Query { nonce: r }.encode(),
        // Oversized.
        6 => vec![0x51; MAX_DISCOVERY_DATAGRAM + 1 + (r % 300) as usize],
        // Valid announcement with a bad port count.
        _ => {
            let mut v = valid.to_vec();
            let at = v.len() - 4;
            v[at] = 0;
            v
        }
    }
}
