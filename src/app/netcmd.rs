//! `qssh netcheck`, `qssh relay` and `qssh ping`: the network commands of NAT traversal.

use super::chat::load_identity;
use super::dial::{dial_with, resolve, ConnectError, DialOptions, Transport};
use super::router::{route, Incoming};
use super::store::Home;
use super::target::Target;
use crate::core::frame::CloseCode;
use crate::net::path::host_candidates;
use crate::net::stun::{nat_type, netcheck as run_netcheck};
use crate::net::udp::UdpMux;
use anyhow::{Context, Result};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// `qssh netcheck`: prints `key: value` lines (stable, for scripts and tests).
pub async fn netcheck(servers: &[String], port: u16) -> Result<i32> {
    let mut resolved = Vec::new();
    for s in servers {
        match resolve(s).await {
            Ok(a) => resolved.push((s.clone(), a)),
            Err(e) => println!("stun {s}: {e}"),
        }
    }
    let bind: SocketAddr = if resolved.iter().all(|(_, a)| a.is_ipv4()) {
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)
    };
    let (mux, _control) = UdpMux::bind(bind, false)
        .await
        .with_context(|| format!("cannot bind UDP {bind}"))?;
    let addrs: Vec<SocketAddr> = resolved.iter().map(|(_, a)| *a).collect();
    let hosts = host_candidates(&addrs, mux.local_addr().port());
    let local_ips: Vec<IpAddr> = hosts.iter().map(|c| c.addr.ip()).collect();
    let report = run_netcheck(&mux, &resolved, &local_ips).await;
    println!(
        "local: {}",
        if hosts.is_empty() {
            report.local.to_string()
        } else {
            hosts
                .iter()
                .map(|c| c.addr.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    for s in &report.servers {
        match &s.result {
            Ok(b) => println!(
                "stun {}: mapped {}, rtt {:.2} ms, rfc5780 {}",
                s.server,
                b.mapped,
                b.rtt.as_secs_f64() * 1e3,
                match b.other {
                    Some(o) => format!("yes (other address {o})"),
                    None => "no".into(),
                }
            ),
            Err(e) => println!("stun {}: {e}", s.server),
        }
    }
    println!("udp: {}", if report.udp { "yes" } else { "no" });
    println!("mapping: {}", report.mapping);
    println!("filtering: {}", report.filtering);
    println!("nat: {}", nat_type(report.mapping, report.filtering));
    Ok(if report.udp { 0 } else { 1 })
}

/// `qssh relay`: runs until SIGINT/SIGTERM.
pub async fn relay(bind: Option<IpAddr>, port: u16) -> Result<i32> {
    let addr = SocketAddr::new(bind.unwrap_or(std::net::Ipv6Addr::UNSPECIFIED.into()), port);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install SIGTERM handler")?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
    };
    let ready = |a: SocketAddr| eprintln!("relay on UDP {a}");
    let r = crate::net::relay::serve(addr, ready, stop).await;
    match r {
        Err(e) if bind.is_none() => {
            // No IPv6: IPv4 only.
            tracing::debug!("IPv6 bind failed ({e}); trying IPv4");
            let addr = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port);
            let mut sigterm =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("cannot install SIGTERM handler")?;
            let stop = async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = sigterm.recv() => {}
                }
            };
            crate::net::relay::serve(addr, ready, stop)
                .await
                .with_context(|| format!("cannot run a relay on UDP port {port}"))?;
        }
        r => r.with_context(|| format!("cannot run a relay on {addr}"))?,
    }
    eprintln!("relay stopped");
    Ok(0)
}

pub struct PingOptions {
    pub target: String,
    pub default_port: u16,
    pub transport: Transport,
    pub count: u32,
    pub interval: Duration,
    pub accept_new: bool,
    pub name: String,
}

/// How long one ping may take before it counts as lost.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// `qssh ping`: one line per round trip, `seq N: rtt X ms, path P`.
pub async fn ping(home: &Home, opts: PingOptions) -> Result<i32> {
    let identity = load_identity(home)?;
    let target = Target::parse(&opts.target, opts.default_port).map_err(ConnectError::from)?;
    let mut c = dial_with(
        home,
        identity,
        DialOptions {
            target,
            accept_new: opts.accept_new,
            ask: true,
            name: opts.name,
            psk: None,
        },
        opts.transport,
    )
    .await?;
    let events = c.take_events();
    let udp = c.udp;
    let addr = c.addr;
    let describe = |udp: &Option<super::dial::UdpLink>| match udp {
        Some(u) => u.describe_path(),
        None => format!("tcp {addr}"),
    };
    eprintln!(
        "connected to {} in {} ms",
        c.peer.peer_id().short(),
        c.handshake_time.as_millis()
    );
    let (router, mut incoming) = route(c.handle, events);
    let mut lost = 0;
    for seq in 1..=opts.count.max(1) {
        router.session().ping();
        let got = tokio::time::timeout(PING_TIMEOUT, async {
            loop {
                match incoming.recv().await {
                    Some(Incoming::Pong(rtt)) => return Some(rtt),
                    Some(Incoming::Closed(reason)) => {
                        eprintln!("qssh: session ended: {reason}");
                        return None;
                    }
                    None => return None,
                    Some(_) => {}
                }
            }
        })
        .await;
        match got {
            Ok(Some(rtt)) => println!(
                "seq {seq}: rtt {:.3} ms, path {}",
                rtt.as_secs_f64() * 1e3,
                describe(&udp)
            ),
            Ok(None) => return Ok(crate::cli::EXIT_CONNECT),
            Err(_) => {
                lost += 1;
                println!("seq {seq}: timeout, path {}", describe(&udp));
            }
        }
        if seq < opts.count {
            tokio::time::sleep(opts.interval).await;
        }
    }
    router.close(CloseCode::Normal, "ping done");
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(i) = incoming.recv().await {
            if matches!(i, Incoming::Closed(_)) {
                break;
            }
        }
    })
    .await;
    Ok(if lost == 0 { 0 } else { 1 })
}
