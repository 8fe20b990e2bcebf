//! `qssh demo`: two peers in one process over real loopback TCP, with throwaway identities.
//! Shows the handshake (sizes, time, identities), a chat exchange both ways through the
//! ratchet, and the ratchet's DH and post-quantum steps.

use crate::core::crypto::OsRandom;
use crate::core::frame::{ChannelKind, CloseCode};
use crate::core::handshake::HandshakeConfig;
use crate::core::identity::{Algorithm, Identity};
use crate::core::session::{Event, Session, SessionConfig};
use crate::net::tcp::{spawn_session, SessionHandle};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;

/// Lines each side sends in the demo conversation.
const CONVERSATION: &[(&str, &str)] = &[
    ("alice", "hello bob, is this channel quantum-safe?"),
    ("bob", "yes: X25519 + ML-KEM-768, signed with Falcon-512"),
    (
        "alice",
        "and if someone records this and waits for a quantum computer?",
    ),
    (
        "bob",
        "ML-KEM keeps the handshake secret, and the ratchet re-keys with ML-KEM too",
    ),
    ("alice", "forward secrecy per message, then"),
    ("bob", "and every direction change is a fresh DH step"),
];

async fn next_event(ev: &mut UnboundedReceiver<Event>) -> Result<Event> {
    tokio::time::timeout(Duration::from_secs(10), ev.recv())
        .await
        .context("demo peer did not answer in 10 s")?
        .context("demo session ended unexpectedly")
}

async fn wait_for<T>(
    ev: &mut UnboundedReceiver<Event>,
    mut f: impl FnMut(&Event) -> Option<T>,
) -> Result<T> {
    loop {
        let e = next_event(ev).await?;
        if let Event::Closed { reason } = &e {
            bail!("demo session closed: {reason}");
        }
        if let Some(t) = f(&e) {
            return Ok(t);
        }
    }
}

pub async fn run() -> Result<i32> {
    println!("qssh demo: two peers on this machine, talking over loopback TCP\n");
    let t = Instant::now();
    let alice = Arc::new(Identity::generate(Algorithm::Falcon512, &mut OsRandom));
    let bob = Arc::new(Identity::generate(Algorithm::Falcon512, &mut OsRandom));
    println!(
        "1. identities (Falcon-512 key generation, {} ms for both)",
        t.elapsed().as_millis()
    );
    println!("   alice  {}", alice.peer_id());
    println!("   bob    {}\n", bob.peer_id());

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("2. bob listens on {addr}; alice connects, pinning bob's peer ID");
    let bob_task = tokio::spawn({
        let bob = bob.clone();
        async move {
            let (stream, _) = listener.accept().await?;
            let s = Session::responder(
                SessionConfig {
                    handshake: HandshakeConfig::new(bob, "bob"),
                    expected_peer: None,
                },
                Instant::now(),
                Box::new(OsRandom),
            );
            anyhow::Ok(spawn_session(stream, s))
        }
    });
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await?;
    let s = Session::initiator(
        SessionConfig {
            handshake: HandshakeConfig::new(alice.clone(), "alice"),
            expected_peer: Some(bob.peer_id()),
        },
        started,
        Box::new(OsRandom),
    );
    let (ah, mut aev, atask) = spawn_session(stream, s);
    let (bh, mut bev, btask) = bob_task.await??;
    let (peer, sid) = wait_for(&mut aev, |e| match e {
        Event::Established {
            peer, session_id, ..
        } => Some((peer.clone(), *session_id)),
        _ => None,
    })
    .await?;
    let hs_ms = started.elapsed().as_secs_f64() * 1e3;
    let bob_saw = wait_for(&mut bev, |e| match e {
        Event::Established { peer, .. } => Some(peer.peer_id()),
        _ => None,
    })
    .await?;
    println!("   handshake done in {hs_ms:.2} ms (one round trip + key confirmation)");
    println!(
        "   alice verified bob's signature: {}",
        peer.peer_id() == bob.peer_id()
    );
    println!(
        "   bob verified alice's signature: {}",
        bob_saw == alice.peer_id()
    );
    println!("   session id {}\n", hex(&sid[..8]));

    println!("3. chat over the ratchet (each message its own AES-256-GCM key)");
    let ach = ah.open_channel(ChannelKind::Chat, b"").await?;
    let bch = wait_for(&mut bev, |e| match e {
        Event::ChannelRequest { ch, .. } => Some(*ch),
        _ => None,
    })
    .await?;
    bh.accept_channel(bch);
    wait_for(&mut aev, |e| {
        matches!(e, Event::ChannelAccepted { .. }).then_some(())
    })
    .await?;
    // A pause longer than DH_RATCHET_MIN_INTERVAL between turns, so every turn steps the DH
    // ratchet (faster exchanges share a chain: that is the rate limit at work).
    let turn_gap = crate::core::limits::DH_RATCHET_MIN_INTERVAL + Duration::from_millis(5);
    let extra: Vec<(&str, String)> = (0..2 * crate::core::limits::PQ_RATCHET_EVERY_STEPS + 2)
        .map(|i| {
            let who = if i % 2 == 0 { "alice" } else { "bob" };
            (who, format!("turn {i}"))
        })
        .collect();
    let script = CONVERSATION
        .iter()
        .map(|(w, t)| (*w, t.to_string(), true))
        .chain(extra.into_iter().map(|(w, t)| (w, t, false)));
    for (who, text, show) in script {
        tokio::time::sleep(turn_gap).await;
        let (tx, txch, rx): (&SessionHandle, u32, &mut UnboundedReceiver<Event>) = if who == "alice"
        {
            (&ah, ach, &mut bev)
        } else {
            (&bh, bch, &mut aev)
        };
        tx.send(txch, format!("{text}\n").into_bytes()).await?;
        let got = wait_for(rx, |e| match e {
            Event::Data { data, .. } => Some(String::from_utf8_lossy(data).trim_end().to_string()),
            _ => None,
        })
        .await?;
        if show {
            println!("   {who:>5}: {got}");
        }
    }
    println!(
        "   ... and {} more short turns",
        2 * crate::core::limits::PQ_RATCHET_EVERY_STEPS + 2
    );
    if let Some((st, Some(r))) = ah.stats().await {
        println!(
            "\n   alice sent {} records ({} bytes); her ratchet made {} X25519 steps, saw {} of bob's,\n   and completed {} ML-KEM-768 steps (a fresh post-quantum secret in the root key each time)",
            st.records_sent, st.bytes_sent, r.dh_steps, r.peer_dh_steps, r.pq_steps_completed
        );
    }
    ah.close(CloseCode::Normal, "demo over");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = atask.await;
        let _ = btask.await;
    })
    .await;
    println!("\n4. the session closed cleanly on both sides.");
    println!("   Try it between two terminals:  qssh listen   and   qssh connect 127.0.0.1");
    Ok(0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
